"""benchmarks/sampler_ab.py: the multi-seed comparison's statistics, reuse of finished runs, failures."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sampler_ab.py"


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("sampler_ab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN_ARGS = "--dataset synthetic --data-root /nonexistent"  # keeps the script from generating the dataset


def write_eval(run_dir: Path, ap: float, segm: bool = False, flags: str | None = None,
               seconds: float = 150.0) -> None:
    """A finished run: its eval.json and metrics.json as `train` writes them (fractions, not percent;
    1500 iterations in ``seconds``), and the settings record the script writes (the preset named by the
    folder, TRAIN_ARGS, the seed)."""
    run_dir.mkdir(parents=True)
    name, seed = run_dir.name.rsplit("-seed", 1)
    flags = f"--sampler {name} {TRAIN_ARGS}" if flags is None else flags
    (run_dir / "ab_settings.json").write_text(json.dumps({"train_flags": flags.split(), "seed": int(seed)}))
    metrics = {"AP": ap, "AP50": ap + 0.2, "AP75": ap - 0.1, "APs": ap, "APm": ap, "APl": -1.0}
    (run_dir / "eval.json").write_text(json.dumps({"bbox": metrics, **({"segm": metrics} if segm else {})}))
    (run_dir / "metrics.json").write_text(json.dumps({"history": [{"iteration": 750, "time": seconds / 3},
                                                                  {"iteration": 1500, "time": seconds}]}))


def run_main(ab, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["sampler_ab.py", "--train-args", TRAIN_ARGS, *argv])
    ab.main()


def test_finished_runs_are_read_and_summarised(ab, tmp_path, monkeypatch):
    aps = {"random": [0.30, 0.32, 0.28], "overlap": [0.36, 0.35, 0.37]}
    seconds = {"random": [150.0, 180.0, 120.0], "overlap": [300.0, 300.0, 300.0]}
    for name, values in aps.items():
        for seed, ap in enumerate(values):
            write_eval(tmp_path / "runs" / f"{name}-seed{seed}", ap, seconds=seconds[name][seed])
    run_main(ab, monkeypatch, "--variant", "random", "--variant", "overlap", "--seeds", "0", "1", "2",
             "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--name", "t")

    table = (tmp_path / "out" / "ab-t.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in table.splitlines() if line.startswith("| `") and "--sampler" in line}
    overlap = [100 * v for v in aps["overlap"]]
    diffs = [100 * (o - r) for o, r in zip(aps["overlap"], aps["random"])]
    assert rows["`overlap`"][0] == f"{statistics.fmean(overlap):.1f} ± {statistics.stdev(overlap):.1f}"
    assert rows["`overlap`"][5] == f"{statistics.fmean(diffs):+.1f} ± {statistics.stdev(diffs):.1f}"
    assert rows["`overlap`"][6] == "3/3"
    assert rows["`random`"][5:] == ["—", "—", "0.100"]  # s/iter: the mean of 150, 180, 120 s / 1500
    assert rows["`overlap`"][7] == "0.200"
    assert "segm" not in table
    saved = json.loads((tmp_path / "out" / "ab-t.json").read_text())
    assert {(r["variant"], r["seed"]) for r in saved["runs"]} == {(n, s) for n in aps for s in range(3)}
    assert saved["runs"][0]["bbox"]["AP"] == pytest.approx(30.0)


def test_mask_ap_gets_its_own_table(ab, tmp_path, monkeypatch):
    for name in ("random", "overlap"):
        write_eval(tmp_path / "runs" / f"{name}-seed4", 0.3, segm=True)
    run_main(ab, monkeypatch, "--variant", "random", "--variant", "overlap", "--seeds", "4",
             "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"))
    table = (tmp_path / "out" / "ab-synthetic.md").read_text()
    assert "## bbox" in table and "## segm" in table
    assert "| `overlap` | `--sampler overlap` | 30.0 |" in table  # one seed: no spread


def test_a_run_of_other_settings_is_never_reused(ab, tmp_path, monkeypatch):
    write_eval(tmp_path / "runs" / "random-seed0", 0.3, flags=f"--sampler random --arch maskrcnn {TRAIN_ARGS}")
    with pytest.raises(RuntimeError, match=r"random-seed0 holds a run of other settings .*--arch.* remove it"):
        run_main(ab, monkeypatch, "--variant", "random", "--seeds", "0", "--runs-dir", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "out"))
    (tmp_path / "runs" / "random-seed0" / "ab_settings.json").unlink()  # unrecorded: refused too
    with pytest.raises(RuntimeError, match="unrecorded"):
        run_main(ab, monkeypatch, "--variant", "random", "--seeds", "0", "--runs-dir", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "out"))


def test_a_failed_run_names_its_log(ab, tmp_path, monkeypatch):
    # --lr -1 is a config error: train exits at once without an eval.json.
    monkeypatch.setattr(sys, "argv", ["sampler_ab.py", "--variant", "bad=--lr -1", "--seeds", "0",
                                      "--train-args", TRAIN_ARGS,
                                      "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    with pytest.raises(RuntimeError, match=r"bad seed 0 failed .*stdout\.log"):
        ab.main()
    assert "lr" in (tmp_path / "runs" / "bad-seed0" / "stdout.log").read_text()
    assert list((tmp_path / "out").iterdir()) == []  # checked writable up front; no results


def test_an_unwritable_results_folder_fails_before_any_training(ab, tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("a run started before the results folder was checked")

    monkeypatch.setattr(ab, "train_once", never)
    (tmp_path / "file.txt").write_text("a file")
    with pytest.raises(SystemExit) as info:
        run_main(ab, monkeypatch, "--variant", "random", "--seeds", "0", "--runs-dir", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "file.txt" / "out"))
    assert info.value.code == 2
    assert (f"error: cannot write the results folder {tmp_path / 'file.txt' / 'out'}: {tmp_path / 'file.txt'} is a "
            "file, not a folder") in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [("nosuchpreset", "not a preset"), ("a-b=--lr 1", "identifier")])
def test_bad_variants_are_rejected(ab, text, message):
    with pytest.raises(Exception, match=message):
        ab.parse_variant(text)
