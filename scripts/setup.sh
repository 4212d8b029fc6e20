#!/usr/bin/env bash
# Sets up everything on a fresh machine: GoogleTest (Debian), a venv with
# torch 2.14.1 + torchvision 0.29.1 and the build tools, then builds and
# installs overlap_sampler (CPU + CUDA kernels when nvcc is found) in
# editable mode, with the C++ tests, into build/main.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if ! [ -f /usr/include/gtest/gtest.h ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libgtest-dev >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 \
  numpy scipy tqdm matplotlib pycocotools pillow tensorboard pytest hypothesis \
  "scikit-build-core>=0.10" pybind11==3.1.0 "cmake>=3.26" ninja

# --no-build-isolation: build against the torch just installed (an isolated
# build would download and install torch again).
"$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . \
  -Cbuild-dir=build/main \
  -Ccmake.define.OVERLAP_SAMPLER_BUILD_TESTS=ON \
  ${OVERLAP_SAMPLER_CMAKE_ARGS:+-Ccmake.args="$OVERLAP_SAMPLER_CMAKE_ARGS"}
"$VENV/bin/python" -c "import overlap_sampler as o; print('overlap_sampler', o.__version__, o.build_info)"
