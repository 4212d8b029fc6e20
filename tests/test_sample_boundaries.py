"""`sample` exactly on its boundaries: IoU thresholds, the hard threshold and an inner bin edge hit
exactly, boxes that overlap by one ulp, and long thin boxes (the CPU's x-sweep prunes by width, so
boxes as wide as they are tall cannot tell a width bound from a height bound).

The threshold, hard and bin-edge tests use integer boxes and a 100 x 100 GT, so every IoU they name
(0.25, 0.3, 0.4, 0.5, 0.7) is the correctly rounded quotient of two exact areas, in float32 as in
float64. Expectations are worked out by hand; calls given their uniforms are also compared with the
per-image reference.
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

import overlap_sampler
from overlap_sampler import reference
from conftest import cpu_and_cuda, make_batch
from test_sample_exact import assert_same
from test_sample_statistics import ALPHA, Image, run_batch

GT = [[0.0, 0.0, 100.0, 100.0]]
# IoU with GT: 0.5, 0.4, 0.7, 0 (5000, 4000, 7000 and 0 of 10000); the GT copy is example 4.
THRESHOLD_PROPOSALS = [[0.0, 0, 100, 50], [0, 0, 100, 40], [0, 0, 100, 70], [200, 200, 210, 210]]


def _classes(device, dtype, **options):
    """(positive ids, negative ids, matched GT of the positives): a batch wide enough to take every
    candidate, so the output lists each class whole."""
    proposals = torch.tensor(THRESHOLD_PROPOSALS, dtype=dtype)
    gt = torch.tensor(GT, dtype=dtype)
    splits, gt_splits = torch.tensor([0, 4]), torch.tensor([0, 1])
    uniforms = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    options = {"batch_size_per_image": 16, "positive_fraction": 0.5, **options}
    got = overlap_sampler.sample_from_uniforms(proposals.to(device), splits.to(device), gt.to(device),
                                               gt_splits.to(device), uniforms.to(device), **options)
    assert_same(got, reference.sample_from_uniforms(proposals, splits, gt, gt_splits, uniforms, **options))
    p, n = int(got.num_pos[0]), int(got.num_neg[0])
    row, matched = got.indices[0].cpu().tolist(), got.matched_gt[0].cpu().tolist()
    return set(row[:p]), set(row[p:p + n]), matched[:p]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_labels_at_exact_iou_thresholds(device, dtype):
    # IoU >= fg is positive, < bg negative: an IoU equal to a threshold is positive / not negative.
    assert _classes(device, dtype)[:2] == ({0, 2, 4}, {1, 3})
    assert _classes(device, dtype, fg_iou_thresh=0.6, bg_iou_thresh=0.4)[:2] == ({2, 4}, {3})
    # Thresholds are compared in the boxes' accumulate type: float32(7000 / 10000) == float32(0.7),
    # which is below the double 0.7.
    assert _classes(device, dtype, fg_iou_thresh=0.7, bg_iou_thresh=0.7)[:2] == ({2, 4}, {0, 1, 3})
    # fg = 0: every proposal of an image with GT is positive, an IoU of 0 included, matched to GT 0.
    pos, neg, matched = _classes(device, dtype, fg_iou_thresh=0.0, bg_iou_thresh=0.0, positive_fraction=1.0)
    assert (pos, neg, matched) == ({0, 1, 2, 3, 4}, set(), [0] * 5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_hard_takes_a_key_equal_to_the_threshold_first(device):
    # P is positive (IoU_g 0.6); N is negative (IoU_g 0.3) with IoU_p,n = IoU(N, P) = 3000 / 6000 = 0.5
    # exactly; five far negatives have key 0. One negative per image: always N at hard_thresh 0.5.
    img = Image([[0, 0, 100, 60], [0, 0, 100, 30]] + [[300, 300, 310, 310]] * 5, GT)
    assert img.pos_ids == [0, 7] and float(img.key[1]) == 0.5
    options = dict(batch_size_per_image=3, positive_fraction=2 / 3, neg_strategy="hard")
    _, _, selected = run_batch(img, 300, seed=5, device=device, hard_thresh=0.5, **options)
    assert selected[:, 1].all()
    # Just above the key, N is one of six uniform candidates (so the check above can fail).
    _, _, selected = run_batch(img, 300, seed=5, device=device, hard_thresh=0.5000001, **options)
    assert 0.08 < selected[:, 1].float().mean() < 0.27


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_a_key_on_an_inner_bin_edge_goes_to_the_upper_bin(device):
    # Only the GT copy is positive (fg = bg = 0.6), so a negative's key is its IoU with the GT:
    # A 0.5 (the max), B 0.25 = the edge of K = 2 bins over [0, 0.5], four at 0.1 and two at 0.
    # Bins {A, B} and {the rest}; a negative quota of 2 takes one from each: B half of the time.
    img = Image([[0, 0, 100, 50], [0, 0, 100, 25]] + [[0, 0, 100, 10]] * 4 + [[300, 300, 310, 310]] * 2,
                GT, fg=0.6, bg=0.6)
    assert [float(img.key[e]) for e in (0, 1, 2, 6)] == [0.5, 0.25, 0.1, 0.0]
    copies = 4000
    _, _, selected = run_batch(img, copies, seed=9, device=device, batch_size_per_image=3,
                               positive_fraction=1 / 3, neg_strategy="soft", num_bins=2, fg_iou_thresh=0.6,
                               bg_iou_thresh=0.6)
    assert (selected[:, 0] ^ selected[:, 1]).all()  # exactly one of A and B per image
    b = int(selected[:, 1].sum())
    assert stats.binomtest(b, copies, 0.5).pvalue > ALPHA, b  # B in the lower bin: A every time


def _long_thin(batch, stretch):
    """The batch with x scaled by ``stretch`` and y by 1 / stretch (areas, hence IoUs, unchanged)."""
    proposals, ps, gt, gs = batch
    scale = torch.tensor([stretch, 1 / stretch, stretch, 1 / stretch], dtype=proposals.dtype)
    return proposals * scale, ps, gt * scale, gs


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("stretch", [4.0, 0.25])
def test_long_thin_boxes_match_reference(device, stretch):
    batch = _long_thin(make_batch([300, 40, 250], [6, 2, 9], seed=11, canvas=1000.0), stretch)
    uniforms = torch.rand(batch[0].shape[0] + batch[2].shape[0], dtype=torch.float64,
                          generator=torch.Generator().manual_seed(3))
    for strategy in ("linear", "soft", "hard"):
        for pos_key in ("negatives", "all"):
            options = dict(neg_strategy=strategy, pos_strategy=strategy, pos_key=pos_key, positive_fraction=0.5,
                           batch_size_per_image=64, hard_thresh=0.2)
            got = overlap_sampler.sample_from_uniforms(*[t.to(device) for t in batch], uniforms.to(device),
                                                       **options)
            assert_same(got, reference.sample_from_uniforms(*batch, uniforms, **options))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boxes_overlapping_by_one_ulp_have_a_positive_key(device, dtype):
    # Positive P (the GT itself as a proposal) and eight negatives each overlapping one side of P by
    # one ulp: their IoU_p,n is tiny but positive, so `linear` draws them (weight > 0) before the
    # twenty negatives of key 0. A sweep that drops such pairs would draw far negatives instead.
    def below(x):
        return torch.nextafter(torch.tensor(x, dtype=dtype), torch.tensor(-1e9, dtype=dtype)).item()

    def above(x):
        return torch.nextafter(torch.tensor(x, dtype=dtype), torch.tensor(1e9, dtype=dtype)).item()

    touching = []  # P spans [100, 200] on both axes: one ulp there is a normal number
    for k in range(2):
        lo, hi = 110.0 + 20 * k, 130.0 + 20 * k
        touching += [[below(200.0), lo, 260.0, hi], [40.0, lo, above(100.0), hi],   # right, left sides
                     [lo, below(200.0), hi, 260.0], [lo, 40.0, hi, above(100.0)]]   # bottom, top sides
    far = [[400.0 + 15 * i, 400.0, 410.0 + 15 * i, 410.0] for i in range(20)]
    box = [[100.0, 100, 200, 200]]
    proposals = torch.tensor(box + touching + far, dtype=dtype)
    gt = torch.tensor(box, dtype=dtype)
    splits, gt_splits = torch.tensor([0, proposals.shape[0]]), torch.tensor([0, 1])
    uniforms = torch.rand(proposals.shape[0] + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    options = dict(batch_size_per_image=10, positive_fraction=0.2, neg_strategy="linear")
    got = overlap_sampler.sample_from_uniforms(proposals.to(device), splits.to(device), gt.to(device),
                                               gt_splits.to(device), uniforms.to(device), **options)
    assert_same(got, reference.sample_from_uniforms(proposals, splits, gt, gt_splits, uniforms, **options))
    assert int(got.num_neg[0]) == 8 and sorted(got.indices[0, 2:].tolist()) == list(range(1, 9))


# float32: the widest box spans [X1, X2], and X2 - X1 rounds so that (one ulp below X2) - width
# rounds *above* X1 (found by search). A sweep whose window bound has no rounding margin loses the
# one-ulp overlap of a box starting one ulp below X2 with that widest box.
X1, X2, JUST_BELOW_X2 = -617495.9375, 455737.375, 455737.34375


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("swept", ["negatives", "positives"])
def test_one_ulp_overlap_with_the_widest_box_at_the_rounding_edge(device, swept):
    f32 = torch.float32
    assert torch.nextafter(torch.tensor(X2, dtype=f32), torch.tensor(0.0, dtype=f32)).item() == JUST_BELOW_X2
    width = torch.tensor(X2, dtype=f32) - torch.tensor(X1, dtype=f32)
    assert (torch.tensor(JUST_BELOW_X2, dtype=f32) - width).item() > X1  # the rounding this test is about
    wide, near = [X1, 200.0, X2, 300.0], [JUST_BELOW_X2, 200.0, JUST_BELOW_X2 + 100, 300.0]
    far = [[-9e5 + 20 * i, 0.0, -9e5 + 20 * i + 10, 10.0] for i in range(20)]
    if swept == "negatives":  # many negatives, the wide one among them; the GT (and its copy) is `near`
        proposals, gt, target, num_pos = [near, wide] + far, [near], 1, 2
    else:  # many positives (copies of the wide GT), two negatives: `near` and a far one
        proposals, gt, target, num_pos = [wide] * 20 + [near, far[0]], [wide], 20, 21
    copies = 40
    proposals = torch.tensor(proposals, dtype=f32).repeat(copies, 1)
    gt = torch.tensor(gt, dtype=f32).repeat(copies, 1)
    n = proposals.shape[0] // copies
    ps, gs = overlap_sampler.splits_from_counts([n] * copies), overlap_sampler.splits_from_counts([1] * copies)
    uniforms = torch.rand(proposals.shape[0] + copies, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(6))
    # One negative per image, by `linear`: the only negative with a positive key (tiny) comes first.
    options = dict(batch_size_per_image=num_pos + 1, positive_fraction=1.0, neg_strategy="linear")
    got = overlap_sampler.sample_from_uniforms(proposals.to(device), ps.to(device), gt.to(device), gs.to(device),
                                               uniforms.to(device), **options)
    assert_same(got, reference.sample_from_uniforms(proposals, ps, gt, gs, uniforms, **options))
    assert (got.num_pos == num_pos).all() and (got.num_neg == 1).all()
    drawn = got.indices.cpu()[:, num_pos] - torch.arange(copies) * n
    assert (drawn == target).all()
