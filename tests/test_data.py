"""Tests of overlap_sampler.data: the COCO loader (validation, boxes, labels, masks) and the
synthetic crowded-shapes generator (valid COCO, deterministic, idempotent, safe under concurrency)."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.ops import box_iou

from overlap_sampler.data import (
    MIN_BOX_SIDE,
    CocoDetection,
    DatasetError,
    collate,
    compressed_rle_counts,
    decode_rle,
    make_synthetic_coco,
    synthetic,
    synthetic_dataset,
)

SIZE = 64  # synthetic image side in these tests


@pytest.fixture(scope="module")
def synthetic_coco(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_coco(str(root), num_images=8, image_size=SIZE, seed=3, split="train")


def load_coco(annotation_file: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(annotation_file)


def tree_bytes(folder: str) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> contents)."""
    root = pathlib.Path(folder)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- synthetic data


def test_synthetic_is_valid_coco_and_boxes_are_the_boxes_of_the_masks(synthetic_coco):
    image_dir, annotation_file = synthetic_coco
    with open(annotation_file) as f:
        data = json.load(f)
    assert {"info", "images", "annotations", "categories"} <= set(data)
    coco = load_coco(annotation_file)
    assert sorted(coco.getCatIds()) == [1, 2, 3]
    assert len(coco.imgs) == 8
    kinds = set()
    for ann in coco.anns.values():
        seg = ann["segmentation"]
        kinds.add("polygon" if isinstance(seg, list) else "rle")
        if isinstance(seg, dict):
            assert isinstance(seg["counts"], str)  # compressed, json-ready
        rle = coco.annToRLE(ann)
        mask = decode_rle(rle)
        ys, xs = np.nonzero(mask)
        box = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert ann["bbox"] == [float(v) for v in box], ann["id"]
        assert ann["area"] == mask.sum() >= 30
        assert ann["iscrowd"] == 0
    assert kinds == {"polygon", "rle"}  # both mask paths of the loader are exercised

    for img in coco.imgs.values():
        with Image.open(os.path.join(image_dir, img["file_name"])) as im:
            assert im.mode == "RGB" and im.size == (SIZE, SIZE)
        assert 3 <= len(coco.imgToAnns[img["id"]]) <= 10


def test_synthetic_scenes_are_crowded(synthetic_coco):
    dataset = CocoDetection(*synthetic_coco)
    overlapping = 0
    for i in range(len(dataset)):
        boxes = dataset[i][1]["boxes"]
        iou = box_iou(boxes, boxes).triu(diagonal=1)
        overlapping += int((iou > 0.1).sum())
    assert overlapping >= 2 * len(dataset)  # several overlapping pairs per image on average


def test_synthetic_is_deterministic(tmp_path):
    a = make_synthetic_coco(str(tmp_path / "a"), num_images=3, image_size=SIZE, seed=5, split="val")
    b = make_synthetic_coco(str(tmp_path / "b"), num_images=3, image_size=SIZE, seed=5, split="val")
    assert tree_bytes(str(tmp_path / "a")) == tree_bytes(str(tmp_path / "b"))
    assert pathlib.Path(a[1]).read_bytes() == pathlib.Path(b[1]).read_bytes()
    # The seed and the split both change the data.
    other_seed = make_synthetic_coco(str(tmp_path / "c"), num_images=3, image_size=SIZE, seed=6, split="val")
    other_split = make_synthetic_coco(str(tmp_path / "d"), num_images=3, image_size=SIZE, seed=5, split="x")
    first_image = pathlib.Path(a[0], "000001.png").read_bytes()
    assert pathlib.Path(other_seed[0], "000001.png").read_bytes() != first_image
    assert pathlib.Path(other_split[0], "000001.png").read_bytes() != first_image


def test_synthetic_is_reused_and_regenerated_when_incomplete_or_different(tmp_path, monkeypatch):
    root = str(tmp_path)
    image_dir, annotation_file = make_synthetic_coco(root, num_images=2, image_size=SIZE)
    before = tree_bytes(os.path.join(root, "train"))

    def no_generation(*args, **kwargs):
        raise AssertionError("a complete dataset was generated again")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "_generate", no_generation)
        assert make_synthetic_coco(root, num_images=2, image_size=SIZE) == (image_dir, annotation_file)

    # A folder without the marker (written last) is partial: regenerated, same bytes.
    os.remove(os.path.join(root, "train", "COMPLETE"))
    os.remove(os.path.join(image_dir, "000002.png"))
    make_synthetic_coco(root, num_images=2, image_size=SIZE)
    assert tree_bytes(os.path.join(root, "train")) == before

    # Other arguments: replaced.
    make_synthetic_coco(root, num_images=3, image_size=SIZE)
    assert len(load_coco(annotation_file).imgs) == 3
    assert sorted(os.listdir(root)) == [".train.lock", "train"]  # no temporary folders left


def test_leftovers_of_crashed_runs_are_removed_once_old(tmp_path):
    stale, recent = tmp_path / ".train.tmp-crashed", tmp_path / ".train.tmp-running-elsewhere"
    for folder in (stale, recent):
        (folder / "images").mkdir(parents=True)
    two_hours_ago = os.path.getmtime(stale) - 7200
    for path in (stale, stale / "images"):
        os.utime(path, (two_hours_ago, two_hours_ago))
    make_synthetic_coco(str(tmp_path), num_images=1, image_size=SIZE)
    assert not stale.exists() and recent.exists()


def _generate_in_child(root: str, barrier, locked: bool) -> None:
    if not locked:  # both processes generate and race on the final rename
        synthetic._lock = lambda path: contextlib.nullcontext(False)
    barrier.wait()
    make_synthetic_coco(root, num_images=4, image_size=SIZE, seed=1)


@pytest.mark.parametrize("locked", [True, False], ids=["file-lock", "rename-race"])
def test_concurrent_generation_gives_one_valid_dataset(tmp_path, locked):
    ctx = multiprocessing.get_context("fork")
    root = str(tmp_path / "shared")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_generate_in_child, args=(root, barrier, locked)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]

    reference = make_synthetic_coco(str(tmp_path / "ref"), num_images=4, image_size=SIZE, seed=1)
    assert tree_bytes(os.path.join(root, "train")) == tree_bytes(os.path.dirname(reference[1]))
    assert [n for n in os.listdir(root) if n != ".train.lock"] == ["train"]
    assert len(CocoDetection(*make_synthetic_coco(root, num_images=4, image_size=SIZE, seed=1))) == 4


def test_synthetic_dataset_uses_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(synthetic.SYNTHETIC_NUM_IMAGES, "val", 2)  # keep the test fast
    monkeypatch.setenv("OVERLAP_SAMPLER_CACHE", str(tmp_path / "cache"))
    image_dir, annotation_file = synthetic_dataset("val")
    assert annotation_file == str(tmp_path / "cache" / synthetic.SYNTHETIC_VERSION / "val" / "instances.json")
    dataset = CocoDetection(image_dir, annotation_file)
    assert len(dataset) == 2 and dataset.num_classes == 4
    assert dataset[0][0].shape == (3, synthetic.SYNTHETIC_IMAGE_SIZE, synthetic.SYNTHETIC_IMAGE_SIZE)
    explicit = synthetic_dataset("val", root=str(tmp_path / "elsewhere"))
    assert explicit[1].startswith(str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="split must be one of"):
        synthetic_dataset("tain")


@pytest.mark.parametrize("kwargs, match", [
    ({"num_images": 0}, "num_images"),
    ({"num_images": 2, "image_size": 8}, "image_size"),
    ({"num_images": 2, "seed": -1}, "seed"),
    ({"num_images": 2, "split": "../x"}, "split"),
])
def test_make_synthetic_coco_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_coco(str(tmp_path), **kwargs)


# ---------------------------------------------------------------- loader on synthetic data


def test_loader_outputs(synthetic_coco):
    dataset = CocoDetection(*synthetic_coco, masks=True)
    assert dataset.num_classes == 4 and dataset.category_ids == [1, 2, 3]
    assert dataset.image_ids == list(range(1, 9))
    for i in range(len(dataset)):
        image, target = dataset[i]
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE)
        assert 0.0 <= image.min() and image.max() <= 1.0
        n = len(target["labels"])
        assert n >= 3
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
        assert target["labels"].dtype == torch.int64 and set(target["labels"].tolist()) <= {1, 2, 3}
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n, SIZE, SIZE)
        assert target["image_id"].dtype == torch.int64 and target["image_id"].dim() == 0
        assert int(target["image_id"]) == dataset.image_ids[i]
        assert target["area"].dtype == torch.float32 and target["area"].shape == (n,)
        assert target["iscrowd"].dtype == torch.int64 and not target["iscrowd"].any()
        # Each box is the box of its mask (x1 y1 x2 y2, pixel edges); area is the mask's.
        for box, mask, area in zip(target["boxes"], target["masks"], target["area"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            expected = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert torch.equal(box, expected)
            assert area == mask.sum()
        # The mask is where the object's pixels are: one colour (up to the noise) inside it.
        pixels = image[:, target["masks"][-1].bool()]
        assert float(pixels.std(dim=1).max()) < 0.06


def test_collate_with_a_dataloader(synthetic_coco):
    loader = torch.utils.data.DataLoader(CocoDetection(*synthetic_coco), batch_size=3, collate_fn=collate)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list)
    assert len(images) == len(targets) == 3
    assert [int(t["image_id"]) for t in targets] == [1, 2, 3]


# ---------------------------------------------------------------- hand-made COCO file

W, H = 6, 5


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE, written independently of pycocotools: column-major runs, zeros first."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def pixels(*coords: tuple[int, int]) -> np.ndarray:
    """A [H, W] uint8 mask with ones at the (row, col) ``coords``."""
    mask = np.zeros((H, W), dtype=np.uint8)
    for r, c in coords:
        mask[r, c] = 1
    return mask


POLYGON_MASK = pixels(*[(r, c) for r in (1, 2) for c in (1, 2, 3)])  # polygon corners (1,1)-(4,3)
UNCOMPRESSED_MASK = pixels((0, 4), (0, 5), (1, 5), (2, 5))
COMPRESSED_MASK = pixels((3, 0), (4, 0), (4, 1), (3, 2))


def write_tiny_coco(folder: pathlib.Path, mutate=None) -> tuple[str, str]:
    """Two images (6x5 with annotations, 8x6 without) and annotations of every kind."""
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(image_dir / "a.png")
    Image.fromarray(rng.integers(0, 256, (6, 8), dtype=np.uint8)).save(image_dir / "b.png")  # grey
    compressed = mask_utils.encode(np.asfortranarray(COMPRESSED_MASK))
    data = {
        "images": [{"id": 9, "file_name": "b.png", "width": 8, "height": 6},
                   {"id": 4, "file_name": "a.png", "width": W, "height": H}],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
        "annotations": [
            {"id": 10, "image_id": 4, "category_id": 7, "bbox": [1, 1, 3, 2], "area": 6, "iscrowd": 0,
             "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]]},
            {"id": 11, "image_id": 4, "category_id": 3, "bbox": [4, 0, 2, 3], "area": 4, "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": rle_counts(UNCOMPRESSED_MASK)}},
            {"id": 12, "image_id": 4, "category_id": 7, "bbox": [0, 3, 3, 2], "area": 4, "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": compressed["counts"].decode("ascii")}},
            # Crowd: stays in .coco for evaluation, left out of the targets.
            {"id": 13, "image_id": 4, "category_id": 3, "bbox": [0, 0, 6, 5], "area": 30, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": [0, 30]}},
            # Zero width: left out of the targets.
            {"id": 14, "image_id": 4, "category_id": 3, "bbox": [2, 2, 0, 1], "area": 0, "iscrowd": 0,
             "segmentation": [[2, 2, 2, 3, 2, 3]]},
        ],
    }
    if mutate is not None:
        mutate(data)
    annotation_file = folder / "instances.json"
    annotation_file.write_text(json.dumps(data))
    return str(image_dir), str(annotation_file)


def test_hand_made_file_boxes_labels_and_masks(tmp_path):
    image_dir, annotation_file = write_tiny_coco(tmp_path)
    dataset = CocoDetection(image_dir, annotation_file, masks=True)
    assert dataset.category_ids == [3, 7] and dataset.num_classes == 3  # label 1 = cat 3, 2 = cat 7
    assert dataset.image_ids == [4, 9]
    assert len(dataset.coco.anns) == 5  # crowd and empty boxes remain for evaluation

    image, target = dataset[0]
    expected_pixels = np.asarray(Image.open(os.path.join(image_dir, "a.png")), dtype=np.float32) / 255
    torch.testing.assert_close(image, torch.from_numpy(expected_pixels).permute(2, 0, 1))
    assert int(target["image_id"]) == 4
    assert target["labels"].tolist() == [2, 1, 2]
    assert target["boxes"].tolist() == [[1, 1, 4, 3], [4, 0, 6, 3], [0, 3, 3, 5]]
    assert target["area"].tolist() == [6, 4, 4]
    assert target["iscrowd"].tolist() == [0, 0, 0]
    masks = target["masks"].numpy()
    np.testing.assert_array_equal(masks[0], POLYGON_MASK)
    np.testing.assert_array_equal(masks[1], UNCOMPRESSED_MASK)
    np.testing.assert_array_equal(masks[2], COMPRESSED_MASK)

    # The image without annotations: empty targets of the right shapes; grey PNG read as RGB.
    image, target = dataset[1]
    assert image.shape == (3, 6, 8) and torch.equal(image[0], image[2])
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 6, 8) and target["masks"].dtype == torch.uint8


def test_crowd_annotations_are_dropped(tmp_path):
    def only_crowds(data):
        for ann in data["annotations"]:
            ann["iscrowd"] = 1

    dataset = CocoDetection(*write_tiny_coco(tmp_path, only_crowds))
    target = dataset[0][1]
    assert target["boxes"].shape == (0, 4) and target["labels"].numel() == 0
    assert len(dataset.coco.getAnnIds(iscrowd=True)) == 5


def test_boxes_slightly_outside_are_clipped_and_missing_fields_filled(tmp_path):
    def edit(data):
        ann = data["annotations"][0]
        ann["bbox"] = [-0.5, 4.5, 3, 1]  # half a pixel outside at the left and the bottom
        del ann["area"], ann["iscrowd"]

    dataset = CocoDetection(*write_tiny_coco(tmp_path, edit))
    assert dataset[0][1]["boxes"][0].tolist() == [0, 4.5, 2.5, 5]
    assert dataset.coco.anns[10]["area"] == 3 and dataset.coco.anns[10]["iscrowd"] == 0


def _set(path, value):
    """A mutation setting data[path[0]][path[1]]... = value (``None`` deletes the key)."""
    def mutate(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        if value is None:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


def _replace_file(text):
    def mutate(data):
        raise _Replace(text)
    return mutate


class _Replace(Exception):
    pass


ANN = ["annotations", 1]  # annotation id 11 of image id 4 (6 x 5)

MALFORMED = {
    "not-json": (_replace_file("{'images': []"), ["not a readable JSON"]),
    "not-an-object": (_replace_file("[1, 2]"), ["expected a JSON object"]),
    "no-images": (_set(["images"], None), ["missing top-level key 'images'"]),
    "no-annotations": (_set(["annotations"], None), ["missing top-level key 'annotations'"]),
    "no-categories": (_set(["categories"], None), ["missing top-level key 'categories'"]),
    "images-not-a-list": (_set(["images"], {"id": 4}), ["'images' must be a list"]),
    "image-without-id": (_set(["images", 1, "id"], None), ["images[1]", "'id'"]),
    "image-bad-width": (_set(["images", 1, "width"], "6"), ["image id 4", "'width'"]),
    "image-duplicate-id": (_set(["images", 0, "id"], 4), ["image id 4", "duplicate"]),
    "annotation-unknown-image": (_set([*ANN, "image_id"], 99), ["annotation id 11", "'image_id' 99"]),
    "annotation-unknown-category": (_set([*ANN, "category_id"], 42), ["annotation id 11", "'category_id' 42"]),
    "annotation-duplicate-id": (_set([*ANN, "id"], 10), ["annotation id 10", "duplicate"]),
    "bbox-three-numbers": (_set([*ANN, "bbox"], [4, 0, 2]), ["annotation id 11", "'bbox'", "4 finite"]),
    "bbox-nan": (_set([*ANN, "bbox"], [4, float("nan"), 2, 3]), ["annotation id 11", "4 finite"]),
    "bbox-string": (_set([*ANN, "bbox"], [4, "0", 2, 3]), ["annotation id 11", "4 finite"]),
    "bbox-missing": (_set([*ANN, "bbox"], None), ["annotation id 11", "'bbox'"]),
    "bbox-negative-width": (_set([*ANN, "bbox"], [4, 0, -2, 3]), ["annotation id 11", "negative width"]),
    "bbox-outside-image": (_set([*ANN, "bbox"], [4, 0, 3.5, 3]),
                           ["annotation id 11", "[4, 0, 3.5, 3]", "image id 4 of width 6 and height 5"]),
    "iscrowd-not-0-or-1": (_set([*ANN, "iscrowd"], 2), ["annotation id 11", "'iscrowd'"]),
    "rle-wrong-size": (_set([*ANN, "segmentation", "size"], [W, H]), ["annotation id 11", "RLE size"]),
    "rle-wrong-counts": (_set([*ANN, "segmentation", "counts"], [3, 4]), ["annotation id 11", "summing to"]),
    "compressed-rle-too-short": (_set([*ANN, "segmentation", "counts"], "0"), ["annotation id 11", "cover 0 pixels"]),
    "compressed-rle-garbage": (_set([*ANN, "segmentation", "counts"], "~~~ not rle"),
                               ["annotation id 11", "not a valid RLE string"]),
    "compressed-rle-negative-run": (_set([*ANN, "segmentation", "counts"], "1O"),  # 'O' = -1 (sign bit)
                                    ["annotation id 11", "not a valid RLE string"]),
    # The full-cover encoding of UNCOMPRESSED_MASK, then 'P' (continuation bit set, no digit after it).
    "compressed-rle-unterminated": (
        _set([*ANN, "segmentation", "counts"],
             mask_utils.encode(np.asfortranarray(UNCOMPRESSED_MASK))["counts"].decode("ascii") + "P"),
        ["annotation id 11", "not a valid RLE string"]),
    "polygon-odd": (_set(["annotations", 0, "segmentation"], [[1, 1, 4, 1, 4]]), ["annotation id 10", "polygon 0"]),
    "segmentation-missing": (_set([*ANN, "segmentation"], None), ["annotation id 11", "'segmentation'"]),
    "image-file-missing": (_set(["images", 1, "file_name"], "nope.png"), ["image id 4", "nope.png", "not found"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_raise_dataset_error_naming_file_and_record(tmp_path, case):
    mutate, fragments = MALFORMED[case]
    try:
        image_dir, annotation_file = write_tiny_coco(tmp_path, mutate)
    except _Replace as replacement:
        image_dir, annotation_file = str(tmp_path / "images"), str(tmp_path / "instances.json")
        pathlib.Path(annotation_file).write_text(str(replacement))
    with pytest.raises(DatasetError) as info:
        CocoDetection(image_dir, annotation_file, masks=True)
    message = str(info.value)
    assert annotation_file in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(info.value, ValueError)


def test_image_size_mismatch_is_reported_up_front(tmp_path):
    image_dir, annotation_file = write_tiny_coco(tmp_path, _set(["images", 1, "width"], 7))
    with pytest.raises(DatasetError) as info:
        CocoDetection(image_dir, annotation_file)  # the header is read, not the pixels
    message = str(info.value)
    for fragment in [os.path.join(image_dir, "a.png"), "image id 4", annotation_file, "6x5", "7x5"]:
        assert fragment in message, (fragment, message)


def test_an_image_changed_after_the_check_is_reported_when_loading(tmp_path):
    image_dir, annotation_file = write_tiny_coco(tmp_path)
    dataset = CocoDetection(image_dir, annotation_file)
    Image.new("RGB", (7, 5)).save(os.path.join(image_dir, "a.png"))
    with pytest.raises(DatasetError, match="image id 4.*image is 7x5 .* says 6x5"):
        dataset[0]


def test_unreadable_image_is_reported(tmp_path):
    image_dir, annotation_file = write_tiny_coco(tmp_path)
    pathlib.Path(image_dir, "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="image id 4.*cannot read image"):
        CocoDetection(image_dir, annotation_file)
    # A truncated file has a readable header: it fails when its pixels are decoded.
    image_dir, annotation_file = write_tiny_coco(tmp_path / "truncated")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
        os.path.join(image_dir, "a.jpg"))
    data = pathlib.Path(image_dir, "a.jpg").read_bytes()
    pathlib.Path(image_dir, "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="image id 4.*cannot read image"):
        CocoDetection(image_dir, annotation_file)[0]


def test_floating_point_images_are_reported_up_front(tmp_path):
    """A mode F TIFF has a readable header of the right size; its pixels have no known range."""
    image_dir, annotation_file = write_tiny_coco(tmp_path, _set(["images", 1, "file_name"], "a.tif"))
    Image.fromarray(np.full((H, W), 0.5, dtype=np.float32), "F").save(os.path.join(image_dir, "a.tif"))
    with pytest.raises(DatasetError, match=r"a.tif \(image id 4 of .*instances.json\): cannot read image "
                                           r"\(floating-point pixels \(PIL mode 'F'\)"):
        CocoDetection(image_dir, annotation_file)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="annotation file not found"):
        CocoDetection(str(tmp_path), str(tmp_path / "missing.json"))


def test_compressed_rle_counts_match_pycocotools_encoding():
    # Random masks, all-zero and all-one masks, and runs long enough to need several characters.
    rng = np.random.default_rng(1)
    masks = [(rng.random((h, w)) < rng.random()).astype(np.uint8)
             for h, w in rng.integers(1, 40, (200, 2))]
    masks += [np.zeros((7, 3), np.uint8), np.ones((7, 3), np.uint8), np.zeros((1200, 900), np.uint8)]
    masks[-1][600:, 400:] = 1
    for mask in masks:
        encoded = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
        assert compressed_rle_counts(encoded) == rle_counts(mask)
    assert compressed_rle_counts("") == []
    assert compressed_rle_counts("1P") is None  # unterminated: 'P' says more characters follow
    assert compressed_rle_counts("1O") is None  # 'O' is -1: a negative run


def test_sub_pixel_boxes_are_kept_and_vanishing_ones_left_out(tmp_path):
    def edit(data):
        data["annotations"][0]["bbox"] = [1.0, 1.7, 0.6, 0.4]  # a real, tiny box: kept
        # Width 1e-6 at x = 5: in float32 x2 == x1, which torchvision's detector rejects mid-training.
        data["annotations"][1]["bbox"] = [5.0, 0.7, 1e-6, 0.4]
        data["annotations"][2]["bbox"] = [0.0, 3.0, 3.0, MIN_BOX_SIDE / 2]

    dataset = CocoDetection(*write_tiny_coco(tmp_path, edit))
    target = dataset[0][1]
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 1.7, 1.6, 2.1]]))
    assert target["labels"].tolist() == [2]


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    def use_16_bit(data):
        data["images"][0]["file_name"] = "b16.png"

    image_dir, annotation_file = write_tiny_coco(tmp_path, use_16_bit)
    values = np.random.default_rng(2).integers(0, 65536, (6, 8), dtype=np.uint16)
    Image.fromarray(values).save(os.path.join(image_dir, "b16.png"))
    assert Image.open(os.path.join(image_dir, "b16.png")).mode.startswith("I")
    image = CocoDetection(image_dir, annotation_file)[1][0]
    expected = torch.from_numpy(values.astype(np.float32) / 65535).expand(3, 6, 8)
    torch.testing.assert_close(image, expected)


def test_exif_rotated_image_mismatch_names_the_orientation(tmp_path):
    image_dir, annotation_file = write_tiny_coco(tmp_path, _set(["images", 1], {"id": 4, "file_name": "a.jpg",
                                                                              "width": H, "height": W}))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 6x5, displayed turned by 90 degrees: 5x6, as the file says
    Image.new("RGB", (W, H)).save(os.path.join(image_dir, "a.jpg"), exif=exif)
    with pytest.raises(DatasetError, match=r"image is 6x5 .* says 5x6; the file's EXIF orientation \(6\)"):
        CocoDetection(image_dir, annotation_file)
