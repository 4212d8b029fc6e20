"""`overlap-sampler` CLI: config files + flag precedence, config errors, help texts, train -> eval -> export."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from overlap_sampler.cli import build_parser, config_from_args, main
from overlap_sampler.data import make_synthetic_coco
from overlap_sampler.engine import TrainConfig
from overlap_sampler.engine.config import default_sampler
from overlap_sampler.sampling import SamplerConfig

CONFIG_TOML = """
iterations = 7
lr = 0.5
batch_size = 3
lr_steps = [4, 6]
amp = true

[sampler]
neg_strategy = "hard"
num_bins = 3
pos_weight = 1.5
batch_size_per_image = 512
"""


def parse(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


@pytest.fixture
def toml_file(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(CONFIG_TOML)
    return str(path)


def test_defaults_without_arguments():
    cfg = parse()
    assert cfg == TrainConfig()
    assert cfg.dataset == "synthetic" and cfg.arch == "fasterrcnn" and cfg.backbone == "small"
    # The paper's best sampling method, with the small default budget of 128 RoIs per image.
    assert cfg.sampler == SamplerConfig(batch_size_per_image=128) == default_sampler()
    assert cfg.box_nms_thresh == 0.55 and cfg.eval_at_end


def test_file_then_flags_precedence(toml_file):
    cfg = parse("--config", toml_file, "--lr", "0.1", "--num-bins", "4", "--no-amp", "--lr-steps", "5")
    assert cfg.iterations == 7 and cfg.batch_size == 3  # file
    assert cfg.lr == 0.1 and cfg.amp is False and cfg.lr_steps == [5]  # flags beat the file
    assert cfg.sampler.neg_strategy == "hard" and cfg.sampler.pos_weight == 1.5  # file's [sampler]
    assert cfg.sampler.num_bins == 4  # flag beats the file's [sampler]
    assert cfg.momentum == TrainConfig().momentum  # neither: default


def test_sampler_preset_flag_replaces_the_method_not_the_budget(toml_file):
    cfg = parse("--config", toml_file, "--sampler", "iou_balanced", "--num-bins", "5")
    # Method from the preset (the file's hard / K=3 / epsilon 1.5 are gone), K from the flag,
    # RoI budget from the file.
    expected = SamplerConfig.preset("iou_balanced")
    expected.num_bins = 5
    expected.batch_size_per_image = 512
    assert cfg.sampler == expected
    random = SamplerConfig.preset("random")
    random.batch_size_per_image = 128
    assert parse("--sampler", "random").sampler == random


def test_json_config_and_preset_in_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"arch": "maskrcnn", "sampler": {"preset": "random", "batch_size_per_image": 64}}))
    cfg = TrainConfig.from_file(str(path))
    assert cfg.arch == "maskrcnn"
    assert cfg.sampler.sampler == "random" and cfg.sampler.batch_size_per_image == 64
    assert TrainConfig.from_file(str(path), {"iterations": 3}).iterations == 3


def test_config_json_round_trip(tmp_path):
    cfg = TrainConfig(iterations=11, lr_steps=[5, 9], sampler=SamplerConfig.preset("iou_balanced"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_file(str(path)) == cfg


def test_coco_without_validation_files_trains_without_the_final_evaluation():
    cfg = TrainConfig.from_dict({"train_images": "i", "train_annotations": "a.json", "eval_at_end": False})
    assert cfg.dataset == "coco" and cfg.val_images is None


def test_data_paths_in_a_file_imply_coco_as_the_flags_do(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('train_images = "a"\ntrain_annotations = "a.json"\neval_at_end = false\n')
    assert TrainConfig.from_file(str(path)).dataset == "coco"
    assert parse("--train-images", "a", "--train-annotations", "a.json", "--no-eval-at-end").dataset == "coco"


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("iteration = 5\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match="unknown training config key.*iteration, learning_rate"):
        TrainConfig.from_file(str(path))
    path.write_text("[sampler]\nnum_binz = 3\n")
    with pytest.raises(ValueError, match="num_binz"):
        TrainConfig.from_file(str(path))


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("iteration = 5\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "unknown training config key(s): iteration" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    path.write_text("iterations = [")
    assert main(["train", "--config", str(path)]) == 2
    assert "could not be parsed" in capsys.readouterr().err


@pytest.mark.parametrize("settings, field", [
    ({"lr": -1.0}, "lr"), ({"iterations": 0}, "iterations"), ({"arch": "yolo"}, "arch"),
    ({"batch_size": 2.5}, "batch_size"), ({"amp": "yes"}, "amp"), ({"lr_steps": [5, 3]}, "lr_steps"),
    ({"min_size": 200, "max_size": 100}, "max_size"), ({"device": "tpu"}, "device"),
    ({"dataset": "coco"}, "train_images"), ({"train_images": "x"}, "train_annotations"),
    ({"dataset": "synthetic", "train_images": "x"}, "train_images is set but dataset is 'synthetic'"),
    ({"train_images": "i", "train_annotations": "a.json"}, "val_images is required with dataset = 'coco'"),
    ({"sampler": {"num_bins": 0}}, "num_bins"), ({"output_dir": ""}, "output_dir must be a non-empty path"),
])
def test_bad_values_name_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig.from_dict(settings)


def test_random_sampler_refuses_settings_it_would_ignore():
    assert parse("--sampler", "random").sampler.pos_weight == 1.0  # the preset itself is consistent
    with pytest.raises(ValueError, match="pos_weight=2.0"):
        parse("--sampler", "random", "--pos-weight", "2").validate()
    with pytest.raises(ValueError, match="neg_strategy='soft'"):
        TrainConfig.from_dict({"sampler": {"sampler": "random", "neg_strategy": "soft",
                                           "pos_strategy": "uniform", "pos_weight": 1.0}})
    for flag, value, named in [("--num-bins", "4", "num_bins=4"), ("--hard-thresh", "0.3", "hard_thresh=0.3"),
                               ("--bin-upper", "0.8", "bin_upper=0.8"), ("--pos-key", "all", "pos_key='all'")]:
        with pytest.raises(ValueError, match=named):
            parse("--sampler", "random", flag, value).validate()


def test_dataset_paths_imply_coco():
    cfg = parse("--train-images", "d", "--train-annotations", "a.json", "--val-images", "v",
                "--val-annotations", "v.json")
    assert cfg.dataset == "coco" and cfg.train_images == "d"


def test_every_flag_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "eval", "export", "demo", "info"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
    train_flags = {s for a in subparsers.choices["train"]._actions for s in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        if f.name != "sampler":
            assert "--" + f.name.replace("_", "-") in train_flags
    for f in dataclasses.fields(SamplerConfig):
        flag = "--sampler" if f.name == "sampler" else "--" + f.name.replace("_", "-")
        assert flag in train_flags


def test_train_eval_export_commands(tmp_path, capsys):
    root = str(tmp_path / "data")
    train_images, train_ann = make_synthetic_coco(root, num_images=4, image_size=64, seed=0, split="train")
    val_images, val_ann = make_synthetic_coco(root, num_images=2, image_size=64, seed=1, split="val")
    out = tmp_path / "run"
    assert main(["train", "--train-images", train_images, "--train-annotations", train_ann,
                 "--val-images", val_images, "--val-annotations", val_ann, "--iterations", "2",
                 "--batch-size", "2", "--min-size", "64", "--max-size", "64", "--batch-size-per-image", "32",
                 "--no-eval-at-end", "--no-progress", "--output-dir", str(out), "--device", "cpu"]) == 0
    checkpoint = str(out / "last_checkpoint.pth")
    assert not (out / "eval.json").exists()

    eval_dir = tmp_path / "eval"
    assert main(["eval", "--checkpoint", checkpoint, "--val-images", val_images, "--val-annotations", val_ann,
                 "--output-dir", str(eval_dir), "--device", "cpu", "--no-progress"]) == 0
    metrics = json.loads((eval_dir / "eval_last_checkpoint.json").read_text())
    assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert "AP50" in capsys.readouterr().out
    # Without data flags: the validation set the checkpoint was trained with, JSON beside it.
    assert main(["eval", "--checkpoint", checkpoint, "--device", "cpu", "--no-progress", "--batch-size", "1"]) == 0
    again = json.loads((out / "eval_last_checkpoint.json").read_text())
    assert again["bbox"] == pytest.approx(metrics["bbox"], abs=1e-3)  # batched arithmetic rounds differently
    # Another test NMS threshold: its own file name, the default's left alone; bad values named.
    capsys.readouterr()
    assert main(["eval", "--checkpoint", checkpoint, "--device", "cpu", "--no-progress", "--box-nms-thresh",
                 "0.3"]) == 0
    assert "RoI-head NMS threshold 0.3 (the checkpoint's: 0.55)" in capsys.readouterr().out
    assert set(json.loads((out / "eval_last_checkpoint_nms0.3.json").read_text())) == set(metrics)
    assert json.loads((out / "eval_last_checkpoint.json").read_text()) == again
    for bad in ("0", "1.5", "nan"):
        assert main(["eval", "--checkpoint", checkpoint, "--box-nms-thresh", bad]) == 2
        assert f"box_nms_thresh must be a number in (0, 1], got {float(bad)!r}" in capsys.readouterr().err

    exported = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", checkpoint, "--output", str(exported), "--image-size", "64"]) == 0
    assert exported.is_file() and exported.stat().st_size > 0


def test_eval_and_export_missing_checkpoint(tmp_path, capsys):
    missing = str(tmp_path / "absent.pth")
    assert main(["eval", "--checkpoint", missing, "--dataset", "synthetic"]) == 2
    assert "absent.pth" in capsys.readouterr().err
    assert main(["export", "--checkpoint", missing, "--output", str(tmp_path / "m.pt")]) == 2
    assert "absent.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", missing, "--val-images", "only-images"])


def test_bad_devices_sizes_and_counts_are_named(tmp_path, capsys):
    checkpoint = tmp_path / "exists.pth"
    checkpoint.write_bytes(b"only its existence is checked before these errors")
    no_cuda_device = "cuda:99" if torch.cuda.is_available() else "cuda"
    for argv, named in [
        (["eval", "--checkpoint", str(checkpoint), "--device", "tpu0"], "device='tpu0' is not a device"),
        (["eval", "--checkpoint", str(checkpoint), "--device", no_cuda_device], f"device='{no_cuda_device}'"),
        (["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.pt"), "--device", "tpu0"],
         "device='tpu0' is not a device"),
        (["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.pt"), "--image-size", "0"],
         "example_image_size must be at least 32"),
        (["demo", "--images", "0"], "images must be >= 1, got 0"),
        (["demo", "--proposals", "-3"], "proposals must be >= 1, got -3"),
    ]:
        assert main(argv) == 2, argv
        assert named in capsys.readouterr().err, argv


def test_example_configs_load():
    import pathlib

    configs = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert configs, "configs/ holds the example config files"
    for path in configs:
        cfg = TrainConfig.from_file(str(path))
        assert cfg.output_dir and cfg.iterations > 0, path
    # small_synthetic.toml spells out the defaults.
    spelled = TrainConfig.from_file(str(configs[0].parent / "small_synthetic.toml"))
    assert spelled.resolved_lr_steps() == TrainConfig().resolved_lr_steps()
    assert dataclasses.replace(spelled, lr_steps=None) == TrainConfig()
