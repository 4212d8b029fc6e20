"""Export: TorchScript of the small detectors (reloaded == eager), its errors, torch.export of the
backbone, and export_checkpoint / evaluate_checkpoint from a checkpoint file."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from conftest import needs_cuda
from overlap_sampler.cli import main as cli_main
from overlap_sampler.detection import build_detector
from overlap_sampler.engine.export import (
    compare_detections,
    example_images,
    export_backbone,
    export_checkpoint,
    export_torchscript,
    load_categories,
    no_jit_fusion,
)

IMAGE_SIZE = 96

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning",  # "TorchScript is deprecated"
                                        "ignore:RCNN always returns")


def _small(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    # 20 detections per image keep Mask R-CNN's mask pasting cheap.
    return build_detector(arch, 3, backbone="small", min_size=IMAGE_SIZE, max_size=IMAGE_SIZE,
                          box_detections_per_img=20).eval()


@pytest.mark.parametrize("arch", ["fasterrcnn", "maskrcnn"])
def test_torchscript_reloaded_equals_eager(arch, tmp_path):
    model = _small(arch)
    images = example_images(IMAGE_SIZE, count=2)
    path = export_torchscript(model, str(tmp_path / "sub" / f"{arch}.pt"), images)
    assert os.path.isfile(path)

    # Independent of export_torchscript's own check: a fresh load, on other images.
    loaded = torch.jit.load(path)
    others = example_images((IMAGE_SIZE, 80), count=2, seed=1)
    with torch.no_grad(), no_jit_fusion():
        eager = model(others)
        losses, scripted = loaded(others)
    assert losses == {}
    assert all(len(d["boxes"]) > 0 for d in eager)  # a non-vacuous comparison
    expected_keys = {"boxes", "scores", "labels"} | ({"masks"} if arch == "maskrcnn" else set())
    for a, b in zip(eager, scripted):
        assert set(a) == set(b) == expected_keys
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@needs_cuda
@pytest.mark.parametrize("arch", ["fasterrcnn", "maskrcnn"])
def test_torchscript_on_cuda(arch, tmp_path):
    model = _small(arch).cuda()
    images = example_images(IMAGE_SIZE, count=2, device="cuda")
    path = export_torchscript(model, str(tmp_path / f"{arch}.pt"), images)
    loaded = torch.jit.load(path, map_location="cuda")
    with torch.no_grad(), no_jit_fusion():
        eager, (_, scripted) = model(images), loaded(images)
    assert compare_detections(eager, scripted) == []
    assert scripted[0]["boxes"].is_cuda


def test_unscriptable_model_is_a_clear_error(tmp_path):
    class Unscriptable(torch.nn.Module):
        def forward(self, images):
            return [dict(boxes=x) for x in map(lambda image: image[:1], images)]

    with pytest.raises(RuntimeError, match="torch.jit.script failed for Unscriptable"):
        export_torchscript(Unscriptable(), str(tmp_path / "m.pt"), example_images(32, count=1))
    assert not (tmp_path / "m.pt").exists()


def test_scripted_behaviour_differing_from_eager_is_named(tmp_path):
    class Diverges(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0]]) * self.scale
            if torch.jit.is_scripting():
                boxes = boxes + 0.5
            return [{"boxes": boxes, "labels": torch.ones(1, dtype=torch.int64)} for _ in images]

    (tmp_path / "m.pt").write_bytes(b"an earlier export")
    with pytest.raises(RuntimeError, match=r"so .*m.pt is not written:\n  image 0: 'boxes' differs .*4 of 4 "
                                           r"values differ, max abs difference 0.5"):
        export_torchscript(Diverges(), str(tmp_path / "m.pt"), example_images(32, count=1))
    # Only a verified file is put in place; the temporary is gone.
    assert os.listdir(tmp_path) == ["m.pt"] and (tmp_path / "m.pt").read_bytes() == b"an earlier export"


def test_bad_example_images(tmp_path):
    model = torch.nn.Identity()
    with pytest.raises(ValueError, match="non-empty list"):
        export_torchscript(model, str(tmp_path / "m.pt"), [])
    with pytest.raises(ValueError, match=r"example_images\[1\] must be a float \[3, H, W\] "
                                         r"tensor, got torch.int64"):
        export_torchscript(model, str(tmp_path / "m.pt"),
                           [torch.rand(3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.int64)])


def test_compare_detections_lists_each_difference():
    a = [{"boxes": torch.zeros(2, 4), "labels": torch.ones(2, dtype=torch.int64)}]
    b = [{"boxes": torch.zeros(3, 4), "labels": torch.ones(2, dtype=torch.int32)}]
    problems = compare_detections(a, b, what="x")
    assert problems == ["image 0: 'boxes' differs (x vs eager: shape [3, 4] vs [2, 4])",
                        "image 0: 'labels' differs (x vs eager: dtype torch.int32 vs torch.int64)"]
    assert compare_detections(a, a) == []
    assert "2 detection dicts" in compare_detections(a, a + a)[0]
    assert "keys" in compare_detections(a, [{"boxes": torch.zeros(2, 4)}])[0]


def test_torch_export_of_the_backbone(tmp_path):
    model = _small("fasterrcnn")
    with torch.no_grad():
        batch = model.transform(example_images(IMAGE_SIZE, count=2))[0].tensors
    path = export_backbone(model, str(tmp_path / "backbone.pt2"), batch)
    program = torch.export.load(path).module()
    # Another batch size and image size (multiples of 32): the exported sizes are symbolic.
    other = torch.rand(3, 3, 128, 160)
    with torch.no_grad():
        expected = model.backbone(_normalised(model, other))
        actual = program(other)
    assert set(actual) == set(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    with pytest.raises(ValueError, match="example_batch"):
        export_backbone(model, str(tmp_path / "b.pt2"), batch[0])


def _normalised(model, batch):
    mean = torch.tensor(model.transform.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(model.transform.image_std).view(1, -1, 1, 1)
    return (batch - mean) / std


# ---- from a checkpoint file (TRAIN's format) ---------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    pytest.importorskip("pycocotools")  # not installed on the lent GPU machines
    from overlap_sampler.data import CocoDetection, make_synthetic_coco
    from overlap_sampler.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from overlap_sampler.engine.config import TrainConfig

    root = tmp_path_factory.mktemp("ckpt")
    image_dir, annotations = make_synthetic_coco(str(root / "data"), num_images=3,
                                                 image_size=64, split="val")
    data = CocoDetection(image_dir, annotations)
    config = TrainConfig(arch="maskrcnn", backbone="small", min_size=64, max_size=64, dataset="coco",
                         train_images=image_dir, train_annotations=annotations, val_images=image_dir,
                         val_annotations=annotations)
    torch.manual_seed(0)
    model = build_detector("maskrcnn", data.num_classes, backbone="small", min_size=64,
                           max_size=64)
    path = save_checkpoint({"format": CHECKPOINT_FORMAT, "iteration": 1,
                            "model": model.state_dict(), "config": config.to_dict(),
                            "num_classes": data.num_classes,
                            "category_ids": list(data.category_ids),
                            "category_names": data.category_names}, str(root / "run"))
    return path, image_dir, annotations


def test_export_checkpoint(checkpoint_and_data, tmp_path, capsys):
    checkpoint, _, _ = checkpoint_and_data
    output = export_checkpoint(checkpoint, str(tmp_path / "new" / "model.pt"), example_image_size=64,
                               backbone_output=str(tmp_path / "new" / "backbone.pt2"))
    assert output == str(tmp_path / "new" / "model.pt")  # missing folders are made
    assert os.path.isfile(output) and os.path.isfile(tmp_path / "new" / "backbone.pt2")
    assert "reloaded outputs equal eager" in capsys.readouterr().out
    # The synthetic dataset's categories, label by label, travel with the file.
    assert load_categories(output) == [{"label": 1, "category_id": 1, "name": "rectangle"},
                                       {"label": 2, "category_id": 2, "name": "ellipse"},
                                       {"label": 3, "category_id": 3, "name": "triangle"}]
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        export_checkpoint(str(tmp_path / "nope.pth"), str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match=r"output '.*new' is a directory: give the file to write, e\.g\. "):
        export_checkpoint(checkpoint, str(tmp_path / "new"))
    with pytest.raises(ValueError, match="is a TorchScript model .* not a training checkpoint"):
        export_checkpoint(output, str(tmp_path / "again.pt"))


def test_export_never_writes_over_its_checkpoint(checkpoint_and_data, tmp_path, capsys):
    checkpoint = tmp_path / "last_checkpoint.pth"
    checkpoint.write_bytes(Path(checkpoint_and_data[0]).read_bytes())
    os.symlink(checkpoint, tmp_path / "linked.pth")
    before = checkpoint.read_bytes()
    # The checkpoint by its own name, and the backbone program over it; a link to it would be
    # replaced and the checkpoint kept (test_output_safety.py::test_links_and_entries).
    for output, backbone in [(checkpoint, None), (tmp_path / "m.pt", checkpoint)]:
        argv = ["export", "--checkpoint", str(checkpoint), "--output", str(output), "--image-size", "64"]
        assert cli_main(argv + (["--backbone-output", str(backbone)] if backbone else [])) == 2, argv
        what, path = ("TorchScript file", output) if backbone is None else ("backbone program", backbone)
        assert capsys.readouterr().err == (f"overlap-sampler export: error: writing the {what} {path} would "
                                           f"overwrite the checkpoint {checkpoint}, which this command reads: "
                                           "choose another output path\n")
    assert checkpoint.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["last_checkpoint.pth", "linked.pth"]
    with pytest.raises(ValueError, match="output and backbone_output are one file"):
        export_checkpoint(str(checkpoint), str(tmp_path / "m.pt"), backbone_output=str(tmp_path / "m.pt"))


@pytest.mark.parametrize("where", ["read-only folder", "under a file", "backbone under a file"])
def test_unwritable_outputs_are_named_before_the_slow_part(checkpoint_and_data, tmp_path, monkeypatch, capsys, where):
    from test_output_safety import refuse_writes_in

    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "locked").mkdir()
    output, backbone = str(tmp_path / "m.pt"), None
    if where == "read-only folder":
        output = str(tmp_path / "locked" / "m.pt")
        refuse_writes_in(monkeypatch, tmp_path / "locked")
        expected = (f"cannot write the TorchScript file {output}: Permission denied (in the folder "
                    f"{tmp_path / 'locked'})")
    elif where == "under a file":
        output = str(tmp_path / "file.txt" / "m.pt")
        expected = f"cannot write the TorchScript file {output}: {tmp_path / 'file.txt'} is a file, not a folder"
    else:
        backbone = str(tmp_path / "file.txt" / "b.pt2")
        expected = f"cannot write the backbone program {backbone}: {tmp_path / 'file.txt'} is a file, not a folder"

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr("overlap_sampler.engine.checkpoint.load_checkpoint", never)
    monkeypatch.setattr(torch.jit, "script", never)
    argv = ["export", "--checkpoint", checkpoint_and_data[0], "--output", output, "--image-size", "64"]
    assert cli_main(argv + (["--backbone-output", backbone] if backbone else [])) == 2
    assert capsys.readouterr().err == f"overlap-sampler export: error: {expected}\n"
    assert not os.path.exists(tmp_path / "m.pt")


def test_categories_of_older_checkpoints_and_files_without_them(tmp_path):
    from overlap_sampler.engine.checkpoint import categories_of

    # Checkpoints from before category_names: the id stands in for the name.
    assert categories_of({"category_ids": [5, 10]}) == [{"label": 1, "category_id": 5, "name": "5"},
                                                        {"label": 2, "category_id": 10, "name": "10"}]
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(tmp_path / "plain.pt"))
    with pytest.raises(ValueError, match="has no categories.json"):
        load_categories(str(tmp_path / "plain.pt"))
    (tmp_path / "text.pt").write_text("not an archive")
    with pytest.raises(ValueError, match="is not a TorchScript archive"):
        load_categories(str(tmp_path / "text.pt"))


def test_evaluate_checkpoint(checkpoint_and_data, tmp_path, capsys):
    from overlap_sampler.engine.evaluate import evaluate_checkpoint

    checkpoint, image_dir, annotations = checkpoint_and_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = evaluate_checkpoint(checkpoint, dataset=None, val_images=image_dir,
                                      val_annotations=annotations, output_dir=str(tmp_path),
                                      device="cpu", batch_size=2, progress=False)
    assert set(metrics) == {"bbox", "segm"}  # a Mask R-CNN checkpoint
    # Named after the checkpoint: training's eval.json is never overwritten.
    name = f"eval_{Path(checkpoint).stem}.json"
    assert json.loads((tmp_path / name).read_text()) == metrics
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["type", "AP"] and name in out
    with pytest.raises(ValueError, match="val_images and val_annotations are both needed"):
        evaluate_checkpoint(checkpoint, dataset=None, val_images=image_dir)
    with pytest.raises(ValueError, match="dataset must be 'checkpoint', 'synthetic' or None"):
        evaluate_checkpoint(checkpoint, dataset="coco")
    with pytest.raises(ValueError, match="give either dataset='checkpoint' or val_images"):
        evaluate_checkpoint(checkpoint, val_images=image_dir, val_annotations=annotations)

    # By default, the validation set of the checkpoint's own run (its config holds the COCO paths).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = evaluate_checkpoint(checkpoint, output_dir=str(tmp_path / "default"), device="cpu",
                                      batch_size=3, progress=False)
    assert default.keys() == metrics.keys()
    for iou_type in metrics:  # batched arithmetic may round differently
        assert default[iou_type] == pytest.approx(metrics[iou_type], abs=1e-3)


def test_evaluate_checkpoint_never_writes_over_its_inputs_and_checks_its_folder_first(checkpoint_and_data, tmp_path,
                                                                                      monkeypatch, capsys):
    from overlap_sampler.engine.evaluate import evaluate_checkpoint

    checkpoint, image_dir, annotations = checkpoint_and_data

    def never(*args, **kwargs):
        raise AssertionError("evaluated before the output was checked")

    monkeypatch.setattr("overlap_sampler.engine.evaluate.evaluate", never)
    named = tmp_path / f"eval_{Path(checkpoint).stem}.json"  # the name of the metrics file it would write
    named.write_bytes(Path(annotations).read_bytes())
    with pytest.raises(ValueError, match=f"writing the metrics file {named} would overwrite the annotation file "
                                         f"{named}, which this command reads: give another output folder"):
        evaluate_checkpoint(checkpoint, dataset=None, val_images=image_dir, val_annotations=str(named),
                            output_dir=str(tmp_path), device="cpu", progress=False)
    assert named.read_bytes() == Path(annotations).read_bytes()
    (tmp_path / "file.txt").write_text("a file")
    out = tmp_path / "file.txt" / "eval"
    assert cli_main(["eval", "--checkpoint", checkpoint, "--output-dir", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"overlap-sampler eval: error: cannot write the metrics file "
                                       f"{out / named.name}: {tmp_path / 'file.txt'} is a file, "
                                       "not a folder\n")


def test_evaluate_an_exported_model(checkpoint_and_data, tmp_path):
    from overlap_sampler.engine.evaluate import evaluate_checkpoint

    checkpoint, image_dir, annotations = checkpoint_and_data
    exported = export_checkpoint(checkpoint, str(tmp_path / "model.pt"), example_image_size=64)
    results = []
    for model in (checkpoint, exported):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(evaluate_checkpoint(model, dataset=None, val_images=image_dir, val_annotations=annotations,
                                               output_dir=str(tmp_path), device="cpu", progress=False))
        assert not [w for w in caught if "RCNN always returns" in str(w.message)]
    assert results[1].keys() == results[0].keys() == {"bbox", "segm"}
    for kind in results[0]:
        assert results[1][kind] == pytest.approx(results[0][kind], abs=1e-3)
    assert (tmp_path / "eval_model.json").is_file()
    with pytest.raises(ValueError, match="exported TorchScript model: it holds no run, so no validation set"):
        evaluate_checkpoint(exported, progress=False)
    # Another test NMS threshold: the scripted head's attribute is set as the eager one's, same AP.
    at_03 = [evaluate_checkpoint(model, dataset=None, val_images=image_dir, val_annotations=annotations,
                                 output_dir=str(tmp_path), device="cpu", progress=False, box_nms_thresh=0.3)
             for model in (checkpoint, exported)]
    assert at_03[1]["bbox"] == pytest.approx(at_03[0]["bbox"], abs=1e-3)
    assert (tmp_path / "eval_model_nms0.3.json").is_file()
    assert (tmp_path / f"eval_{Path(checkpoint).stem}_nms0.3.json").is_file()


def test_evaluate_checkpoint_reads_the_synthetic_data_where_the_run_did(tmp_path, monkeypatch):
    import overlap_sampler.data as data
    from overlap_sampler.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from overlap_sampler.engine.config import TrainConfig
    from overlap_sampler.engine.evaluate import evaluate_checkpoint

    config = TrainConfig(data_root=str(tmp_path / "cache"), min_size=64, max_size=64)
    model = build_detector("fasterrcnn", 4, backbone="small", min_size=64, max_size=64, sampler=config.sampler)
    path = save_checkpoint({"format": CHECKPOINT_FORMAT, "iteration": 1, "model": model.state_dict(),
                            "config": config.to_dict(), "num_classes": 4, "category_ids": [1, 2, 3]},
                           str(tmp_path / "run"))
    roots = []

    class Stop(Exception):
        pass

    def recording_synthetic_dataset(split, root=None):
        roots.append(root)
        raise Stop

    monkeypatch.setattr(data, "synthetic_dataset", recording_synthetic_dataset)
    for dataset in ("synthetic", "checkpoint"):
        with pytest.raises(Stop):
            evaluate_checkpoint(path, dataset=dataset, device="cpu", progress=False)
    assert roots == [str(tmp_path / "cache")] * 2


def test_export_checks_every_reloaded_run(tmp_path):
    class SecondRunDiffers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            self.calls += 1
            boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0]]) + float(self.calls > 1)
            return [{"boxes": boxes} for _ in images]

    with pytest.raises(RuntimeError, match="run 2"):
        export_torchscript(SecondRunDiffers(), str(tmp_path / "m.pt"), example_images(32, count=1))


def test_evaluate_checkpoint_rejects_other_categories(checkpoint_and_data, tmp_path):
    from overlap_sampler.engine.evaluate import evaluate_checkpoint

    checkpoint, image_dir, annotations = checkpoint_and_data
    data = json.loads(Path(annotations).read_text())
    for category in data["categories"]:
        category["id"] += 100
    for annotation in data["annotations"]:
        annotation["category_id"] += 100
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="differ from the categories"):
        evaluate_checkpoint(checkpoint, dataset=None, val_images=image_dir,
                            val_annotations=str(other), progress=False)
