"""benchmarks/sweep_work.py (issue 19's account of the CPU keys' work): its counts against a brute
force over every positive x negative pair, torchvision's box_iou as the IoU."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from conftest import make_batch


@pytest.fixture(scope="module")
def sweep_work():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "sweep_work.py"
    spec = importlib.util.spec_from_file_location("sweep_work", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", range(3))
def test_counts_equal_a_brute_force(sweep_work, seed, monkeypatch):
    monkeypatch.setattr(sweep_work, "CHUNK", 7)  # several IoU blocks
    proposals, _, gt, _ = make_batch([300], [6], seed=seed, crowded_fraction=0.4, canvas=400.0)
    work = sweep_work.image_work(proposals, gt)

    best = box_iou(proposals, gt).max(dim=1).values
    positives = torch.cat([proposals[best >= 0.5], gt])
    negatives = proposals[best < 0.5]
    iou = box_iou(positives, negatives)
    widest = (negatives[:, 2] - negatives[:, 0]).max()
    # Negative n is in positive p's window when x1_n is in [x1_p - widest, x2_p).
    x1 = negatives[None, :, 0]
    in_window = (x1 >= positives[:, None, 0] - widest) & (x1 < positives[:, None, 2])
    assert work["positives"] == len(positives) > len(gt) and work["negatives"] == len(negatives) > 0
    assert work["pairs"] == len(positives) * len(negatives)
    assert work["swept"] == int(in_window.sum())
    assert work["overlapping"] == int((iou > 0).sum())
    assert work["M"] == pytest.approx(float(iou.max()))
    # Every overlapping pair is in the window: the sweep is exact.
    assert not ((iou > 0) & ~in_window).any()


def test_markdown_and_files(sweep_work, tmp_path, capsys):
    assert sweep_work.main(["--sizes", "100", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "sweep-work.md").read_text()
    assert table == capsys.readouterr().out.rstrip("\n") + "\n"
    rows = [line for line in table.splitlines() if line.startswith("| 16 |") or line.startswith("| 4 |")]
    assert [row.split(" | ")[1] for row in rows] == ["2000", "100"]
