"""`overlap-sampler ablate`: variants (grid, TOML, NAME=FLAGS), checks before any run, reuse of finished
runs (benchmarks/sampler_ab.py's too), the report's statistics, failures, and a real tiny grid end to end."""

from __future__ import annotations

import json
import os
import shlex
import statistics
from pathlib import Path

import pytest

from overlap_sampler.analysis import ablate
from overlap_sampler.cli import add_train_arguments, config_from_args
from overlap_sampler.cli import main as cli_main
from overlap_sampler.data import make_synthetic_coco

TRAIN_ARGS = "--dataset synthetic --data-root /nonexistent"  # never generated: every run here is finished


@pytest.fixture(scope="module")
def train():
    return ablate.TrainCommandLine(add_train_arguments, config_from_args)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a training run starts."""
    def never(run):
        raise AssertionError(f"{run.run_dir} was trained")

    monkeypatch.setattr(ablate, "train_run", never)


def write_run(run_dir: Path, flags: list[str], ap: float, seconds: float = 150.0, segm: bool = False) -> None:
    """A finished run as `train` leaves it (eval.json in fractions, COCO's -1 for APl; 1500 iterations in
    ``seconds``) with the settings record of sampler_ab.py and ablate: ``flags`` are the train flags."""
    run_dir.mkdir(parents=True)
    seed = int(run_dir.name.rsplit("-seed", 1)[1])
    (run_dir / "ab_settings.json").write_text(json.dumps({"train_flags": flags, "seed": seed}))
    metrics = {"AP": ap, "AP50": ap + 0.2, "AP75": ap - 0.1, "APs": ap, "APm": ap / 2, "APl": -1.0}
    (run_dir / "eval.json").write_text(json.dumps({"bbox": metrics, **({"segm": metrics} if segm else {})}))
    (run_dir / "metrics.json").write_text(json.dumps({"history": [{"iteration": 750, "time": seconds / 3},
                                                                  {"iteration": 1500, "time": seconds}]}))


def run_ablate(tmp_path: Path, *argv: str, train_args: str = TRAIN_ARGS) -> int:
    return cli_main(["ablate", "--train-args", train_args, "--runs-dir", str(tmp_path / "runs"),
                     "--out", str(tmp_path / "out"), "--no-progress", *argv])


def table_rows(markdown: str, kind: str = "bbox") -> dict[str, list[str]]:
    """{variant: the cells after variant and flags} of the main table of ``kind``."""
    section = markdown.split(f"## {kind}\n", 1)[1].split("AP of each run", 1)[0]
    return {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[3:-1]]
            for line in section.splitlines() if line.startswith("| `")}


# ---------------------------------------------------------------------- variants
def test_grid_is_the_cartesian_product_named_by_its_settings(train):
    variants = ablate.grid_variants(["neg_strategy=uniform,hard", "num-bins=2,3", "pos_weight=1.5"], train)
    assert [v.name for v in variants] == [
        "neg_strategy=uniform,num_bins=2,pos_weight=1.5", "neg_strategy=uniform,num_bins=3,pos_weight=1.5",
        "neg_strategy=hard,num_bins=2,pos_weight=1.5", "neg_strategy=hard,num_bins=3,pos_weight=1.5"]
    assert variants[1].flags == ("--neg-strategy", "uniform", "--num-bins", "3", "--pos-weight", "1.5")
    # Booleans, lists, the sampler preset and characters a folder name cannot hold.
    carl, = ablate.grid_variants(["sampler=isr", "carl=false"], train)
    assert carl == ablate.Variant("sampler=isr,carl=false", ("--sampler", "isr", "--no-carl"))
    steps, = ablate.grid_variants(["lr_steps=100 200", "config=conf/a b.toml"], train)
    assert steps.name == "lr_steps=100_200,config=conf_a_b.toml"
    assert steps.flags == ("--lr-steps", "100", "200", "--config", "conf/a b.toml")


def test_toml_variants(train, tmp_path):
    path = tmp_path / "table2.toml"
    path.write_text('[[variant]]\nname = "uniform"\nflags = "--neg-strategy uniform --num-bins 1"\n\n'
                    '[[variant]]\nsettings = {neg_strategy = "soft", num_bins = 2, carl = true}\n\n'
                    '[[variant]]\nname = "soft-eps2"\nflags = ["--pos-weight", "2"]\n'
                    '[variant.settings]\nneg_strategy = "soft"\n')
    assert ablate.toml_variants(str(path), train) == [
        ablate.Variant("uniform", ("--neg-strategy", "uniform", "--num-bins", "1")),
        ablate.Variant("neg_strategy=soft,num_bins=2,carl=true",
                       ("--neg-strategy", "soft", "--num-bins", "2", "--carl")),
        ablate.Variant("soft-eps2", ("--neg-strategy", "soft", "--pos-weight", "2"))]
    path.write_text('[[variant]]\nname = "x"\nflag = "--lr 1"\n')
    with pytest.raises(ValueError, match=r"variant 1: unknown key\(s\) flag"):
        ablate.toml_variants(str(path), train)
    path.write_text('[[variant]]\nname = "a/b"\n')
    with pytest.raises(ValueError, match="variant name 'a/b' must be"):
        ablate.toml_variants(str(path), train)


@pytest.mark.parametrize("argv, message", [
    (["--grid", "neg_strategie=hard,soft"], "unknown setting 'neg_strategie': `overlap-sampler train` has no flag "
                                            "--neg-strategie; did you mean neg_strategy"),
    (["--grid", "num_bins=2,two"], "variant 'num_bins=two' (train flags: --num-bins two --dataset synthetic "
                                   "--data-root /nonexistent): argument --num-bins: invalid int value: 'two'"),
    (["--grid", "lr=0.02,-1"], "variant 'lr=-1' (train flags: --lr -1 --dataset synthetic --data-root "
                               "/nonexistent): TrainConfig.lr must be a positive number, got -1.0"),
    (["--grid", "neg_strategy=soft", "--train-args", "--sampler random"], "does not read neg_strategy='soft'"),
    (["--variant", "x=--seed 3"], "--seed is set by ablate for every run (--seeds)"),
    (["--grid", "output_dir=a,b"], "'output_dir' is set by ablate for every run"),
    (["--variant", "x=--no-eval-at-end"], "each run must train to the end and evaluate"),
    (["--variant", "x=--data-root /elsewhere --sampler ohem"], "--data-root given both by the variant and by "
                                                                "--train-args: set each setting in one place"),
    (["--variant", "random", "--baseline", "overlap"], "--baseline 'overlap' is not a variant (random)"),
    (["--variant", "random", "--variant", "random"], "variant names must differ: random given more than once"),
])
def test_bad_settings_fail_before_any_run(tmp_path, capsys, no_training, argv, message):
    assert run_ablate(tmp_path, *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------- finished runs and the report
def test_finished_runs_are_read_and_summarised_exactly(tmp_path, no_training):
    common = shlex.split(TRAIN_ARGS)
    aps = {"neg_strategy=uniform": [0.30, 0.32, 0.28], "neg_strategy=soft": [0.36, 0.31, 0.37]}
    seconds = {"neg_strategy=uniform": [150.0, 180.0, 120.0], "neg_strategy=soft": [300.0, 300.0, 330.0]}
    for name, values in aps.items():
        for seed, ap in enumerate(values):
            flags = ["--neg-strategy", name.split("=")[1], *common]
            write_run(tmp_path / "runs" / f"{name}-seed{seed}", flags, ap, seconds[name][seed])
    assert run_ablate(tmp_path, "--grid", "neg_strategy=uniform,soft", "--name", "t") == 0

    table = (tmp_path / "out" / "t.md").read_text()
    rows = table_rows(table)
    soft = [100 * v for v in aps["neg_strategy=soft"]]
    diffs = [100 * (s - u) for s, u in zip(aps["neg_strategy=soft"], aps["neg_strategy=uniform"])]
    assert rows["neg_strategy=soft"][0] == f"{statistics.fmean(soft):.1f} ± {statistics.stdev(soft):.1f}"
    assert rows["neg_strategy=soft"][5] == "—"  # APl: COCO's -1, no large objects
    assert rows["neg_strategy=soft"][6:] == [f"{statistics.fmean(diffs):+.1f} ± {statistics.stdev(diffs):.1f}",
                                             "2/3", "0.207"]  # 930 s / 3 / 1500
    assert rows["neg_strategy=uniform"][6:] == ["—", "—", "0.100"]
    assert "| `neg_strategy=soft` | 36.0 | 31.0 | 37.0 |" in table  # AP of each run
    assert "## segm" not in table

    saved = json.loads((tmp_path / "out" / "t.json").read_text())
    assert saved["baseline"] == "neg_strategy=uniform" and saved["seeds"] == [0, 1, 2]
    row = saved["summary"]["bbox"]["neg_strategy=soft"]
    assert row["AP"]["mean"] == pytest.approx(statistics.fmean(soft))
    assert row["AP"]["std"] == pytest.approx(statistics.stdev(soft))
    assert row["APm"]["values"] == pytest.approx([v / 2 for v in soft])
    assert row["APl"] is None
    assert row["delta_AP"]["values"] == pytest.approx(diffs) and row["wins"] == 2 and row["seeds"] == 3
    assert row["seconds_per_iter"] == pytest.approx(930 / 3 / 1500)
    assert {(r["variant"], r["seed"]) for r in saved["runs"]} == {(n, s) for n in aps for s in range(3)}


def test_runs_of_benchmarks_sampler_ab_are_reused_with_mask_ap(tmp_path, no_training):
    """sampler_ab.py's folders: a preset's flags are `--sampler NAME`, a NAME=FLAGS variant's are FLAGS, then
    --train-args."""
    common = shlex.split(TRAIN_ARGS)
    flags = {"random": ["--sampler", "random"], "uniform": ["--neg-strategy", "uniform"]}
    for name, ap in (("random", 0.3), ("uniform", 0.25)):
        write_run(tmp_path / "runs" / f"{name}-seed4", [*flags[name], *common], ap, segm=True)
    assert run_ablate(tmp_path, "--variant", "random", "--variant", "uniform=--neg-strategy uniform",
                      "--seeds", "4") == 0
    table = (tmp_path / "out" / "ablation.md").read_text()
    for kind in ("bbox", "segm"):
        assert table_rows(table, kind)["uniform"] == ["25.0", "45.0", "15.0", "25.0", "12.5", "—", "-5.0", "0/1",
                                                      "0.100"]  # one seed: no spread
    assert "| `uniform` | `--neg-strategy uniform` | 25.0 |" in table


def test_a_folder_of_other_settings_is_refused(tmp_path, capsys, no_training):
    run_dir = tmp_path / "runs" / "random-seed0"
    write_run(run_dir, ["--sampler", "random", "--arch", "maskrcnn", *shlex.split(TRAIN_ARGS)], 0.3)
    assert run_ablate(tmp_path, "--variant", "random", "--seeds", "0") == 2
    err = capsys.readouterr().err
    assert f"{run_dir} holds a run of other settings (" in err and "--arch" in err and "remove it" in err
    (run_dir / "ab_settings.json").unlink()  # unrecorded: refused too
    assert run_ablate(tmp_path, "--variant", "random", "--seeds", "0") == 2
    assert "unrecorded" in capsys.readouterr().err


# ---------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def tiny_train_args(tmp_path_factory) -> str:
    """Flags of a ~6 s `train` run on 8 + 4 synthetic 64 px images."""
    root = str(tmp_path_factory.mktemp("tiny_coco"))
    train_images, train_ann = make_synthetic_coco(root, num_images=8, image_size=64, seed=0, split="train")
    val_images, val_ann = make_synthetic_coco(root, num_images=4, image_size=64, seed=1, split="val")
    return shlex.join(["--dataset", "coco", "--train-images", train_images, "--train-annotations", train_ann,
                       "--val-images", val_images, "--val-annotations", val_ann, "--backbone", "small",
                       "--iterations", "8", "--batch-size", "2", "--min-size", "64", "--max-size", "96",
                       "--warmup-iters", "2", "--log-every", "4", "--checkpoint-every", "8", "--eval-batch-size",
                       "4", "--device", "cpu", "--batch-size-per-image", "64", "--no-tensorboard",
                       "--diagnostics-every", "0"])


def test_a_failed_run_names_its_log_and_stops_the_grid(tmp_path, capsys, tiny_train_args):
    # Checked settings, but no such file: train exits at once without an eval.json.
    assert run_ablate(tmp_path, "--variant", "bad=--weights /nonexistent/init.pth", "--variant", "random",
                      "--seeds", "0", train_args=tiny_train_args) == 1
    assert f"bad seed 0 failed (exit 2): see {tmp_path / 'runs' / 'bad-seed0' / 'stdout.log'}" \
        in capsys.readouterr().err
    assert "/nonexistent/init.pth" in (tmp_path / "runs" / "bad-seed0" / "stdout.log").read_text()
    assert not (tmp_path / "runs" / "random-seed0").exists()  # never started
    assert list((tmp_path / "out").iterdir()) == []  # checked writable up front; no results


def test_a_tiny_grid_end_to_end(tmp_path, tiny_train_args, monkeypatch):
    argv = ("--grid", "neg_strategy=uniform,soft", "--seeds", "0", "--name", "tiny")
    assert run_ablate(tmp_path, *argv, train_args=tiny_train_args) == 0
    for strategy in ("uniform", "soft"):
        run_dir = tmp_path / "runs" / f"neg_strategy={strategy}-seed0"
        assert json.loads((run_dir / "ab_settings.json").read_text()) == {
            "train_flags": ["--neg-strategy", strategy, *shlex.split(tiny_train_args)], "seed": 0}
        assert json.loads((run_dir / "config.json").read_text())["sampler"]["neg_strategy"] == strategy
    saved = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert [r["variant"] for r in saved["runs"]] == ["neg_strategy=uniform", "neg_strategy=soft"]
    soft = saved["summary"]["bbox"]["neg_strategy=soft"]
    uniform_run, soft_run = saved["runs"]
    assert soft["delta_AP"]["values"] == pytest.approx([soft_run["bbox"]["AP"] - uniform_run["bbox"]["AP"]])
    assert 0 < soft["seconds_per_iter"] < 10
    table = (tmp_path / "out" / "tiny.md").read_text()
    assert set(table_rows(table)) == {"neg_strategy=uniform", "neg_strategy=soft"}

    # Again: both runs are read, not repeated, and give the same report.
    monkeypatch.setattr(ablate, "train_run", lambda run: pytest.fail(f"{run.run_dir} trained again"))
    assert run_ablate(tmp_path, *argv, train_args=tiny_train_args) == 0
    assert (tmp_path / "out" / "tiny.md").read_text() == table


def test_the_committed_table2_grid_is_valid(train):
    # configs/ablate/table2_synthetic.toml is documented as a ready command: every variant must build.
    path = Path(__file__).resolve().parents[1] / "configs" / "ablate" / "table2_synthetic.toml"
    variants = ablate.toml_variants(str(path), train)
    assert len(variants) == 14 and len({v.name for v in variants}) == 14
    for variant in variants:
        train.check(variant, [], 0)
    # eps_2_nms_0.5 differs from eps_2 (the overlap preset) only in the test NMS: not trained again.
    configs = [train.check(v, [], 0) for v in variants]
    assert {name: (e.base, e.eval_flags[:2]) for name, e in ablate.evaluation_variants(variants, configs).items()} \
        == {"eps_2_nms_0.5": ("eps_2", ("--box-nms-thresh", "0.5"))}


# ---------------------------------------------------------------------- evaluation-only variants
def test_variants_that_differ_only_in_test_settings_are_evaluations(train):
    variants = [ablate.Variant("soft", ("--neg-strategy", "soft")),
                ablate.Variant("soft_nms", ("--box-nms-thresh", "0.5", "--neg-strategy", "soft")),
                ablate.Variant("uniform_nms", ("--neg-strategy", "uniform", "--box-nms-thresh", "0.5")),
                ablate.Variant("soft_again", ("--neg-strategy", "soft")),
                ablate.Variant("uniform_nms_0.3", ("--neg-strategy", "uniform", "--box-nms-thresh", "0.3"))]
    configs = [train.check(v, shlex.split(TRAIN_ARGS), 0) for v in variants]
    evaluations = ablate.evaluation_variants(variants, configs)
    # As training's final evaluation: its batch size and device.
    assert evaluations == {
        "soft_nms": ablate.Evaluation("soft", ("--box-nms-thresh", "0.5", "--batch-size", "4", "--device", "auto"),
                                      "eval_last_checkpoint_nms0.5.json"),
        # The same training: evaluated, not repeated.
        "soft_again": ablate.Evaluation("soft", ("--box-nms-thresh", "0.55", "--batch-size", "4", "--device",
                                                 "auto"), "eval_last_checkpoint_nms0.55.json"),
        # Its base is the first trained variant with its training (uniform_nms), not an evaluation.
        "uniform_nms_0.3": ablate.Evaluation("uniform_nms", ("--box-nms-thresh", "0.3", "--batch-size", "4",
                                                             "--device", "auto"), "eval_last_checkpoint_nms0.3.json"),
    }
    runs = ablate.plan(variants, [0, 1], [], Path("/nonexistent/runs"), evaluations)
    by = {(r.variant.name, r.seed): r for r in runs}
    assert by["soft_nms", 1].base is by["soft", 1] and by["soft", 1].base is None
    assert by["soft_nms", 1].command()[3:7] == ["eval", "--checkpoint", "/nonexistent/runs/soft-seed1/"
                                                "last_checkpoint.pth", "--box-nms-thresh"]
    assert by["soft_nms", 1].settings == {"train_flags": ["--box-nms-thresh", "0.5", "--neg-strategy", "soft"],
                                          "seed": 1, "evaluates": "soft-seed1",
                                          "eval_flags": list(evaluations["soft_nms"].eval_flags)}


def test_folders_of_trainings_and_evaluations_are_not_taken_for_each_other(tmp_path, no_training, capsys):
    """An evaluation's folder records what it evaluated: after the variants are reordered (or the base is
    dropped) the variant would be trained, and its folder is refused, not read as a training."""
    runs = tmp_path / "runs"
    write_run(runs / "plain-seed0", shlex.split(TRAIN_ARGS), 0.30)
    (runs / "plain-seed0" / "last_checkpoint.pth").write_bytes(b"a checkpoint")
    nms_flags = ["--box-nms-thresh", "0.5", *shlex.split(TRAIN_ARGS)]
    write_run(runs / "nms-seed0", nms_flags, 0.32)
    record = {"train_flags": nms_flags, "seed": 0, "evaluates": "plain-seed0",
              "eval_flags": ["--box-nms-thresh", "0.5", "--batch-size", "4", "--device", "auto"]}
    (runs / "nms-seed0" / "ab_settings.json").write_text(json.dumps(record))
    (runs / "nms-seed0" / "metrics.json").unlink()  # an evaluation has none
    in_order = ("--variant", "plain=", "--variant", "nms=--box-nms-thresh 0.5", "--seeds", "0")
    assert run_ablate(tmp_path, *in_order) == 0
    assert "`nms` is not trained" in capsys.readouterr().out
    for argv in [("--variant", "nms=--box-nms-thresh 0.5", "--variant", "plain=", "--seeds", "0"),
                 ("--variant", "nms=--box-nms-thresh 0.5", "--seeds", "0")]:
        assert run_ablate(tmp_path, *argv) == 2
        assert f"{runs / 'nms-seed0'} holds a run of other settings" in capsys.readouterr().err


def test_an_evaluation_whose_base_was_trained_again_is_repeated(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs / "plain-seed0", shlex.split(TRAIN_ARGS), 0.30)
    checkpoint = runs / "plain-seed0" / "last_checkpoint.pth"
    checkpoint.write_bytes(b"a checkpoint")
    argv = ("--variant", "plain=", "--variant", "nms=--box-nms-thresh 0.5", "--seeds", "0", "--jobs", "2")
    done = []

    def evaluate(run):  # what train_run leaves for an evaluation
        assert run.base is not None, f"{run.run_dir} was trained"
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "ab_settings.json").write_text(json.dumps(run.settings))
        (run.run_dir / "eval.json").write_text((run.base.run_dir / "eval.json").read_text())
        done.append(run.run_dir.name)
        return 1.0

    monkeypatch.setattr(ablate, "train_run", evaluate)
    assert run_ablate(tmp_path, *argv) == 0 and done == ["nms-seed0"]
    assert run_ablate(tmp_path, *argv) == 0 and done == ["nms-seed0"]  # read, not repeated
    later = (runs / "nms-seed0" / "eval.json").stat().st_mtime + 10
    os.utime(checkpoint, (later, later))  # the base trained again after the evaluation
    assert run_ablate(tmp_path, *argv) == 0 and done == ["nms-seed0", "nms-seed0"]


def test_a_failed_evaluation_names_its_log(tmp_path, capsys):
    # The base is finished but its checkpoint is gone: `eval` fails and the ablation says where to look.
    write_run(tmp_path / "runs" / "plain-seed0", shlex.split(TRAIN_ARGS), 0.30)
    assert run_ablate(tmp_path, "--variant", "plain=", "--variant", "nms=--box-nms-thresh 0.5", "--seeds", "0") == 1
    log = tmp_path / "runs" / "nms-seed0" / "stdout.log"
    assert f"nms seed 0 failed (exit 2): see {log}" in capsys.readouterr().err
    assert "last_checkpoint.pth" in log.read_text()


def test_an_evaluation_variant_end_to_end(tmp_path, tiny_train_args, monkeypatch):
    """The premise (the test NMS changes no weight) and the evaluation of the base's checkpoint."""
    import torch

    from overlap_sampler.engine.evaluate import evaluate_checkpoint

    argv = ("--variant", "plain=", "--variant", "nms_0.3=--box-nms-thresh 0.3", "--seeds", "0", "--name", "nms")
    assert run_ablate(tmp_path, *argv, train_args=tiny_train_args) == 0
    runs = tmp_path / "runs"
    assert (runs / "plain-seed0" / "last_checkpoint.pth").exists()
    assert not list((runs / "nms_0.3-seed0").glob("*.pth"))  # evaluated, not trained
    saved = json.loads((tmp_path / "out" / "nms.json").read_text())
    assert saved["evaluations"] == {"nms_0.3": {"checkpoints_of": "plain", "eval_flags": [
        "--box-nms-thresh", "0.3", "--batch-size", "4", "--device", "cpu"]}}  # the run's eval batch and device
    plain, evaluated = saved["runs"]
    assert evaluated["seconds_per_iter"] == plain["seconds_per_iter"]
    expected = evaluate_checkpoint(str(runs / "plain-seed0" / "last_checkpoint.pth"), output_dir=str(tmp_path / "e"),
                                   box_nms_thresh=0.3, batch_size=4, progress=False)
    assert evaluated["bbox"] == pytest.approx({k: 100 * v if v >= 0 else None for k, v in expected["bbox"].items()},
                                              abs=0.1)  # this process's threads round differently
    assert "`nms_0.3` is not trained" in (tmp_path / "out" / "nms.md").read_text()

    # Trained for real, the variant's weights are the base's bit for bit, and its final evaluation is
    # the ablation's evaluation of the base's checkpoint, number for number.
    trained = tmp_path / "trained"
    assert cli_main(["train", *shlex.split(tiny_train_args), "--box-nms-thresh", "0.3", "--seed", "0",
                     "--threads", "1", "--no-progress", "--output-dir", str(trained)]) == 0
    a = torch.load(runs / "plain-seed0" / "last_checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    b = torch.load(trained / "last_checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    own = json.loads((trained / "eval.json").read_text())["bbox"]
    assert evaluated["bbox"] == {k: 100 * v if v >= 0 else None for k, v in own.items()}

    # Read again, not repeated.
    monkeypatch.setattr(ablate, "train_run", lambda run: pytest.fail(f"{run.run_dir} ran again"))
    assert run_ablate(tmp_path, *argv, train_args=tiny_train_args) == 0
