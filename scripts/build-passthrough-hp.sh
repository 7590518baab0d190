#!/usr/bin/env bash
# Build libfuse's C++ example file system `passthrough_hp`, the floor that bench_mount_cost.py's
# `--mounter passthrough_hp --floor-binary PATH` times root's rows against: a C++ daemon with
# FUSE passthrough on (reads and writes go to the backing file in the kernel), as zstfs's root
# mount has it. Debian's libfuse3-dev does not ship this example, so it comes from the libfuse
# 3.17.2 tarball that scripts/build-pyfuse3.sh bundles (same version, same checksum, same mirror),
# built against the libfuse that script installed into the venv.
#
#   scripts/build-passthrough-hp.sh OUT [LIBFUSE_PREFIX]     (needs g++; default prefix
#                                                            .venv/opt/libfuse3)
set -euo pipefail
out=$(realpath -m "${1:?usage: scripts/build-passthrough-hp.sh OUT [LIBFUSE_PREFIX]}")
prefix=$(realpath -m "${2:-$(dirname "$0")/../.venv/opt/libfuse3}")
cd "$(dirname "$0")/.."
[ -f "$prefix/include/fuse3/fuse_lowlevel.h" ] || { echo "error: no libfuse 3.17 under $prefix (run ./install.sh --test)" >&2; exit 1; }
version=$(sed -n 's/^bundled_version=//p' scripts/build-pyfuse3.sh)
sha256=$(sed -n 's/^bundled_sha256=//p' scripts/build-pyfuse3.sh)
[ -n "$version" ] && [ -n "$sha256" ] || { echo "error: no bundled libfuse version in scripts/build-pyfuse3.sh" >&2; exit 1; }
# The mirror apt already uses, found as build-pyfuse3.sh finds it.
mirror=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | sed -n 's/^URIs: *\([^ ]*\).*/\1/p; s/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) .*/\2/p' \
    | grep -v -e security | sed -n 1p) || true
[ -n "$mirror" ] || { echo "error: no Debian mirror in apt's sources" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -fsSL --retry 3 -o "$work/libfuse.tar.gz" "${mirror%/}/pool/main/f/fuse3/fuse3_${version}.orig.tar.gz"
echo "$sha256  $work/libfuse.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/libfuse.tar.gz" -C "$work"
ex=$work/fuse-$version/example
g++ -O2 -std=c++17 -o "$out" "$ex/passthrough_hp.cc" -I"$ex" -I"$prefix/include/fuse3" \
    -L"$prefix/lib" -Wl,-rpath,"$prefix/lib" -lfuse3 -lpthread
echo "built $out (passthrough_hp of libfuse $version, against $prefix)" >&2
