#!/usr/bin/env bash
# Build libfuse's own C example file system, `passthrough_ll`, as the floor that
# bench_mount_cost.py's `--mounter passthrough_ll` and `--user-floor` time zstfs against: what a
# FUSE daemon that only passes requests through costs on this machine, with no Python at all.
#
#   scripts/build-passthrough-ll.sh OUT [LIBFUSE_PREFIX]
#
# The source is the example Debian's libfuse3-dev ships (/usr/share/doc/libfuse3-dev/examples);
# it is built against the libfuse 3.17 that scripts/build-pyfuse3.sh bundles into a venv
# (default: .venv/opt/libfuse3, which `./install.sh --test` makes), so that it can ask for
# FUSE_CAP_HANDLE_KILLPRIV_V2 as zstfs does (writes then stop asking for security.capability):
# the one change made to the example, besides the 3.17 spelling of its feature flags.
set -euo pipefail
out=$(realpath -m "${1:?usage: scripts/build-passthrough-ll.sh OUT [LIBFUSE_PREFIX]}")
prefix=$(realpath -m "${2:-$(dirname "$0")/../.venv/opt/libfuse3}")
cd "$(dirname "$0")/.."
examples=/usr/share/doc/libfuse3-dev/examples
[ -f "$examples/passthrough_ll.c" ] || { echo "error: no $examples/passthrough_ll.c (install libfuse3-dev)" >&2; exit 1; }
[ -f "$prefix/include/fuse3/fuse_lowlevel.h" ] || { echo "error: no libfuse 3.17 under $prefix (run ./install.sh --test)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$examples/passthrough_ll.c" "$examples/passthrough_helpers.h" "$work/"
# 3.17 sets capabilities with fuse_set_feature_flag() (which checks that the kernel offers
# them); KILLPRIV_V2 is asked for first thing in lo_init().
sed -i -e 's/conn->want |= \(FUSE_CAP_[A-Z_]*\);/fuse_set_feature_flag(conn, \1);/' \
    -e '/^static void lo_init(/,/^{/s/^{/{\n\tfuse_set_feature_flag(conn, FUSE_CAP_HANDLE_KILLPRIV_V2);/' \
    "$work/passthrough_ll.c"
grep -q 'FUSE_CAP_HANDLE_KILLPRIV_V2' "$work/passthrough_ll.c" || { echo "error: could not patch passthrough_ll.c" >&2; exit 1; }
cc -O2 -Wall -o "$out" "$work/passthrough_ll.c" -I"$prefix/include/fuse3" \
    -L"$prefix/lib" -Wl,-rpath,"$prefix/lib" -lfuse3 -lpthread
echo "built $out against $(PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --modversion fuse3) ($prefix)" >&2
