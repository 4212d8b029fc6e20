"""Typed Python wrappers of ``torch.ops.overlap_sampler.*``.

Boxes are ``(x1, y1, x2, y2)`` rows (float16/32/64). A ragged batch holds the
rows of every image concatenated, delimited by ``splits``: int64 offsets
``[B+1]`` starting at 0 and ending at the row count (:func:`splits_from_counts`
builds them). Exact semantics: ``docs/ops.md``.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional, Sequence

import torch

from ._load import load_library

build_info = load_library()
from . import _fake  # noqa: E402,F401  (fakes need the schemas loaded first)
from ._fake import MAX_OUTPUT_ENTRIES, MAX_OUTPUT_WIDTH  # noqa: E402

from ._fake import FLOAT32_MAX  # noqa: E402  (the largest pos_weight: the weights are float32)

_ops = torch.ops.overlap_sampler

NEGATIVE_STRATEGIES = ("uniform", "hard", "soft", "soft_reference", "linear", "iou_balanced")
POSITIVE_STRATEGIES = ("uniform", "hard", "soft", "soft_reference", "linear")


class SampleResult(NamedTuple):
    """Output of :func:`sample`, one row per image (``B x batch_size_per_image``).

    indices: int64, global example ids (proposal row ``i``, or ``N + j`` for the
        appended copy of GT row ``j``), positives first then negatives, -1 padding.
    matched_gt: int64, global GT row of each positive, -1 otherwise.
    weights: float32, loss weight (``pos_weight`` for the best sampled positive of
        each GT, 1 for other samples, 0 for padding).
    num_pos, num_neg: int64 ``[B]`` sampled counts.
    """

    indices: torch.Tensor
    matched_gt: torch.Tensor
    weights: torch.Tensor
    num_pos: torch.Tensor
    num_neg: torch.Tensor


def _require_dense(**tensors) -> None:
    """Sparse and other non-strided tensors get a TypeError naming the argument
    (the dispatcher would raise NotImplementedError naming only the op)."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {tensor.layout}")


def splits_from_counts(counts: Sequence[int] | torch.Tensor, device=None) -> torch.Tensor:
    """Offsets ``[B+1]`` (int64) of a ragged batch whose images hold ``counts`` rows.

    ``counts``: non-negative integers, as a sequence or a 1-D integer tensor. A ``TypeError``
    names a non-integer count, a ``ValueError`` a negative one (values of a tensor are checked
    on the CPU only: reading a GPU tensor would stall the stream).
    """
    if isinstance(counts, torch.Tensor):
        if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
            raise TypeError(f"counts must be an integer tensor, got {counts.dtype}")
        if counts.dim() != 1:
            raise ValueError(f"counts must be 1-D, got shape {list(counts.shape)}")
        if counts.device.type == "cpu" and bool((counts < 0).any()):
            raise ValueError(f"counts must be >= 0, got {counts.tolist()}")
    else:
        for i, c in enumerate(counts):
            if isinstance(c, bool):
                raise TypeError(f"counts[{i}] must be an integer, got {c!r}")
            try:
                value = operator.index(c)  # ints, numpy ints, 0-d integer tensors; not 1.5
            except TypeError:
                raise TypeError(f"counts[{i}] must be an integer, got {c!r}") from None
            if value < 0:
                raise ValueError(f"counts[{i}] must be >= 0, got {value}")
    counts = torch.as_tensor(counts, dtype=torch.int64, device=device)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU matrix ``[N, M]`` of ``boxes1 [N, 4]`` and ``boxes2 [M, 4]``, in their dtype.

    Equal to ``torchvision.ops.box_iou`` except that a zero union gives 0, never NaN.
    """
    _require_dense(boxes1=boxes1, boxes2=boxes2)
    return _ops.box_iou(boxes1, boxes2)


def max_iou(
    queries: torch.Tensor,
    query_splits: torch.Tensor,
    keys: torch.Tensor,
    key_splits: torch.Tensor,
    *,
    query_mask: Optional[torch.Tensor] = None,
    key_mask: Optional[torch.Tensor] = None,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query box, the max IoU with the (masked) keys of its image and that key's row.

    Returns ``(values [Q] in the box dtype, indices [Q] int64)``; ties go to the
    lowest key row; no eligible key (or a masked-out query) gives ``(0, -1)``.
    ``exclude_self`` treats queries and keys as the same boxes and skips the pair
    (q, q). This gives IoU_g,e (keys = GT boxes) and IoU_p,n (queries = negatives,
    keys = positives) without building the IoU matrix.
    """
    _require_dense(queries=queries, query_splits=query_splits, keys=keys, key_splits=key_splits,
                   query_mask=query_mask, key_mask=key_mask)
    return _ops.max_iou(queries, query_splits, keys, key_splits, query_mask=query_mask,
                        key_mask=key_mask, exclude_self=exclude_self)


def assign_bins(
    values: torch.Tensor,
    splits: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    num_bins: int = 2,
    upper: Optional[float] = None,
) -> torch.Tensor:
    """Bin index (int64) of each value among ``num_bins`` equal bins over ``[0, upper]``.

    ``upper`` defaults to each image's max (masked) value, as in Eq. 2 of the paper;
    the max itself falls in the top bin; values beyond a fixed ``upper`` too.
    Rows with ``mask`` false get -1.
    """
    _require_dense(values=values, splits=splits, mask=mask)
    return _ops.assign_bins(values, splits, mask=mask, num_bins=num_bins, upper=upper)


def weighted_sample(
    weights: torch.Tensor,
    uniforms: torch.Tensor,
    splits: torch.Tensor,
    counts: torch.Tensor,
    max_count: int,
) -> torch.Tensor:
    """Successive weighted sampling without replacement inside each segment.

    Segment ``s`` is rows ``splits[s]:splits[s+1]``; it draws ``min(counts[s],
    size, max_count)`` rows with probability proportional to ``weights``
    (Efraimidis-Spirakis keys ``u^(1/w)`` from ``uniforms`` in [0, 1)). A weight
    of ``+inf`` is drawn before every finite one; a weight of 0 only after every
    positive one. Returns int64 ``[S, max_count]``: global rows in draw order, -1
    padding. Same distribution as ``numpy.random.Generator.choice(replace=False,
    p=w / w.sum())``.
    """
    _require_dense(weights=weights, uniforms=uniforms, splits=splits, counts=counts)
    return _ops.weighted_sample(weights, uniforms, splits, counts, max_count)


def sample(
    proposals: torch.Tensor,
    proposal_splits: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_splits: torch.Tensor,
    *,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.5,
    append_gt: bool = True,
    neg_strategy: str = "soft",
    pos_strategy: str = "uniform",
    num_bins: int = 2,
    hard_thresh: float = 0.5,
    bin_upper: Optional[float] = None,
    pos_weight: float = 1.0,
    generator: Optional[torch.Generator] = None,
    pos_key: str = "negatives",
    validate: bool = True,
) -> SampleResult:
    """The Overlap Sampler for a whole batch of RoI-head training examples.

    Args:
        proposals: ``[N, 4]`` RPN proposals of every image, delimited by
            ``proposal_splits`` (int64 ``[B+1]``).
        gt_boxes: ``[G, 4]`` ground-truth boxes, delimited by ``gt_splits``.
        batch_size_per_image: examples per image (512); positives take at most
            ``round(batch_size_per_image * positive_fraction)``.
        fg_iou_thresh / bg_iou_thresh: IoU_g,e >= fg is positive, < bg negative.
        append_gt: GT boxes are examples too (always positive), id ``N + j``.
        neg_strategy: how negatives are drawn by their IoU_p,n (max IoU with any
            positive): ``uniform`` (random sampling), ``hard`` (IoU_p,n >=
            ``hard_thresh`` first, Eq. 1), ``soft`` (``num_bins`` equal bins over
            [0, max] with equal quotas, Eq. 2; ``bin_upper`` fixes the range),
            ``soft_reference`` (the released code's layout), ``linear`` (p ∝
            IoU_p,n, Eq. 3; zero keys last), ``iou_balanced`` (Libra R-CNN's bins
            of IoU_g,n over [0, bg_iou_thresh)).
        pos_strategy: the same strategies (but ``iou_balanced``) for positives, by
            their max IoU with the negatives (``pos_key="all"``: with every other
            example).
        pos_weight: loss weight ε of the best sampled positive of each GT.
        generator: source of randomness (a ``torch.Generator`` on the boxes'
            device); results are deterministic for a given generator state.
        validate: check coordinates are finite and splits consistent (reads
            values, so it synchronises a GPU); ``False`` keeps the op fully
            asynchronous and CUDA-graph capturable.

    Returns:
        :class:`SampleResult`.
    """
    _require_dense(proposals=proposals, proposal_splits=proposal_splits, gt_boxes=gt_boxes,
                   gt_splits=gt_splits)
    return SampleResult(*_ops.sample(
        proposals, proposal_splits, gt_boxes, gt_splits,
        batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction,
        fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh, append_gt=append_gt,
        neg_strategy=neg_strategy, pos_strategy=pos_strategy, num_bins=num_bins,
        hard_thresh=hard_thresh, bin_upper=bin_upper, pos_weight=pos_weight,
        generator=generator, pos_key=pos_key, validate=validate))


def sample_from_uniforms(
    proposals: torch.Tensor,
    proposal_splits: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_splits: torch.Tensor,
    uniforms: torch.Tensor,
    **options,
) -> SampleResult:
    """:func:`sample` with its random draw given: ``uniforms`` float64 ``[E]``, one
    per example (``E = N``, plus ``G`` with ``append_gt``), checked to lie in [0, 1)
    with ``validate=True``. Deterministic."""
    _require_dense(proposals=proposals, proposal_splits=proposal_splits, gt_boxes=gt_boxes,
                   gt_splits=gt_splits, uniforms=uniforms)
    return SampleResult(*_ops.sample_from_uniforms(
        proposals, proposal_splits, gt_boxes, gt_splits, uniforms, **options))


__all__ = [
    "FLOAT32_MAX", "MAX_OUTPUT_ENTRIES", "MAX_OUTPUT_WIDTH", "NEGATIVE_STRATEGIES", "POSITIVE_STRATEGIES",
    "SampleResult", "assign_bins", "box_iou",
    "build_info", "max_iou", "sample", "sample_from_uniforms", "splits_from_counts",
    "weighted_sample",
]
