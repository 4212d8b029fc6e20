"""Property-based tests of every op (hypothesis): random shapes, dtypes, memory layouts, split values and options.

The property, for each generated call: the generator knows which arguments it broke (a wrong dtype or shape,
a non-finite coordinate, splits that do not start at 0, end elsewhere than the row count, decrease, hold 10**6
or a negative, a bad option...). If it broke any, the op raises ValueError or TypeError (never RuntimeError,
never a crash) whose message names one of them. If it broke none, the op returns exactly what it returns on
``.contiguous()`` copies of the same inputs, and exactly what the independent reference returns
(``torchvision.ops.box_iou`` and ``overlap_sampler.reference``).

Every tensor argument gets its own memory layout (``relayout``): column-major, a strided slice ``t[::2]``, a
storage offset ``big[k:k+n]``, stride 0 (``t[:1].expand``), flipped twice, a column of a wider table. The memory
around the values holds junk (NaN, 10**6, True), so a kernel that reads storage as if it were contiguous sees
wrong values instead of silently right ones.

A fixed profile keeps CI deterministic and short: derandomized, no deadline, 150 examples per test (about 40 s
for the file on two CPU cores; ``OVERLAP_SAMPLER_HYPOTHESIS_EXAMPLES`` sets more for a deeper local run). The
regression tests at the end run in child processes: before the fixes of f3e58fb they crashed the interpreter
(strided splits were checked with their storage's values and read out of bounds by the kernels) or allocated
tens of GiB.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import overlap_sampler
from overlap_sampler import reference
from conftest import cpu_and_cuda, random_boxes

PROFILE = settings(
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=int(os.environ.get("OVERLAP_SAMPLER_HYPOTHESIS_EXAMPLES", "150")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

BOX_DTYPES = (torch.float16, torch.float32, torch.float64)
WRONG_BOX_DTYPES = (torch.int32, torch.int64, torch.bfloat16, torch.bool)
LAYOUTS = ("contiguous", "transposed", "strided", "offset", "expanded", "flipped", "column")


# --------------------------------------------------------------------------------------------------------------
# Memory layouts
# --------------------------------------------------------------------------------------------------------------


def _junk(t: torch.Tensor):
    if t.dtype == torch.bool:
        return True
    if t.dtype.is_floating_point:
        return math.nan
    return 10**6 + 7 if t.dtype == torch.int64 else torch.iinfo(t.dtype).max


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in another memory layout, junk in the memory around them."""
    if layout == "contiguous" or t.dim() == 0:
        return t
    junk = _junk(t)
    n, rest = t.shape[0], tuple(t.shape[1:])
    if layout == "expanded":
        # Stride 0 along dim 0 needs every row equal (e.g. all-zero splits of empty images).
        if n == 0 or bool((t == t[:1]).all()):
            one = t[:1].clone() if n else t.new_full((1, *rest), junk)
            return one.expand(n, *rest)
        layout = "strided"
    if layout == "transposed":
        if t.dim() == 2:
            return t.t().contiguous().t()  # column-major
        # 1-D: a row of a column-major [2, n] table (stride 2).
        return torch.stack([t, torch.full_like(t, junk)]).t().contiguous().t()[0]
    if layout == "strided":
        big = t.new_full((2 * n, *rest), junk)
        big[::2] = t
        return big[::2]
    if layout == "offset":
        big = t.new_full((n + 5, *rest), junk)
        big[3 : 3 + n] = t
        return big[3 : 3 + n]
    if layout == "flipped":
        return t.flip(0).flip(0)
    if layout == "column":
        if t.dim() == 1:  # a column of an offsets-like table
            return torch.stack([torch.full_like(t, junk), t, torch.full_like(t, junk)], 1)[:, 1]
        return torch.cat([t, torch.full_like(t, junk)], 1)[:, : t.shape[1]]
    raise AssertionError(layout)


def test_relayout_keeps_values_and_changes_layout():
    t = torch.arange(12.0).reshape(6, 2)
    s = torch.tensor([0, 3, 3, 7])
    for layout in LAYOUTS:
        for x in (t, s):
            y = relayout(x, layout)
            assert torch.equal(y, x), layout
    assert not relayout(t, "transposed").is_contiguous()
    assert relayout(s, "strided").stride() == (2,)
    assert relayout(s, "offset").storage_offset() == 3
    assert relayout(s, "column").stride() == (3,)
    assert relayout(torch.zeros(3, dtype=torch.long), "expanded").stride() == (0,)
    assert relayout(torch.zeros(0, 4), "expanded").shape == (0, 4)
    assert not relayout(t, "column").is_contiguous()


# --------------------------------------------------------------------------------------------------------------
# Calls and their outcomes
# --------------------------------------------------------------------------------------------------------------


def names_argument(message: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None


def outcome(call, args: dict):
    """(result, None) or (None, exception); only ValueError and TypeError are acceptable errors."""
    try:
        result = call(**args)
        if any(t.is_cuda for t in args.values() if isinstance(t, torch.Tensor)):
            torch.cuda.synchronize()  # an illegal access surfaces here, as RuntimeError
        return result, None
    except Exception as error:  # noqa: BLE001 - the property classifies every exception
        return None, error


def as_tuple(result):
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def assert_identical(got, expected, what: str):
    got, expected = as_tuple(got), as_tuple(expected)
    assert len(got) == len(expected), what
    for i, (a, b) in enumerate(zip(got, expected)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{what}, output {i}: {a.dtype} {a.shape}, {b.dtype} {b.shape}"
        assert torch.equal(a.cpu(), b.cpu()), f"{what}, output {i} differs:\n{a}\n{b}"


def mark(bad: dict, name: str, kind) -> None:
    """Record that the generator broke argument ``name`` in a way that must raise ``kind``."""
    bad.setdefault(name, set()).add(kind)


def check_property(call, args: dict, bad: dict, expected_fn, layouts: dict):
    """The property of the module docstring for one generated call.

    ``args``: the call's arguments (tensors contiguous); ``bad``: argument name -> the exception classes its
    faults may raise; ``expected_fn``: the reference on CPU copies of ``args`` (valid calls only).
    """
    relaid = {k: relayout(v, layouts.get(k, "contiguous")) if isinstance(v, torch.Tensor) else v
              for k, v in args.items()}
    for k, v in relaid.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v.cpu(), args[k].cpu(), rtol=0, atol=0, equal_nan=True, msg=k)
    contiguous = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in relaid.items()}
    got, error = outcome(call, relaid)
    base, base_error = outcome(call, contiguous)
    described = f"layouts {layouts}, broken {sorted(bad)}"
    event("invalid" if bad else "valid")
    for err, which in ((error, "laid-out inputs"), (base_error, "contiguous inputs")):
        if err is None:
            continue
        assert isinstance(err, (ValueError, TypeError)) and not isinstance(err, RuntimeError), (
            f"{which}: {type(err).__name__}: {err} ({described})")
        message = str(err)
        assert any(names_argument(message, name) and isinstance(err, tuple(kinds)) for name, kinds in bad.items()), (
            f"{which}: {type(err).__name__}: {message!r} names none of the broken arguments ({described})")
    if bad:
        assert error is not None, f"laid-out inputs accepted ({described})"
        assert base_error is not None, f"contiguous inputs accepted ({described})"
        return
    assert_identical(got, base, f"laid-out vs contiguous inputs ({described})")
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    assert_identical(got, expected_fn(**cpu), f"op vs reference ({described})")


# --------------------------------------------------------------------------------------------------------------
# Strategies. Each call breaks at most one argument (its "target", None for about half the calls), so valid
# calls stay common and a failure shrinks to one fault.
# --------------------------------------------------------------------------------------------------------------


def draw_target(data, names) -> str | None:
    return data.draw(st.sampled_from([None] * len(names) + list(names)), label="broken argument")


def draw_counts(data, label: str, images: int | None = None, max_rows: int = 7) -> list:
    """Rows per image; zero images, empty images and all-empty batches are common."""
    if images is None:
        images = data.draw(st.integers(0, 4), label=f"{label} images")
    if data.draw(st.integers(0, 4), label=f"{label} all empty") == 0:
        return [0] * images
    return data.draw(st.lists(st.integers(0, max_rows), min_size=images, max_size=images), label=label)


def splits_valid(s: list, rows: int) -> bool:
    return s[0] == 0 and s[-1] == rows and all(a <= b for a, b in zip(s, s[1:]))


SPLIT_FAULTS = ("start", "end", "decreasing", "huge", "negative", "dtype", "shape")


def draw_splits(data, name: str, counts: list, bad: dict, broken: bool) -> torch.Tensor:
    """Offsets of ``counts``; ``broken``: not starting at 0, not ending at the row count, decreasing, 10**6 or
    2**62 or a negative somewhere, a wrong dtype or a wrong shape."""
    s = [0] + list(itertools.accumulate(counts))
    rows = s[-1]
    if not broken:
        return torch.tensor(s, dtype=torch.int64)
    fault = data.draw(st.sampled_from(SPLIT_FAULTS), label=f"{name} fault")
    position = data.draw(st.integers(0, len(s) - 1), label=f"{name} position")
    if fault == "start":
        s[0] = data.draw(st.sampled_from([1, -1, 10**6]), label=f"{name}[0]")
    elif fault == "end":
        s[-1] += data.draw(st.sampled_from([1, -1, 10**6, -(10**6)]), label=f"{name}[-1] shift")
    elif fault == "decreasing":
        position = position or len(s) - 1
        s[position] = (s[position - 1] if position else 0) - data.draw(st.integers(1, 3), label=f"{name} drop")
    elif fault == "huge":
        s[position] = data.draw(st.sampled_from([10**6, 2**31, 2**62, 2**63 - 1]), label=f"{name} huge")
    elif fault == "negative":
        s[position] = data.draw(st.sampled_from([-1, -(10**6), -(2**63)]), label=f"{name} negative")
    splits = torch.tensor(s, dtype=torch.int64)
    if fault == "dtype":
        dtype = data.draw(st.sampled_from([torch.int32, torch.float32, torch.uint8]), label=f"{name} dtype")
        splits = splits.to(dtype)
        mark(bad, name, TypeError)
    elif fault == "shape":
        splits = splits[None] if data.draw(st.booleans(), label=f"{name} 2-D") else splits[:0]
        mark(bad, name, ValueError)
    else:
        assert not splits_valid(s, rows), (fault, s)
        mark(bad, name, ValueError)
    return splits


def draw_boxes(data, name: str, rows: int, dtype, *, inverted_ok: bool) -> torch.Tensor:
    """``[rows, 4]`` boxes: random, on a small grid (ties, duplicates, zero areas) or one box repeated (which
    the "expanded" layout can stride by 0); ``inverted_ok``: some with x2 < x1 and y2 < y1."""
    style = data.draw(st.sampled_from(["random", "grid", "repeated"]), label=f"{name} style")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**20), label=f"{name} seed"))
    if style == "random":
        boxes = random_boxes(rows, g)
    elif style == "grid":
        xy = torch.randint(0, 8, (rows, 2), generator=g).double()
        boxes = torch.cat([xy, xy + torch.randint(0, 5, (rows, 2), generator=g)], 1)
    else:
        boxes = random_boxes(1, g).expand(rows, 4).clone()
    if inverted_ok and rows and data.draw(st.booleans(), label=f"{name} inverted"):
        flip = torch.rand(rows, generator=g) < 0.3
        boxes[flip] = boxes[flip][:, [2, 3, 0, 1]]
    return boxes.to(dtype)


def break_boxes(data, name: str, boxes: torch.Tensor, bad: dict, nonfinite_checked: bool = True) -> torch.Tensor:
    """A non-finite coordinate (where checked), a wrong dtype or a wrong shape."""
    faults = ["dtype", "shape"] + (["nonfinite"] if nonfinite_checked and boxes.shape[0] else [])
    fault = data.draw(st.sampled_from(faults), label=f"{name} fault")
    if fault == "nonfinite":
        boxes = boxes.clone()
        row, column = data.draw(st.integers(0, boxes.shape[0] - 1)), data.draw(st.integers(0, 3))
        boxes[row, column] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label=f"{name} value")
        mark(bad, name, ValueError)
    elif fault == "dtype":
        boxes = boxes.to(data.draw(st.sampled_from(WRONG_BOX_DTYPES), label=f"{name} dtype"))
        mark(bad, name, TypeError)
    else:
        boxes = torch.cat([boxes, boxes[:, :1]], 1) if data.draw(st.booleans()) else boxes.reshape(-1)
        mark(bad, name, ValueError)
    return boxes


def draw_mask(data, name: str, rows: int, bad: dict, broken: bool):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**20), label=f"{name} seed"))
    mask = torch.rand(rows, generator=g) < 0.6
    if not broken:
        kind = data.draw(st.sampled_from(["none", "random", "all false"]), label=name)
        return None if kind == "none" else (mask if kind == "random" else torch.zeros(rows, dtype=torch.bool))
    if data.draw(st.booleans(), label=f"{name} wrong dtype"):
        mark(bad, name, TypeError)
        return mask.to(data.draw(st.sampled_from([torch.uint8, torch.float32, torch.int64]), label=f"{name} dtype"))
    mark(bad, name, ValueError)
    return torch.ones(rows + data.draw(st.sampled_from([1, 2]), label=f"{name} extra"), dtype=torch.bool)


def draw_layouts(data, args: dict) -> dict:
    """A memory layout for each tensor argument."""
    return {name: data.draw(st.sampled_from(LAYOUTS), label=f"{name} layout")
            for name, value in args.items() if isinstance(value, torch.Tensor)}


def on(device, args: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


# --------------------------------------------------------------------------------------------------------------
# box_iou, max_iou, assign_bins, weighted_sample
# --------------------------------------------------------------------------------------------------------------


def torchvision_iou(boxes1, boxes2):
    """torchvision.ops.box_iou in the accumulate type, a zero or inverted union read as 0 (the contract)."""
    acc = torch.float32 if boxes1.dtype == torch.float16 else boxes1.dtype
    iou = torchvision.ops.box_iou(boxes1.to(acc), boxes2.to(acc))
    return torch.where(iou > 0, iou, torch.zeros((), dtype=acc)).to(boxes1.dtype)


def expected_box_iou(boxes1, boxes2):
    result = reference.box_iou(boxes1, boxes2)
    assert torch.equal(result, torchvision_iou(boxes1, boxes2)), "reference.box_iou differs from torchvision"
    return result


@pytest.mark.parametrize("device", cpu_and_cuda())
@PROFILE
@given(data=st.data())
def test_box_iou_property(device, data):
    bad = {}
    target = draw_target(data, ["boxes1", "boxes2", "mixed dtypes"])
    dtype = data.draw(st.sampled_from(BOX_DTYPES), label="dtype")
    args = {}
    for name in ("boxes1", "boxes2"):
        args[name] = draw_boxes(data, name, data.draw(st.integers(0, 9), label=f"{name} rows"), dtype,
                                inverted_ok=True)
        if target == name:
            args[name] = break_boxes(data, name, args[name], bad)
    if target == "mixed dtypes":
        args["boxes2"] = args["boxes2"].to(data.draw(st.sampled_from([d for d in BOX_DTYPES if d != dtype])))
        mark(bad, "boxes2", TypeError)  # "boxes1 and boxes2 must share a dtype"
    check_property(overlap_sampler.box_iou, on(device, args), bad, expected_box_iou, draw_layouts(data, args))


@pytest.mark.parametrize("device", cpu_and_cuda())
@PROFILE
@given(data=st.data())
def test_max_iou_property(device, data):
    bad = {}
    target = draw_target(data, ["queries", "keys", "query_splits", "key_splits", "images", "query_mask",
                                "key_mask", "exclude_self"])
    dtype = data.draw(st.sampled_from(BOX_DTYPES), label="dtype")
    exclude_self = target == "exclude_self" or data.draw(st.booleans(), label="exclude_self")
    query_counts = draw_counts(data, "query counts")
    if target == "exclude_self":  # keys of other per-image counts than the queries
        query_counts = query_counts or [0]
        key_counts = list(query_counts)
        key_counts[data.draw(st.integers(0, len(key_counts) - 1))] += data.draw(st.integers(1, 3))
        mark(bad, "exclude_self", ValueError)  # "exclude_self needs query_splits equal to key_splits"
    elif exclude_self:
        key_counts = query_counts
    else:
        key_counts = draw_counts(data, "key counts", images=len(query_counts))
    query_splits = draw_splits(data, "query_splits", query_counts, bad, target == "query_splits")
    key_splits = draw_splits(data, "key_splits", key_counts, bad, target == "key_splits")
    if target == "images":
        key_splits = torch.cat([key_splits, key_splits[-1:]])  # "must describe the same number of images"
        mark(bad, "key_splits", ValueError)
        exclude_self = False
    queries = draw_boxes(data, "queries", sum(query_counts), dtype, inverted_ok=True)
    if key_counts == query_counts and data.draw(st.booleans(), label="keys are the queries"):
        keys = queries.clone()
    else:
        keys = draw_boxes(data, "keys", sum(key_counts), dtype, inverted_ok=True)
    if target == "queries":
        queries = break_boxes(data, "queries", queries, bad)
    if target == "keys":
        keys = break_boxes(data, "keys", keys, bad)
    args = dict(queries=queries, query_splits=query_splits, keys=keys, key_splits=key_splits,
                exclude_self=exclude_self)
    for name, rows in (("query_mask", sum(query_counts)), ("key_mask", sum(key_counts))):
        mask = draw_mask(data, name, rows, bad, target == name)
        if mask is not None:
            args[name] = mask
    check_property(overlap_sampler.max_iou, on(device, args), bad, reference.max_iou, draw_layouts(data, args))


@pytest.mark.parametrize("device", cpu_and_cuda())
@PROFILE
@given(data=st.data())
def test_assign_bins_property(device, data):
    bad = {}
    target = draw_target(data, ["values", "splits", "mask", "num_bins", "upper"])
    counts = draw_counts(data, "counts")
    rows = sum(counts)
    splits = draw_splits(data, "splits", counts, bad, target == "splits")
    pool = [0.0, 0.25, 0.5, 0.7, 1.0, 1e-12, 3.0, -0.5]
    values = data.draw(st.lists(st.one_of(st.sampled_from(pool), st.floats(-1.0, 5.0)), min_size=rows,
                                max_size=rows), label="values")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    values = torch.tensor(values, dtype=torch.float64).to(dtype)
    if target == "values":
        fault = data.draw(st.sampled_from(["nonfinite", "dtype", "shape"] if rows else ["dtype", "shape"]))
        if fault == "nonfinite":
            values[data.draw(st.integers(0, rows - 1))] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            mark(bad, "values", ValueError)
        elif fault == "dtype":
            values = values.to(data.draw(st.sampled_from([torch.float16, torch.int64, torch.bfloat16])))
            mark(bad, "values", TypeError)
        else:
            values = values[:, None]
            mark(bad, "values", ValueError)
    num_bins = data.draw(st.one_of(st.integers(1, 5), st.just(64)), label="num_bins")
    upper = data.draw(st.sampled_from([None, None, 1e-12, 0.3, 1.0, 7.0]), label="upper")
    if target == "num_bins":
        num_bins = data.draw(st.sampled_from([0, 65, -1, 2**40]), label="bad num_bins")
        mark(bad, "num_bins", ValueError)
    if target == "upper":
        upper = data.draw(st.sampled_from([0.0, -1.0, math.inf, math.nan]), label="bad upper")
        mark(bad, "upper", ValueError)
    args = dict(values=values, splits=splits, num_bins=num_bins, upper=upper)
    mask = draw_mask(data, "mask", rows, bad, target == "mask")
    if mask is not None:
        args["mask"] = mask
    check_property(overlap_sampler.assign_bins, on(device, args), bad, reference.assign_bins,
                   draw_layouts(data, args))


@pytest.mark.parametrize("device", cpu_and_cuda())
@PROFILE
@given(data=st.data())
def test_weighted_sample_property(device, data):
    bad = {}
    target = draw_target(data, ["weights", "uniforms", "splits", "counts", "max_count"])
    sizes = draw_counts(data, "segment sizes", max_rows=6)
    rows, segments = sum(sizes), len(sizes)
    splits = draw_splits(data, "splits", sizes, bad, target == "splits")
    weights = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.7, 1e-300, math.inf]), min_size=rows,
                                 max_size=rows), label="weights")
    uniforms = data.draw(st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=rows, max_size=rows),
                         label="uniforms")
    float_dtypes = st.sampled_from([torch.float32, torch.float64])
    weights = torch.tensor(weights, dtype=torch.float64).to(data.draw(float_dtypes, label="weights dtype"))
    uniforms = torch.tensor(uniforms, dtype=torch.float64).to(data.draw(float_dtypes, label="uniforms dtype"))
    below_one = 1.0 - torch.finfo(uniforms.dtype).eps / 2  # a float64 just below 1 rounds to 1.0 in float32
    uniforms = uniforms.clamp(max=below_one)
    for name in ("weights", "uniforms"):
        if target != name:
            continue
        t = weights if name == "weights" else uniforms
        fault = data.draw(st.sampled_from(["value", "dtype", "length"] if rows else ["dtype", "length"]),
                          label=f"{name} fault")
        if fault == "value":
            pool = [-1.0, -1e-30, math.nan, -math.inf] if name == "weights" else [1.0, 1.5, -0.25, math.nan, math.inf]
            t[data.draw(st.integers(0, rows - 1))] = data.draw(st.sampled_from(pool), label=f"{name} value")
            mark(bad, name, ValueError)
        elif fault == "dtype":
            t = t.to(data.draw(st.sampled_from([torch.float16, torch.int64, torch.bfloat16])))
            mark(bad, name, TypeError)
        else:
            t = torch.cat([t, t.new_zeros(1)])
            mark(bad, name, ValueError)
        weights, uniforms = (t, uniforms) if name == "weights" else (weights, t)
    counts = data.draw(st.lists(st.one_of(st.integers(0, 7), st.just(2**62)), min_size=segments, max_size=segments),
                       label="counts")
    counts = torch.tensor(counts, dtype=torch.int64)
    if target == "counts":
        fault = data.draw(st.sampled_from(["negative", "dtype", "length"] if segments else ["dtype", "length"]))
        if fault == "negative":
            counts[data.draw(st.integers(0, segments - 1))] = data.draw(st.sampled_from([-1, -(2**62)]))
            mark(bad, "counts", ValueError)
        elif fault == "dtype":
            counts = counts.to(torch.int32)
            mark(bad, "counts", TypeError)
        else:
            counts = torch.cat([counts, counts.new_zeros(1)])
            mark(bad, "counts", ValueError)
    max_count = data.draw(st.integers(0, 8), label="max_count")
    if target == "max_count":
        max_count = data.draw(st.sampled_from([-1, -(2**40)]), label="bad max_count")
        mark(bad, "max_count", ValueError)
    args = dict(weights=weights, uniforms=uniforms, splits=splits, counts=counts, max_count=max_count)
    check_property(overlap_sampler.weighted_sample, on(device, args), bad, reference.weighted_sample,
                   draw_layouts(data, args))


# --------------------------------------------------------------------------------------------------------------
# sample, sample_from_uniforms
# --------------------------------------------------------------------------------------------------------------


THRESHOLDS = [(0.5, 0.5), (0.6, 0.4), (0.7, 0.3), (0.0, 0.0), (1.0, 0.0), (0.3, 0.3)]
OPTION_FAULTS = {
    "batch_size_per_image": [-1, -(2**40)],
    "positive_fraction": [-0.1, 1.5, math.nan],
    "fg_iou_thresh": [1.5, -0.5, math.nan],
    "bg_iou_thresh": [-0.5, math.nan, 0.99],  # 0.99 > fg_iou_thresh unless that is 1
    "neg_strategy": ["random", "Soft", ""],
    "pos_strategy": ["iou_balanced", "random"],
    "num_bins": [0, 65, -1],
    "hard_thresh": [math.nan, math.inf],
    "bin_upper": [0.0, -1.0, math.inf, math.nan],
    "pos_weight": [-1.0, math.nan, math.inf, 1e39, 3.5e38],
    "pos_key": ["everything", ""],
}


def draw_options(data, bad: dict, broken: bool) -> dict:
    fg, bg = data.draw(st.sampled_from(THRESHOLDS), label="fg, bg")
    options = dict(
        batch_size_per_image=data.draw(st.sampled_from([0, 1, 2, 5, 8, 16, 64]), label="batch_size_per_image"),
        positive_fraction=data.draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]), label="positive_fraction"),
        fg_iou_thresh=fg, bg_iou_thresh=bg,
        append_gt=data.draw(st.booleans(), label="append_gt"),
        neg_strategy=data.draw(st.sampled_from(overlap_sampler.NEGATIVE_STRATEGIES), label="neg_strategy"),
        pos_strategy=data.draw(st.sampled_from(overlap_sampler.POSITIVE_STRATEGIES), label="pos_strategy"),
        num_bins=data.draw(st.sampled_from([1, 2, 3, 4, 64]), label="num_bins"),
        hard_thresh=data.draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]), label="hard_thresh"),
        bin_upper=data.draw(st.sampled_from([None, None, 1e-12, 0.3, 0.7, 5.0]), label="bin_upper"),
        pos_weight=data.draw(st.sampled_from([1.0, 0.0, 0.5, 2.0, 3e38]), label="pos_weight"),
        pos_key=data.draw(st.sampled_from(["negatives", "all"]), label="pos_key"),
        validate=data.draw(st.sampled_from([True, True, False]), label="validate"),
    )
    if broken:
        name = data.draw(st.sampled_from(sorted(OPTION_FAULTS)), label="broken option")
        options[name] = data.draw(st.sampled_from(OPTION_FAULTS[name]), label=f"bad {name}")
        if not (name == "bg_iou_thresh" and 0.0 <= options[name] <= options["fg_iou_thresh"]):
            mark(bad, name, ValueError)  # (bg 0.99 with fg 1.0 is valid after all)
    return options


def draw_sample_case(data, with_uniforms: bool):
    bad = {}
    target = draw_target(data, ["option", "proposals", "proposal_splits", "gt_boxes", "gt_splits", "images",
                                "gt order", "mixed dtypes"] + (["uniforms"] if with_uniforms else []))
    options = draw_options(data, bad, target == "option")
    if target in ("gt order", "proposals", "gt_boxes") and data.draw(st.booleans(), label="validate anyway"):
        options["validate"] = True
    dtype = data.draw(st.sampled_from(BOX_DTYPES), label="dtype")
    proposal_counts = draw_counts(data, "proposal counts", max_rows=12)
    gt_counts = draw_counts(data, "gt counts", images=len(proposal_counts), max_rows=4)
    proposal_splits = draw_splits(data, "proposal_splits", proposal_counts, bad, target == "proposal_splits")
    gt_splits = draw_splits(data, "gt_splits", gt_counts, bad, target == "gt_splits")
    if target == "images":
        gt_splits = torch.cat([gt_splits, gt_splits[-1:]])
        mark(bad, "gt_splits", ValueError)  # "proposal_splits and gt_splits must describe the same number of images"
    proposals = draw_boxes(data, "proposals", sum(proposal_counts), dtype, inverted_ok=True)
    gt_boxes = draw_boxes(data, "gt_boxes", sum(gt_counts), dtype, inverted_ok=False)
    if target == "proposals":
        proposals = break_boxes(data, "proposals", proposals, bad, nonfinite_checked=options["validate"])
    elif target == "gt_boxes":
        gt_boxes = break_boxes(data, "gt_boxes", gt_boxes, bad, nonfinite_checked=options["validate"])
    elif target == "gt order" and options["validate"] and gt_boxes.shape[0]:
        row = data.draw(st.integers(0, gt_boxes.shape[0] - 1), label="inverted gt row")
        gt_boxes[row] = gt_boxes[row, [2, 3, 0, 1]]
        if bool(gt_boxes[row, 2] < gt_boxes[row, 0]) or bool(gt_boxes[row, 3] < gt_boxes[row, 1]):
            mark(bad, "gt_boxes", ValueError)  # "gt_boxes has a box with x2 < x1 or y2 < y1"
    elif target == "mixed dtypes":
        gt_boxes = gt_boxes.to(data.draw(st.sampled_from([d for d in BOX_DTYPES if d != dtype])))
        mark(bad, "gt_boxes", TypeError)  # "proposals and gt_boxes must share a dtype"
    args = dict(proposals=proposals, proposal_splits=proposal_splits, gt_boxes=gt_boxes, gt_splits=gt_splits)
    examples = proposals.shape[0] + (gt_boxes.shape[0] if options["append_gt"] else 0)
    if with_uniforms:
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**20), label="uniforms seed"))
        uniforms = torch.rand(examples, dtype=torch.float64, generator=g)
        if examples and data.draw(st.booleans(), label="zero and repeated uniforms"):
            uniforms[torch.rand(examples, generator=g) < 0.2] = 0.0
            uniforms[torch.rand(examples, generator=g) < 0.3] = uniforms[0]
        if target == "uniforms":
            fault = data.draw(st.sampled_from(["value", "dtype", "length"] if examples else ["dtype", "length"]),
                              label="uniforms fault")
            if fault == "value":  # checked with validate=True only (a value check would synchronise a GPU)
                options["validate"] = True
                value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 1.0, 1.5]), label="uniform")
                uniforms[data.draw(st.integers(0, examples - 1))] = value
                mark(bad, "uniforms", ValueError)
            elif fault == "dtype":
                uniforms = uniforms.float()
                mark(bad, "uniforms", TypeError)
            else:
                shorter = examples and data.draw(st.booleans(), label="one uniform fewer")
                uniforms = uniforms[1:] if shorter else torch.cat([uniforms, uniforms.new_zeros(1)])
                mark(bad, "uniforms", ValueError)
        args["uniforms"] = uniforms
    return args, options, bad


def unchecked_bad_splits(device, options, bad) -> bool:
    """CUDA with validate=False clamps bad splits instead of refusing them (docs/ops.md): no error promised."""
    return device == "cuda" and not options["validate"] and bool({"proposal_splits", "gt_splits"} & set(bad))


@pytest.mark.parametrize("device", cpu_and_cuda())
@PROFILE
@given(data=st.data())
def test_sample_from_uniforms_property(device, data):
    args, options, bad = draw_sample_case(data, with_uniforms=True)
    layouts = draw_layouts(data, args)
    if unchecked_bad_splits(device, options, bad):
        outcome(overlap_sampler.sample_from_uniforms, dict(on(device, args), **options))  # must not crash
        return
    check_property(overlap_sampler.sample_from_uniforms, dict(on(device, args), **options), bad,
                   reference.sample_from_uniforms, layouts)


@pytest.mark.parametrize("device", cpu_and_cuda())
@PROFILE
@given(data=st.data())
def test_sample_property(device, data):
    args, options, bad = draw_sample_case(data, with_uniforms=False)
    layouts = draw_layouts(data, args)
    seed = data.draw(st.integers(0, 2**20), label="generator seed")
    if unchecked_bad_splits(device, options, bad):
        outcome(overlap_sampler.sample, dict(on(device, args), **options))  # must not crash
        return

    def call(**kwargs):
        return overlap_sampler.sample(**kwargs, generator=torch.Generator(device).manual_seed(seed))

    def expected(proposals, gt_boxes, **kwargs):
        # `sample` is torch.rand(E, float64, device, generator) followed by the deterministic core.
        examples = proposals.shape[0] + (gt_boxes.shape[0] if kwargs["append_gt"] else 0)
        uniforms = torch.rand(examples, dtype=torch.float64, device=device,
                              generator=torch.Generator(device).manual_seed(seed)).cpu()
        return reference.sample_from_uniforms(proposals=proposals, gt_boxes=gt_boxes, uniforms=uniforms, **kwargs)

    check_property(call, dict(on(device, args), **options), bad, expected, layouts)


# --------------------------------------------------------------------------------------------------------------
# Regressions of known defects, each in a child process (they crashed the interpreter or allocated tens of GiB)
# --------------------------------------------------------------------------------------------------------------

_CHILD = r"""
import json, resource, sys
device, limit = sys.argv[1], int(sys.argv[2])
if limit:  # an allocation of 2**31 rows fails fast instead of swapping
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import torch, overlap_sampler as o
from overlap_sampler.testing import make_batch
from math import inf, nan

P, PS, G, GS = make_batch([25, 5], [2, 1], seed=0, device=device)  # N = 30 (25 + 5), G = 3 (2 + 1)
U = torch.rand(33, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
b = torch.tensor([0, 25, 10**6], device=device)
table = torch.tensor([[0, 0, 9], [25, 2, 9], [30, 3, 9]], device=device)  # offsets of proposals, GT, junk
z = torch.zeros(1, dtype=torch.long, device=device).expand(3)  # [0, 0, 0], stride 0
T = lambda values: torch.tensor(values, device=device)
gen = lambda: torch.Generator(device).manual_seed(3)

def same(pair):
    got, expected = pair
    got = tuple(got) if isinstance(got, (tuple, list)) else (got,)
    expected = tuple(expected) if isinstance(expected, (tuple, list)) else (expected,)
    return all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
               for a, b in zip(got, expected)) and len(got) == len(expected)

for name, code in json.loads(sys.stdin.read()):
    print(json.dumps({"case": name, "started": True}), flush=True)
    try:
        value = eval(code)
        if device == "cuda":
            torch.cuda.synchronize()
        result = {"case": name, "value": same(value) if isinstance(value, tuple) and len(value) == 2 else None}
    except BaseException as error:
        result = {"case": name, "error": type(error).__name__, "message": str(error)[:2000]}
    print(json.dumps(result), flush=True)
"""

# name -> (code evaluated in the child, expectation): ("raises", argument name, optional message pattern) or
# ("same",): the code gives (result on odd layouts, result on contiguous inputs), which must be equal.
REGRESSIONS = {
    # Splits [0, 10**6] as a strided view of [0, 25, 10**6] (N = 25): was a segfault (the check read 25).
    "sample proposal_splits b[::2]": ("o.sample(P[:25], b[::2], G[:2], T([0, 2]))", ("raises", "proposal_splits")),
    "sample gt_splits b[::2]": ("o.sample(P[:25], T([0, 25]), G[:2], T([0, 2, 10**6])[::2])",
                                ("raises", "gt_splits")),
    "sample_from_uniforms proposal_splits b[::2]": (
        "o.sample_from_uniforms(P[:25], b[::2], G[:2], T([0, 2]), U[:27])", ("raises", "proposal_splits")),
    "max_iou query_splits b[::2]": ("o.max_iou(P[:25], b[::2], G[:2], T([0, 2]))", ("raises", "query_splits")),
    "max_iou key_splits b[::2]": ("o.max_iou(G[:2], T([0, 2]), P[:25], b[::2])", ("raises", "key_splits")),
    "assign_bins splits b[::2]": ("o.assign_bins(U[:25], b[::2])", ("raises", "splits")),
    "weighted_sample splits b[::2]": ("o.weighted_sample(U[:25], U[:25], b[::2], T([5]), 5)", ("raises", "splits")),
    # Real splits [0, 25, 30] as a strided view with N = 25: must be refused, not read past the rows.
    "sample splits [0, 25, 30] as a strided view, N = 25": (
        "o.sample(P[:25], T([0, 7, 25, 9, 30])[::2], G[:3], T([0, 2, 3]))",
        ("raises", "proposal_splits", "must end at the row count")),
    "max_iou [0, 25, 30] view, N = 25": (
        "o.max_iou(P[:25], T([0, 7, 25, 9, 30])[::2], G, GS)", ("raises", "query_splits", "must end at the row count")),
    "assign_bins [0, 25, 30] view, N = 25": (
        "o.assign_bins(U[:25], T([0, 7, 25, 9, 30])[::2])", ("raises", "splits", "must end at the row count")),
    "weighted_sample [0, 25, 30] view, N = 25": (
        "o.weighted_sample(U[:25], U[:25], T([0, 7, 25, 9, 30])[::2], T([3, 3]), 4)",
        ("raises", "splits", "must end at the row count")),
    # A column of an offsets table and expanded zero splits are valid splits.
    "sample_from_uniforms splits = columns of a table": (
        "(o.sample_from_uniforms(P, table[:, 0], G, table[:, 1], U, pos_weight=2.0),"
        " o.sample_from_uniforms(P, PS, G, GS, U, pos_weight=2.0))", ("same",)),
    "sample splits = columns of a table": (
        "(o.sample(P, table[:, 0], G, table[:, 1], generator=gen()), o.sample(P, PS, G, GS, generator=gen()))",
        ("same",)),
    "max_iou splits = columns of a table": ("(o.max_iou(P, table[:, 0], G, table[:, 1]), o.max_iou(P, PS, G, GS))",
                                            ("same",)),
    "assign_bins splits = a column of a table": ("(o.assign_bins(U[:30], table[:, 0]), o.assign_bins(U[:30], PS))",
                                                 ("same",)),
    "weighted_sample splits = a column of a table": (
        "(o.weighted_sample(U[:30], U[:30], table[:, 0], T([4, 2]), 3),"
        " o.weighted_sample(U[:30], U[:30], PS, T([4, 2]), 3))", ("same",)),
    "sample expanded zero splits": (
        "(o.sample(P[:0], z, G[:0], z, generator=gen()), o.sample(P[:0], z.contiguous(), G[:0], z.contiguous(),"
        " generator=gen()))", ("same",)),
    "sample_from_uniforms expanded zero splits, GT present": (
        "(o.sample_from_uniforms(P[:0], z, G[:2], T([0, 2, 2]), U[:2]),"
        " o.sample_from_uniforms(P[:0], z.contiguous(), G[:2], T([0, 2, 2]), U[:2]))", ("same",)),
    "max_iou expanded zero splits": (
        "(o.max_iou(P[:0], z, G[:0], z), o.max_iou(P[:0], z.contiguous(), G[:0], z.contiguous()))", ("same",)),
    "assign_bins expanded zero splits": ("(o.assign_bins(U[:0], z), o.assign_bins(U[:0], z.contiguous()))", ("same",)),
    "weighted_sample expanded zero splits": (
        "(o.weighted_sample(U[:0], U[:0], z, T([1, 1]), 2),"
        " o.weighted_sample(U[:0], U[:0], z.contiguous(), T([1, 1]), 2))",
        ("same",)),
    # Sizes: refused before any allocation.
    "sample batch_size_per_image=2**31": ("o.sample(P, PS, G, GS, batch_size_per_image=2**31)",
                                          ("raises", "batch_size_per_image")),
    "sample batch_size_per_image=2**62": ("o.sample(P, PS, G, GS, batch_size_per_image=2**62)",
                                          ("raises", "batch_size_per_image")),
    "sample_from_uniforms batch_size_per_image=2**62": (
        "o.sample_from_uniforms(P, PS, G, GS, U, batch_size_per_image=2**62)", ("raises", "batch_size_per_image")),
    "weighted_sample max_count=2**62": ("o.weighted_sample(U[:30], U[:30], PS, T([4, 2]), 2**62)",
                                        ("raises", "max_count")),
    # pos_weight is stored as float32: beyond its max it would become inf.
    "sample pos_weight=1e39": ("o.sample(P, PS, G, GS, pos_weight=1e39)", ("raises", "pos_weight")),
    "sample_from_uniforms pos_weight=3.5e38": ("o.sample_from_uniforms(P, PS, G, GS, U, pos_weight=3.5e38)",
                                               ("raises", "pos_weight")),
    # Sparse boxes: a clear error, not "tensor has no storage".
    "sample sparse proposals": ("o.sample(P.to_sparse(), PS, G, GS)", ("raises", "proposals")),
    "sample_from_uniforms sparse proposals": ("o.sample_from_uniforms(P.to_sparse(), PS, G, GS, U)",
                                              ("raises", "proposals")),
    "sample sparse gt_boxes": ("o.sample(P, PS, G.to_sparse(), GS)", ("raises", "gt_boxes")),
    "sample sparse proposal_splits": ("o.sample(P, PS.to_sparse(), G, GS)", ("raises", "proposal_splits")),
    "max_iou sparse queries": ("o.max_iou(P.to_sparse(), PS, G, GS)", ("raises", "queries")),
    "box_iou sparse boxes2": ("o.box_iou(P, G.to_sparse())", ("raises", "boxes2")),
    "assign_bins sparse values": ("o.assign_bins(U[:30].to_sparse(), PS)", ("raises", "values")),
    "weighted_sample sparse weights": ("o.weighted_sample(U[:30].to_sparse(), U[:30], PS, T([4, 2]), 3)",
                                       ("raises", "weights")),
}
for _value in (math.nan, math.inf, -math.inf, -0.5, 1.0, 2.0):
    # sample_from_uniforms refuses the uniforms weighted_sample refuses.
    _bad_uniform = f"torch.tensor({_value!r}, dtype=torch.float64, device=device)"
    REGRESSIONS[f"sample_from_uniforms uniform {_value}"] = (
        f"o.sample_from_uniforms(P, PS, G, GS, torch.where(torch.arange(33, device=device) == 7, {_bad_uniform}, U))",
        ("raises", "uniforms"))
    REGRESSIONS[f"weighted_sample uniform {_value}"] = (
        f"o.weighted_sample(U[:30], torch.where(torch.arange(30, device=device) == 7, {_bad_uniform}, U[:30]),"
        f" PS, T([4, 2]), 3)", ("raises", "uniforms"))


def run_in_child(device: str, cases: dict) -> dict:
    """Run ``cases`` (name -> (code, expectation)) in child processes: a case that kills the interpreter is
    recorded as a crash and the child is restarted with the cases after it."""
    results, pending = {}, list(cases)
    # CUDA and ASan (its shadow memory) reserve more address space than that.
    limit = 0 if device == "cuda" or "libasan" in os.environ.get("LD_PRELOAD", "") else 8 << 30
    while pending:
        child = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", _CHILD, device, str(limit)],
            input=json.dumps([(name, cases[name][0]) for name in pending]),
            capture_output=True, text=True, timeout=600,
        )
        started = None
        for line in child.stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                started = record["case"] if record.get("started") else None
                if not record.get("started"):
                    results[record["case"]] = record
        if started is None and child.returncode != 0:
            raise AssertionError(f"child failed outside any case (rc {child.returncode}): {child.stderr[-3000:]}")
        if started is not None:
            results[started] = {"case": started, "crash": child.returncode, "stderr": child.stderr[-1500:]}
        pending = [name for name in pending if name not in results]
    return results


_child_results: dict = {}


def child_results(device: str) -> dict:
    if device not in _child_results:
        _child_results[device] = run_in_child(device, REGRESSIONS)
    return _child_results[device]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_regression(device, case):
    record = child_results(device)[case]
    assert "crash" not in record, f"child process died (rc {record.get('crash')}):\n{record.get('stderr')}"
    expectation = REGRESSIONS[case][1]
    if expectation[0] == "same":
        assert "error" not in record, f"{record.get('error')}: {record.get('message')}"
        assert record["value"] is True, "result differs from the result on contiguous inputs"
        return
    assert "error" in record, "accepted"
    assert record["error"] in ("ValueError", "TypeError"), f"{record['error']}: {record['message']}"
    assert names_argument(record["message"], expectation[1]), f"{record['error']}: {record['message']}"
    if len(expectation) > 2:
        assert re.search(expectation[2], record["message"]), record["message"]


def test_child_runner_reports_a_crash_and_goes_on():
    results = run_in_child("cpu", {"abort": ("__import__('os')._exit(3)", None), "after": ("(T([1]), T([1]))", None),
                                   "error": ("o.box_iou(T([1.0]), T([1.0]))", None)})
    assert results["abort"]["crash"] != 0
    assert results["after"]["value"] is True
    assert results["error"]["error"] == "ValueError" and "boxes1" in results["error"]["message"]
