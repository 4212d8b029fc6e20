"""Exact invariants of `sample` over thousands of random batches of every shape."""

import pytest
import torch
import torchvision

import overlap_sampler
from conftest import cpu_and_cuda, make_batch


def check_invariants(batch, result, options):
    proposals, ps, gt, gs = (t.cpu() for t in batch)
    indices, matched, weights, num_pos, num_neg = (t.cpu() for t in result)
    n_total = proposals.shape[0]
    width = options["batch_size_per_image"]
    quota = int(width * options["positive_fraction"] + 0.5)
    for b in range(ps.numel() - 1):
        p, n = int(num_pos[b]), int(num_neg[b])
        row, row_matched, row_weights = indices[b], matched[b], weights[b]
        assert 0 <= p <= quota and p + n <= width
        assert (row[p + n:] == -1).all() and (row_weights[p + n:] == 0).all()
        assert (row_matched[p:] == -1).all()
        picked = row[: p + n]
        assert picked.unique().numel() == p + n, "duplicate example"
        p0, p1, g0, g1 = int(ps[b]), int(ps[b + 1]), int(gs[b]), int(gs[b + 1])
        is_proposal = (picked >= p0) & (picked < p1)
        is_copy = (picked >= n_total + g0) & (picked < n_total + g1)
        assert (is_proposal | is_copy).all(), "index outside its image"
        assert is_copy[p:].sum() == 0, "a GT copy sampled as a negative"
        # Labels, recomputed independently with torchvision.
        examples = torch.cat([proposals[p0:p1], gt[g0:g1]]) if options["append_gt"] else proposals[p0:p1]
        local = torch.where(picked < n_total, picked - p0, picked - n_total - g0 + (p1 - p0))
        iou = torchvision.ops.box_iou(examples.double(), gt[g0:g1].double()).nan_to_num(0)
        best = iou.max(dim=1).values if g1 > g0 else torch.zeros(examples.shape[0], dtype=torch.float64)
        copy_local = local >= (p1 - p0)
        assert ((best[local[:p]] >= 0.5 - 1e-6) | copy_local[:p]).all(), "sampled positive below fg"
        assert (best[local[p:]] < 0.5 + 1e-6).all(), "sampled negative above bg"
        assert ((row_matched[:p] >= g0) & (row_matched[:p] < g1)).all()
        # Counts: as many as the quota allows.
        is_copy_all = torch.arange(examples.shape[0]) >= (p1 - p0)
        labels_pos = int(((best >= 0.5) | is_copy_all).sum())
        labels_neg = int(((best < 0.5) & ~is_copy_all).sum())
        assert p == min(quota, labels_pos)
        assert n == min(width - p, labels_neg)
        # Weights: 1 or epsilon; at most one epsilon per GT, on a sampled proposal.
        eps = options["pos_weight"]
        heavy = (row_weights[: p + n] != 1.0).nonzero().flatten()
        if eps != 1.0:
            assert (row_weights[heavy] == eps).all() and (heavy < p).all()
            assert row_matched[heavy].unique().numel() == heavy.numel()
            assert (row[heavy] < n_total).all(), "epsilon on a GT copy"
            gts_with_proposals = row_matched[:p][row[:p] < n_total].unique().numel()
            assert heavy.numel() == gts_with_proposals


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_invariants_over_random_batches(device):
    g = torch.Generator().manual_seed(2024)
    strategies = overlap_sampler.NEGATIVE_STRATEGIES
    for trial in range(1500):
        images = int(torch.randint(1, 5, (1,), generator=g))
        p_counts = torch.randint(0, 120, (images,), generator=g).tolist()
        g_counts = torch.randint(0, 6, (images,), generator=g).tolist()
        batch = make_batch(p_counts, g_counts, seed=trial, device=device)
        options = dict(
            batch_size_per_image=int(torch.randint(0, 80, (1,), generator=g)),
            positive_fraction=float(torch.rand(1, generator=g)),
            append_gt=True,
            neg_strategy=strategies[trial % len(strategies)],
            pos_strategy=overlap_sampler.POSITIVE_STRATEGIES[trial % 5],
            num_bins=1 + trial % 4,
            pos_weight=(1.0, 2.0, 3.5)[trial % 3],
        )
        result = overlap_sampler.sample(*batch, generator=torch.Generator(device).manual_seed(trial), **options)
        check_invariants(batch, result, options)
