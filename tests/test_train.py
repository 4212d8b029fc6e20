"""Training engine: end-to-end runs, checkpoints, exact resume after a kill, DDP through torchrun.

Everything is tiny (8 images of 64 px, the "small" backbone, a handful of iterations) because the
suite must run on a shared 2-core CPU. Runs that must be separate processes (resume after a kill, DDP)
go through the CLI in subprocesses with timeouts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from overlap_sampler.cli import main as cli_main
from overlap_sampler.data import make_synthetic_coco
from overlap_sampler.engine import TrainConfig, load_checkpoint, load_model_from_checkpoint, train
from overlap_sampler.engine.train import IterationBatchSampler, lr_at

AP_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}
SUBPROCESS_TIMEOUT = 300


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """(train_images, train_annotations, val_images, val_annotations): 8 + 4 synthetic 64 px images."""
    root = str(tmp_path_factory.mktemp("tiny_coco"))
    train_images, train_ann = make_synthetic_coco(root, num_images=8, image_size=64, seed=0, split="train")
    val_images, val_ann = make_synthetic_coco(root, num_images=4, image_size=64, seed=1, split="val")
    return train_images, train_ann, val_images, val_ann


def tiny_settings(data, output_dir, **overrides):
    """TrainConfig keys of a tiny run on ``data``."""
    train_images, train_ann, val_images, val_ann = data
    settings = dict(dataset="coco", train_images=train_images, train_annotations=train_ann,
                    val_images=val_images, val_annotations=val_ann, backbone="small", iterations=4,
                    batch_size=2, min_size=64, max_size=96, warmup_iters=2, log_every=2, checkpoint_every=2,
                    output_dir=str(output_dir), progress=False, eval_batch_size=4, device="cpu",
                    sampler={"batch_size_per_image": 64})
    settings.update(overrides)
    return settings


def tiny_config(data, output_dir, **overrides) -> TrainConfig:
    return TrainConfig.from_dict(tiny_settings(data, output_dir, **overrides))


def cli_args(settings: dict) -> list[str]:
    """``overlap-sampler train`` flags for a settings dict."""
    args = []
    for key, value in settings.items():
        if key == "sampler":
            for k, v in value.items():
                args += [f"--{k.replace('_', '-')}", str(v)]
        elif isinstance(value, bool):
            args.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
        elif isinstance(value, list):
            args += [f"--{key.replace('_', '-')}"] + [str(v) for v in value]
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def run_cli(args: list[str], timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "overlap_sampler.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bit-for-bit equal weights, optimizer state (momentum buffers, LR) and logged losses."""
    assert a["iteration"] == b["iteration"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model tensor {k} differs"
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for pid in oa["state"]:
        for k, v in oa["state"][pid].items():
            assert torch.equal(v, ob["state"][pid][k]), f"optimizer state {pid}/{k} differs"

    def losses(history):
        return [{k: v for k, v in h.items() if not k.startswith("time")} for h in history]

    assert losses(a["history"]) == losses(b["history"])


# ---------------------------------------------------------------------- pure pieces
def test_lr_schedule_warmup_and_steps():
    cfg = TrainConfig(iterations=90, lr=0.1, warmup_iters=10, warmup_factor=0.001, lr_steps=[60, 80])
    assert lr_at(cfg, 0) == pytest.approx(0.1 * 0.001)
    assert lr_at(cfg, 5) == pytest.approx(0.1 * (0.001 * 0.5 + 0.5))
    assert lr_at(cfg, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 59) == pytest.approx(0.1)
    assert lr_at(cfg, 60) == pytest.approx(0.01)
    assert lr_at(cfg, 80) == pytest.approx(0.001)
    # Default steps: 2/3 and 8/9 of the iterations, whatever iteration a run stops at.
    assert TrainConfig(iterations=90).resolved_lr_steps() == [60, 80]


def test_data_order_is_resumable_and_sharded():
    n, batch = 7, 3
    full = list(IterationBatchSampler(n, batch, seed=5, start_position=0, num_batches=6, hflip=0.5))
    # Every epoch is a permutation of the dataset.
    flat = [i for b in full for i, _ in b]
    assert sorted(flat[:n]) == list(range(n)) and sorted(flat[n:2 * n]) == list(range(n))
    assert any(f for b in full for _, f in b) and not all(f for b in full for _, f in b)
    # Resuming at a later position replays the same batches.
    resumed = list(IterationBatchSampler(n, batch, seed=5, start_position=2 * batch, num_batches=4, hflip=0.5))
    assert resumed == full[2:]
    # Two ranks: each iteration's global batch is split between them, rank 0 first.
    ranks = [list(IterationBatchSampler(n, batch, seed=5, start_position=0, num_batches=3, rank=r, world_size=2,
                                        hflip=0.5)) for r in range(2)]
    for it in range(3):
        assert ranks[0][it] + ranks[1][it] == full[2 * it] + full[2 * it + 1]
    other_seed = list(IterationBatchSampler(n, batch, seed=6, start_position=0, num_batches=6, hflip=0.5))
    assert other_seed != full
    # Seed 1's first epoch is not seed 0's second (as it would be with an epoch seed of seed + epoch).
    one_epoch_later = list(IterationBatchSampler(n, n, seed=5, start_position=n, num_batches=1, hflip=0.5))
    assert list(IterationBatchSampler(n, n, seed=6, start_position=0, num_batches=1, hflip=0.5)) != one_epoch_later


def test_rng_state_round_trip():
    import random

    import numpy as np

    from overlap_sampler.engine.checkpoint import get_rng_state, set_rng_state

    state = get_rng_state()
    first = (np.random.rand(3).tolist(), random.random(), torch.rand(2).tolist())
    set_rng_state(state)
    assert (np.random.rand(3).tolist(), random.random(), torch.rand(2).tolist()) == first


def test_flip_clipping_and_nms_settings_reach_the_run(tiny_data, tmp_path, monkeypatch):
    from overlap_sampler.detection import build_detector
    from overlap_sampler.engine.train import FlipDataset

    flips = []
    get_item = FlipDataset.__getitem__

    def recording_get_item(self, key):
        flips.append(key[1])
        return get_item(self, key)

    monkeypatch.setattr(FlipDataset, "__getitem__", recording_get_item)
    torch.manual_seed(0)
    model = build_detector("fasterrcnn", 4, backbone="small", min_size=64, max_size=96)
    torch.save(model.state_dict(), tmp_path / "init.pth")
    lr, clip = 0.5, 1e-3
    train(tiny_config(tiny_data, tmp_path / "run", iterations=1, eval_at_end=False, hflip=1.0, box_nms_thresh=0.4,
                      weights=str(tmp_path / "init.pth"), lr=lr, momentum=0.0, weight_decay=0.0, warmup_iters=0,
                      clip_grad_norm=clip))
    assert flips and all(flips)
    # One plain SGD step moves the weights by lr times the clipped gradient.
    after = load_checkpoint(str(tmp_path / "run" / "last_checkpoint.pth"))["model"]
    before = model.state_dict()
    step = torch.sqrt(sum(((after[n] - before[n]).double() ** 2).sum() for n, _ in model.named_parameters()))
    assert 0 < step <= lr * clip * 1.001
    reloaded, _ = load_model_from_checkpoint(str(tmp_path / "run" / "last_checkpoint.pth"))
    assert reloaded.roi_heads.nms_thresh == 0.4


def test_weights_of_another_class_count_are_noted_in_the_log(tiny_data, tmp_path):
    from overlap_sampler.detection import build_detector

    torch.save(build_detector("fasterrcnn", 7, backbone="small").state_dict(), tmp_path / "seven.pth")
    train(tiny_config(tiny_data, tmp_path / "run", iterations=1, eval_at_end=False,
                      weights=str(tmp_path / "seven.pth")))
    assert "was trained for another number of classes" in (tmp_path / "run" / "train.log").read_text()


def test_flip_moves_boxes_and_masks_with_the_image():
    from overlap_sampler.engine.train import FlipDataset

    image = torch.zeros(3, 20, 30)
    image[:, 5:10, 2:8] = 1.0  # object covering x in [2, 8), y in [5, 10)
    masks = (image[:1] > 0).to(torch.uint8)
    target = {"boxes": torch.tensor([[2.0, 5.0, 8.0, 10.0]]), "labels": torch.tensor([1]), "masks": masks}
    flipped, t = FlipDataset([(image, target)])[(0, True)]
    x1, y1, x2, y2 = t["boxes"][0].tolist()
    assert (x1, y1, x2, y2) == (22.0, 5.0, 28.0, 10.0)
    ys, xs = torch.nonzero(flipped[0], as_tuple=True)
    assert xs.min() == x1 and xs.max() + 1 == x2 and ys.min() == y1 and ys.max() + 1 == y2
    assert torch.equal(t["masks"][0].bool(), flipped[0] > 0)
    same, t0 = FlipDataset([(image, target)])[(0, False)]
    assert same is image and t0 is target


# ---------------------------------------------------------------------- end to end
def test_fasterrcnn_train_and_eval(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run")
    result = train(cfg)
    out = tmp_path / "run"
    for name in ("config.json", "train.log", "metrics.json", "loss_curve.png", "eval.json",
                 "checkpoint_0000002.pth", "checkpoint_0000004.pth", "last_checkpoint.pth"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The written config reproduces the run's config.
    assert TrainConfig.from_file(str(out / "config.json")) == cfg

    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["iteration"] for h in metrics["history"]] == [2, 4]
    for h in metrics["history"]:
        assert math.isfinite(h["loss"]) and h["loss"] > 0
        assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "lr",
                "fg_per_image", "bg_per_image", "time"} <= h.keys()
        assert h["fg_per_image"] + h["bg_per_image"] > 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation["bbox"]) == AP_KEYS
    assert metrics["eval"] == evaluation == result["eval"]
    assert "segm" not in evaluation

    state = load_checkpoint(str(out / "last_checkpoint.pth"))
    assert state["iteration"] == 4 and state["num_classes"] == 4 and len(state["category_ids"]) == 3
    assert state["category_names"] == ["rectangle", "ellipse", "triangle"]
    assert len(state["rng"]) == 1 and {"python", "numpy", "torch", "cuda"} <= state["rng"][0].keys()
    model, config = load_model_from_checkpoint(str(out / "last_checkpoint.pth"))
    assert not model.training and config == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k])


def test_runs_record_absolute_paths(tiny_data, tmp_path, monkeypatch):
    """Relative and '~' paths are recorded absolute: the checkpoint's own validation set is found from
    any folder, and config.json reproduces the run from anywhere."""
    from overlap_sampler.engine.evaluate import evaluate_checkpoint

    train_images, train_ann, val_images, val_ann = tiny_data
    data_dir = os.path.dirname(train_images)
    monkeypatch.setenv("HOME", data_dir)
    monkeypatch.chdir(data_dir)
    relative = (os.path.relpath(train_images), os.path.relpath(train_ann), "~/" + os.path.relpath(val_images),
                os.path.relpath(val_ann))
    run = os.path.relpath(tmp_path / "run")
    train(tiny_config(relative, run, iterations=2, eval_at_end=True))

    expected = {"train_images": train_images, "train_annotations": train_ann, "val_images": val_images,
                "val_annotations": val_ann, "output_dir": str(tmp_path / "run")}
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    state = load_checkpoint(str(tmp_path / "run" / "last_checkpoint.pth"))
    for key, path in expected.items():
        assert recorded[key] == state["config"][key] == os.path.abspath(path), key

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = evaluate_checkpoint(str(tmp_path / "run" / "last_checkpoint.pth"), output_dir="elsewhere",
                                      device="cpu", batch_size=4, progress=False)
    assert metrics == json.loads((tmp_path / "run" / "eval.json").read_text())


def test_maskrcnn_train_and_eval(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", arch="maskrcnn", iterations=2)
    result = train(cfg)
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(evaluation["bbox"]) == AP_KEYS and set(evaluation["segm"]) == AP_KEYS
    assert "loss_mask" in result["history"][-1] and math.isfinite(result["history"][-1]["loss_mask"])


def test_amp_on_cpu_is_ignored_with_a_note(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", amp=True, iterations=1, eval_at_end=False)
    train(cfg)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "amp=true needs CUDA" in log
    assert "the LR warm-up (warmup_iters=2) lasts until the end of the run: the LR never reaches lr=0.02" in log


def test_images_much_larger_than_the_resize_are_logged():
    from types import SimpleNamespace

    from overlap_sampler.engine.train import _resize_note

    def dataset(*sizes):
        return SimpleNamespace(coco=SimpleNamespace(imgs={i: {"width": w, "height": h}
                                                          for i, (w, h) in enumerate(sizes)}))

    cfg = TrainConfig()  # min_size 128
    assert _resize_note(cfg, dataset((128, 128), (300, 256), (900, 250))) is None  # median short side 250
    note = _resize_note(cfg, dataset((640, 480), (640, 427), (100, 90)))
    assert note.startswith("the training images (median short side 427 px) are shrunk to min_size=128, max_size=224")
    assert _resize_note(dataclasses.replace(cfg, min_size=800, max_size=1333), dataset((640, 480))) is None


@pytest.mark.parametrize("iterations, warmup_iters, lr_steps, warned", [
    (10, 9, [20], False), (10, 10, [20], True), (10, 4, [5], False), (10, 5, [5], True), (10, 0, [1], False)])
def test_warm_up_longer_than_the_schedule_is_logged(iterations, warmup_iters, lr_steps, warned):
    from overlap_sampler.engine.train import _warm_up_note

    cfg = TrainConfig(iterations=iterations, warmup_iters=warmup_iters, lr_steps=lr_steps)
    note = _warm_up_note(cfg)
    assert (note is not None) == warned
    if warned:  # and the LR indeed never reaches lr
        assert max(lr_at(cfg, i) for i in range(iterations)) < cfg.lr
    else:
        assert max(lr_at(cfg, i) for i in range(iterations)) == cfg.lr


def test_loader_workers_do_not_change_the_result(tiny_data, tmp_path):
    """The data order lives in the batch sampler, so worker processes give the same weights."""
    states = []
    for workers in (0, 1):
        out = tmp_path / f"workers{workers}"
        train(tiny_config(tiny_data, out, iterations=2, num_workers=workers, eval_at_end=False))
        states.append(load_checkpoint(str(out / "last_checkpoint.pth")))
    for k, v in states[0]["model"].items():
        assert torch.equal(v, states[1]["model"][k]), k


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_get_the_mode_of_a_plain_file(tmp_path, umask, mode):
    from overlap_sampler.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint

    state = {"format": CHECKPOINT_FORMAT, "iteration": 1, "model": {}, "config": {}, "num_classes": 2,
             "category_ids": [1]}
    previous = os.umask(umask)
    try:
        path = save_checkpoint(state, str(tmp_path))
    finally:
        os.umask(previous)
    for name in (path, str(tmp_path / "last_checkpoint.pth")):
        assert os.stat(name).st_mode & 0o777 == mode, name


def test_load_model_from_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_model_from_checkpoint(str(tmp_path / "missing.pth"))
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt.pth.*not a readable checkpoint"):
        load_model_from_checkpoint(str(bad))
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="other.pth.*missing"):
        load_model_from_checkpoint(str(other))
    # A pickled module: torch's reason only, not its advice to load with weights_only=False.
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(ValueError, match=r"module.pth is not a readable checkpoint \(not a torch.save file of "
                                         r"tensors and plain containers: Unsupported global") as info:
        load_model_from_checkpoint(str(tmp_path / "module.pth"))
    assert "weights_only" not in str(info.value)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "model.pt"))
    with pytest.raises(ValueError, match="model.pt is a TorchScript model"):
        load_model_from_checkpoint(str(tmp_path / "model.pt"))


def test_resume_explicit_path_must_exist(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", resume=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        train(cfg)


def test_resume_from_a_text_file_is_a_clear_error(tiny_data, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("epoch 3 was the best\n")  # torch's unpickler: "KeyError: 101" (the "e")
    assert cli_main(["train", *cli_args(tiny_settings(tiny_data, tmp_path / "run", resume=str(notes)))]) == 2
    err = capsys.readouterr().err
    assert (f"overlap-sampler train: error: checkpoint {notes} is not a readable checkpoint (a text file, not a "
            "torch.save file: it begins 'epoch 3 was the best')") in err
    assert "KeyError" not in err


def test_a_run_never_writes_over_its_inputs(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    annotations = out / "metrics.json"  # the run's own metrics.json would replace it
    annotations.write_bytes(open(tiny_data[1], "rb").read())
    weights = out / "checkpoint_0000002.pth"  # so would its checkpoint of iteration 2
    weights.write_bytes(b"initial weights")
    before = {p: p.read_bytes() for p in (annotations, weights)}
    for settings, clash in [({"train_annotations": str(annotations)},
                             f"the output metrics.json {annotations} would overwrite the training annotations "
                             f"{annotations}"),
                            ({"weights": str(weights)},
                             f"the checkpoint {weights} would overwrite the initial weights {weights}")]:
        clash += ", which this command reads: give another --output-dir"
        with pytest.raises(ValueError, match=re.escape(clash)):
            train(tiny_config(tiny_data, out, **settings))
    assert {p: p.read_bytes() for p in before} == before and sorted(os.listdir(out)) == [
        "checkpoint_0000002.pth", "metrics.json"]  # nothing written, not even config.json
    # An output folder that is a file: one line, no FileExistsError traceback.
    (tmp_path / "file").write_text("a file")
    assert cli_main(["train", *cli_args(tiny_settings(tiny_data, tmp_path / "file"))]) == 2
    assert capsys.readouterr().err == (f"overlap-sampler train: error: cannot write the output folder "
                                       f"{tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a folder\n")


def test_inputs_are_compared_with_the_entries_a_run_replaces(tiny_data, tmp_path):
    from overlap_sampler.engine.train import check_inputs_kept

    out = tmp_path / "run"
    out.mkdir()
    checkpoint = out / "checkpoint_0000002.pth"
    checkpoint.write_bytes(b"initial weights")
    # A link elsewhere to a checkpoint the run writes: its target would be replaced.
    link = tmp_path / "init.pth"
    link.symlink_to(checkpoint)
    with pytest.raises(ValueError, match=re.escape(f"the checkpoint {checkpoint} would overwrite the initial "
                                                   f"weights {link}")):
        train(tiny_config(tiny_data, out, weights=str(link)))
    # Weights hard-linked as last_checkpoint.pth (as a run leaves its newest checkpoint), from an
    # iteration this run does not reach: replacing last_checkpoint.pth gives that name a new file
    # and leaves the weights' name and contents alone, so this is no clash (it was refused).
    later = out / "checkpoint_0000100.pth"
    checkpoint.rename(later)
    os.link(later, out / "last_checkpoint.pth")
    check_inputs_kept(tiny_config(tiny_data, out, weights=str(later)))
    with pytest.raises(ValueError, match="would overwrite the initial weights"):  # but that name itself is
        check_inputs_kept(tiny_config(tiny_data, out, weights=str(out / "last_checkpoint.pth")))


def test_temporaries_of_killed_writes_are_removed_when_a_run_starts_there(tiny_data, tmp_path):
    from overlap_sampler.io_safety import STALE_AFTER_S

    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    hex32 = "0123456789abcdef" * 2
    stale = [f".checkpoint_0000002.pth~{gone.pid}-{hex32}.overlap-sampler-tmp", f".tmp_{gone.pid}_{hex32}.pth",
             f".tmp_last_checkpoint.pth.{gone.pid}", "metrics.json.tmp"]  # the last three: older versions' names
    kept = ["notes.tmp", "my.pth"]
    then = time.time() - STALE_AFTER_S - 60
    for name in stale + kept:
        (out / name).write_bytes(b"x")
        os.utime(out / name, (then, then))
    train(tiny_config(tiny_data, out, iterations=1, eval_at_end=False))
    left = sorted(os.listdir(out))
    assert not set(stale) & set(left) and set(kept) <= set(left)
    assert not [name for name in left if "tmp" in name and name not in kept]


def test_a_bad_image_in_a_loader_worker_is_one_line_and_its_traceback_is_logged(tmp_path, capsys):
    image_dir, annotations = make_synthetic_coco(str(tmp_path / "data"), num_images=4, image_size=64, split="train")
    first = sorted(os.listdir(image_dir))[0]
    data = open(os.path.join(image_dir, first), "rb").read()
    open(os.path.join(image_dir, first), "wb").write(data[:len(data) // 2])  # the header reads, the pixels do not
    settings = tiny_settings((image_dir, annotations, image_dir, annotations), tmp_path / "run", num_workers=1,
                             batch_size=4, eval_at_end=False, iterations=1)
    assert cli_main(["train", *cli_args(settings)]) == 2
    err = capsys.readouterr().err
    assert f"overlap-sampler train: error: {os.path.join(image_dir, first)} (image id" in err
    assert "Traceback" not in err and "DataLoader worker" not in err
    log = (tmp_path / "run" / "train.log").read_text()
    assert "a DataLoader worker failed to load a sample" in log and "Traceback" in log


def test_imagenet_backbone_run_reloads_and_resumes_with_its_layout(tiny_data, tmp_path):
    import torchvision

    torch.manual_seed(8)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    settings = dict(backbone="resnet18_fpn", backbone_weights=str(tmp_path / "resnet18.pth"), iterations=2,
                    stop_after=1, eval_at_end=False)
    train(tiny_config(tiny_data, tmp_path / "run", **settings))
    state = load_checkpoint(str(tmp_path / "run" / "last_checkpoint.pth"))
    assert state["backbone_layout"] == {"frozen_batchnorm": True, "trainable_backbone_layers": 3}
    assert not any(k.endswith("num_batches_tracked") for k in state["model"])  # frozen BatchNorm
    model, _ = load_model_from_checkpoint(str(tmp_path / "run" / "last_checkpoint.pth"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())
    # conv1 and layer1 stay at the ImageNet values; layer2 trains.
    imagenet = torch.load(tmp_path / "resnet18.pth")
    assert torch.equal(state["model"]["backbone.body.layer1.0.conv1.weight"], imagenet["layer1.0.conv1.weight"])
    assert not torch.equal(state["model"]["backbone.body.layer2.0.conv1.weight"], imagenet["layer2.0.conv1.weight"])

    # Resumed with settings that imply another layout: the checkpoint's layout goes on, with a warning.
    train(tiny_config(tiny_data, tmp_path / "run", **{**settings, "backbone_weights": None, "stop_after": None,
                                                       "resume": "auto"}))
    state = load_checkpoint(str(tmp_path / "run" / "last_checkpoint.pth"))
    assert state["iteration"] == 2 and state["backbone_layout"]["frozen_batchnorm"]
    assert "continuing with the checkpoint's" in (tmp_path / "run" / "train.log").read_text()


def test_checkpoints_of_older_versions_resume_with_trainable_batchnorm(tiny_data, tmp_path):
    """Before backbone_layout was stored, ResNets always had trainable BatchNorm and 5 trainable stages,
    even with `weights` set (which now implies torchvision's frozen layout)."""
    from overlap_sampler.engine.checkpoint import save_checkpoint

    settings = dict(backbone="resnet18_fpn", iterations=2, stop_after=1, eval_at_end=False)
    train(tiny_config(tiny_data, tmp_path / "run", **settings))
    old = load_checkpoint(str(tmp_path / "run" / "last_checkpoint.pth"))
    del old["backbone_layout"]
    torch.save(old["model"], tmp_path / "init.pth")
    old["config"]["weights"] = str(tmp_path / "init.pth")
    # Older versions recorded paths as given: relative ones are read from the current folder.
    old["config"]["train_images"] = os.path.relpath(old["config"]["train_images"])
    save_checkpoint(old, str(tmp_path / "run"))

    model, _ = load_model_from_checkpoint(str(tmp_path / "run" / "last_checkpoint.pth"))
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)
    train(tiny_config(tiny_data, tmp_path / "run", **{**settings, "weights": str(tmp_path / "init.pth"),
                                                       "stop_after": None, "resume": "auto"}))
    state = load_checkpoint(str(tmp_path / "run" / "last_checkpoint.pth"))
    assert state["iteration"] == 2
    assert state["backbone_layout"] == {"frozen_batchnorm": False, "trainable_backbone_layers": 5}
    assert "changed settings" not in (tmp_path / "run" / "train.log").read_text()


def test_missing_initial_weights_fail_before_the_data_is_read(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", backbone="resnet18_fpn", backbone_weights="~/nope/r18.pth",
                      train_annotations=str(tmp_path / "not-there.json"))
    expanded = re.escape(os.path.expanduser("~/nope/r18.pth"))  # the message says where it looked
    with pytest.raises(FileNotFoundError, match=f"backbone_weights file '{expanded}' does not exist; torchvision's "
                                                r"ImageNet ResNets are fetched"):
        train(cfg)


@pytest.mark.parametrize("settings, message", [
    ({"backbone": "small", "backbone_weights": "x.pth"}, "backbone_weights must be unset with backbone 'small'"),
    ({"backbone": "resnet18_fpn", "trainable_backbone_layers": 6}, "trainable_backbone_layers must be an integer"),
])
def test_resnet_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings).validate()


def write_val_variant(tiny_data, tmp_path, edit) -> str:
    """A copy of the tiny validation annotations changed by ``edit(data)``; returns its path."""
    data = json.loads(open(tiny_data[3]).read())
    edit(data)
    path = tmp_path / "val_variant.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("arch, edit, message", [
    ("fasterrcnn", lambda d: d["categories"].append({"id": 99, "name": "extra"}),
     r"val_variant\.json: validation categories \[1, 2, 3, 99\] differ from the training categories \[1, 2, 3\]"),
    ("fasterrcnn", lambda d: d["images"][0].update(file_name="missing.png"), r"missing\.png"),
    # Validation masks are checked as the eval command checks them.
    ("maskrcnn", lambda d: d["annotations"][0].update(segmentation=[[1, 1, 4]]), r"polygon 0"),
])
def test_a_broken_validation_set_fails_before_training(tiny_data, tmp_path, arch, edit, message):
    cfg = tiny_config(tiny_data, tmp_path / "run", arch=arch,
                      val_annotations=write_val_variant(tiny_data, tmp_path, edit))
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not any(name.endswith(".pth") for name in os.listdir(tmp_path / "run"))


def test_resume_from_another_architecture_is_a_clear_error(tiny_data, tmp_path):
    # A Mask R-CNN checkpoint in the folder of a Faster R-CNN run: named, not a state_dict traceback.
    from overlap_sampler.detection import build_detector
    from overlap_sampler.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint

    mask = build_detector("maskrcnn", 4, backbone="small", min_size=64, max_size=96)
    save_checkpoint({"format": CHECKPOINT_FORMAT, "iteration": 2, "model": mask.state_dict(),
                     "config": tiny_settings(tiny_data, tmp_path / "run", arch="maskrcnn"), "num_classes": 4,
                     "category_ids": [1, 2, 3]}, str(tmp_path / "run"))
    cfg = tiny_config(tiny_data, tmp_path / "run", resume="auto")
    with pytest.raises(ValueError, match=r"does not fit this run's model \(arch 'maskrcnn' there, 'fasterrcnn' here\)"):
        train(cfg)


def test_checkpoint_configs_of_older_versions_still_load(tmp_path):
    from overlap_sampler.engine.checkpoint import config_from_checkpoint

    # sampler='random' with method settings it ignores: accepted before they became errors.
    old = {"sampler": {"sampler": "random", "neg_strategy": "soft", "num_bins": 4, "pos_weight": 2.0,
                       "batch_size_per_image": 64}}
    config = config_from_checkpoint({"config": old}, "old.pth")
    assert config.sampler.sampler == "random" and config.sampler.num_bins == 2
    assert config.sampler.neg_strategy == "uniform" and config.sampler.batch_size_per_image == 64
    with pytest.raises(ValueError, match=r"checkpoint bad.pth: its config is not valid: .*num_bins"):
        config_from_checkpoint({"config": {"sampler": {"num_bins": 0}}}, "bad.pth")


# ---------------------------------------------------------------------- exact resume (separate processes)
RESUME_SETTINGS = dict(iterations=6, warmup_iters=2, checkpoint_every=1, log_every=2,
                       eval_at_end=False, threads=1, lr=0.01)


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_data, tmp_path_factory):
    """Last checkpoint of a 6-iteration run that nobody interrupted (one process)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_cli(["train", *cli_args(tiny_settings(tiny_data, out, **RESUME_SETTINGS))])
    return load_checkpoint(str(out / "last_checkpoint.pth"))


def test_resume_after_kill_is_bit_identical(tiny_data, tmp_path, uninterrupted_run):
    out = tmp_path / "killed"
    args = ["train", *cli_args(tiny_settings(tiny_data, out, **RESUME_SETTINGS))]
    proc = subprocess.Popen([sys.executable, "-m", "overlap_sampler.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    last = out / "last_checkpoint.pth"
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    try:
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert last.exists(), f"no checkpoint appeared; stderr:\n{stderr[-4000:]}"
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = load_checkpoint(str(last))["iteration"]
    assert 1 <= stopped_at < 6

    # A fresh process continues from the last checkpoint to the end of the same schedule.
    run_cli(["train", *cli_args(tiny_settings(tiny_data, out, **RESUME_SETTINGS)), "--resume", "auto"])
    resumed = load_checkpoint(str(last))
    assert_same_training_state(uninterrupted_run, resumed)
    log = (out / "train.log").read_text()
    assert f"resuming from {last} (iteration {stopped_at})" in log


def test_stop_after_then_resume_is_bit_identical(tiny_data, tmp_path, uninterrupted_run):
    out = tmp_path / "chunks"
    settings = tiny_settings(tiny_data, out, **RESUME_SETTINGS)
    run_cli(["train", *cli_args(settings), "--stop-after", "3"])
    state = load_checkpoint(str(out / "last_checkpoint.pth"))
    assert state["iteration"] == 3
    # Iteration 3 ran at the LR of the 6-iteration schedule (default steps at 2/3 and 8/9 of 6: 4 and 5);
    # a schedule ending at 3 would have decayed it already (steps at 2 and 2).
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert [h["iteration"] for h in state["history"]] == [2]
    run_cli(["train", *cli_args(settings), "--resume", str(out / "checkpoint_0000003.pth")])
    assert_same_training_state(uninterrupted_run, load_checkpoint(str(out / "last_checkpoint.pth")))


# ---------------------------------------------------------------------- DDP
def run_torchrun(args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "overlap_sampler.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"


def test_ddp_two_gloo_processes(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    settings = tiny_settings(tiny_data, out, iterations=2, log_every=1, checkpoint_every=2)
    run_torchrun(["train", *cli_args(settings)])
    state = load_checkpoint(str(out / "last_checkpoint.pth"))
    assert state["iteration"] == 2 and state["world_size"] == 2
    assert len(state["rng"]) == 2  # both ranks' generators, for an exact resume
    # Rank 1 seeds its own RoI sampling: its generator state differs from rank 0's.
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["history"]) == 2
    for h in metrics["history"]:
        assert math.isfinite(h["loss"])
        # 2 ranks x batch 2: fg/bg are per image over the 4 images of the global batch.
        assert h["fg_per_image"] + h["bg_per_image"] > 0
    assert set(json.loads((out / "eval.json").read_text())["bbox"]) == AP_KEYS
    # Only rank 0 writes: one log, one TensorBoard event file, no stray files from rank 1.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("checkpoint_")) == [
        "config.json", "eval.json", "last_checkpoint.pth", "loss_curve.png", "metrics.json",
        "sampler_diagnostics.csv", "tb", "train.log"]
    assert len(list((out / "tb").iterdir())) == 1


def test_ddp_resume_is_bit_identical(tiny_data, tmp_path):
    """Two ranks stopped after iteration 1 and resumed: both ranks' generators come back."""
    settings = dict(iterations=3, log_every=1, checkpoint_every=1, eval_at_end=False)
    full = tmp_path / "full"
    run_torchrun(["train", *cli_args(tiny_settings(tiny_data, full, **settings))])
    parts = tmp_path / "parts"
    run_torchrun(["train", *cli_args(tiny_settings(tiny_data, parts, **settings)), "--stop-after", "1"])
    assert load_checkpoint(str(parts / "last_checkpoint.pth"))["iteration"] == 1
    run_torchrun(["train", *cli_args(tiny_settings(tiny_data, parts, **settings)), "--resume", "auto"])
    assert_same_training_state(load_checkpoint(str(full / "last_checkpoint.pth")),
                               load_checkpoint(str(parts / "last_checkpoint.pth")))


def test_loss_curve_with_and_without_history(tmp_path):
    import warnings

    from overlap_sampler.engine.train import plot_loss_curve

    history = [{"iteration": i, "lr": 0.01, "loss": 2.0 / i, "loss_classifier": 1.0 / i} for i in (1, 2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" before the first log line
        for name, h in (("empty.png", []), ("curve.png", history)):
            plot_loss_curve(h, str(tmp_path / name))
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
