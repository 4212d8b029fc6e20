import pytest
import torch

import overlap_sampler
from conftest import cpu_and_cuda


def expected_bins(values, splits, mask, num_bins, upper):
    """Eq. 2's bins written out: bin k = [k*U/K, (k+1)*U/K), the max in the top bin."""
    out = []
    for b in range(splits.numel() - 1):
        rows = range(int(splits[b]), int(splits[b + 1]))
        live = [r for r in rows if mask is None or bool(mask[r])]
        top = upper if upper is not None else max([float(values[r]) for r in live], default=0.0)
        for r in rows:
            if mask is not None and not bool(mask[r]):
                out.append(-1)
            elif top <= 0 or float(values[r]) <= 0:
                out.append(0)
            else:
                out.append(min(num_bins - 1, int(float(values[r]) / top * num_bins)))
    return out


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("num_bins", [1, 2, 3, 7])
@pytest.mark.parametrize("upper", [None, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_eq2(device, num_bins, upper, masked):
    g = torch.Generator().manual_seed(num_bins)
    values = torch.rand(400, generator=g, dtype=torch.float64)
    values[::17] = 0.0
    splits = overlap_sampler.splits_from_counts([150, 0, 1, 249])
    mask = torch.rand(400, generator=g) < 0.6 if masked else None
    got = overlap_sampler.assign_bins(values.to(device), splits.to(device),
                                      mask=None if mask is None else mask.to(device),
                                      num_bins=num_bins, upper=upper)
    assert got.tolist() == expected_bins(values, splits, mask, num_bins, upper)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_max_in_top_bin_and_equal_values_share_a_bin(device):
    values = torch.tensor([0.2, 0.4, 0.3, 0.3, 0.3, 0.0, 0.0], device=device)
    splits = torch.tensor([0, 2, 5, 7], device=device)
    assert overlap_sampler.assign_bins(values, splits, num_bins=2).tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert overlap_sampler.assign_bins(values, splits, num_bins=1).tolist() == [0] * 7


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_values_far_above_a_fixed_upper_fall_in_the_top_bin(device):
    # value / upper * K beyond INT_MAX once overflowed to a negative bin.
    values = torch.tensor([1e20, 0.5, 3e9, 2.0, 0.0], dtype=torch.float64, device=device)
    splits = torch.tensor([0, 5], device=device)
    assert overlap_sampler.assign_bins(values, splits, num_bins=4, upper=1.0).tolist() == [3, 2, 3, 3, 0]
    assert overlap_sampler.assign_bins(values, splits, num_bins=8, upper=1e-12).tolist() == [7, 7, 7, 7, 0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_bins=0), ValueError, "num_bins must be in"),
        (dict(upper=-1.0), ValueError, "upper must be a positive"),
        (dict(values=torch.tensor([0.1, float("nan"), 0.2])), ValueError, "values contains NaN"),
        (dict(values=torch.tensor([1, 2, 3])), TypeError, "values must be float"),
        (dict(splits=torch.tensor([0, 4])), ValueError, "splits must end at the row count"),
        (dict(mask=torch.ones(2, dtype=torch.bool)), ValueError, "mask must have shape"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(values=torch.tensor([0.1, 0.5, 0.2]), splits=torch.tensor([0, 3]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        overlap_sampler.assign_bins(args.pop("values"), args.pop("splits"), **args)
