"""Calls every CUDA kernel of overlap_sampler once per code path, on small inputs,
for compute-sanitizer (memcheck, racecheck, initcheck) to watch:

    compute-sanitizer --tool memcheck python scripts/cuda_sanitizer_driver.py

Covers: empty images, images without GT, fp16/32/64 boxes, every strategy for
negatives and positives, fixed bin ranges, both pos_key modes, validate on and
off, an image larger than one tile of the max-IoU kernels, and one larger than
select_kernel stages in shared memory. Each result is
also compared with the CPU kernels, so a wrong value fails here too (exit 1).
"""

from __future__ import annotations

import sys

import torch

import overlap_sampler
from overlap_sampler.testing import make_batch


def same(cpu, gpu, what):
    for a, b in zip(cpu, gpu):
        if not torch.equal(a, b.cpu()):
            raise SystemExit(f"CPU and CUDA differ: {what}")


def main() -> int:
    if not (torch.cuda.is_available() and overlap_sampler.build_info["cuda"]):
        print("needs a GPU and a CUDA build")
        return 1
    # An image of 3000 proposals spans several 256-key tiles; empty and GT-less images too.
    counts, gts = [3000, 0, 120, 57, 1], [9, 2, 0, 5, 1]
    proposals, ps, gt, gs = make_batch(counts, gts, seed=0, canvas=600.0)
    cuda = [t.cuda() for t in (proposals, ps, gt, gs)]

    for dtype in (torch.float16, torch.float32, torch.float64):
        a, b = proposals[:300].to(dtype), gt.to(dtype)
        same([overlap_sampler.box_iou(a, b)], [overlap_sampler.box_iou(a.cuda(), b.cuda())], f"box_iou {dtype}")
    same([overlap_sampler.box_iou(proposals[:0], gt)], [overlap_sampler.box_iou(cuda[0][:0], cuda[2])], "empty")

    same(overlap_sampler.max_iou(proposals, ps, gt, gs), overlap_sampler.max_iou(*cuda), "max_iou")
    mask = torch.rand(proposals.shape[0], generator=torch.Generator().manual_seed(1)) < 0.3
    same(overlap_sampler.max_iou(proposals, ps, proposals, ps, query_mask=~mask, key_mask=mask, exclude_self=True),
         overlap_sampler.max_iou(cuda[0], cuda[1], cuda[0], cuda[1], query_mask=~mask.cuda(),
                                 key_mask=mask.cuda(), exclude_self=True), "max_iou masked")

    values = torch.rand(proposals.shape[0], dtype=torch.float64)
    for upper in (None, 0.7):
        same([overlap_sampler.assign_bins(values, ps, mask=mask, num_bins=3, upper=upper)],
             [overlap_sampler.assign_bins(values.cuda(), cuda[1], mask=mask.cuda(), num_bins=3, upper=upper)],
             f"assign_bins upper={upper}")

    weights = torch.rand(proposals.shape[0], dtype=torch.float64)
    weights[::7] = 0.0
    weights[::11] = float("inf")
    uniforms = torch.rand(proposals.shape[0], dtype=torch.float64)
    draws = torch.tensor([40, 0, 200, 10, 1])
    same([overlap_sampler.weighted_sample(weights, uniforms, ps, draws, 64)],
         [overlap_sampler.weighted_sample(weights.cuda(), uniforms.cuda(), cuda[1], draws.cuda(), 64)],
         "weighted_sample")

    uniforms = torch.rand(proposals.shape[0] + gt.shape[0], dtype=torch.float64)
    for neg in overlap_sampler.NEGATIVE_STRATEGIES:
        for pos in overlap_sampler.POSITIVE_STRATEGIES:
            for options in (dict(), dict(bin_upper=0.6, num_bins=4, pos_key="all", validate=False)):
                opts = dict(neg_strategy=neg, pos_strategy=pos, pos_weight=2.0, batch_size_per_image=256,
                            **options)
                same(overlap_sampler.sample_from_uniforms(proposals, ps, gt, gs, uniforms, **opts),
                     overlap_sampler.sample_from_uniforms(*cuda, uniforms.cuda(), **opts), f"sample {opts}")
    # select_kernel stages an image in shared memory up to about twice the
    # batch's average image (3072 examples here): the 4200-proposal image takes
    # the global-memory path, the small ones the staged path, in one call.
    big = make_batch([4200, 30, 10], [12, 3, 0], seed=5, canvas=1000.0)
    big_cuda = [t.cuda() for t in big]
    big_uniforms = torch.rand(big[0].shape[0] + big[2].shape[0], dtype=torch.float64)
    for neg in ("soft", "soft_reference", "linear"):
        opts = dict(neg_strategy=neg, pos_strategy="soft", pos_weight=2.0)
        same(overlap_sampler.sample_from_uniforms(*big, big_uniforms, **opts),
             overlap_sampler.sample_from_uniforms(*big_cuda, big_uniforms.cuda(), **opts), f"sample, large image {opts}")
    generator = torch.Generator("cuda").manual_seed(0)
    overlap_sampler.sample(*cuda, append_gt=False, generator=generator)
    torch.cuda.synchronize()
    print("all CUDA kernels ran and agree with the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
