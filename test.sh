#!/usr/bin/env bash
# Install everything the tests need (./install.sh --test) and run the whole suite.
# Extra arguments go to pytest, e.g. ./test.sh -k view -x
set -euo pipefail
cd "$(dirname "$0")"
./install.sh --test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
