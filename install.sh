#!/usr/bin/env bash
# Install zstfs from this checkout on Debian/Ubuntu.
#
#   ./install.sh          system packages + zstfs in ~/.local/share/zstfs/venv, linked as ~/.local/bin/zstfs
#   ./install.sh --test   system packages + test tools + zstfs (editable, with test extras) in ./.venv,
#                         plus the Codex CLI (npm) that the end-to-end tests drive
#
# System packages are installed only when missing (with sudo when not root). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"

mode=user
[ "${1:-}" = "--test" ] && mode=test

need=(fuse3 libfuse3-dev pkg-config gcc python3-dev zstd patch curl meson ninja-build)
if [ "$mode" = test ]; then
    # sqlite3/attr/psmisc/util-linux: real programs the tests drive; nodejs/npm: the Codex CLI.
    need+=(sqlite3 attr psmisc util-linux)
    command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
fi
python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)

missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "installing system packages: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# zstfs's build of pyfuse3 (scripts/build-pyfuse3.sh): the tests need it; a user install falls
# back to stock pyfuse3 (same behaviour, slower on request-bound work) if it cannot be built.
patched_pyfuse3() {
    bash scripts/build-pyfuse3.sh "$1" && return 0
    [ "$mode" = test ] && { echo "error: building zstfs's pyfuse3 failed" >&2; exit 1; }
    echo "warning: building zstfs's pyfuse3 failed; using stock pyfuse3" >&2
}

if [ "$mode" = user ]; then
    venv="${XDG_DATA_HOME:-$HOME/.local/share}/zstfs/venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip >/dev/null
    patched_pyfuse3 "$venv"
    "$venv/bin/pip" install -q .
    mkdir -p "$HOME/.local/bin"
    ln -sf "$venv/bin/zstfs" "$HOME/.local/bin/zstfs"
    echo "zstfs installed: $HOME/.local/bin/zstfs" >&2
else
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip >/dev/null
    patched_pyfuse3 .venv
    .venv/bin/pip install -q -e '.[test]'
    bash scripts/install-codex.sh >/dev/null
    echo "test environment ready: .venv (codex: $(bash scripts/install-codex.sh | tail -n 1))" >&2
fi
