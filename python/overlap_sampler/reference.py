"""Plain-PyTorch reference of the overlap_sampler ops, one image at a time.

This module is the independent, slow-but-obvious counterpart of the compiled kernels: the tests compare the
kernels with it exactly, and the benchmarks use it as "the per-image plain-PyTorch way" a detection researcher
would write (Python loop over the images, tensor ops inside an image, ``torchvision.ops.box_iou`` for every IoU
matrix). It imports nothing from the compiled part of the package.

Conventions (docs/ops.md):

* boxes are ``(x1, y1, x2, y2)`` rows, float16/32/64; IoU arithmetic runs in float32 for float16 boxes (the
  "accumulate type") and in the boxes' own dtype otherwise;
* a ragged batch concatenates the rows of all images, delimited by ``splits``, int64 ``[B+1]`` offsets;
* every argmax is explicit "lowest index among the maxima" (never ``torch.max``/``argmax`` tie behaviour);
* sampling without replacement is Efraimidis-Spirakis successive sampling: a candidate with weight ``w`` and
  uniform ``u`` gets the key ``log(u) / w`` (same order as ``u ** (1 / w)``) and the largest keys are drawn.
  Keys fall in tiers (``cpp/sampling_math.h``, ``sampling_key``): weight ``+inf`` is tier 2 (always first,
  uniform among themselves: key ``log(u)``), a positive weight tier 1, weight 0 tier 0 (only once tiers 1-2 are
  exhausted, key ``log(u)``). The draw order is tier descending, key descending, lower row first. Keys are
  float64 here; the kernels keep 62 bits of them, which can only matter for two keys one ulp apart.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torchvision

__all__ = [
    "box_iou",
    "max_iou",
    "assign_bins",
    "weighted_sample",
    "water_fill",
    "sample_from_uniforms",
    "sample",
]

_STRATEGIES = ("uniform", "hard", "soft", "soft_reference", "linear", "iou_balanced")
_MAX_BINS = 64  # kMaxBins in cpp/sampling_math.h
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the weights output is float32
_MAX_OUTPUT_WIDTH = 1 << 24  # kMaxOutputWidth and kMaxOutputEntries in cpp/checks.h
_MAX_OUTPUT_ENTRIES = (1 << 31) - 1


def _check_output_size(rows: int, width: int, name: str) -> None:
    """check_output_size of cpp/checks.cpp: the padded output's width and entries."""
    if width > _MAX_OUTPUT_WIDTH:
        raise ValueError(f"{name} must be at most {_MAX_OUTPUT_WIDTH} (the width of the padded output), got {width}")
    if rows and width > _MAX_OUTPUT_ENTRIES // rows:
        raise ValueError(f"{name} = {width} for {rows} rows would make an output of more than "
                         f"{_MAX_OUTPUT_ENTRIES} entries")


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype IoUs are computed in (at::opmath_type): float32 for float16, else the dtype itself."""
    return torch.float32 if dtype == torch.float16 else dtype


def _check_boxes(boxes: torch.Tensor, name: str) -> None:
    if boxes.dtype not in (torch.float16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be float16, float32 or float64, got {boxes.dtype}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape [R, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")


def _splits_list(splits: torch.Tensor, rows: int, name: str) -> List[int]:
    if splits.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {splits.dtype}")
    if splits.dim() != 1 or splits.numel() < 1:
        raise ValueError(f"{name} must be a 1-D offsets tensor [B+1], got shape {tuple(splits.shape)}")
    s = splits.tolist()
    if s[0] != 0:
        raise ValueError(f"{name} must start at 0, got {s[0]}")
    if s[-1] != rows:
        raise ValueError(f"{name} must end at the row count {rows}, got {s[-1]}")
    for i in range(1, len(s)):
        if s[i] < s[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, got {s[i - 1]} then {s[i]} at position {i}")
    return s


def _iou_acc(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU matrix of boxes already in their accumulate dtype, with ``box_iou_pair``'s zero rule.

    ``torchvision.ops.box_iou`` gives NaN for a zero union and, for inverted boxes (x2 < x1), a "negative area"
    that can flip the sign of a zero or the union. Every such case has zero intersection, where box_iou_pair
    returns exactly 0; whenever the intersection is positive both boxes have positive width and height and the
    two formulas are the same float operations. So "keep positive IoUs, 0 elsewhere" is box_iou_pair exactly.
    """
    iou = torchvision.ops.box_iou(boxes1, boxes2)
    return torch.where(iou > 0, iou, torch.zeros((), dtype=iou.dtype, device=iou.device))


def _masked_max(values: torch.Tensor, eligible: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise max of ``values`` [R, C] over ``eligible`` columns, with the lowest column on ties.

    Returns (max [R], column [R] int64); rows without an eligible column give 0 and -1.
    """
    rows, cols = values.shape
    if cols == 0 or rows == 0:
        return (
            torch.zeros(rows, dtype=values.dtype, device=values.device),
            torch.full((rows,), -1, dtype=torch.int64, device=values.device),
        )
    masked = torch.where(eligible, values, torch.full_like(values, -math.inf))
    best = masked.max(dim=1).values
    column = torch.arange(cols, device=values.device).expand(rows, cols)
    is_best = eligible & (masked == best[:, None])
    index = torch.where(is_best, column, torch.full_like(column, cols)).min(dim=1).values
    has = eligible.any(dim=1)
    best = torch.where(has, best, torch.zeros_like(best))
    index = torch.where(has, index, torch.full_like(index, -1))
    return best, index


def _bin_index(key: torch.Tensor, lower: float, upper: float, num_bins: int) -> torch.Tensor:
    """``bin_index`` of sampling_math.h on a float64 tensor: K equal bins over [lower, upper].

    0 when the range is empty (``not upper > lower``) or ``key <= lower``; the upper end and above go to the top
    bin. The division uses a tensor denominator: a CUDA scalar division would multiply by the reciprocal.
    """
    key = key.to(torch.float64)
    if not (upper > lower):
        return torch.zeros(key.shape, dtype=torch.int64, device=key.device)
    scaled = (key - lower) / torch.full_like(key, upper - lower) * num_bins
    # Clamp before the integer conversion so huge keys cannot overflow it; the result is min(K-1, trunc(...)).
    bins = scaled.clamp(max=float(num_bins)).to(torch.int64).clamp(max=num_bins - 1)
    return torch.where(key > lower, bins, torch.zeros_like(bins))


def _sampling_keys(uniforms: torch.Tensor, weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tier (int64) and float64 key of ``sampling_key(u, w)``: tier 2 for w = +inf, 1 for w > 0, 0 for w = 0."""
    u = uniforms.to(torch.float64)
    w = weights.to(torch.float64)
    tier = torch.ones(w.shape, dtype=torch.int64, device=w.device)
    tier = torch.where(w == 0, torch.zeros_like(tier), tier)
    tier = torch.where(w > 1.0e308, torch.full_like(tier, 2), tier)  # the kernels' test for +inf
    w = torch.where(tier == 1, w, torch.ones_like(w))
    log_u = torch.where(u > 0, torch.log(u), torch.full_like(u, -math.inf))
    key = log_u / w
    key = torch.where(key < 0, key, torch.full_like(key, -0.0))  # log(1) = 0 and the NaN guard
    return tier, key


def _draw_order(tier: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Positions in draw order: tier descending, key descending, lower position first.

    Two stable sorts, least significant criterion first; the initial order (ascending position) breaks the
    remaining ties.
    """
    by_key = torch.sort(key, descending=True, stable=True).indices
    by_tier = torch.sort(tier[by_key], descending=True, stable=True).indices
    return by_key[by_tier]


def _check_options(
    batch_size_per_image: int,
    positive_fraction: float,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    neg_strategy: str,
    pos_strategy: str,
    num_bins: int,
    hard_thresh: float,
    bin_upper: Optional[float],
    pos_weight: float,
    pos_key: str,
) -> None:
    """The option checks of cpp/sample_options.cpp (parse_sample_options), as ValueErrors."""
    if batch_size_per_image < 0:
        raise ValueError(f"batch_size_per_image must be >= 0, got {batch_size_per_image}")
    _check_output_size(0, batch_size_per_image, "batch_size_per_image")
    for name, value in (
        ("positive_fraction", positive_fraction),
        ("fg_iou_thresh", fg_iou_thresh),
        ("bg_iou_thresh", bg_iou_thresh),
    ):
        if not (0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if bg_iou_thresh > fg_iou_thresh:
        raise ValueError(f"bg_iou_thresh ({bg_iou_thresh}) must not exceed fg_iou_thresh ({fg_iou_thresh})")
    if not (1 <= num_bins <= _MAX_BINS):
        raise ValueError(f"num_bins must be in [1, {_MAX_BINS}], got {num_bins}")
    if not math.isfinite(hard_thresh):
        raise ValueError(f"hard_thresh must be finite, got {hard_thresh}")
    if bin_upper is not None and not (math.isfinite(bin_upper) and bin_upper > 0.0):
        raise ValueError(f"bin_upper must be a positive finite number or None, got {bin_upper}")
    if not (math.isfinite(pos_weight) and 0.0 <= pos_weight <= _FLOAT32_MAX):
        raise ValueError(f"pos_weight must be a finite number in [0, {_FLOAT32_MAX}] (the float32 maximum), "
                         f"got {pos_weight}")
    if pos_key not in ("negatives", "all"):
        raise ValueError(f"pos_key must be 'negatives' or 'all', got '{pos_key}'")
    if neg_strategy not in _STRATEGIES:
        raise ValueError(
            f"neg_strategy must be one of uniform, hard, soft, soft_reference, linear, iou_balanced; "
            f"got '{neg_strategy}'"
        )
    if pos_strategy == "iou_balanced":
        raise ValueError(
            "pos_strategy 'iou_balanced' is defined for negatives only (it bins IoU_g,n over [0, bg_iou_thresh))"
        )
    if pos_strategy not in _STRATEGIES:
        raise ValueError(
            f"pos_strategy must be one of uniform, hard, soft, soft_reference, linear; got '{pos_strategy}'"
        )


# --------------------------------------------------------------------------------------------------------------
# The elementary ops
# --------------------------------------------------------------------------------------------------------------


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of boxes: ``torchvision.ops.box_iou`` with 0 (never NaN) for a zero union.

    Args:
        boxes1: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``, float16/32/64.
        boxes2: ``[M, 4]`` boxes, same dtype and device as ``boxes1``.

    Returns:
        ``[N, M]`` IoU matrix in the input dtype. Modern convention (no +1 pixel); a degenerate or inverted box
        has IoU 0 with everything. float16 boxes are widened to float32 first and the result is rounded back.
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    if boxes1.dtype != boxes2.dtype:
        raise TypeError(f"boxes1 and boxes2 must share a dtype, got {boxes1.dtype} and {boxes2.dtype}")
    if boxes1.device != boxes2.device:
        raise ValueError(f"expected boxes1 and boxes2 on one device, got {boxes1.device} and {boxes2.device}")
    acc = _acc_dtype(boxes1.dtype)
    return _iou_acc(boxes1.to(acc), boxes2.to(acc)).to(boxes1.dtype)


def max_iou(
    queries: torch.Tensor,
    query_splits: torch.Tensor,
    keys: torch.Tensor,
    key_splits: torch.Tensor,
    query_mask: Optional[torch.Tensor] = None,
    key_mask: Optional[torch.Tensor] = None,
    exclude_self: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each query box, the largest IoU with a key box of its image, and which key.

    This is the reduction behind IoU_g,e (examples vs GT), IoU_p,n (negatives vs positives) and the positive key
    IoU_p,e of the paper (Sec. 3.2).

    Args:
        queries: ``[Q, 4]`` boxes ``(x1, y1, x2, y2)``, float16/32/64.
        query_splits: int64 ``[B+1]`` offsets of the images' query rows.
        keys: ``[K, 4]`` boxes, same dtype and device as ``queries``.
        key_splits: int64 ``[B+1]`` offsets of the images' key rows.
        query_mask: optional bool ``[Q]``; a false query gets value 0 and index -1.
        key_mask: optional bool ``[K]``; only true keys are eligible.
        exclude_self: skip the key with the same local index as the query (requires equal splits).

    Returns:
        ``values`` ``[Q]`` in the box dtype (the max is taken in the accumulate dtype, then rounded) and
        ``indices`` int64 ``[Q]``: the global key row of the max, lowest row on ties, -1 when no key is eligible.
    """
    _check_boxes(queries, "queries")
    _check_boxes(keys, "keys")
    if queries.dtype != keys.dtype:
        raise TypeError(f"queries and keys must share a dtype, got {queries.dtype} and {keys.dtype}")
    qs = _splits_list(query_splits, queries.shape[0], "query_splits")
    ks = _splits_list(key_splits, keys.shape[0], "key_splits")
    if len(qs) != len(ks):
        raise ValueError(
            f"query_splits and key_splits must describe the same number of images, got {len(qs) - 1} and "
            f"{len(ks) - 1}"
        )
    if exclude_self and qs != ks:
        raise ValueError("exclude_self requires query_splits equal to key_splits")
    for mask, rows, name in ((query_mask, queries.shape[0], "query_mask"), (key_mask, keys.shape[0], "key_mask")):
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"{name} must be bool, got {mask.dtype}")
            if mask.dim() != 1 or mask.shape[0] != rows:
                raise ValueError(f"{name} must have shape [{rows}], got {tuple(mask.shape)}")

    for t, name in ((queries, "queries"), (keys, "keys")):
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values")

    acc = _acc_dtype(queries.dtype)
    device = queries.device
    values = torch.zeros(queries.shape[0], dtype=acc, device=device)
    indices = torch.full((queries.shape[0],), -1, dtype=torch.int64, device=device)
    for b in range(len(qs) - 1):
        q0, q1, k0, k1 = qs[b], qs[b + 1], ks[b], ks[b + 1]
        if q1 == q0:
            continue
        iou = _iou_acc(queries[q0:q1].to(acc), keys[k0:k1].to(acc))
        eligible = torch.ones(iou.shape, dtype=torch.bool, device=device)
        if key_mask is not None:
            eligible &= key_mask[k0:k1][None, :]
        if query_mask is not None:
            eligible &= query_mask[q0:q1][:, None]
        if exclude_self:
            eligible &= ~torch.eye(q1 - q0, k1 - k0, dtype=torch.bool, device=device)
        best, column = _masked_max(iou, eligible)
        values[q0:q1] = best
        indices[q0:q1] = torch.where(column >= 0, column + k0, column)
    return values.to(queries.dtype), indices


def assign_bins(
    values: torch.Tensor,
    splits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    num_bins: int = 2,
    upper: Optional[float] = None,
) -> torch.Tensor:
    """Bin of each value among ``num_bins`` equal bins over ``[0, upper_b]`` (paper Eq. 2's intervals).

    Args:
        values: float32/64 ``[R]`` (e.g. IoU_p,n keys), rows of all images concatenated.
        splits: int64 ``[B+1]`` offsets of the images' rows.
        mask: optional bool ``[R]``; false rows get -1 and do not count for the image's max.
        num_bins: K >= 1.
        upper: fixed upper end of the range; None = the image's max of the (masked) values, 0 if none.

    Returns:
        int64 ``[R]``: ``bin_index(value, 0, upper_b, K)`` computed in float64: 0 if ``upper_b <= 0`` or
        ``value <= 0``, else ``min(K - 1, int(value / upper_b * K))``; -1 where ``mask`` is false.
    """
    if values.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"values must be float32 or float64, got {values.dtype}")
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D [R], got shape {tuple(values.shape)}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    s = _splits_list(splits, values.shape[0], "splits")
    out = torch.full(values.shape, -1, dtype=torch.int64, device=values.device)
    for b in range(len(s) - 1):
        r0, r1 = s[b], s[b + 1]
        if r1 == r0:
            continue
        v = values[r0:r1].to(torch.float64)
        m = mask[r0:r1] if mask is not None else torch.ones(r1 - r0, dtype=torch.bool, device=values.device)
        if upper is not None:
            upper_b = float(upper)
        else:
            upper_b = v[m].max().item() if bool(m.any()) else 0.0
        bins = _bin_index(v, 0.0, upper_b, num_bins)
        out[r0:r1] = torch.where(m, bins, torch.full_like(bins, -1))
    return out


def weighted_sample(
    weights: torch.Tensor,
    uniforms: torch.Tensor,
    splits: torch.Tensor,
    counts: torch.Tensor,
    max_count: int,
) -> torch.Tensor:
    """Successive weighted sampling without replacement inside each segment (Efraimidis-Spirakis).

    Row r gets the key ``log(u_r) / w_r`` in float64 (the order of ``u_r ** (1 / w_r)``), with the tiers of
    ``sampling_key``: weight +inf first (uniform among themselves), then positive weights, then weight 0. Drawing
    the t largest keys has the distribution of ``numpy.random.Generator.choice(replace=False, p=w / w.sum())``.

    Args:
        weights: float32/64 ``[R]``, ``>= 0``, ``+inf`` allowed, no NaN.
        uniforms: float32/64 ``[R]`` in ``[0, 1)`` (converted to float64).
        splits: int64 ``[S+1]``: segment s is rows ``[splits[s], splits[s+1])``.
        counts: int64 ``[S]``, how many rows to draw from each segment.
        max_count: width of the output, ``>= 0``.

    Returns:
        int64 ``[S, max_count]``: row s holds the global row indices of the ``t = min(counts[s], segment size,
        max_count)`` drawn rows in draw order (key descending, then row ascending), then -1.
    """
    if weights.dim() != 1 or uniforms.shape != weights.shape:
        raise ValueError(
            f"weights and uniforms must be 1-D of one length, got {tuple(weights.shape)} and {tuple(uniforms.shape)}"
        )
    if max_count < 0:
        raise ValueError(f"max_count must be >= 0, got {max_count}")
    s = _splits_list(splits, weights.shape[0], "splits")
    _check_output_size(len(s) - 1, max_count, "max_count")
    if counts.dim() != 1 or counts.shape[0] != len(s) - 1:
        raise ValueError(f"counts must have shape [{len(s) - 1}], got {tuple(counts.shape)}")
    c = counts.tolist()
    out = torch.full((len(s) - 1, max_count), -1, dtype=torch.int64, device=weights.device)
    tier, key = _sampling_keys(uniforms, weights)
    for seg in range(len(s) - 1):
        r0, r1 = s[seg], s[seg + 1]
        if c[seg] < 0:
            raise ValueError(f"counts must be >= 0, got {c[seg]} for segment {seg}")
        t = min(c[seg], r1 - r0, max_count)
        if t <= 0:
            continue
        order = _draw_order(tier[r0:r1], key[r0:r1])[:t]
        out[seg, :t] = order + r0
    return out


def water_fill(counts: Sequence[int], quota: int) -> List[int]:
    """Per-bin takes of ``quota`` over bins holding ``counts`` candidates (the soft strategy's quotas, Eq. 2).

    Every bin gets the same level t, the largest with ``sum(min(count, t)) <= quota``; the remainder then goes one
    each to the bins still holding more than t, highest bin (most overlapped) first. When ``quota >= sum(counts)``
    every bin gives all it has. The takes never exceed a bin's count and sum to ``min(quota, sum(counts))``.

    Args:
        counts: candidates per bin, K non-negative ints.
        quota: how many to take in all.

    Returns:
        The K takes, as a list of ints.
    """
    counts = [int(c) for c in counts]
    if quota >= sum(counts):
        return list(counts)
    # The largest level t with sum(min(count, t)) <= quota (a linear scan would do too; this is the same t).
    lo, hi = 0, max(counts, default=0)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        if sum(min(c, mid) for c in counts) <= quota:
            lo = mid
        else:
            hi = mid - 1
    take = [min(c, lo) for c in counts]
    remaining = quota - sum(take)
    for k in range(len(counts) - 1, -1, -1):
        if remaining <= 0:
            break
        if counts[k] > lo:
            take[k] += 1
            remaining -= 1
    return take


# --------------------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------------------


def _select(
    strategy: str,
    keys: torch.Tensor,
    uniforms: torch.Tensor,
    quota: int,
    num_bins: int,
    hard_thresh: float,
    bin_upper: Optional[float],
    bg_iou_thresh: float,
) -> torch.Tensor:
    """Positions (into the class's candidate list, ascending example id) of the ``quota`` candidates drawn.

    ``keys`` float64 and ``uniforms`` float64, one per candidate; ``quota <= len(keys)``.
    """
    device = keys.device
    if quota <= 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if strategy in ("soft", "iou_balanced"):
        # Eq. 2: K equal bins, an exact (water-filled) share of the quota per bin, uniform inside a bin.
        if bin_upper is not None:
            upper = float(bin_upper)
        elif strategy == "iou_balanced":
            upper = float(bg_iou_thresh)
        else:
            upper = keys.max().item()
        bins = _bin_index(keys, 0.0, upper, num_bins)
        take = water_fill(torch.bincount(bins, minlength=num_bins).tolist(), quota)
        tier, key = _sampling_keys(uniforms, torch.ones_like(uniforms))
        chosen = []
        for k in range(num_bins):
            if take[k] == 0:
                continue
            members = torch.nonzero(bins == k).squeeze(1)
            chosen.append(members[_draw_order(tier[members], key[members])[: take[k]]])
        return torch.cat(chosen)
    if strategy == "soft_reference":
        # The released code's layout: bins over [min key, max key], equal probability mass per non-empty bin.
        bins = _bin_index(keys, keys.min().item(), keys.max().item(), num_bins)
        per_bin = torch.bincount(bins, minlength=num_bins)
        non_empty = int((per_bin > 0).sum().item())
        weights = 1.0 / (per_bin[bins] * non_empty).to(torch.float64)
    elif strategy == "hard":
        # Eq. 1: every key >= theta first (weight +inf), then uniform over the rest.
        weights = torch.where(keys >= hard_thresh, torch.full_like(keys, math.inf), torch.ones_like(keys))
    elif strategy == "linear":
        # Eq. 3: probability proportional to the key; key 0 only after every positive key.
        weights = torch.where(keys > 0, keys, torch.zeros_like(keys))
    else:  # uniform
        weights = torch.ones_like(keys)
    tier, key = _sampling_keys(uniforms, weights)
    return _draw_order(tier, key)[:quota]


def sample_from_uniforms(
    proposals: torch.Tensor,
    proposal_splits: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_splits: torch.Tensor,
    uniforms: torch.Tensor,
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
    pos_key: str = "negatives",
    validate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Overlap Sampler for a batch, given one uniform per example (docs/ops.md).

    Per image b, independently:

    1. examples: its proposals, then (``append_gt``) copies of its GT boxes. Global example id: proposal row
       ``ps[b] + e``; GT copy ``N + gs[b] + j``. ``uniforms[id]`` is the example's uniform.
    2. matching: IoU_g,e = max IoU with the image's GT boxes, ``matched`` = its GT row (lowest on ties; -1 without
       GT). A GT copy is matched to its own row and is positive. Positive: GT copy or IoU_g,e >= fg_iou_thresh
       (the latter needs a GT in the image); else negative if IoU_g,e < bg_iou_thresh; else ignored.
    3. keys: a negative's key is IoU_p,n = max IoU with every positive of the image (``iou_balanced``: IoU_g,n);
       a positive's key is its max IoU with every negative (``pos_key="all"``: with every other example);
       0 when there is none. Computed in the boxes' accumulate dtype, then float64.
    4. quotas: ``qp = min(floor(batch_size_per_image * positive_fraction + 0.5), P)``,
       ``qn = min(batch_size_per_image - qp, negatives)``.
    5. selection of qp positives with ``pos_strategy`` and qn negatives with ``neg_strategy``: ``uniform``;
       ``hard`` (Eq. 1: keys >= hard_thresh first); ``soft`` (Eq. 2: K bins over [0, max key] or
       [0, bin_upper], water-filled per-bin quotas, uniform inside a bin); ``soft_reference`` (bins over
       [min key, max key], weight 1 / (bin count * non-empty bins), one weighted draw); ``linear`` (Eq. 3: weight =
       key, key 0 last); ``iou_balanced`` (negatives only: ``soft`` on IoU_g,n over [0, bg_iou_thresh)).
    6. output row b: selected positives in ascending example id, then selected negatives likewise, then -1.
       ``weights`` is 1 for selected examples and 0 for padding, except that for each GT row, the selected
       positive matched to it (GT copies excluded) with the largest IoU_g,e (lowest id on ties) gets
       ``pos_weight`` (the paper's epsilon).

    Args:
        proposals: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``, float16/32/64.
        proposal_splits: int64 ``[B+1]`` offsets of the images' proposals.
        gt_boxes: ``[G, 4]`` boxes, same dtype and device as ``proposals``.
        gt_splits: int64 ``[B+1]`` offsets of the images' GT boxes.
        uniforms: float64 ``[E]`` in ``[0, 1)``, ``E = N + (G if append_gt else 0)``.
        validate: also check box coordinates are finite and GT boxes ordered (x2 >= x1, y2 >= y1).
        Other keywords: as ``sample``.

    Returns:
        ``indices`` int64 ``[B, batch_size_per_image]`` (global example ids, -1 padded), ``matched_gt`` int64
        (global GT row of each selected positive, -1 otherwise), ``weights`` float32, ``num_pos`` int64 ``[B]``
        (= qp), ``num_neg`` int64 ``[B]`` (= qn); all on the device of ``proposals``.
    """
    _check_options(
        batch_size_per_image, positive_fraction, fg_iou_thresh, bg_iou_thresh, neg_strategy, pos_strategy,
        num_bins, hard_thresh, bin_upper, pos_weight, pos_key,
    )
    _check_boxes(proposals, "proposals")
    _check_boxes(gt_boxes, "gt_boxes")
    if proposals.dtype != gt_boxes.dtype:
        raise TypeError(f"proposals and gt_boxes must share a dtype, got {proposals.dtype} and {gt_boxes.dtype}")
    device = proposals.device
    for t, name in ((gt_boxes, "gt_boxes"), (proposal_splits, "proposal_splits"), (gt_splits, "gt_splits"),
                    (uniforms, "uniforms")):
        if t.device != device:
            raise ValueError(f"expected {name} and proposals on one device, got {t.device} and {device}")
    num_proposals, num_gt = proposals.shape[0], gt_boxes.shape[0]
    ps = _splits_list(proposal_splits, num_proposals, "proposal_splits")
    gs = _splits_list(gt_splits, num_gt, "gt_splits")
    if len(ps) != len(gs):
        raise ValueError(
            f"proposal_splits and gt_splits must describe the same number of images, got {len(ps) - 1} and "
            f"{len(gs) - 1}"
        )
    examples = num_proposals + (num_gt if append_gt else 0)
    if uniforms.dtype != torch.float64:
        raise TypeError(f"uniforms must be float64, got {uniforms.dtype}")
    if uniforms.dim() != 1 or uniforms.shape[0] != examples:
        raise ValueError(
            f"uniforms must have shape [{examples}] (one per proposal, plus one per GT box with append_gt), "
            f"got {tuple(uniforms.shape)}"
        )
    if validate:
        for t, name in ((proposals, "proposals"), (gt_boxes, "gt_boxes")):
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or infinite values")
        if num_gt and not bool(((gt_boxes[:, 2] >= gt_boxes[:, 0]) & (gt_boxes[:, 3] >= gt_boxes[:, 1])).all()):
            raise ValueError("gt_boxes has a box with x2 < x1 or y2 < y1 (expected x1, y1, x2, y2)")
        if uniforms.numel() and not bool(((uniforms >= 0) & (uniforms < 1)).all()):
            raise ValueError("uniforms must lie in [0, 1) (no NaN or infinity)")

    num_images = len(ps) - 1
    _check_output_size(num_images, batch_size_per_image, "batch_size_per_image")
    width = batch_size_per_image
    quota_pos = int(math.floor(batch_size_per_image * positive_fraction + 0.5))
    acc = _acc_dtype(proposals.dtype)
    out_indices = torch.full((num_images, width), -1, dtype=torch.int64, device=device)
    out_matched = torch.full((num_images, width), -1, dtype=torch.int64, device=device)
    out_weights = torch.zeros((num_images, width), dtype=torch.float32, device=device)
    out_num_pos = torch.zeros(num_images, dtype=torch.int64, device=device)
    out_num_neg = torch.zeros(num_images, dtype=torch.int64, device=device)
    neg_needs_iou_pn = neg_strategy not in ("uniform", "iou_balanced")

    for b in range(num_images):
        p0, p1, g0, g1 = ps[b], ps[b + 1], gs[b], gs[b + 1]
        n_b, g_b = p1 - p0, g1 - g0
        gts = gt_boxes[g0:g1].to(acc)
        ids = torch.arange(p0, p1, device=device)
        boxes = proposals[p0:p1].to(acc)
        is_gt = torch.zeros(n_b, dtype=torch.bool, device=device)
        if append_gt:
            ids = torch.cat([ids, torch.arange(num_proposals + g0, num_proposals + g1, device=device)])
            boxes = torch.cat([boxes, gts])
            is_gt = torch.cat([is_gt, torch.ones(g_b, dtype=torch.bool, device=device)])
        num_examples = boxes.shape[0]
        if num_examples == 0:
            continue
        u = uniforms[ids]

        # 2. Matching: IoU_g,e and the matched GT row.
        iou_ge = _iou_acc(boxes, gts)
        iou_g, matched = _masked_max(iou_ge, torch.ones(iou_ge.shape, dtype=torch.bool, device=device))
        matched = torch.where(matched >= 0, matched + g0, matched)
        if append_gt:
            matched[n_b:] = torch.arange(g0, g1, device=device)
        # Thresholds are converted to the IoU's type before comparing (docs/ops.md), as torchvision's Matcher
        # does by comparing its float IoUs with Python floats: a box whose IoU is exactly 0.7 in float32 is
        # positive for fg_iou_thresh=0.7, although float32(0.7) < 0.7 as doubles.
        fg = torch.tensor(fg_iou_thresh, dtype=acc)
        bg = torch.tensor(bg_iou_thresh, dtype=acc)
        # A proposal is positive only with a GT to match (docs/ops.md: an image without GT has only negatives;
        # this matters only for fg_iou_thresh == 0, where IoU 0 >= fg would otherwise make GT-less positives).
        positive = is_gt | ((iou_g >= fg) & (matched >= 0))
        negative = ~positive & (iou_g < bg)
        pos = torch.nonzero(positive).squeeze(1)
        neg = torch.nonzero(negative).squeeze(1)

        # 3. Keys. One IoU matrix serves both directions (IoU is symmetric, bit for bit).
        iou_np = None
        if (neg_needs_iou_pn and neg.numel() and pos.numel()) or (
            pos_key == "negatives" and pos_strategy != "uniform" and neg.numel() and pos.numel()
        ):
            iou_np = _iou_acc(boxes[neg], boxes[pos])  # [negatives, positives]
        neg_key = torch.zeros(neg.numel(), dtype=acc, device=device)
        if neg_strategy == "iou_balanced":
            neg_key = iou_g[neg]
        elif neg_needs_iou_pn and iou_np is not None:
            neg_key = iou_np.max(dim=1).values
        pos_key_values = torch.zeros(pos.numel(), dtype=acc, device=device)
        if pos_strategy != "uniform" and pos.numel():
            if pos_key == "all":
                iou_pe = _iou_acc(boxes[pos], boxes)
                iou_pe[torch.arange(pos.numel(), device=device), pos] = 0  # IoUs are >= 0: 0 never wins
                pos_key_values = iou_pe.max(dim=1).values
            elif iou_np is not None:
                pos_key_values = iou_np.max(dim=0).values

        # 4. Quotas.
        qp = min(quota_pos, pos.numel())
        qn = min(batch_size_per_image - qp, neg.numel())

        # 5. Selection, then ascending example id (local order is example-id order).
        sel_pos = pos[torch.sort(_select(pos_strategy, pos_key_values.to(torch.float64), u[pos], qp, num_bins,
                                         hard_thresh, bin_upper, bg_iou_thresh)).values]
        sel_neg = neg[torch.sort(_select(neg_strategy, neg_key.to(torch.float64), u[neg], qn, num_bins,
                                         hard_thresh, bin_upper, bg_iou_thresh)).values]

        # 6. Output row.
        chosen = torch.cat([sel_pos, sel_neg])
        out_indices[b, : chosen.numel()] = ids[chosen]
        out_matched[b, :qp] = matched[sel_pos]
        row_weights = torch.ones(chosen.numel(), dtype=torch.float32, device=device)
        if pos_weight != 1.0 and qp:
            # Epsilon: per GT row, the best-overlapping selected positive that is not the GT's own copy.
            slots = torch.nonzero(~is_gt[sel_pos] & (matched[sel_pos] >= 0)).squeeze(1)  # slots in the row
            if slots.numel():
                gt_local = matched[sel_pos[slots]] - g0
                quality = iou_g[sel_pos[slots]]
                best = torch.full((g_b,), -math.inf, dtype=acc, device=device)
                best = best.scatter_reduce(0, gt_local, quality, reduce="amax")
                is_best = quality == best[gt_local]
                # Slots are in ascending example id, so the lowest slot is the lowest id.
                first = torch.full((g_b,), width, dtype=torch.int64, device=device)
                first = first.scatter_reduce(0, gt_local[is_best], slots[is_best], reduce="amin")
                winners = first[first < width]
                row_weights[winners] = torch.tensor(pos_weight, dtype=torch.float32, device=device)
        out_weights[b, : chosen.numel()] = row_weights
        out_num_pos[b] = qp
        out_num_neg[b] = qn

    return out_indices, out_matched, out_weights, out_num_pos, out_num_neg


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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Overlap Sampler (paper Sec. 3.2) for a batch of images: which RoIs the RoI head trains on.

    Draws one uniform per example, ``torch.rand(E, dtype=torch.float64, device=proposals.device,
    generator=generator)`` with ``E = N + (G if append_gt else 0)``, and calls :func:`sample_from_uniforms`.

    Args:
        proposals: ``[N, 4]`` RPN proposals ``(x1, y1, x2, y2)`` of all images, float16/32/64.
        proposal_splits: int64 ``[B+1]`` offsets of the images' proposals.
        gt_boxes: ``[G, 4]`` ground-truth boxes, same dtype and device.
        gt_splits: int64 ``[B+1]`` offsets of the images' GT boxes.
        batch_size_per_image: RoIs per image (output width), 512.
        positive_fraction: positives take at most ``floor(batch_size_per_image * positive_fraction + 0.5)``.
        fg_iou_thresh: positive when IoU_g,e >= this (GT copies always positive).
        bg_iou_thresh: negative when IoU_g,e < this.
        append_gt: add each image's GT boxes as extra examples.
        neg_strategy: ``uniform``, ``hard`` (Eq. 1), ``soft`` (Eq. 2, default), ``soft_reference``, ``linear``
            (Eq. 3) or ``iou_balanced`` (Libra R-CNN).
        pos_strategy: as ``neg_strategy`` except ``iou_balanced``; default ``uniform``.
        num_bins: K of the soft strategies, 1..64.
        hard_thresh: theta of ``hard`` (the test NMS threshold).
        bin_upper: fixed upper end of the soft bins (None: the image's max key).
        pos_weight: epsilon, the loss weight of each GT's best-overlapping sampled positive.
        generator: source of the uniforms.
        pos_key: ``negatives`` (IoU_p,e over negatives, paper Fig. 3) or ``all`` (over every other example).
        validate: check finite coordinates and ordered GT boxes.

    Returns:
        ``(indices, matched_gt, weights, num_pos, num_neg)`` as :func:`sample_from_uniforms`.
    """
    _check_options(
        batch_size_per_image, positive_fraction, fg_iou_thresh, bg_iou_thresh, neg_strategy, pos_strategy,
        num_bins, hard_thresh, bin_upper, pos_weight, pos_key,
    )
    _check_boxes(proposals, "proposals")
    _check_boxes(gt_boxes, "gt_boxes")
    examples = proposals.shape[0] + (gt_boxes.shape[0] if append_gt else 0)
    uniforms = torch.rand(examples, dtype=torch.float64, device=proposals.device, generator=generator)
    return sample_from_uniforms(
        proposals, proposal_splits, gt_boxes, gt_splits, uniforms,
        batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction,
        fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh, append_gt=append_gt,
        neg_strategy=neg_strategy, pos_strategy=pos_strategy, num_bins=num_bins, hard_thresh=hard_thresh,
        bin_upper=bin_upper, pos_weight=pos_weight, pos_key=pos_key, validate=validate,
    )
