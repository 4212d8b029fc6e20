"""bench_ops.py --guard: the regression check to run before committing kernel
changes. It measures the main case (the training default, soft / soft with ε=2)
side by side with torchvision's random path and fails when its speed-up fell
below the committed one by more than the margin; it refuses, with exit 2, a file
of another device or another main case."""

from __future__ import annotations

import json

import pytest
import torch



def committed(bench_ops, tmp_path, speedup, device="cpu", options=None):
    """A results file of this device whose main case claims `speedup` over torchvision; its main
    case records `options` (default: the training default's, so the guard compares)."""
    row = {"B": 16, "N": 2000, "G": 20, "strategies": bench_ops.MAIN,
           "overlap_sampler.sample": 1.0, "torchvision random path": speedup}
    sections = {"main": [dict(row)],
                "strategies (B=16, N=2000, G=20)": [dict(row, strategies=s) for s in bench_ops.STRATEGIES]}
    main_case = {"strategies": bench_ops.MAIN, "B": 16, "N": 2000, "G": 20,
                 "options": bench_ops.training_default_options() if options is None else options}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"device": bench_ops.device_name(torch.device(device)), "main case": main_case,
                                "sections": sections}))
    return path


def test_guard_fails_when_slower_than_committed_and_passes_otherwise(bench_ops, tmp_path, capsys):
    # No build is 1000x torchvision's random path on this batch, and every build beats 0.001x.
    assert bench_ops.guard(committed(bench_ops, tmp_path, 1000.0), torch.device("cpu"), 1, 0.25) == 1
    assert "SLOWER" in capsys.readouterr().out
    assert bench_ops.guard(committed(bench_ops, tmp_path, 0.001), torch.device("cpu"), 1, 0.25) == 0
    assert "SLOWER" not in capsys.readouterr().out


def test_guard_margin_boundary(bench_ops, tmp_path, monkeypatch):
    # Fixed timings: the guard compares speed-ups, so 2.0x committed at margin 0.25 allows down to 1.5x.
    for now, expected in ((1.6, 0), (1.4, 1)):
        monkeypatch.setattr(bench_ops, "measure", lambda *a, now=now, **k: {
            "overlap_sampler.sample": 1.0, "torchvision random path": now})
        assert bench_ops.guard(committed(bench_ops, tmp_path, 2.0), torch.device("cpu"), 1, 0.25) == expected


def test_guard_compares_something_with_a_sane_margin(bench_ops, tmp_path):
    path = committed(bench_ops, tmp_path, 1.0)
    assert bench_ops.guard(path, torch.device("cpu"), 1, 1.0) == 2  # a margin of 1 could never fail
    data = json.loads(path.read_text())
    data["sections"] = {"scaling in B": data["sections"]["main"]}
    path.write_text(json.dumps(data))
    assert bench_ops.guard(path, torch.device("cpu"), 1, 0.25) == 2  # nothing to compare


def test_guard_refuses_another_device(bench_ops, tmp_path):
    path = committed(bench_ops, tmp_path, 1.0)
    data = json.loads(path.read_text())
    data["device"] = "NVIDIA-H200"
    path.write_text(json.dumps(data))
    assert bench_ops.guard(path, torch.device("cpu"), 1, 0.25) == 2


def test_guard_refuses_a_file_with_another_main_case(bench_ops, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_ops, "measure", lambda *a, **k: pytest.fail("measured a case it cannot compare"))
    # Before issue 19 the main case was soft / uniform and the files recorded no main case.
    path = committed(bench_ops, tmp_path, 1.0)
    data = json.loads(path.read_text())
    del data["main case"]
    path.write_text(json.dumps(data))
    assert bench_ops.guard(path, torch.device("cpu"), 1, 0.25) == 2
    err = capsys.readouterr().err
    assert "soft / uniform" in err and "nothing comparable" in err
    # A file whose main case ran other settings.
    path = committed(bench_ops, tmp_path, 1.0, options=bench_ops.strategy_options("soft / uniform"))
    assert bench_ops.guard(path, torch.device("cpu"), 1, 0.25) == 2
    err = capsys.readouterr().err
    assert "pos_strategy='uniform'" in err and "pos_strategy='soft'" in err and "nothing comparable" in err


def test_guard_measures_the_committed_main_case(bench_ops, tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(bench_ops, "measure", lambda *a, **k: measured.append((a, k)) or {
        "overlap_sampler.sample": 1.0, "torchvision random path": 2.0})
    path = committed(bench_ops, tmp_path, 2.0)
    data = json.loads(path.read_text())
    data["main case"].update(B=2, N=300, G=10)
    path.write_text(json.dumps(data))
    assert bench_ops.guard(path, torch.device("cpu"), 1, 0.25) == 0
    (args, kwargs), = measured
    assert args[:3] == (2, 300, 10) and kwargs.get("strategies", bench_ops.MAIN) == bench_ops.MAIN
