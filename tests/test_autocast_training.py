"""Detector training steps under autocast, where 16-bit proposals reach the sampler:
float16 with a GradScaler on CUDA (what `overlap-sampler train --amp` runs),
bfloat16 on CUDA and CPU; Faster and Mask R-CNN, an image without GT included."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import needs_cuda
from overlap_sampler.detection import build_detector
from overlap_sampler.sampling import SamplerConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CASES = [  # device, autocast dtype, negative strategy
    ("cpu", torch.bfloat16, "soft"),
    pytest.param("cuda", torch.float16, "soft", marks=needs_cuda),
    pytest.param("cuda", torch.float16, "linear", marks=needs_cuda),
    pytest.param("cuda", torch.bfloat16, "hard", marks=needs_cuda),
]


def _targets(arch: str, size: int, device: str):
    boxes_per_image = ([[4.0, 6.0, 30.0, 40.0], [20.0, 18.0, 50.0, 44.0], [22.0, 20.0, 52.0, 46.0]],
                       [[10.0, 10.0, 34.0, 30.0]], [])
    targets = []
    for label_offset, boxes in enumerate(boxes_per_image):
        box_tensor = torch.tensor(boxes, device=device).reshape(-1, 4)
        t = {"boxes": box_tensor,
             "labels": (torch.arange(box_tensor.shape[0], device=device) + label_offset) % 3 + 1}
        if arch == "maskrcnn":
            t["masks"] = torch.zeros(box_tensor.shape[0], size, size, dtype=torch.uint8, device=device)
            for k, (x1, y1, x2, y2) in enumerate(box_tensor.long().tolist()):
                t["masks"][k, y1:y2, x1:x2] = 1
        targets.append(t)
    return targets


@pytest.mark.parametrize("arch", ["fasterrcnn", "maskrcnn"])
@pytest.mark.parametrize("device,dtype,neg_strategy", CASES)
def test_training_steps_under_autocast(arch, neg_strategy, device, dtype):
    torch.manual_seed(0)
    size = 64
    model = build_detector(arch, 4, backbone="small", min_size=size, max_size=size,
                           sampler=SamplerConfig(neg_strategy=neg_strategy, pos_weight=1.5)).to(device)
    model.roi_heads.validate_inputs = device == "cpu"  # train.py turns the checks off on CUDA
    model.roi_heads.generator = torch.Generator(device).manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    generator = torch.Generator().manual_seed(1)
    targets = _targets(arch, size, device)
    for _ in range(3):
        images = [torch.rand(3, size, size, generator=generator).to(device) for _ in targets]
        with torch.autocast(device, dtype=dtype):
            losses = model(images, targets)
        total = sum(losses.values())
        assert all(math.isfinite(v.item()) for v in losses.values()), losses
        optimizer.zero_grad()
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        num_pos, num_neg = model.roi_heads.last_num_pos, model.roi_heads.last_num_neg
        assert num_pos.device.type == num_neg.device.type == device
        # Every image has examples; the GT-less one only negatives; GT boxes are always positives.
        assert num_pos.tolist()[2] == 0 and all(p >= g for p, g in zip(num_pos.tolist(), [3, 1, 0]))
        assert ((num_pos + num_neg) > 0).all()
    if arch == "maskrcnn":
        assert "loss_mask" in losses
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        detections = model(images)
    assert len(detections) == len(images) and detections[0]["boxes"].device.type == device
