"""Libra R-CNN's RoI sampler as mmdetection configures it for ``libra-faster-rcnn``.

mmdetection's ``CombinedSampler(num=512, pos_fraction=0.25, add_gt_as_proposals=True)`` with
``InstanceBalancedPosSampler`` for the positives and ``IoUBalancedNegSampler(floor_thr=-1,
floor_fraction=0, num_bins=3)`` for the negatives (``docs``: ``shared/design/rivals.md`` section 2).
Every pick has loss weight 1. The whole batch is sampled at once, with no per-image loop: every random
choice below ("draw k uniformly from a pool") gives each example of the pool its own random int64 key,
ranks the pool inside its (image, group) segment by one stable argsort of the composite key
``segment * 2**31 + key``, and keeps the ranks below the segment's quota (counts by ``bincount``, starts
by ``cumsum``): a uniform k-subset of each segment. Each step draws fresh keys, so the steps are as
independent as the per-image draws of the reference.

Sources, and where we depart from one:

* **Quotas** (MM ``BaseSampler``): ``q+ = int(batch_size_per_image * positive_fraction)`` (MM and
  torchvision truncate); positives are drawn first, ``q- = batch_size_per_image - #positives taken``.
  A sampler with no more candidates than its quota returns them all.
* **Positives, instance-balanced** (MM; the paper only says "equal positives per GT" and gives no
  number). When an image has more than ``q+`` positives: ``g`` = distinct matched GTs among them,
  ``m = int(round(q+ / g) + 1)`` with Python's ``round`` (half to even); per GT all its positives if
  ``<= m`` else ``m`` uniform; ``S`` = their union; if ``|S| < q+`` the ``q+ - |S|`` missing ones are
  drawn uniformly from the other positives, if ``|S| > q+`` a uniform ``q+``-subset of ``S`` is kept.
  **MM quirk not reproduced:** MM draws the extras from ``set(pos_inds) - set(sampled_inds)``, sets of
  0-d tensors hashed by identity, so the difference removes nothing and the extras can repeat members
  of ``S``; the later ``unique()`` then drops those repeats, leaving fewer positives (and more
  negatives). In rivals.md case 2 with ``q+ = 5`` MM ends with 4 positives with probability 4/7; we
  always take ``min(q+, #positives)`` distinct positives (the evident intent).
* **Negatives, IoU-balanced** (MM; the paper's 3 equal bins with no rule for short bins, which MM
  supplies). When an image has more than ``q-`` negatives:

  1. ``floor_thresh > 0``: floor = {IoU_g,e < floor_thresh}, balanced set bal = {IoU_g,e >= floor_thresh};
     ``== 0``: floor = {IoU_g,e = 0}, bal = {IoU_g,e > 0}; ``== -1``: floor = {}, bal = every negative,
     bins start at 0.
  2. ``q_b = int(q- * (1 - floor_fraction))``. If ``|bal| > q_b``: ``num_bins >= 2`` -> step 3,
     ``num_bins == 1`` -> ``q_b`` uniform from bal; else all of bal.
  3. ``M`` = the image's max IoU_g,e over **all** its examples (its GT copies included, so 1.0 when it
     has a non-degenerate GT; MM sets GT copies' IoU to 1 unconditionally, we use the matched value);
     width ``w = (M - lo) / num_bins`` with ``lo = max(floor_thresh, 0)``; bin ``i`` =
     ``[lo + i*w, lo + (i+1)*w)``; ``int(q_b / num_bins)`` uniform per bin (all if fewer); the shortfall
     to ``q_b`` uniform from the untaken bal. So with ``M = 1`` and 3 bins the last bin ``[2/3, 1)``
     never holds a negative (the paper's bins over the negative range are not what MM does).
     Edges are computed in float64 from the float32 IoU (MM's precision depends on the numpy version;
     IoUs on an edge are a tie no source defines).
  4. ``q- - taken`` uniform from the floor (all if fewer). 5. Still short: uniform from the untaken
     negatives.

  **floor_thresh = -1:** MM's ``IoUBalancedNegSampler`` rewrites its own ``floor_thr`` to 0 during its
  first call, so from the second call on it behaves as ``floor_thresh=0`` (IoU-0 negatives only fill
  leftovers). This function is stateless: ``-1`` means "no floor" on *every* call, i.e. MM's first
  call. Pass ``floor_thresh=0`` for MM's behaviour from its second call on.

  **An image whose max IoU is 0** (no GT, or only degenerate GT): every bin has width 0 and is empty
  in MM too, so the bins take nothing and the shortfall step draws the whole of ``q_b`` uniformly
  from bal; steps 4 and 5 are uniform as well. We keep that: such an image's negatives are drawn
  uniformly (``min(q-, #negatives)`` of them), whatever the floor settings.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ..ops import SampleResult
from .examples import ExampleBatch, pack_selection, segment_rank

__all__ = ["libra_select"]

# One row of random keys per random step, so that no step reuses another's draws.
_K_PER_GT, _K_POS_FILL, _K_BIN, _K_BAL_FILL, _K_FLOOR, _K_NEG_FILL = range(6)
_NUM_KEYS = 6
_KEY_BITS = 31  # random keys: int64 in [0, 2**31)


def _check_args(batch_size_per_image, positive_fraction, num_bins, floor_thresh, floor_fraction) -> None:
    """``ValueError`` naming the first bad argument, its expectation and what it got."""
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def is_real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    if not is_int(batch_size_per_image) or batch_size_per_image < 1:
        raise ValueError(f"batch_size_per_image must be an int >= 1, got {batch_size_per_image!r}")
    if not is_real(positive_fraction) or not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be a number in [0, 1], got {positive_fraction!r}")
    if not is_int(num_bins) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    if not is_real(floor_thresh) or not (floor_thresh == -1 or 0.0 <= floor_thresh <= 1.0):
        raise ValueError(f"floor_thresh must be -1 (no floor) or a number in [0, 1], got {floor_thresh!r}")
    if not is_real(floor_fraction) or not 0.0 <= floor_fraction <= 1.0:
        raise ValueError(f"floor_fraction must be a number in [0, 1], got {floor_fraction!r}")


def _draw(pool: Tensor, group: Tensor, quota: Tensor, key: Tensor, num_groups: int) -> Tensor:
    """bool ``[E]``: a uniform ``min(quota[g], |pool in g|)``-subset of each group ``g`` of ``pool``.

    pool: bool ``[E]``; group: int64 ``[E]`` in ``[0, num_groups)``; quota: int64 ``[num_groups]``
    (negative counts as 0); key: the step's own random int64 keys ``[E]``.
    """
    segment = torch.where(pool, group, torch.full_like(group, num_groups))
    rank = segment_rank([segment], [key])
    return pool & (rank < quota[group])


def _count(mask: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """int64 ``[num_groups]``: how many ``mask`` elements each group has (no boolean indexing: no host sync)."""
    return torch.zeros(num_groups, dtype=torch.int64, device=mask.device).index_add_(0, group, mask.to(torch.int64))


def _select_positives(batch: ExampleBatch, keys: Tensor, pos_quota: int) -> Tensor:
    """bool ``[E]``: the instance-balanced positives, ``min(q+, #positives)`` per image (MM, quirk fixed)."""
    image, num_images = batch.image, batch.num_images
    positive = batch.label == 1
    num_gt = batch.gt_boxes.shape[0]
    if num_gt == 0:  # no GT, no positives (label 1 needs a GT)
        return positive
    n_pos = _count(positive, image, num_images)
    # g: distinct matched GTs among each image's positives (a GT's copy row N + j carries its image).
    gt = batch.matched_gt.clamp(min=0)
    per_gt = _count(positive, gt, num_gt)
    gt_image = batch.image[batch.num_proposals:]
    g = _count(per_gt > 0, gt_image, num_images)
    # m = int(round(q+ / g) + 1): float64 division as Python's, torch.round is half to even as round().
    m = (torch.round(pos_quota / g.clamp(min=1).to(torch.float64)) + 1).to(torch.int64)
    in_s = _draw(positive, gt, m[gt_image], keys[_K_PER_GT], num_gt)
    s_size = _count(in_s, image, num_images)
    # One more draw per image: a q+-subset of S when S is too big, else the missing q+ - |S| from
    # the other positives (none when |S| == q+).
    s_big = s_size > pos_quota
    pool = positive & torch.where(s_big[image], in_s, ~in_s)
    quota = torch.where(s_big, torch.full_like(s_size, pos_quota), pos_quota - s_size)
    drawn = _draw(pool, image, quota, keys[_K_POS_FILL], num_images)
    balanced = drawn | (in_s & ~s_big[image])
    over = (n_pos > pos_quota)[image]
    return torch.where(over, balanced, positive)


def _select_negatives(batch: ExampleBatch, keys: Tensor, neg_quota: Tensor, num_bins: int, floor_thresh: float,
                      floor_fraction: float) -> Tensor:
    """bool ``[E]``: the IoU-balanced negatives, ``min(q-, #negatives)`` per image (MM steps 1-5).

    neg_quota: int64 ``[B]``, q- of each image.
    """
    image, num_images, iou = batch.image, batch.num_images, batch.iou
    negative = batch.label == 0
    n_neg = _count(negative, image, num_images)
    # Step 1: floor and balanced sets.
    if floor_thresh > 0:
        floor, bal = negative & (iou < floor_thresh), negative & (iou >= floor_thresh)
    elif floor_thresh == 0:
        floor, bal = negative & (iou == 0), negative & (iou > 0)
    else:  # -1: no floor; MM has already rewritten floor_thr to 0 when it computes the bins
        floor, bal = torch.zeros_like(negative), negative
    lo = max(float(floor_thresh), 0.0)
    # Step 2: the balanced quota (float64 product truncated, as Python's int(q- * (1 - f))).
    bal_quota = (neg_quota.to(torch.float64) * (1.0 - floor_fraction)).to(torch.int64)
    n_bal = _count(bal, image, num_images)
    bal_over = (n_bal > bal_quota)[image]
    if num_bins == 1:
        from_bal = _draw(bal, image, bal_quota, keys[_K_BIN], num_images)
    else:
        # Step 3: equal bins over [lo, M], M = max IoU_g,e over all the image's examples.
        top = torch.zeros(num_images, dtype=torch.float64, device=iou.device)
        top = top.scatter_reduce(0, image, iou.to(torch.float64), reduce="amax", include_self=True)
        width = (top - lo) / num_bins
        edges = lo + torch.arange(num_bins + 1, dtype=torch.float64, device=iou.device) * width[:, None]
        # Bin i = [edges[i], edges[i+1]): the number of edges <= IoU, less one, is the candidate bin.
        bin_id = (iou.to(torch.float64)[:, None] >= edges[image]).sum(1) - 1
        in_bin = bal & (bin_id >= 0) & (bin_id < num_bins) & (width > 0)[image]
        group = image * num_bins + bin_id.clamp(0, num_bins - 1)
        per_bin = (bal_quota // num_bins).repeat_interleave(num_bins)
        binned = _draw(in_bin, group, per_bin, keys[_K_BIN], num_images * num_bins)
        short = bal_quota - _count(binned, image, num_images)
        from_bal = binned | _draw(bal & ~binned, image, short, keys[_K_BAL_FILL], num_images)
    taken = torch.where(bal_over, from_bal, bal)
    # Step 4: the floor fills up to q-. Step 5: any shortfall from the untaken negatives.
    taken |= _draw(floor, image, neg_quota - _count(taken, image, num_images), keys[_K_FLOOR], num_images)
    taken |= _draw(negative & ~taken, image, neg_quota - _count(taken, image, num_images), keys[_K_NEG_FILL],
                   num_images)
    over = (n_neg > neg_quota)[image]
    return torch.where(over, taken, negative)


def libra_select(batch: ExampleBatch, batch_size_per_image: int = 512, positive_fraction: float = 0.25, *,
                 num_bins: int = 3, floor_thresh: float = -1.0, floor_fraction: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> SampleResult:
    """Libra R-CNN's training examples of a batch: instance-balanced positives, IoU-balanced negatives.

    See the module docstring for every step and its source (mmdetection's ``CombinedSampler`` as the
    ``libra-faster-rcnn`` config sets it, with the instance-balanced quirk fixed).

    Args:
        batch: the examples (proposals, then GT copies) matched to the GT; reads ``label`` (1 positive,
            0 negative, -1 never picked), ``iou`` (IoU_g,e), ``matched_gt`` and ``image``.
        batch_size_per_image: examples per image (MM ``num``, 512); also the output width.
        positive_fraction: ``q+ = int(batch_size_per_image * positive_fraction)`` (MM 0.25).
        num_bins: equal IoU bins of the negatives (MM 3); 1 = uniform over the balanced set.
        floor_thresh: -1 (MM's config: no floor, on every call, i.e. MM's first call), 0 (IoU-0 negatives
            form the floor: MM from its second call on) or a threshold in (0, 1] (floor = IoU below it).
        floor_fraction: share of ``q-`` left to the floor (MM 0).
        generator: source of the random keys; on the batch's device, or on the CPU (the keys are then
            copied over). The same generator state gives the same picks.

    Returns:
        :class:`~overlap_sampler.ops.SampleResult` ``[B, batch_size_per_image]``: per image its picked
        example rows, positives first (in row order), then negatives, -1 padding; ``matched_gt`` of the
        positives; weights 1 (0 padding); ``num_pos = min(q+, #positives)``,
        ``num_neg = min(batch_size_per_image - num_pos, #negatives)``.

    Raises:
        ValueError: an argument out of range (the message names it).
    """
    _check_args(batch_size_per_image, positive_fraction, num_bins, floor_thresh, floor_fraction)
    device = batch.label.device
    num_examples = batch.label.shape[0]
    key_device = generator.device if generator is not None else device
    keys = torch.randint(1 << _KEY_BITS, (_NUM_KEYS, num_examples), dtype=torch.int64, generator=generator,
                         device=key_device).to(device)
    pos_quota = int(batch_size_per_image * positive_fraction)
    positives = _select_positives(batch, keys, pos_quota)
    neg_quota = batch_size_per_image - _count(positives, batch.image, batch.num_images)
    negatives = _select_negatives(batch, keys, neg_quota, num_bins, float(floor_thresh), float(floor_fraction))
    rows = torch.nonzero(positives | negatives).reshape(-1)
    return pack_selection(batch, rows, torch.ones(rows.shape[0], device=device), batch_size_per_image)
