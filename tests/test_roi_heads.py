"""OverlapRoIHeads: one sampler call per batch, per-image invariants of the gathered
training samples, torchvision equivalence of the "random" path, edge cases."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torchvision
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import box_iou

import overlap_sampler
from overlap_sampler.detection import OverlapRoIHeads, build_detector, install_sampler
from overlap_sampler.detection.roi_heads import training_sample_settings
from overlap_sampler.sampling import SamplerConfig
from overlap_sampler.testing import make_batch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _head(config: SamplerConfig) -> OverlapRoIHeads:
    # Sampling does not touch the box head: no modules needed.
    return OverlapRoIHeads(None, None, None, None, 0.05, 0.5, 100, config).train()


def _inputs(proposal_counts, gt_counts, seed=0, num_classes=4):
    """Per-image proposal lists and targets: RPN-like proposals around random GT."""
    proposals, ps, gt, gs = make_batch(proposal_counts, gt_counts, seed=seed, canvas=300.0)
    g = torch.Generator().manual_seed(seed)
    props = [proposals[ps[b]:ps[b + 1]] for b in range(len(proposal_counts))]
    targets = [{"boxes": gt[gs[b]:gs[b + 1]],
                "labels": torch.randint(1, num_classes, (gt_counts[b],), generator=g)}
               for b in range(len(gt_counts))]
    return props, targets


class _CountingSample:
    def __init__(self, op):
        self.op = op
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.op(*args, **kwargs)


@pytest.fixture
def counting_sample(monkeypatch):
    shim = _CountingSample(torch.ops.overlap_sampler.sample)
    monkeypatch.setattr(torch.ops.overlap_sampler, "sample", shim)
    return shim


def test_one_sampler_call_per_batch(counting_sample):
    head = _head(SamplerConfig(batch_size_per_image=64))
    props, targets = _inputs([200, 150, 90, 10], [4, 1, 0, 2])
    head.select_training_samples(props, targets)
    assert counting_sample.calls == 1
    head.select_training_samples(props, targets)
    assert counting_sample.calls == 2


def test_random_sampler_does_not_call_the_op(counting_sample):
    head = _head(SamplerConfig.preset("random"))
    props, targets = _inputs([200, 150], [4, 1])
    head.select_training_samples(props, targets)
    assert counting_sample.calls == 0


@pytest.mark.parametrize("config", [
    SamplerConfig(batch_size_per_image=64),
    SamplerConfig(batch_size_per_image=32, positive_fraction=0.5, neg_strategy="hard", pos_strategy="linear",
                  pos_weight=3.0),
    SamplerConfig(batch_size_per_image=128, neg_strategy="iou_balanced", pos_strategy="uniform", pos_weight=1.0,
                  fg_iou_thresh=0.6, bg_iou_thresh=0.4),
], ids=["soft", "hard-linear", "iou_balanced"])
def test_samples_satisfy_the_per_image_invariants(config):
    head = _head(config)
    props, targets = _inputs([300, 120, 60, 5], [5, 2, 0, 1], seed=4)
    torch.manual_seed(0)
    boxes, matched, labels, reg, weights = head.select_weighted_training_samples(props, targets)
    quota = round(config.batch_size_per_image * config.positive_fraction)
    assert len(boxes) == len(props)
    for b in range(len(props)):
        gt = targets[b]["boxes"]
        gt_labels = targets[b]["labels"]
        examples = torch.cat([props[b], gt])
        n = boxes[b].shape[0]
        assert matched[b].shape == labels[b].shape == weights[b].shape == (n,)
        assert reg[b].shape == (n, 4)
        assert n <= config.batch_size_per_image
        pos = labels[b] > 0
        num_pos = int(pos.sum())
        assert num_pos <= quota
        # positives first, then negatives (the op's order)
        assert pos[:num_pos].all() and not pos[num_pos:].any()
        assert head.last_num_pos[b].item() == num_pos
        assert head.last_num_neg[b].item() == n - num_pos
        # every sampled box is one of the image's examples, each at most once
        same = (boxes[b][:, None, :] == examples[None, :, :]).all(-1)
        assert same.any(1).all()
        assert torch.unique(same.float().argmax(1)).numel() == n
        if gt.shape[0] == 0:
            assert num_pos == 0 and (matched[b] == 0).all() and (weights[b] == 1).all()
            continue
        iou = box_iou(boxes[b], gt)
        assert (iou[~pos].max(1).values < config.bg_iou_thresh).all()
        m = matched[b][pos]
        assert ((m >= 0) & (m < gt.shape[0])).all()
        assert torch.equal(labels[b][pos], gt_labels[m])
        assert (iou[pos, m] >= config.fg_iou_thresh - 1e-6).all()
        assert (iou[pos, m] >= iou[pos].max(1).values - 1e-6).all()   # matched = best GT
        # the regression targets decode back to the matched GT boxes
        decoded = head.box_coder.decode_single(reg[b][pos], boxes[b][pos])
        torch.testing.assert_close(decoded, gt[m], rtol=1e-4, atol=1e-3)
        assert (reg[b][~pos] == 0).all()
        # ε: for each GT, exactly the best sampled proposal (GT copy excluded) matched to it
        is_copy = same[:, props[b].shape[0]:].any(1)
        expected_w = torch.ones(n)
        for j in range(gt.shape[0]):
            cand = torch.where(pos & ~is_copy & (matched[b] == j))[0]
            if cand.numel():
                best = cand[iou[cand, j].argmax()]
                expected_w[best] = config.pos_weight
        torch.testing.assert_close(weights[b], expected_w)


def test_gather_equals_the_ops_indices():
    config = SamplerConfig(batch_size_per_image=48)
    head = _head(config)
    props, targets = _inputs([100, 40, 70], [3, 0, 2], seed=7)
    torch.manual_seed(3)
    boxes, matched, labels, reg, weights = head.select_weighted_training_samples(props, targets)
    torch.manual_seed(3)
    all_gt = torch.cat([t["boxes"] for t in targets])
    res = overlap_sampler.sample(
        torch.cat(props), overlap_sampler.splits_from_counts([p.shape[0] for p in props]),
        all_gt, overlap_sampler.splits_from_counts([t["boxes"].shape[0] for t in targets]),
        batch_size_per_image=48, neg_strategy="soft", pos_strategy="soft", pos_weight=2.0)
    examples = torch.cat([torch.cat(props), all_gt])
    for b in range(len(props)):
        idx = res.indices[b][res.indices[b] >= 0]
        assert torch.equal(boxes[b], examples[idx])
        torch.testing.assert_close(weights[b], res.weights[b][: idx.numel()])


NON_DEFAULT_CONFIGS = {  # each setting the op would otherwise take at its own default
    "pos_key": SamplerConfig(batch_size_per_image=48, pos_key="all"),
    "hard_thresh": SamplerConfig(batch_size_per_image=48, neg_strategy="hard", hard_thresh=0.2),
    "num_bins": SamplerConfig(batch_size_per_image=48, num_bins=4),
    "bin_upper": SamplerConfig(batch_size_per_image=48, bin_upper=0.6),
}


# The op's arguments that are sampler settings (SamplerConfig fields of the same name).
OP_SETTINGS = sorted({a.name for a in torch.ops.overlap_sampler.sample.default._schema.arguments}
                     & {f.name for f in dataclasses.fields(SamplerConfig)})


@pytest.mark.parametrize("name", list(NON_DEFAULT_CONFIGS))
def test_every_sampler_setting_reaches_the_op(name, monkeypatch):
    config = NON_DEFAULT_CONFIGS[name]
    seen = {}
    op = torch.ops.overlap_sampler.sample

    def recording_sample(*args, **kwargs):
        seen.update(kwargs)
        return op(*args, **kwargs)

    monkeypatch.setattr(torch.ops.overlap_sampler, "sample", recording_sample)
    props, targets = _inputs([200, 80], [4, 2], seed=7)
    _head(config).select_weighted_training_samples(props, targets)
    for name in OP_SETTINGS:
        assert seen[name] == getattr(config, name), name

    # And the head's samples are the op's for those settings (same generator state).
    head = _head(config)
    head.generator = torch.Generator().manual_seed(3)
    props, targets = _inputs([300, 150], [6, 3], seed=7)
    boxes = head.select_weighted_training_samples(props, targets)[0]
    all_gt = torch.cat([t["boxes"] for t in targets])
    settings = {name: getattr(config, name) for name in OP_SETTINGS}
    res = op(torch.cat(props), overlap_sampler.splits_from_counts([len(p) for p in props]), all_gt,
             overlap_sampler.splits_from_counts([len(t["boxes"]) for t in targets]),
             generator=torch.Generator().manual_seed(3), **settings)
    examples = torch.cat([torch.cat(props), all_gt])
    for b in range(len(props)):
        assert torch.equal(boxes[b], examples[res[0][b][res[0][b] >= 0]])


def test_from_roi_heads_keeps_validate_inputs_and_generator():
    head = _head(SamplerConfig())
    generator = torch.Generator()
    head.validate_inputs, head.generator = False, generator
    new = OverlapRoIHeads.from_roi_heads(head, SamplerConfig(num_bins=3))
    assert new.validate_inputs is False and new.generator is generator


def test_global_seed_and_generator_make_sampling_reproducible():
    head = _head(SamplerConfig(batch_size_per_image=32))
    props, targets = _inputs([300, 200], [6, 3], seed=2)
    torch.manual_seed(5)
    a = head.select_training_samples(props, targets)[0]
    torch.manual_seed(5)
    b = head.select_training_samples(props, targets)[0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))

    head.generator = torch.Generator().manual_seed(9)
    torch.manual_seed(1)
    c = head.select_training_samples(props, targets)[0]
    head.generator = torch.Generator().manual_seed(9)
    torch.manual_seed(2)
    d = head.select_training_samples(props, targets)[0]
    assert all(torch.equal(x, y) for x, y in zip(c, d))


def test_random_path_equals_torchvision():
    plain = RoIHeads(None, None, None, 0.5, 0.5, 64, 0.25, None, 0.05, 0.5, 100).train()
    ours = OverlapRoIHeads.from_roi_heads(plain, SamplerConfig(sampler="random", batch_size_per_image=64))
    props, targets = _inputs([300, 80, 20], [5, 0, 2], seed=11)
    torch.manual_seed(21)
    expected = plain.select_training_samples([p.clone() for p in props], targets)
    torch.manual_seed(21)
    got = ours.select_training_samples([p.clone() for p in props], targets)
    for e_list, g_list in zip(expected, got):
        for e, g in zip(e_list, g_list):
            assert torch.equal(e, g)
    assert ours.last_num_pos.tolist() == [int((lab > 0).sum()) for lab in expected[2]]
    assert ours.last_num_neg.tolist() == [int((lab == 0).sum()) for lab in expected[2]]


def _tiny_batch(arch: str, gt_counts, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in gt_counts]
    targets = []
    for n in gt_counts:
        xy = torch.rand(n, 2, generator=g) * size * 0.6
        wh = torch.rand(n, 2, generator=g) * size * 0.3 + 6
        boxes = torch.cat([xy, xy + wh], 1)
        t = {"boxes": boxes, "labels": torch.randint(1, 3, (n,), generator=g)}
        if arch == "maskrcnn":
            masks = torch.zeros(n, size, size, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
                masks[k, y1:y2, x1:x2] = 1
            t["masks"] = masks
        targets.append(t)
    return images, targets


def test_random_sampler_model_losses_equal_torchvision_model():
    torch.manual_seed(0)
    model = build_detector("fasterrcnn", 3, backbone="small", min_size=64, max_size=64,
                           sampler=SamplerConfig(sampler="random", batch_size_per_image=64))
    reference = copy.deepcopy(model)
    h = reference.roi_heads
    reference.roi_heads = RoIHeads(h.box_roi_pool, h.box_head, h.box_predictor, 0.5, 0.5, 64, 0.25, None,
                                   h.score_thresh, h.nms_thresh, h.detections_per_img)
    images, targets = _tiny_batch("fasterrcnn", [3, 1])
    torch.manual_seed(4)
    expected = reference(images, targets)
    torch.manual_seed(4)
    got = model(images, targets)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


_EDGE_CASES = [(arch, case, "overlap") for arch in ("fasterrcnn", "maskrcnn")
               for case in ("no_gt_in_one_image", "no_gt_anywhere", "one_proposal", "tiny_gt")]
# torchvision's own path: only its fg/bg counting is ours
_EDGE_CASES += [("maskrcnn", "no_gt_anywhere", "random"), ("fasterrcnn", "one_proposal", "random")]


@pytest.mark.parametrize("arch,case,sampler", _EDGE_CASES)
def test_edge_cases_train_with_finite_losses(arch, case, sampler):
    kwargs = {"rpn_post_nms_top_n_train": 1, "rpn_pre_nms_top_n_train": 1} if case == "one_proposal" else {}
    torch.manual_seed(0)
    model = build_detector(arch, 3, backbone="small", min_size=64, max_size=64,
                           sampler=SamplerConfig(sampler=sampler, batch_size_per_image=32), **kwargs)
    gt_counts = {"no_gt_in_one_image": [2, 0], "no_gt_anywhere": [0, 0], "one_proposal": [1, 2],
                 "tiny_gt": [1, 1]}[case]
    images, targets = _tiny_batch(arch, gt_counts, seed=3)
    if case == "tiny_gt":
        # a 1.5 px box: no proposal overlaps it, its appended copy is the only positive
        for t in targets:
            t["boxes"] = torch.tensor([[30.0, 30.0, 31.5, 31.5]])
            if arch == "maskrcnn":
                t["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
                t["masks"][0, 30:32, 30:32] = 1
    losses = model(images, targets)
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total.backward()
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    rh = model.roi_heads
    assert rh.last_num_pos.dtype == torch.int64 and rh.last_num_pos.shape == (2,)
    assert rh.last_num_neg.shape == (2,)
    for b, n in enumerate(gt_counts):
        if n == 0:
            assert rh.last_num_pos[b] == 0 and rh.last_num_neg[b] > 0
        else:
            assert rh.last_num_pos[b] >= 1  # at least the GT copies
    if case == "one_proposal":
        for b, n in enumerate(gt_counts):
            assert rh.last_num_pos[b] + rh.last_num_neg[b] <= 1 + n


def test_install_sampler_keeps_modules_weights_and_eval_outputs():
    torch.manual_seed(0)
    model = build_detector("maskrcnn", 3, backbone="small", min_size=64, max_size=64)
    # back to a plain torchvision head, then install again
    h = model.roi_heads
    plain = RoIHeads(h.box_roi_pool, h.box_head, h.box_predictor, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0),
                     0.01, 0.45, 37, h.mask_roi_pool, h.mask_head, h.mask_predictor)
    plain.box_coder.bbox_xform_clip = 3.0
    model.roi_heads = plain
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, _ = _tiny_batch("maskrcnn", [1, 1])
    with torch.no_grad():
        expected = model(images)
    config = SamplerConfig(num_bins=3, batch_size_per_image=100, fg_iou_thresh=0.6, bg_iou_thresh=0.4)
    with pytest.warns(UserWarning, match=r"batch_size_per_image 512 -> 100, fg_iou_thresh 0.5 -> 0.6, "
                                         r"bg_iou_thresh 0.5 -> 0.4"):
        assert install_sampler(model, config) is model
    rh = model.roi_heads
    assert isinstance(rh, OverlapRoIHeads) and not rh.training
    for name in ("box_roi_pool", "box_head", "box_predictor", "mask_roi_pool", "mask_head", "mask_predictor"):
        assert getattr(rh, name) is getattr(plain, name)
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img) == (0.01, 0.45, 37)
    assert rh.box_coder.weights == (10.0, 10.0, 5.0, 5.0) and rh.box_coder.bbox_xform_clip == 3.0
    assert rh.sampler_config() == config
    assert rh.fg_bg_sampler.batch_size_per_image == 100
    assert (rh.proposal_matcher.high_threshold, rh.proposal_matcher.low_threshold) == (0.6, 0.4)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        got = model(images)
    for e, g in zip(expected, got):
        assert e.keys() == g.keys()
        for k in e:
            assert torch.equal(e[k], g[k]), k
    # installing again only changes the settings
    random = dataclasses.replace(SamplerConfig.preset("random"), batch_size_per_image=100, fg_iou_thresh=0.6,
                                 bg_iou_thresh=0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        install_sampler(model, random)
    assert model.roi_heads.sampler == "random" and model.roi_heads.box_head is plain.box_head


def test_install_sampler_keeps_the_models_training_sample_settings():
    kwargs = dict(box_batch_size_per_image=256, box_positive_fraction=0.5, box_fg_iou_thresh=0.6,
                  box_bg_iou_thresh=0.4)
    own = dict(batch_size_per_image=256, positive_fraction=0.5, fg_iou_thresh=0.6, bg_iou_thresh=0.4)

    def torchvision_model():
        return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=3, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rh = install_sampler(torchvision_model()).roi_heads
    assert rh.sampler_config() == dataclasses.replace(SamplerConfig.preset("overlap"), **own)
    assert rh.fg_bg_sampler.batch_size_per_image == 256 and rh.proposal_matcher.low_threshold == 0.4
    # A config is installed as given, with a warning naming what it replaces.
    with pytest.warns(UserWarning, match=r"batch_size_per_image 256 -> 512, positive_fraction 0.5 -> 0.25, "
                                         r"fg_iou_thresh 0.6 -> 0.5, bg_iou_thresh 0.4 -> 0.5"):
        rh = install_sampler(torchvision_model(), SamplerConfig.preset("overlap")).roi_heads
    assert rh.batch_size_per_image == 512 and rh.fg_bg_sampler.batch_size_per_image == 512
    # build_detector passes the config's values to torchvision: nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_detector("fasterrcnn", 2, backbone="small", sampler=SamplerConfig(batch_size_per_image=64))


def test_install_sampler_rejects_a_model_without_roi_heads():
    with pytest.raises(TypeError, match="roi_heads"):
        install_sampler(torch.nn.Linear(2, 2), SamplerConfig())
    model = build_detector("fasterrcnn", 2, backbone="small")
    invalid = SamplerConfig()
    invalid.num_bins = 0  # changed after construction, which validates
    with pytest.raises(ValueError, match="num_bins"):
        install_sampler(model, invalid)


def test_install_sampler_on_custom_and_overlap_heads():
    class WrappedSampler:  # a user's fg_bg_sampler without torchvision's attributes
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, labels):
            return self.inner(labels)

    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, box_fg_iou_thresh=0.6)
    model.roi_heads.fg_bg_sampler = WrappedSampler(model.roi_heads.fg_bg_sampler)
    assert training_sample_settings(model.roi_heads) == {"fg_iou_thresh": 0.6, "bg_iou_thresh": 0.5}
    with pytest.warns(UserWarning, match=r"fg_bg_sampler \(WrappedSampler\) is replaced") as caught:
        rh = install_sampler(model).roi_heads  # the matcher's 0.6 is kept, the rest are the defaults
    assert len(caught) == 1
    assert (rh.fg_iou_thresh, rh.batch_size_per_image) == (0.6, 512)
    # Installing again with config=None keeps an OverlapRoIHeads' whole config, edits included.
    install_sampler(model, dataclasses.replace(SamplerConfig.preset("random"), fg_iou_thresh=0.6))
    model.roi_heads.batch_size_per_image = 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rh = install_sampler(model).roi_heads
    assert rh.sampler == "random" and rh.batch_size_per_image == 64 and rh.fg_bg_sampler.batch_size_per_image == 64
    # Printing works even after an invalid edit.
    rh.num_bins = 0
    assert "num_bins=0" in repr(rh)


def _mobilenet(**kwargs):
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, **kwargs)


def test_install_sampler_names_what_the_new_head_cannot_keep():
    class FiveDetections(RoIHeads):  # a user's head: its own post-processing
        def postprocess_detections(self, *args):
            boxes, scores, labels = super().postprocess_detections(*args)
            return [b[:5] for b in boxes], [s[:5] for s in scores], [lab[:5] for lab in labels]

        def helper(self):
            return 1

    model = _mobilenet()
    h = model.roi_heads
    model.roi_heads = FiveDetections(h.box_roi_pool, h.box_head, h.box_predictor, 0.5, 0.5, 512, 0.25, None,
                                     h.score_thresh, h.nms_thresh, h.detections_per_img)
    with pytest.warns(UserWarning, match="FiveDetections defines helper, postprocess_detections, which the new "
                                         "OverlapRoIHeads does not have") as caught:
        install_sampler(model)
    assert len(caught) == 1

    model = _mobilenet()
    model.roi_heads.proposal_matcher.allow_low_quality_matches = True
    with pytest.warns(UserWarning, match="allows low-quality matches"):
        install_sampler(model)
    assert not model.roi_heads.proposal_matcher.allow_low_quality_matches


def test_install_sampler_keeps_hooks_on_the_head():
    model = _mobilenet(min_size=64, max_size=64).eval()
    calls = []
    handle = model.roi_heads.register_forward_hook(lambda module, args, output: calls.append(type(module)))
    pre = model.roi_heads.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    install_sampler(model)
    with torch.no_grad():
        model([torch.rand(3, 64, 64)])
    assert calls == ["pre", OverlapRoIHeads]
    handle.remove()
    pre.remove()
    with torch.no_grad():
        model([torch.rand(3, 64, 64)])
    assert len(calls) == 2  # the handles taken before the swap still remove the hooks


def test_state_dict_hooks_are_not_carried_but_named():
    model = _mobilenet()
    model.roi_heads.register_load_state_dict_pre_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="state-dict hooks on the old head are not carried over"):
        install_sampler(model)
    model.load_state_dict(model.state_dict())  # no hook of a dead module is called


def test_a_random_config_with_method_settings_is_refused():
    # torchvision's sampler would silently ignore them.
    with pytest.raises(ValueError, match=r"sampler='random' does not read num_bins=5, pos_weight=3.0:"):
        SamplerConfig(sampler="random", num_bins=5, pos_weight=3.0)
    config = SamplerConfig(sampler="random")
    config.num_bins = 5  # changed after construction: install_sampler validates again
    with pytest.raises(ValueError, match=r"does not read num_bins=5"):
        install_sampler(_mobilenet(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults a plain SamplerConfig(sampler="random") holds
        install_sampler(_mobilenet(), SamplerConfig(sampler="random"))


def test_install_sampler_arguments():
    model = install_sampler(_mobilenet(box_batch_size_per_image=64), "random")
    assert model.roi_heads.sampler_config() == dataclasses.replace(SamplerConfig.preset("random"),
                                                                   batch_size_per_image=64)
    with pytest.raises(ValueError, match="unknown SamplerConfig preset 'fast'"):
        install_sampler(_mobilenet(), "fast")
    with pytest.raises(TypeError, match=r"config must be a SamplerConfig, a preset name or None, got dict "
                                        r"\(SamplerConfig.from_dict"):
        install_sampler(_mobilenet(), {"num_bins": 3})
    with pytest.raises(TypeError, match="DataParallel wraps the detector: install into its .module"):
        install_sampler(torch.nn.DataParallel(_mobilenet()))


def test_random_heads_report_the_method_that_runs():
    """torchvision's sampler has no strategies or ε: a random head stores the preset's values
    (uniform, ε = 1), not the defaults a plain SamplerConfig(sampler="random") holds."""
    plain = RoIHeads(None, None, None, 0.6, 0.4, 64, 0.5, None, 0.05, 0.5, 100)
    given = SamplerConfig(sampler="random", batch_size_per_image=64, positive_fraction=0.5, fg_iou_thresh=0.6, bg_iou_thresh=0.4)
    head = OverlapRoIHeads.from_roi_heads(plain, given)
    assert head.sampler_config() == dataclasses.replace(SamplerConfig.preset("random"), batch_size_per_image=64,
                                                        positive_fraction=0.5, fg_iou_thresh=0.6,
                                                        bg_iou_thresh=0.4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_weights_stay_float32_with_16_bit_proposals(dtype):
    """Under autocast the proposals are 16-bit; ε = 1.1 must reach the loss unrounded."""
    head = _head(SamplerConfig(pos_weight=1.1, batch_size_per_image=64))
    props, targets = _inputs([200, 150], [4, 3], seed=5)
    weights = head.select_weighted_training_samples([p.to(dtype) for p in props], targets)[4]
    for w in weights:
        assert w.dtype == torch.float32
    values = set(torch.cat(weights).tolist())
    assert values == {1.0, torch.tensor(1.1, dtype=torch.float32).item()}


def test_mismatched_labels_are_rejected():
    head = _head(SamplerConfig(batch_size_per_image=16))
    props, targets = _inputs([50], [3])
    targets[0]["labels"] = targets[0]["labels"][:2]
    with pytest.raises(ValueError, match="labels"):
        head.select_training_samples(props, targets)
