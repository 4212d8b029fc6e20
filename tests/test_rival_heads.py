"""The rival samplers (libra, ohem, isr) inside the RoI head and the training engine: every batch shape
trains with finite losses, the sampler's weights reach the one weighted loss, PISA's positive weights
touch the classification only, and runs train, resume exactly, evaluate and export from the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from overlap_sampler.cli import main as cli_main
from overlap_sampler.detection import build_detector
from overlap_sampler.engine import load_checkpoint, train
from overlap_sampler.sampling import SamplerConfig
from overlap_sampler.sampling import rivals

from test_roi_heads import _tiny_batch
from test_train import AP_KEYS, assert_same_training_state, run_torchrun, tiny_config, tiny_data, cli_args, \
    tiny_settings  # noqa: F401  (tiny_data is a fixture)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

RIVALS = {
    "libra": SamplerConfig.preset("libra"),
    "ohem": SamplerConfig.preset("ohem"),
    "ohem_mmdet": SamplerConfig(sampler="ohem", ohem_variant="mmdet"),
    "isr": SamplerConfig.preset("isr"),
    "isr_carl": SamplerConfig(sampler="isr", carl=True),
}


def _model(config: SamplerConfig, arch="fasterrcnn", **kwargs):
    torch.manual_seed(0)
    import dataclasses
    return build_detector(arch, 3, backbone="small", min_size=64, max_size=64,
                          sampler=dataclasses.replace(config, batch_size_per_image=32), **kwargs).train()


@pytest.mark.parametrize("name", list(RIVALS))
@pytest.mark.parametrize("arch,gt_counts", [("fasterrcnn", [2, 0]), ("fasterrcnn", [0, 0]),
                                            ("maskrcnn", [1, 3])])
def test_rivals_train_on_every_batch_shape(name, arch, gt_counts):
    model = _model(RIVALS[name], arch)
    images, targets = _tiny_batch(arch, gt_counts, seed=3)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert ("loss_carl" in losses) == (name == "isr_carl")
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    rh = model.roi_heads
    assert rh.last_num_pos.shape == (2,) and rh.last_num_neg.shape == (2,)
    for b, n in enumerate(gt_counts):
        if n == 0:
            assert rh.last_num_pos[b] == 0
        else:
            assert rh.last_num_pos[b] >= 1  # at least a GT copy survives every rival's choice
    if name != "ohem":  # the paper's OHEM shares one budget over the batch
        assert torch.all(rh.last_num_pos + rh.last_num_neg <= 32)
        assert torch.all(rh.last_num_pos <= 8)
    else:
        assert int((rh.last_num_pos + rh.last_num_neg).sum()) <= 64


def test_the_samplers_weights_reach_the_one_weighted_loss(monkeypatch):
    # Whatever a sampler returns as weights is what the classification and box losses weigh.
    model = _model(RIVALS["libra"])
    images, targets = _tiny_batch("fasterrcnn", [2, 1], seed=1)
    real = rivals.select_rival
    captured = {}

    def weighted(config, batch, scorer, box_coder, generator):
        out = real(config, batch, scorer, box_coder, generator)
        w = torch.rand(out.weights.shape, generator=torch.Generator().manual_seed(0)) * 3
        w = torch.where(out.indices >= 0, w, torch.zeros_like(w))
        captured["weights"] = w
        return out._replace(weights=w)

    monkeypatch.setattr("overlap_sampler.detection.roi_heads.select_rival", weighted)
    rh = model.roi_heads
    outputs = {}
    hook = rh.box_predictor.register_forward_hook(lambda m, i, o: outputs.setdefault("out", o))
    samples = {}
    original = rh.select_weighted_training_samples

    def keep(*args):
        result = original(*args)
        samples["labels"], samples["targets"], samples["weights"] = result[2], result[3], result[4]
        return result

    monkeypatch.setattr(rh, "select_weighted_training_samples", keep)
    torch.manual_seed(5)
    losses = model(images, targets)
    hook.remove()
    logits, deltas = outputs["out"]
    labels = torch.cat(samples["labels"])
    weights = torch.cat(samples["weights"])
    counts = [int(n) for n in (rh.last_num_pos + rh.last_num_neg)]
    expected_w = torch.cat([captured["weights"][b, :counts[b]] for b in range(2)])
    assert torch.equal(weights, expected_w)
    ce = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(losses["loss_classifier"], (weights * ce).sum() / labels.numel())
    pos = torch.where(labels > 0)[0]
    box = F.smooth_l1_loss(deltas.reshape(deltas.shape[0], -1, 4)[pos, labels[pos]],
                           torch.cat(samples["targets"])[pos], beta=1 / 9, reduction="none").sum(1)
    torch.testing.assert_close(losses["loss_box_reg"], (weights[pos] * box).sum() / labels.numel())


def test_isr_weighs_the_positives_classification_only(monkeypatch):
    # ISR-P's weights multiply the positives' classification loss; their box loss keeps weight 1.
    def run(value):
        monkeypatch.setattr(rivals, "isr_p_weights", lambda *a, **k: torch.full((a[0].shape[0],), value))
        model = _model(RIVALS["isr"])
        images, targets = _tiny_batch("fasterrcnn", [2, 2], seed=2)
        outputs = {}
        model.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: outputs.__setitem__("out", o))
        torch.manual_seed(5)
        return model(images, targets), outputs["out"]

    ones, _ = run(1.0)
    threes, (logits, _) = run(3.0)
    torch.testing.assert_close(threes["loss_box_reg"], ones["loss_box_reg"])
    assert threes["loss_classifier"] > ones["loss_classifier"]


@pytest.mark.parametrize("name", ["libra", "ohem", "isr"])
def test_rival_runs_resume_exactly_evaluate_and_export(tiny_data, tmp_path, name, capsys):
    settings = dict(iterations=4, checkpoint_every=1, log_every=2, eval_at_end=True, threads=1,
                    sampler={"sampler": name, "batch_size_per_image": 64})
    full = tiny_config(tiny_data, tmp_path / "full", **settings)
    result = train(full)
    assert set(result["eval"]["bbox"]) == AP_KEYS
    assert all(math.isfinite(h["loss"]) for h in json.loads((tmp_path / "full" / "metrics.json").read_text())[
        "history"])
    state = load_checkpoint(str(tmp_path / "full" / "last_checkpoint.pth"))
    assert state["config"]["sampler"]["sampler"] == name
    parts = dict(settings, eval_at_end=False)
    train(tiny_config(tiny_data, tmp_path / "parts", **parts, stop_after=2))
    train(tiny_config(tiny_data, tmp_path / "parts", **parts, resume="auto"))
    assert_same_training_state(state, load_checkpoint(str(tmp_path / "parts" / "last_checkpoint.pth")))

    checkpoint = str(tmp_path / "full" / "last_checkpoint.pth")
    assert cli_main(["eval", "--checkpoint", checkpoint, "--output-dir", str(tmp_path), "--no-progress"]) == 0
    assert cli_main(["export", "--checkpoint", checkpoint, "--output", str(tmp_path / "model.pt")]) == 0
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    with torch.no_grad():
        _, detections = scripted([torch.rand(3, 64, 64)])
    assert detections[0]["boxes"].shape[1] == 4


def test_scripted_training_with_a_python_sampler_is_a_clear_error():
    model = _model(RIVALS["libra"])
    scripted = torch.jit.script(model)  # scripting works: the Python samplers are eager-only methods
    images, targets = _tiny_batch("fasterrcnn", [1, 1], seed=0)
    with pytest.raises(Exception, match="trains in eager mode only"):
        scripted(images, targets)


def test_ddp_trains_with_a_random_rival(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    settings = tiny_settings(tiny_data, out, iterations=2, log_every=1, checkpoint_every=2, eval_at_end=False,
                             sampler={"sampler": "isr", "batch_size_per_image": 64})
    run_torchrun(["train", *cli_args(settings)])
    state = load_checkpoint(str(out / "last_checkpoint.pth"))
    assert state["iteration"] == 2 and state["world_size"] == 2
    assert state["config"]["sampler"]["sampler"] == "isr"


def test_the_box_head_scores_in_bounded_chunks_in_the_callers_row_order(monkeypatch):
    # The no-grad scoring forward sees at most SCORE_CHUNK RoIs at a time (memory bounded for any
    # number of proposals) and returns each row's scores in the order asked, across images.
    import overlap_sampler.detection.roi_heads as roi_heads
    from overlap_sampler.sampling.examples import match_examples

    model = _model(RIVALS["ohem"]).eval()
    images, targets = _tiny_batch("fasterrcnn", [2, 3], seed=4)
    image_list, _ = model.transform(images)
    features = model.backbone(image_list.tensors)
    proposals = [torch.rand(90, 2) * 40 for _ in range(2)]
    proposals = [torch.cat([p, p + 5 + torch.rand(90, 2) * 20], 1) for p in proposals]
    batch = match_examples(proposals, [t["boxes"] for t in targets], [t["labels"] for t in targets], 0.5, 0.5)
    rows = torch.randperm(batch.boxes.shape[0], generator=torch.Generator().manual_seed(0))
    sizes = []
    model.roi_heads.box_head.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    monkeypatch.setattr(roi_heads, "SCORE_CHUNK", 37)
    logits, deltas = model.roi_heads._box_scorer(batch, features, image_list.image_sizes, torch.float32)(rows)
    assert max(sizes) <= 37 and sum(sizes) == rows.numel()
    with torch.no_grad():  # one image at a time, all of its rows in one call: the plain way
        for b in range(2):
            mine = rows[batch.image[rows] == b]
            single = [batch.boxes[mine] if k == b else batch.boxes[:0] for k in range(2)]
            want_logits, want_deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(
                model.roi_heads.box_roi_pool(features, single, image_list.image_sizes)))
            where = batch.image[rows] == b
            torch.testing.assert_close(logits[where], want_logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(deltas[where], want_deltas, rtol=1e-5, atol=1e-5)
