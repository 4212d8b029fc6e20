"""Detector builders: torchvision Faster / Mask R-CNN with the Overlap Sampler.

Nothing is downloaded: backbones start from random initialisation (as
torchvision's builders with ``weights=None, weights_backbone=None``) unless a
local weights file is given.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.resnet import BasicBlock
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..sampling.config import SamplerConfig
from ..torch_load import load_error_reason
from .roi_heads import install_sampler

ARCHITECTURES = ("fasterrcnn", "maskrcnn")
BACKBONES = ("resnet50_fpn", "resnet18_fpn", "small")

# The RoI-head sampling settings live in SamplerConfig only, so that one
# source of truth drives both the "overlap" and the "random" path.
_SAMPLER_OWNED_KWARGS = {
    "box_fg_iou_thresh": "fg_iou_thresh",
    "box_bg_iou_thresh": "bg_iou_thresh",
    "box_batch_size_per_image": "batch_size_per_image",
    "box_positive_fraction": "positive_fraction",
}

# "small": sized for 64-160 px images. FPN levels at strides 4..32 plus a
# max-pooled stride-64 level; one anchor size per level.
SMALL_FPN_CHANNELS = 64
SMALL_TRUNK_WIDTHS = (32, 64, 96, 128)
SMALL_ANCHOR_SIZES = ((8,), (16,), (32,), (64,), (128,))
SMALL_REPRESENTATION_SIZE = 256
SMALL_SAMPLING_RATIO = 1
SMALL_DEFAULTS: dict[str, Any] = {
    # Fewer proposals than torchvision's 2000 / 1000: a 128 px image has
    # ~4k anchors in all, and NMS leaves a few hundred distinct boxes anyway.
    "rpn_pre_nms_top_n_train": 1000,
    "rpn_post_nms_top_n_train": 1000,
    "rpn_pre_nms_top_n_test": 500,
    "rpn_post_nms_top_n_test": 500,
}


class SmallTrunk(nn.Module):
    """A light residual CNN for small images (the ``"small"`` backbone's body).

    ``stem`` (3x3 conv, stride 2) then ``layer1..layer4``, each one torchvision
    ``BasicBlock`` with stride 2 (+ one at stride 1 for the last two), giving
    strides 4, 8, 16, 32 with ``widths`` channels. BatchNorm (trainable), so it
    trains from random initialisation.
    """

    def __init__(self, widths: tuple[int, int, int, int] = SMALL_TRUNK_WIDTHS, stem_width: int = 24):
        super().__init__()
        norm = nn.BatchNorm2d
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False), norm(stem_width), nn.ReLU(inplace=True))
        blocks_per_stage = (1, 1, 2, 2)
        in_ch = stem_width
        for i, (width, blocks) in enumerate(zip(widths, blocks_per_stage)):
            layers: list[nn.Module] = []
            for j in range(blocks):
                stride = 2 if j == 0 else 1
                downsample = None
                if stride != 1 or in_ch != width:
                    downsample = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False), norm(width))
                layers.append(BasicBlock(in_ch, width, stride=stride, downsample=downsample, norm_layer=norm))
                in_ch = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def small_fpn_backbone(out_channels: int = SMALL_FPN_CHANNELS) -> BackboneWithFPN:
    """:class:`SmallTrunk` + torchvision FPN: feature maps ``"0".."3"`` (strides
    4..32) and ``"pool"`` (stride 64), each ``out_channels`` wide."""
    trunk = SmallTrunk()
    return BackboneWithFPN(
        trunk,
        return_layers={f"layer{i + 1}": str(i) for i in range(4)},
        in_channels_list=list(SMALL_TRUNK_WIDTHS),
        out_channels=out_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def _small_heads(arch: str, num_classes: int) -> dict[str, Any]:
    out = SMALL_FPN_CHANNELS
    anchors = AnchorGenerator(SMALL_ANCHOR_SIZES, ((0.5, 1.0, 2.0),) * len(SMALL_ANCHOR_SIZES))
    box_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=SMALL_SAMPLING_RATIO)
    heads: dict[str, Any] = {
        "rpn_anchor_generator": anchors,
        "box_roi_pool": box_pool,
        "box_head": TwoMLPHead(out * 7 * 7, SMALL_REPRESENTATION_SIZE),
        "box_predictor": FastRCNNPredictor(SMALL_REPRESENTATION_SIZE, num_classes),
        **SMALL_DEFAULTS,
    }
    if arch == "maskrcnn":
        heads["mask_roi_pool"] = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=14,
                                                    sampling_ratio=2)
        heads["mask_head"] = MaskRCNNHeads(out, (out, out), 1)
        heads["mask_predictor"] = MaskRCNNPredictor(out, out, num_classes)
    return heads


def build_detector(
    arch: str,
    num_classes: int,
    *,
    backbone: str = "resnet50_fpn",
    sampler: Optional[SamplerConfig] = None,
    weights: Optional[str] = None,
    backbone_weights: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    frozen_batchnorm: Optional[bool] = None,
    box_nms_thresh: float = 0.55,
    min_size: int = 800,
    max_size: int = 1333,
    **torchvision_kwargs: Any,
) -> GeneralizedRCNN:
    """A torchvision Faster / Mask R-CNN whose RoI head is an :class:`OverlapRoIHeads`.

    Args:
        arch: ``"fasterrcnn"`` or ``"maskrcnn"``.
        num_classes: number of classes *including* background (>= 2).
        backbone: ``"resnet50_fpn"`` (the paper's; same modules and
            ``state_dict`` keys as ``torchvision.models.detection.fasterrcnn_resnet50_fpn``),
            ``"resnet18_fpn"``, or ``"small"`` (a light CNN + 64-channel FPN,
            anchors 8..128 px, 256-d box head, 1000 / 500 RPN proposals in
            training / test: for 64-160 px images on a CPU).
        sampler: the RoI-head sampling settings (None = :class:`SamplerConfig`
            defaults, the paper's best). They also set the RoI head's IoU
            thresholds, batch size and positive fraction.
        weights: a local ``.pth`` file holding the whole model's ``state_dict``,
            or a checkpoint dict with the ``state_dict`` under ``"model"``
            (loaded with ``weights_only=True``; see :func:`load_weights`). Never
            downloaded. None = random init.
        backbone_weights: a local ImageNet classification ``state_dict`` of the
            ResNet (torchvision's ``resnet50-0676ba61.pth`` and the like), loaded
            into the backbone's trunk (its ``fc`` is dropped; see
            :func:`load_backbone_weights`). ResNet backbones only.
        trainable_backbone_layers: how many ResNet stages train, counted from
            the top (``layer4``, ``layer3``, ``layer2``, ``layer1``, ``conv1``):
            0-5. None = torchvision's rule: 3 with pretrained weights (``weights``
            or ``backbone_weights``), else 5.
        frozen_batchnorm: the ResNet's BatchNorm as ``FrozenBatchNorm2d`` (fixed
            statistics and affine). None = torchvision's rule: frozen with
            pretrained weights, trainable ``BatchNorm2d`` from random init. The
            ``"small"`` backbone always has trainable BatchNorm.
        box_nms_thresh: the RoI head's test-time NMS IoU threshold (paper: 0.55).
        min_size, max_size: the image resize of ``GeneralizedRCNNTransform``.
        **torchvision_kwargs: passed to ``FasterRCNN`` / ``MaskRCNN`` (e.g.
            ``rpn_post_nms_top_n_train``, ``box_detections_per_img``,
            ``box_score_thresh``); the ``box_*`` sampling settings are rejected
            (set them in ``sampler``).

    Returns:
        the model (``FasterRCNN`` or ``MaskRCNN``), in training mode.

    Raises:
        ValueError: unknown ``arch`` / ``backbone``, bad ``num_classes``, a
            sampling kwarg, an unreadable or mismatched weights file, ResNet
            settings with the ``"small"`` backbone.
        FileNotFoundError: a weights file does not exist.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}; got {arch!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got {backbone!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (background included); got {num_classes!r}")
    for key, field in _SAMPLER_OWNED_KWARGS.items():
        if key in torchvision_kwargs:
            raise ValueError(f"{key} is a sampling setting: set SamplerConfig.{field} (sampler=...) instead")
    config = SamplerConfig() if sampler is None else sampler
    if not isinstance(config, SamplerConfig):
        raise TypeError(f"sampler must be a SamplerConfig or None, got {type(config).__name__}")
    config.validate()

    pretrained = weights is not None or backbone_weights is not None
    kwargs: dict[str, Any] = {}
    if backbone == "small":
        resnet_settings = {"backbone_weights": backbone_weights, "frozen_batchnorm": frozen_batchnorm,
                           "trainable_backbone_layers": trainable_backbone_layers}
        given = [name for name, value in resnet_settings.items() if value is not None]
        if given:
            raise ValueError(f"{given[0]} is a ResNet setting; the 'small' backbone has none")
        body = small_fpn_backbone()
        kwargs.update(_small_heads(arch, num_classes))
    else:
        layers = trainable_backbone_layers
        if layers is None:
            layers = 3 if pretrained else 5
        if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= 5:
            raise ValueError(f"trainable_backbone_layers must be an integer in 0..5, got {layers!r}")
        frozen = pretrained if frozen_batchnorm is None else bool(frozen_batchnorm)
        # torchvision's resnet_fpn_backbone: stages below the trainable ones get requires_grad=False.
        body = resnet_fpn_backbone(backbone_name=backbone.removesuffix("_fpn"), weights=None,
                                   norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d,
                                   trainable_layers=layers)
    kwargs.update(torchvision_kwargs)
    if kwargs.get("box_predictor") is not None or kwargs.get("mask_predictor") is not None:
        # torchvision wants num_classes=None when a predictor is given.
        detector_num_classes: Optional[int] = None
    else:
        detector_num_classes = num_classes
    cls = MaskRCNN if arch == "maskrcnn" else FasterRCNN
    model = cls(
        body,
        num_classes=detector_num_classes,
        min_size=min_size,
        max_size=max_size,
        box_nms_thresh=box_nms_thresh,
        box_fg_iou_thresh=config.fg_iou_thresh,
        box_bg_iou_thresh=config.bg_iou_thresh,
        box_batch_size_per_image=config.batch_size_per_image,
        box_positive_fraction=config.positive_fraction,
        **kwargs,
    )
    install_sampler(model, config)
    if backbone_weights is not None:
        load_backbone_weights(model, backbone_weights)
    if weights is not None:
        load_weights(model, weights)
    return model


# Heads whose shape follows the number of classes: a weights file of another class count leaves them
# at their initial values (fine-tuning), as detectron2 and mmdetection do.
_CLASS_HEADS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


def _read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: the file's mapping, or its ``"model"`` / ``"state_dict"`` entry;
    a ``"module."`` prefix (DistributedDataParallel) stripped. ``~`` is expanded."""
    path = os.fspath(path)
    local = os.path.expanduser(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    try:
        obj = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        raise ValueError(f"cannot read {what} file {path!r} as a torch state dict "
                         f"(torch.load weights_only=True): {load_error_reason(exc)}") from exc
    state = obj
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{what} file {path!r} holds no state dict (expected a mapping of parameter "
                         f"names to tensors, or a checkpoint with one under 'model')")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _compare(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    """Missing keys, unexpected keys, shape mismatches. BatchNorm's ``num_batches_tracked`` counts
    neither way: torchvision's pretrained files (FrozenBatchNorm2d) have none."""
    def counts(key):
        return not key.endswith(".num_batches_tracked")

    missing = [k for k in own if k not in state and counts(k)]
    unexpected = [k for k in state if k not in own and counts(k)]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    return missing, unexpected, mismatched


def _mismatch_error(path: str, hint: str, missing: list, unexpected: list, mismatched: list[str]) -> ValueError:
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
        if items:
            more = f", ... ({len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} {name} ({', '.join(items[:5])}{more})")
    return ValueError(f"weights file {path!r} does not match the model ({hint}): " + "; ".join(parts))


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load a local whole-model weights file into ``model``, returning it.

    The file holds either the model's ``state_dict`` or a checkpoint dict with it under ``"model"``
    (or ``"state_dict"``); a ``"module."`` prefix (DistributedDataParallel) is stripped. Read with
    ``torch.load(weights_only=True)``: tensors and plain containers only. Every key must match,
    except that BatchNorm's ``num_batches_tracked`` may be absent (torchvision's pretrained
    detectors, e.g. ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``, have none) and that the
    class-specific predictors (``roi_heads.box_predictor``, the mask predictor's last layer) may
    have another number of classes: they then keep their initial values, with a ``UserWarning``
    (fine-tuning on a new dataset).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, no state dict in it, or keys / shapes
            that do not match the model (the message lists a few of each).
    """
    state = _read_state_dict(path, "weights")
    own = model.state_dict()
    missing, unexpected, mismatched = _compare(own, state)
    class_heads = [k for k in mismatched if k.startswith(_CLASS_HEADS)]
    others = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in mismatched if k not in class_heads]
    if missing or unexpected or others:
        raise _mismatch_error(path, "wrong arch, backbone or weights file?", missing, unexpected, others)
    if class_heads:
        warnings.warn(f"weights file {path!r} was trained for another number of classes: "
                      f"{', '.join(class_heads)} keep their initial values", stacklevel=2)
    model.load_state_dict({k: v for k, v in state.items() if k not in class_heads}, strict=False)
    return model


def load_backbone_weights(model: nn.Module, path: str) -> nn.Module:
    """Load an ImageNet classification ``state_dict`` of a ResNet into the detector's trunk
    (``model.backbone.body``), returning ``model``.

    This is the usual start of a COCO detector (torchvision's ``weights_backbone``): e.g.
    ``resnet50-0676ba61.pth`` for ``resnet50_fpn``, ``resnet18-f37072fd.pth`` for ``resnet18_fpn``,
    as ``torchvision.models.resnet50(weights="IMAGENET1K_V1")`` downloads them into
    ``~/.cache/torch/hub/checkpoints``. The classifier (``fc.*``) is dropped; every other key must
    match (BatchNorm's ``num_batches_tracked`` aside).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, or keys / shapes that do not match the trunk.
    """
    body = getattr(getattr(model, "backbone", None), "body", None)
    if body is None or not hasattr(body, "layer4"):
        raise ValueError("backbone weights need a ResNet backbone (model.backbone.body with layer1..4)")
    state = {k: v for k, v in _read_state_dict(path, "backbone weights").items() if not k.startswith("fc.")}
    own = body.state_dict()
    missing, unexpected, mismatched = _compare(own, state)
    if missing or unexpected or mismatched:
        shapes = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}" for k in mismatched]
        raise _mismatch_error(path, "an ImageNet ResNet of another depth?", missing, unexpected, shapes)
    body.load_state_dict(state, strict=False)
    return model
