"""`sample` against the independent per-image PyTorch reference, exactly: the
same uniforms must select the same examples, in the same order, with the same
matched GT and weights."""

import itertools

import pytest
import torch

import overlap_sampler
from overlap_sampler import reference
from conftest import cpu_and_cuda, make_batch

STRATEGY_PAIRS = [
    (neg, pos)
    for neg, pos in itertools.product(overlap_sampler.NEGATIVE_STRATEGIES, overlap_sampler.POSITIVE_STRATEGIES)
    if neg == pos or pos in ("uniform", "soft") or neg in ("soft", "uniform")
]


def assert_same(result, expected):
    for name, a, b in zip(overlap_sampler.SampleResult._fields, result, expected):
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs:\n{a}\n{b}"


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("neg_strategy, pos_strategy", STRATEGY_PAIRS)
def test_matches_reference_for_every_strategy(device, neg_strategy, pos_strategy):
    for seed in range(3):
        batch = make_batch([400, 0, 35, 260, 3], [9, 4, 0, 15, 1], seed=seed)
        uniforms = torch.rand(batch[0].shape[0] + batch[2].shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        options = dict(batch_size_per_image=128, neg_strategy=neg_strategy, pos_strategy=pos_strategy,
                       num_bins=1 + seed * 2, pos_weight=2.0, hard_thresh=0.3)
        got = overlap_sampler.sample_from_uniforms(*[t.to(device) for t in batch], uniforms.to(device),
                                                   **options)
        assert_same(got, reference.sample_from_uniforms(*batch, uniforms, **options))


OPTION_VARIANTS = [
    dict(append_gt=False),
    dict(bin_upper=0.7),
    # Keys scale to ~1e12 * K: the top bin, never an int overflow (was a crash).
    dict(bin_upper=1e-12, num_bins=4, pos_strategy="soft"),
    dict(pos_key="all", pos_strategy="soft"),
    dict(fg_iou_thresh=0.6, bg_iou_thresh=0.4),  # ignored band between the thresholds
    dict(positive_fraction=1.0, batch_size_per_image=64),
    dict(positive_fraction=0.0),
    dict(batch_size_per_image=0),
    dict(batch_size_per_image=4000),  # more than every candidate
    dict(num_bins=64, neg_strategy="soft_reference"),
    dict(neg_strategy="iou_balanced", bin_upper=0.3),
    dict(pos_weight=0.5),  # epsilon below 1 down-weights
    dict(pos_weight=0.0),  # ... down to 0, which must not read as padding
    dict(fg_iou_thresh=0.0, bg_iou_thresh=0.0, positive_fraction=1.0),  # every proposal with a GT positive
]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("options", OPTION_VARIANTS, ids=[str(o) for o in OPTION_VARIANTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_matches_reference_for_options_and_dtypes(device, options, dtype):
    batch = make_batch([300, 10, 0, 180], [6, 0, 2, 11], seed=42, dtype=dtype)
    examples = batch[0].shape[0] + (0 if options.get("append_gt") is False else batch[2].shape[0])
    uniforms = torch.rand(examples, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    options = dict(dict(pos_weight=3.0), **options)
    got = overlap_sampler.sample_from_uniforms(*[t.to(device) for t in batch], uniforms.to(device), **options)
    assert_same(got, reference.sample_from_uniforms(*batch, uniforms, **options))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_duplicated_gt_boxes_match_reference(device):
    # Equal IoUs with two GT rows: matched to the lower row, epsilon per GT row.
    proposals, ps, gt, gs = make_batch([200, 150], [4, 3], seed=8)
    gt = torch.cat([gt[:4], gt[1:3], gt[4:], gt[4:5]])  # image 0: rows 1, 2 twice; image 1: row 0 twice
    gs = torch.tensor([0, 6, 10])
    uniforms = torch.rand(proposals.shape[0] + gt.shape[0], dtype=torch.float64,
                          generator=torch.Generator().manual_seed(4))
    options = dict(batch_size_per_image=64, pos_strategy="soft", pos_weight=2.0)
    got = overlap_sampler.sample_from_uniforms(proposals.to(device), ps.to(device), gt.to(device), gs.to(device),
                                               uniforms.to(device), **options)
    assert_same(got, reference.sample_from_uniforms(proposals, ps, gt, gs, uniforms, **options))
    # A proposal's tie between a GT row and its duplicate goes to the lower row (a GT copy keeps its own).
    matched = got.matched_gt.cpu()[0][got.indices.cpu()[0] < proposals.shape[0]]
    assert (matched >= 0).any() and not ((matched == 4) | (matched == 5)).any()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("crowded_fraction", [0.05, 0.95])
def test_few_or_many_positives_match_reference(device, crowded_fraction):
    """Overlap keys both ways round: the CPU sweeps whichever of queries and keys
    is larger (negatives against few positives, or positives against few
    negatives), on a realistic canvas where the sweep prunes most pairs."""
    batch = make_batch([1500, 700], [12, 30], seed=3, crowded_fraction=crowded_fraction, canvas=1000.0)
    uniforms = torch.rand(batch[0].shape[0] + batch[2].shape[0], dtype=torch.float64,
                          generator=torch.Generator().manual_seed(2))
    for pos_key in ("negatives", "all"):
        options = dict(neg_strategy="linear", pos_strategy="linear", pos_key=pos_key, positive_fraction=0.5)
        got = overlap_sampler.sample_from_uniforms(*[t.to(device) for t in batch], uniforms.to(device),
                                                   **options)
        assert_same(got, reference.sample_from_uniforms(*batch, uniforms, **options))


def test_sample_draws_its_uniforms_from_the_generator():
    batch = make_batch([200, 50], [5, 2], seed=3)
    got = overlap_sampler.sample(*batch, pos_weight=2.0, generator=torch.Generator().manual_seed(7))
    expected = reference.sample(*batch, pos_weight=2.0, generator=torch.Generator().manual_seed(7))
    assert_same(got, expected)
    again = overlap_sampler.sample(*batch, pos_weight=2.0, generator=torch.Generator().manual_seed(7))
    assert_same(got, again)
    small = dict(batch_size_per_image=64, generator=torch.Generator().manual_seed(7))
    other = dict(small, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(overlap_sampler.sample(*batch, **small).indices,
                           overlap_sampler.sample(*batch, **other).indices)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_edge_cases_match_reference(device):
    cases = {
        "no proposals": (torch.zeros(0, 4), [0], torch.tensor([[0.0, 0, 10, 10]]), [1]),
        "no gt": (torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]]), [2], torch.zeros(0, 4), [0]),
        "no positives": (torch.tensor([[50.0, 50, 60, 60]] * 4), [4], torch.tensor([[0.0, 0, 10, 10]]), [1]),
        "all keys equal": (torch.tensor([[0.0, 0, 10, 10]] * 6 + [[0.0, 0, 10, 30]] * 6), [12],
                           torch.tensor([[0.0, 0, 10, 10]]), [1]),
        "degenerate boxes": (torch.tensor([[3.0, 3, 3, 3], [0, 0, 0, 9], [0, 0, 10, 10]]), [3],
                             torch.tensor([[0.0, 0, 10, 10], [5, 5, 5, 5]]), [2]),
        "no images": (torch.zeros(0, 4), [], torch.zeros(0, 4), []),
    }
    for name, (proposals, p_counts, gt, g_counts) in cases.items():
        ps, gs = overlap_sampler.splits_from_counts(p_counts), overlap_sampler.splits_from_counts(g_counts)
        uniforms = torch.rand(proposals.shape[0] + gt.shape[0], dtype=torch.float64)
        for neg in overlap_sampler.NEGATIVE_STRATEGIES:
            options = dict(batch_size_per_image=8, neg_strategy=neg, pos_strategy="soft", pos_weight=2.0)
            got = overlap_sampler.sample_from_uniforms(proposals.to(device), ps.to(device), gt.to(device),
                                                       gs.to(device), uniforms.to(device), **options)
            expected = reference.sample_from_uniforms(proposals, ps, gt, gs, uniforms, **options)
            assert_same(got, expected)
            assert not got.weights.isnan().any(), name
