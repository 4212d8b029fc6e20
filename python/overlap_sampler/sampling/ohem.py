"""Online hard example mining (OHEM): keep the training examples the current RoI head finds hardest.

Two variants, both over the examples of an :class:`~.examples.ExampleBatch` (proposals and GT copies;
positives are label 1, negatives label 0, ignored examples (-1) are never candidates), both scoring every
candidate with one no-grad forward of the RoI head (the ``scorer``) and giving every pick weight 1.

``variant="paper"`` -- Shrivastava, Gupta, Girshick, "Training Region-based Object Detectors with Online Hard
Example Mining", CVPR 2016, as released in abhi2610/ohem (``lib/roi_data_layer/{layer,minibatch}.py``):

1. loss_i = CE_i + [label_i > 0] * sum over the 4 deltas of class label_i of smoothL1_{beta=1}(pred - target),
   targets normalised by the box coder's weights (torchvision's ``(10, 10, 5, 5)`` equals the reference's
   BBOX_NORMALIZE_STDS ``(.1, .1, .2, .2)``).
2. NMS with the loss as the score at IoU ``nms_thresh`` (0.7), run per image x per label as the reference code
   does (``class_agnostic_nms=True``: per image only, as the paper's text reads; ``None``: no NMS).
3. The ``num_images * batch_size_per_image`` highest-loss survivors of the whole batch are kept: the reference
   takes the top BATCH_SIZE RoIs of its minibatch, so the budget is shared by the images and one image may
   get more than ``batch_size_per_image`` picks. There is no positive fraction.

``variant="mmdet"`` -- mmdetection ``OHEMSampler`` (config ``faster-rcnn_r50_fpn_ohem_1x_coco.py``), per image:
``q+ = int(batch_size_per_image * positive_fraction)``; all positives if there are at most ``q+``, else the ``q+``
with the highest CE against their class; then the ``q- = batch_size_per_image - #positives taken`` negatives with
the highest CE against the background. No box loss, no NMS.

Where we depart from the sources, and why:

* CE is ``F.cross_entropy`` (log-softmax). The reference clamps ``p`` at ``FLT_MIN`` before the log
  (``-log(max(p, eps))``); the two agree whenever ``p >= FLT_MIN`` (a loss below ~87.3) and beyond that the clamp
  only turns distinct losses into ties, which no source orders.
* NMS is ``torchvision.ops.batched_nms`` with torchvision's continuous IoU (area ``(x2-x1)*(y2-y1)``); the
  reference's py-faster-rcnn NMS uses "+1 pixel" areas. Both suppress IoU strictly above the threshold. The
  continuous IoU is the one the rest of this library (matching, the Overlap Sampler) uses.
* Ties in the loss are ordered by example row (stable sorts); every source leaves them unordered.
* The reference keeps dropout on during the scoring pass; here the scorer is whatever the RoI head passes in.
* torchvision puts the background at class 0 (mmdetection: the last class); "CE vs background" is CE with
  target 0.

Everything runs on the whole batch at once: one scorer call, one ``batched_nms`` and segment top-k by stable sorts
on composite keys (no per-image Python loop), on the device of the batch.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from ..ops import SampleResult
from .examples import ExampleBatch, pack_selection, segment_rank

Scorer = Callable[[Tensor], Tuple[Tensor, Tensor]]

VARIANTS = ("paper", "mmdet")


def ohem_losses(class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor, *,
                box_loss: bool) -> Tensor:
    """Per-example OHEM loss, without grad.

    Args:
        class_logits: float ``[K, C+1]``, class 0 = background (torchvision).
        box_regression: float ``[K, 4*(C+1)]``, class-specific deltas ``(dx, dy, dw, dh)`` per class, normalised
            as the box coder encodes them.
        labels: int64 ``[K]`` in ``0..C``: the class each example is scored against (0 for negatives).
        regression_targets: float ``[K, 4]``, encoded targets (only rows with ``label > 0`` are read).
        box_loss: add the box term (paper/abhi2610 ``loss_cls + loss_bbox``); False: CE only (mmdetection).

    Returns:
        float32 ``[K]``: ``CE_i = -log softmax(class_logits_i)[label_i]``, plus, when ``box_loss`` and
        ``label_i > 0``, ``sum_j smoothL1_{beta=1}(box_regression_i[label_i, j] - regression_targets_i[j])``.
        Computed in float32 whatever the input dtype (the scorer may run under autocast).
    """
    if class_logits.dim() != 2 or class_logits.shape[1] < 1:
        raise ValueError(f"class_logits must be [K, C+1], got {tuple(class_logits.shape)}")
    num, num_classes = class_logits.shape
    if labels.shape != (num,):
        raise ValueError(f"labels must be [K] = [{num}], got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if box_regression.shape != (num, 4 * num_classes):
        raise ValueError(f"box_regression must be [K, 4*(C+1)] = [{num}, {4 * num_classes}], "
                         f"got {tuple(box_regression.shape)}")
    if regression_targets.shape != (num, 4):
        raise ValueError(f"regression_targets must be [K, 4] = [{num}, 4], got {tuple(regression_targets.shape)}")
    labels = labels.to(torch.int64)
    if num and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    with torch.no_grad():
        loss = F.cross_entropy(class_logits.float(), labels, reduction="none")
        if box_loss:
            deltas = box_regression.float().reshape(num, num_classes, 4)
            own = deltas[torch.arange(num, device=deltas.device), labels]
            box = F.smooth_l1_loss(own, regression_targets.float(), beta=1.0, reduction="none").sum(dim=1)
            loss = loss + torch.where(labels > 0, box, torch.zeros_like(box))
    return loss


def _check_args(batch_size_per_image: int, positive_fraction: float, variant: str,
                nms_thresh: Optional[float]) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, int) \
            or batch_size_per_image < 1:
        raise ValueError(f"batch_size_per_image must be an int >= 1, got {batch_size_per_image!r}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must lie in [0, 1], got {positive_fraction!r}")
    if nms_thresh is not None:
        if variant == "mmdet":
            raise ValueError(f"nms_thresh must be None with variant='mmdet' (mmdetection's OHEMSampler has no "
                             f"NMS), got {nms_thresh!r}")
        if not (0.0 < nms_thresh <= 1.0):  # also rejects NaN
            raise ValueError(f"nms_thresh must lie in (0, 1] or be None, got {nms_thresh!r}")


def _select_paper(batch: ExampleBatch, rows: Tensor, loss: Tensor, labels: Tensor, num_classes: int,
                  batch_size_per_image: int, nms_thresh: Optional[float], class_agnostic_nms: bool) -> Tensor:
    """Paper/abhi2610: NMS by loss, then the batch's top ``B * batch_size_per_image`` losses. Picks, loss desc."""
    image = batch.image[rows]
    if nms_thresh is None:
        survivors = torch.argsort(loss, descending=True, stable=True)
    else:
        group = image if class_agnostic_nms else image * num_classes + labels
        # batched_nms returns the kept indices by score desc; a stable re-sort fixes the order of equal losses.
        keep = batched_nms(batch.boxes[rows], loss, group, float(nms_thresh))
        survivors = keep[torch.argsort(loss[keep], descending=True, stable=True)]
    return rows[survivors[: batch.num_images * batch_size_per_image]]


def _select_mmdet(batch: ExampleBatch, rows: Tensor, loss: Tensor, batch_size_per_image: int,
                  positive_fraction: float) -> Tensor:
    """mmdetection OHEMSampler: per image top ``q+`` positives, then top ``q-`` negatives, by CE."""
    num_images = batch.num_images
    image = batch.image[rows]
    negative = (batch.label[rows] == 0).to(torch.int64)
    segment = image * 2 + negative  # (image, positive) segments first, then (image, negative)
    rank = segment_rank([segment], [-loss])  # loss descending, equal losses in row order
    q_pos = int(batch_size_per_image * positive_fraction)
    positives_per_image = torch.bincount(image[negative == 0], minlength=num_images)
    q_neg = batch_size_per_image - torch.clamp(positives_per_image, max=q_pos)
    quota = torch.where(negative == 1, q_neg[image], torch.full_like(image, q_pos))
    chosen = torch.where(rank < quota)[0]
    chosen = chosen[torch.argsort(segment[chosen] * max(rows.numel(), 1) + rank[chosen])]
    return rows[chosen]


def ohem_select(batch: ExampleBatch, scorer: Scorer, box_coder, batch_size_per_image: int = 512,
                positive_fraction: float = 0.25, *, variant: str = "paper", nms_thresh: Optional[float] = 0.7,
                class_agnostic_nms: bool = False) -> SampleResult:
    """Pick each image's RoI-head training examples by their current loss (OHEM).

    Args:
        batch: the batch's examples (proposals then GT copies); candidates are its positives (label 1, GT
            copies included) and negatives (label 0).
        scorer: ``scorer(rows) -> (class_logits [K, C+1], box_regression [K, 4*(C+1)])`` for int64 example rows
            ``[K]``, without grad; called once with every candidate row (ascending), not called when there is
            no candidate.
        box_coder: encodes the regression targets of positives (``encode_single(gt_boxes, boxes)``, torchvision
            ``BoxCoder``); used by ``variant="paper"`` only.
        batch_size_per_image: paper: the batch keeps ``num_images * batch_size_per_image`` examples in all;
            mmdet: examples per image.
        positive_fraction: mmdet only: at most ``int(batch_size_per_image * positive_fraction)`` positives per
            image. The paper variant has no positive fraction and ignores it.
        variant: ``"paper"`` (Shrivastava et al. 2016 / abhi2610/ohem) or ``"mmdet"`` (mmdetection
            OHEMSampler); see the module docstring.
        nms_thresh: paper only: NMS IoU threshold in (0, 1] (IoU strictly above it suppresses), None for no NMS.
            Must be None with ``variant="mmdet"``.
        class_agnostic_nms: paper only: NMS per image instead of per image x label. Ignored without NMS.

    Labels for the loss: a positive's GT class ``gt_labels[matched_gt]``, 0 for a negative. Regression targets
    (paper): ``box_coder.encode_single(gt_boxes[matched_gt], boxes)`` for positives.

    Returns:
        :class:`SampleResult` with ``B`` rows: per image its picks, positives first, each part by loss desc
        (ties by row); weights 1. Width: mmdet ``batch_size_per_image``; paper the largest per-image pick
        count (at least 1), which may exceed ``batch_size_per_image`` since the budget is shared.
    """
    _check_args(batch_size_per_image, positive_fraction, variant, nms_thresh)
    device = batch.boxes.device
    rows = torch.nonzero(batch.label >= 0).reshape(-1)
    num = rows.shape[0]
    if num == 0:
        picks = rows
    else:
        logits, regression = scorer(rows)
        if logits.dim() != 2 or logits.shape[0] != num:
            raise ValueError(f"scorer must return class_logits [K, C+1] with K = {num}, "
                             f"got {tuple(logits.shape)}")
        num_classes = logits.shape[1]
        positive = batch.label[rows] == 1
        gt = batch.matched_gt[rows].clamp(min=0)
        if positive.any() and batch.gt_labels.numel() == 0:
            raise ValueError("batch has positives but no gt_labels")
        labels = torch.where(positive, batch.gt_labels[gt] if batch.gt_labels.numel() else torch.zeros_like(gt),
                             torch.zeros_like(gt))
        box_loss = variant == "paper"
        targets = torch.zeros(num, 4, dtype=torch.float32, device=device)
        if box_loss and bool(positive.any()):
            pos = torch.nonzero(positive).reshape(-1)
            targets[pos] = box_coder.encode_single(batch.gt_boxes[gt[pos]], batch.boxes[rows[pos]]).float()
        try:
            loss = ohem_losses(logits, regression, labels, targets, box_loss=box_loss)
        except ValueError as err:
            raise ValueError(f"scorer output or batch labels do not fit: {err}") from err
        if variant == "paper":
            picks = _select_paper(batch, rows, loss, labels, num_classes, batch_size_per_image, nms_thresh,
                                  class_agnostic_nms)
        else:
            picks = _select_mmdet(batch, rows, loss, batch_size_per_image, positive_fraction)
    if variant == "mmdet":
        width = batch_size_per_image
    else:
        per_image = torch.bincount(batch.image[picks], minlength=batch.num_images)
        width = max(1, int(per_image.max())) if batch.num_images else 1
    weights = torch.ones(picks.shape[0], dtype=torch.float32, device=device)
    return pack_selection(batch, picks, weights, width)
