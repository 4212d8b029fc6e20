"""A detector training step with each sampler against torchvision's random sampler, side by side:
the time of a whole step with each, and the share of the step spent choosing the RoI-head examples.

    python benchmarks/bench_train_step.py                       # the default run's model: small, 128 px, CPU
    python benchmarks/bench_train_step.py --backbone resnet50_fpn --size 800 1333 --batch 2 --rois 512
    python benchmarks/bench_train_step.py --device cuda --amp --backbone resnet50_fpn --size 800 1333 --batch 2
    python benchmarks/bench_train_step.py --samplers random overlap libra ohem isr    # the rivals' extra cost

Both models start from the same random weights and train on the same images and targets (random images,
`--gt` random boxes each); their steps alternate so that drift of the machine hits both alike. An untrained
RPN proposes boxes that hardly touch the objects, which would leave the sampler almost no positives to
weigh; so by default (`--proposals crowded`) half of each image's proposals are replaced by boxes jittered
around its GT boxes, as a trained RPN's cluster (fixed per image, made once). A step is
forward, backward and an SGD update (a tiny learning rate keeps the random model finite). The sampling time
is the head's `select_weighted_training_samples` (the op and the gather for `overlap`; matching and
`BalancedPositiveNegativeSampler` for `random`; for `ohem` and `isr` also their no-grad scoring forward of
the box head over every candidate), measured in extra steps with a device synchronisation around it. Writes `benchmarks/results/train-step-<device>-<model>.md` and `.json`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench_ops import device_name
from overlap_sampler import SamplerConfig
from overlap_sampler.sampling import SAMPLERS
from overlap_sampler.detection import build_detector
from overlap_sampler.io_safety import OutputError, prepare_output_dir, write_json, write_text
from overlap_sampler.testing import jitter_around

RESULTS = Path(__file__).resolve().parent / "results"


def make_batch(batch: int, size: tuple[int, int], gt: int, num_classes: int, device, seed: int = 0):
    """Random images of ``size`` (short, long side) and ``gt`` random boxes each, 5-30 % of the short side."""
    g = torch.Generator().manual_seed(seed)
    height, width = size
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=g).to(device))
        side = torch.rand(gt, 2, generator=g) * 0.25 * height + 0.05 * height
        corner = torch.rand(gt, 2, generator=g) * (torch.tensor([width, height]) - side)
        boxes = torch.cat([corner, corner + side], dim=1)
        labels = torch.randint(1, num_classes, (gt,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def crowd_the_proposals(model, fraction: float, seed: int = 0) -> None:
    """Replace ``fraction`` of each image's RPN proposals (in training) by boxes jittered around its
    GT boxes, as a trained RPN's proposals cluster on objects. Made on the first step and reused: the
    images and targets are the same at every step."""
    rpn_forward = model.rpn.forward
    made: list[torch.Tensor] = []

    def forward(images, features, targets=None):
        proposals, losses = rpn_forward(images, features, targets)
        if targets is None:
            return proposals, losses
        if not made:
            g = torch.Generator().manual_seed(seed)
            for p, t, (height, width) in zip(proposals, targets, images.image_sizes):
                near = jitter_around(t["boxes"].detach().double().cpu(), int(fraction * len(p)), g)
                near[:, 0::2] = near[:, 0::2].clamp(0, width)
                near[:, 1::2] = near[:, 1::2].clamp(0, height)
                made.append(near.to(p))
        return [torch.cat([near, p[len(near):]]) for near, p in zip(made, proposals)], losses

    model.rpn.forward = forward  # an instance attribute: GeneralizedRCNN calls it


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """One model, its optimizer and AMP scaler; ``run()`` trains one step and returns its seconds."""

    def __init__(self, model, device, amp: bool):
        self.model = model.to(device).train()
        self.device = device
        self.amp = amp
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-5, momentum=0.9)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp)
        self.sampling_times: list[float] = []
        self.fg_bg: list[tuple[float, float]] = []

    def run(self, images, targets) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            losses = self.model(images, targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        synchronize(self.device)
        seconds = time.perf_counter() - start
        heads = self.model.roi_heads
        self.fg_bg.append((heads.last_num_pos.float().mean().item(), heads.last_num_neg.float().mean().item()))
        return seconds

    def timed_sampling(self):
        """Time the head's example selection (with synchronisations) from now on."""
        heads = self.model.roi_heads
        select = heads.select_weighted_training_samples

        def timed(proposals, targets, *box_inputs):
            synchronize(self.device)
            start = time.perf_counter()
            result = select(proposals, targets, *box_inputs)
            synchronize(self.device)
            self.sampling_times.append(time.perf_counter() - start)
            return result

        heads.select_weighted_training_samples = timed  # an instance attribute: forward calls it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="fasterrcnn", choices=("fasterrcnn", "maskrcnn"))
    parser.add_argument("--backbone", default="small", choices=("small", "resnet18_fpn", "resnet50_fpn"))
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("SHORT", "LONG"),
                        help="image size; the model resizes to this too [128 128]")
    parser.add_argument("--batch", type=int, default=4, help="images per step [4]")
    parser.add_argument("--gt", type=int, default=20, help="ground-truth boxes per image [20]")
    parser.add_argument("--rois", type=int, default=128, help="batch_size_per_image of the RoI head [128]")
    parser.add_argument("--classes", type=int, default=4, help="classes including background [4]")
    parser.add_argument("--proposals", default="crowded", choices=("crowded", "rpn"),
                        help="half the proposals jittered around the GT boxes, or the untrained RPN's [crowded]")
    parser.add_argument("--samplers", nargs="+", default=["overlap", "random"], choices=SAMPLERS,
                        help="samplers to compare, each with its preset [overlap random]; random is always "
                             "added as the baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="float16 autocast + GradScaler (CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of torch [1]")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each model first [3]")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each model [20]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.amp and args.device == "cpu":
        parser.error("--amp needs --device cuda")
    try:  # before the minutes of measuring
        prepare_output_dir(str(args.out), "results folder")
    except OutputError as e:
        parser.error(str(e))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    short, long = args.size
    torch.manual_seed(0)
    first = build_detector(args.arch, args.classes, backbone=args.backbone, min_size=short, max_size=long,
                           sampler=SamplerConfig(batch_size_per_image=args.rois))
    names = list(dict.fromkeys([*args.samplers, "random"]))
    steps = {}
    for name in names:  # the same initial weights for every sampler
        model = copy.deepcopy(first)
        model.roi_heads.set_sampler(dataclasses.replace(SamplerConfig.preset(name), batch_size_per_image=args.rois))
        model.roi_heads.validate_inputs = device.type != "cuda"  # as `overlap-sampler train`
        if args.proposals == "crowded":
            crowd_the_proposals(model, 0.5)
        steps[name] = TrainStep(model, device, args.amp)
    images, targets = make_batch(args.batch, (short, long), args.gt, args.classes, device)
    if args.arch == "maskrcnn":
        for image, target in zip(images, targets):
            masks = torch.zeros(len(target["boxes"]), *image.shape[1:], dtype=torch.uint8, device=device)
            for k, (x1, y1, x2, y2) in enumerate(target["boxes"].long().tolist()):
                masks[k, y1:y2, x1:x2] = 1
            target["masks"] = masks

    step_times: dict[str, list[float]] = {name: [] for name in steps}
    total = args.warmup + 2 * args.steps
    with tqdm(total=total * len(steps), desc="training steps", unit="step", file=sys.stderr,
              disable=args.no_progress) as bar:
        for k in range(total):
            if k == args.warmup + args.steps:  # second half: the sampling is timed, steps are not
                for step in steps.values():
                    step.timed_sampling()
            for name, step in steps.items():
                seconds = step.run(images, targets)
                if args.warmup <= k < args.warmup + args.steps:
                    step_times[name].append(seconds)
                bar.update()

    rows = {}
    for name, step in steps.items():
        step_s = statistics.median(step_times[name])
        sampling_s = statistics.median(step.sampling_times)
        fg, bg = (statistics.fmean(v) for v in zip(*step.fg_bg))
        rows[name] = {"step_s": step_s, "sampling_s": sampling_s, "share": sampling_s / step_s, "fg": fg, "bg": bg}
    model_name = f"{args.arch}-{args.backbone}-{short}x{long}-b{args.batch}" + ("-amp" if args.amp else "")
    title = f"{model_name} on {device_name(device)}"
    lines = [f"# Training step: {title}", "",
             f"`{' '.join(['python', 'benchmarks/bench_train_step.py', *sys.argv[1:]])}` (torch {torch.__version__}). "
             f"{args.batch} images of {short}x{long} px, {args.gt} GT boxes each, {args.rois} RoIs per image, "
             f"{args.classes} classes, proposals: {args.proposals}; medians of {args.steps} steps of each "
             "model, alternating.", "",
             "| sampler | step (ms) | sampling (ms) | sampling share of the step | fg / bg RoIs per image |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| `{name}` | {r['step_s'] * 1e3:.1f} | {r['sampling_s'] * 1e3:.2f} | {100 * r['share']:.2f} % | "
                     f"{r['fg']:.1f} / {r['bg']:.1f} |")
    lines += ["", "Step time of each sampler / random's: " + ", ".join(
        f"{name} {rows[name]['step_s'] / rows['random']['step_s']:.3f}" for name in rows if name != "random") + "."]
    report = "\n".join(lines) + "\n"
    stem = f"train-step-{device_name(device)}-{model_name}"
    write_text(str(args.out / f"{stem}.md"), report)
    write_json(str(args.out / f"{stem}.json"), {"args": {k: str(v) for k, v in vars(args).items()},
                                                "torch": torch.__version__, "rows": rows}, indent=1)
    print(report)


if __name__ == "__main__":
    main()
