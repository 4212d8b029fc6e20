"""What the sampler does to a batch: the IoU_p,n of the negatives each
strategy picks (the paper's Figure 4), on a crowded synthetic batch."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from .ops import NEGATIVE_STRATEGIES, max_iou, sample
from .testing import make_batch

EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.01)


def negative_overlaps(batch, result):
    """IoU_p,n of every sampled negative: max IoU with any positive of its image."""
    proposals, ps, gt, gs = batch
    examples = torch.cat([proposals, gt])
    images = ps.numel() - 1
    n_total = proposals.shape[0]
    values = []
    for b in range(images):
        p, n = int(result.num_pos[b]), int(result.num_neg[b])
        row = result.indices[b]
        # Every positive of the image, sampled or not, as docs/ops.md defines IoU_p,n.
        image_rows = torch.cat([torch.arange(int(ps[b]), int(ps[b + 1])),
                                n_total + torch.arange(int(gs[b]), int(gs[b + 1]))])
        iou_gt, _ = max_iou(examples[image_rows], torch.tensor([0, image_rows.numel()]), gt[gs[b]:gs[b + 1]],
                            torch.tensor([0, int(gs[b + 1] - gs[b])]))
        is_copy = image_rows >= n_total
        positives = examples[image_rows[(iou_gt >= 0.5) | is_copy]]
        negatives = examples[row[p:p + n]]
        if positives.numel() == 0 or negatives.numel() == 0:
            values.append(torch.zeros(negatives.shape[0]))
            continue
        key, _ = max_iou(negatives, torch.tensor([0, negatives.shape[0]]), positives,
                         torch.tensor([0, positives.shape[0]]))
        values.append(key)
    return torch.cat(values)


def run_demo(images: int = 8, proposals: int = 2000, gt: int = 20, seed: int = 0) -> str:
    for name, value, low in (("images", images, 1), ("proposals", proposals, 1), ("gt", gt, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    batch = make_batch([proposals] * images, [gt] * images, seed=seed, crowded_fraction=1 / 3,
                       canvas=1000.0)
    header = "strategy        " + " ".join(f"[{lo:.1f},{hi if hi <= 1 else 1.0:.1f})" for lo, hi in
                                         zip(EDGES[:-1], EDGES[1:])) + "   ms/batch"
    lines = [f"IoU_p,n of sampled negatives, share per bin ({images} images x {proposals} proposals x "
             f"{gt} GT, 512 per image)", header]
    for strategy in tqdm(NEGATIVE_STRATEGIES, desc="strategies", leave=False):
        generator = torch.Generator().manual_seed(seed)
        begin = time.perf_counter()
        result = sample(*batch, neg_strategy=strategy, generator=generator)
        elapsed = (time.perf_counter() - begin) * 1e3
        key = negative_overlaps(batch, result)
        counts = torch.histogram(key.double().clamp(max=1.0), torch.tensor(EDGES, dtype=torch.float64)).hist
        shares = counts / counts.sum().clamp(min=1)
        lines.append(f"{strategy:<15} " + " ".join(f"{100 * s:8.1f}%" for s in shares) + f"   {elapsed:8.1f}")
    return "\n".join(lines)
