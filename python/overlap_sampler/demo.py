"""What the sampler does to a batch: the IoU_p,n of the negatives each
strategy picks (the paper's Figure 4), on a crowded synthetic batch.

The same measure, bins and table as ``overlap-sampler analyze iou-hist`` (which runs the samplers on a
detector's own proposals): IoU_p,n from :func:`~overlap_sampler.detection.diagnostics.sampler_diagnostics`,
binned and printed by :mod:`overlap_sampler.analysis.iou_hist`."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from .analysis.iou_hist import format_share_table, histogram, shares
from .detection.diagnostics import SampledBatch, sampler_diagnostics
from .ops import NEGATIVE_STRATEGIES, sample
from .sampling.config import SamplerConfig
from .testing import make_batch

EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0)
# The op's default thresholds (IoU_g,e >= 0.5 positive, < 0.5 negative) define the positives.
_THRESHOLDS = SamplerConfig()


def negative_overlaps(batch, result) -> torch.Tensor:
    """IoU_p,n of every sampled negative (float64, images in order): max IoU with any positive of
    its image, sampled or not (GT copies included; 0 if none), as ``docs/ops.md`` defines it."""
    proposals, ps, gt, gs = batch
    picks = SampledBatch(proposals, torch.diff(ps).tolist(), gt, torch.diff(gs).tolist(), result.indices,
                         result.num_pos, result.weights)
    measured = sampler_diagnostics(picks, _THRESHOLDS)
    return torch.from_numpy(measured.key[~measured.positive])


def run_demo(images: int = 8, proposals: int = 2000, gt: int = 20, seed: int = 0) -> str:
    for name, value, low in (("images", images, 1), ("proposals", proposals, 1), ("gt", gt, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    batch = make_batch([proposals] * images, [gt] * images, seed=seed, crowded_fraction=1 / 3,
                       canvas=1000.0)
    rows, elapsed = {}, {}
    for strategy in tqdm(NEGATIVE_STRATEGIES, desc="strategies", leave=False):
        generator = torch.Generator().manual_seed(seed)
        begin = time.perf_counter()
        result = sample(*batch, neg_strategy=strategy, fg_iou_thresh=_THRESHOLDS.fg_iou_thresh,
                        bg_iou_thresh=_THRESHOLDS.bg_iou_thresh, generator=generator)
        elapsed[strategy] = f"{(time.perf_counter() - begin) * 1e3:8.1f}"
        rows[strategy] = shares(histogram(negative_overlaps(batch, result), EDGES))
    title = (f"IoU_p,n of sampled negatives, share per bin ({images} images x {proposals} proposals x "
             f"{gt} GT, 512 per image)")
    return "\n".join([title] + format_share_table(rows, EDGES, first="strategy", extra={"ms/batch": elapsed}))
