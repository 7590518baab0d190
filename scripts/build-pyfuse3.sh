#!/usr/bin/env bash
# Install zstfs's build of pyfuse3 into a venv: pyfuse3 3.5.0 from PyPI (sdist, checked against
# its sha256) with contrib/pyfuse3/pyfuse3-3.5.0-zstfs.patch applied, compiled against the
# system's libfuse3 like any pyfuse3 install (pyfuse3 ships no wheels; pip always compiles it).
#
#   scripts/build-pyfuse3.sh VENV
#
# The patch adds three opt-in switches that stock pyfuse3 cannot express, and nothing else:
#   enable_readdir_cache  opendir replies FOPEN_CACHE_DIR|FOPEN_KEEP_CACHE (the kernel keeps listings)
#   disable_splice_read   INIT clears FUSE_CAP_SPLICE_READ (one read(2) per request, no pipe)
#   directories_by_inode  where the kernel has FUSE_CAP_NO_OPENDIR_SUPPORT (an OPENDIR answered
#                         ENOSYS is never sent again), readdir and fsyncdir get the inode, not a handle
# and `pyfuse3.ZSTFS_PATCHES` naming them. zstfs works on a stock pyfuse3 too, only slower on
# request-bound work (BENCHMARKS.md, issue 13); `zstfs status --json` shows `pyfuse3_patches`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:?usage: scripts/build-pyfuse3.sh VENV}
version=3.5.0
sha256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
patch_file=$PWD/contrib/pyfuse3/pyfuse3-$version-zstfs.patch

if "$venv/bin/python" - "$patch_file" <<'PY' 2>/dev/null
import hashlib, sys, pyfuse3
want = hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()
sys.exit(0 if getattr(pyfuse3, "ZSTFS_PATCH_SHA256", None) == want else 1)
PY
then
    echo "pyfuse3 $version with zstfs's patch already installed in $venv" >&2
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv/bin/pip" download -q --no-binary :all: --no-deps "pyfuse3==$version" -d "$work"
echo "$sha256  $work/pyfuse3-$version.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/pyfuse3-$version.tar.gz" -C "$work"
src=$work/pyfuse3-$version
patch -s -p1 -d "$src" < "$patch_file"
# Record which patch this build carries, so a changed patch is rebuilt by the next install.
sum=$(sha256sum "$patch_file" | cut -d' ' -f1)
printf '\nZSTFS_PATCH_SHA256 = %s\n' "'$sum'" >> "$src/src/pyfuse3/__init__.pyx"
"$venv/bin/pip" install -q --force-reinstall --no-deps "$src"
"$venv/bin/pip" install -q "trio>=0.25"  # pyfuse3's one dependency, for the check below
"$venv/bin/python" -c 'import pyfuse3; print("pyfuse3", pyfuse3.__version__, "patched:", ", ".join(pyfuse3.ZSTFS_PATCHES))' >&2
