#!/usr/bin/env bash
# Install zstfs's build of pyfuse3 into a venv: pyfuse3 3.5.0 from PyPI (sdist, checked against
# its sha256) with contrib/pyfuse3/pyfuse3-3.5.0-zstfs.patch applied.
#
#   scripts/build-pyfuse3.sh VENV system    against the system's libfuse3 (Debian 12: 3.14)
#   scripts/build-pyfuse3.sh VENV bundled   against libfuse 3.17.2, built from Debian's source
#                                           tarball (sha256-checked) into VENV/opt/libfuse3
#
# Exit 0 only when VENV's python, in a fresh process, imports this very build (its stamp) and,
# for `bundled`, that build links the bundled libfuse. Anything else exits non-zero and leaves
# the caller to install stock pyfuse3 (install.sh does). A venv that already holds this build
# is left alone: a rerun costs one import.
#
# Why two builds: FUSE passthrough (the kernel reads, writes and maps a plain file's backing file
# itself) needs libfuse 3.17 and CAP_SYS_ADMIN; Debian 12 ships 3.14. An ordinary user's mount
# can never register a backing file, so the system build is all they can use, and it needs no
# libfuse download, meson or ninja (BENCHMARKS.md: install times and what each build gains).
#
# The patch adds opt-in switches that stock pyfuse3 cannot express:
#   enable_readdir_cache  opendir replies FOPEN_CACHE_DIR|FOPEN_KEEP_CACHE (the kernel keeps listings)
#   disable_splice_read   INIT clears FUSE_CAP_SPLICE_READ (one read(2) per request, no pipe)
#   directories_by_inode  where the kernel has FUSE_CAP_NO_OPENDIR_SUPPORT (an OPENDIR answered
#                         ENOSYS is never sent again), readdir and fsyncdir get the inode, not a handle
#   enable_passthrough    (libfuse 3.17+ only) INIT asks for FUSE_CAP_PASSTHROUGH; FileInfo.backing_id,
#                         pyfuse3.passthrough_open(fd) / passthrough_close(id) (CAP_SYS_ADMIN)
#   kill_suidgid          write, open, create and setattr get kill_suidgid=True where the request
#                         asks the server to clear set-uid/set-gid (FUSE_WRITE_KILL_SUIDGID,
#                         FUSE_OPEN_KILL_SUIDGID, FATTR_KILL_SUIDGID: libfuse passes none of them on)
#   enable_killpriv_v2    (libfuse 3.17+ only) INIT asks for FUSE_CAP_HANDLE_KILLPRIV_V2: writes no
#                         longer ask for security.capability (the server clears the bits instead)
#   spin_ns               with Operations.spin_ns > 0, after a short wait for a request the reader
#                         polls the session fd that long before it sleeps in epoll
# one change to the request loop that stock pyfuse3 has no switch for:
#   inline_handlers       the reader runs each handler until it first suspends, and only then wakes
#                         a spare reader (or starts one); stock pyfuse3 starts one before every
#                         request that finds no other reader waiting, and the two take turns at
#                         the read lock, a trio task switch per request
# and `pyfuse3.ZSTFS_PATCHES` naming those in effect. zstfs works on a stock pyfuse3 too, only
# slower on request-bound work; `zstfs status --json` shows `pyfuse3_patches`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(cd "${1:?usage: scripts/build-pyfuse3.sh VENV system|bundled}" && pwd)
libfuse=${2:?usage: scripts/build-pyfuse3.sh VENV system|bundled}
version=3.5.0
sha256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
bundled_version=3.17.2
bundled_sha256=3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f
patch_file=$PWD/contrib/pyfuse3/pyfuse3-$version-zstfs.patch
prefix=$venv/opt/libfuse3
py=$venv/bin/python
pip=("$py" -m pip --disable-pip-version-check -q)

case $libfuse in
    system) what="libfuse $(pkg-config --modversion fuse3) (system)" ;;
    bundled) what="libfuse $bundled_version (bundled)" ;;
    *) echo "usage: scripts/build-pyfuse3.sh VENV system|bundled" >&2; exit 2 ;;
esac
# What this build is: the patch and the libfuse it links. A change to either rebuilds.
stamp=$( (cat "$patch_file"; echo "$what") | sha256sum | cut -d' ' -f1)

# Is VENV's pyfuse3 this build, and does it load? A fresh process, so a library that fails to
# link (a pyfuse3 compiled against one libfuse and loading another) counts as not installed.
installed() {
    "$py" - "$stamp" "$libfuse" "$prefix" <<'PY'
import sys, pyfuse3
stamp, libfuse, prefix = sys.argv[1:]
if getattr(pyfuse3, "ZSTFS_PATCH_SHA256", None) != stamp:
    sys.exit(1)
if libfuse == "bundled":
    maps = open("/proc/self/maps").read()
    if "enable_passthrough" not in pyfuse3.ZSTFS_PATCHES or f"{prefix}/lib/libfuse3" not in maps:
        sys.exit(1)
PY
}

if installed 2>/dev/null; then
    echo "zstfs's pyfuse3 ($what) already installed in $venv" >&2
    exit 0
fi
echo "building zstfs's pyfuse3 $version against $what" >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "$libfuse" = bundled ]; then
    # Debian's pool, on the mirror apt already uses (3.17.2 is trixie's; bookworm has 3.14).
    mirror=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | sed -n 's/^URIs: *\([^ ]*\).*/\1/p; s/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) .*/\2/p' \
        | grep -v -e security | sed -n 1p) || true
    [ -n "$mirror" ] || { echo "error: no Debian mirror in apt's sources" >&2; exit 1; }
    url=${mirror%/}/pool/main/f/fuse3/fuse3_${bundled_version}.orig.tar.gz
    curl -fsSL --retry 3 -o "$work/libfuse.tar.gz" "$url"
    echo "$bundled_sha256  $work/libfuse.tar.gz" | sha256sum -c --quiet
    tar -xzf "$work/libfuse.tar.gz" -C "$work"
    rm -rf "$prefix"
    # Shared (its symbols are versioned, which a static archive cannot carry into pyfuse3's
    # extension), no utilities (fusermount3 comes from the system package).
    meson setup "$work/libfuse-build" "$work/fuse-$bundled_version" --prefix="$prefix" \
        --libdir=lib -Ddefault_library=shared -Dutils=false -Dexamples=false -Dtests=false \
        -Dbuildtype=release >/dev/null
    ninja -C "$work/libfuse-build" install >/dev/null
    export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
    # -L in LDFLAGS comes first on the link line: setuptools adds Python's own LIBDIR (on
    # Debian's python3, /usr/lib/x86_64-linux-gnu, where the system libfuse3.so is) before the
    # extension's pkg-config flags, and the first -L that has libfuse3.so wins.
    export LDFLAGS="-L$prefix/lib -Wl,-rpath,$prefix/lib"
else
    unset PKG_CONFIG_PATH LDFLAGS
fi

# Only the sdist of pyfuse3 itself: its build dependencies (setuptools, setuptools_scm, Cython)
# come as wheels. (`--no-binary :all:` would compile Cython from source too: minutes.)
"${pip[@]}" download --no-deps --no-binary pyfuse3 "pyfuse3==$version" -d "$work"
echo "$sha256  $work/pyfuse3-$version.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/pyfuse3-$version.tar.gz" -C "$work"
src=$work/pyfuse3-$version
patch -s -p1 -d "$src" < "$patch_file"
# Record which build this is, so a changed patch or libfuse is rebuilt by the next install.
printf '\nZSTFS_PATCH_SHA256 = %s\n' "'$stamp'" >> "$src/src/pyfuse3/__init__.pyx"
"${pip[@]}" install --force-reinstall --no-deps "$src"
"${pip[@]}" install "trio>=0.25"  # pyfuse3's one dependency, for the check below
if ! installed; then
    echo "error: the pyfuse3 just built does not load as built ($what)" >&2
    exit 1
fi
"$py" -c 'import pyfuse3; print("pyfuse3", pyfuse3.__version__, "patched:",
                               ", ".join(pyfuse3.ZSTFS_PATCHES))' >&2
