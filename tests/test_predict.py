"""`predict`: a checkpoint's detections on image files, against the model run directly."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from overlap_sampler.cli import main as cli_main
from overlap_sampler.detection import build_detector
from overlap_sampler.engine.predict import PALETTE, draw_detections, find_images, predict_checkpoint

# pycocotools' decode warns under numpy 2 (its own array wrapper); the values are right.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:__array__ implementation:DeprecationWarning")
pycocotools_mask = pytest.importorskip("pycocotools.mask")  # not installed on the lent GPU machines

CATEGORIES = [{"label": 1, "category_id": 7, "name": "cat"}, {"label": 2, "category_id": 9, "name": "dog"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An (untrained) small Mask R-CNN checkpoint of 2 categories with ids 7 and 9."""
    from overlap_sampler.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from overlap_sampler.engine.config import TrainConfig

    config = TrainConfig(arch="maskrcnn", min_size=64, max_size=96)
    torch.manual_seed(0)
    model = build_detector("maskrcnn", 3, backbone="small", min_size=64, max_size=96)
    return save_checkpoint({"format": CHECKPOINT_FORMAT, "iteration": 1, "model": model.state_dict(),
                            "config": config.to_dict(), "num_classes": 3, "category_ids": [7, 9],
                            "category_names": ["cat", "dog"]}, str(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four image files: RGB of two sizes, a grey one and an RGBA one (a folder with a sub-folder)."""
    root = tmp_path_factory.mktemp("images")
    os.makedirs(root / "sub")
    rng = np.random.default_rng(0)
    files = {"a.png": (64, 80, "RGB"), "b.jpg": (64, 80, "RGB"), "sub/c.png": (72, 64, "L"),
             "sub/d.png": (64, 80, "RGBA")}
    for name, (height, width, mode) in files.items():
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height // 8, width // 8, channels), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(root / name)
    return root


def _direct(checkpoint, path, score_thresh):
    """The checkpoint's model on one file, read without the package's image reader."""
    from overlap_sampler.engine.checkpoint import load_model_from_checkpoint

    model, _ = load_model_from_checkpoint(checkpoint)
    with Image.open(path) as im:
        image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        out = model([image])[0]
    keep = out["scores"] >= score_thresh
    return {k: v[keep] for k, v in out.items()}


def test_predictions_equal_the_model_run_directly(checkpoint, images, tmp_path, capsys):
    path = predict_checkpoint(checkpoint, [str(images)], output_dir=str(tmp_path / "out"), score_thresh=0.2,
                              device="cpu", progress=False)
    assert path == str(tmp_path / "out" / "predictions.json")
    result = json.loads(open(path).read())
    assert result["categories"] == CATEGORIES and result["score_thresh"] == 0.2
    names = [os.path.relpath(r["file"], images) for r in result["images"]]
    assert names == ["a.png", "b.jpg", "sub/c.png", "sub/d.png"]  # sorted, recursive
    total = 0
    for record in result["images"]:
        expected = _direct(checkpoint, record["file"], 0.2)
        found = record["detections"]
        total += len(found)
        assert (record["height"], record["width"]) == Image.open(record["file"]).size[::-1]
        assert len(found) == len(expected["scores"])
        for detection, box, score, label, mask in zip(found, expected["boxes"], expected["scores"],
                                                      expected["labels"], expected["masks"]):
            x1, y1, x2, y2 = box.tolist()
            assert detection["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-4)
            assert detection["score"] == pytest.approx(score.item(), abs=1e-6)
            category = CATEGORIES[label - 1]
            assert (detection["category_id"], detection["category"]) == (category["category_id"], category["name"])
            decoded = pycocotools_mask.decode({**detection["segmentation"],
                                               "counts": detection["segmentation"]["counts"].encode()})
            assert np.array_equal(decoded.astype(bool), (mask[0] > 0.5).numpy())
        drawn = Image.open(tmp_path / "out" / record["drawn"])
        assert drawn.size == (record["width"], record["height"]) and drawn.mode == "RGB"
    assert total > 0  # a non-vacuous comparison
    assert f"{total} detections (score >= 0.2) in 4 images" in capsys.readouterr().out


def test_batches_of_one_size_give_the_same_predictions(checkpoint, images, tmp_path):
    runs = []
    for batch_size in (1, 3):
        path = predict_checkpoint(checkpoint, [str(images)], output_dir=str(tmp_path / f"b{batch_size}"),
                                  score_thresh=0.2, device="cpu", batch_size=batch_size, draw=False,
                                  progress=False)
        runs.append(json.loads(open(path).read())["images"])
    assert [r["file"] for r in runs[0]] == [r["file"] for r in runs[1]]  # the order given, not the batches'
    for one, batched in zip(*runs):
        assert "drawn" not in one and len(one["detections"]) == len(batched["detections"])
        # Batched convolutions round differently: two detections of nearly equal score may swap places,
        # so each detection must have its own equal in the other run, in any order.
        unmatched = list(batched["detections"])
        for a in one["detections"]:
            twin = next((b for b in unmatched if b["category_id"] == a["category_id"]
                         and b["bbox"] == pytest.approx(a["bbox"], abs=1e-3)
                         and b["score"] == pytest.approx(a["score"], abs=1e-4)), None)
            assert twin is not None, f"{a} has no equal among the batched run's {unmatched}"
            unmatched.remove(twin)


def test_an_exported_model_predicts_as_its_checkpoint(checkpoint, images, tmp_path):
    from overlap_sampler.engine.export import export_checkpoint

    exported = export_checkpoint(checkpoint, str(tmp_path / "model.pt"), example_image_size=64)
    results = []
    for k, model in enumerate((checkpoint, exported)):
        path = predict_checkpoint(model, [str(images / "sub")], output_dir=str(tmp_path / f"out{k}"),
                                  score_thresh=0.2, device="cpu", draw=False, progress=False)
        results.append(json.loads(open(path).read()))
    assert results[1]["categories"] == results[0]["categories"] == CATEGORIES
    detections = [[d for image in r["images"] for d in image["detections"]] for r in results]
    assert len(detections[0]) == len(detections[1]) > 0
    for a, b in zip(*detections):
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["category"] == b["category"]
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(plain))
    with pytest.raises(ValueError, match="has no categories.json"):
        predict_checkpoint(str(plain), [str(images)], output_dir=str(tmp_path / "plain"), progress=False)


def test_find_images(tmp_path, monkeypatch):
    (tmp_path / "x").mkdir()
    for name in ("x/B.PNG", "x/a.jpeg", "x/notes.txt", "y.webp"):
        (tmp_path / name).write_bytes(b"")
    folder, single = str(tmp_path / "x"), str(tmp_path / "y.webp")
    assert find_images([single, folder, os.path.join(folder, "a.jpeg")]) == [
        single, os.path.join(folder, "B.PNG"), os.path.join(folder, "a.jpeg")]  # each once, first order
    # Absolute paths, one per file however it is spelled; linked folders followed, a cycle once.
    os.symlink(folder, tmp_path / "x" / "loop")
    os.symlink(folder, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    assert find_images(["./x/a.jpeg", "x/../x", "link"]) == [os.path.join(folder, "a.jpeg"),
                                                              os.path.join(folder, "B.PNG")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files .* in folder .*empty"):
        find_images([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="'nope.png' is neither an image file nor a folder"):
        find_images(["nope.png"])


def test_drawn_boxes_and_masks():
    image = torch.zeros(3, 40, 50)
    masks = torch.zeros(1, 1, 40, 50)
    masks[0, 0, 10:20, 10:20] = 0.9
    detections = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 25.0]]), "scores": torch.tensor([0.8]),
                  "labels": torch.tensor([2]), "masks": masks}
    drawn = draw_detections(image, detections, CATEGORIES)
    color = torch.tensor([int(PALETTE[1][i:i + 2], 16) for i in (1, 3, 5)], dtype=torch.uint8)
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, 40, 50)
    assert torch.equal(drawn[:, 15, 5], color)  # the box's left edge in label 2's colour
    assert drawn[:, 15, 15].sum() > 0 and torch.equal(drawn[:, 35, 45], torch.zeros(3, dtype=torch.uint8))
    empty = {k: v[:0] for k, v in detections.items()}
    assert torch.equal(draw_detections(torch.full((3, 4, 4), 0.5), empty, CATEGORIES),
                       torch.full((3, 4, 4), 128, dtype=torch.uint8))


@pytest.mark.parametrize("batch_size", [1, 2])
def test_unreadable_files_are_reported_and_the_others_go_on(checkpoint, images, tmp_path, batch_size, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.png").write_bytes((images / "a.png").read_bytes())
    (folder / "b.png").write_text("not an image")  # e.g. a truncated download or macOS's ._ files
    Image.fromarray(np.full((64, 80), 0.5, dtype=np.float32), "F").save(folder / "c.tif")  # no known range
    wide = np.random.default_rng(1).integers(0, 65536, (64, 80), dtype=np.uint16)
    Image.fromarray(wide).save(folder / "d.png")  # 16-bit grey: scaled by 65535
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = predict_checkpoint(checkpoint, [str(folder)], output_dir=str(tmp_path / "out"), score_thresh=0.2,
                                  device="cpu", batch_size=batch_size, progress=False)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and "b.png: cannot read image (cannot identify image file" in messages[0]
    assert "c.tif: cannot read image (floating-point pixels" in messages[1]
    records = json.loads(open(path).read())["images"]
    assert [os.path.basename(r["file"]) for r in records] == ["a.png", "b.png", "c.tif", "d.png"]
    assert "error" in records[1] and "error" in records[2] and "detections" not in records[1]
    expected = _direct(checkpoint, str(folder / "a.png"), 0.2)["scores"]
    assert [d["score"] for d in records[0]["detections"]] == pytest.approx(expected.tolist(), abs=1e-6)
    assert records[3]["width"] == 80 and "detections" in records[3]
    assert "in 2 images (2 unreadable files skipped)" in capsys.readouterr().out


def test_inputs_are_never_overwritten(checkpoint, images, tmp_path):
    folder = tmp_path / "in"
    (folder / "drawn").mkdir(parents=True)
    for name in ("a.png", "drawn/a.png"):  # a drawn image of an earlier run with the same output folder
        (folder / name).write_bytes((images / "a.png").read_bytes())
    before = {name: (folder / name).read_bytes() for name in ("a.png", "drawn/a.png")}
    with pytest.raises(ValueError, match=r"would overwrite the input image .*drawn/a.png"):
        predict_checkpoint(checkpoint, [str(folder)], output_dir=str(folder), progress=False)
    assert {name: (folder / name).read_bytes() for name in before} == before
    # Without the earlier run's output, the input folder can hold the output: drawn images go to drawn/.
    (folder / "drawn" / "a.png").unlink()
    predict_checkpoint(checkpoint, [str(folder / "a.png")], output_dir=str(folder), device="cpu", progress=False)
    assert (folder / "a.png").read_bytes() == before["a.png"] and (folder / "drawn" / "a.png").is_file()


def test_no_readable_image_is_an_error(checkpoint, tmp_path, capsys):
    """Some unreadable files are warnings (see above); all of them is a failed command."""
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_text("not an image")
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F").save(folder / "b.tif")
    out = tmp_path / "out"
    assert cli_main(["predict", "--checkpoint", checkpoint, str(folder), "--output-dir", str(out), "--device", "cpu",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"overlap-sampler predict: error: none of the 2 files given could be read as an image (the first: "
                   f"{folder / 'a.png'}: cannot read image (cannot identify image file '{folder / 'a.png'}')): no "
                   "predictions written")
    assert not (out / "predictions.json").exists()


def test_outputs_are_checked_before_the_model_is_loaded(checkpoint, images, tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr("overlap_sampler.engine.predict.load_detector", never)
    (tmp_path / "file.txt").write_text("a file")
    assert cli_main(["predict", "--checkpoint", checkpoint, str(images / "a.png"), "--output-dir",
                     str(tmp_path / "file.txt" / "out"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"overlap-sampler predict: error: cannot write the output folder "
                                       f"{tmp_path / 'file.txt' / 'out'}: {tmp_path / 'file.txt'} is a file, not a "
                                       "folder\n")
    # A checkpoint named like the JSON it would write (its folder as the output folder) is kept too.
    named = tmp_path / "run" / "predictions.json"
    named.parent.mkdir()
    named.write_bytes(open(checkpoint, "rb").read())
    with pytest.raises(ValueError, match=f"writing the predictions file {named} would overwrite the checkpoint "
                                         f"{named}, which this command reads: choose another output folder"):
        predict_checkpoint(str(named), [str(images / "a.png")], output_dir=str(named.parent), device="cpu")


def test_bad_inputs_are_clear_errors(checkpoint, images, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"score_thresh must be in \[0, 1\], got 1.5"):
        predict_checkpoint(checkpoint, [str(images)], score_thresh=1.5)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        predict_checkpoint(checkpoint, [str(images)], output_dir=str(tmp_path / "out"), batch_size=0)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*none.pth"):
        predict_checkpoint(str(tmp_path / "none.pth"), [str(images)])
    # The command line reports them without a traceback.
    assert cli_main(["predict", "--checkpoint", checkpoint, str(tmp_path / "missing")]) == 2
    assert "overlap-sampler predict: error: " in capsys.readouterr().err
    assert cli_main(["predict", "--checkpoint", checkpoint, str(images / "a.png"), "--no-draw", "--no-progress",
                     "--output-dir", str(tmp_path / "cli"), "--device", "cpu"]) == 0
    assert os.listdir(tmp_path / "cli") == ["predictions.json"]
