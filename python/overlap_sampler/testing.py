"""Random detection batches for tests, demos and benchmarks: crowded boxes as
an RPN produces them, packed as ragged batches."""

from __future__ import annotations

import torch

from .ops import splits_from_counts


def random_boxes(count: int, generator: torch.Generator, size: float = 100.0) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator, dtype=torch.float64) * size
    wh = torch.rand(count, 2, generator=generator, dtype=torch.float64) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


def jitter_around(gt: torch.Tensor, count: int, generator: torch.Generator,
                  scale: float = 0.15) -> torch.Tensor:
    """Proposals scattered around GT boxes, as an RPN produces: many overlaps."""
    if gt.shape[0] == 0:
        return random_boxes(count, generator)
    pick = torch.randint(gt.shape[0], (count,), generator=generator)
    base = gt[pick]
    wh = (base[:, 2:] - base[:, :2]).repeat(1, 2)
    boxes = base + torch.randn(count, 4, generator=generator, dtype=torch.float64) * wh * scale
    x1y1 = torch.minimum(boxes[:, :2], boxes[:, 2:])
    x2y2 = torch.maximum(boxes[:, :2], boxes[:, 2:])
    return torch.cat([x1y1, x2y2], dim=1)


def make_batch(proposal_counts, gt_counts, seed: int = 0, dtype=torch.float32, device="cpu",
               crowded_fraction: float = 0.5, canvas: float = 100.0):
    """A ragged batch: (proposals, proposal_splits, gt_boxes, gt_splits).

    ``crowded_fraction`` of each image's proposals jitter around its GT boxes,
    the rest are uniform. Boxes are up to half the ``canvas`` wide: on the
    default 100 x 100 canvas nearly everything overlaps (a stress test); a
    canvas of ~1000 looks like a real image.
    """
    g = torch.Generator().manual_seed(seed)
    proposals, gts = [], []
    for n, m in zip(proposal_counts, gt_counts):
        gt = random_boxes(m, g, canvas)
        near = int(n * crowded_fraction) if m > 0 else 0
        proposals.append(torch.cat([jitter_around(gt, near, g), random_boxes(n - near, g, canvas)]))
        gts.append(gt)
    to = dict(dtype=dtype, device=device)
    return (
        torch.cat(proposals).to(**to),
        splits_from_counts(proposal_counts, device=device),
        torch.cat(gts).to(**to) if gts else torch.zeros(0, 4, **to),
        splits_from_counts(gt_counts, device=device),
    )
