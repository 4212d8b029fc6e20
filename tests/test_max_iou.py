import pytest
import torch
import torchvision

import overlap_sampler
from conftest import cpu_and_cuda, make_batch


def brute_force(queries, qs, keys, ks, query_mask=None, key_mask=None, exclude_self=False):
    """Per image: the full IoU matrix (torchvision), masked, max with lowest-index ties."""
    values = torch.zeros(queries.shape[0], dtype=torch.float64)
    indices = torch.full((queries.shape[0],), -1, dtype=torch.int64)
    for b in range(qs.numel() - 1):
        q0, q1, k0, k1 = int(qs[b]), int(qs[b + 1]), int(ks[b]), int(ks[b + 1])
        if q1 == q0 or k1 == k0:
            continue
        iou = torchvision.ops.box_iou(queries[q0:q1].double(), keys[k0:k1].double()).nan_to_num(0.0)
        eligible = torch.ones_like(iou, dtype=torch.bool)
        if key_mask is not None:
            eligible &= key_mask[k0:k1][None, :]
        if exclude_self:
            eligible &= ~torch.eye(q1 - q0, k1 - k0, dtype=torch.bool)
        iou = torch.where(eligible, iou, torch.tensor(-1.0, dtype=torch.float64))
        best = iou.max(dim=1).values
        columns = torch.arange(k1 - k0).expand_as(iou)
        first = torch.where(iou == best[:, None], columns, k1 - k0).min(dim=1).values
        ok = best >= 0
        if query_mask is not None:
            ok &= query_mask[q0:q1]
        values[q0:q1] = torch.where(ok, best, torch.zeros_like(best))
        indices[q0:q1] = torch.where(ok, first + k0, torch.full_like(first, -1))
    return values, indices


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gt_matching_matches_brute_force(device, dtype):
    proposals, ps, gt, gs = make_batch([300, 0, 57, 180, 40], [7, 3, 0, 12, 1], seed=3, dtype=dtype)
    values, indices = overlap_sampler.max_iou(proposals.to(device), ps.to(device), gt.to(device),
                                              gs.to(device))
    expected_values, expected_indices = brute_force(proposals, ps, gt, gs)
    torch.testing.assert_close(values.cpu().double(), expected_values)
    assert torch.equal(indices.cpu(), expected_indices)
    assert values.dtype == dtype


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed", range(5))
def test_masked_self_excluded_matches_brute_force(device, seed):
    """IoU_p,n-style reductions: negatives (queries) against positives (keys) of one set."""
    boxes, splits, _, _ = make_batch([120, 33, 0, 200], [5, 2, 0, 9], seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    positive = torch.rand(boxes.shape[0], generator=g) < 0.3
    for kwargs in (
        dict(query_mask=~positive, key_mask=positive),
        dict(query_mask=positive, key_mask=None, exclude_self=True),
        dict(exclude_self=True),
    ):
        on = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        values, indices = overlap_sampler.max_iou(boxes.to(device), splits.to(device), boxes.to(device),
                                                  splits.to(device), **on)
        expected_values, expected_indices = brute_force(boxes, splits, boxes, splits, **kwargs)
        torch.testing.assert_close(values.cpu(), expected_values)
        assert torch.equal(indices.cpu(), expected_indices), kwargs


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_ties_go_to_lowest_key_and_no_key_gives_minus_one(device):
    queries = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]], device=device)
    keys = torch.tensor([[100.0, 100, 110, 110], [0, 0, 10, 10], [0, 0, 10, 10]], device=device)
    qs = torch.tensor([0, 2, 3], device=device)
    ks = torch.tensor([0, 3, 3], device=device)
    values, indices = overlap_sampler.max_iou(queries, qs, keys, ks)
    assert indices.tolist() == [1, 0, -1]  # tie 1 vs 2 -> 1; all-zero -> lowest key 0; no keys -> -1
    assert values.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(query_splits=torch.tensor([0, 2, 2])), ValueError, "query_splits must end at the row count"),
        (dict(key_splits=torch.tensor([0, 4, 2, 3])), ValueError, "describe the same number of images"),
        (dict(key_splits=torch.tensor([0, 4, 3])), ValueError, "key_splits must be non-decreasing"),
        (dict(query_splits=torch.tensor([0.0, 3.0, 3.0])), TypeError, "query_splits must be int64"),
        (dict(query_mask=torch.ones(3)), TypeError, "query_mask must be bool"),
        (dict(key_mask=torch.ones(2, dtype=torch.bool)), ValueError, r"key_mask must have shape \[3\]"),
        (dict(exclude_self=True), ValueError, "exclude_self needs query_splits equal to key_splits"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(queries=torch.rand(3, 4) + torch.tensor([0, 0, 1, 1]), query_splits=torch.tensor([0, 3, 3]),
                keys=torch.rand(3, 4) + torch.tensor([0, 0, 1, 1]), key_splits=torch.tensor([0, 1, 3]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        overlap_sampler.max_iou(args.pop("queries"), args.pop("query_splits"), args.pop("keys"),
                                args.pop("key_splits"), **args)
