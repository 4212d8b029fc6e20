"""Samplers compared over several seeds on the built-in dataset: one `overlap-sampler train` per
(sampler, seed), then the box AP of each run, mean and spread per sampler, and the paired
difference with the baseline (same seed: same initial weights and data order, only the sampler
changes). One seed is an anecdote; the spread across seeds says how much of a gap is noise.

    python benchmarks/sampler_ab.py                       # the six samplers x seeds 0 1 2
    python benchmarks/sampler_ab.py --seeds 0 1 2 3 4 --jobs 2
    python benchmarks/sampler_ab.py --variant hard="--neg-strategy hard" --variant linear="--neg-strategy linear"

Each run trains with one thread (`--threads 1`, deterministic on CPU), `--jobs` of them at a time;
a run whose `eval.json` exists is read, not repeated, so an interrupted comparison continues (a run
folder left by other settings is an error, never reused).
Writes `<out>/ab-<name>.md` and `.json`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from overlap_sampler.io_safety import OutputError, prepare_output_dir, write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
# Every sampler the head offers, the baseline (torchvision's random sampler) first.
PRESETS = {name: f"--sampler {name}" for name in ("random", "iou_balanced", "libra", "ohem", "isr", "overlap")}
METRICS = ("AP", "AP50", "AP75", "APs", "APm")


def parse_variant(text: str) -> tuple[str, str]:
    """``NAME=FLAGS`` (extra `train` flags), or a preset's name."""
    name, sep, flags = text.partition("=")
    if not sep:
        if name not in PRESETS:
            raise argparse.ArgumentTypeError(f"{name!r} is not a preset ({', '.join(PRESETS)}); "
                                             f"use NAME=\"--flag value ...\"")
        flags = PRESETS[name]
    if not name.isidentifier():
        raise argparse.ArgumentTypeError(f"variant name {name!r} must be a plain identifier")
    return name, flags


def train_once(name: str, flags: str, seed: int, common: list[str], run_dir: Path) -> dict:
    """One training run (skipped when its evaluation exists); returns its box (and mask) AP.

    The run's settings are recorded in its folder: a folder left by other settings is never reused
    or resumed, since its results would be reported under this command line."""
    eval_file, record = run_dir / "eval.json", run_dir / "ab_settings.json"
    settings = {"train_flags": [*shlex.split(flags), *common], "seed": seed}
    if run_dir.exists() and any(run_dir.iterdir()):
        recorded = json.loads(record.read_text()) if record.exists() else None
        if recorded != settings:
            raise RuntimeError(f"{run_dir} holds a run of other settings ({recorded or 'unrecorded'}, not "
                               f"{settings}): remove it or choose another --runs-dir")
    if not eval_file.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(str(record), settings)
        cmd = [sys.executable, "-m", "overlap_sampler.cli", "train", *settings["train_flags"],
               "--seed", str(seed), "--threads", "1", "--no-progress", "--resume", "auto",
               "--output-dir", str(run_dir)]
        start = time.perf_counter()
        with open(run_dir / "stdout.log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not eval_file.exists():
            raise RuntimeError(f"{name} seed {seed} failed (exit {proc.returncode}): see {run_dir / 'stdout.log'}\n"
                               f"command: {shlex.join(cmd)}")
        print(f"{name} seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    metrics = json.loads(eval_file.read_text())
    # Training time per iteration (evaluation excluded), from the run's last logged entry.
    last = json.loads((run_dir / "metrics.json").read_text())["history"][-1]
    return {"variant": name, "seed": seed, "seconds_per_iter": last["time"] / last["iteration"],
            **{k: {m: 100 * v[m] for m in METRICS} for k, v in metrics.items()}}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def report(runs: list[dict], variants: list[tuple[str, str]], seeds: list[int], common: list[str]) -> str:
    kinds = [k for k in ("bbox", "segm") if all(k in r for r in runs)]
    by = {(r["variant"], r["seed"]): r for r in runs}
    base = variants[0][0]
    lines = [f"# Samplers over {len(seeds)} seeds (seeds {', '.join(map(str, seeds))})", "",
             f"`{shlex.join(['overlap-sampler', 'train', *common])}` + the variant's flags, `--seed N --threads 1`. "
             f"AP in percent on the validation set; mean ± sample standard deviation over seeds. "
             f"Δ {base}: the paired difference with `{base}` at the same seed (mean ± std, and in how many "
             f"seeds the variant is higher). s/iter: training seconds per iteration (evaluation excluded), "
             f"mean over seeds, runs side by side on a shared machine: compare them within one table only.", ""]
    for kind in kinds:
        lines += [f"## {kind}", "", "| variant | flags | " + " | ".join(METRICS) + f" | Δ AP vs {base} | higher "
                  "| s/iter |", "|---|---|" + "---|" * len(METRICS) + "---|---|---|"]
        for name, flags in variants:
            cells = [spread([by[name, s][kind][m] for s in seeds]) for m in METRICS]
            diffs = [by[name, s][kind]["AP"] - by[base, s][kind]["AP"] for s in seeds]
            delta = "—" if name == base else f"{statistics.fmean(diffs):+.1f} ± {statistics.stdev(diffs):.1f}" \
                if len(diffs) > 1 else f"{diffs[0]:+.1f}"
            higher = "—" if name == base else f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
            seconds = statistics.fmean(by[name, s]["seconds_per_iter"] for s in seeds)
            lines.append(f"| `{name}` | `{flags}` | " + " | ".join(cells) + f" | {delta} | {higher} | {seconds:.3f} |")
        lines += ["", f"{kind} AP of each run:", "", "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|" + "---|" * len(seeds)]
        for name, _ in variants:
            lines.append(f"| `{name}` | " + " | ".join(f"{by[name, s][kind]['AP']:.1f}" for s in seeds) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", type=parse_variant, metavar="NAME[=FLAGS]",
                        help=f"a sampler ({', '.join(PRESETS)}) or NAME=\"train flags\"; repeatable; "
                             f"the first is the baseline of the paired differences [{' '.join(PRESETS)}]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each [2]")
    parser.add_argument("--train-args", default="", help="flags given to every run, e.g. \"--arch maskrcnn\"")
    parser.add_argument("--runs-dir", type=Path, default=Path("output/ab"), help="one folder per run [output/ab]")
    parser.add_argument("--name", default="synthetic", help="results file name: ab-NAME.md [synthetic]")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants = args.variant or [parse_variant(p) for p in PRESETS]
    if len({name for name, _ in variants}) != len(variants):
        parser.error("variant names must differ")
    if len(set(args.seeds)) != len(args.seeds) or args.jobs < 1:
        parser.error("seeds must differ and --jobs must be at least 1")
    common = shlex.split(args.train_args)
    try:  # before the hours of training
        prepare_output_dir(str(args.out), "results folder")
    except OutputError as e:
        parser.error(str(e))

    # The dataset is generated once, before runs start side by side (generation is locked anyway).
    if not any(a.startswith(("--dataset", "--data-root", "--config")) for a in common):
        from overlap_sampler.data.synthetic import synthetic_dataset
        for split in ("train", "val"):
            synthetic_dataset(split)

    tasks = [(name, flags, seed) for seed in args.seeds for name, flags in variants]
    pool = ThreadPoolExecutor(args.jobs)
    futures = [pool.submit(train_once, name, flags, seed, common, args.runs_dir / f"{name}-seed{seed}")
               for name, flags, seed in tasks]
    try:
        for future in tqdm(as_completed(futures), total=len(futures), desc="training runs", unit="run"):
            future.result()  # the first failure stops the comparison: runs not started are cancelled
    finally:
        pool.shutdown(cancel_futures=True)
    runs = [f.result() for f in futures]

    table = report(runs, variants, args.seeds, common)
    write_text(str(args.out / f"ab-{args.name}.md"), table)
    write_json(str(args.out / f"ab-{args.name}.json"),
               {"train_args": common, "variants": dict(variants), "seeds": args.seeds, "runs": runs}, indent=1)
    print(table)


if __name__ == "__main__":
    main()
