#!/usr/bin/env bash
# The GPU checks in one go, for a lent GPU machine whose python3 already has torch,
# torchvision, pybind11, cmake and pytest: build against that torch (sm_90 only),
# benchmark (the ops, then a training step), then the CUDA tests and compute-sanitizer
# (memcheck, racecheck, synccheck) side by side, then a kernel profile with Nsight Compute where
# it is installed, all within GPU_CHECK_SECONDS (default 570). Logs and benchmark
# results go to $OUT (default /tmp/gpu_check): 8 files at most, the device tool's
# limit on what comes back.
#     OUT=/tmp/out bash scripts/gpu_check.sh
# A variant is built, checked against the CPU and benchmarked after the default build:
#   VARIANT_THREADS=1024   the same sources with that many threads per block;
#   VARIANT_SRC=dir        another source tree, for a before/after comparison in one
#                          run: here `mkdir -p build/baseline && git archive COMMIT |
#                          tar -x -C build/baseline`, then the device run carries
#                          build/baseline and sets VARIANT_SRC=build/baseline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
ARCHS=${ARCHS:-90}
VARIANT_THREADS=${VARIANT_THREADS:-}
VARIANT_SRC=${VARIANT_SRC:-}
VARIANT_FLAGS=""
[ -n "$VARIANT_THREADS" ] && VARIANT_FLAGS="-DOVERLAP_SAMPLER_CUDA_THREADS=$VARIANT_THREADS"
VARIANT_NAME=${VARIANT_SRC:+$(basename "$VARIANT_SRC")}${VARIANT_THREADS:+-threads$VARIANT_THREADS}
VARIANT_NAME=${VARIANT_NAME#-}
# Steps share one deadline (the device tool ends a call at 600 s): each gets
# at most its own cap (overridable, for a shorter call) and what is left,
# correctness before the profile.
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-570}))
BENCH_CAP=${BENCH_CAP:-200} TRAIN_CAP=${TRAIN_CAP:-150} CHECK_CAP=${CHECK_CAP:-300} NCU_CAP=${NCU_CAP:-180}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stamp() { echo "== $* ($(date +%T), $((DEADLINE - SECONDS)) s left)"; }
budget() { local left=$((DEADLINE - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }

# build SOURCE DIR PACKAGE_DIR [extra CUDA flags]: the op library and _C of SOURCE,
# copied into PACKAGE_DIR.
build() {
  local generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S "$1" -B "$2" "${generator[@]}" -DPython_EXECUTABLE="$(command -v "$PY")" \
    -DCMAKE_CUDA_COMPILER="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" \
    -DOVERLAP_SAMPLER_CUDA=ON -DOVERLAP_SAMPLER_CUDA_ARCHITECTURES="$ARCHS" \
    -DCMAKE_CUDA_FLAGS="-Xptxas -v ${4:-}" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
  cmake --build "$2" -j "$(nproc)" && cp "$2"/*.so "$3"/
}

(
  stamp machine
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -2
  stamp build
  rm -rf build/variant-python build/variant-bench build/variant.ok
  if [ -n "$VARIANT_NAME" ]; then
    # Its own build folder per variant (CMake ties one to one source tree), and
    # no library left in the copied package, so a failed build is never run.
    mkdir -p build/variant-python && cp -r "${VARIANT_SRC:-.}"/python/overlap_sampler build/variant-python/ &&
      rm -f build/variant-python/overlap_sampler/*.so &&
      (build "${VARIANT_SRC:-.}" "build/gpu-variant-$VARIANT_NAME" build/variant-python/overlap_sampler \
        "$VARIANT_FLAGS" && touch build/variant.ok) > build/variant.log 2>&1 &
  fi
  build . build/gpu python/overlap_sampler
  default_rc=$?
  wait
  cat build/variant.log 2>/dev/null
  exit $default_rc
) > "$OUT/build.log" 2>&1
build_rc=$?
if [ -n "$VARIANT_NAME" ] && [ ! -e build/variant.ok ]; then
  echo "VARIANT ($VARIANT_NAME) BUILD FAILED: its steps are skipped (see build.log)"
  VARIANT_NAME=""
fi
head -8 "$OUT/build.log"
if [ $build_rc -ne 0 ]; then tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; fi
stamp built

# Alone on the GPU, so nothing else disturbs the timings.
PYTHONPATH=$PWD/python timeout "$(budget "$BENCH_CAP")" "$PY" benchmarks/bench_ops.py --device cuda --repeats 20 \
  --no-plot --out "$OUT" > "$OUT/bench.log" 2>&1
echo "benchmark rc=$?"
if [ -n "$VARIANT_NAME" ]; then
  # The main case only: the before/after of the issue's target, in seconds. The variant's own
  # benchmark script, which imports only what its package has.
  PYTHONPATH=$PWD/build/variant-python timeout "$(budget 90)" "$PY" "${VARIANT_SRC:-.}"/benchmarks/bench_ops.py --device cuda \
    --repeats 20 --main-only --out build/variant-bench >> "$OUT/bench.log" 2>&1
  echo "variant ($VARIANT_NAME) benchmark rc=$?"
  cp build/variant-bench/*.md "$OUT/variant-$VARIANT_NAME.md"
fi
# A training step of the paper's detector (ResNet-50-FPN, 2 images of 800x1333, AMP), Overlap Sampler
# against torchvision's random sampler: the sampling share of the step (goal: at most 1 %). Its table
# goes into bench.log (the files that come back are few).
PYTHONPATH=$PWD/python timeout "$(budget "$TRAIN_CAP")" "$PY" benchmarks/bench_train_step.py --device cuda --amp \
  --backbone resnet50_fpn --size 800 1333 --batch 2 --rois 512 --classes 81 --steps 10 \
  --no-progress --out build/train-step >> "$OUT/bench.log" 2>&1
echo "training step benchmark rc=$?"
stamp benchmarked

# The rest in parallel: correctness does not care about sharing the GPU.
export PYTHONPATH=$PWD/python
timeout "$(budget "$CHECK_CAP")" "$PY" -m pytest tests -k "cuda or build_info" -q -p no:cacheprovider -rfEs --continue-on-collection-errors \
  --ignore tests/test_data.py --ignore tests/test_evaluate.py --ignore tests/test_train.py \
  --ignore tests/test_cli.py --ignore tests/test_predict.py > "$OUT/pytest.log" 2>&1 &
pytest_pid=$!
sanitize() {
  timeout "$(budget $((CHECK_CAP - 20)))" compute-sanitizer --tool "$1" --error-exitcode 1 --print-limit 20 \
    "$PY" scripts/cuda_sanitizer_driver.py > "build/$1.log" 2>&1
  echo "compute-sanitizer $1 rc=$?" >> "build/$1.log"
}
PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitize memcheck &
sanitize racecheck &
sanitize synccheck &
if [ -n "$VARIANT_NAME" ]; then
  PYTHONPATH=$PWD/build/variant-python timeout "$(budget 200)" "$PY" scripts/cuda_sanitizer_driver.py \
    > build/variant-check.log 2>&1
  echo "variant ($VARIANT_NAME) check against the CPU rc=$?" >> build/variant-check.log
fi
wait $pytest_pid; echo "pytest rc=$?"
wait
cat build/memcheck.log build/racecheck.log build/synccheck.log build/variant-check.log > "$OUT/sanitizer.log" 2>/dev/null
stamp checked

# Why the kernels take what they take (stall reasons, occupancy), when Nsight
# Compute is there: one sample call of the main case (the training default).
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  # --profile-from-start off: only the call profile_sample.py brackets with cudaProfilerStart/Stop,
  # whatever the number of kernels a call launches.
  PYTHONPATH=$PWD/python timeout "$(budget "$NCU_CAP")" "$NCU" --profile-from-start off \
    -k regex:'(match|overlap_key|select)_kernel' --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats "$PY" scripts/profile_sample.py > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$?"
  stamp profiled
else
  echo "ncu not found: no kernel profile"
fi

grep -E "rc=|SUMMARY" "$OUT/sanitizer.log"
tail -n 4 "$OUT/pytest.log"
grep -E "spill|stack frame" "$OUT/build.log" | sort | uniq -c
grep -A 9 "^# Training step" "$OUT/bench.log"
# A variant older than issue 19 has soft / uniform as its main case: compare it with this build's
# "soft / uniform" strategies row, the same settings.
for f in "$OUT"/*.md; do echo "--- $f"; grep -E "^\| (16|1|64) \| 2000 |^\| 4 \| (500|100000) |^\| \`|^\| soft / " "$f"; done
