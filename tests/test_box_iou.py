import pytest
import torch
import torchvision

import overlap_sampler
from conftest import cpu_and_cuda, random_boxes


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torchvision(device, dtype):
    g = torch.Generator().manual_seed(0)
    a = random_boxes(37, g).to(device, dtype)
    b = random_boxes(53, g).to(device, dtype)
    got = overlap_sampler.box_iou(a, b)
    assert got.dtype == dtype and got.shape == (37, 53)
    torch.testing.assert_close(got, torchvision.ops.box_iou(a, b))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_float16_within_half_precision(device):
    g = torch.Generator().manual_seed(1)
    a, b = random_boxes(20, g), random_boxes(30, g)
    got = overlap_sampler.box_iou(a.half().to(device), b.half().to(device))
    assert got.dtype == torch.float16
    expected = torchvision.ops.box_iou(a.half().double(), b.half().double())
    torch.testing.assert_close(got.double().cpu(), expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_degenerate_boxes_give_zero_not_nan(device):
    boxes = torch.tensor([[5.0, 5, 5, 5], [0, 0, 0, 10], [0, 0, 10, 10], [3, 3, 3, 3]], device=device)
    got = overlap_sampler.box_iou(boxes, boxes)
    assert not got.isnan().any()
    expected = torch.zeros(4, 4)
    expected[2, 2] = 1.0
    torch.testing.assert_close(got.cpu(), expected)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_empty_inputs(device):
    a = torch.zeros(0, 4, device=device)
    b = torch.rand(3, 4, device=device)
    assert overlap_sampler.box_iou(a, b).shape == (0, 3)
    assert overlap_sampler.box_iou(b, a).shape == (3, 0)


@pytest.mark.parametrize(
    "boxes1, boxes2, error, match",
    [
        (torch.rand(3, 5), torch.rand(2, 4), ValueError, "boxes1 must have shape"),
        (torch.rand(3, 4), torch.rand(4), ValueError, "boxes2 must have shape"),
        (torch.ones(3, 4, dtype=torch.int64), torch.rand(2, 4), TypeError, "boxes1 must be float"),
        (torch.rand(3, 4), torch.rand(2, 4).double(), TypeError, "share a dtype"),
        (torch.tensor([[0.0, 0, float("nan"), 1]]), torch.rand(2, 4), ValueError, "boxes1 contains NaN"),
        (torch.rand(2, 4), torch.tensor([[0.0, 0, float("inf"), 1]]), ValueError, "boxes2 contains NaN"),
    ],
)
def test_bad_input(boxes1, boxes2, error, match):
    with pytest.raises(error, match=match):
        overlap_sampler.box_iou(boxes1, boxes2)
