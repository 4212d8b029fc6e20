"""build_detector: every arch x backbone builds, the ResNet-50 one is torchvision's model,
the small one trains and scripts, and local weights load (or fail clearly)."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN, MaskRCNN, fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn

from overlap_sampler.detection import ARCHITECTURES, BACKBONES, OverlapRoIHeads, build_detector, load_weights
from overlap_sampler.sampling import SamplerConfig

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:RCNN always returns a")]


def _batch(arch: str, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g), torch.rand(3, size - 8, size, generator=g)]
    targets = []
    for boxes in ([[4.0, 6.0, 30.0, 40.0], [20.0, 18.0, 50.0, 44.0]], [[10.0, 10.0, 34.0, 30.0]]):
        t = {"boxes": torch.tensor(boxes), "labels": torch.arange(1, len(boxes) + 1)}
        if arch == "maskrcnn":
            t["masks"] = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(torch.tensor(boxes).long().tolist()):
                t["masks"][k, y1:y2, x1:x2] = 1
        targets.append(t)
    return images, targets


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_combination_builds(arch, backbone):
    model = build_detector(arch, 5, backbone=backbone, box_nms_thresh=0.6, min_size=96, max_size=160)
    assert isinstance(model, MaskRCNN if arch == "maskrcnn" else FasterRCNN)
    assert isinstance(model.roi_heads, OverlapRoIHeads)
    assert model.roi_heads.has_mask() == (arch == "maskrcnn")
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    assert model.roi_heads.nms_thresh == 0.6
    assert model.roi_heads.sampler_config() == SamplerConfig()
    assert model.transform.min_size == (96,) and model.transform.max_size == 160
    assert model.training
    # from scratch, everything trains (torchvision's choice without pretrained weights)
    assert all(p.requires_grad for p in model.parameters())


def test_defaults_are_the_papers():
    model = build_detector("fasterrcnn", 3, backbone="small")
    assert model.roi_heads.nms_thresh == 0.55
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333


@pytest.mark.parametrize("arch,reference", [("fasterrcnn", fasterrcnn_resnet50_fpn),
                                            ("maskrcnn", maskrcnn_resnet50_fpn)])
def test_resnet50_fpn_is_torchvisions_model(arch, reference):
    ours = build_detector(arch, 7, backbone="resnet50_fpn").state_dict()
    theirs = reference(weights=None, weights_backbone=None, num_classes=7).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_torchvision_kwargs_are_forwarded_and_sampling_ones_rejected():
    model = build_detector("fasterrcnn", 3, backbone="small", box_detections_per_img=7,
                           rpn_post_nms_top_n_test=50)
    assert model.roi_heads.detections_per_img == 7
    assert model.rpn._post_nms_top_n["testing"] == 50
    with pytest.raises(ValueError, match="box_batch_size_per_image.*SamplerConfig.batch_size_per_image"):
        build_detector("fasterrcnn", 3, backbone="small", box_batch_size_per_image=128)


def test_sampler_config_reaches_the_head():
    config = SamplerConfig(neg_strategy="linear", pos_weight=1.5, batch_size_per_image=256)
    model = build_detector("fasterrcnn", 3, backbone="small", sampler=config)
    assert model.roi_heads.sampler_config() == config
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 256


def _mutated_sampler(**fields) -> SamplerConfig:
    """A config changed after construction (which validates): build_detector must check it again."""
    config = SamplerConfig()
    for name, value in fields.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize("kwargs,match", [
    ({"arch": "retinanet"}, "arch must be one of"),
    ({"backbone": "vgg16"}, "backbone must be one of"),
    ({"num_classes": 1}, "num_classes"),
    ({"sampler": _mutated_sampler(neg_strategy="nope")}, "neg_strategy"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = {"arch": "fasterrcnn", "num_classes": 3, "backbone": "small", **kwargs}
    with pytest.raises(ValueError, match=match):
        build_detector(args.pop("arch"), args.pop("num_classes"), **args)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_small_trains_a_step(arch):
    torch.manual_seed(0)
    model = build_detector(arch, 3, backbone="small", min_size=64, max_size=64,
                           sampler=SamplerConfig(batch_size_per_image=64))
    images, targets = _batch(arch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = model(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    if arch == "maskrcnn":
        expected.add("loss_mask")
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    assert model.roi_heads.last_num_pos.tolist()[0] >= 2  # at least the two GT copies
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scripted_model_equals_eager(arch):
    torch.manual_seed(1)
    model = build_detector(arch, 3, backbone="small", min_size=64, max_size=64,
                           sampler=SamplerConfig(batch_size_per_image=64))
    images, targets = _batch(arch)
    model(images, targets)  # one training step's forward: BatchNorm statistics move off their init
    model.eval()
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        expected = model(images)
        for module in (scripted, loaded):
            losses, got = module(images)
            assert losses == {}
            assert len(got) == len(expected)
            for e, g in zip(expected, got):
                assert e.keys() == g.keys()
                assert e["boxes"].shape[0] > 0
                for k in e:
                    torch.testing.assert_close(g[k], e[k], rtol=1e-5, atol=1e-5)


def test_scripted_model_trains_with_the_sampler():
    torch.manual_seed(2)
    model = build_detector("fasterrcnn", 3, backbone="small", min_size=64, max_size=64,
                           sampler=SamplerConfig(batch_size_per_image=64))
    scripted = torch.jit.script(model)
    images, targets = _batch("fasterrcnn")
    losses, _ = scripted(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert scripted.roi_heads.last_num_pos.shape == (2,)


# ---------------------------------------------------------------- weights files

@pytest.fixture(scope="module")
def small_state():
    torch.manual_seed(3)
    return build_detector("fasterrcnn", 3, backbone="small").state_dict()


def _assert_loaded(model, state):
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_weights_from_a_state_dict(tmp_path, small_state):
    path = tmp_path / "model.pth"
    torch.save(small_state, path)
    torch.manual_seed(4)
    _assert_loaded(build_detector("fasterrcnn", 3, backbone="small", weights=str(path)), small_state)


def test_weights_from_a_checkpoint_with_a_model_key(tmp_path, small_state):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": small_state, "iteration": 10, "config": {"arch": "fasterrcnn"}}, path)
    _assert_loaded(build_detector("fasterrcnn", 3, backbone="small", weights=str(path)), small_state)


def test_weights_from_a_distributed_state_dict(tmp_path, small_state):
    path = tmp_path / "ddp.pth"
    torch.save({"module." + k: v for k, v in small_state.items()}, path)
    _assert_loaded(build_detector("fasterrcnn", 3, backbone="small", weights=str(path)), small_state)


def test_weights_of_another_architecture_list_the_keys(tmp_path, small_state):
    path = tmp_path / "faster.pth"
    torch.save(small_state, path)
    with pytest.raises(ValueError, match=r"faster\.pth.*missing \(roi_heads\.mask_head"):
        build_detector("maskrcnn", 3, backbone="small", weights=str(path))
    with pytest.raises(ValueError, match=r"unexpected \(backbone\.body\.stem"):
        build_detector("fasterrcnn", 3, backbone="resnet18_fpn", weights=str(path))


def test_weights_of_another_class_count_fine_tune_the_predictor(tmp_path, small_state):
    path = tmp_path / "three.pth"
    torch.save(small_state, path)
    torch.manual_seed(5)
    fresh = build_detector("fasterrcnn", 5, backbone="small").state_dict()
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match=r"three\.pth' was trained for another number of classes: "
                                         r"roi_heads\.box_predictor\.cls_score\.weight, .* keep their initial values"):
        model = build_detector("fasterrcnn", 5, backbone="small", weights=str(path))
    loaded = model.state_dict()
    heads = [k for k in loaded if k.startswith("roi_heads.box_predictor.")]
    assert len(heads) == 4
    assert all(torch.equal(loaded[k], fresh[k]) for k in heads)  # initial values, same seed
    assert all(torch.equal(loaded[k], small_state[k]) for k in loaded if k not in heads)


def test_weights_with_other_shapes_outside_the_predictor_are_an_error(tmp_path, small_state):
    state = dict(small_state)
    state["roi_heads.box_head.fc7.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"shape mismatches \(roi_heads\.box_head\.fc7\.weight: "
                                         r"file \[3, 3\] vs model \[256, 256\]"):
        build_detector("fasterrcnn", 3, backbone="small", weights=str(tmp_path / "odd.pth"))


def test_torchvision_pretrained_layout_loads_torchvisions_detector_weights(tmp_path):
    """A file like fasterrcnn_resnet50_fpn_coco-258fb6c6.pth: torchvision's detector with frozen
    BatchNorm (no num_batches_tracked), 91 classes; fine-tuned here to 4."""
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(6)
    coco = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    coco = {k: v for k, v in coco.items() if not k.endswith("num_batches_tracked")}
    torch.save(coco, tmp_path / "coco.pth")
    with pytest.warns(UserWarning, match="another number of classes"):
        model = build_detector("fasterrcnn", 4, backbone="resnet50_fpn", weights=str(tmp_path / "coco.pth"))
    # torchvision's rule with pretrained weights: frozen BatchNorm, conv1 and layer1 frozen.
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and not any(isinstance(m, torch.nn.BatchNorm2d)
                                                               for m in model.modules())
    trainable = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], coco[k]) for k in loaded if not k.startswith("roi_heads.box_predictor."))
    assert set(loaded) == set(coco)


def test_imagenet_backbone_weights_fill_the_trunk(tmp_path):
    torch.manual_seed(7)
    imagenet = torchvision.models.resnet18(weights=None).state_dict()  # with fc.* and num_batches_tracked
    torch.save(imagenet, tmp_path / "resnet18.pth")
    model = build_detector("maskrcnn", 3, backbone="resnet18_fpn", backbone_weights=str(tmp_path / "resnet18.pth"),
                           trainable_backbone_layers=2)
    body = model.backbone.body.state_dict()
    assert set(body) == {k for k in imagenet if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert all(torch.equal(body[k], imagenet[k]) for k in body)
    trainable = {name.split(".")[0] for name, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(ValueError, match=r"resnet50\.pth' does not match the model \(an ImageNet ResNet of another "
                                         r"depth\?\): .*unexpected \(layer1\.0\.conv3\.weight"):
        build_detector("fasterrcnn", 3, backbone="resnet18_fpn", backbone_weights=str(tmp_path / "resnet50.pth"))
    with pytest.raises(ValueError, match="backbone_weights is a ResNet setting; the 'small' backbone has none"):
        build_detector("fasterrcnn", 3, backbone="small", backbone_weights=str(tmp_path / "resnet18.pth"))
    with pytest.raises(ValueError, match="trainable_backbone_layers must be an integer in 0..5, got 6"):
        build_detector("fasterrcnn", 3, backbone="resnet18_fpn", trainable_backbone_layers=6)
    with pytest.raises(FileNotFoundError, match="backbone weights file .*nope.pth"):
        build_detector("fasterrcnn", 3, backbone="resnet18_fpn", backbone_weights=str(tmp_path / "nope.pth"))


def test_weights_paths_expand_the_home_folder(tmp_path, small_state, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(small_state, tmp_path / "model.pth")
    _assert_loaded(build_detector("fasterrcnn", 3, backbone="small", weights="~/model.pth"), small_state)


def test_random_init_keeps_trainable_batchnorm_everywhere():
    model = build_detector("fasterrcnn", 3, backbone="resnet18_fpn")
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in model.parameters())


def test_unreadable_or_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_detector("fasterrcnn", 3, backbone="small", weights=str(tmp_path / "nowhere.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read weights file .*garbage.pth"):
        build_detector("fasterrcnn", 3, backbone="small", weights=str(garbage))
    not_a_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state)
    with pytest.raises(ValueError, match="holds no state dict"):
        load_weights(build_detector("fasterrcnn", 3, backbone="small"), str(not_a_state))
