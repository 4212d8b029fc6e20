"""`analyze iou-hist` (the paper's Figure 4 on a detector's proposals): the command on a tiny trained
checkpoint, its counts against an independent computation with torchvision's box_iou, the model left
untouched, fresh weights, bad sampler names, and what the samplers do with the same proposals."""

from __future__ import annotations

import csv
import dataclasses
import doctest
import warnings

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from overlap_sampler.analysis import iou_hist
from overlap_sampler.analysis.iou_hist import (
    CSV_NAME,
    MARKDOWN_NAME,
    PNG_NAME,
    iou_histograms,
    load_training_inputs,
    sampler_configs,
)
from overlap_sampler.cli import main
from overlap_sampler.detection.diagnostics import IOU_EDGES
from overlap_sampler.sampling import SAMPLERS

BUDGET = 32  # RoIs per image of the tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A checkpoint of the small model trained 20 iterations on 8 synthetic 64 px images (COCO files)."""
    from overlap_sampler.data import make_synthetic_coco

    root = tmp_path_factory.mktemp("iou_hist")
    images, annotations = make_synthetic_coco(str(root / "data"), num_images=8, image_size=64, seed=0,
                                              split="train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "--train-images", images, "--train-annotations", annotations, "--iterations", "20",
                     "--warmup-iters", "5", "--batch-size", "2", "--min-size", "64", "--max-size", "64",
                     "--batch-size-per-image", str(BUDGET), "--no-eval-at-end", "--no-tensorboard",
                     "--no-progress", "--output-dir", str(root / "run"), "--device", "cpu"]) == 0
    return root, str(root / "run" / "last_checkpoint.pth"), images, annotations


@pytest.fixture()
def inputs(tiny_run):
    root, checkpoint, _, _ = tiny_run
    return load_training_inputs(checkpoint, device="cpu")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_command_end_to_end(tiny_run, capsys):
    root, checkpoint, _, _ = tiny_run
    # Defaults: every sampler, the run's own training images, analysis/ beside the checkpoint.
    assert main(["analyze", "iou-hist", "--checkpoint", checkpoint, "--images", "4", "--device", "cpu",
                 "--no-progress"]) == 0
    folder = root / "run" / "analysis"
    rows = _read_csv(folder / CSV_NAME)
    assert list(dict.fromkeys(row["sampler"] for row in rows)) == list(SAMPLERS)
    for name in SAMPLERS:
        mine = [row for row in rows if row["sampler"] == name]
        assert [float(r["bin_low"]) for r in mine] == pytest.approx(IOU_EDGES[:-1])
        assert [float(r["bin_high"]) for r in mine] == pytest.approx(IOU_EDGES[1:])
        for kind in ("neg", "pos"):
            counts = np.array([int(r[f"{kind}_count"]) for r in mine])
            assert counts.sum() > 0
            assert sum(float(r[f"{kind}_share"]) for r in mine) == pytest.approx(1.0)
            assert [float(r[f"{kind}_share"]) for r in mine] == pytest.approx(counts / counts.sum())
    assert (folder / PNG_NAME).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    markdown = (folder / MARKDOWN_NAME).read_text()
    assert all(f"| {name} | 4 |" in markdown for name in SAMPLERS)
    assert f"batch_size_per_image {BUDGET}" in markdown and "iteration 20" in markdown
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sampler") and [line.split()[0] for line in out[1:7]] == list(SAMPLERS)
    assert out[-1].startswith("wrote ")


def _independent_keys(picks):
    """IoU_p,n of each sampled negative and key of each sampled positive, per image with box_iou."""
    negatives, positives = [], []
    num_proposals = sum(picks.proposal_counts)
    p_start = g_start = 0
    for b, (n, g) in enumerate(zip(picks.proposal_counts, picks.gt_counts)):
        gt = picks.gt_boxes[g_start:g_start + g].double()
        examples = torch.cat([picks.proposals[p_start:p_start + n].double(), gt])
        iou_g = box_iou(examples, gt).amax(1) if g else torch.zeros(n, dtype=torch.float64)
        is_copy = torch.arange(n + g) >= n
        positive = is_copy | (iou_g >= 0.5)
        negative = ~is_copy & (iou_g < 0.5)
        ids = picks.indices[b][picks.indices[b] >= 0]
        local = torch.where(ids < num_proposals, ids - p_start, n + ids - num_proposals - g_start)
        pos, neg = local[:int(picks.num_pos[b])], local[int(picks.num_pos[b]):]
        # The head labels as torchvision's matcher does: its picks are what their names say.
        assert positive[pos].all() and negative[neg].all()

        def max_with(rows, others):
            if rows.numel() == 0 or not others.any():
                return torch.zeros(rows.numel(), dtype=torch.float64)
            return box_iou(examples[rows], examples[others]).amax(1)

        negatives.append(max_with(neg, positive))
        positives.append(max_with(pos, negative))
        p_start += n
        g_start += g
    return torch.cat(negatives).numpy(), torch.cat(positives).numpy()


def test_counts_match_box_iou_on_the_recorded_picks(inputs, tiny_run):
    model, data = inputs.model, inputs.data
    # Training-mode proposals: the RPN's training top-n applies (here fewer than its test top-n).
    model.rpn._post_nms_top_n = {"training": 60, "testing": 1000}
    recorded = {}
    results = iou_histograms(model, data, samplers=["random", "overlap", "libra"], batch_size=3, progress=False,
                             on_batch=lambda name, picks, measured: recorded.setdefault(name, []).append(picks))
    for name in ("random", "overlap", "libra"):
        assert len(recorded[name]) == 3  # 8 images in batches of 3
        assert all(count == 60 for picks in recorded[name] for count in picks.proposal_counts)
        keys = [_independent_keys(picks) for picks in recorded[name]]
        neg = np.concatenate([k[0] for k in keys])
        pos = np.concatenate([k[1] for k in keys])
        expected_neg, _ = np.histogram(neg, bins=IOU_EDGES)
        expected_pos, _ = np.histogram(pos, bins=IOU_EDGES)
        result = results[name]
        assert result.images == len(data) == 8
        assert result.neg_counts.tolist() == expected_neg.tolist()
        assert result.pos_counts.tolist() == expected_pos.tolist()
        assert result.neg_mean == pytest.approx(neg.mean(), abs=1e-6)
        assert result.pos_mean == pytest.approx(pos.mean(), abs=1e-6)
        assert result.num_neg > 8 * 10 and result.num_pos >= 8  # not vacuous
        assert result.config.batch_size_per_image == BUDGET
    # Every sampler picked from the same proposals.
    for batches in zip(*recorded.values()):
        assert all(torch.equal(batches[0].proposals, other.proposals) for other in batches[1:])


def test_the_model_is_left_as_it_was(inputs):
    model = inputs.model.train()  # as during training, where a BatchNorm forward would update its statistics
    model.rpn.eval()  # a mixture of modes, restored module by module
    modes = {name: module.training for name, module in model.named_modules()}
    state = {key: value.clone() for key, value in model.state_dict().items()}
    config = model.roi_heads.sampler_config()
    rng = torch.get_rng_state()
    data = torch.utils.data.Subset(inputs.data, range(4))
    first = iou_histograms(model, data, progress=False)
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert model.roi_heads.sampler_config() == config and model.roi_heads.last_samples is None
    assert model.roi_heads.generator is None and not model.roi_heads.record_samples
    assert torch.equal(torch.get_rng_state(), rng)
    # A sampler's numbers do not depend on the others that run, nor on a second run.
    alone = iou_histograms(model, data, samplers=["random"], progress=False)["random"]
    assert alone.neg_counts.tolist() == first["random"].neg_counts.tolist()
    assert alone.pos_counts.tolist() == first["random"].pos_counts.tolist()
    # The state check is not vacuous: a training-mode forward does move the BatchNorm statistics.
    with torch.no_grad():
        model.backbone(torch.rand(1, 3, 64, 64))
    assert not all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_uniform_picks_fewer_high_overlap_negatives_than_overlap_and_hard(inputs):
    """The paper's Figure 4 on the same proposals: random (uniform) sampling picks few negatives that
    overlap a positive. "High" is >= 0.5 for the hard strategy (its theta) and >= 0.3 for the soft one,
    whose upper bin starts at half of each image's max IoU_p,n (here about 0.6: few negatives reach 0.5)."""
    configs = sampler_configs(["random", "overlap"], inputs.model.roi_heads)
    configs["hard"] = dataclasses.replace(configs["overlap"], neg_strategy="hard")
    results = iou_histograms(inputs.model, inputs.data, samplers=configs, progress=False)
    random, overlap, hard = results["random"], results["overlap"], results["hard"]
    assert random.num_neg == overlap.num_neg == hard.num_neg == 8 * 24
    # Measured (seed 0): >= 0.3: random 20 %, overlap 52 %; >= 0.5: random 3 %, overlap 9 %, hard 82 %.
    assert overlap.neg_share_from(0.3) >= random.neg_share_from(0.3) + 0.15
    assert overlap.neg_mean >= random.neg_mean + 0.05
    assert hard.neg_share_from(0.5) >= random.neg_share_from(0.5) + 0.3
    assert hard.neg_share_from(0.5) >= overlap.neg_share_from(0.5) > random.neg_share_from(0.5)


def test_untrained(tiny_run, tmp_path, capsys):
    root, checkpoint, images, annotations = tiny_run
    trained = load_training_inputs(checkpoint, device="cpu").model.state_dict()
    fresh = [load_training_inputs(checkpoint, untrained=True, seed=seed, device="cpu").model.state_dict()
             for seed in (0, 0, 1)]
    assert fresh[0].keys() == trained.keys()
    weights = "backbone.body.stem.0.weight"
    assert torch.equal(fresh[0][weights], fresh[1][weights])
    assert not torch.equal(fresh[0][weights], fresh[2][weights])
    assert not torch.equal(fresh[0][weights], trained[weights])
    assert main(["analyze", "iou-hist", "--checkpoint", checkpoint, "--untrained", "--images", "2",
                 "--samplers", "random", "overlap", "--output-dir", str(tmp_path / "a"), "--device", "cpu",
                 "--no-progress"]) == 0
    assert "untrained fasterrcnn (small backbone) of checkpoint" in (tmp_path / "a" / MARKDOWN_NAME).read_text()
    # Without a checkpoint: the default small model, on the data given.
    assert main(["analyze", "iou-hist", "--untrained", "--train-images", images, "--train-annotations",
                 annotations, "--images", "2", "--samplers", "overlap", "overlap", "random",
                 "--output-dir", str(tmp_path / "b"), "--device", "cpu", "--no-progress"]) == 0
    rows = _read_csv(tmp_path / "b" / CSV_NAME)
    assert list(dict.fromkeys(row["sampler"] for row in rows)) == ["overlap", "random"]  # duplicates dropped
    assert "batch_size_per_image 128" in (tmp_path / "b" / MARKDOWN_NAME).read_text()  # the default budget
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["analyze", "iou-hist", "--dataset", "synthetic"])
    assert "needs --checkpoint (or --untrained" in capsys.readouterr().err


def test_bad_sampler_names_and_inputs_are_named(tiny_run, inputs, tmp_path, capsys):
    root, checkpoint, images, annotations = tiny_run
    with pytest.raises(SystemExit):
        main(["analyze", "iou-hist", "--checkpoint", checkpoint, "--samplers", "random", "fancy"])
    assert "argument --samplers: invalid choice: 'fancy'" in capsys.readouterr().err
    message = "samplers must be among overlap, iou_balanced, random, libra, ohem, isr; got 'fancy'"
    with pytest.raises(ValueError, match=message):
        iou_histograms(inputs.model, inputs.data, samplers=["random", "fancy"], progress=False)
    with pytest.raises(ValueError, match="samplers must name at least one"):
        iou_hist.iou_hist_checkpoint(checkpoint, samplers=[], output_dir=str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        iou_histograms(inputs.model, inputs.data, batch_size=0)
    # Errors are one line, before any image is run; an input is never written over.
    assert main(["analyze", "iou-hist", "--checkpoint", str(tmp_path / "absent.pth")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    named = tmp_path / CSV_NAME
    named.write_text(open(annotations).read())
    assert main(["analyze", "iou-hist", "--checkpoint", checkpoint, "--train-images", images,
                 "--train-annotations", str(named), "--output-dir", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"overlap-sampler analyze: error: writing the IoU histogram CSV {named} would "
                          f"overwrite the annotation file {named}") and err.count("\n") == 1
    assert main(["analyze", "iou-hist", "--checkpoint", checkpoint, "--images", "0"]) == 2
    assert "images must be a positive int, got 0" in capsys.readouterr().err


def test_demo_shares_the_histogram_and_table():
    from overlap_sampler.demo import run_demo

    lines = run_demo(images=2, proposals=300, gt=6).splitlines()
    assert lines[1].split()[1:] == ["[0.0,0.1)", "[0.1,0.2)", "[0.2,0.3)", "[0.3,0.4)", "[0.4,0.5)", "[0.5,0.6)",
                                    "[0.6,0.7)", "[0.7,1.0]", "ms/batch"]
    assert len(lines) == 8
    for line in lines[2:]:
        values = [float(v.rstrip("%")) for v in line.split()[1:9]]
        assert sum(values) == pytest.approx(100.0, abs=0.5)
    assert doctest.testmod(iou_hist).failed == 0
