"""COCO evaluation: stub detectors on a hand-written COCO file, checked against pycocotools."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")  # not installed on the lent GPU machines

from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from overlap_sampler.engine.evaluate import (  # noqa: E402
    METRIC_NAMES,
    coco_metrics,
    detections_to_coco,
    evaluate,
    format_table,
    same_size_batches,
    write_metrics,
)

SIZE = 128

# pycocotools' annToMask (a reference here) trips a numpy-2 DeprecationWarning inside pycocotools.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy")
# Non-contiguous category ids: label l -> CATEGORY_IDS[l - 1].
CATEGORY_IDS = [3, 7]


def _rect(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _coco_dict():
    """Three 128x128 images, two categories, small/medium/large boxes with polygon masks."""
    boxes = {  # image id -> [(category id, x, y, w, h)]
        11: [(3, 4, 6, 20, 12), (7, 40, 30, 50, 40)],
        12: [(7, 10, 10, 110, 100), (3, 60, 70, 12, 9), (3, 80, 20, 30, 35)],
        13: [(3, 30, 30, 40, 60)],
    }
    annotations = []
    for image_id, records in boxes.items():
        for category_id, x, y, w, h in records:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id, "bbox": [x, y, w, h],
                                "area": float(w * h), "iscrowd": 0,
                                "segmentation": _rect(x, y, w, h)})
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": SIZE, "height": SIZE}
                   for i in boxes],
        "categories": [{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}],
        "annotations": annotations,
    }


class StubDataset:
    """The CocoDetection interface evaluate() uses: (image, {"image_id"}), .coco, .category_ids."""

    def __init__(self, annotation_file):
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(annotation_file)
        self.image_ids = sorted(self.coco.imgs)
        self.category_ids = list(CATEGORY_IDS)

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, i):
        image_id = self.image_ids[i]
        return torch.zeros(3, SIZE, SIZE), {"image_id": torch.tensor(image_id)}


def _ground_truth(coco, image_id):
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                           a["bbox"][1] + a["bbox"][3]] for a in annotations], dtype=torch.float32)
    labels = torch.tensor([CATEGORY_IDS.index(a["category_id"]) + 1 for a in annotations])
    masks = torch.zeros(len(annotations), 1, SIZE, SIZE)
    for k, annotation in enumerate(annotations):
        if "segmentation" in annotation:
            masks[k, 0] = torch.from_numpy(coco.annToMask(annotation)).float()
    return boxes.reshape(-1, 4), labels.long(), masks


class StubDetector(torch.nn.Module):
    """Returns, per image, the ground truth (mode "gt"), nothing ("empty"), or the ground truth
    jittered, rescored and padded with false positives ("noisy")."""

    def __init__(self, coco, mode, with_masks=False):
        super().__init__()
        self.coco, self.mode, self.with_masks = coco, mode, with_masks
        self.weight = torch.nn.Parameter(torch.zeros(()))  # so .to() / .eval() behave
        self.seen_training = []

    def forward(self, images):
        self.seen_training.append(self.training)
        outputs = []
        for image in images:
            # The stub datasets put the image id in the first pixel for the detector to find.
            image_id = int(image[0, 0, 0].item())
            boxes, labels, masks = _ground_truth(self.coco, image_id)
            scores = torch.ones(len(boxes))
            if self.mode == "empty":
                boxes, labels, masks, scores = boxes[:0], labels[:0], masks[:0], scores[:0]
            elif self.mode == "noisy":
                generator = torch.Generator().manual_seed(image_id)
                boxes = boxes + torch.randn(boxes.shape, generator=generator) * 3
                scores = torch.rand(len(boxes), generator=generator)
                fakes = torch.rand(4, 4, generator=generator) * 60
                fakes[:, 2:] += fakes[:, :2] + 8
                boxes = torch.cat([boxes, fakes])
                scores = torch.cat([scores, torch.rand(4, generator=generator)])
                labels = torch.cat([labels, torch.randint(1, 3, (4,), generator=generator)])
                masks = torch.cat([masks, torch.zeros(4, 1, SIZE, SIZE)])
            output = {"boxes": boxes, "scores": scores, "labels": labels}
            if self.with_masks:
                output["masks"] = masks
            outputs.append(output)
        return outputs


class IdImageDataset(StubDataset):
    def __getitem__(self, i):
        image, target = super().__getitem__(i)
        image[0, 0, 0] = float(self.image_ids[i])
        return image, target


@pytest.fixture()
def coco_file(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_coco_dict()))
    return str(path)


@pytest.fixture()
def dataset(coco_file):
    return IdImageDataset(coco_file)


def test_perfect_detector_scores_one(dataset):
    model = StubDetector(dataset.coco, "gt", with_masks=True)
    metrics = evaluate(model, dataset, batch_size=2, progress=False)
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == set(METRIC_NAMES)
        for name in METRIC_NAMES:
            assert metrics[iou_type][name] == pytest.approx(1.0), (iou_type, name)


def test_runs_in_eval_mode_and_restores_training(dataset):
    model = StubDetector(dataset.coco, "gt").train()
    metrics = evaluate(model, dataset, batch_size=3, progress=False)
    assert set(metrics) == {"bbox"}  # no masks predicted: no segm
    assert model.seen_training == [False]
    assert model.training


class SizedDataset(IdImageDataset):
    """Images of the sizes their COCO records give (not all SIZE x SIZE)."""

    def __getitem__(self, i):
        info = self.coco.imgs[self.image_ids[i]]
        image = torch.zeros(3, info["height"], info["width"])
        image[0, 0, 0] = float(info["id"])
        return image, {"image_id": torch.tensor(info["id"])}


class PaddingDetector(StubDetector):
    """A perfect detector whose boxes move with the padding of the batch, as a real detector's
    features do near the padded border: each image's boxes shift down by how much taller the
    batch's tallest image is. It also records the image shapes of every call."""

    def __init__(self, coco):
        super().__init__(coco, "gt")
        self.calls = []

    def forward(self, images):
        self.calls.append([tuple(image.shape[1:]) for image in images])
        tallest = max(image.shape[1] for image in images)
        outputs = super().forward(images)
        for image, output in zip(images, outputs):
            output["boxes"] = output["boxes"] + torch.tensor([0.0, 1.0, 0.0, 1.0]) * (tallest - image.shape[1])
        return outputs


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_batches_hold_one_image_size_so_ap_does_not_depend_on_the_batch_size(tmp_path, batch_size):
    data = _coco_dict()
    extra = [{"id": 20 + k, "file_name": f"{20 + k}.png", "width": SIZE, "height": SIZE} for k in range(3)]
    data["images"][1].update(height=112)  # image 12: its boxes end at y = 110
    data["images"][2].update(width=96)  # image 13: its box ends at x = 70
    data["images"] += extra
    for annotation in data["annotations"]:
        del annotation["segmentation"]  # boxes only: the stub's masks are SIZE x SIZE
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(data))
    dataset = SizedDataset(str(path))  # ids 11 (128x128), 12 (112x128), 13 (128x96), 20-22 (128x128)
    model = PaddingDetector(dataset.coco)

    metrics = evaluate(model, dataset, batch_size=batch_size, progress=False)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert all(len(set(shapes)) == 1 and len(shapes) <= batch_size for shapes in model.calls)
    assert sorted(shape for shapes in model.calls for shape in shapes) == sorted(
        [(SIZE, SIZE)] * 4 + [(112, SIZE), (SIZE, 96)])


class DatasetWithoutImageIds(StubDataset):
    """No ``image_ids`` attribute: evaluate() cannot know the image sizes before loading."""

    def __init__(self, annotation_file):
        super().__init__(annotation_file)
        self.ids = self.__dict__.pop("image_ids")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        image = torch.zeros(3, SIZE, SIZE)
        image[0, 0, 0] = float(self.ids[i])
        return image, {"image_id": torch.tensor(self.ids[i])}


def test_a_dataset_without_image_ids_is_evaluated_one_image_at_a_time(coco_file):
    dataset = DatasetWithoutImageIds(coco_file)
    model = PaddingDetector(dataset.coco)
    assert evaluate(model, dataset, batch_size=3, progress=False)["bbox"]["AP"] == pytest.approx(1.0)
    assert [len(shapes) for shapes in model.calls] == [1, 1, 1]


def test_no_detections_score_zero(dataset):
    model = StubDetector(dataset.coco, "empty", with_masks=True)
    metrics = evaluate(model, dataset, batch_size=2, progress=False)
    for iou_type in ("bbox", "segm"):
        for name in METRIC_NAMES:
            assert metrics[iou_type][name] == 0.0, (iou_type, name)


def test_area_range_without_ground_truth_is_minus_one(tmp_path):
    data = _coco_dict()
    data["annotations"] = [a for a in data["annotations"] if a["area"] < 32 ** 2]  # small only
    path = tmp_path / "small.json"
    path.write_text(json.dumps(data))
    data_set = IdImageDataset(str(path))
    for mode, expected_ap in (("gt", 1.0), ("empty", 0.0)):
        metrics = evaluate(StubDetector(data_set.coco, mode), data_set, progress=False)["bbox"]
        assert metrics["APs"] == pytest.approx(expected_ap)
        assert metrics["APm"] == -1.0 and metrics["APl"] == -1.0


def test_matches_cocoeval_on_a_results_file(dataset, coco_file, tmp_path):
    """Independent reference: pycocotools run by hand on a json results file."""
    model = StubDetector(dataset.coco, "noisy", with_masks=True)
    metrics = evaluate(model, dataset, batch_size=2, progress=False)
    assert 0.05 < metrics["bbox"]["AP"] < 0.95  # a non-trivial score

    # The reference builds its results without detections_to_coco.
    results = []
    with torch.no_grad():
        for i in range(len(dataset)):
            image, target = dataset[i]
            (out,) = model([image])
            for box, score, label, mask in zip(out["boxes"].tolist(), out["scores"].tolist(),
                                               out["labels"].tolist(), out["masks"]):
                rle = mask_utils.encode(np.asfortranarray(
                    (mask[0].numpy() > 0.5).astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                results.append({"image_id": int(target["image_id"]),
                                "category_id": CATEGORY_IDS[label - 1],
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "score": score, "segmentation": rle})
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(coco_file)
        dt = gt.loadRes(str(results_file))
        for iou_type in ("bbox", "segm"):
            reference = COCOeval(gt, dt, iou_type)
            reference.evaluate()
            reference.accumulate()
            reference.summarize()
            for name, value in zip(METRIC_NAMES, reference.stats[:6]):
                assert metrics[iou_type][name] == pytest.approx(float(value), abs=1e-12), \
                    (iou_type, name)


def test_masks_without_ground_truth_masks_give_box_ap_only(tmp_path):
    data = _coco_dict()
    for annotation in data["annotations"]:
        del annotation["segmentation"]
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(data))
    data_set = IdImageDataset(str(path))
    with pytest.warns(UserWarning, match="mask AP is not computed"):
        metrics = evaluate(StubDetector(data_set.coco, "gt", with_masks=True), data_set,
                           progress=False)
    assert set(metrics) == {"bbox"}


def test_subset_of_images_is_scored_on_that_subset(coco_file):
    class FirstTwo(IdImageDataset):
        def __len__(self):
            return 2
    data_set = FirstTwo(coco_file)
    metrics = evaluate(StubDetector(data_set.coco, "gt"), data_set, progress=False)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)  # image 13 is not counted as missed


def test_scripted_output_tuple_is_accepted(dataset):
    inner = StubDetector(dataset.coco, "gt")

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return {}, self.inner(images)

    assert evaluate(Scripted(), dataset, progress=False)["bbox"]["AP"] == pytest.approx(1.0)


def test_detections_to_coco_format():
    detections = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 7.0]]), "scores": torch.tensor([0.5]),
                  "labels": torch.tensor([2]), "masks": torch.zeros(1, 1, 8, 12)}
    detections["masks"][0, 0, 2:4, 1:5] = 0.9
    (record,) = detections_to_coco(detections, 5, CATEGORY_IDS)
    assert record["image_id"] == 5 and record["category_id"] == 7
    assert record["bbox"] == [1.0, 2.0, 10.0, 5.0] and record["score"] == 0.5
    assert isinstance(record["segmentation"]["counts"], str)
    json.dumps(record)  # JSON-ready
    assert mask_utils.area(dict(record["segmentation"], counts=record["segmentation"]["counts"]
                                .encode())) == 8


def test_bad_label_and_bad_arguments(dataset):
    with pytest.raises(ValueError, match="labels.*1..2"):
        detections_to_coco({"boxes": torch.zeros(1, 4), "scores": torch.ones(1),
                            "labels": torch.tensor([0])}, 1, CATEGORY_IDS)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(StubDetector(dataset.coco, "gt"), dataset, batch_size=0)
    with pytest.raises(TypeError, match="category_ids"):
        evaluate(StubDetector(dataset.coco, "gt"), [(torch.zeros(3, 4, 4), {})])
    with pytest.raises(ValueError, match="iou_type"):
        coco_metrics(dataset.coco, [], "keypoints")


def test_format_table_and_write_metrics(tmp_path):
    metrics = {"bbox": {"AP": 0.5, "AP50": 0.75, "AP75": 0.5, "APs": -1.0, "APm": 0.25,
                        "APl": 0.5},
               "segm": {"AP": 0.123, "AP50": 1.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0,
                        "APl": 0.0}}
    table = format_table(metrics).splitlines()
    assert table[0].split() == ["type", *METRIC_NAMES]
    assert table[1].split() == ["bbox", "50.0", "75.0", "50.0", "-", "25.0", "50.0"]
    assert table[2].split() == ["segm", "12.3", "100.0", "0.0", "0.0", "0.0", "0.0"]
    path = write_metrics(metrics, str(tmp_path / "sub" / "eval.json"))
    assert json.loads(open(path).read()) == metrics


def test_perfect_detector_on_the_synthetic_dataset(tmp_path):
    """With the DATA helper's CocoDetection: its targets, returned as detections, score AP 1."""
    from overlap_sampler.data import CocoDetection, make_synthetic_coco

    image_dir, annotations = make_synthetic_coco(str(tmp_path), num_images=3, image_size=64,
                                                 split="val")
    data = CocoDetection(image_dir, annotations, masks=True)

    class ReturnsTargets(torch.nn.Module):
        """Replays the dataset's targets in dataset order (evaluate's order)."""

        def __init__(self):
            super().__init__()
            self.next = 0

        def forward(self, images):
            outputs = []
            for _ in images:
                _, target = data[self.next]
                self.next += 1
                outputs.append({"boxes": target["boxes"], "labels": target["labels"],
                                "scores": torch.ones(len(target["boxes"])),
                                "masks": target["masks"][:, None].float()})
            return outputs

    metrics = evaluate(ReturnsTargets(), data, batch_size=2, progress=False)
    assert sum(len(data.coco.getAnnIds(imgIds=[i])) for i in data.image_ids) > 0
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0), iou_type


def test_image_ids_that_are_not_the_jsons_run_one_image_at_a_time(coco_file):
    dataset = IdImageDataset(coco_file)
    dataset.image_ids = [f"img{i}" for i in range(3)]  # not COCO ids: sizes unknown
    assert same_size_batches(dataset, 4) == [[0], [1], [2]]
    dataset.image_ids = [11, 12, 13]
    assert same_size_batches(dataset, 2) == [[0, 1], [2]]
