"""Libra R-CNN's sampler (``sampling/libra.py``) against a per-image reference written from rivals.md section 2.

The reference (``ref_image``) loops over one image's examples with Python sets and ``random.sample``; the
sampler is checked against it by exact invariants, by inclusion frequencies over many draws (one call on a
batch holding the same image many times = many independent draws), and on rivals.md section 6 cases 1
and 2 by exact probabilities (chi-square goodness of fit). Seeds are fixed, so every test is deterministic.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from typing import NamedTuple

import pytest
import torch
from scipy import stats

from conftest import cpu_and_cuda, needs_cuda
from overlap_sampler.sampling.examples import ExampleBatch, match_examples
from overlap_sampler.sampling.libra import libra_select
from overlap_sampler.testing import make_batch

P_MIN = 1e-3  # chi-square: fail below this p-value
Z_MAX = 4.5  # frequency comparison: fail above this |z| (two-sample, pooled; ~1e-5 per example under H0)


# --------------------------------------------------------------------------- batches from per-image specs
class Img(NamedTuple):
    """One image's examples: proposals (``iou``, ``label``, ``match`` = local GT index or -1), then one
    GT copy per entry of ``gt_iou`` (label 1, matched to itself). Local example ``i`` of the reference =
    proposal ``i``, then GT copy ``j`` at ``len(iou) + j``."""

    iou: list
    label: list
    match: list
    gt_iou: list

    @property
    def all_iou(self):
        return list(self.iou) + list(self.gt_iou)

    @property
    def all_label(self):
        return list(self.label) + [1] * len(self.gt_iou)

    @property
    def all_match(self):
        return list(self.match) + list(range(len(self.gt_iou)))


def f32(values):
    """The float32 values of a list (the batch stores IoU in float32; the reference must read the same)."""
    return torch.tensor(values, dtype=torch.float32).tolist()


def build_batch(images, device="cpu"):
    """ExampleBatch of the images, in the seam's layout, and ``local`` [E]: each row's reference index."""
    props = [len(im.iou) for im in images]
    gts = [len(im.gt_iou) for im in images]
    gt_offset = [sum(gts[:b]) for b in range(len(images))]
    iou, label, match, image, local = [], [], [], [], []
    for b, im in enumerate(images):
        iou += im.iou
        label += im.label
        match += [gt_offset[b] + t if t >= 0 else -1 for t in im.match]
        image += [b] * len(im.iou)
        local += range(len(im.iou))
    for b, im in enumerate(images):
        iou += im.gt_iou
        label += [1] * len(im.gt_iou)
        match += [gt_offset[b] + j for j in range(len(im.gt_iou))]
        image += [b] * len(im.gt_iou)
        local += [len(im.iou) + j for j in range(len(im.gt_iou))]
    e, g = len(iou), sum(gts)
    t = dict(device=device)
    batch = ExampleBatch(torch.zeros(e, 4, **t), torch.tensor(image, dtype=torch.int64, **t), props, gts,
                         torch.tensor(iou, dtype=torch.float32, **t), torch.tensor(match, dtype=torch.int64, **t),
                         torch.tensor(label, dtype=torch.int64, **t), torch.zeros(g, 4, **t),
                         torch.ones(g, dtype=torch.int64, **t))
    return batch, torch.tensor(local, dtype=torch.int64)


def split_batch(batch):
    """The per-image specs of an ExampleBatch (inverse of build_batch, up to boxes)."""
    n = batch.num_proposals
    iou, label, match, image = (x.cpu().tolist() for x in (batch.iou, batch.label, batch.matched_gt, batch.image))
    gt_offset = [sum(batch.gt_counts[:b]) for b in range(batch.num_images)]
    images = []
    for b in range(batch.num_images):
        rows = [r for r in range(n) if image[r] == b]
        grow = [n + gt_offset[b] + j for j in range(batch.gt_counts[b])]
        images.append(Img([iou[r] for r in rows], [label[r] for r in rows],
                          [match[r] - gt_offset[b] if match[r] >= 0 else -1 for r in rows], [iou[r] for r in grow]))
    return images


def random_image(rng: random.Random, n: int, g: int, *, gt_iou_one=True, ignore=True):
    """A random image: n proposals over g GTs; IoUs 0 (exactly, for the floor), in (0, .5) and in [.5, 1);
    labels by fg .5 and bg .4 (ignored between) when ``ignore``, else .5/.5."""
    iou, label, match = [], [], []
    for _ in range(n):
        u = rng.random()
        v = 0.0 if (u < 0.15 or g == 0) else (rng.uniform(0, 0.5) if u < 0.75 else rng.uniform(0.5, 1.0))
        iou.append(v)
        match.append(rng.randrange(g) if g else -1)
    iou = f32(iou)
    bg = 0.4 if ignore else 0.5
    label = [1 if v >= 0.5 else (0 if v < bg else -1) for v in iou]
    gt_iou = [1.0] * g if gt_iou_one else f32([rng.uniform(0.5, 1.0) for _ in range(g)])
    return Img(iou, label, match, gt_iou)


# --------------------------------------------------------------------------- the reference (rivals.md s. 2)
def ref_image(im: Img, bs, pf, rng: random.Random, num_bins=3, floor_thresh=-1.0, floor_fraction=0.0):
    """(positives, negatives): sets of local example indices picked in one image, straight from the spec
    (mmdetection's CombinedSampler with the instance-balanced extras drawn from the *other* positives)."""
    iou, lab, mat = im.all_iou, im.all_label, im.all_match
    pos = [i for i in range(len(iou)) if lab[i] == 1]
    neg = [i for i in range(len(iou)) if lab[i] == 0]
    qp = int(bs * pf)
    if len(pos) <= qp:
        picked_pos = set(pos)
    else:
        gts = sorted({mat[i] for i in pos})
        m = int(round(qp / len(gts)) + 1)
        s = set()
        for t in gts:
            mine = [i for i in pos if mat[i] == t]
            s |= set(mine if len(mine) <= m else rng.sample(mine, m))
        if len(s) < qp:
            s |= set(rng.sample(sorted(set(pos) - s), qp - len(s)))
        elif len(s) > qp:
            s = set(rng.sample(sorted(s), qp))
        picked_pos = s
    qn = bs - len(picked_pos)
    if len(neg) <= qn:
        return picked_pos, set(neg)
    if floor_thresh > 0:
        floor = {i for i in neg if iou[i] < floor_thresh}
        bal = {i for i in neg if iou[i] >= floor_thresh}
    elif floor_thresh == 0:
        floor = {i for i in neg if iou[i] == 0}
        bal = {i for i in neg if iou[i] > 0}
    else:
        floor, bal = set(), set(neg)
    lo = max(floor_thresh, 0.0)
    qb = int(qn * (1 - floor_fraction))
    if len(bal) <= qb:
        taken = set(bal)
    elif num_bins == 1:
        taken = set(rng.sample(sorted(bal), qb))
    else:
        top = max(iou)
        w = (top - lo) / num_bins
        taken = set()
        for k in range(num_bins):
            members = sorted(i for i in bal if lo + k * w <= iou[i] < lo + (k + 1) * w)
            per = int(qb / num_bins)
            taken |= set(members if len(members) <= per else rng.sample(members, per))
        if len(taken) < qb:
            taken |= set(rng.sample(sorted(bal - taken), qb - len(taken)))
    need = qn - len(taken)
    taken |= floor if len(floor) <= need else set(rng.sample(sorted(floor), need))
    if len(taken) < qn:
        taken |= set(rng.sample(sorted(set(neg) - taken), qn - len(taken)))
    return picked_pos, taken


# --------------------------------------------------------------------------- helpers
def picks(result, batch, local):
    """Per image (positives, negatives) as sets of local indices, after checking the output layout:
    -1 padding after the picks, weights 1 (0 padding), no duplicate rows, rows of their own image,
    positives (label 1, their matched GT) first, then negatives (label 0, matched -1)."""
    idx, mg, w = (t.cpu() for t in (result.indices, result.matched_gt, result.weights))
    num_pos, num_neg = result.num_pos.cpu(), result.num_neg.cpu()
    label, image, matched = batch.label.cpu(), batch.image.cpu(), batch.matched_gt.cpu()
    col = torch.arange(idx.shape[1])
    valid = col < (num_pos + num_neg)[:, None]
    is_pos = col < num_pos[:, None]
    assert (idx[~valid] == -1).all() and (idx[valid] >= 0).all()
    assert torch.equal(w, valid.float())
    rows = idx.clamp(min=0)
    assert torch.unique(idx[valid]).numel() == int(valid.sum()), "duplicate rows"
    assert (image[rows][valid] == torch.arange(idx.shape[0])[:, None].expand_as(idx)[valid]).all(), "foreign row"
    assert (label[rows][valid & is_pos] == 1).all() and (label[rows][valid & ~is_pos] == 0).all(), "order"
    assert torch.equal(mg[valid & is_pos], matched[rows][valid & is_pos]) and (mg[~(valid & is_pos)] == -1).all()
    loc = local[rows].tolist()
    out = []
    for b, (p, n) in enumerate(zip(num_pos.tolist(), num_neg.tolist())):
        out.append((set(loc[b][:p]), set(loc[b][p:p + n])))
    return out


def check_rules(im: Img, pos_set, neg_set, bs, pf, num_bins=3, floor_thresh=-1.0, floor_fraction=0.0):
    """The exact invariants the rules imply for one image's picks (either implementation's)."""
    iou, lab, mat = im.all_iou, im.all_label, im.all_match
    pos = [i for i in range(len(iou)) if lab[i] == 1]
    neg = [i for i in range(len(iou)) if lab[i] == 0]
    assert pos_set <= set(pos) and neg_set <= set(neg)
    qp = int(bs * pf)
    assert len(pos_set) == min(qp, len(pos))
    qn = bs - len(pos_set)
    assert len(neg_set) == min(qn, len(neg))
    if len(pos) > qp:  # each GT's share: at least min(n_t, m) when S is short, at most when S is large
        per_gt = Counter(mat[i] for i in pos)
        m = int(round(qp / len(per_gt)) + 1)
        s_size = sum(min(c, m) for c in per_gt.values())
        got = Counter(mat[i] for i in pos_set)
        for t, c in per_gt.items():
            if s_size >= qp:
                assert got[t] <= min(c, m)
            if s_size <= qp:
                assert got[t] >= min(c, m)
    if len(neg) > qn:  # how many from the balanced set and the floor is fixed; bins get at least their quota
        if floor_thresh > 0:
            bal = {i for i in neg if iou[i] >= floor_thresh}
        elif floor_thresh == 0:
            bal = {i for i in neg if iou[i] > 0}
        else:
            bal = set(neg)
        floor = set(neg) - bal
        qb = int(qn * (1 - floor_fraction))
        b1 = min(len(bal), qb)
        f = min(len(floor), qn - b1)
        assert len(neg_set & floor) == f and len(neg_set & bal) == qn - f
        if len(bal) > qb and num_bins >= 2:
            lo, top = max(floor_thresh, 0.0), max(iou)
            w = (top - lo) / num_bins
            for k in range(num_bins):
                members = {i for i in bal if lo + k * w <= iou[i] < lo + (k + 1) * w}
                assert len(neg_set & members) >= min(len(members), qb // num_bins)


def libra_counts(images, reps, seed, device="cpu", **kw):
    """Inclusion counts of every local example of every image over ``reps`` draws (one batched call)."""
    batch, local = build_batch(list(images) * reps, device)
    g = torch.Generator(device=device).manual_seed(seed)
    result = libra_select(batch, generator=g, **kw)
    counts = [[0] * len(im.all_iou) for im in images]
    for b, (p, n) in enumerate(picks(result, batch, local)):
        for i in p | n:
            counts[b % len(images)][i] += 1
    return counts


def ref_counts(images, reps, seed, **kw):
    rng = random.Random(seed)
    counts = [[0] * len(im.all_iou) for im in images]
    for _ in range(reps):
        for c, im in zip(counts, images):
            p, n = ref_image(im, rng=rng, **kw)
            for i in p | n:
                c[i] += 1
    return counts


def max_z(c1, c2, reps):
    """Largest two-sample |z| over examples; examples picked always or never must agree exactly."""
    worst = 0.0
    for a, b in zip(c1, c2):
        p = (a + b) / (2 * reps)
        if p in (0.0, 1.0):
            if a != b:
                return math.inf
            continue
        worst = max(worst, abs(a - b) / reps / math.sqrt(p * (1 - p) * 2 / reps))
    return worst


def ref_kwargs(kw):
    out = dict(kw)
    out["bs"] = out.pop("batch_size_per_image")
    out["pf"] = out.pop("positive_fraction")
    return out


# --------------------------------------------------------------------------- (a) exact invariants
SETTINGS = [
    dict(batch_size_per_image=32, positive_fraction=0.25),
    dict(batch_size_per_image=24, positive_fraction=0.5, floor_thresh=0.0),
    dict(batch_size_per_image=40, positive_fraction=0.3, floor_thresh=0.15, floor_fraction=0.25),
    dict(batch_size_per_image=16, positive_fraction=0.25, num_bins=1),
    dict(batch_size_per_image=30, positive_fraction=0.2, num_bins=5, floor_fraction=0.5),
    dict(batch_size_per_image=8, positive_fraction=1.0, floor_thresh=0.0, floor_fraction=1.0),
    dict(batch_size_per_image=50, positive_fraction=0.0),
]


@pytest.mark.parametrize("kw", SETTINGS)
def test_invariants_random_batches(kw):
    rng = random.Random(7)
    for trial in range(6):
        images = [random_image(rng, rng.randrange(0, 90), rng.choice([0, 1, 2, 5]), gt_iou_one=trial % 2 == 0,
                               ignore=trial % 3 != 0) for _ in range(5)]
        batch, local = build_batch(images)
        result = libra_select(batch, generator=torch.Generator().manual_seed(trial), **kw)
        assert result.indices.shape == (5, kw["batch_size_per_image"])
        for im, (p, n) in zip(images, picks(result, batch, local)):
            check_rules(im, p, n, **ref_kwargs(kw))
            # the reference obeys the same rules (checks the checker)
            check_rules(im, *ref_image(im, rng=rng, **ref_kwargs(kw)), **ref_kwargs(kw))


def test_invariants_matched_batch():
    """A batch matched from boxes (match_examples): GT copies, images without GT or proposals."""
    counts, gts = [200, 0, 75, 30], [5, 2, 0, 1]
    p, _, g, _ = make_batch(counts, gts, seed=3)
    batch = match_examples(list(torch.split(p, counts)), list(torch.split(g, gts)),
                           [torch.ones(n, dtype=torch.int64) for n in gts], 0.5, 0.5)
    images = split_batch(batch)
    local = build_batch(images)[1]
    for seed, kw in enumerate(SETTINGS):
        result = libra_select(batch, generator=torch.Generator().manual_seed(seed), **kw)
        for im, (pp, nn) in zip(images, picks(result, batch, local)):
            check_rules(im, pp, nn, **ref_kwargs(kw))


def test_checker_catches_quirk():
    """check_rules is not vacuous: mmdetection's unique() quirk (case 2, q+ 5: 4 positives) fails it."""
    im = case2_image()
    with pytest.raises(AssertionError):
        check_rules(im, {0, 1, 2, 3}, {7, 8, 9, 10}, 20, 0.25)


# --------------------------------------------------------------------------- (b) distributions vs reference
def stat_images():
    rng = random.Random(11)
    return [random_image(rng, 60, 3), random_image(rng, 40, 1, ignore=False),
            random_image(rng, 50, 4, gt_iou_one=False), random_image(rng, 30, 0)]


@pytest.mark.parametrize("kw", SETTINGS[:5])
def test_inclusion_frequencies_match_reference(kw):
    reps = 1000
    images = stat_images()
    c_lib = libra_counts(images, reps, seed=1, **kw)
    c_ref = ref_counts(images, reps, seed=2, **ref_kwargs(kw))
    for a, b in zip(c_lib, c_ref):
        assert max_z(a, b, reps) < Z_MAX


def test_frequency_test_has_power():
    """The same comparison tells floor_thresh -1 from 0 (differing only in IoU-0 negatives and bin 0)."""
    reps = 1500
    images = stat_images()[:1]
    kw = dict(batch_size_per_image=32, positive_fraction=0.25)
    c_lib = libra_counts(images, reps, seed=1, **kw)
    c_ref = ref_counts(images, reps, seed=2, floor_thresh=0.0, **ref_kwargs(kw))
    assert max_z(c_lib[0], c_ref[0], reps) > 2 * Z_MAX


# --------------------------------------------------------------------------- (c) rivals.md section 6
def case1_image():
    """num 8 (q+ 2): GT copy + a proposal at 0.8; negatives {0, .1, .2, .34, .38, .42, .46, .49} (q- 6).
    Local rows: 0 the 0.8 positive, 1..8 the negatives in that order, 9 the GT copy."""
    negs = [0.0, 0.1, 0.2, 0.34, 0.38, 0.42, 0.46, 0.49]
    return Img(f32([0.8] + negs), [1] + [0] * 8, [0] * 9, [1.0])


def excluded_negatives(images_picks):
    return Counter(tuple(sorted(set(range(1, 9)) - n)) for p, n in images_picks)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("variant", ["call1", "call2", "uniform"])
def test_case1_iou_balanced_negatives(device, variant):
    """Call 1 (floor -1): bin [0, 1/3) gives 2 of {0, .1, .2}, bin [1/3, 2/3) 2 of 5, then 2 of the untaken 4:
    the 2 excluded negatives are (one of bin 0, one of bin 1) w.p. 1/30 each, two of bin 1 w.p. 1/20 each,
    never two of bin 0 (so bin 0 rows are in w.p. 5/6, bin 1 rows 7/10). Call >= 2 (floor 0): .1 and .2
    always, IoU 0 never, 4 of the 5 upper (each excluded w.p. 1/5). num_bins 1: 6 of the 8 uniformly."""
    reps = 4000
    kw = dict(batch_size_per_image=8, positive_fraction=0.25)
    if variant == "call2":
        kw["floor_thresh"] = 0.0
    if variant == "uniform":
        kw["num_bins"] = 1
    im = case1_image()
    batch, local = build_batch([im] * reps, device)
    result = libra_select(batch, generator=torch.Generator(device=device).manual_seed(5), **kw)
    got = picks(result, batch, local)
    assert all(p == {0, 9} for p, _ in got)  # both positives, always
    excluded = excluded_negatives(got)
    bin0, bin1 = [1, 2, 3], [4, 5, 6, 7, 8]
    if variant == "call1":
        expected = {tuple(sorted((a, y))): 1 / 30 for a in bin0 for y in bin1}
        expected.update({pair: 1 / 20 for pair in itertools.combinations(bin1, 2)})
    elif variant == "call2":
        expected = {(1, y): 1 / 5 for y in bin1}
    else:
        expected = {pair: 1 / 28 for pair in itertools.combinations(range(1, 9), 2)}
    assert abs(sum(expected.values()) - 1) < 1e-12
    assert set(excluded) <= set(expected), "an impossible exclusion occurred"
    cells = sorted(expected)
    p_value = stats.chisquare([excluded[c] for c in cells], [expected[c] * reps for c in cells]).pvalue
    assert p_value > P_MIN


def case2_image():
    """GT A: its copy + 5 proposals (6 positives), GT B: its copy only; 4 negatives.
    Local rows: 0..4 A's proposals, 5..8 negatives, 9 A's copy, 10 B's copy."""
    return Img(f32([0.9, 0.8, 0.7, 0.6, 0.55, 0.1, 0.2, 0.3, 0.4]), [1] * 5 + [0] * 4, [0] * 5 + [0, 1, 0, 1],
               [1.0, 1.0])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("quota", [4, 5])
def test_case2_instance_balanced_positives(device, quota):
    """q+ 4: m = 3, B always in, exactly 3 of A (each 3-subset w.p. 1/20). q+ 5: m = int(round(2.5) + 1) = 3,
    S = 4, 1 extra from A's other 3: always 5 positives (the fixed rule; MM keeps 4 w.p. 4/7), B always,
    each 4-subset of A w.p. 1/15. The 4 negatives always fill in."""
    reps = 4000
    im = case2_image()
    a_rows = [0, 1, 2, 3, 4, 9]
    batch, local = build_batch([im] * reps, device)
    result = libra_select(batch, batch_size_per_image=4 * quota, positive_fraction=0.25,
                          generator=torch.Generator(device=device).manual_seed(9))
    got = picks(result, batch, local)
    assert (result.num_pos == quota).all()
    assert all(10 in p and n == {5, 6, 7, 8} for p, n in got)
    subsets = Counter(tuple(sorted(p - {10})) for p, _ in got)
    cells = list(itertools.combinations(a_rows, quota - 1))
    assert set(subsets) <= set(cells)
    p_value = stats.chisquare([subsets[c] for c in cells], [reps / len(cells)] * len(cells)).pvalue
    assert p_value > P_MIN


def test_round_half_to_even():
    """m = int(round(q+/g) + 1) with Python's round: q+ 10, 4 GTs -> round(2.5) = 2, m = 3 (half up: 4).
    GT sizes (copies included) 4, 4, 4, 9: with m = 3, |S| = 12 > 10, so GT 3 keeps at most 3 of its 9
    (and 3 is reached); with m = 4 it would keep all 4 of its S-share w.p. C(12,6)/C(16,10) = 0.115."""
    im = Img([0.9] * 17, [1] * 17, [0, 0, 1, 1, 2, 2] + [3] * 8 + [0, 1, 2], [1.0] * 4)
    batch, local = build_batch([im] * 2000)
    result = libra_select(batch, batch_size_per_image=40, positive_fraction=0.25,
                          generator=torch.Generator().manual_seed(3))
    shares = Counter()
    for p, _ in picks(result, batch, local):
        assert len(p) == 10
        shares[sum(1 for i in p if im.all_match[i] == 3)] += 1
    assert max(shares) == 3 and shares[3] > 0


def test_top_edge_is_open():
    """Bins are half-open [lo + i*w, lo + (i+1)*w) up to M (MM): a negative at IoU M is in no bin and only
    enters through the shortfall draw. An (artificial) image without positives, negatives {.05, .1, .15,
    .2, .5, .9}, M = .9, q- = 3: bin [0, .3) 1 of 4, bin [.3, .6) {.5}, bin [.6, .9) empty, then 1 of the
    untaken 4 (3 of bin 0 and .9): .5 always, .9 w.p. 1/4 (3/4 less than if .9 closed the last bin)."""
    im = Img(f32([0.05, 0.1, 0.15, 0.2, 0.5, 0.9]), [0] * 6, [-1] * 6, [])
    reps = 2000
    batch, local = build_batch([im] * reps)
    got = picks(libra_select(batch, 3, 0.0, generator=torch.Generator().manual_seed(6)), batch, local)
    assert all(4 in n for _, n in got)
    others = Counter(tuple(sorted(n - {4})) for _, n in got)
    expected = {pair: 1 / 8 for pair in itertools.combinations(range(4), 2)}  # both from bin 0
    expected.update({(a, 5): 1 / 16 for a in range(4)})  # one from bin 0, .9 as the shortfall
    assert set(others) <= set(expected)
    cells = sorted(expected)
    assert stats.chisquare([others[c] for c in cells], [expected[c] * reps for c in cells]).pvalue > P_MIN


def test_image_without_gt_is_uniform():
    """No GT: every negative has IoU 0, M = 0, every bin empty: 8 of the 20 negatives uniformly (each w.p.
    0.4), with any floor setting."""
    im = Img([0.0] * 20, [0] * 20, [-1] * 20, [])
    reps = 2000
    for floor_thresh, floor_fraction in [(-1.0, 0.0), (0.0, 0.0), (0.3, 0.5)]:
        counts = libra_counts([im], reps, seed=4, batch_size_per_image=8, positive_fraction=0.25,
                              floor_thresh=floor_thresh, floor_fraction=floor_fraction)[0]
        assert sum(counts) == 8 * reps
        # each count ~ Binomial(reps, 0.4)
        assert max(abs(c - 0.4 * reps) for c in counts) < Z_MAX * math.sqrt(reps * 0.4 * 0.6)


# --------------------------------------------------------------------------- (d) three images vs reference
def test_three_images_of_different_sizes_match_reference():
    counts, gts = [150, 60, 45], [4, 1, 0]
    p, _, g, _ = make_batch(counts, gts, seed=8)
    batch = match_examples(list(torch.split(p, counts)), list(torch.split(g, gts)),
                           [torch.ones(n, dtype=torch.int64) for n in gts], 0.5, 0.5)
    images = split_batch(batch)
    kw = dict(batch_size_per_image=32, positive_fraction=0.25)
    n_pos = [im.all_label.count(1) for im in images]
    n_neg = [im.all_label.count(0) for im in images]
    assert n_pos[0] > 8 and n_neg[0] > 24 and n_neg[1] > 32 - min(8, n_pos[1]) and n_neg[2] > 32  # all sampled
    # the batch itself, as matched
    result = libra_select(batch, generator=torch.Generator().manual_seed(0), **kw)
    for im, (pp, nn) in zip(images, picks(result, batch, build_batch(images)[1])):
        check_rules(im, pp, nn, bs=32, pf=0.25)
    reps = 1500
    c_lib = libra_counts(images, reps, seed=1, **kw)
    c_ref = ref_counts(images, reps, seed=2, bs=32, pf=0.25)
    for a, b in zip(c_lib, c_ref):
        assert max_z(a, b, reps) < Z_MAX


# --------------------------------------------------------------------------- (e) bad arguments
@pytest.mark.parametrize("name, value", [
    ("batch_size_per_image", 0), ("batch_size_per_image", 2.5), ("batch_size_per_image", True),
    ("positive_fraction", -0.1), ("positive_fraction", 1.5), ("positive_fraction", float("nan")),
    ("num_bins", 0), ("num_bins", 2.0),
    ("floor_thresh", -0.5), ("floor_thresh", 1.5), ("floor_thresh", float("inf")),
    ("floor_fraction", -0.01), ("floor_fraction", 1.01),
])
def test_bad_arguments(name, value):
    batch, _ = build_batch([case1_image()])
    with pytest.raises(ValueError, match=name):
        libra_select(batch, **{name: value})


# --------------------------------------------------------------------------- (f) CUDA, (g) determinism
@needs_cuda
def test_cuda_matches_reference_and_takes_a_cpu_generator():
    images = stat_images()
    kw = dict(batch_size_per_image=32, positive_fraction=0.25)
    batch, local = build_batch(images * 3, "cuda")
    result = libra_select(batch, generator=torch.Generator().manual_seed(0), **kw)
    assert result.indices.device.type == "cuda"
    for im, (p, n) in zip(images * 3, picks(result, batch, local)):
        check_rules(im, p, n, bs=32, pf=0.25)
    reps = 1500
    c_lib = libra_counts(images, reps, seed=1, device="cuda", **kw)
    c_ref = ref_counts(images, reps, seed=2, bs=32, pf=0.25)
    for a, b in zip(c_lib, c_ref):
        assert max_z(a, b, reps) < Z_MAX


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_generator_makes_it_deterministic(device):
    batch, _ = build_batch(stat_images(), device)
    kw = dict(batch_size_per_image=32, positive_fraction=0.25)
    first = libra_select(batch, generator=torch.Generator(device=device).manual_seed(42), **kw)
    again = libra_select(batch, generator=torch.Generator(device=device).manual_seed(42), **kw)
    other = libra_select(batch, generator=torch.Generator(device=device).manual_seed(43), **kw)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first.indices, other.indices)
    torch.manual_seed(1)
    x = libra_select(batch, **kw)
    torch.manual_seed(1)
    assert torch.equal(x.indices, libra_select(batch, **kw).indices)


def test_empty_batch():
    batch, _ = build_batch([Img([], [], [], []), Img([], [], [], [])])
    result = libra_select(batch, 4, generator=torch.Generator().manual_seed(0))
    assert result.indices.shape == (2, 4) and (result.indices == -1).all()
    assert result.num_pos.tolist() == [0, 0] and result.num_neg.tolist() == [0, 0]
