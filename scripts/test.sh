#!/usr/bin/env bash
# Runs every test: the GoogleTest suites and pytest (registered as a ctest).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
# A rebuild after source changes, installed where the editable install keeps
# the libraries (site-packages; it does not rebuild on import), so that pytest
# tests what was just built.
cmake --build build/main
cmake --install build/main --prefix "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null
ctest --test-dir build/main --output-on-failure -V "$@" | grep -vE "^[0-9]+: (Test command|Working Directory|Environment variables|Test timeout)"
exit "${PIPESTATUS[0]}"
