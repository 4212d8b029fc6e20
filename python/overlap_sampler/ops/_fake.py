"""Fake (meta) kernels: output shapes and dtypes without computing anything,
so torch.compile and torch.export can trace the ops. They repeat the C++
shape and device checks with ``torch._check`` (value checks cannot run on fake
tensors). The device check also guards eager calls that mix meta tensors with
real ones: the dispatcher sends those here, and the outputs would otherwise be
uninitialised tensors on the first argument's device. Registered after the
library is loaded (see ``ops/__init__.py``)."""

from __future__ import annotations

import torch

_LIB = "overlap_sampler::"


def _check_boxes(boxes: torch.Tensor, name: str) -> None:
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: f"{name} must have shape [R, 4]")


def _check_splits(splits: torch.Tensor, name: str) -> None:
    torch._check(splits.dtype == torch.int64, lambda: f"{name} must be int64")
    torch._check(splits.dim() == 1 and splits.shape[0] >= 1, lambda: f"{name} must be [B+1]")


# As cpp/checks.h: the widest padded output row and the most output entries.
MAX_OUTPUT_WIDTH = 1 << 24
MAX_OUTPUT_ENTRIES = (1 << 31) - 1
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _check_output_size(rows, width, name: str) -> None:
    torch._check_value(width <= MAX_OUTPUT_WIDTH,
                       lambda: f"{name} must be at most {MAX_OUTPUT_WIDTH} (the width of the padded output), "
                               f"got {width}")
    torch._check_value(rows * width <= MAX_OUTPUT_ENTRIES,
                       lambda: f"{name} = {width} for {rows} rows would make an output of more than "
                               f"{MAX_OUTPUT_ENTRIES} entries")


def _check_one_device(**tensors) -> None:
    """As the C++ kernels: every tensor argument on the first one's device."""
    names = [n for n, t in tensors.items() if t is not None]
    first = tensors[names[0]]
    for name in names[1:]:
        other = tensors[name]
        torch._check_value(other.device == first.device,
                           lambda: f"expected {name} and {names[0]} on one device, got {other.device} and "
                                   f"{first.device}")


@torch.library.register_fake(_LIB + "box_iou")
def _box_iou(boxes1, boxes2):
    _check_one_device(boxes1=boxes1, boxes2=boxes2)
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    torch._check(boxes1.dtype == boxes2.dtype, lambda: "boxes1 and boxes2 must share a dtype")
    return boxes1.new_empty((boxes1.shape[0], boxes2.shape[0]))


@torch.library.register_fake(_LIB + "max_iou")
def _max_iou(queries, query_splits, keys, key_splits, *, query_mask=None, key_mask=None,
             exclude_self=False):
    _check_one_device(queries=queries, query_splits=query_splits, keys=keys, key_splits=key_splits,
                      query_mask=query_mask, key_mask=key_mask)
    _check_boxes(queries, "queries")
    _check_boxes(keys, "keys")
    _check_splits(query_splits, "query_splits")
    _check_splits(key_splits, "key_splits")
    torch._check(query_splits.shape[0] == key_splits.shape[0],
                 lambda: "query_splits and key_splits must describe the same number of images")
    rows = queries.shape[0]
    return queries.new_empty((rows,)), queries.new_empty((rows,), dtype=torch.int64)


@torch.library.register_fake(_LIB + "assign_bins")
def _assign_bins(values, splits, *, mask=None, num_bins=2, upper=None):
    _check_one_device(values=values, splits=splits, mask=mask)
    torch._check(values.dim() == 1, lambda: "values must be 1-D")
    _check_splits(splits, "splits")
    torch._check(1 <= num_bins <= 64, lambda: f"num_bins must be in [1, 64], got {num_bins}")
    return values.new_empty(values.shape, dtype=torch.int64)


@torch.library.register_fake(_LIB + "weighted_sample")
def _weighted_sample(weights, uniforms, splits, counts, max_count):
    _check_one_device(weights=weights, uniforms=uniforms, splits=splits, counts=counts)
    _check_splits(splits, "splits")
    torch._check(max_count >= 0, lambda: "max_count must be >= 0")
    _check_output_size(splits.shape[0] - 1, max_count, "max_count")
    return weights.new_empty((splits.shape[0] - 1, max_count), dtype=torch.int64)


def _check_pos_weight(pos_weight) -> None:
    # The one option whose bound is new to the fakes' callers: float32 weights.
    torch._check_value(0.0 <= pos_weight <= FLOAT32_MAX,
                       lambda: f"pos_weight must be a finite number in [0, {FLOAT32_MAX}] (the float32 maximum), "
                               f"got {pos_weight}")


def _sample_outputs(proposals, proposal_splits, gt_boxes, gt_splits, batch_size_per_image):
    _check_one_device(proposals=proposals, proposal_splits=proposal_splits, gt_boxes=gt_boxes,
                      gt_splits=gt_splits)
    _check_boxes(proposals, "proposals")
    _check_boxes(gt_boxes, "gt_boxes")
    _check_splits(proposal_splits, "proposal_splits")
    _check_splits(gt_splits, "gt_splits")
    torch._check(proposal_splits.shape[0] == gt_splits.shape[0],
                 lambda: "proposal_splits and gt_splits must describe the same number of images")
    torch._check(batch_size_per_image >= 0, lambda: "batch_size_per_image must be >= 0")
    images = proposal_splits.shape[0] - 1
    _check_output_size(images, batch_size_per_image, "batch_size_per_image")
    shape = (images, batch_size_per_image)
    return (
        proposals.new_empty(shape, dtype=torch.int64),
        proposals.new_empty(shape, dtype=torch.int64),
        proposals.new_empty(shape, dtype=torch.float32),
        proposals.new_empty((images,), dtype=torch.int64),
        proposals.new_empty((images,), dtype=torch.int64),
    )


@torch.library.register_fake(_LIB + "sample")
def _sample(proposals, proposal_splits, gt_boxes, gt_splits, *, batch_size_per_image=512,
            positive_fraction=0.25, fg_iou_thresh=0.5, bg_iou_thresh=0.5, append_gt=True,
            neg_strategy="soft", pos_strategy="uniform", num_bins=2, hard_thresh=0.5,
            bin_upper=None, pos_weight=1.0, generator=None, pos_key="negatives", validate=True):
    _check_pos_weight(pos_weight)
    return _sample_outputs(proposals, proposal_splits, gt_boxes, gt_splits, batch_size_per_image)


@torch.library.register_fake(_LIB + "sample_from_uniforms")
def _sample_from_uniforms(proposals, proposal_splits, gt_boxes, gt_splits, uniforms, *,
                          batch_size_per_image=512, positive_fraction=0.25, fg_iou_thresh=0.5,
                          bg_iou_thresh=0.5, append_gt=True, neg_strategy="soft",
                          pos_strategy="uniform", num_bins=2, hard_thresh=0.5, bin_upper=None,
                          pos_weight=1.0, pos_key="negatives", validate=True):
    _check_one_device(uniforms=uniforms, proposals=proposals)
    torch._check(uniforms.dim() == 1, lambda: "uniforms must be 1-D")
    _check_pos_weight(pos_weight)
    return _sample_outputs(proposals, proposal_splits, gt_boxes, gt_splits, batch_size_per_image)
