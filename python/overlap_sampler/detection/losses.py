"""Fast R-CNN loss with a weight per sampled RoI (the paper's ε reweighting)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def weighted_fastrcnn_loss(
    class_logits: torch.Tensor,
    box_regression: torch.Tensor,
    labels: list[torch.Tensor],
    regression_targets: list[torch.Tensor],
    weights: list[torch.Tensor],
    box_weights: Optional[list[torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``fastrcnn_loss`` with each RoI's loss multiplied by its weight.

    Args:
        class_logits: ``[R, C]`` classifier logits of the R sampled RoIs of the
            batch (C classes, background 0 included).
        box_regression: ``[R, 4 * C]`` class-specific box deltas.
        labels: per image, int64 ``[R_i]`` (0 = background); ``sum R_i = R``.
        regression_targets: per image, ``[R_i, 4]`` encoded deltas (only rows
            of positives are read).
        weights: per image, float ``[R_i]``: ε for the best sampled positive
            of each GT, 1 otherwise (or the sampler's weights).
        box_weights: per image, float ``[R_i]`` weights of the box loss, when
            they differ from ``weights`` (PISA's ISR-P reweights only the
            classification of positives); None = ``weights``.

    Returns:
        ``(classifier_loss, box_loss)`` scalars. classifier: sum over RoIs of
        ``w * CE``; box: sum over positives of ``w * smooth_l1(beta=1/9)`` of
        the 4 deltas of the RoI's class; both divided by R, the number of
        sampled RoIs, as torchvision normalises (the weights do not change the
        normaliser, so ε > 1 raises the share of the best positives). With all
        weights 1 it equals ``torchvision.models.detection.roi_heads.fastrcnn_loss``.
        An empty batch (R = 0) gives zero losses, not NaN.
        TorchScript-compatible.
    """
    labels_all = torch.cat(labels, dim=0)
    targets_all = torch.cat(regression_targets, dim=0)
    # float32 even under autocast: a float16 ε would be rounded (1.1 -> 1.0996).
    weights_all = torch.cat(weights, dim=0).to(torch.float32)
    num_rois = class_logits.shape[0]
    box_regression = box_regression.reshape(num_rois, box_regression.size(-1) // 4, 4)
    if labels_all.numel() == 0:
        # Nothing sampled in the whole batch: zero losses that still reach the
        # parameters (torchvision would return NaN from a mean over nothing).
        zero = class_logits.sum() * 0.0 + box_regression.sum() * 0.0
        return zero, zero.clone()

    # Written as torchvision's unweighted loss plus the extra (w - 1) share, so
    # that all-ones weights give torchvision's value bit for bit (the extra
    # term is then exactly 0); mathematically it is sum(w * loss) / R.
    normaliser = float(labels_all.numel())
    per_roi = F.cross_entropy(class_logits, labels_all, reduction="none")
    classification_loss = F.cross_entropy(class_logits, labels_all) + (
        (weights_all - 1.0) * per_roi).sum() / normaliser

    pos = torch.where(labels_all > 0)[0]
    labels_pos = labels_all[pos]
    per_coord = F.smooth_l1_loss(box_regression[pos, labels_pos], targets_all[pos], beta=1 / 9,
                                 reduction="none")
    box_weights_all = weights_all if box_weights is None else torch.cat(box_weights, dim=0).to(torch.float32)
    box_loss = (per_coord.sum() + ((box_weights_all[pos] - 1.0)[:, None] * per_coord).sum()) / normaliser
    return classification_loss, box_loss
