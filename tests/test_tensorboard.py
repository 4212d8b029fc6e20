"""Watching a run: TensorBoard event files, periodic evaluation, the sampler diagnostics (issue 18).

Event files are read back with TensorBoard's own reader (``EventAccumulator``, which applies the purge
steps a resumed run writes). Runs are the tiny ones of test_train.py.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import warnings

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from overlap_sampler.cli import main as cli_main
from overlap_sampler.detection import OverlapRoIHeads, build_detector
from overlap_sampler.detection.diagnostics import SHARE_PREFIX, sampler_diagnostics, summary_columns
from overlap_sampler.engine import TrainConfig, load_checkpoint, train
from overlap_sampler.engine.monitor import DIAGNOSTICS_CSV, TB_DIR
from overlap_sampler.engine.train import plot_loss_curve
from overlap_sampler.sampling import SamplerConfig
from test_roi_heads import _head, _inputs, counting_sample  # noqa: F401  (a fixture)
from test_train import cli_args, tiny_config, tiny_data, tiny_settings  # noqa: F401  (a fixture)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TRAIN_TAGS = {"train/loss", "train/loss_classifier", "train/loss_box_reg", "train/loss_objectness",
              "train/loss_rpn_box_reg", "train/lr", "train/time_per_iter", "train/time_data_per_iter",
              "train/fg_per_image", "train/bg_per_image"}
SAMPLER_HISTOGRAMS = {"sampler/neg_iou_pn", "sampler/neg_iou_ge", "sampler/pos_iou_gp", "sampler/pos_key",
                      "sampler/neg_bin", "sampler/pos_bin", "sampler/eps_weighted_per_image"}


def read_events(output_dir) -> "EventAccumulator":  # noqa: F821
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(str(output_dir), TB_DIR), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def steps(events, tag: str, kind: str = "Scalars") -> list[int]:
    return [e.step for e in getattr(events, kind)(tag)]


def csv_rows(output_dir) -> list[dict[str, str]]:
    with open(os.path.join(str(output_dir), DIAGNOSTICS_CSV), newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------- diagnostics of one batch
def direct_diagnostics(props, targets, boxes, labels, weights, config: SamplerConfig):
    """Per image: positives and negatives of the sampled RoIs (the head's returned boxes, in order) with
    (IoU_g,e, key, bin, weighted), computed from the boxes alone with torchvision's box_iou in float64."""
    result = []
    for p, t, sampled, lab, w in zip(props, targets, boxes, labels, weights):
        gt = t["boxes"].double()
        examples = torch.cat([p.double(), gt])
        copy = torch.arange(examples.shape[0]) >= p.shape[0]
        iou_ge = box_iou(examples, gt).amax(1) if gt.shape[0] else torch.zeros(examples.shape[0], dtype=torch.float64)
        positive = copy | (iou_ge >= config.fg_iou_thresh)
        negative = ~copy & (iou_ge < config.bg_iou_thresh)

        def max_with(rows, mask):
            if not bool(mask.any()):
                return torch.zeros(rows.shape[0], dtype=torch.float64)
            return box_iou(rows, examples[mask]).amax(1)

        def bins(keys, upper):
            if not upper > 0:
                return np.zeros(len(keys), dtype=np.int64)
            return np.minimum((np.asarray(keys) / upper * config.num_bins).astype(np.int64), config.num_bins - 1)

        # The soft bins span [0, bin_upper or the image's max key of the class].
        neg_upper = config.bin_upper or max_with(examples[negative], positive).numpy().max(initial=0.0)
        pos_upper = config.bin_upper or max_with(examples[positive], negative).numpy().max(initial=0.0)
        sampled = sampled.double()
        is_pos = lab > 0
        iou = box_iou(sampled, gt).amax(1) if gt.shape[0] else torch.zeros(sampled.shape[0], dtype=torch.float64)
        image = {}
        for name, mask, keys_with, upper in (("pos", is_pos, negative, pos_upper), ("neg", ~is_pos, positive,
                                                                                    neg_upper)):
            keys = max_with(sampled[mask], keys_with).numpy()
            image[name] = (iou[mask].numpy(), keys, bins(keys, upper), (w[mask] != 1).numpy())
        result.append(image)
    return result


@pytest.mark.parametrize("config", [
    SamplerConfig(batch_size_per_image=64),
    SamplerConfig.preset("random"),
    SamplerConfig.preset("iou_balanced"),
    SamplerConfig(neg_strategy="hard", pos_strategy="uniform", num_bins=3, bin_upper=0.7, pos_weight=3.0),
], ids=["overlap", "random", "iou_balanced", "hard_K3_upper0.7"])
def test_diagnostics_equal_a_direct_computation(config, counting_sample):
    config = dataclasses.replace(config, batch_size_per_image=64)
    head = _head(config)
    props, targets = _inputs([300, 120, 40, 5], [6, 2, 0, 1], seed=3, num_classes=4)
    head.record_samples = True
    torch.manual_seed(0)
    boxes, _, labels, _, weights = head.select_weighted_training_samples([p.clone() for p in props], targets)
    got = sampler_diagnostics(head.last_samples, head.sampler_config())
    # The sampler ran once (the op, or torchvision's for "random"); the diagnostics did not call it.
    assert counting_sample.calls == (0 if config.sampler == "random" else 1)

    expected = direct_diagnostics(props, targets, boxes, labels, weights, config)
    assert got.num_images == 4 and got.num_bins == config.num_bins
    for b, image in enumerate(expected):
        for name, mask in (("pos", got.positive), ("neg", ~got.positive)):
            rows = (got.image == b) & mask
            iou, keys, bins, weighted = image[name]
            assert rows.sum() == len(iou), (b, name)
            np.testing.assert_allclose(got.iou_ge[rows], iou, atol=1e-6)
            np.testing.assert_allclose(got.key[rows], keys, atol=1e-6)
            np.testing.assert_array_equal(got.bin[rows], bins)
            np.testing.assert_array_equal(got.weighted[rows], weighted)
    if config.pos_weight == 1.0:
        assert not got.weighted.any()
    else:  # one ε-weighted positive per GT box that has a sampled non-copy positive
        assert 0 < got.weighted.sum() <= sum(t["boxes"].shape[0] for t in targets)

    summary = got.summary()
    assert list(summary) == summary_columns(config.num_bins)
    assert summary["neg_per_image"] == pytest.approx(sum(len(e["neg"][0]) for e in expected) / 4)
    for k in range(config.num_bins):
        assert summary[f"neg_bin{k}_per_image"] == pytest.approx(
            sum(int((e["neg"][2] == k).sum()) for e in expected) / 4)
    shares = [summary[c] for c in summary if c.startswith(SHARE_PREFIX)]
    assert len(shares) == 10 and sum(shares) == pytest.approx(1.0)
    hist = got.histograms()
    assert hist["neg_iou_pn"].size == int((~got.positive).sum())
    assert hist["eps_weighted_per_image"].tolist() == [float(((got.image == b) & got.weighted).sum())
                                                       for b in range(4)]


def test_the_head_records_only_when_asked_and_still_scripts():
    model = build_detector("fasterrcnn", 3, backbone="small", min_size=64, max_size=64).train()
    head = model.roi_heads
    props, targets = _inputs([50, 20], [2, 1], num_classes=3)
    head.select_weighted_training_samples(props, targets)
    assert head.last_samples is None
    head.record_samples = True
    head.select_weighted_training_samples(props, targets)
    assert head.last_samples is not None and head.last_samples.indices.shape == (2, head.batch_size_per_image)
    assert OverlapRoIHeads.from_roi_heads(head).record_samples
    head.record_samples, head.last_samples = False, None
    scripted = torch.jit.script(model.eval())  # the recording is eager-only
    assert len(scripted([torch.rand(3, 64, 64)])[1]) == 1


# ---------------------------------------------------------------------- runs
def test_event_files_hold_the_scalars_the_periodic_ap_and_the_histograms(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(tiny_data, out, eval_every=2, diagnostics_every=2))
    events = read_events(out)
    tags = events.Tags()
    assert TRAIN_TAGS <= set(tags["scalars"])
    for tag in TRAIN_TAGS:
        assert steps(events, tag) == [2, 4], tag
    assert steps(events, "eval/bbox_AP") == steps(events, "eval/bbox_AP50") == [2, 4]
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([h["loss"] for h in history])
    assert all(h["time_data_per_iter"] >= 0 for h in history)
    assert SAMPLER_HISTOGRAMS <= set(tags["histograms"])
    for tag in SAMPLER_HISTOGRAMS - {"sampler/eps_weighted_per_image"}:
        assert steps(events, tag, "Histograms") == [2, 4], tag
    assert steps(events, "sampler/neg_bin0_per_image") == [2, 4]

    # The AP of every evaluation: in TensorBoard (percent), metrics.json and the PNG's third panel.
    evaluations = result["eval_history"]
    assert [e["iteration"] for e in evaluations] == [2, 4]
    assert [e.value for e in events.Scalars("eval/bbox_AP")] == pytest.approx(
        [100 * e["bbox"]["AP"] for e in evaluations])
    # The final evaluation is the one at iteration 4, not a second one.
    assert json.loads((out / "eval.json").read_text()) == result["eval"] == {
        k: v for k, v in evaluations[-1].items() if k != "iteration"}
    assert "evaluating on 4 validation images at iteration 4" in (out / "train.log").read_text()
    assert (out / "train.log").read_text().count("evaluating on") == 2

    rows = csv_rows(out)
    assert [int(r["iteration"]) for r in rows] == [2, 4]
    assert list(rows[0]) == ["iteration"] + summary_columns(2)


def test_a_default_run_logs_diagnostics_every_50_iterations_and_ap_at_the_end(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path / "run", iterations=50, log_every=25, checkpoint_every=50)
    assert config.tensorboard and config.diagnostics_every == 50 and config.eval_every is None
    train(config)
    events = read_events(tmp_path / "run")
    assert steps(events, "train/loss") == [25, 50]
    assert steps(events, "sampler/neg_iou_pn", "Histograms") == [50]
    assert steps(events, "eval/bbox_AP") == [50]
    assert [int(r["iteration"]) for r in csv_rows(tmp_path / "run")] == [50]


def test_resume_continues_the_stream_without_duplicate_steps(tiny_data, tmp_path):
    """A run that logged past its last checkpoint (as one killed there would have) and is resumed from
    it: TensorBoard shows each step once, with the resumed run's values; the CSV keeps one row a step."""
    settings = dict(iterations=6, log_every=1, checkpoint_every=2, eval_every=3, diagnostics_every=1,
                    eval_at_end=False)
    whole = tmp_path / "whole"
    train(tiny_config(tiny_data, whole, **settings))
    out = tmp_path / "resumed"
    train(tiny_config(tiny_data, out, stop_after=5, **settings))  # logged 3, 4, 5 after checkpoint 2
    train(tiny_config(tiny_data, out, resume=str(out / "checkpoint_0000002.pth"), **settings))
    events, reference = read_events(out), read_events(whole)
    assert len(os.listdir(out / TB_DIR)) == 2  # one file per run; the first is not rewritten
    for tag in ("train/loss", "train/lr", "sampler/neg_iou_pn_mean", "eval/bbox_AP"):
        assert steps(events, tag) == steps(reference, tag), tag
    assert steps(events, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert steps(events, "eval/bbox_AP") == [3, 6]
    assert steps(events, "sampler/neg_iou_pn", "Histograms") == [1, 2, 3, 4, 5, 6]
    # Exact resume: the values too (times aside) are the uninterrupted run's.
    assert [e.value for e in events.Scalars("train/loss")] == [e.value for e in reference.Scalars("train/loss")]
    assert [int(r["iteration"]) for r in csv_rows(out)] == [1, 2, 3, 4, 5, 6]
    assert csv_rows(out) == csv_rows(whole)
    state = load_checkpoint(str(out / "last_checkpoint.pth"))
    assert [e["iteration"] for e in state["eval_history"]] == [3, 6]


def test_no_tensorboard_writes_no_event_files(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    settings = tiny_settings(tiny_data, out, iterations=2, checkpoint_every=2, eval_at_end=False)
    assert cli_main(["train", *cli_args(settings), "--no-tensorboard", "--diagnostics-every", "1"]) == 0
    assert not (out / TB_DIR).exists()
    assert not [f for _, _, files in os.walk(out) for f in files if f.startswith("events.out.tfevents")]
    assert [int(r["iteration"]) for r in csv_rows(out)] == [1, 2]  # the CSV does not need TensorBoard

    off = tmp_path / "off"
    settings = tiny_settings(tiny_data, off, iterations=2, checkpoint_every=2, eval_at_end=False)
    assert cli_main(["train", *cli_args(settings), "--diagnostics-every", "0"]) == 0
    assert not (off / DIAGNOSTICS_CSV).exists()
    assert "sampler/neg_iou_pn" not in read_events(off).Tags()["histograms"]


def test_diagnostics_do_not_change_the_training(tiny_data, tmp_path):
    runs = {every: load_checkpoint(train(tiny_config(tiny_data, tmp_path / str(every), iterations=3,
                                                       checkpoint_every=3, eval_at_end=False,
                                                       diagnostics_every=every))["checkpoint"])
            for every in (0, 1)}
    for k, v in runs[0]["model"].items():
        assert torch.equal(v, runs[1]["model"][k]), k


@pytest.mark.parametrize("settings, message", [
    ({"eval_every": 0}, "eval_every must be a positive integer or unset"),
    ({"diagnostics_every": -1}, "diagnostics_every must be a non-negative integer"),
    ({"tensorboard": "yes"}, "tensorboard must be true or false"),
])
def test_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(settings)


def test_eval_every_needs_a_validation_set(tiny_data, tmp_path):
    settings = tiny_settings(tiny_data, tmp_path, eval_at_end=False, eval_every=2)
    del settings["val_images"], settings["val_annotations"]
    with pytest.raises(ValueError, match="val_images is required"):
        TrainConfig.from_dict(settings)


def test_loss_curve_gains_the_ap_panel(tmp_path):
    history = [{"iteration": i, "lr": 0.01, "loss": 2.0 / i, "loss_classifier": 1.0 / i} for i in (1, 2, 3)]
    evaluations = [{"iteration": i, "bbox": {"AP": 0.1 * i, "AP50": 0.2 * i}} for i in (2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, evals in (("none.png", None), ("empty.png", []), ("ap.png", evaluations)):
            plot_loss_curve(history, str(tmp_path / name), evals)
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(tmp_path / "ap.png").size[1] > Image.open(tmp_path / "none.png").size[1]


def test_a_fresh_run_in_a_used_folder_hides_the_old_events(tiny_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, iterations=4, log_every=1, eval_at_end=False, diagnostics_every=1))
    train(tiny_config(tiny_data, out, iterations=2, log_every=1, eval_at_end=False, diagnostics_every=1))
    assert steps(read_events(out), "train/loss") == [1, 2]
    assert [int(r["iteration"]) for r in csv_rows(out)] == [1, 2]
