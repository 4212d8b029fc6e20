"""What the sampler diagnostics cost a training run (issue 18).

Trains the default run (`overlap-sampler train`: small Faster R-CNN, built-in data, 1 thread) for
``--iterations`` iterations with ``diagnostics_every=1`` and with diagnostics off, runs alternating
(``--pairs`` of each), TensorBoard on in both. Reports

* the time of one diagnostics step itself (``sampler_diagnostics`` + its TensorBoard histograms and
  scalars + the CSV row), timed around the call inside the runs -- the figure that does not depend on
  this machine's noise;
* seconds per iteration of both kinds of run (the windows after the first, whose first steps warm up).

Writes ``benchmarks/results/diagnostics-<device>.md`` (``--output``) through io_safety.

    python benchmarks/bench_diagnostics.py [--iterations 60] [--pairs 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import tempfile
import time

import torch

from overlap_sampler.engine import TrainConfig, train
from overlap_sampler.io_safety import prepare_output_file, write_text

# The module, not the function that overlap_sampler.engine exports under the same name.
train_module = importlib.import_module("overlap_sampler.engine.train")
ORIGINAL = train_module._diagnose


def timed_diagnose():
    """``train._diagnose`` wrapped to record the seconds of each call."""
    seconds = []

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        ORIGINAL(*args, **kwargs)
        seconds.append(time.perf_counter() - start)

    return wrapper, seconds


def run(folder: str, every: int, args) -> tuple[list[float], list[float]]:
    """(seconds per iteration of each log window after the first, seconds of each diagnostics call)."""
    config = TrainConfig(output_dir=folder, stop_after=args.iterations, log_every=args.log_every,
                         checkpoint_every=10**6, eval_at_end=False, progress=False, device=args.device,
                         diagnostics_every=every)
    wrapper, seconds = timed_diagnose()
    train_module._diagnose = wrapper
    try:
        metrics = train(config)
    finally:
        train_module._diagnose = ORIGINAL
    return [h["time_per_iter"] for h in metrics["history"][1:]], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="the results file [benchmarks/results/diagnostics-<device>.md]")
    args = parser.parse_args()
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                         f"diagnostics-{args.device.replace(':', '')}.md")
    prepare_output_file(output, "results file")

    per_iter: dict[int, list[float]] = {1: [], 0: []}
    calls: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for every in (1, 0):
                windows, seconds = run(os.path.join(tmp, f"{pair}-{every}"), every, args)
                per_iter[every] += windows
                calls += seconds
                print(f"pair {pair} diagnostics_every={every}: {statistics.mean(windows):.4f} s/iter"
                      + (f", diagnostics step {1000 * statistics.median(seconds):.2f} ms (median)" if seconds
                         else ""), flush=True)

    on, off = statistics.mean(per_iter[1]), statistics.mean(per_iter[0])
    median_call = statistics.median(calls)
    lines = [
        f"# Sampler diagnostics: cost per iteration ({args.device}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__})",
        "",
        f"Default run (`overlap-sampler train`: small Faster R-CNN, 4 images of 128 px, 128 RoIs each, "
        f"1 thread), {args.iterations} iterations a run, {args.pairs} runs of each kind alternating, "
        "TensorBoard on in both; `python benchmarks/bench_diagnostics.py`.",
        "",
        "| | value |",
        "|---|---|",
        f"| one diagnostics step (compute + TensorBoard + CSV), median of {len(calls)} | "
        f"{1000 * median_call:.2f} ms |",
        f"| mean of those steps | {1000 * statistics.mean(calls):.2f} ms |",
        f"| s/iter, `--diagnostics-every 1` | {on:.4f} |",
        f"| s/iter, `--diagnostics-every 0` | {off:.4f} |",
        f"| ratio every-1 / off | {on / off:.3f} |",
        f"| one diagnostics step / s/iter off | {median_call / off:.2%} |",
        f"| so at the default `--diagnostics-every 50`, per iteration | {median_call / off / 50:.3%} |",
        "",
        "s/iter: mean over the log windows after the first (of "
        f"{args.log_every} iterations); this machine is shared, so the s/iter ratio is noisier than the "
        "timed step.",
        "",
    ]
    write_text(output, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
