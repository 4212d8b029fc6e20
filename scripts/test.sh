#!/usr/bin/env bash
# Runs every test: the GoogleTest suites and pytest (registered as a ctest).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
# A rebuild after source changes (editable installs rebuild on import too).
cmake --build build/main
ctest --test-dir build/main --output-on-failure -V "$@" | grep -vE "^[0-9]+: (Test command|Working Directory|Environment variables|Test timeout)"
exit "${PIPESTATUS[0]}"
