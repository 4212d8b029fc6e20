#!/usr/bin/env bash
# The GPU checks in one go, for a lent GPU machine whose python3 already has torch,
# torchvision, pybind11, cmake and pytest: build against that torch (sm_90 only),
# benchmark, then the CUDA tests and compute-sanitizer (memcheck, racecheck) side by
# side. Logs and benchmark results go to $OUT (default /tmp/gpu_check).
#     OUT=/tmp/out bash scripts/gpu_check.sh
# VARIANT_THREADS=1024 also builds the kernels with that many threads per block,
# checks them against the CPU and benchmarks them after the default build.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
ARCHS=${ARCHS:-90}
VARIANT_THREADS=${VARIANT_THREADS:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stamp() { echo "== $* ($(date +%T))"; }

# build DIR PACKAGE_DIR [extra CUDA flags]: the op library and _C, copied into PACKAGE_DIR.
build() {
  local generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S . -B "$1" "${generator[@]}" -DPython_EXECUTABLE="$(command -v "$PY")" \
    -DCMAKE_CUDA_COMPILER="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" \
    -DOVERLAP_SAMPLER_CUDA=ON -DOVERLAP_SAMPLER_CUDA_ARCHITECTURES="$ARCHS" \
    -DCMAKE_CUDA_FLAGS="-Xptxas -v ${3:-}" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
  cmake --build "$1" -j "$(nproc)" && cp "$1"/*.so "$2"/
}

(
  stamp machine
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -2
  stamp build
  if [ -n "$VARIANT_THREADS" ]; then
    rm -rf build/variant-python && mkdir -p build/variant-python && cp -r python/overlap_sampler build/variant-python/
    build build/gpu-variant build/variant-python/overlap_sampler "-DOVERLAP_SAMPLER_CUDA_THREADS=$VARIANT_THREADS" \
      > build/variant.log 2>&1 &
  fi
  build build/gpu python/overlap_sampler
  default_rc=$?
  wait
  cat build/variant.log 2>/dev/null
  exit $default_rc
) > "$OUT/build.log" 2>&1
build_rc=$?
head -8 "$OUT/build.log"
if [ $build_rc -ne 0 ]; then tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; fi
stamp built

# Alone on the GPU, so nothing else disturbs the timings.
PYTHONPATH=$PWD/python timeout 240 "$PY" benchmarks/bench_ops.py --device cuda --repeats 20 --out "$OUT" \
  > "$OUT/bench.log" 2>&1
echo "benchmark rc=$?"
if [ -n "$VARIANT_THREADS" ]; then
  PYTHONPATH=$PWD/build/variant-python timeout 120 "$PY" benchmarks/bench_ops.py --device cuda --repeats 20 \
    --out build/variant-bench >> "$OUT/bench.log" 2>&1
  echo "variant benchmark rc=$?"
  cp build/variant-bench/*.md "$OUT/variant-threads$VARIANT_THREADS.md"
fi
stamp benchmarked

# The rest in parallel: correctness does not care about sharing the GPU.
export PYTHONPATH=$PWD/python
timeout 330 "$PY" -m pytest tests -k "cuda or build_info" -q -p no:cacheprovider -rfEs --continue-on-collection-errors \
  --ignore tests/test_data.py --ignore tests/test_evaluate.py --ignore tests/test_train.py \
  --ignore tests/test_cli.py > "$OUT/pytest.log" 2>&1 &
pytest_pid=$!
sanitize() {
  timeout 300 compute-sanitizer --tool "$1" --error-exitcode 1 --print-limit 20 \
    "$PY" scripts/cuda_sanitizer_driver.py > "build/$1.log" 2>&1
  echo "compute-sanitizer $1 rc=$?" >> "build/$1.log"
}
PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitize memcheck &
sanitize racecheck &
if [ -n "$VARIANT_THREADS" ]; then
  PYTHONPATH=$PWD/build/variant-python "$PY" scripts/cuda_sanitizer_driver.py > build/variant-check.log 2>&1
  echo "variant ($VARIANT_THREADS threads) check against the CPU rc=$?" >> build/variant-check.log
fi
wait $pytest_pid; echo "pytest rc=$?"
wait
cat build/memcheck.log build/racecheck.log build/variant-check.log > "$OUT/sanitizer.log" 2>/dev/null
stamp done
grep -E "rc=|SUMMARY" "$OUT/sanitizer.log"
tail -n 4 "$OUT/pytest.log"
grep -E "spill|stack frame" "$OUT/build.log" | sort | uniq -c
for f in "$OUT"/*.md; do echo "--- $f"; grep -E "^\| (16|1|64) \| 2000 |^\| 4 \| (500|100000) |^\| \`" "$f"; done
