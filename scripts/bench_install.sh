#!/usr/bin/env bash
# What each pyfuse3 build costs to install, for whoever runs this (an ordinary user, normally):
#
#   system   ./install.sh                          zstfs's pyfuse3 against the system libfuse
#   bundled  ZSTFS_LIBFUSE=bundled ./install.sh    zstfs's pyfuse3 against libfuse 3.17.2
#   stock    python3 -m venv V && V/bin/pip install pyfuse3==3.5.0 trio && V/bin/pip install .
#
# each "fresh" (an empty HOME: no pip cache, no venv) and "rerun" (again on the installed venv),
# round-robin, REPS times (default 3); prints every time and the medians. Every install runs with
# HOME set to a scratch directory, so nothing of the caller's (~/.cache/pip, ~/.local) is used or
# touched. System packages must be present already (install.sh would need sudo for them).
#
#   PATH=/usr/bin:/bin scripts/bench_install.sh [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
reps=${1:-3}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/zstfs-bench-install.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
times=$scratch/times
log=$scratch/log
TIMEFORMAT=%R

# Only HOME says where things go.
unset XDG_DATA_HOME XDG_CACHE_HOME XDG_CONFIG_HOME PIP_CACHE_DIR
pips='"$HOME/v/bin/pip" -q install pyfuse3==3.5.0 trio && "$HOME/v/bin/pip" -q install "$0"'
# timed LABEL HOME CMD...: one install in HOME, its wall time appended to $times.
timed() {
    local label=$1 home=$2 t
    shift 2
    t=$( { time HOME=$home "$@" >>"$log" 2>&1; } 2>&1 ) || {
        echo "$label failed:" >&2; tail -n 20 "$log" >&2; exit 1; }
    printf '%s\t%s\n' "$label" "$t" | tee -a "$times"
}

# What a venv's pyfuse3 is (install.sh falls back to stock pyfuse3 when a build fails).
built() {
    "$1" -c 'import pyfuse3; print("  pyfuse3 in", __import__("sys").prefix, "patches:",
                                  ", ".join(getattr(pyfuse3, "ZSTFS_PATCHES", ())) or "none")'
}

echo "python3: $(command -v python3) ($(python3 --version 2>&1)); $(nproc) CPUs;" \
     "kernel $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC')"
for _ in $(seq "$reps"); do
    for build in system bundled stock; do
        home=$scratch/$build
        rm -rf "$home"
        mkdir -p "$home"
        case $build in
            system|bundled)
                timed "$build fresh" "$home" env ZSTFS_LIBFUSE=$build ./install.sh
                timed "$build rerun" "$home" env ZSTFS_LIBFUSE=$build ./install.sh
                built "$home/.local/share/zstfs/venv/bin/python" ;;
            stock)
                timed "stock fresh" "$home" bash -c "python3 -m venv \"\$HOME/v\" && $pips" "$repo"
                timed "stock rerun" "$home" bash -c "$pips" "$repo"
                built "$home/v/bin/python" ;;
        esac
    done
done
echo "medians of $reps (s):"
python3 - "$times" <<'PY'
import statistics, sys
by = {}
for line in open(sys.argv[1]):
    label, t = line.rstrip("\n").split("\t")
    by.setdefault(label, []).append(float(t))
for label, ts in by.items():
    print(f"  {label}: {statistics.median(ts):.1f} (min {min(ts):.1f}, max {max(ts):.1f})")
PY
