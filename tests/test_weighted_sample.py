"""overlap_sampler.weighted_sample: successive weighted sampling without replacement per segment.

Every expectation here is computed independently in Python from the contract (docs/ops.md,
``sampling_key`` in cpp/sampling_math.h): exact probabilities of draw sequences by enumerating
successive sampling (p(i) = w_i / remaining weight; +inf weights first and uniform among
themselves; 0 weights only once every positive weight is drawn, uniform among themselves), and
the exact draw order by recomputing the Efraimidis-Spirakis keys ``log(u) / w`` from the same
uniforms. Statistical tests use fixed seeds (deterministic) and reject at p < 1e-3.
"""

from __future__ import annotations

import math
import struct
from collections import defaultdict
from itertools import permutations

import pytest
import torch
from scipy import stats

import overlap_sampler

INF = math.inf
ALPHA = 1e-3  # significance of every goodness-of-fit test below (fixed seeds: deterministic)

_HAS_CUDA = torch.cuda.is_available() and bool(overlap_sampler.build_info.get("cuda", False))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA"))]


# ----------------------------------------------------------------------------------------------
# Independent helpers
# ----------------------------------------------------------------------------------------------


def _tier(w: float) -> int:
    return 2 if w == INF else (1 if w > 0 else 0)


def sequence_probabilities(weights, q):
    """Exact probability of every ordered draw sequence of length min(q, n), by enumeration."""
    n = len(weights)
    q = min(q, n)
    out = defaultdict(float)

    def rec(remaining, drawn, p):
        if len(drawn) == q:
            out[tuple(drawn)] += p
            return
        top = max(_tier(weights[i]) for i in remaining)
        eligible = [i for i in remaining if _tier(weights[i]) == top]
        if top == 1:
            total = sum(weights[i] for i in eligible)
            probs = {i: weights[i] / total for i in eligible}
        else:
            probs = {i: 1.0 / len(eligible) for i in eligible}
        for i in eligible:
            rec(remaining - {i}, drawn + [i], p * probs[i])

    rec(frozenset(range(n)), [], 1.0)
    return dict(out)


def ordered_key(u: float, w: float):
    """The contract's sort key of one row (sampling_key): (tier, 62-bit ordered key)."""
    tier = _tier(w)
    w_eff = w if tier == 1 else 1.0
    key = (math.log(u) if u > 0 else -INF) / w_eff
    if not key < 0.0:
        key = -0.0
    bits = struct.unpack("<Q", struct.pack("<d", key))[0]
    return tier, ((~bits) & 0xFFFFFFFFFFFFFFFF) >> 1


def expected_draws(weights, uniforms, splits, counts, max_count):
    """Draw order of every segment recomputed in Python: key descending, then row ascending."""
    rows = []
    for s in range(len(splits) - 1):
        lo, hi = splits[s], splits[s + 1]
        order = sorted(range(lo, hi), key=lambda r: (ordered_key(uniforms[r], weights[r]), -r),
                       reverse=True)
        take = min(counts[s], hi - lo, max_count)
        rows.append(order[:take] + [-1] * (max_count - take))
    return rows


def tiled_draw(weights, count, segments, seed, device, dtype=torch.float64, max_count=None):
    """One call: ``segments`` copies of the same weights. Returns local draws [S, max_count]."""
    n = len(weights)
    w = torch.tensor(weights, dtype=dtype).repeat(segments)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n * segments, dtype=dtype, generator=g)
    splits = overlap_sampler.splits_from_counts([n] * segments)
    counts = torch.full((segments,), count, dtype=torch.int64)
    max_count = count if max_count is None else max_count
    out = overlap_sampler.weighted_sample(w.to(device), u.to(device), splits.to(device),
                                          counts.to(device), max_count).cpu()
    assert out.shape == (segments, max_count) and out.dtype == torch.int64
    local = torch.where(out >= 0, out - splits[:-1, None], out)
    return local


def sequence_counts(local: torch.Tensor, n: int):
    """Histogram of the drawn sequences (rows of ``local``, no padding) as {tuple: count}."""
    assert (local >= 0).all()
    base = torch.tensor([n ** k for k in range(local.shape[1] - 1, -1, -1)], dtype=torch.int64)
    codes, freq = torch.unique((local * base).sum(1), return_counts=True)
    out = {}
    for c, f in zip(codes.tolist(), freq.tolist()):
        seq = []
        for _ in range(local.shape[1]):
            seq.append(c % n)
            c //= n
        out[tuple(reversed(seq))] = f
    return out


def assert_fits(observed: dict, expected_p: dict, total: int):
    """Every observed cell is possible, and a chi-square goodness of fit passes at ALPHA."""
    impossible = {k: v for k, v in observed.items() if expected_p.get(k, 0.0) == 0.0}
    assert not impossible, f"drew sequences of probability 0: {impossible}"
    assert math.isclose(sum(expected_p.values()), 1.0, rel_tol=1e-9)
    cells = sorted(expected_p, key=lambda c: expected_p[c])
    pairs = [[expected_p[c] * total, observed.get(c, 0)] for c in cells]
    # pool the rarest cells until each has an expected count >= 5 (chi-square validity)
    while len(pairs) > 1 and pairs[0][0] < 5:
        rarest = pairs.pop(0)
        pairs[0][0] += rarest[0]
        pairs[0][1] += rarest[1]
        pairs.sort(key=lambda e: e[0])
    f_exp = [e for e, _ in pairs]
    f_obs = [o for _, o in pairs]
    if len(f_exp) == 1:
        assert f_obs == [total]
        return
    p = stats.chisquare(f_obs, f_exp).pvalue
    assert p > ALPHA, f"chi-square p = {p:.2e}; observed {observed}, expected {expected_p}"


# ----------------------------------------------------------------------------------------------
# Exact distributions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ordered_pairs_follow_successive_sampling(device, dtype):
    """weights [1,2,3,4], two draws: p(i then j) = w_i/W * w_j/(W - w_i) for each of the 12 pairs."""
    w = [1.0, 2.0, 3.0, 4.0]
    W = sum(w)
    local = tiled_draw(w, 2, 20000, seed=1, device=device, dtype=dtype)
    expected = {(i, j): w[i] / W * w[j] / (W - w[i]) for i in range(4) for j in range(4) if i != j}
    assert_fits(sequence_counts(local, 4), expected, 20000)


@pytest.mark.parametrize("device", DEVICES)
def test_first_draw_marginal(device):
    w = [1.0, 2.0, 3.0, 4.0]
    local = tiled_draw(w, 4, 20000, seed=2, device=device)
    first = torch.bincount(local[:, 0], minlength=4).tolist()
    p = stats.chisquare(first, [20000 * x / 10.0 for x in w]).pvalue
    assert p > ALPHA, (first, p)
    # every row drawn exactly once when the count covers the segment
    assert (local.sort(1).values == torch.arange(4)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "weights,count",
    [
        ([0.5, 1.0, 2.0, 4.0, 8.0], 3),           # 60 ordered triples
        ([INF, INF, INF, 1.0, 5.0, 0.0], 4),      # always-first, then by weight, never the 0 row
        ([0.0, 0.0, 0.0, 2.0, 1.0], 5),           # zero weights last, uniformly permuted
        ([0.0, 0.0, 0.0], 3),                      # all zero: a uniform permutation
        ([INF, INF, INF, INF], 4),                 # all +inf: a uniform permutation
        ([3.0, INF, 0.0, 1.0, INF, 0.0, 2.0], 7),  # all three tiers, full order
        ([1e-3, 1e3, 1.0], 2),                     # very uneven weights
    ],
    ids=["five", "inf-first", "zeros-last", "all-zero", "all-inf", "tiers", "uneven"],
)
def test_draw_sequences_match_enumeration(device, weights, count):
    segments = 30000
    local = tiled_draw(weights, count, segments, seed=3, device=device)
    assert_fits(sequence_counts(local, len(weights)), sequence_probabilities(weights, count), segments)


def test_enumeration_helper_is_numpy_successive_sampling():
    """The reference enumeration itself: sanity against the closed form for two draws."""
    w = [1.0, 2.0, 3.0, 4.0]
    probs = sequence_probabilities(w, 2)
    for (i, j), p in probs.items():
        assert math.isclose(p, w[i] / 10 * w[j] / (10 - w[i]))
    assert len(sequence_probabilities([INF, 1.0, 0.0], 3)) == 1


# ----------------------------------------------------------------------------------------------
# Tier rules, explicitly
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_inf_weights_drawn_first_and_uniformly(device):
    w = [1.0, INF, 100.0, INF, 0.0, INF, 7.0]
    segments = 24000
    local = tiled_draw(w, 4, segments, seed=4, device=device)
    inf_rows = torch.tensor([1, 3, 5])
    # the first three draws are exactly the +inf rows, in some order
    assert (local[:, :3].sort(1).values == inf_rows).all()
    # the fourth is a finite positive row, never the zero-weight row
    assert torch.isin(local[:, 3], torch.tensor([0, 2, 6])).all()
    # uniform among the +inf rows: each of the 6 orders equally likely
    orders = sequence_counts(local[:, :3], len(w))
    assert_fits(orders, {p: 1 / 6 for p in permutations([1, 3, 5])}, segments)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_weights_only_after_positive_rows(device):
    w = [0.0, 3.0, 0.0, 0.0, 1.0, 0.0]
    segments = 24000
    for count in (2, 3, 6):
        local = tiled_draw(w, count, segments, seed=5 + count, device=device)
        assert (local[:, :2].sort(1).values == torch.tensor([1, 4])).all()
        if count > 2:
            zeros = local[:, 2:]
            assert torch.isin(zeros, torch.tensor([0, 2, 3, 5])).all()
            if count == 3:  # the first zero-weight draw is uniform over the four zero rows
                freq = torch.bincount(zeros[:, 0], minlength=6)[[0, 2, 3, 5]].tolist()
                assert stats.chisquare(freq).pvalue > ALPHA, freq


# ----------------------------------------------------------------------------------------------
# Shapes, truncation, padding, segments
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_count_larger_than_segment_pads_with_minus_one(device):
    w = torch.tensor([1.0, 2.0, 0.0, INF, 5.0, 1.0, 1.0], dtype=torch.float64)
    u = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    splits = torch.tensor([0, 4, 7])
    counts = torch.tensor([10, 3])
    out = overlap_sampler.weighted_sample(w.to(device), u.to(device), splits.to(device),
                                          counts.to(device), 6).cpu()
    assert out.shape == (2, 6)
    assert sorted(out[0, :4].tolist()) == [0, 1, 2, 3] and (out[0, 4:] == -1).all()
    assert sorted(out[1, :3].tolist()) == [4, 5, 6] and (out[1, 3:] == -1).all()
    assert out[0, 0] == 3 and out[0, 3] == 2  # +inf first, the zero-weight row last


@pytest.mark.parametrize("device", DEVICES)
def test_max_count_truncates_to_a_prefix_of_the_draw(device):
    g = torch.Generator().manual_seed(11)
    sizes = [9, 3, 0, 12, 5]
    w = torch.rand(sum(sizes), dtype=torch.float64, generator=g) * 3
    u = torch.rand(sum(sizes), dtype=torch.float64, generator=g)
    splits = overlap_sampler.splits_from_counts(sizes)
    counts = torch.tensor([7, 7, 7, 7, 7])
    args = [t.to(device) for t in (w, u, splits, counts)]
    full = overlap_sampler.weighted_sample(*args, 12).cpu()
    for max_count in (0, 1, 2, 5, 7):
        cut = overlap_sampler.weighted_sample(*args, max_count).cpu()
        assert cut.shape == (5, max_count)
        assert torch.equal(cut, full[:, :max_count])
    # counts[s] itself caps the draw too
    assert ((full >= 0).sum(1) == torch.tensor([7, 3, 0, 7, 5])).all()
    assert (full[:, 7:] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_segments_and_empty_inputs(device):
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64, device=device)
    u = torch.full((5,), 0.5, dtype=torch.float64, device=device)
    splits = torch.tensor([0, 0, 3, 3, 5, 5], device=device)
    counts = torch.tensor([4, 4, 4, 4, 4], device=device)
    out = overlap_sampler.weighted_sample(w, u, splits, counts, 4).cpu()
    assert (out[[0, 2, 4]] == -1).all()
    assert sorted(out[1, :3].tolist()) == [0, 1, 2] and out[1, 3] == -1
    assert sorted(out[3, :2].tolist()) == [3, 4] and (out[3, 2:] == -1).all()

    empty_w = torch.zeros(0, dtype=torch.float64, device=device)
    no_segments = overlap_sampler.weighted_sample(
        empty_w, empty_w, torch.zeros(1, dtype=torch.int64, device=device),
        torch.zeros(0, dtype=torch.int64, device=device), 3)
    assert no_segments.shape == (0, 3) and no_segments.dtype == torch.int64
    no_rows = overlap_sampler.weighted_sample(
        empty_w, empty_w, torch.zeros(4, dtype=torch.int64, device=device),
        torch.full((3,), 2, dtype=torch.int64, device=device), 2).cpu()
    assert torch.equal(no_rows, torch.full((3, 2), -1))
    zero_width = overlap_sampler.weighted_sample(w, u, splits, counts, 0)
    assert zero_width.shape == (5, 0)
    zero_counts = overlap_sampler.weighted_sample(w, u, splits, torch.zeros_like(counts), 3).cpu()
    assert (zero_counts == -1).all()


# ----------------------------------------------------------------------------------------------
# Exact draw order from the same uniforms
# ----------------------------------------------------------------------------------------------


def _random_problem(seed: int, segments: int = 300):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 14, (segments,), generator=g)
    rows = int(sizes.sum())
    w = torch.rand(rows, dtype=torch.float64, generator=g) * 4
    kind = torch.randint(0, 10, (rows,), generator=g)
    w[kind == 0] = 0.0
    w[kind == 1] = INF
    w[kind == 2] = 1e-6  # tiny but positive: still tier 1
    u = torch.rand(rows, dtype=torch.float64, generator=g)
    u[torch.randint(0, 40, (rows,), generator=g) == 0] = 0.0  # log(0) = -inf keys (ties)
    dup = torch.randint(0, 8, (rows,), generator=g) == 0     # repeated uniforms: exact key ties
    u[dup] = 0.375
    counts = torch.randint(0, 16, (segments,), generator=g)
    return w, u, overlap_sampler.splits_from_counts(sizes), counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_draw_order_equals_recomputed_keys(device, seed):
    w, u, splits, counts = _random_problem(seed)
    max_count = 9
    out = overlap_sampler.weighted_sample(w.to(device), u.to(device), splits.to(device),
                                          counts.to(device), max_count).cpu()
    expected = expected_draws(w.tolist(), u.tolist(), splits.tolist(), counts.tolist(), max_count)
    assert out.tolist() == expected


@pytest.mark.parametrize("device", DEVICES)
def test_float32_inputs_are_converted_to_double(device):
    w, u, splits, counts = _random_problem(7)
    w32, u32 = w.float(), u.float()
    u32[u32 >= 1.0] = 0.5  # rounding to float32 may reach 1.0
    out = overlap_sampler.weighted_sample(w32.to(device), u32.to(device), splits.to(device),
                                          counts.to(device), 9).cpu()
    expected = expected_draws(w32.double().tolist(), u32.double().tolist(), splits.tolist(),
                              counts.tolist(), 9)
    assert out.tolist() == expected


@pytest.mark.parametrize("device", DEVICES)
def test_no_duplicates_and_rows_inside_their_segment(device):
    w, u, splits, counts = _random_problem(3, segments=2000)
    out = overlap_sampler.weighted_sample(w.to(device), u.to(device), splits.to(device),
                                          counts.to(device), 13).cpu()
    sizes = splits[1:] - splits[:-1]
    take = torch.minimum(torch.minimum(counts, sizes), torch.tensor(13))
    valid = out >= 0
    assert torch.equal(valid.sum(1), take)
    # valid entries form a prefix
    assert torch.equal(valid, torch.arange(13)[None, :] < take[:, None])
    lo, hi = splits[:-1, None], splits[1:, None]
    assert ((out >= lo) & (out < hi) | ~valid).all()
    srt = out.sort(1).values
    assert not ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lower_row(device):
    def run(weights, uniforms, count=None):
        n = len(weights)
        out = overlap_sampler.weighted_sample(
            torch.tensor(weights, dtype=torch.float64, device=device),
            torch.tensor(uniforms, dtype=torch.float64, device=device),
            torch.tensor([0, n], device=device),
            torch.tensor([n if count is None else count], device=device), n)
        return out.cpu()[0].tolist()

    # equal weights and equal uniforms: index order
    assert run([1.0] * 5, [0.3] * 5) == [0, 1, 2, 3, 4]
    assert run([2.0] * 5, [0.3] * 5, count=2) == [0, 1, -1, -1, -1]
    # equal keys from different (weight, uniform) pairs: log(0.25)/1 == log(0.5)/0.5
    assert math.log(0.25) / 1.0 == math.log(0.5) / 0.5
    assert run([1.0, 0.5], [0.25, 0.5]) == [0, 1]
    assert run([0.5, 1.0], [0.5, 0.25]) == [0, 1]
    assert run([0.1, 0.5, 1.0], [0.9, 0.5, 0.25], count=1)[0] == 0  # key log(.9)/.1 = -1.05 is largest
    # ties inside tiers 2 and 0 (equal uniforms), and u = 0 rows (key -inf)
    assert run([INF, 0.0, INF, 0.0, 1.0], [0.6, 0.6, 0.6, 0.6, 0.6]) == [0, 2, 4, 1, 3]
    assert run([1.0, 1.0, 1.0], [0.0, 0.5, 0.0]) == [1, 0, 2]


# ----------------------------------------------------------------------------------------------
# Bad inputs: ValueError / TypeError naming the argument
# ----------------------------------------------------------------------------------------------


def _good():
    return dict(
        weights=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
        uniforms=torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64),
        splits=torch.tensor([0, 1, 3]),
        counts=torch.tensor([1, 2]),
        max_count=2,
    )


def _call(**override):
    args = _good()
    args.update(override)
    return overlap_sampler.weighted_sample(args["weights"], args["uniforms"], args["splits"],
                                           args["counts"], args["max_count"])


def test_good_arguments_pass():
    assert _call().shape == (2, 2)


@pytest.mark.parametrize(
    "override,error,match",
    [
        (dict(weights=torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)), ValueError, "weights"),
        (dict(weights=torch.tensor([1.0, math.nan, 3.0], dtype=torch.float64)), ValueError, "weights"),
        (dict(weights=torch.tensor([1.0, -INF, 3.0], dtype=torch.float64)), ValueError, "weights"),
        (dict(weights=torch.ones(3, 1, dtype=torch.float64)), ValueError, "weights"),
        (dict(weights=torch.tensor([1, 2, 3])), TypeError, "weights"),
        (dict(weights=torch.ones(3, dtype=torch.float16)), TypeError, "weights"),
        (dict(uniforms=torch.tensor([0.1, 1.0, 0.5], dtype=torch.float64)), ValueError, "uniforms"),
        (dict(uniforms=torch.tensor([0.1, -0.1, 0.5], dtype=torch.float64)), ValueError, "uniforms"),
        (dict(uniforms=torch.tensor([0.1, math.nan, 0.5], dtype=torch.float64)), ValueError, "uniforms"),
        (dict(uniforms=torch.tensor([0.1, 0.5], dtype=torch.float64)), ValueError, "uniforms"),
        (dict(uniforms=torch.full((3,), 0.5, dtype=torch.bfloat16)), TypeError, "uniforms"),
        (dict(counts=torch.tensor([1, 2, 3])), ValueError, "counts"),
        (dict(counts=torch.tensor([[1, 2]])), ValueError, "counts"),
        (dict(counts=torch.tensor([1, -1])), ValueError, "counts"),
        (dict(counts=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "counts"),
        (dict(splits=torch.tensor([0, 2, 1, 3]), counts=torch.tensor([1, 1, 1])), ValueError,
         "splits"),  # non-monotone
        (dict(splits=torch.tensor([0, 1, 4])), ValueError, "splits"),     # wrong end
        (dict(splits=torch.tensor([0, 1, 2])), ValueError, "splits"),     # wrong end (short)
        (dict(splits=torch.tensor([1, 2, 3])), ValueError, "splits"),     # does not start at 0
        (dict(splits=torch.tensor([0, 1, 3], dtype=torch.int32)), TypeError, "splits"),
        (dict(splits=torch.tensor([[0, 1, 3]])), ValueError, "splits"),
        (dict(max_count=-1), ValueError, "max_count"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(override, error, match):
    with pytest.raises(error, match=match):
        _call(**override)


@pytest.mark.parametrize("device", DEVICES)
def test_every_segment_takes_its_own_count(device):
    # Counts below each segment's size and all different, the first and last segments included,
    # so a kernel that reads one segment's count for another (or ignores it) is caught.
    g = torch.Generator().manual_seed(21)
    sizes = [9, 6, 11, 8, 10]
    counts = [4, 1, 7, 3, 6]
    w = torch.rand(sum(sizes), dtype=torch.float64, generator=g) * 3 + 0.1
    u = torch.rand(sum(sizes), dtype=torch.float64, generator=g)
    splits = overlap_sampler.splits_from_counts(sizes)
    out = overlap_sampler.weighted_sample(w.to(device), u.to(device), splits.to(device),
                                          torch.tensor(counts, device=device), 8).cpu()
    assert (out >= 0).sum(1).tolist() == counts
    assert out.tolist() == expected_draws(w.tolist(), u.tolist(), splits.tolist(), counts, 8)
