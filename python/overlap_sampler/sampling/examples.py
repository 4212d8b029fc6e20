"""A batch's RoI-head training examples, matched to the ground truth: what every sampler starts from.

The layout is the ``sample`` op's (``docs/ops.md``): the examples of a batch are the RPN proposals of
every image concatenated (rows ``0 .. N-1``), then a copy of every GT box (row ``N + j`` for GT row
``j``). A sampler returns its picks in the op's output layout too (:class:`~overlap_sampler.ops.SampleResult`:
one padded row per image, positives first), so the RoI head gathers boxes, labels and targets the same
way whichever sampler ran. :func:`pack_selection` builds that layout from a flat list of picks.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..ops import SampleResult, max_iou, splits_from_counts


class ExampleBatch(NamedTuple):
    """The candidates of one training batch and their match to the GT.

    boxes: float32 ``[E, 4]`` (x1, y1, x2, y2); ``E = N + G``: every proposal, then every GT copy.
    image: int64 ``[E]``, the image of each example.
    proposal_counts / gt_counts: proposals and GT boxes per image (host ints, ``B`` of each).
    iou: float32 ``[E]``, IoU_g,e: max IoU with the GT boxes of its image (0 without GT).
    matched_gt: int64 ``[E]``, global GT row of that max (ties to the lowest row; a GT copy is matched
        to its own row), -1 when the image has no GT.
    label: int64 ``[E]``: 1 positive (a GT copy, or IoU_g,e >= fg_iou_thresh), 0 negative
        (IoU_g,e < bg_iou_thresh), -1 ignored (between the thresholds).
    gt_boxes: float32 ``[G, 4]``; gt_labels: int64 ``[G]``, the class of each GT (1..C).
    """

    boxes: Tensor
    image: Tensor
    proposal_counts: list[int]
    gt_counts: list[int]
    iou: Tensor
    matched_gt: Tensor
    label: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor

    @property
    def num_images(self) -> int:
        return len(self.proposal_counts)

    @property
    def num_proposals(self) -> int:
        return sum(self.proposal_counts)

    def is_gt_copy(self) -> Tensor:
        """bool ``[E]``: the example is the appended copy of a GT box."""
        return torch.arange(self.boxes.shape[0], device=self.boxes.device) >= self.num_proposals


def match_examples(proposals: Sequence[Tensor], gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                   fg_iou_thresh: float, bg_iou_thresh: float) -> ExampleBatch:
    """Match every proposal and GT copy of a batch to the GT of its image, as the op's step 1 does.

    Args:
        proposals: per image ``[n_b, 4]`` boxes; gt_boxes: per image ``[g_b, 4]``; gt_labels: per image
            int64 ``[g_b]``. Any float dtype; matching runs in float32.
        fg_iou_thresh / bg_iou_thresh: IoU_g,e >= fg is positive, < bg negative, between ignored.
    """
    device = proposals[0].device if len(proposals) else torch.device("cpu")
    proposal_counts = [int(p.shape[0]) for p in proposals]
    gt_counts = [int(g.shape[0]) for g in gt_boxes]
    all_proposals = torch.cat(list(proposals)).float() if proposals else torch.zeros(0, 4, device=device)
    all_gt = torch.cat(list(gt_boxes)).float() if gt_boxes else torch.zeros(0, 4, device=device)
    p_splits = splits_from_counts(proposal_counts, device)
    g_splits = splits_from_counts(gt_counts, device)
    p_iou, p_match = max_iou(all_proposals, p_splits, all_gt, g_splits)
    g_iou, _ = max_iou(all_gt, g_splits, all_gt, g_splits)
    num_gt = all_gt.shape[0]
    own = torch.arange(num_gt, dtype=torch.int64, device=device)
    iou = torch.cat([p_iou, g_iou]).float()
    matched = torch.cat([p_match, own])
    label = torch.full_like(matched, -1)
    label[iou < bg_iou_thresh] = 0
    label[iou >= fg_iou_thresh] = 1
    label[all_proposals.shape[0]:] = 1  # a GT copy is positive even when degenerate
    image = torch.cat([
        torch.repeat_interleave(torch.arange(len(proposal_counts), device=device),
                                torch.tensor(proposal_counts, device=device, dtype=torch.int64)),
        torch.repeat_interleave(torch.arange(len(gt_counts), device=device),
                                torch.tensor(gt_counts, device=device, dtype=torch.int64)),
    ])
    labels = torch.cat(list(gt_labels)).to(device=device, dtype=torch.int64) if gt_labels else \
        torch.zeros(0, dtype=torch.int64, device=device)
    return ExampleBatch(torch.cat([all_proposals, all_gt]), image, proposal_counts, gt_counts, iou, matched,
                        label, all_gt, labels)


def pack_selection(batch: ExampleBatch, rows: Tensor, weights: Tensor, width: int) -> SampleResult:
    """The op's output layout from a flat list of picked examples.

    Args:
        batch: the examples the rows refer to.
        rows: int64 ``[K]`` distinct example rows, any images, any order.
        weights: float ``[K]`` loss weight of each pick.
        width: row length of the output; raises ``ValueError`` if an image has more picks.

    Returns a :class:`SampleResult`: per image its positives first, then its negatives, each in the
    order of ``rows``; ``matched_gt`` the global GT row of positives (-1 for negatives); weights
    float32 (0 padding); counts per image.
    """
    device = batch.boxes.device
    num_images = batch.num_images
    rows = rows.to(device=device, dtype=torch.int64).reshape(-1)
    weights = weights.to(device=device, dtype=torch.float32).reshape(-1)
    if rows.shape != weights.shape:
        raise ValueError(f"rows ({tuple(rows.shape)}) and weights ({tuple(weights.shape)}) must match")
    image = batch.image[rows]
    positive = batch.label[rows] == 1
    order = torch.argsort(image * 2 + (~positive).to(torch.int64), stable=True)
    rows, weights, image, positive = rows[order], weights[order], image[order], positive[order]
    counts = torch.bincount(image, minlength=num_images)
    num_pos = torch.bincount(image[positive], minlength=num_images)
    if rows.numel() and int(counts.max()) > width:
        raise ValueError(f"an image has {int(counts.max())} picks, more than the output width {width}")
    starts = torch.cumsum(counts, 0) - counts
    column = torch.arange(rows.shape[0], device=device) - starts[image]
    indices = torch.full((num_images, width), -1, dtype=torch.int64, device=device)
    matched = torch.full((num_images, width), -1, dtype=torch.int64, device=device)
    out_weights = torch.zeros((num_images, width), dtype=torch.float32, device=device)
    indices[image, column] = rows
    matched[image, column] = torch.where(positive, batch.matched_gt[rows], torch.full_like(rows, -1))
    out_weights[image, column] = weights
    return SampleResult(indices, matched, out_weights, num_pos, counts - num_pos)


def segment_rank(segments: Sequence[Tensor], keys: Sequence[Tensor]) -> Tensor:
    """Rank (0-based, int64) of each element inside its segment, by ``keys`` ascending lexicographically.

    ``segments``: int tensors ``[n]`` whose value tuple names the segment; ``keys``: tensors ``[n]``, the
    first the most significant. Full ties keep index order (stable sorts).
    """
    n = segments[0].shape[0]
    device = segments[0].device
    order = torch.arange(n, device=device)
    # Stable sorts, least significant first: keys (last to first), then the segment columns (last to first).
    for key in list(reversed(list(keys))) + list(reversed(list(segments))):
        order = order[torch.argsort(key[order], stable=True)]
    position = torch.arange(n, device=device)
    new = position == 0
    for column in segments:
        sorted_column = column[order]
        new[1:] |= sorted_column[1:] != sorted_column[:-1]
    start = torch.cummax(torch.where(new, position, torch.zeros_like(position)), 0).values
    rank = torch.empty_like(order)
    rank[order] = position - start
    return rank
