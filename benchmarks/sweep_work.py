"""How much work the CPU's overlap keys do on bench_ops.py's batches (issue 19).

Per image of bench_ops.py's main case and N-scaling batches (same generator, seed, crowding and
canvas), averaged over the batch's images:

* positives (GT copies included) and negatives, matched at IoU 0.5 as the op does by default;
* the positive x negative pairs;
* *swept*: the pairs the CPU's pass of the keys computes (one pass for both classes' keys when both
  are drawn, else the negatives' pass), the negatives whose x1 lies in [x1 - widest negative, x2) of a
  positive: overlap_sweep.h's window, less its rounding margin below (a few pairs at most);
* *overlapping*: the pairs with IoU > 0. Each of them can set a key, so no exact pruning by
  position alone can skip them: they are the floor of a spatial pruning rule;
* M, the largest IoU of a pair: the soft strategy's bins split [0, M].

Writes ``<out>/sweep-work.md``.

    python benchmarks/sweep_work.py [--sizes 2000 10000 30000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_ops  # noqa: E402  (the benchmark's batches)
import overlap_sampler  # noqa: E402
from overlap_sampler.io_safety import prepare_output_dir, write_text  # noqa: E402

CHUNK = 2048  # positives per IoU block: bounded memory at large N


def image_work(proposals: torch.Tensor, gt: torch.Tensor) -> dict:
    """The counts of one image (see the module docstring)."""
    iou_gt = overlap_sampler.box_iou(proposals, gt).amax(dim=1) if len(gt) else torch.zeros(len(proposals))
    positives = torch.cat([proposals[iou_gt >= 0.5], gt])
    negatives = proposals[iou_gt < 0.5]
    x1 = negatives[:, 0].sort().values
    widest = float((negatives[:, 2] - negatives[:, 0]).max()) if len(negatives) else 0.0
    first = torch.searchsorted(x1, (positives[:, 0] - widest).contiguous())
    last = torch.searchsorted(x1, positives[:, 2].contiguous())
    overlapping, best = 0, 0.0
    for start in range(0, len(positives), CHUNK):
        iou = overlap_sampler.box_iou(positives[start:start + CHUNK], negatives)
        overlapping += int((iou > 0).sum())
        best = max(best, float(iou.max())) if iou.numel() else best
    return {"positives": len(positives), "negatives": len(negatives), "pairs": len(positives) * len(negatives),
            "swept": int((last - first).clamp(min=0).sum()), "overlapping": overlapping, "M": best}


def batch_work(images: int, proposals_per_image: int, gt_per_image: int) -> dict:
    """``image_work`` averaged over the images of bench_ops.py's batch of that size."""
    proposals, proposal_splits, gt, gt_splits = bench_ops.case_batch(images, proposals_per_image, gt_per_image,
                                                                      torch.device("cpu"))
    rows = [image_work(proposals[proposal_splits[b]:proposal_splits[b + 1]], gt[gt_splits[b]:gt_splits[b + 1]])
            for b in range(images)]
    mean = {key: sum(r[key] for r in rows) / images for key in rows[0]}
    return {"B": images, "N": proposals_per_image, "G": gt_per_image, **mean}


def to_markdown(rows: list[dict]) -> str:
    lines = ["# What the CPU's overlap keys compute, per image", "",
             "`python benchmarks/sweep_work.py`: bench_ops.py's batches (a third of the proposals around the GT "
             "boxes, the rest uniform on a 1000 px canvas, boxes up to half of it wide), means over the batch's "
             "images. *swept*: pairs the CPU's pass of the keys computes (window [x1 - widest negative, x2) of each "
             "positive, less the sweep's rounding margin); *overlapping*: pairs with IoU > 0, the floor of any "
             "exact pruning by position; M: the largest IoU of a pair.", "",
             "| B | N | G | positives | negatives | pairs | swept | overlapping | swept / pairs | overlapping / swept "
             "| M |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['B']} | {r['N']} | {r['G']} | {r['positives']:.0f} | {r['negatives']:.0f} | "
                     f"{r['pairs']:.3g} | {r['swept']:.3g} | {r['overlapping']:.3g} | {r['swept'] / r['pairs']:.0%} "
                     f"| {r['overlapping'] / max(r['swept'], 1):.0%} | {r['M']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 10000, 30000],
                        help="N of the N-scaling batches (B=4) [500 2000 10000 30000]")
    parser.add_argument("--out", default="benchmarks/results", help="folder of sweep-work.md [benchmarks/results]")
    args = parser.parse_args(argv)
    prepare_output_dir(args.out, "results folder")
    main_b, main_n, main_g = bench_ops.MAIN_SIZE
    rows = [batch_work(main_b, main_n, main_g)]
    rows += [batch_work(bench_ops.SCALING_B, n, main_g) for n in args.sizes]
    table = to_markdown(rows)
    write_text(os.path.join(args.out, "sweep-work.md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
