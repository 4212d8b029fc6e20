#!/usr/bin/env bash
# The sanitizer build: the library, _C and the GoogleTest suites under AddressSanitizer +
# UndefinedBehaviorSanitizer, CPU only, configured and built in build/asan (SANITIZE_BUILD_DIR),
# then its tests run (label `sanitize`: the GoogleTest suites and the ops' bad-input, layout and property
# pytest files against this build). Run by scripts/test.sh as the ctest `sanitize`; alone:
#     bash scripts/sanitize.sh [ctest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"  # its cmake (>= 3.26) and ninja
PYTHON=${PYTHON:-$VENV/bin/python}
[[ "$PYTHON" == /* ]] || PYTHON=$PWD/$PYTHON  # absolute, not resolved: the venv's python
CMAKE=${CMAKE:-cmake}
CTEST=${CTEST:-$(dirname "$(command -v "$CMAKE")")/ctest}
BUILD=${SANITIZE_BUILD_DIR:-build/asan}
generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
[ -e "$BUILD/CMakeCache.txt" ] && generator=()  # a configured folder keeps its generator

"$CMAKE" -S . -B "$BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DOVERLAP_SAMPLER_SANITIZE=ON -DOVERLAP_SAMPLER_BUILD_TESTS=ON \
  -DPython_EXECUTABLE="$PYTHON" -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)"
"$CMAKE" --build "$BUILD"
"$CTEST" --test-dir "$BUILD" -L sanitize --output-on-failure "$@"
