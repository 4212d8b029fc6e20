"""The rival samplers behind ``SamplerConfig.sampler``: one call from the RoI head for each.

``libra`` (:mod:`.libra`), ``ohem`` (:mod:`.ohem`) and ``isr`` (:mod:`.isr`) are written in PyTorch
over the whole batch; they take an :class:`~.examples.ExampleBatch` and return the ``sample`` op's
layout, so the head gathers their picks as it gathers the Overlap Sampler's. ``ohem`` and ``isr``
score the candidates with the detector's own box head (the head passes a ``scorer``); ``isr`` also
reweights the sampled positives once the box head has run (:func:`isr_loss_terms`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops import SampleResult
from .config import SamplerConfig
from .examples import ExampleBatch
from .isr import carl_loss, isr_p_weights, isr_select
from .libra import libra_select
from .ohem import ohem_select

#: The samplers that need the box head's scores of the candidates (a ``scorer``).
SCORING_SAMPLERS = ("ohem", "isr")
#: RoIs per chunk of the no-grad scoring forward: bounds its memory (2000 proposals x 16 images is
#: 32k RoIs; a chunk of 2048 pooled 256x7x7 features is 100 MB in float32).
SCORE_CHUNK = 2048

Scorer = Callable[[Tensor], "tuple[Tensor, Tensor]"]


def select_rival(config: SamplerConfig, batch: ExampleBatch, scorer: Optional[Scorer], box_coder,
                 generator: Optional[torch.Generator]) -> SampleResult:
    """The picks of ``config.sampler`` (``libra``, ``ohem`` or ``isr``) from ``batch``."""
    budget = dict(batch_size_per_image=config.batch_size_per_image, positive_fraction=config.positive_fraction)
    if config.sampler == "libra":
        return libra_select(batch, **budget, num_bins=config.libra_num_bins,
                            floor_thresh=config.libra_floor_thresh, floor_fraction=config.libra_floor_fraction,
                            generator=generator)
    if config.sampler not in SCORING_SAMPLERS:
        raise ValueError(f"select_rival: {config.sampler!r} is not a Python sampler (libra, ohem, isr)")
    if scorer is None:
        raise ValueError(f"sampler {config.sampler!r} needs a scorer (the box head's scores of the candidates)")
    if config.sampler == "ohem":
        nms = None if config.ohem_variant == "mmdet" or config.ohem_nms_thresh >= 1.0 else config.ohem_nms_thresh
        return ohem_select(batch, scorer, box_coder, **budget, variant=config.ohem_variant, nms_thresh=nms)
    return isr_select(batch, scorer, box_coder, **budget, k=config.isr_neg_k, bias=config.isr_neg_bias,
                      score_thresh=config.isr_score_thresh, iou_thresh=config.isr_iou_thresh, generator=generator)


def isr_loss_terms(config: SamplerConfig, class_logits: Tensor, box_regression: Tensor, boxes: list[Tensor],
                   matched_idxs: list[Tensor], labels: list[Tensor], regression_targets: list[Tensor],
                   weights: list[Tensor], gt_boxes: list[Tensor], box_coder
                   ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
    """PISA's terms on the sampled RoIs of a batch, after the box head's forward.

    Args: the box head's ``class_logits [R, C+1]`` and ``box_regression [R, 4(C+1)]`` on the sampled
    RoIs, and per image the sampled ``boxes``, ``matched_idxs`` (GT index within the image),
    ``labels``, ``regression_targets``, ``weights`` (ISR-N's for the negatives) and the image's
    ``gt_boxes``.

    Returns ``(weights, box_weights, losses)``: the classification weights with ISR-P's on the
    positives, the box-loss weights (1 for every RoI: ISR-P leaves them), and ``{"loss_carl": ...}``
    when ``config.carl`` (else empty).
    """
    counts = [lab.shape[0] for lab in labels]
    labels_all = torch.cat(labels)
    pos = torch.where(labels_all > 0)[0]
    gt_offsets = torch.tensor([0] + [g.shape[0] for g in gt_boxes], device=labels_all.device).cumsum(0)[:-1]
    image = torch.repeat_interleave(torch.arange(len(labels), device=labels_all.device),
                                    torch.tensor(counts, device=labels_all.device))
    gt_ids = (gt_offsets[image] + torch.cat(matched_idxs))[pos]
    all_gt = torch.cat(gt_boxes).float()
    weights_all = torch.cat(weights).clone()
    if pos.numel():
        weights_all[pos] = isr_p_weights(class_logits[pos], box_regression[pos], labels_all[pos],
                                         torch.cat(boxes)[pos].float(), all_gt[gt_ids], gt_ids, box_coder,
                                         k=config.isr_pos_k, bias=config.isr_pos_bias).to(weights_all.dtype)
    losses: dict[str, Tensor] = {}
    if config.carl:
        losses["loss_carl"] = carl_loss(class_logits, box_regression, labels_all, torch.cat(regression_targets),
                                        labels_all.shape[0], k=config.carl_k, bias=config.carl_bias)
    box_weights = [torch.ones_like(w) for w in weights]
    return list(weights_all.split(counts)), box_weights, losses
