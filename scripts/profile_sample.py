"""One `sample` call of the benchmark's main case, for a kernel profiler:

    ncu --profile-from-start off -k regex:'(match|overlap_key|select)_kernel' \
        python scripts/profile_sample.py

The batch is bench_ops.py's main case (B=16, 2000 proposals and 20 GT per image,
a third of them crowded) with the training default's settings (`SamplerConfig()`:
soft negatives and positives, K=2, epsilon 2, 512 per image). Warm-up calls come
first; only the PROFILED_CALLS calls after them run between cudaProfilerStart and
cudaProfilerStop, so `--profile-from-start off` profiles exactly their kernels,
however many kernels a call launches. Prints the pair counts that set the
overlap-key kernel's work.
"""

from __future__ import annotations

import sys

import torch

import overlap_sampler
from overlap_sampler.sampling import SamplerConfig
from overlap_sampler.testing import make_batch

WARMUP_CALLS = 3
PROFILED_CALLS = 1


def overlap_pairs(batch) -> tuple[int, int]:
    """The work of IoU_p,n: negatives x positives of the same image (GT copies
    are positives), and how many of those pairs overlap at all (the others skip
    the division)."""
    proposals, proposal_splits, gt_boxes, gt_splits = batch
    pairs = overlapping = 0
    for b in range(len(proposal_splits) - 1):
        boxes = proposals[proposal_splits[b]:proposal_splits[b + 1]]
        gts = gt_boxes[gt_splits[b]:gt_splits[b + 1]]
        iou_gt = overlap_sampler.box_iou(boxes, gts).amax(dim=1)
        positives = torch.cat([boxes[iou_gt >= 0.5], gts])
        negatives = boxes[iou_gt < 0.5]
        iou = overlap_sampler.box_iou(negatives, positives)
        pairs += iou.numel()
        overlapping += int((iou > 0).sum())
    return pairs, overlapping


def main() -> int:
    if not (torch.cuda.is_available() and overlap_sampler.build_info["cuda"]):
        print("needs a GPU and a CUDA build")
        return 1
    batch = make_batch([2000] * 16, [20] * 16, seed=0, device=torch.device("cuda"),
                       crowded_fraction=1 / 3, canvas=1000.0)
    generator = torch.Generator("cuda").manual_seed(0)
    options = {**SamplerConfig().op_arguments(), "validate": False}
    for _ in range(WARMUP_CALLS):
        overlap_sampler.sample(*batch, generator=generator, **options)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _ in range(PROFILED_CALLS):
        overlap_sampler.sample(*batch, generator=generator, **options)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()

    pairs, overlapping = overlap_pairs(batch)
    print(f"IoU_p,n pairs {pairs}, of which overlapping {overlapping} ({overlapping / max(pairs, 1):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
