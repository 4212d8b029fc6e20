"""benchmarks/bench_train_step.py: its crowded proposals and a tiny run of the comparison."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports bench_ops beside it
    try:
        spec = importlib.util.spec_from_file_location("bench_train_step", BENCHMARKS / "bench_train_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_crowded_proposals_cluster_on_the_objects(bench):
    from overlap_sampler.detection import build_detector

    torch.manual_seed(0)
    model = build_detector("fasterrcnn", 4, backbone="small", min_size=96, max_size=96)
    images, targets = bench.make_batch(2, (96, 96), 6, 4, "cpu")
    seen = []
    select = model.roi_heads.select_weighted_training_samples
    model.roi_heads.select_weighted_training_samples = \
        lambda p, t, *rest: seen.append([x.clone() for x in p]) or select(p, t, *rest)
    model(images, targets)  # the RPN's own proposals
    bench.crowd_the_proposals(model, 0.5)
    model(images, targets)
    model(images, targets)
    rpn, crowded, again = seen
    for own, new, repeat, target in zip(rpn, crowded, again, targets):
        assert new.shape == own.shape and torch.equal(new, repeat)  # same count; made once
        half = len(own) // 2
        assert torch.equal(new[half:], own[half:])
        best = box_iou(new[:half], target["boxes"]).max(dim=1).values
        assert (best >= 0.5).float().mean() > 0.5  # the RPN's hardly touch the objects
        assert (box_iou(own, target["boxes"]).max(dim=1).values >= 0.5).float().mean() < 0.2
        assert new[:, 0::2].min() >= 0 and new[:, 0::2].max() <= 96 and new[:, 1::2].max() <= 96


def test_an_unwritable_results_folder_fails_before_measuring(bench, tmp_path, monkeypatch, capsys):
    (tmp_path / "file.txt").write_text("a file")
    monkeypatch.setattr(bench, "build_detector", None)  # measuring would fail on it
    monkeypatch.setattr(sys, "argv", ["bench_train_step.py", "--out", str(tmp_path / "file.txt" / "results")])
    with pytest.raises(SystemExit) as info:
        bench.main()
    assert info.value.code == 2
    assert (f"error: cannot write the results folder {tmp_path / 'file.txt' / 'results'}: {tmp_path / 'file.txt'} "
            "is a file, not a folder") in capsys.readouterr().err


def test_tiny_comparison_writes_every_sampler(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_train_step.py", "--size", "64", "64", "--batch", "2", "--gt", "4",
                                      "--rois", "32", "--warmup", "0", "--steps", "2", "--out", str(tmp_path),
                                      "--samplers", "overlap", "libra", "ohem", "isr"])
    bench.main()
    [report] = tmp_path.glob("train-step-cpu-*-fasterrcnn-small-64x64-b2.md")
    rows = json.loads(report.with_suffix(".json").read_text())["rows"]
    assert list(rows) == ["overlap", "libra", "ohem", "isr", "random"]
    for name, row in rows.items():
        assert 0 < row["sampling_s"] < row["step_s"] and row["share"] == row["sampling_s"] / row["step_s"]
        if name != "ohem":  # the paper's OHEM shares its budget over the batch: no per-image fraction
            assert 0 < row["fg"] <= 8 and row["fg"] + row["bg"] == 32  # at most a quarter of 32 positives
    text = report.read_text()
    assert "| `overlap` |" in text and "| `random` |" in text and "Step time of each sampler / random's: overlap" \
        in text
