"""What the RoI head sampled, measured: the paper's Figure 4 for one training batch.

:class:`OverlapRoIHeads` keeps the batch it just sampled (a :class:`SampledBatch`) when its
``record_samples`` flag is set; :func:`sampler_diagnostics` turns it into per-RoI IoUs and keys with the
library ops (``max_iou``, ``assign_bins``), and :class:`SamplerDiagnostics` summarises them. The
sampler is not called again: whatever sampler ran (the Overlap Sampler op, or torchvision's random
sampler for the ``random`` preset), the measures are the same, so two runs compare side by side.

Terms as in ``docs/ops.md`` (one image; examples = its proposals, then its GT boxes appended):

* IoU_g,e: max IoU of an example with the image's GT boxes; positive if a GT copy or >= fg_iou_thresh,
  negative if not a copy and < bg_iou_thresh.
* IoU_p,n of a negative: max IoU with every positive of its image (GT copies included; 0 if none) --
  the x axis of Figure 4.
* key of a positive: max IoU with every negative of its image (``pos_key="all"``: every other example).
* bins: the soft strategy's ``num_bins`` equal bins over [0, U], U = ``bin_upper`` or the image's max
  key over its negatives (positives: over its positives) -- Eq. 2, ``docs/ops.md`` step 5. For every
  sampler the negatives are binned by IoU_p,n (also for ``iou_balanced``, which itself bins by IoU_g,n),
  so "how many sampled negatives lie in the top bin" means the same in every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..ops import assign_bins, max_iou, splits_from_counts
from ..sampling.config import SamplerConfig

#: Edges of the CSV's IoU_p,n histogram: 10 bins of 0.1 over [0, 1] (the last one holds 1.0).
IOU_EDGES = np.linspace(0.0, 1.0, 11)
#: Its columns: ``neg_share_iou_pn_0.0_0.1`` ... ``_0.9_1.0``, the share of the sampled negatives in each.
SHARE_PREFIX = "neg_share_iou_pn_"


def histogram(values: np.ndarray | Tensor, edges=IOU_EDGES) -> np.ndarray:
    """int64 counts of ``values`` (IoUs) in the bins of ``edges``: ``[lo, hi)``, the last one
    ``[lo, hi]``. Values outside ``[edges[0], edges[-1]]`` (rounding past 1) count in the end bins.
    The diagnostics' CSV shares and ``analyze iou-hist`` both count with it."""
    values = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    edges = np.asarray(edges, dtype=np.float64)
    counts, _ = np.histogram(np.clip(values.astype(np.float64), edges[0], edges[-1]), bins=edges)
    return counts.astype(np.int64)


class SampledBatch(NamedTuple):
    """One training batch as the RoI head sampled it, in the ``sample`` op's layout (``docs/ops.md``).

    proposals: ``[N, 4]`` float, the RPN proposals of every image concatenated (x1, y1, x2, y2).
    proposal_counts: proposals per image (host ints, ``B`` of them).
    gt_boxes: ``[G, 4]`` float, the GT boxes of every image concatenated.
    gt_counts: GT boxes per image.
    indices: int64 ``[B, W]``: per image the sampled global example ids (proposal row ``i``, or ``N + j``
        for the copy of GT row ``j``), positives first, then negatives, then -1.
    num_pos: int64 ``[B]`` sampled positives per image (the first ``num_pos[b]`` of row b).
    weights: float32 ``[B, W]`` loss weights (ε for the best positive of each GT, 1 otherwise, 0 padding).
    """

    proposals: Tensor
    proposal_counts: list[int]
    gt_boxes: Tensor
    gt_counts: list[int]
    indices: Tensor
    num_pos: Tensor
    weights: Tensor


def from_torchvision_samples(proposals_with_gt: list[Tensor], gt_boxes: list[Tensor], sampled: list[Tensor],
                             labels: list[Tensor]) -> SampledBatch:
    """A :class:`SampledBatch` from torchvision's sampling (the ``random`` preset).

    Args:
        proposals_with_gt: per image ``[n_b + g_b, 4]``, the proposals with the GT boxes appended
            (``RoIHeads.add_gt_proposals``).
        gt_boxes: per image ``[g_b, 4]``.
        sampled: per image, the sampled rows of ``proposals_with_gt[b]`` (``subsample``'s indices).
        labels: per image, the labels of those sampled rows (0 = background).
    """
    gt_counts = [g.shape[0] for g in gt_boxes]
    proposal_counts = [p.shape[0] - g for p, g in zip(proposals_with_gt, gt_counts)]
    num_proposals = sum(proposal_counts)
    width = max([s.shape[0] for s in sampled] + [1])
    device = gt_boxes[0].device if gt_boxes else torch.device("cpu")
    indices = torch.full((len(sampled), width), -1, dtype=torch.int64, device=device)
    num_pos = []
    p_start = g_start = 0
    for b, (rows, lab) in enumerate(zip(sampled, labels)):
        positive = lab > 0
        rows = rows[torch.argsort((~positive).to(torch.int8), stable=True)]  # positives first, order kept
        n = proposal_counts[b]
        ids = torch.where(rows < n, p_start + rows, num_proposals + g_start + rows - n)
        indices[b, :ids.shape[0]] = ids
        num_pos.append(positive.sum())
        p_start += n
        g_start += gt_counts[b]
    weights = (indices >= 0).to(torch.float32)
    proposals = torch.cat([p[:n] for p, n in zip(proposals_with_gt, proposal_counts)])
    return SampledBatch(proposals.float(), proposal_counts, torch.cat(gt_boxes).float(), gt_counts, indices,
                        torch.stack(num_pos) if num_pos else torch.zeros(0, dtype=torch.int64), weights)


@dataclass
class SamplerDiagnostics:
    """Per sampled RoI of one batch (numpy, one entry per RoI, images in order).

    image: int, the RoI's image in the batch. positive: bool. iou_ge: IoU_g,e (for a positive IoU_g,p,
    for a negative IoU_g,n). key: IoU_p,n of a negative, the key of a positive. bin: its soft bin
    (``num_bins`` of them). weighted: whether its loss weight is not 1 (the ε-weighted positives).
    """

    image: np.ndarray
    positive: np.ndarray
    iou_ge: np.ndarray
    key: np.ndarray
    bin: np.ndarray
    weighted: np.ndarray
    num_images: int
    num_bins: int

    def histograms(self) -> dict[str, np.ndarray]:
        """The value lists worth a histogram, by name (TensorBoard tag suffix)."""
        neg, pos = ~self.positive, self.positive
        per_image = np.bincount(self.image[self.weighted & pos], minlength=self.num_images)
        return {"neg_iou_pn": self.key[neg], "neg_iou_ge": self.iou_ge[neg], "pos_iou_gp": self.iou_ge[pos],
                "pos_key": self.key[pos], "neg_bin": self.bin[neg].astype(np.float64),
                "pos_bin": self.bin[pos].astype(np.float64),
                "eps_weighted_per_image": per_image.astype(np.float64)}

    def summary(self) -> dict[str, float]:
        """Scalars of the batch (one CSV row): counts per image, means, the soft bins' counts per
        image and the share of the sampled negatives in each tenth of IoU_p,n (Figure 4)."""
        neg, pos = ~self.positive, self.positive
        images = max(self.num_images, 1)

        def mean(values):
            return float(values.mean()) if values.size else float("nan")

        row = {"images": float(self.num_images), "pos_per_image": pos.sum() / images,
               "neg_per_image": neg.sum() / images, "eps_weighted_per_image": (self.weighted & pos).sum() / images,
               "neg_iou_pn_mean": mean(self.key[neg]), "neg_iou_ge_mean": mean(self.iou_ge[neg]),
               "pos_iou_gp_mean": mean(self.iou_ge[pos]), "pos_key_mean": mean(self.key[pos])}
        for name, mask in (("neg", neg), ("pos", pos)):
            counts = np.bincount(self.bin[mask], minlength=self.num_bins)
            row.update({f"{name}_bin{k}_per_image": counts[k] / images for k in range(self.num_bins)})
        counts = histogram(self.key[neg])
        share = counts / max(int(neg.sum()), 1)
        row.update({f"{SHARE_PREFIX}{lo:.1f}_{hi:.1f}": float(s)
                    for lo, hi, s in zip(IOU_EDGES[:-1], IOU_EDGES[1:], share)})
        return {k: float(v) for k, v in row.items()}


def summary_columns(num_bins: int) -> list[str]:
    """The keys of :meth:`SamplerDiagnostics.summary`, in order, for ``num_bins`` bins."""
    empty = SamplerDiagnostics(*(np.zeros(0, dtype=t) for t in (np.int64, bool, float, float, np.int64, bool)),
                               num_images=0, num_bins=num_bins)
    return list(empty.summary())


def sampler_diagnostics(batch: SampledBatch, config: SamplerConfig) -> SamplerDiagnostics:
    """IoU_g,e, key and soft bin of every RoI of ``batch``, the flags positive / ε-weighted.

    ``config`` gives the thresholds, ``pos_key``, ``num_bins`` and ``bin_upper`` (the head's
    ``sampler_config()``). Computed on the boxes' device with ``max_iou`` and ``assign_bins`` (no
    IoU matrix), then read to the host in one transfer; on CUDA the ops' own value checks read the
    device too. Costs about one matching of the batch: call it at logging steps, not every step.
    """
    device = batch.proposals.device
    num_proposals = sum(batch.proposal_counts)
    # Per image, its examples as one block: its proposals, then its GT copies (docs/ops.md step 1).
    ids, starts = [], [0, 0]
    for n, g in zip(batch.proposal_counts, batch.gt_counts):
        ids += [torch.arange(starts[0], starts[0] + n), torch.arange(num_proposals + starts[1],
                                                                      num_proposals + starts[1] + g)]
        starts = [starts[0] + n, starts[1] + g]
    global_id = torch.cat(ids).to(device) if ids else torch.zeros(0, dtype=torch.int64, device=device)
    boxes = torch.cat([batch.proposals, batch.gt_boxes.to(batch.proposals.dtype)])[global_id]
    splits = splits_from_counts([n + g for n, g in zip(batch.proposal_counts, batch.gt_counts)], device)
    gt_splits = splits_from_counts(batch.gt_counts, device)
    is_copy = global_id >= num_proposals

    iou_ge, _ = max_iou(boxes, splits, batch.gt_boxes.to(boxes.dtype), gt_splits)
    positive = is_copy | (iou_ge >= config.fg_iou_thresh)
    negative = ~is_copy & (iou_ge < config.bg_iou_thresh)
    neg_key, _ = max_iou(boxes, splits, boxes, splits, query_mask=negative, key_mask=positive)
    if config.pos_key == "all":
        pos_key, _ = max_iou(boxes, splits, boxes, splits, query_mask=positive, exclude_self=True)
    else:
        pos_key, _ = max_iou(boxes, splits, boxes, splits, query_mask=positive, key_mask=negative)
    # The op bins its keys as doubles.
    neg_bin = assign_bins(neg_key.double(), splits, mask=negative, num_bins=config.num_bins, upper=config.bin_upper)
    pos_bin = assign_bins(pos_key.double(), splits, mask=positive, num_bins=config.num_bins, upper=config.bin_upper)

    # The sampled RoIs, slot by slot of the op's [B, W] layout.
    local = torch.empty(boxes.shape[0], dtype=torch.int64, device=device)
    local[global_id] = torch.arange(boxes.shape[0], device=device)
    indices = batch.indices
    valid = indices >= 0
    rows = local[indices.clamp(min=0)] if boxes.shape[0] else torch.zeros_like(indices)
    column = torch.arange(indices.shape[1], device=device)
    slot_pos = valid & (column[None, :] < batch.num_pos.to(device)[:, None])
    if boxes.shape[0] == 0:  # nothing sampled anywhere: every slot is padding
        zeros = torch.zeros(indices.shape, dtype=torch.float64, device=device)
        iou, key, bins = zeros, zeros, zeros
    else:
        iou = iou_ge.double()[rows]
        key = torch.where(slot_pos, pos_key.double()[rows], neg_key.double()[rows])
        bins = torch.where(slot_pos, pos_bin[rows], neg_bin[rows]).double()
    image = torch.arange(indices.shape[0], device=device)[:, None].expand_as(indices).double()
    table = torch.stack([valid.double(), slot_pos.double(), image, iou, key, bins,
                         (batch.weights.to(device) != 1.0).double()], dim=-1)
    table = table.reshape(-1, table.shape[-1]).cpu().numpy()  # the one read of the device
    table = table[table[:, 0] > 0]
    return SamplerDiagnostics(image=table[:, 2].astype(np.int64), positive=table[:, 1] > 0, iou_ge=table[:, 3],
                              key=table[:, 4], bin=table[:, 5].astype(np.int64), weighted=table[:, 6] > 0,
                              num_images=int(indices.shape[0]), num_bins=int(config.num_bins))
