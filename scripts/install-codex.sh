#!/usr/bin/env bash
# Install the Codex CLI (npm package @openai/codex) into a private prefix so the
# end-to-end tests in tests/codex/test_codex_cli.py can run the real binary offline.
#
# Idempotent: if the pinned version is already installed and its native binary
# runs, nothing is downloaded. Prints the absolute path of the native binary on
# stdout (last line); progress goes to stderr.
#
#   ZSTFS_CODEX_DIR      install prefix (default: <repo>/.cache/codex-npm)
#   ZSTFS_CODEX_VERSION  npm version to install (default: 0.169.0)
#
# Works as root (CI): npm keeps its cache inside the prefix, so nothing is
# written to a possibly read-only $HOME. The package has no install scripts.
set -euo pipefail

script_dir="${BASH_SOURCE[0]%/*}"
[ "$script_dir" = "${BASH_SOURCE[0]}" ] && script_dir=.
repo_root="$(cd "$script_dir/.." && pwd)"
version="${ZSTFS_CODEX_VERSION:-0.169.0}"
prefix="${ZSTFS_CODEX_DIR:-$repo_root/.cache/codex-npm}"
case "$prefix" in /*) ;; *) prefix="$PWD/$prefix" ;; esac

log() { printf 'install-codex: %s\n' "$*" >&2; }

if ! command -v npm >/dev/null 2>&1; then
    log "npm not found in PATH; install Node.js and npm first (Debian: apt-get install -y nodejs npm)"
    exit 1
fi
if ! command -v node >/dev/null 2>&1; then
    log "node not found in PATH; install Node.js first (Debian: apt-get install -y nodejs)"
    exit 1
fi

find_binary() {
    # The platform package is either hoisted (node_modules/@openai/codex-linux-*)
    # or nested under node_modules/@openai/codex/node_modules/. Prefer the musl
    # build, which is statically linked.
    local candidate
    for candidate in \
        "$prefix"/node_modules/@openai/codex-linux-*/vendor/*/bin/codex \
        "$prefix"/node_modules/@openai/codex/node_modules/@openai/codex-linux-*/vendor/*/bin/codex \
        "$prefix"/node_modules/@openai/codex/vendor/*/bin/codex \
        "$prefix"/node_modules/@openai/codex/vendor/*/codex/codex; do
        if [ -f "$candidate" ] && [ -x "$candidate" ]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

installed_version() {
    node -e 'try { process.stdout.write(require(process.argv[1]).version) } catch (e) {}' \
        "$prefix/node_modules/@openai/codex/package.json" 2>/dev/null || true
}

if [ "$(installed_version)" = "$version" ] && bin="$(find_binary)" && "$bin" --version >/dev/null 2>&1; then
    log "@openai/codex@$version already installed in $prefix"
    printf '%s\n' "$bin"
    exit 0
fi

mkdir -p "$prefix"
log "installing @openai/codex@$version into $prefix"
# npm_config_cache: keep the download cache under the prefix (idempotent, no $HOME writes).
npm_config_cache="$prefix/.npm-cache" \
npm_config_update_notifier=false \
    npm install --prefix "$prefix" --no-audit --no-fund --save-exact \
        "@openai/codex@$version" >&2

if ! bin="$(find_binary)"; then
    log "installed @openai/codex@$version but found no native codex binary under $prefix/node_modules"
    exit 1
fi
chmod +x "$bin" 2>/dev/null || true
if ! "$bin" --version >&2; then
    log "native binary $bin does not run on this machine"
    exit 1
fi
printf '%s\n' "$bin"
