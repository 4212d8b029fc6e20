"""Whole-batch `sample` against the per-image plain-PyTorch way and torchvision's
random sampling path, side by side in one run, reported as ratios.

    python benchmarks/bench_ops.py                 # CPU, writes benchmarks/results/<device>.md/.json
    python benchmarks/bench_ops.py --device cuda   # GPU: CUDA-event timings and kernel launches

The default batch follows kernels.md: B=16 images x 2000 proposals x 20 GT,
512 examples per image, soft negatives (K=2), a third of the proposals
jittered around GT boxes. Then scaling in N (proposals per image) and B.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops
from tqdm import tqdm

import overlap_sampler
from overlap_sampler import reference
from overlap_sampler.io_safety import OutputError, prepare_output_dir, write_json, write_text
from overlap_sampler.testing import make_batch

RESULTS = Path(__file__).resolve().parent / "results"


def torchvision_random_path(proposals, ps, gt, gs, matcher, sampler):
    """What torchvision's RoIHeads.select_training_samples does: per image, append
    the GT boxes, match by IoU, then BalancedPositiveNegativeSampler."""
    labels, proposal_list = [], []
    for b in range(ps.numel() - 1):
        boxes = proposals[ps[b]:ps[b + 1]]
        targets = gt[gs[b]:gs[b + 1]]
        boxes = torch.cat([boxes, targets])
        proposal_list.append(boxes)
        if targets.numel() == 0:
            labels.append(torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device))
            continue
        matched = matcher(box_ops.box_iou(targets, boxes))
        image_labels = torch.ones_like(matched)
        image_labels[matched == matcher.BELOW_LOW_THRESHOLD] = 0
        image_labels[matched == matcher.BETWEEN_THRESHOLDS] = -1
        labels.append(image_labels)
    sampled_pos, sampled_neg = sampler(labels)
    return [torch.where(p | n)[0] for p, n in zip(sampled_pos, sampled_neg)]


def time_call(fn, device, repeats, warmup=2):
    """Median seconds per call; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def profile_kernels(fn):
    """(CUDA kernels launched by one call, their summed GPU time in seconds), from the torch profiler."""
    fn()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), sum(e.time_range.elapsed_us() for e in kernels) / 1e6, [
        (short_kernel_name(e.name), e.time_range.elapsed_us()) for e in kernels]


def short_kernel_name(name, width=70):
    """`void ns::(anonymous namespace)::select_kernel<float>(...)` -> `select_kernel<float>`."""
    head = name.replace("(anonymous namespace)::", "").removeprefix("void ").split("(")[0]
    base, template = head.split("<")[0], head[len(head.split("<")[0]):]
    short = base.split("::")[-1] + template
    return short if len(short) <= width else short[:width - 3] + "..."


def time_graph_replay(fn, repeats=50):
    """Median seconds per replay of ``fn`` captured in a CUDA graph: the GPU time
    of one batch without Python and launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_call(graph.replay, torch.device("cuda"), repeats)


# Strategy settings of the "strategies" section: (negatives, positives, extra options).
# soft/soft with ε = 2 is what `overlap-sampler train` and SamplerConfig() run.
STRATEGIES = {
    "soft / soft, ε=2 (training default)": dict(neg_strategy="soft", pos_strategy="soft", pos_weight=2.0),
    "soft / uniform": dict(neg_strategy="soft", pos_strategy="uniform"),
    "uniform / uniform": dict(neg_strategy="uniform", pos_strategy="uniform"),
    "hard / uniform": dict(neg_strategy="hard", pos_strategy="uniform"),
    "linear / uniform": dict(neg_strategy="linear", pos_strategy="uniform"),
}


def measure(images, proposals_per_image, gt_per_image, device, repeats, with_reference=True,
            strategies=None):
    batch = make_batch([proposals_per_image] * images, [gt_per_image] * images, seed=0,
                       device=device, crowded_fraction=1 / 3, canvas=1000.0)
    options = dict(batch_size_per_image=512, positive_fraction=0.25, neg_strategy="soft", num_bins=2)
    if strategies is not None:
        options.update(STRATEGIES[strategies])
    generator = torch.Generator(device).manual_seed(0)
    matcher = det_utils.Matcher(0.5, 0.5, allow_low_quality_matches=False)
    sampler = det_utils.BalancedPositiveNegativeSampler(512, 0.25)
    calls = {
        "overlap_sampler.sample": lambda: overlap_sampler.sample(*batch, generator=generator,
                                                                 validate=False, **options),
        "torchvision random path": lambda: torchvision_random_path(*batch, matcher, sampler),
    }
    if with_reference:
        calls["per-image PyTorch (reference)"] = lambda: reference.sample(*batch, generator=generator,
                                                                           **options)
    row = {"B": images, "N": proposals_per_image, "G": gt_per_image}
    if strategies is not None:
        row["strategies"] = strategies
    for name, fn in calls.items():
        row[name] = time_call(fn, device, repeats)
    if device.type == "cuda":
        row["launches"], row["kernel time"], row["kernels"] = profile_kernels(calls["overlap_sampler.sample"])
        # The same call with select_kernel reading every image from global memory, side by side.
        os.environ["OVERLAP_SAMPLER_SELECT_STAGING"] = "0"
        try:
            row["kernels, staging off"] = profile_kernels(calls["overlap_sampler.sample"])[2]
        finally:
            del os.environ["OVERLAP_SAMPLER_SELECT_STAGING"]
        # The op's random draw comes from the generator; give it as uniforms to capture the rest.
        uniforms = torch.rand(batch[0].shape[0] + batch[2].shape[0], dtype=torch.float64, device=device)
        row["graph replay"] = time_graph_replay(lambda: overlap_sampler.sample_from_uniforms(
            *batch, uniforms, validate=False, **options))
    return row


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu-{torch.get_num_threads()}threads-{cpu.replace(' ', '-').replace('(R)', '')}"


def format_ms(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e3:.3f}"
    return f"{seconds * 1e3:.2f}" if seconds < 1 else f"{seconds:.2f} s"


def to_markdown(title, rows):
    ours = "overlap_sampler.sample"
    gpu = "launches" in rows[0]
    gpu_header = " launches | kernel time (µs) | graph replay (µs) |" if gpu else ""
    named = "strategies" in rows[0]
    lines = [f"### {title}", "",
             ("| negatives / positives " if named else "") +
             "| B | N | G | sample (ms) | torchvision random (ms) | per-image PyTorch (ms) | "
             "vs per-image | vs torchvision |" + gpu_header,
             ("|---" if named else "") + "|---|---|---|---|---|---|---|---|" + "---|" * gpu_header.count("|")]
    for r in rows:
        ref = r.get("per-image PyTorch (reference)")
        cells = ([r["strategies"]] if named else []) + [
                 r["B"], r["N"], r["G"], format_ms(r[ours]), format_ms(r["torchvision random path"]),
                 format_ms(ref) if ref else "—", f"{ref / r[ours]:.1f}x" if ref else "—",
                 f"{r['torchvision random path'] / r[ours]:.2f}x"]
        if gpu:
            cells += [r["launches"], f"{r['kernel time'] * 1e6:.1f}", f"{r['graph replay'] * 1e6:.1f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


GUARDED = {"main": (16, 2000, 20, None),
           "strategies (B=16, N=2000, G=20)": (16, 2000, 20, "soft / soft, ε=2 (training default)")}


def speedup(row):
    return row["torchvision random path"] / row["overlap_sampler.sample"]


def guard(path, device, repeats, margin):
    """0 if the guarded cases keep their committed speed-up over torchvision (less the margin), else 1."""
    committed = json.loads(path.read_text())
    if committed.get("device") != device_name(device):
        print(f"{path} was measured on {committed.get('device')}, this is {device_name(device)}: "
              f"compare like with like", file=sys.stderr)
        return 2
    if not 0 <= margin < 1:
        print(f"--margin must be in [0, 1), got {margin}", file=sys.stderr)
        return 2
    failed, compared = False, 0
    for title, (b, n, g, strategies) in GUARDED.items():
        rows = [r for r in committed["sections"].get(title, []) if r.get("strategies") == strategies]
        if not rows:
            print(f"{title}: not in {path}, skipped")
            continue
        before = speedup(rows[0])
        now = speedup(measure(b, n, g, device, repeats, with_reference=False, strategies=strategies))
        fell = now < before * (1 - margin)
        failed |= fell
        compared += 1
        print(f"{title}{' ' + strategies if strategies else ''}: {now:.2f}x torchvision now, {before:.2f}x "
              f"committed ({now / before - 1:+.0%}){' SLOWER than the margin allows' if fell else ''}")
    if not compared:
        print(f"{path} holds none of the guarded cases: nothing compared", file=sys.stderr)
        return 2
    return 1 if failed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, fewer repeats")
    parser.add_argument("--main-only", action="store_true", help="only the main case (B=16, N=2000)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--guard", type=Path, metavar="RESULTS_JSON",
                        help="regression guard: measure the main case and the training default only, "
                             "compare their speed-up over torchvision's random path (measured side by "
                             "side, so machine load cancels) with a committed results file of this device, "
                             "exit 1 if one fell by more than --margin; writes nothing")
    parser.add_argument("--margin", type=float, default=0.25,
                        help="noise margin of --guard (default 0.25: the same CPU build's ratios varied "
                             "by ~15%% between runs on the 2-core VM)")
    args = parser.parse_args()
    if args.guard is not None:
        raise SystemExit(guard(args.guard, torch.device(args.device), args.repeats, args.margin))
    try:  # before the minutes of measuring
        prepare_output_dir(str(args.out), "results folder")
    except OutputError as e:
        parser.error(str(e))
    device = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats

    sections = {"main": [(16, 2000, 20)],
                "strategies (B=16, N=2000, G=20)": [(16, 2000, 20, name) for name in STRATEGIES],
                "scaling in N (B=4, G=20)": [(4, n, 20) for n in (500, 2000, 10000, 30000, 100000)],
                "scaling in B (N=2000, G=20)": [(b, 2000, 20) for b in (1, 4, 16, 64)],
                # 32000 examples of 11 staged bytes each exceed any GPU's shared memory per block.
                "every image beyond select_kernel's shared-memory staging": [(8, 32000, 20)]}
    if args.quick:
        sections = {"main": [(16, 2000, 20)], "scaling in N (B=4, G=20)": [(4, n, 20) for n in (500, 10000)]}
    if args.main_only:
        sections = {"main": [(16, 2000, 20)]}
    results = {"device": device_name(device), "torch": torch.__version__,
               "build": overlap_sampler.build_info, "threads": torch.get_num_threads(), "sections": {}}
    jobs = [(title, size) for title, sizes in sections.items() for size in sizes]
    for title, (b, n, g, *strategies) in tqdm(jobs, desc="benchmark", unit="size"):
        # The per-image reference builds P x N IoU matrices: skip it where that is minutes.
        with_reference = n * b <= 200_000
        row = measure(b, n, g, device, repeats if n <= 10000 else 3, with_reference,
                      strategies[0] if strategies else None)
        results["sections"].setdefault(title, []).append(row)

    report = [f"# overlap_sampler benchmark on {results['device']}", "",
              f"torch {results['torch']}, {results['threads']} threads, median of {repeats} calls "
              f"after warm-up, soft negatives (K=2), 512 per image. Ratios are speed-ups of "
              f"`overlap_sampler.sample` (>1 = faster), measured side by side in one run.", ""]
    for title, rows in results["sections"].items():
        report.append(to_markdown(title, rows))
    main_row = results["sections"]["main"][0]
    if "kernels" in main_row:
        report += ["### kernels of one `sample` call, main case (torch profiler)", "",
                   "| kernel | µs | µs with `OVERLAP_SAMPLER_SELECT_STAGING=0` |", "|---|---|---|"]
        off = dict(main_row.get("kernels, staging off", []))
        report += [f"| `{name}` | {us:.1f} | {off[name]:.1f} |" if name in off else f"| `{name}` | {us:.1f} | — |"
                   for name, us in main_row["kernels"]]
        report.append("")
    text = "\n".join(report)
    print(text)
    stem = args.out / results["device"]
    write_json(str(stem.with_suffix(".json")), results, indent=2)
    write_text(str(stem.with_suffix(".md")), text)
    print(f"written: {stem}.md and .json")


if __name__ == "__main__":
    main()
