#!/usr/bin/env bash
# Plain-file throughput through a zstfs mount vs the same files straight on disk.
#
#   scripts/bench_passthrough.sh [RUNS]
#
# Makes its data in a temp dir on the disk of $TMPDIR (default /tmp): one 200 MB file and a tree of
# 2,000 files (~200 MB). Measures `cat BIG > /dev/null` cold (page cache dropped before each run,
# needs root; skipped otherwise) and warm, and `grep -rc` over the tree, first on the plain
# directory, then through `zstfs mount` of a copy (mounted over itself, no compression).
# Uses hyperfine when installed, else a loop of /usr/bin/time.
set -euo pipefail

RUNS=${1:-5}
PY=${PYTHON:-python3}
command -v zstfs >/dev/null && ZSTFS=(zstfs) || ZSTFS=("$PY" -m zstfs)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/zstfs-bench.XXXXXX")
MNT="$WORK/mounted"
cleanup() {
    "${ZSTFS[@]}" umount "$MNT" >/dev/null 2>&1 || fusermount3 -u -z "$MNT" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "# data in $WORK"
mkdir -p "$WORK/plain/tree"
head -c 150M /dev/urandom | base64 -w 100 > "$WORK/plain/big.txt"  # ~200 MB of text
"$PY" - "$WORK/plain/tree" <<'EOF'
import os, random, sys
root = sys.argv[1]
rng = random.Random(1)
words = [b"alpha", b"beta", b"needle", b"gamma", b"delta", b"epsilon"]
for d in range(20):
    os.mkdir(f"{root}/d{d:02d}")
    for f in range(100):
        lines = [b" ".join(rng.choices(words, k=12)) for _ in range(1700)]
        with open(f"{root}/d{d:02d}/f{f:03d}.jsonl", "wb") as fh:
            fh.write(b"\n".join(lines) + b"\n")
EOF
cp -a "$WORK/plain" "$MNT"
"${ZSTFS[@]}" mount "$MNT" --log "$WORK/zstfs.log"
du -sh "$WORK/plain" "$MNT"

can_drop=0
if [ "$(id -u)" = 0 ] && (sync && echo 1 > /proc/sys/vm/drop_caches) 2>/dev/null; then can_drop=1; fi
drop='sync; echo 1 > /proc/sys/vm/drop_caches'

bench() {  # NAME PREPARE COMMAND
    local name=$1 prepare=$2 cmd=$3
    if command -v hyperfine >/dev/null; then
        hyperfine -N --style basic --runs "$RUNS" --warmup 1 -n "$name" \
            ${prepare:+--prepare "sh -c '$prepare'"} "$cmd" 2>&1 | grep -E 'Benchmark|Time|Range'
    else
        for _ in $(seq "$RUNS"); do
            [ -n "$prepare" ] && sh -c "$prepare"
            /usr/bin/time -f "$name %e s" sh -c "$cmd > /dev/null"
        done
    fi
}

for where in plain mounted; do
    dir="$WORK/$where"
    echo "## $where ($dir)"
    if [ "$can_drop" = 1 ]; then
        bench "cat 200MB cold ($where)" "$drop" "cat $dir/big.txt"
    fi
    bench "cat 200MB warm ($where)" "" "cat $dir/big.txt"
    if [ "$can_drop" = 1 ]; then
        bench "grep -rc 2000 files cold ($where)" "$drop" "grep -rc needle $dir/tree"
    fi
    bench "grep -rc 2000 files warm ($where)" "" "grep -rc needle $dir/tree"
done
