"""PISA's importance-based sample reweighting: ISR-N (Score-HLR negatives), ISR-P (IoU-HLR positives), CARL.

Cao et al., "Prime Sample Attention in Object Detection" (CVPR 2020; **P**), as mmdetection implements it
(``ScoreHLRSampler``, ``mmdet/models/losses/pisa_loss.py``: ``isr_p``, ``carl_loss``; **MM**), specified in
``design/rivals.md`` section 4. The mapping shared by all three parts is ``w = (bias + (1 - bias) * u)^k`` of
a normalised rank ``u`` in ``(0, 1]``.

* :func:`isr_select` (ISR-N, a sampler): uniform positives, then per image the negatives ranked by
  Score-HLR and weighted. Returns the batch's picks in the RoI head's :class:`SampleResult` layout.
* :func:`isr_p_weights` (ISR-P, in the loss): classification weights of the sampled positives by IoU-HLR.
* :func:`carl_loss` (CARL, an extra loss): the box loss of the positives re-weighted by their GT-class
  probability, the weights carrying gradient.
* :func:`score_hlr_rank`: the two-step Score-HLR rank (``nms_match`` groups) on its own.

Where the sources differ, or MM has a quirk (rivals.md section 5), this module does the following:

* Score-HLR follows MM throughout (P gives no numbers: score threshold, IoU threshold, how many are
  drawn at random when too few are valid): weights even when ``n <= q-`` (no early return), the random picks
  of invalid negatives get the smallest ``u`` taken, ``U = max(q, |V|)``, class-specific deltas of the
  negative's top fg class decoded with the detector's own ``box_coder``.
* ``nms_match``: MM runs the greedy grouping on the CPU in float32 with ``IoU >= iou_thr``. Here the group
  leaders are the keepers of ``torchvision.ops.nms`` (the same greedy pass), at a threshold one float32 step
  below the smallest float32 >= ``iou_thresh``, so that torchvision's ``IoU > thr`` on float32 IoUs means
  exactly ``IoU >= iou_thresh`` on CPU and CUDA alike. Every other box joins the earliest-visited leader with
  IoU >= ``iou_thresh`` (the one that absorbed it in the greedy pass). That is one ``nms`` call per image:
  ``batched_nms`` would shift each image's boxes by an offset, which rounds float32 coordinates (changing
  which IoUs sit exactly on the threshold) and, with its offset ``max + 1``, lets images overlap when decoded
  boxes reach below -1. The loop over images runs the grouping only (nms, then a vectorised leader
  assignment); scores, ranks, picks and weights are computed for the whole batch at once.
* Ranks: MM sorts ``imp = |V| - rho + s`` (Score-HLR) and ``IoU + n_max - rho`` (IoU-HLR) in float32, where
  large ``|V|`` or ``n_max`` round away the differences of close scores/IoUs. Here the same order is taken
  lexicographically (``rho`` ascending, then score/IoU descending), which equals the exact-arithmetic order of
  those keys (``s`` lies in ``(score_thresh, 1]``; an IoU tie 1 vs 0 across local ranks is the only case the
  key leaves tied). Remaining ties (equal scores or IoUs) are undefined in every source; here they go to the
  lower index.
* ISR-P GT ids: MM offsets each image's GT indices by the previous image's largest sampled index + 1, not
  cumulatively, so from the third image on, GTs of different images can share an id (and a local rank).
  :func:`isr_p_weights` takes one global id per GT instead (the RoI head's global GT row), which is the
  paper's per-GT ranking. MM's IoU is against the decoded regression target; here against the GT box itself
  (the same box up to encode/decode rounding). MM's hard-coded 80 classes (old versions) are not reproduced.
* Normalisation ``w <- w * sum(CE) / sum(w * CE)``: MM divides by zero when every CE of the set is exactly 0
  (float32 softmax saturates); here the ratio is then 1 (the weighted loss is 0 whatever the ratio).
* CARL follows MM: weights not detached (gradient flows through ``c`` and its normalisation), box loss
  normalised by all sampled RoIs of the batch; 0 (still attached to the graph) without positives.

Randomness: one float64 uniform per example row, drawn with ``generator`` (on the boxes' device); a uniform
pick of ``m`` out of a set takes the ``m`` members with the smallest uniforms. Labels follow torchvision:
class 0 is the background, fg classes are 1..C.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from ..ops import SampleResult
from .examples import ExampleBatch, pack_selection, segment_rank

Scorer = Callable[[Tensor], Tuple[Tensor, Tensor]]

__all__ = ["isr_select", "isr_p_weights", "carl_loss", "score_hlr_rank", "importance_mapping"]


# ---------------------------------------------------------------------------------------------- checks

def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_unit(name: str, value: float) -> None:
    if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_mapping(k: float, bias: float) -> None:
    if not _is_number(k) or not 0.0 <= float(k) < math.inf:
        raise ValueError(f"k must be a finite number >= 0, got {k!r}")
    _check_unit("bias", bias)


def _check_head_outputs(name: str, class_logits: Tensor, box_regression: Tensor, rows: int) -> int:
    """The number of fg classes C of ``class_logits [rows, C+1]`` / ``box_regression [rows, 4(C+1)]``."""
    if class_logits.dim() != 2 or class_logits.shape[0] != rows or class_logits.shape[1] < 2:
        raise ValueError(f"{name}: class_logits must be [{rows}, C+1] with C >= 1, got {tuple(class_logits.shape)}")
    width = 4 * class_logits.shape[1]
    if box_regression.dim() != 2 or tuple(box_regression.shape) != (rows, width):
        raise ValueError(f"{name}: box_regression must be [{rows}, {width}] (class-specific deltas, 4 per class "
                         f"incl. background), got {tuple(box_regression.shape)}")
    return class_logits.shape[1] - 1


# --------------------------------------------------------------------------------------------- helpers

def importance_mapping(u: Tensor, k: float, bias: float) -> Tensor:
    """PISA's non-linear mapping ``(bias + (1 - bias) * u)^k`` (P Eq. 3-4, MM), elementwise, any shape."""
    return (bias + (1.0 - bias) * u).pow(k)


def _loss_preserving_ratio(ce: Tensor, weights: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """Per segment ``sum(CE) / sum(w * CE)`` (float64 sums), 1 where the denominator is 0."""
    ce = ce.double()
    total = torch.zeros(num_segments, dtype=torch.float64, device=ce.device).index_add_(0, segment, ce)
    weighted = torch.zeros_like(total).index_add_(0, segment, ce * weights.double())
    return torch.where(weighted > 0, total / torch.where(weighted > 0, weighted, torch.ones_like(weighted)),
                       torch.ones_like(total))


def _uniform_pick(candidate: Tensor, segment: Tensor, quota: Tensor, uniforms: Tensor) -> Tensor:
    """bool ``[n]``: ``min(quota[seg], |seg|)`` members of each segment, uniformly (smallest uniforms).

    ``candidate``: bool ``[n]`` which elements may be picked; ``segment``: int64 ``[n]``; ``quota``: int64 per
    segment; ``uniforms``: ``[n]``.
    """
    picked = torch.zeros_like(candidate)
    idx = candidate.nonzero().squeeze(1)
    if idx.numel():
        rank = segment_rank([segment[idx]], [uniforms[idx]])
        picked[idx] = rank < quota[segment[idx]]
    return picked


def _ceil_float32(x: float) -> float:
    """The smallest float32 value >= ``x``."""
    t = torch.tensor(x, dtype=torch.float32)
    if float(t) < x:
        t = torch.nextafter(t, torch.tensor(math.inf))
    return float(t)


def _pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU ``[len(a), len(b)]`` without +1, with the arithmetic of torchvision's nms kernels."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (no +1), 0 where both boxes are degenerate."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return torch.nan_to_num(inter / (area_a + area_b - inter), nan=0.0)


def _nms_match_leaders(boxes: Tensor, scores: Tensor, iou_thresh: float) -> Tensor:
    """Group leader (local index) of every box of one image, greedy ``nms_match`` with IoU >= ``iou_thresh``.

    Leaders are NMS keepers; a non-leader joins the earliest-visited leader (highest score, nms order) with
    IoU >= thr and score >= its own. Should float rounding of another IoU kernel (CUDA contracting the area
    products into FMAs) leave a suppressed box with no such leader, it joins the leader it overlaps most.
    """
    t = _ceil_float32(iou_thresh)
    t_nms = float(torch.nextafter(torch.tensor(t, dtype=torch.float32), torch.tensor(-math.inf)))
    keep = torchvision.ops.nms(boxes, scores, t_nms)  # visit order: score descending
    leader = torch.arange(scores.shape[0], device=scores.device)
    is_leader = torch.zeros_like(leader, dtype=torch.bool)
    is_leader[keep] = True
    members = (~is_leader).nonzero().squeeze(1)
    if members.numel():
        iou = _pairwise_iou(boxes[keep], boxes[members])  # [L, n - L]
        absorbs = (iou >= t) & (scores[keep][:, None] >= scores[members][None, :])
        # argmax returns the first maximum: the earliest absorbing leader, else the most overlapping one
        key = torch.where(absorbs, torch.full_like(iou, 2.0), torch.nan_to_num(iou, nan=-1.0))
        leader[members] = keep[torch.argmax(key, dim=0)]
    return leader


# ---------------------------------------------------------------------------------------------- ISR-N

def score_hlr_rank(boxes: Tensor, scores: Tensor, image: Tensor, num_images: int,
                   iou_thresh: float = 0.5) -> "tuple[Tensor, Tensor]":
    """Score-HLR of the valid negatives of a batch (rivals.md section 4 steps 4-5; P Sec. 3.1, MM).

    Args:
        boxes: float ``[n, 4]`` (x1, y1, x2, y2) decoded boxes; scores: float ``[n]`` fg scores ``s``;
            image: int64 ``[n]`` image of each box (any order).
        num_images: number of images ``B`` (``image < B``).
        iou_thresh: ``nms_match`` groups, class-agnostic and per image, absorb IoU >= ``iou_thresh`` (no +1).

    Returns ``(rho, rank)``, int64 ``[n]``: ``rho`` the local rank in the box's ``nms_match`` group (0 = the
    leader, then by score descending), ``rank`` the Score-HLR ``R`` within its image: the order of
    ``imp = |V| - rho + s`` descending, i.e. ``rho`` ascending, then ``s`` descending.
    """
    n = scores.shape[0]
    device = scores.device
    leader = torch.empty(n, dtype=torch.int64, device=device)
    if n:
        by_image = torch.argsort(image, stable=True)
        counts = torch.bincount(image, minlength=num_images).tolist()
        start = 0
        # One nms per image: see the module docstring (exact ">=" needs unshifted float32 boxes).
        for count in counts:
            if count:
                local = by_image[start:start + count]
                leader[local] = local[_nms_match_leaders(boxes[local].float(), scores[local].float(), iou_thresh)]
            start += count
    is_member = (leader != torch.arange(n, device=device)).to(torch.int64)
    rho = segment_rank([leader], [is_member, -scores])
    rank = segment_rank([image], [rho, -scores])
    return rho, rank


def _check_select_args(batch_size_per_image, positive_fraction, k, bias, score_thresh, iou_thresh) -> None:
    if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, int) \
            or batch_size_per_image < 1:
        raise ValueError(f"batch_size_per_image must be an integer >= 1, got {batch_size_per_image!r}")
    _check_unit("positive_fraction", positive_fraction)
    _check_mapping(k, bias)
    _check_unit("score_thresh", score_thresh)
    _check_unit("iou_thresh", iou_thresh)


def isr_select(batch: ExampleBatch, scorer: Scorer, box_coder, batch_size_per_image: int = 512,
               positive_fraction: float = 0.25, *, k: float = 0.5, bias: float = 0.0, score_thresh: float = 0.05,
               iou_thresh: float = 0.5, generator: Optional[torch.Generator] = None) -> SampleResult:
    """PISA's ``ScoreHLRSampler`` (ISR-N) on a whole batch: rivals.md section 4, MM defaults.

    Per image, with ``W = batch_size_per_image``:

    1. Positives (``label == 1``, GT copies included): ``q+ = int(W * positive_fraction)`` uniformly (all if
       fewer), weight 1.
    2. Negatives (``label == 0``), ``n`` of them, ``q = min(n, W - #positives taken)`` are kept. ``scorer`` is
       called once with every negative row of the batch; ``s`` = max softmax probability over classes 1..C,
       ``c`` its class, ``CE`` the cross entropy against class 0. Valid ``V = {s > score_thresh}``,
       ``h = min(|V|, q)``, ``r = q - h``.
    3. Valid boxes are decoded with ``box_coder.decode_single`` from the class-``c`` deltas and ranked by
       Score-HLR (:func:`score_hlr_rank`); the ``h`` best are kept, plus ``r`` invalid negatives uniformly.
    4. ``U = max(q, |V|)``, ``u = (U - R) / U``; the random picks get the smallest ``u`` taken; weights
       ``w = (bias + (1 - bias) u)^k``, scaled so that ``sum(w * CE) = sum(CE)`` over the ``q`` kept.
       With ``V`` empty: ``q`` uniform negatives, weights 1.

    Args:
        batch: the batch's examples (:class:`ExampleBatch`).
        scorer: ``scorer(rows int64 [K]) -> (class_logits [K, C+1], box_regression [K, 4(C+1)])`` of the box
            head on those example rows (no grad needed; outputs are detached and read as float32).
        box_coder: the head's box coder (torchvision ``BoxCoder``), used for ``decode_single(deltas, boxes)``.
        batch_size_per_image: ``W`` (>= 1); positive_fraction: in [0, 1].
        k, bias: mapping (k >= 0, bias in [0, 1]); score_thresh: in [0, 1]; iou_thresh: in [0, 1].
        generator: source of the uniforms (a ``torch.Generator`` on the boxes' device).

    Returns a :class:`SampleResult` ``[B, W]``: per image its positives (weight 1), then its negatives in
    Score-HLR order followed by the random picks, with their ISR-N weights (float32).
    Raises ``ValueError`` naming a bad argument or a scorer output of the wrong shape.
    """
    _check_select_args(batch_size_per_image, positive_fraction, k, bias, score_thresh, iou_thresh)
    device = batch.boxes.device
    num_images = batch.num_images
    width = batch_size_per_image
    uniforms = torch.rand(batch.boxes.shape[0], dtype=torch.float64, device=device, generator=generator)

    positive = batch.label == 1
    q_pos = torch.full((num_images,), int(width * positive_fraction), dtype=torch.int64, device=device)
    pos_taken = _uniform_pick(positive, batch.image, q_pos, uniforms)
    pos_rows = pos_taken.nonzero().squeeze(1)
    num_pos = torch.bincount(batch.image[pos_rows], minlength=num_images)

    neg_rows = (batch.label == 0).nonzero().squeeze(1)
    rows, weights = _select_negatives(batch, neg_rows, width - num_pos, scorer, box_coder, uniforms,
                                      k=k, bias=bias, score_thresh=score_thresh, iou_thresh=iou_thresh)
    rows = torch.cat([pos_rows, rows])
    weights = torch.cat([torch.ones(pos_rows.shape[0], dtype=torch.float32, device=device), weights])
    return pack_selection(batch, rows, weights, width)


def _select_negatives(batch: ExampleBatch, neg_rows: Tensor, q_neg: Tensor, scorer: Scorer, box_coder,
                      uniforms: Tensor, *, k: float, bias: float, score_thresh: float,
                      iou_thresh: float) -> "tuple[Tensor, Tensor]":
    """ISR-N steps 1-7 for every image at once: the kept negative rows and their weights (float32)."""
    device = batch.boxes.device
    num_images = batch.num_images
    n = neg_rows.shape[0]
    if n == 0:
        return neg_rows, torch.zeros(0, dtype=torch.float32, device=device)
    with torch.no_grad():
        class_logits, box_regression = scorer(neg_rows)
    class_logits = class_logits.detach().float()
    box_regression = box_regression.detach().float()
    _check_head_outputs("scorer", class_logits, box_regression, n)
    image = batch.image[neg_rows]

    ce = F.cross_entropy(class_logits, torch.zeros(n, dtype=torch.int64, device=device), reduction="none")
    score, cls = torch.softmax(class_logits, dim=1)[:, 1:].max(dim=1)
    cls = cls + 1
    valid = score > score_thresh
    count = torch.bincount(image, minlength=num_images)
    num_valid = torch.bincount(image[valid], minlength=num_images)
    q = torch.minimum(count, q_neg)
    h = torch.minimum(num_valid, q)
    upper = torch.maximum(q, num_valid).clamp(min=1).double()  # U; clamp only guards images that keep nothing

    # Valid negatives: decode with the top fg class's deltas, rank by Score-HLR, keep the h best.
    valid_idx = valid.nonzero().squeeze(1)
    deltas = box_regression.view(n, -1, 4)[valid_idx, cls[valid_idx]]
    decoded = box_coder.decode_single(deltas, batch.boxes[neg_rows[valid_idx]].float())
    _, rank = score_hlr_rank(decoded, score[valid_idx], image[valid_idx], num_images, iou_thresh)
    valid_image = image[valid_idx]
    hlr = rank < h[valid_image]
    hlr_idx, hlr_rank = valid_idx[hlr], rank[hlr]
    order = torch.argsort(valid_image[hlr] * (n + 1) + hlr_rank, stable=True)  # image, then R
    hlr_idx, hlr_rank = hlr_idx[order], hlr_rank[order]
    hlr_u = (upper[image[hlr_idx]] - hlr_rank.double()) / upper[image[hlr_idx]]

    # Invalid negatives: r = q - h uniformly; u = the smallest u taken, 1 when V is empty.
    rand = _uniform_pick(~valid, image, q - h, uniforms[neg_rows])
    rand_idx = rand.nonzero().squeeze(1)
    rand_image = image[rand_idx]
    smallest_u = torch.where(num_valid > 0, (upper - (h - 1).double()) / upper, torch.ones_like(upper))
    rand_u = smallest_u[rand_image]

    kept = torch.cat([hlr_idx, rand_idx])
    kept_image = image[kept]
    mapped = importance_mapping(torch.cat([hlr_u, rand_u]), float(k), float(bias))
    ratio = _loss_preserving_ratio(ce[kept], mapped, kept_image, num_images)
    ratio = torch.where(num_valid > 0, ratio, torch.ones_like(ratio))  # V empty: weights 1 exactly
    weights = torch.where((num_valid > 0)[kept_image], mapped * ratio[kept_image], torch.ones_like(mapped))
    return neg_rows[kept], weights.float()


# ---------------------------------------------------------------------------------------------- ISR-P

def isr_p_weights(class_logits: Tensor, box_regression: Tensor, labels: Tensor, rois: Tensor, gt_boxes: Tensor,
                  gt_ids: Tensor, box_coder, *, k: float = 2.0, bias: float = 0.0) -> Tensor:
    """IoU-HLR classification weights of the batch's sampled positives (ISR-P; rivals.md section 4, MM).

    1. ``IoU_i`` = IoU (no +1) of ``decode(roi_i, deltas of class l_i)`` (detached) with its GT box.
    2. ``n_max`` = the largest number of positives of one class in the batch.
    3. Per class, per GT: local rank ``rho`` by IoU descending; ``R`` = rank within the class by
       ``IoU + n_max - rho`` descending (taken as ``rho`` ascending, then IoU descending).
    4. ``u = (n_max - R) / n_max``, ``w = (bias + (1 - bias) u)^k``, scaled so that ``sum(w * CE) = sum(CE)``
       over all positives (``CE`` with the positive's class, from the detached logits).

    Args (``P`` rows, the batch's sampled positives only, GT copies included):
        class_logits: float ``[P, C+1]``; box_regression: float ``[P, 4(C+1)]`` (both detached here).
        labels: int64 ``[P]`` classes 1..C; rois: float ``[P, 4]`` the sampled boxes; gt_boxes: float ``[P, 4]``
            each positive's matched GT box; gt_ids: int ``[P]`` a GT id unique across the batch (e.g. the
            global GT row). MM's per-image offsets are not cumulative, so from 3 images on its GTs of
            different images can share an id; global ids fix that.
        box_coder: the head's box coder (``decode_single``).
        k: >= 0 (MM/PISA default 2); bias: in [0, 1].

    Returns float32 ``[P]`` weights (empty for ``P = 0``). Box-loss weights are not touched.
    Raises ``ValueError`` naming a bad argument (shapes, labels out of 1..C, k, bias).
    """
    _check_mapping(k, bias)
    class_logits = class_logits.detach().float()
    box_regression = box_regression.detach().float()
    count = labels.shape[0] if labels.dim() == 1 else -1
    if count < 0:
        raise ValueError(f"labels must be 1-D [P], got {tuple(labels.shape)}")
    num_classes = _check_head_outputs("isr_p_weights", class_logits, box_regression, count)
    for name, tensor, shape in (("rois", rois, (count, 4)), ("gt_boxes", gt_boxes, (count, 4)),
                                ("gt_ids", gt_ids, (count,))):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {tuple(tensor.shape)}")
    if count == 0:
        return torch.zeros(0, dtype=torch.float32, device=class_logits.device)
    labels = labels.to(torch.int64)
    low, high = torch.aminmax(labels)
    if int(low) < 1 or int(high) > num_classes:
        raise ValueError(f"labels must be fg classes in 1..{num_classes}, got values in [{int(low)}, {int(high)}]")

    deltas = box_regression.view(count, -1, 4)[torch.arange(count, device=labels.device), labels]
    regressed = box_coder.decode_single(deltas, rois.detach().float())
    iou = _aligned_iou(regressed, gt_boxes.detach().float())
    n_max = torch.bincount(labels).max().double()
    rho = segment_rank([labels, gt_ids.to(torch.int64)], [-iou])
    rank = segment_rank([labels], [rho, -iou])
    mapped = importance_mapping((n_max - rank.double()) / n_max, float(k), float(bias))
    ce = F.cross_entropy(class_logits, labels, reduction="none")
    ratio = _loss_preserving_ratio(ce, mapped, torch.zeros_like(labels), 1)
    return (mapped * ratio).float()


# ----------------------------------------------------------------------------------------------- CARL

def carl_loss(class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor,
              num_rois: int, *, k: float = 1.0, bias: float = 0.2, beta: float = 1.0) -> Tensor:
    """Classification-aware regression loss (CARL; rivals.md section 4, P Eq. 6, MM ``carl_loss``).

    ``p_i`` = softmax probability of the GT class of positive ``i`` (with grad); ``c_i = (bias + (1-bias) p_i)^k``,
    ``c_i <- N_pos c_i / sum(c)`` (grad flows through ``c`` and the normalisation, as in MM);
    ``L = sum_i c_i * sum_4 SmoothL1_beta(d_i - t_i) / num_rois``.

    Args (``M`` sampled RoIs, any mix of positives and negatives):
        class_logits: float ``[M, C+1]``; box_regression: float ``[M, 4(C+1)]`` class-specific deltas.
        labels: int64 ``[M]``, 0 background, 1..C positives; regression_targets: float ``[M, 4]`` encoded targets.
        num_rois: ``N_rois``, all sampled RoIs of the batch (MM's ``avg_factor``); >= the number of positives
            and >= 1 when there are positives.
        k: >= 0 (MM 1); bias: in [0, 1] (MM 0.2); beta: SmoothL1 beta > 0 (PISA's config: 1.0).

    Returns a scalar: the extra loss, added to the usual box loss; 0 (attached to the graph) without positives.
    """
    _check_mapping(k, bias)
    if not _is_number(beta) or not 0.0 < float(beta) < math.inf:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if isinstance(num_rois, bool) or not isinstance(num_rois, int) or num_rois < 0:
        raise ValueError(f"num_rois must be an integer >= 0, got {num_rois!r}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [M], got {tuple(labels.shape)}")
    count = labels.shape[0]
    num_classes = _check_head_outputs("carl_loss", class_logits, box_regression, count)
    if tuple(regression_targets.shape) != (count, 4):
        raise ValueError(f"regression_targets must be [{count}, 4], got {tuple(regression_targets.shape)}")
    labels = labels.to(torch.int64)
    if count and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(f"labels must be in 0..{num_classes}")
    pos = (labels > 0).nonzero().squeeze(1)
    num_pos = pos.shape[0]
    if num_pos == 0:
        return class_logits[:0].sum() + box_regression[:0].sum()
    if num_rois < num_pos:
        raise ValueError(f"num_rois must count every sampled RoI (>= {num_pos} positives), got {num_rois}")
    pos_labels = labels[pos]
    dtype = torch.promote_types(class_logits.dtype, torch.float32)  # half precision computes in float32
    prob = torch.softmax(class_logits[pos].to(dtype), dim=1).gather(1, pos_labels[:, None]).squeeze(1)
    c = importance_mapping(prob, float(k), float(bias))
    c = c * (num_pos / c.sum())
    deltas = box_regression[pos].view(num_pos, -1, 4)[torch.arange(num_pos, device=pos.device), pos_labels]
    box = F.smooth_l1_loss(deltas.to(dtype), regression_targets[pos].to(dtype), beta=float(beta),
                           reduction="none").sum(dim=1)
    return (c * box).sum() / num_rois
