"""Statistical tests of every strategy of overlap_sampler.sample on hand-built images.

Each image is built so that every example's label and key is known: the test recomputes them
independently with ``torchvision.ops.box_iou`` (float64 boxes). A batch of many identical copies
of one image in a single call gives many independent draws (images are sampled independently).
Expectations come from the contract (docs/ops.md), recomputed in
Python here:

* soft / iou_balanced: per-bin takes by water-filling (computed here by round-robin: one unit per
  bin still holding candidates, highest bin first, until the quota is met), uniform inside a bin;
* hard: every key >= hard_thresh first (uniform among them), then a uniform subset of the rest;
* uniform / linear / soft_reference: successive sampling without replacement with p ∝ weight
  (1, the key, 1 / (bin count * non-empty bins)); zero weights only once positive ones run out.

Exact subset probabilities of tiny images are enumerated; larger images are checked by exact
per-bin counts, first-draw distributions (one draw per image) and within-group uniformity.
Every goodness-of-fit test uses a fixed seed (deterministic) and rejects at p < 1e-3.
"""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import combinations

import pytest
import torch
import torchvision
from scipy import stats

import overlap_sampler

ALPHA = 1e-3  # significance of every goodness-of-fit test below
EDGE_MARGIN = 1e-6  # designed keys stay this far from inner bin edges (rounding cannot matter)

_HAS_CUDA = torch.cuda.is_available() and bool(overlap_sampler.build_info.get("cuda", False))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA"))]


# ----------------------------------------------------------------------------------------------
# Hand-built images and their independently computed facts
# ----------------------------------------------------------------------------------------------


class Image:
    """One image: proposals, GT boxes and every example's label, matched GT and keys.

    Local example ids: proposals ``0..Np-1`` then GT copies ``Np..Np+G-1`` (append_gt=True).
    """

    def __init__(self, proposals, gts, fg=0.5, bg=0.5):
        self.proposals = torch.tensor(proposals, dtype=torch.float64)
        self.gts = torch.tensor(gts, dtype=torch.float64)
        self.np, self.ng = len(proposals), len(gts)
        ex = torch.cat([self.proposals, self.gts])
        self.boxes = ex
        self.E = ex.shape[0]
        iou = torchvision.ops.box_iou(ex, self.gts)  # [E, G]
        best = iou.max(1).values
        matched = torch.tensor([int((row == row.max()).nonzero()[0]) for row in iou])
        is_copy = torch.arange(self.E) >= self.np
        matched[is_copy] = torch.arange(self.ng)
        best[is_copy] = 1.0
        self.iou_g, self.matched, self.is_copy = best, matched, is_copy
        self.pos = is_copy | (best >= fg)
        self.neg = ~self.pos & (best < bg)
        self.bg = bg
        pos_ids, neg_ids = self.pos.nonzero().flatten(), self.neg.nonzero().flatten()
        all_iou = torchvision.ops.box_iou(ex, ex)
        key = torch.zeros(self.E, dtype=torch.float64)
        if len(pos_ids) and len(neg_ids):
            key[neg_ids] = all_iou[neg_ids][:, pos_ids].max(1).values  # IoU_p,n
            key[pos_ids] = all_iou[pos_ids][:, neg_ids].max(1).values  # positive key
        self.key = key
        others = all_iou.clone()
        others.fill_diagonal_(0.0)
        self.key_all = others.max(1).values  # pos_key="all": every other example
        self.pos_ids, self.neg_ids = pos_ids.tolist(), neg_ids.tolist()

    def candidates(self, cls):
        return self.pos_ids if cls == "pos" else self.neg_ids


def _interleave(pos, neg):
    """Proposal order mixing positives and negatives (output order is by example id)."""
    out, p = [], list(pos)
    for i, n in enumerate(neg):
        out.append(n)
        if i % 3 == 1 and p:
            out.append(p.pop(0))
    return out + p


_MAIN_POS = [[-30, 0, 70, 100], [-20, 5, 80, 105], [-10, -10, 90, 90], [0, 10, 100, 110],
             [15, 0, 115, 100], [30, 0, 130, 100], [25, -5, 125, 95]]
_MAIN_NEG = [[45, 0, 145, 100], [62, 0, 162, 100], [75, 0, 175, 100], [90, 0, 190, 100],
             [110, 0, 210, 100], [60, 10, 160, 110], [50, 30, 150, 130], [70, 40, 170, 140],
             [35, 50, 135, 150], [100, 50, 200, 150], [125, 0, 225, 100], [0, 62, 100, 162],
             [20, 70, 120, 170], [-20, 80, 80, 180], [130, 20, 180, 70], [300, 300, 340, 340],
             [350, 300, 390, 340], [300, 400, 340, 440], [500, 0, 540, 40], [40, -60, 140, 40],
             [80, -70, 180, 30], [132, -50, 200, 10], [-200, 0, -150, 50], [-100, -100, -40, -40]]
# One GT; 7 positive proposals (+ the GT copy), 24 negatives with IoU_p,n spread over [0, 0.74]
# (8 of them 0, 2 above 0.5), positive keys spread over [0.16, 0.74].
MAIN = Image(_interleave(_MAIN_POS, _MAIN_NEG), [[0, 0, 100, 100]])
# The same boxes with bg_iou_thresh 0.3: the negatives with IoU_g in [0.3, 0.5) become ignored.
MAIN_BG03 = Image(_interleave(_MAIN_POS, _MAIN_NEG), [[0, 0, 100, 100]], bg=0.3)
# Tiny images for exact enumeration. Negatives: keys {0.48, 0.25, 0.18, 0.16, 0, 0}.
TINY_NEG = Image([[10, 0, 110, 100], [45, 0, 145, 100], [70, 0, 170, 100], [0, 62, 100, 162],
                  [-30, -60, 70, 40], [300, 300, 350, 350], [400, 0, 450, 50]], [[0, 0, 100, 100]])
# Positives (4 proposals + copy): keys {0, 0, 0.081, 0.053, 0}; 3 negatives.
TINY_POS = Image([[-20, 0, 80, 100], [0, -20, 100, 80], [20, 0, 120, 100], [0, 20, 100, 120],
                  [105, 0, 205, 100], [0, 110, 100, 210], [300, 300, 350, 350]], [[0, 0, 100, 100]])


# ----------------------------------------------------------------------------------------------
# Independent expectations
# ----------------------------------------------------------------------------------------------


def bin_of(key, lower, upper, k_bins):
    """K equal bins over [lower, upper]; the upper end and above in the top bin."""
    if not upper > lower or key <= lower:
        return 0
    x = (key - lower) / (upper - lower) * k_bins
    nearest = round(x)
    assert key >= upper or abs(x - nearest) > EDGE_MARGIN or nearest in (0, k_bins), \
        f"test design: key {key} sits on a bin edge"
    return min(int(math.floor(x)), k_bins - 1)


def water_fill_round_robin(counts, quota):
    """Quota spread one unit at a time, a round over the bins still holding candidates, highest
    bin first (equal shares; a short bin's unused share goes to the others)."""
    take = [0] * len(counts)
    left = min(quota, sum(counts))
    while left > 0:
        for k in reversed(range(len(counts))):
            if left and take[k] < counts[k]:
                take[k] += 1
                left -= 1
    return take


def bin_layout(img, cls, strategy, k_bins, bin_upper=None):
    """Candidate ids of one class grouped by bin (soft / iou_balanced / soft_reference)."""
    ids = img.candidates(cls)
    if strategy == "iou_balanced":
        keys = [float(img.iou_g[e]) for e in ids]
        lower, upper = 0.0, (bin_upper if bin_upper is not None else img.bg)
    else:
        keys = [float(img.key[e]) for e in ids]
        if strategy == "soft_reference":
            lower, upper = min(keys), max(keys)
        else:
            lower, upper = 0.0, (bin_upper if bin_upper is not None else max(keys))
    bins = [[] for _ in range(k_bins)]
    for e, k in zip(ids, keys):
        bins[bin_of(k, lower, upper, k_bins)].append(e)
    return bins


def _tier(w):
    return 2 if w == math.inf else (1 if w > 0 else 0)


def successive_subset_probs(ids, weights, q):
    """Exact probability of each drawn subset under successive sampling (tiers as weighted_sample)."""
    q = min(q, len(ids))
    out = defaultdict(float)

    def rec(remaining, drawn, p):
        if len(drawn) == q:
            out[frozenset(drawn)] += p
            return
        top = max(_tier(weights[i]) for i in remaining)
        eligible = [i for i in remaining if _tier(weights[i]) == top]
        total = sum(weights[i] for i in eligible) if top == 1 else len(eligible)
        for i in eligible:
            pi = weights[i] / total if top == 1 else 1.0 / total
            rec(remaining - {i}, drawn + [ids[i]], p * pi)

    rec(frozenset(range(len(ids))), [], 1.0)
    return dict(out)


def expected_subset_probs(img, cls, strategy, q, k_bins=2, hard_thresh=0.5, bin_upper=None,
                          key=None):
    """Exact distribution of the selected subset of one class's candidates, from the contract."""
    ids = img.candidates(cls)
    key = img.key if key is None else key
    if strategy in ("soft", "iou_balanced"):
        bins = bin_layout(img, cls, strategy, k_bins, bin_upper)
        take = water_fill_round_robin([len(b) for b in bins], q)
        p = 1.0 / math.prod(math.comb(len(b), t) for b, t in zip(bins, take))
        out = {}
        for subset in combinations(ids, min(q, len(ids))):
            s = set(subset)
            if all(len(s & set(b)) == t for b, t in zip(bins, take)):
                out[frozenset(s)] = p
        return out
    if strategy == "uniform":
        weights = [1.0] * len(ids)
    elif strategy == "hard":
        weights = [math.inf if float(key[e]) >= hard_thresh else 1.0 for e in ids]
    elif strategy == "linear":
        weights = [float(key[e]) for e in ids]
    elif strategy == "soft_reference":
        bins = bin_layout(img, cls, strategy, k_bins)
        nonempty = sum(1 for b in bins if b)
        share = {e: 1.0 / (len(b) * nonempty) for b in bins for e in b}
        weights = [share[e] for e in ids]
    else:
        raise AssertionError(strategy)
    return successive_subset_probs(ids, weights, q)


def uniformity_statistic(selected, groups, takes):
    """Chi-square statistic and df for "each image takes exactly take[g] of group g, uniformly".

    Per image the inclusion vector of a group of n members, take t, has covariance
    p(1-p) n/(n-1) (I - 11'/n) with p = t/n, so sum_i (X_i - Bp)^2 / (B p (1-p) n/(n-1)) over the
    B images is chi-square with n-1 df; groups are independent given their takes.
    """
    B = selected.shape[0]
    stat, df = 0.0, 0
    for members, t in zip(groups, takes):
        n = len(members)
        if t == 0 or t == n:
            continue
        p = t / n
        x = selected[:, members].sum(0).double()
        stat += float(((x - B * p) ** 2).sum()) / (B * p * (1 - p) * n / (n - 1))
        df += n - 1
    return stat, df


def assert_uniform_within(selected, groups, takes):
    """Exact per-image takes, then the pooled uniformity chi-square test."""
    for members, t in zip(groups, takes):
        got = selected[:, members].sum(1)
        assert (got == t).all(), f"group {members}: expected {t} per image, got {got.unique().tolist()}"
    stat, df = uniformity_statistic(selected, groups, takes)
    if df:
        p = stats.chi2.sf(stat, df)
        assert p > ALPHA, f"within-group uniformity rejected: chi2 {stat:.1f} on {df} df, p = {p:.2e}"


def assert_subsets_fit(selected, ids, expected):
    """Chi-square of the observed subset frequencies against exact probabilities."""
    B = selected.shape[0]
    weights = torch.tensor([1 << i for i in range(len(ids))], dtype=torch.int64)
    codes, freq = torch.unique((selected[:, ids].long() * weights).sum(1), return_counts=True)
    to_set = lambda c: frozenset(ids[i] for i in range(len(ids)) if c >> i & 1)  # noqa: E731
    observed = {to_set(c): f for c, f in zip(codes.tolist(), freq.tolist())}
    impossible = {tuple(sorted(s)): f for s, f in observed.items() if expected.get(s, 0.0) == 0.0}
    assert not impossible, f"subsets of probability 0 drawn: {impossible}"
    assert math.isclose(sum(expected.values()), 1.0, rel_tol=1e-9)
    cells = sorted(expected, key=lambda s: expected[s])
    pairs = [[expected[s] * B, observed.get(s, 0)] for s in cells]
    while len(pairs) > 1 and pairs[0][0] < 5:  # pool rare cells (chi-square validity)
        rare = pairs.pop(0)
        pairs[0][0] += rare[0]
        pairs[0][1] += rare[1]
        pairs.sort(key=lambda e: e[0])
    if len(pairs) == 1:
        assert pairs[0][1] == B
        return
    p = stats.chisquare([o for _, o in pairs], [e for e, _ in pairs]).pvalue
    shown = {tuple(sorted(s)): (observed.get(s, 0), round(expected[s] * B, 1)) for s in cells}
    assert p > ALPHA, f"chi-square p = {p:.2e}; (observed, expected): {shown}"


# ----------------------------------------------------------------------------------------------
# Running a batch of identical images
# ----------------------------------------------------------------------------------------------


def run_batch(img, copies, seed, device="cpu", **options):
    """``copies`` identical images in one call. Returns (result on CPU, local ids [B, W],
    selected [B, E] bool), after checking the output layout against the image's facts."""
    proposals = img.proposals.repeat(copies, 1).to(device)
    gts = img.gts.repeat(copies, 1).to(device)
    ps = overlap_sampler.splits_from_counts([img.np] * copies, device=device)
    gs = overlap_sampler.splits_from_counts([img.ng] * copies, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    res = overlap_sampler.sample(proposals, ps, gts, gs, generator=gen, **options)
    res = overlap_sampler.SampleResult(*(t.cpu() for t in res))
    idx = res.indices
    b = torch.arange(copies)[:, None]
    n_all = img.np * copies
    local = torch.where(idx < n_all, idx - b * img.np, img.np + (idx - n_all - b * img.ng))
    local = torch.where(idx >= 0, local, torch.full_like(idx, -1))
    selected = torch.zeros(copies, img.E + 1, dtype=torch.bool)
    selected.scatter_(1, torch.where(local >= 0, local, img.E), True)
    selected = selected[:, :img.E]
    _check_layout(img, res, local, options)
    return res, local, selected


def _check_layout(img, res, local, options):
    B, W = local.shape
    width = options.get("batch_size_per_image", 512)
    assert W == width
    qp = min(math.floor(width * options.get("positive_fraction", 0.25) + 0.5), len(img.pos_ids))
    qn = min(width - qp, len(img.neg_ids))
    assert (res.num_pos == qp).all() and (res.num_neg == qn).all()
    pos_part, neg_part = local[:, :qp], local[:, qp:qp + qn]
    assert img.pos[pos_part].all(), "a non-positive in the positive columns"
    assert img.neg[neg_part].all(), "a non-negative in the negative columns"
    assert (local[:, qp + qn:] == -1).all(), "padding must be -1"
    assert (pos_part[:, 1:] > pos_part[:, :-1]).all() and (neg_part[:, 1:] > neg_part[:, :-1]).all()
    b = torch.arange(B)[:, None]
    assert torch.equal(res.matched_gt[:, :qp], img.matched[pos_part] + b * img.ng)
    assert (res.matched_gt[:, qp:] == -1).all()
    if options.get("pos_weight", 1.0) == 1.0:
        assert (res.weights[:, :qp + qn] == 1).all() and (res.weights[:, qp + qn:] == 0).all()


def _pos_strategy_for(strategy):
    return strategy if strategy in overlap_sampler.POSITIVE_STRATEGIES else "uniform"


# ----------------------------------------------------------------------------------------------
# The designed images are what the tests need
# ----------------------------------------------------------------------------------------------


def test_designed_images():
    neg_keys = MAIN.key[MAIN.neg_ids]
    assert len(MAIN.pos_ids) == 8 and len(MAIN.neg_ids) == 24
    assert int((neg_keys == 0).sum()) == 8 and int((neg_keys >= 0.5).sum()) == 2
    assert len(MAIN_BG03.neg_ids) < 24 and (~MAIN_BG03.pos & ~MAIN_BG03.neg).any()
    for cls in ("pos", "neg"):
        for k in (2, 3, 4):
            assert sum(1 for b in bin_layout(MAIN, cls, "soft", k) if b) >= 2
    assert sorted(TINY_NEG.key[TINY_NEG.neg_ids].tolist(), reverse=True)[4:] == [0.0, 0.0]
    assert int((TINY_POS.key[TINY_POS.pos_ids] == 0).sum()) == 3
    # the enumeration helpers themselves, on closed forms
    probs = successive_subset_probs([0, 1, 2], [1.0, 2.0, 3.0], 1)
    assert math.isclose(probs[frozenset([2])], 0.5)
    assert water_fill_round_robin([10, 3, 11], 12) == [4, 3, 5]
    assert water_fill_round_robin([16, 6, 2], 11) == [4, 5, 2]
    assert water_fill_round_robin([1, 0, 2], 9) == [1, 0, 2]


# ----------------------------------------------------------------------------------------------
# Layout for every pair of strategies
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("neg_strategy", overlap_sampler.NEGATIVE_STRATEGIES)
@pytest.mark.parametrize("pos_strategy", overlap_sampler.POSITIVE_STRATEGIES)
def test_layout_labels_and_counts(device, neg_strategy, pos_strategy):
    for img, width in ((MAIN, 16), (MAIN_BG03, 64), (TINY_NEG, 5)):
        _, _, selected = run_batch(img, 200, seed=1, device=device, batch_size_per_image=width,
                                   neg_strategy=neg_strategy, pos_strategy=pos_strategy,
                                   num_bins=3, bg_iou_thresh=img.bg)
        assert not selected[:, ~(img.pos | img.neg)].any(), "an ignored example was sampled"


# ----------------------------------------------------------------------------------------------
# First draw (one positive and one negative per image) for every strategy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", overlap_sampler.NEGATIVE_STRATEGIES)
@pytest.mark.parametrize("k_bins", [2, 3])
def test_first_draw_distribution(device, strategy, k_bins):
    """One draw per class (batch 2, fraction 0.5): the chosen example's distribution is the
    strategy's first-draw law: soft_reference puts equal mass on every non-empty bin, linear
    p ∝ key, hard uniform over key >= thresh, soft / iou_balanced uniform over the top
    non-empty bin (water-filling a quota of 1), uniform 1/n."""
    copies = 20000
    pos_strategy = _pos_strategy_for(strategy)
    opts = dict(batch_size_per_image=2, positive_fraction=0.5, neg_strategy=strategy,
                pos_strategy=pos_strategy, num_bins=k_bins, hard_thresh=0.45)
    _, _, selected = run_batch(MAIN, copies, seed=10 + k_bins, device=device, **opts)
    for cls, strat in (("neg", strategy), ("pos", pos_strategy)):
        ids = MAIN.candidates(cls)
        expected = expected_subset_probs(MAIN, cls, strat, 1, k_bins=k_bins, hard_thresh=0.45)
        assert_subsets_fit(selected, ids, expected)


@pytest.mark.parametrize("k_bins", [2, 3])
def test_soft_reference_equal_mass_per_bin(k_bins):
    """soft_reference, first draw: each non-empty bin (over [min key, max key]) gets 1/#non-empty."""
    copies = 20000
    _, _, selected = run_batch(MAIN, copies, seed=20 + k_bins, batch_size_per_image=2,
                               positive_fraction=0.5, neg_strategy="soft_reference",
                               pos_strategy="soft_reference", num_bins=k_bins)
    for cls in ("neg", "pos"):
        bins = [b for b in bin_layout(MAIN, cls, "soft_reference", k_bins) if b]
        assert len(bins) >= 2
        per_bin = [int(selected[:, b].sum()) for b in bins]
        p = stats.chisquare(per_bin).pvalue
        assert p > ALPHA, (cls, per_bin, p)


def test_pos_key_all_linear_first_draw():
    """pos_key='all': the positive key is the max IoU with every other example of the image."""
    copies = 20000
    _, _, selected = run_batch(MAIN, copies, seed=30, batch_size_per_image=2,
                               positive_fraction=0.5, pos_strategy="linear", pos_key="all")
    ids = MAIN.pos_ids
    expected = expected_subset_probs(MAIN, "pos", "linear", 1, key=MAIN.key_all)
    assert_subsets_fit(selected, ids, expected)
    # and it is a different law from the default key (the test can tell them apart)
    default = expected_subset_probs(MAIN, "pos", "linear", 1)
    assert max(abs(default[s] - expected[s]) for s in expected) > 0.02


# ----------------------------------------------------------------------------------------------
# Exact subset distributions of tiny images
# ----------------------------------------------------------------------------------------------

_TINY_CASES = [
    # (image, class, strategy, quota, num_bins, hard_thresh)
    *[(TINY_NEG, "neg", s, q, 2, 0.2) for s in overlap_sampler.NEGATIVE_STRATEGIES for q in (2, 3, 5)],
    (TINY_NEG, "neg", "soft", 3, 3, 0.5),
    (TINY_NEG, "neg", "iou_balanced", 4, 3, 0.5),
    (TINY_NEG, "neg", "soft_reference", 2, 3, 0.5),
    *[(TINY_POS, "pos", s, q, 2, 0.06) for s in overlap_sampler.POSITIVE_STRATEGIES for q in (1, 2, 3)],
    (TINY_POS, "pos", "soft", 4, 3, 0.5),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "img,cls,strategy,q,k_bins,hard_thresh", _TINY_CASES,
    ids=[f"{c}-{s}-q{q}-K{k}" for _, c, s, q, k, _ in _TINY_CASES])
def test_subset_distribution_of_tiny_image(device, img, cls, strategy, q, k_bins, hard_thresh):
    """Successive sampling enumerated exactly (linear: p ∝ key, zero keys last; uniform; hard;
    soft_reference), or water-filled bins uniform inside (soft, iou_balanced)."""
    copies = 20000
    if cls == "neg":  # positive_fraction 0: the negative quota is the whole batch
        opts = dict(batch_size_per_image=q, positive_fraction=0.0, neg_strategy=strategy)
    else:  # positive_fraction 1: the positive quota is the whole batch
        opts = dict(batch_size_per_image=q, positive_fraction=1.0, pos_strategy=strategy)
    _, _, selected = run_batch(img, copies, seed=100 + q, device=device, num_bins=k_bins,
                               hard_thresh=hard_thresh, **opts)
    expected = expected_subset_probs(img, cls, strategy, q, k_bins=k_bins, hard_thresh=hard_thresh)
    assert_subsets_fit(selected, img.candidates(cls), expected)


# ----------------------------------------------------------------------------------------------
# soft and iou_balanced: exact per-bin counts, uniform inside a bin
# ----------------------------------------------------------------------------------------------

_SOFT_NEG_CASES = [
    # (strategy, num_bins, batch_size_per_image, bin_upper)  (positive_fraction 0.25)
    ("soft", 1, 16, None),
    ("soft", 2, 16, None),
    ("soft", 3, 16, None),   # takes [5, 5, 2]
    ("soft", 3, 15, None),   # quota 11: the remainder goes to the highest bin with room
    ("soft", 4, 13, None),
    ("soft", 2, 8, None),
    ("soft", 3, 16, 0.7),    # fixed range: keys above 0.7 fall in the top bin
    ("soft", 2, 20, 0.3),
    ("iou_balanced", 2, 16, None),
    ("iou_balanced", 3, 15, None),
    ("iou_balanced", 4, 12, None),
    ("iou_balanced", 2, 16, 0.3),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy,k_bins,width,bin_upper", _SOFT_NEG_CASES)
def test_negative_bins_exact_quotas(device, strategy, k_bins, width, bin_upper):
    bins = bin_layout(MAIN, "neg", strategy, k_bins, bin_upper)
    qp = min(math.floor(width * 0.25 + 0.5), len(MAIN.pos_ids))
    take = water_fill_round_robin([len(b) for b in bins], width - qp)
    for seed in (0, 1, 2):
        _, _, selected = run_batch(MAIN, 2000, seed=seed, device=device, batch_size_per_image=width,
                                   neg_strategy=strategy, num_bins=k_bins, bin_upper=bin_upper)
        assert_uniform_within(selected, bins, take)


@pytest.mark.parametrize("device", DEVICES)
def test_iou_balanced_range_is_bg_iou_thresh(device):
    """With bg_iou_thresh 0.3 the IoU_g,n bins span [0, 0.3), not [0, max IoU_g,n]."""
    img, k_bins, width = MAIN_BG03, 3, 16
    bins = bin_layout(img, "neg", "iou_balanced", k_bins)
    qn = min(width - 4, len(img.neg_ids))
    take = water_fill_round_robin([len(b) for b in bins], qn)
    max_g = max(float(img.iou_g[e]) for e in img.neg_ids)
    other = bin_layout(img, "neg", "iou_balanced", k_bins, bin_upper=max_g)
    assert [len(b) for b in other] != [len(b) for b in bins]  # the test can tell them apart
    for seed in (0, 1):
        _, _, selected = run_batch(img, 2000, seed=seed, device=device, batch_size_per_image=width,
                                   bg_iou_thresh=img.bg, neg_strategy="iou_balanced",
                                   num_bins=k_bins)
        assert_uniform_within(selected, bins, take)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k_bins,width,fraction", [(2, 16, 0.25), (3, 16, 0.25), (3, 12, 0.25),
                                                   (4, 10, 0.5)])
def test_positive_soft_exact_quotas(device, k_bins, width, fraction):
    bins = bin_layout(MAIN, "pos", "soft", k_bins)
    take = water_fill_round_robin([len(b) for b in bins], math.floor(width * fraction + 0.5))
    for seed in (0, 1, 2):
        _, _, selected = run_batch(MAIN, 2000, seed=seed, device=device, batch_size_per_image=width,
                                   positive_fraction=fraction, pos_strategy="soft", num_bins=k_bins)
        assert_uniform_within(selected, bins, take)


def test_soft_takes_are_not_uniform_takes():
    """The soft expectation differs from uniform sampling on MAIN (so the tests above can fail)."""
    bins = bin_layout(MAIN, "neg", "soft", 3)
    take = water_fill_round_robin([len(b) for b in bins], 12)
    expected_uniform = [12 * len(b) / 24 for b in bins]
    assert max(abs(t - u) for t, u in zip(take, expected_uniform)) >= 2


# ----------------------------------------------------------------------------------------------
# hard: every key >= hard_thresh first, uniform subsets of each group
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls,thresh,width,fraction", [
    ("neg", 0.5, 16, 0.25),   # 2 hard, quota 12: both hard + 10 of the 22 others
    ("neg", 0.3, 16, 0.25),   # 7 hard, quota 12
    ("neg", 0.3, 8, 0.25),    # 7 hard, quota 6: a uniform 6 of the 7 hard, nothing else
    ("neg", 0.8, 16, 0.25),   # no hard example: uniform
    ("pos", 0.5, 16, 0.25),   # 3 hard, quota 4
    ("pos", 0.35, 12, 0.25),  # 4 hard, quota 3
])
def test_hard_first(device, cls, thresh, width, fraction):
    ids = MAIN.candidates(cls)
    hard = [e for e in ids if float(MAIN.key[e]) >= thresh]
    rest = [e for e in ids if float(MAIN.key[e]) < thresh]
    qp = min(math.floor(width * fraction + 0.5), len(MAIN.pos_ids))
    q = qp if cls == "pos" else min(width - qp, len(MAIN.neg_ids))
    takes = [min(len(hard), q), q - min(len(hard), q)]
    strategy = dict(pos_strategy="hard") if cls == "pos" else dict(neg_strategy="hard")
    for seed in (0, 1):
        _, _, selected = run_batch(MAIN, 3000, seed=seed, device=device, batch_size_per_image=width,
                                   positive_fraction=fraction, hard_thresh=thresh, **strategy)
        assert_uniform_within(selected, [hard, rest], takes)


# ----------------------------------------------------------------------------------------------
# uniform and linear on the full image
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", ["neg", "pos"])
def test_uniform_inclusion(device, cls):
    ids = MAIN.candidates(cls)
    q = 12 if cls == "neg" else 4
    _, _, selected = run_batch(MAIN, 5000, seed=40, device=device, batch_size_per_image=16,
                               neg_strategy="uniform", pos_strategy="uniform")
    assert_uniform_within(selected, [ids], [q])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_zero_keys_only_after_positive_keys(device):
    """linear on negatives: 16 positive-key negatives; a quota of 12 never takes a zero key, a
    quota of 18 takes all 16 and 2 of the 8 zero-key negatives uniformly."""
    ids = MAIN.neg_ids
    positive_key = [e for e in ids if float(MAIN.key[e]) > 0]
    zero_key = [e for e in ids if float(MAIN.key[e]) == 0]
    assert len(positive_key) == 16 and len(zero_key) == 8
    for width, takes in ((16, [12, 0]), (24, [16, 2])):
        _, _, selected = run_batch(MAIN, 4000, seed=50 + width, device=device,
                                   batch_size_per_image=width, neg_strategy="linear")
        assert_uniform_within(selected, [zero_key], [takes[1]])
        assert (selected[:, positive_key].sum(1) == takes[0]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_linear_prefers_high_keys(device):
    """Inclusion frequency of linear on MAIN increases with the key (a monotone check that holds
    for successive sampling with p ∝ key), and differs from uniform's q/n."""
    _, _, selected = run_batch(MAIN, 5000, seed=60, device=device, batch_size_per_image=16,
                               neg_strategy="linear")
    ids = [e for e in MAIN.neg_ids if float(MAIN.key[e]) > 0]
    ids.sort(key=lambda e: float(MAIN.key[e]))
    freq = selected[:, ids].double().mean(0)
    keys = MAIN.key[ids]
    distinct = keys[1:] > keys[:-1] + 0.02
    assert (freq[1:][distinct] >= freq[:-1][distinct] - 0.03).all(), freq
    assert freq[-1] > 0.95 and freq[0] < 0.6


# ----------------------------------------------------------------------------------------------
# epsilon (pos_weight)
# ----------------------------------------------------------------------------------------------

# Two overlapping GTs. Proposals 0 and 4 both equal GT 0 (IoU 1: tie, lower id wins); 1 and 2 have
# equal IoU with GT 0; proposal 3 has IoU 0.6 with both GTs (matched to GT 0, the lower row);
# 5-7 match GT 1, 8-11 are negatives.
EPS = Image([[0, 0, 100, 100], [10, 0, 110, 100], [0, 10, 100, 110], [25, 0, 125, 100],
             [0, 0, 100, 100], [50, 5, 150, 105], [55, 0, 155, 100], [45, -10, 145, 90],
             [300, 0, 400, 100], [0, 200, 100, 300], [-80, 0, 20, 100], [130, 0, 230, 100]],
            [[0, 0, 100, 100], [50, 0, 150, 100]])


def _expected_weights(img, local_row, num_pos, pos_weight):
    """Weights of one output row recomputed from its sampled examples."""
    w = [1.0 if e >= 0 else 0.0 for e in local_row]
    best = {}
    for col in range(num_pos):
        e = local_row[col]
        if e >= img.np:  # GT copies never take epsilon
            continue
        g = int(img.matched[e])
        cand = (-float(img.iou_g[e]), e, col)
        if g not in best or cand < best[g]:
            best[g] = cand
    for _, _, col in best.values():
        w[col] = pos_weight
    return w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_strategy,width,fraction", [
    ("uniform", 8, 0.5),    # 4 of the 10 positives: which one is best varies per image
    ("hard", 6, 0.5),
    ("linear", 4, 0.25),    # a single positive
    ("uniform", 64, 0.5),   # every example, with padding
])
@pytest.mark.parametrize("pos_weight", [2.5, 0.5])  # epsilon above and below 1
def test_pos_weight_on_best_sampled_positive_per_gt(device, pos_strategy, width, fraction, pos_weight):
    img = EPS
    assert img.matched[3] == 0 and math.isclose(float(img.iou_g[3]), 0.6)
    assert float(img.iou_g[1]) == float(img.iou_g[2])
    copies = 1500
    res, local, _ = run_batch(img, copies, seed=70, device=device, batch_size_per_image=width,
                              positive_fraction=fraction, pos_strategy=pos_strategy,
                              pos_weight=pos_weight)
    num_pos = int(res.num_pos[0])
    expected = torch.tensor([_expected_weights(img, row, num_pos, pos_weight)
                             for row in local.tolist()], dtype=torch.float32)
    assert torch.equal(res.weights, expected)
    # sanity of the check: epsilon actually appears, and (for subsampled positives) moves around
    assert (res.weights == pos_weight).any(1).float().mean() > 0.2
    if width < 64:
        assert len(torch.unique(local[res.weights == pos_weight])) > 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["uniform", "soft", "linear"])
def test_equal_sampling_keys_go_to_lower_example_ids(device, strategy):
    """All uniforms equal: equal keys within a bin / group, so the lowest example ids win
    (linear positives: the largest IoU keys; ties, if any, to the lower id)."""
    img = MAIN
    uniforms = torch.full((img.E,), 0.5, dtype=torch.float64, device=device)
    res = overlap_sampler.sample_from_uniforms(
        img.proposals.to(device), overlap_sampler.splits_from_counts([img.np], device=device),
        img.gts.to(device), overlap_sampler.splits_from_counts([img.ng], device=device), uniforms,
        batch_size_per_image=16, neg_strategy="uniform" if strategy == "linear" else strategy,
        pos_strategy="uniform" if strategy == "soft" else strategy, num_bins=1)
    got = res.indices.cpu()[0]
    if strategy == "linear":  # equal u: log(u) / key is largest for the largest keys
        top = sorted(img.pos_ids, key=lambda e: (-float(img.key[e]), e))[:4]
        assert got[:4].tolist() == sorted(top)
    else:
        assert got[:4].tolist() == img.pos_ids[:4]
    assert got[4:].tolist() == img.neg_ids[:12]
