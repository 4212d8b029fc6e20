#!/usr/bin/env bash
# The GPU checks in one go, for a lent GPU machine whose python3 already has torch,
# torchvision, pybind11, cmake and pytest: build against that torch (sm_90 only),
# benchmark, then the CUDA tests and compute-sanitizer (memcheck, racecheck) side by
# side. Logs and benchmark results go to $OUT (default /tmp/gpu_check).
#     OUT=/tmp/out bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
ARCHS=${ARCHS:-90}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python
stamp() { echo "== $* ($(date +%T))"; }

{
  stamp machine
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -2
  stamp build
  generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S . -B build/gpu "${generator[@]}" -DPython_EXECUTABLE="$(command -v "$PY")" \
    -DCMAKE_CUDA_COMPILER="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" \
    -DOVERLAP_SAMPLER_CUDA=ON -DOVERLAP_SAMPLER_CUDA_ARCHITECTURES="$ARCHS" \
    -DCMAKE_CUDA_FLAGS="-Xptxas -v" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
  cmake --build build/gpu -j "$(nproc)"
} > "$OUT/build.log" 2>&1
build_rc=$?
grep -E "ptxas info *: (Compiling|Used)|spill|stack frame" "$OUT/build.log" | grep -v "0 bytes spill stores, 0 bytes spill loads" |
  grep -vE "^ptxas info *: Function properties" > "$OUT/ptxas.log"
head -8 "$OUT/build.log"
if [ $build_rc -ne 0 ]; then tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; fi
cp build/gpu/*.so python/overlap_sampler/
stamp built

# Alone on the GPU, so nothing else disturbs the timings.
timeout 240 "$PY" benchmarks/bench_ops.py --device cuda --repeats 20 --out "$OUT" > "$OUT/bench.log" 2>&1
echo "benchmark rc=$?"; stamp benchmarked

# The rest in parallel: correctness does not care about sharing the GPU.
timeout 330 "$PY" -m pytest tests -k "cuda or build_info" -q -p no:cacheprovider -rfEs --continue-on-collection-errors \
  --ignore tests/test_data.py --ignore tests/test_evaluate.py --ignore tests/test_train.py \
  --ignore tests/test_cli.py > "$OUT/pytest.log" 2>&1 &
pytest_pid=$!
sanitize() {
  timeout 300 compute-sanitizer --tool "$1" --error-exitcode 1 --print-limit 20 \
    "$PY" scripts/cuda_sanitizer_driver.py > "$OUT/$1.log" 2>&1
  echo "compute-sanitizer $1 rc=$?" >> "$OUT/$1.log"
}
PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitize memcheck &
sanitize racecheck &
wait $pytest_pid; echo "pytest rc=$?"
wait
stamp done
tail -3 "$OUT/memcheck.log" "$OUT/racecheck.log"
tail -25 "$OUT/pytest.log"
cat "$OUT/ptxas.log" | tail -20
grep -A12 "^### main" "$OUT/bench.log"; grep -B2 -A10 "^### scaling" "$OUT/bench.log"
