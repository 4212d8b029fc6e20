"""Whole-batch `sample` against the per-image plain-PyTorch way and torchvision's
random sampling path, side by side in one run, reported as ratios.

    python benchmarks/bench_ops.py                 # CPU: benchmarks/results/<device>.md, .json, -scaling.png
    python benchmarks/bench_ops.py --device cuda   # GPU: CUDA-event timings and kernel launches
    python benchmarks/bench_ops.py --guard benchmarks/results/<device>.json   # regression check

The main case is what training runs: `SamplerConfig()`'s settings (soft negatives and soft
positives, K=2, epsilon=2, 512 examples per image, at most a quarter positive) on B=16 images x
2000 proposals x 20 GT, a third of the proposals jittered around GT boxes (kernels.md). Then the
other strategies on the same batch (soft / uniform was the main case before issue 19), scaling in
N (proposals per image) and B with the main case's settings, the peak memory of one call against
N, and a log-log plot of time and memory against N. Tiny sizes, for a smoke run in seconds:

    python benchmarks/bench_ops.py --main-size 2 300 10 --n-scaling 200 400 --b-scaling 1 2 --repeats 1 --out /tmp/b
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops
from tqdm import tqdm

import overlap_sampler
from overlap_sampler import reference
from overlap_sampler.io_safety import OutputError, prepare_output_dir, write_figure, write_json, write_text
from overlap_sampler.sampling.config import SamplerConfig
from overlap_sampler.testing import make_batch

RESULTS = Path(__file__).resolve().parent / "results"

# The three ways, as keys of a row, and their short names in tables and plots.
OURS, TORCHVISION, REFERENCE = "overlap_sampler.sample", "torchvision random path", "per-image PyTorch (reference)"
WAYS = {OURS: "sample", TORCHVISION: "torchvision random", REFERENCE: "per-image PyTorch"}

MAIN = "soft / soft, ε=2 (training default)"
# The strategies table: each row's settings over the training default. The uniform-positive rows
# keep ε=1, as they were measured before issue 19 (soft / uniform was the main case then).
STRATEGIES = {
    MAIN: {},
    "soft / uniform": dict(pos_strategy="uniform", pos_weight=1.0),
    "uniform / uniform": dict(neg_strategy="uniform", pos_strategy="uniform", pos_weight=1.0),
    "hard / uniform": dict(neg_strategy="hard", pos_strategy="uniform", pos_weight=1.0),
    "linear / uniform": dict(neg_strategy="linear", pos_strategy="uniform", pos_weight=1.0),
}
MAIN_SIZE = (16, 2000, 20)
N_SCALING, B_SCALING = (500, 2000, 10000, 30000, 100000), (1, 4, 16, 64)
SCALING_B = 4  # images of the N-scaling and memory tables


def training_default_options():
    """The `sample` arguments `overlap-sampler train` passes by default (`SamplerConfig().op_arguments()`)."""
    return SamplerConfig().op_arguments()


def strategy_options(name):
    return {**training_default_options(), **STRATEGIES[name]}


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


def time_call(fn, device, repeats, warmup=2, slow=1.0):
    """Median seconds per call; CUDA events on a GPU. A call over ``slow`` seconds gets one
    warm-up and at most 3 timed calls (the per-image way takes tens of seconds at N=30000)."""
    for _ in range(warmup):
        begin = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - begin > slow:
            repeats = min(repeats, 3)
            break
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


def case_batch(images, proposals_per_image, gt_per_image, device):
    return make_batch([proposals_per_image] * images, [gt_per_image] * images, seed=0, device=device,
                      crowded_fraction=1 / 3, canvas=1000.0)


def reference_fits(images, proposals_per_image):
    """The per-image reference builds P x N IoU matrices: skip it where that is minutes."""
    return images * proposals_per_image <= 200_000


def make_calls(batch, options, device, with_reference=True):
    """The ways to sample ``batch``, by name: the op, torchvision's random path, the per-image reference."""
    generator = torch.Generator(device).manual_seed(0)
    matcher = det_utils.Matcher(options["fg_iou_thresh"], options["bg_iou_thresh"], allow_low_quality_matches=False)
    sampler = det_utils.BalancedPositiveNegativeSampler(options["batch_size_per_image"], options["positive_fraction"])
    calls = {OURS: lambda: overlap_sampler.sample(*batch, generator=generator, validate=False, **options),
             TORCHVISION: lambda: torchvision_random_path(*batch, matcher, sampler)}
    if with_reference:
        calls[REFERENCE] = lambda: reference.sample(*batch, generator=generator, **options)
    return calls


def measure(images, proposals_per_image, gt_per_image, device, repeats, with_reference=True, strategies=MAIN):
    """One row: median seconds per call of each way on one batch, with ``strategies``' settings
    (a key of STRATEGIES); on a GPU also the op's kernels and its CUDA-graph replay."""
    batch = case_batch(images, proposals_per_image, gt_per_image, device)
    options = strategy_options(strategies)
    calls = make_calls(batch, options, device, with_reference)
    row = {"B": images, "N": proposals_per_image, "G": gt_per_image, "strategies": strategies}
    for name, fn in calls.items():
        row[name] = time_call(fn, device, repeats)
    if device.type == "cuda":
        row["launches"], row["kernel time"], row["kernels"] = profile_kernels(calls[OURS])
        # The same call with select_kernel reading every image from global memory, side by side.
        os.environ["OVERLAP_SAMPLER_SELECT_STAGING"] = "0"
        try:
            row["kernels, staging off"] = profile_kernels(calls[OURS])[2]
        finally:
            del os.environ["OVERLAP_SAMPLER_SELECT_STAGING"]
        # The op's random draw comes from the generator; give it as uniforms to capture the rest.
        uniforms = torch.rand(batch[0].shape[0] + batch[2].shape[0], dtype=torch.float64, device=device)
        row["graph replay"] = time_graph_replay(lambda: overlap_sampler.sample_from_uniforms(
            *batch, uniforms, validate=False, **options))
    return row


# Peak memory of one call. What each number measures, as the results file says it:
MEMORY_METHOD = {
    "cuda": "`torch.cuda.max_memory_allocated()` during one call less `memory_allocated()` before it "
            "(peak statistics reset first, after a warm-up call of the same size): the tensors the call "
            "creates, its outputs included, not the caching allocator's reserve.",
    "cpu": "growth of the peak resident set during one call (Linux `VmHWM`, reset through "
           "`/proc/self/clear_refs` just before the call, less `VmRSS` then), in a child process that only "
           "builds the inputs and has warmed each way up on a tiny batch; its glibc malloc hands every "
           "block over 64 KiB back to the system when freed (`MALLOC_MMAP_THRESHOLD_`) and is trimmed "
           "before each call, so memory an earlier call freed is not reused unseen. It counts the pages "
           "the call touches, its outputs included.",
}


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_bytes(fn):
    """See MEMORY_METHOD["cpu"]; run it in a process started by `peak_memory_in_child`."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak RSS becomes the current RSS
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return (peak - before) * 1024


def cuda_peak_bytes(fn):
    """See MEMORY_METHOD["cuda"]."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def peak_memory_rows(sizes, options, device):
    """Peak bytes of one call of each way per (B, N, G) in ``sizes``, in this process."""
    if device.type == "cuda":
        peak = cuda_peak_bytes
    else:
        peak = cpu_peak_bytes
        # Lazy one-time set-up (thread pools, dispatch caches) is no call's memory.
        for fn in make_calls(case_batch(1, 100, sizes[0][2], device), options, device).values():
            fn()
    rows = []
    for b, n, g in sizes:
        calls = make_calls(case_batch(b, n, g, device), options, device, reference_fits(b, n))
        rows.append({"B": b, "N": n, "G": g, **{name: peak(fn) for name, fn in calls.items()}})
    return rows


def peak_memory_in_child(sizes, options):
    """`peak_memory_rows` on the CPU in a fresh process (see MEMORY_METHOD["cpu"]); None, with a
    note, where that cannot be measured or the child failed."""
    if not os.path.exists("/proc/self/clear_refs"):
        print("peak memory: needs Linux's /proc/self/clear_refs, left out", file=sys.stderr)
        return None
    package_root = str(Path(overlap_sampler.__file__).resolve().parent.parent)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    spec = json.dumps({"sizes": sizes, "options": options, "threads": torch.get_num_threads()})
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", spec],
                           env=env, stdout=subprocess.PIPE, text=True)
    if child.returncode != 0:
        print(f"peak memory: the child process failed (rc={child.returncode}), left out", file=sys.stderr)
        return None
    return json.loads(child.stdout.strip().splitlines()[-1])


def memory_child(spec):
    spec = json.loads(spec)
    torch.set_num_threads(spec["threads"])
    rows = peak_memory_rows([tuple(s) for s in spec["sizes"]], spec["options"], torch.device("cpu"))
    print(json.dumps(rows))


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


def format_mib(size):
    mib = size / 2**20
    return f"{mib:.2f}" if mib < 10 else f"{mib:.1f}"


def to_markdown(title, rows, strategies_column=False):
    gpu = "launches" in rows[0]
    gpu_header = " launches | kernel time (µs) | graph replay (µs) |" if gpu else ""
    lines = [f"### {title}", "",
             ("| negatives / positives " if strategies_column else "") +
             "| B | N | G | sample (ms) | torchvision random (ms) | per-image PyTorch (ms) | "
             "vs per-image | vs torchvision |" + gpu_header,
             ("|---" if strategies_column else "") + "|---|---|---|---|---|---|---|---|" +
             "---|" * gpu_header.count("|")]
    for r in rows:
        ref = r.get(REFERENCE)
        cells = ([r["strategies"]] if strategies_column else []) + [
                 r["B"], r["N"], r["G"], format_ms(r[OURS]), format_ms(r[TORCHVISION]),
                 format_ms(ref) if ref else "—", f"{ref / r[OURS]:.1f}x" if ref else "—",
                 f"{r[TORCHVISION] / r[OURS]:.2f}x"]
        if gpu:
            cells += [r["launches"], f"{r['kernel time'] * 1e6:.1f}", f"{r['graph replay'] * 1e6:.1f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def memory_markdown(memory):
    lines = [f"### {memory['title']}", "", f"Peak memory: {memory['method']}", "",
             "| B | N | G | sample (MiB) | torchvision random (MiB) | per-image PyTorch (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in memory["rows"]:
        cells = [r["B"], r["N"], r["G"]] + [format_mib(r[way]) if way in r else "—" for way in WAYS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_ways(ax, rows, scale, ylabel):
    for way, label in WAYS.items():
        points = [(r["N"], r[way] * scale) for r in rows if r.get(way)]  # 0 has no place on a log axis
        if points:
            ax.loglog(*zip(*points), marker="o", label=label)
    ax.set_xlabel(f"N, proposals per image (B={rows[0]['B']}, G={rows[0]['G']})")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def write_plot(path, title, time_rows, memory_rows=None):
    """Time per call, and peak memory where measured, against N for the three ways: log-log PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if memory_rows else 1, figsize=(12 if memory_rows else 6, 4.5), squeeze=False)
    _plot_ways(axes[0][0], time_rows, 1e3, "time per call (ms)")
    if memory_rows:
        _plot_ways(axes[0][1], memory_rows, 1 / 2**20, "peak memory of a call (MiB)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_figure(str(path), fig)


def speedup(row):
    return row[TORCHVISION] / row[OURS]


def guard(path, device, repeats, margin):
    """0 if the main case keeps its committed speed-up over torchvision (less the margin), 1 if not,
    2 if the file holds nothing comparable (another device, another main case) or the margin is bad."""
    committed = json.loads(path.read_text())
    if committed.get("device") != device_name(device):
        print(f"{path} was measured on {committed.get('device')}, this is {device_name(device)}: "
              f"compare like with like", file=sys.stderr)
        return 2
    if not 0 <= margin < 1:
        print(f"--margin must be in [0, 1), got {margin}", file=sys.stderr)
        return 2
    main, options = committed.get("main case"), training_default_options()
    if main is None:  # results files from before issue 19 record no main case
        print(f"{path}: its main case is soft / uniform (ε=1), from before issue 19; this one is {MAIN}: "
              f"nothing comparable, commit a fresh results file first", file=sys.stderr)
        return 2
    differ = sorted(k for k in set(main["options"]) | set(options) if main["options"].get(k) != options.get(k))
    if differ:
        print(f"{path}: its main case is {main['strategies']} ("
              + ", ".join(f"{k}={main['options'].get(k)!r}" for k in differ) + f"); this one is {MAIN} ("
              + ", ".join(f"{k}={options.get(k)!r}" for k in differ) + "): nothing comparable", file=sys.stderr)
        return 2
    rows = committed.get("sections", {}).get("main")
    if not rows:
        print(f"{path} has no main row: nothing comparable", file=sys.stderr)
        return 2
    before = speedup(rows[0])
    now = speedup(measure(main["B"], main["N"], main["G"], device, repeats, with_reference=False))
    fell = now < before * (1 - margin)
    print(f"main case ({MAIN}, B={main['B']}, N={main['N']}, G={main['G']}): {now:.2f}x torchvision now, "
          f"{before:.2f}x committed ({now / before - 1:+.0%}){' SLOWER than the margin allows' if fell else ''}")
    return 1 if fell else 0


def plan_sections(main_size, n_scaling, b_scaling, full, device):
    """Section title -> its cases (B, N, G, strategies)."""
    b, n, g = main_size
    sections = {"main": [(b, n, g, MAIN)]}
    if full:
        sections[f"strategies (B={b}, N={n}, G={g})"] = [(b, n, g, name) for name in STRATEGIES]
    if n_scaling:
        sections[n_scaling_title(g)] = [(SCALING_B, x, g, MAIN) for x in n_scaling]
    if b_scaling:
        sections[f"scaling in B (N={n}, G={g})"] = [(x, n, g, MAIN) for x in b_scaling]
    if full and device.type == "cuda":
        # 32000 examples of 11 staged bytes each exceed any GPU's shared memory per block.
        sections["every image beyond select_kernel's shared-memory staging"] = [(8, 32000, g, MAIN)]
    return sections


def n_scaling_title(g):
    return f"scaling in N (B={SCALING_B}, G={g})"


def run_sections(sections, device, repeats):
    timed = {}
    jobs = [(title, case) for title, cases in sections.items() for case in cases]
    for title, (b, n, g, strategies) in tqdm(jobs, desc="benchmark", unit="size"):
        timed.setdefault(title, []).append(measure(b, n, g, device, repeats, reference_fits(b, n), strategies))
    return timed


def measure_memory(n_scaling, g, device):
    sizes = [(SCALING_B, n, g) for n in n_scaling]
    options = training_default_options()
    print("peak memory ...", file=sys.stderr)
    rows = peak_memory_rows(sizes, options, device) if device.type == "cuda" else peak_memory_in_child(sizes, options)
    if rows is None:
        return None
    return {"title": f"peak memory of one call in N (B={SCALING_B}, G={g})", "method": MEMORY_METHOD[device.type],
            "rows": rows}


def to_report(results, plot_name):
    main, o = results["main case"], results["main case"]["options"]
    report = [f"# overlap_sampler benchmark on {results['device']}", "",
              f"torch {results['torch']}, {results['threads']} threads, median of {results['repeats']} calls "
              f"after warm-up (a call over 1 s: one warm-up, median of 3). Ratios are speed-ups of "
              f"`overlap_sampler.sample` (>1 = faster), measured side by side in one run.", "",
              f"**Main case: {main['strategies']}**, `SamplerConfig()`'s settings, what `overlap-sampler train` "
              f"runs: {o['neg_strategy']} negatives, {o['pos_strategy']} positives, K={o['num_bins']}, "
              f"ε={o['pos_weight']:g}, {o['batch_size_per_image']} examples per image, at most "
              f"{o['positive_fraction']:g} positive, on B={main['B']} images × N={main['N']} proposals × "
              f"G={main['G']} GT boxes. The scaling and memory tables use its settings. Results from before "
              f"issue 19 had soft / uniform (ε=1) as their main case: the strategies table's soft / uniform "
              f"row compares with them.", ""]
    for title, rows in results["sections"].items():
        report.append(to_markdown(title, rows, strategies_column=title.startswith("strategies")))
        if title == n_scaling_title(main["G"]) and plot_name:
            report += [f"![time{' and peak memory' if results.get('peak memory') else ''} of one call against N, "
                       f"log-log]({plot_name})", ""]
            if results.get("peak memory"):
                report.append(memory_markdown(results["peak memory"]))
    main_row = results["sections"]["main"][0]
    if "kernels" in main_row:
        report += ["### kernels of one `sample` call, main case (torch profiler)", "",
                   "| kernel | µs | µs with `OVERLAP_SAMPLER_SELECT_STAGING=0` |", "|---|---|---|"]
        off = dict(main_row.get("kernels, staging off", []))
        report += [f"| `{name}` | {us:.1f} | {off[name]:.1f} |" if name in off else f"| `{name}` | {us:.1f} | — |"
                   for name, us in main_row["kernels"]]
        report.append("")
    return "\n".join(report)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true",
                        help="main case and N-scaling (500, 10000 unless --n-scaling) only, 3 repeats")
    parser.add_argument("--main-only", action="store_true", help="only the main case")
    parser.add_argument("--main-size", type=int, nargs=3, default=MAIN_SIZE, metavar=("B", "N", "G"),
                        help="images, proposals and GT boxes per image of the main case and the strategies "
                             "table; N and G of the B-scaling, G of the N-scaling (default: 16 2000 20)")
    parser.add_argument("--n-scaling", type=int, nargs="*", metavar="N",
                        help=f"proposals per image of the N-scaling, memory table and plot, B={SCALING_B} "
                             f"(default: {' '.join(map(str, N_SCALING))}; none: no such section)")
    parser.add_argument("--b-scaling", type=int, nargs="*", metavar="B",
                        help=f"images of the B-scaling (default: {' '.join(map(str, B_SCALING))}; none: no such "
                             f"section)")
    parser.add_argument("--no-memory", action="store_true", help="no peak-memory table")
    parser.add_argument("--no-plot", action="store_true", help="no PNG")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--guard", type=Path, metavar="RESULTS_JSON",
                        help="regression guard: measure the main case only, compare its speed-up over "
                             "torchvision's random path (measured side by side, so machine load cancels) with "
                             "a committed results file of this device and the same main case, exit 1 if it "
                             "fell by more than --margin, 2 if the file holds nothing comparable; writes nothing")
    parser.add_argument("--margin", type=float, default=0.25,
                        help="noise margin of --guard (default 0.25: the same CPU build's ratios varied "
                             "by ~15%% between runs on the 2-core VM)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: see peak_memory_in_child
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    if args.memory_child is not None:
        return memory_child(args.memory_child)
    device = torch.device(args.device)
    if args.guard is not None:
        raise SystemExit(guard(args.guard, device, args.repeats, args.margin))
    try:  # before the minutes of measuring
        prepare_output_dir(str(args.out), "results folder")
    except OutputError as e:
        parser.error(str(e))
    repeats = 3 if args.quick else args.repeats
    main_size = tuple(args.main_size)
    n_scaling = args.n_scaling if args.n_scaling is not None else (500, 10000) if args.quick else N_SCALING
    b_scaling = args.b_scaling if args.b_scaling is not None else () if args.quick else B_SCALING
    full = not (args.quick or args.main_only)
    if args.main_only:
        n_scaling = b_scaling = ()
    sections = plan_sections(main_size, n_scaling, b_scaling, full, device)

    name = device_name(device)
    results = {"device": name, "torch": torch.__version__, "build": overlap_sampler.build_info,
               "threads": torch.get_num_threads(), "repeats": repeats,
               "main case": {"strategies": MAIN, **dict(zip("BNG", main_size)), "options": strategy_options(MAIN)},
               "sections": run_sections(sections, device, repeats)}
    if n_scaling and not args.no_memory:
        results["peak memory"] = measure_memory(n_scaling, main_size[2], device)
    plot_name = None
    if n_scaling and not args.no_plot:
        plot_name = f"{name}-scaling.png"
        memory = results.get("peak memory")
        write_plot(args.out / plot_name, f"{name}: {MAIN}, one call",
                   results["sections"][n_scaling_title(main_size[2])], memory and memory["rows"])
    text = to_report(results, plot_name)
    print(text)
    # Not Path.with_suffix: a CPU's name can hold a dot ("...-2.20GHz").
    write_json(str(args.out / f"{name}.json"), results, indent=2)
    write_text(str(args.out / f"{name}.md"), text)
    print(f"written: {args.out / name}.md and .json{' and ' + plot_name if plot_name else ''}")


if __name__ == "__main__":
    main()
