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

# zstfs's build of pyfuse3 (scripts/build-pyfuse3.sh), against libfuse 3.17 built into the
# venv: everyone gets FUSE_HANDLE_KILLPRIV_V2 (writes stop asking for security.capability; the
# system's 3.14 cannot ask for it), root also FUSE passthrough (CAP_SYS_ADMIN).
# ZSTFS_LIBFUSE=system builds against the system's libfuse instead. A build that fails, or does
# not load, never stays: the next choice is tried, down to stock pyfuse3 (same behaviour, slower
# on request-bound work); the tests need a patched build.
libfuse=${ZSTFS_LIBFUSE:-bundled}
case $libfuse in system|bundled) ;; *) echo "ZSTFS_LIBFUSE must be system or bundled" >&2; exit 2 ;; esac

need=(fuse3 libfuse3-dev pkg-config gcc python3-dev zstd patch)
[ "$libfuse" = bundled ] && need+=(curl meson ninja-build)
if [ "$mode" = test ]; then
    # sqlite3/attr/acl/psmisc/util-linux: real programs the tests drive; nodejs/npm: the Codex CLI;
    # python3-venv: the README's user install, which a test runs with the distribution's python3.
    need+=(sqlite3 attr acl psmisc util-linux python3-venv)
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

stock_pyfuse3() {
    local py=$1/bin/python
    (unset PKG_CONFIG_PATH LDFLAGS
     "$py" -m pip --disable-pip-version-check -q install --force-reinstall --no-deps \
         --no-cache-dir "pyfuse3==3.5.0"
     "$py" -m pip --disable-pip-version-check -q install "trio>=0.25")
    "$py" -c 'import pyfuse3' || { echo "error: stock pyfuse3 does not load either" >&2; exit 1; }
}

install_pyfuse3() {
    local venv=$1 choice
    for choice in $libfuse system; do
        bash scripts/build-pyfuse3.sh "$venv" "$choice" && return 0
        [ "$mode" = test ] && { echo "error: building zstfs's pyfuse3 ($choice) failed" >&2; exit 1; }
        echo "warning: building zstfs's pyfuse3 against the $choice libfuse failed" >&2
        [ "$choice" = system ] && break
    done
    echo "warning: using stock pyfuse3 (zstfs works the same, slower on request-bound work)" >&2
    stock_pyfuse3 "$venv"
}

# A venv (pip upgraded once, when it is made), zstfs's pyfuse3, then zstfs itself.
make_venv() {
    [ -x "$1/bin/python" ] && "$1/bin/python" -c 'import sys' 2>/dev/null && return 0
    python3 -m venv --clear "$1"
    "$1/bin/python" -m pip --disable-pip-version-check -q install --upgrade pip >/dev/null
}

if [ "$mode" = user ]; then
    venv="${XDG_DATA_HOME:-$HOME/.local/share}/zstfs/venv"
    make_venv "$venv"
    install_pyfuse3 "$venv"
    "$venv/bin/python" -m pip --disable-pip-version-check -q install .
    "$venv/bin/zstfs" --version >/dev/null
    mkdir -p "$HOME/.local/bin"
    ln -sf "$venv/bin/zstfs" "$HOME/.local/bin/zstfs"
    echo "zstfs installed: $HOME/.local/bin/zstfs" >&2
else
    make_venv .venv
    install_pyfuse3 .venv
    .venv/bin/python -m pip --disable-pip-version-check -q install -e '.[test]'
    bash scripts/install-codex.sh >/dev/null
    echo "test environment ready: .venv (codex: $(bash scripts/install-codex.sh | tail -n 1))" >&2
fi
