#!/usr/bin/env bash
# Install zstfs's build of pyfuse3 into a venv: pyfuse3 3.5.0 from PyPI (sdist, checked against
# its sha256) with contrib/pyfuse3/pyfuse3-3.5.0-zstfs.patch applied, compiled against libfuse
# 3.17.2 built from Debian's source tarball (checked against its sha256) into the venv itself.
#
#   scripts/build-pyfuse3.sh VENV
#
# Why libfuse 3.17: FUSE passthrough (the kernel reads, writes and maps a plain file's backing
# file itself) needs it; Debian 12 ships 3.14. The library goes to VENV/opt/libfuse3 and only
# this pyfuse3 links it (by rpath); the system's fuse3 package still provides fusermount3.
#
# The patch adds opt-in switches that stock pyfuse3 cannot express, and nothing else:
#   enable_readdir_cache  opendir replies FOPEN_CACHE_DIR|FOPEN_KEEP_CACHE (the kernel keeps listings)
#   disable_splice_read   INIT clears FUSE_CAP_SPLICE_READ (one read(2) per request, no pipe)
#   directories_by_inode  where the kernel has FUSE_CAP_NO_OPENDIR_SUPPORT (an OPENDIR answered
#                         ENOSYS is never sent again), readdir and fsyncdir get the inode, not a handle
#   enable_passthrough    INIT asks for FUSE_CAP_PASSTHROUGH; FileInfo.backing_id, and
#                         pyfuse3.passthrough_open(fd) / passthrough_close(id) (CAP_SYS_ADMIN)
# and `pyfuse3.ZSTFS_PATCHES` naming them. zstfs works on a stock pyfuse3 too, only slower on
# request-bound work (BENCHMARKS.md, issue 13); `zstfs status --json` shows `pyfuse3_patches`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(cd "${1:?usage: scripts/build-pyfuse3.sh VENV}" && pwd)
version=3.5.0
sha256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
libfuse_version=3.17.2
libfuse_url=http://deb.debian.org/debian/pool/main/f/fuse3/fuse3_${libfuse_version}.orig.tar.gz
libfuse_sha256=3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f
patch_file=$PWD/contrib/pyfuse3/pyfuse3-$version-zstfs.patch
prefix=$venv/opt/libfuse3
# What this build is: the patch and the libfuse it links. A change to either rebuilds.
stamp=$( (cat "$patch_file"; echo "libfuse $libfuse_version") | sha256sum | cut -d' ' -f1)

if "$venv/bin/python" - "$stamp" <<'PY' 2>/dev/null
import sys, pyfuse3
sys.exit(0 if getattr(pyfuse3, "ZSTFS_PATCH_SHA256", None) == sys.argv[1] else 1)
PY
then
    echo "pyfuse3 $version with zstfs's patch (libfuse $libfuse_version) already installed in $venv" >&2
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# libfuse: shared (its symbols are versioned, which a static archive cannot carry into
# pyfuse3's extension), no utilities (fusermount3 comes from the system package).
curl -fsSL --retry 3 -o "$work/libfuse.tar.gz" "$libfuse_url"
echo "$libfuse_sha256  $work/libfuse.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/libfuse.tar.gz" -C "$work"
rm -rf "$prefix"
meson setup "$work/libfuse-build" "$work/fuse-$libfuse_version" --prefix="$prefix" --libdir=lib \
    -Ddefault_library=shared -Dutils=false -Dexamples=false -Dtests=false \
    -Dbuildtype=release >/dev/null
ninja -C "$work/libfuse-build" install >/dev/null

"$venv/bin/pip" download -q --no-binary :all: --no-deps "pyfuse3==$version" -d "$work"
echo "$sha256  $work/pyfuse3-$version.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/pyfuse3-$version.tar.gz" -C "$work"
src=$work/pyfuse3-$version
patch -s -p1 -d "$src" < "$patch_file"
# Record which build this is, so a changed patch or libfuse is rebuilt by the next install.
printf '\nZSTFS_PATCH_SHA256 = %s\n' "'$stamp'" >> "$src/src/pyfuse3/__init__.pyx"
PKG_CONFIG_PATH=$prefix/lib/pkgconfig LDFLAGS="-Wl,-rpath,$prefix/lib" \
    "$venv/bin/pip" install -q --force-reinstall --no-deps "$src"
"$venv/bin/pip" install -q "trio>=0.25"  # pyfuse3's one dependency, for the check below
"$venv/bin/python" - <<'PY' >&2
import pyfuse3
print("pyfuse3", pyfuse3.__version__, "patched:", ", ".join(pyfuse3.ZSTFS_PATCHES))
PY
# (ldd's whole output first: `ldd | grep -q` fails under pipefail when grep exits early)
linked=$(ldd "$venv"/lib/python3*/site-packages/pyfuse3/__init__*.so)
case $linked in
    *"$prefix/lib/libfuse3"*) ;;
    *) echo "error: pyfuse3 is not linked against $prefix:" >&2; echo "$linked" >&2; exit 1 ;;
esac
