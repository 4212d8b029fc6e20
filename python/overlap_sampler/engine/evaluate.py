"""COCO evaluation of a torchvision-style detector: box AP and, with a mask head, mask AP.

The model is any module that, in eval mode, maps a list of images (float32 [3, H, W] in [0, 1])
to a list of dicts with ``boxes`` (float32 [n, 4], x1y1x2y2 absolute pixels of the input image),
``scores`` (float32 [n]), ``labels`` (int64 [n], contiguous 1..C) and optionally ``masks``
(float32 [n, 1, H, W] probabilities) -- the output of torchvision's GeneralizedRCNN (and of a
scripted one, which returns ``(losses, detections)``).

The numbers are pycocotools' ``COCOeval`` (the reference implementation); this module only turns
the detections into COCO results and reads ``stats[0:6]``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import warnings
from typing import Hashable, Iterable, Optional

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from ..io_safety import prepare_output_file, write_json
from .eval_inputs import has_mask_head, load_eval_inputs
from .export import detect

#: The six COCO summary numbers we report, in the order of ``COCOeval.stats[0:6]``.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

MASK_THRESHOLD = 0.5


def detections_to_coco(detections: dict, image_id: int, category_ids: list) -> list[dict]:
    """COCO result records for one image.

    Args:
        detections: dict with ``boxes`` float [n, 4] x1y1x2y2 absolute pixels, ``scores`` float [n],
            ``labels`` int64 [n] in 1..C, and optionally ``masks`` float [n, 1, H, W] probabilities
            (thresholded at 0.5 and RLE-encoded).
        image_id: the COCO image id.
        category_ids: label ``l`` maps to COCO category ``category_ids[l - 1]``.

    Returns:
        list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` (plus
        ``"segmentation"``: an RLE with ``counts`` as str, JSON-ready, when masks are given).
    """
    boxes = detections["boxes"].detach().float().cpu()
    scores = detections["scores"].detach().float().cpu().tolist()
    labels = detections["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    rles = None
    if "masks" in detections:
        masks = detections["masks"].detach().cpu()
        if masks.dim() == 4:
            masks = masks[:, 0]
        binary = (masks > MASK_THRESHOLD).numpy().astype(np.uint8)
        # pycocotools wants a Fortran-ordered H x W x n array.
        rles = (mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
                if len(binary) else [])
    results = []
    for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        if not 1 <= label <= len(category_ids):
            raise ValueError(
                f"detections['labels'] holds {label} for image {image_id}: expected a contiguous "
                f"label in 1..{len(category_ids)} (0 is background)")
        record = {"image_id": int(image_id), "category_id": int(category_ids[label - 1]),
                  "bbox": [float(v) for v in box], "score": float(score)}
        if rles is not None:
            rle = dict(rles[k])
            rle["counts"] = rle["counts"].decode("ascii")
            record["segmentation"] = rle
        results.append(record)
    return results


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    """``coco_gt.loadRes(results)``, also for an empty list (where loadRes raises IndexError).

    An empty result set is a COCO object with the ground truth's images and categories and no
    annotations, so COCOeval scores it as it should: 0 where there is ground truth, -1 where
    there is none.
    """
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(results)
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                     "categories": list(coco_gt.dataset.get("categories", [])),
                     "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def coco_metrics(coco_gt: COCO, results: list[dict], iou_type: str, *,
                 image_ids: Optional[Iterable[int]] = None, verbose: bool = False) -> dict:
    """Run COCOeval and return ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` (``stats[0:6]``).

    AP is averaged over IoU 0.50:0.95; APs/APm/APl over small/medium/large objects. A value of -1
    is COCOeval's "no ground truth in this range" and is kept as -1.

    Args:
        coco_gt: the ground truth.
        results: COCO result records (``bbox`` xywh, ``score``, ``category_id``, ``image_id``,
            ``segmentation`` RLE for ``iou_type="segm"``).
        iou_type: ``"bbox"`` or ``"segm"``.
        image_ids: evaluate on these images only (default: all images of ``coco_gt``).
        verbose: let COCOeval print its progress and its 12-line summary.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        coco_dt = _load_results(coco_gt, results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats[:6])}


def same_size_batches(dataset, batch_size: int) -> list[list[int]]:
    """Indices of ``dataset`` in batches of at most ``batch_size`` images of one size.

    torchvision's detectors pad each batch to its largest image, so in a batch of mixed sizes an
    image's detections depend on its neighbours and the AP would change with the batch size.
    Images of one size are padded alike, whether alone or together (the batched arithmetic may
    still round differently in the last bits). Sizes come from the COCO ``images`` records; a
    dataset without ``image_ids`` that are the json's ids is evaluated one image at a time.
    Within a size the dataset order is kept; sizes come in the order they first appear.
    """
    one_at_a_time = [[index] for index in range(len(dataset))]
    image_ids = getattr(dataset, "image_ids", None)
    if image_ids is None or len(image_ids) != len(dataset):
        return one_at_a_time
    sizes = []
    for image_id in image_ids:
        info = dataset.coco.imgs.get(image_id) if isinstance(image_id, int) else None
        if info is None or "height" not in info or "width" not in info:
            return one_at_a_time  # ids that are not the json's: sizes unknown
        sizes.append((info["height"], info["width"]))
    return batches_by_key(sizes, batch_size)


def batches_by_key(keys: Iterable[Hashable], batch_size: int) -> list[list[int]]:
    """Indices of ``keys`` in batches of at most ``batch_size`` with equal keys (such as image sizes,
    see :func:`same_size_batches`); the order of the indices is kept within a key, keys come in the
    order they first appear."""
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return [group[k:k + batch_size] for group in groups.values() for k in range(0, len(group), batch_size)]


def evaluate(model: torch.nn.Module, dataset, *, device: str | torch.device = "cpu",
             batch_size: int = 2, progress: bool = True, verbose: bool = False) -> dict:
    """COCO box (and mask) AP of ``model`` on ``dataset``.

    Runs ``model`` in eval mode under ``torch.inference_mode`` over every image of ``dataset``
    (its training flag is restored afterwards; the model is moved to ``device``), converts the
    detections to COCO results and scores them with pycocotools' COCOeval.

    Args:
        model: a detector; in eval mode ``model(list of float32 [3, H, W] images)`` returns one
            dict per image with ``boxes`` (x1y1x2y2 absolute pixels), ``scores``, ``labels``
            (1..C) and optionally ``masks`` ([n, 1, H, W] probabilities). A scripted detector's
            ``(losses, detections)`` is accepted too.
        dataset: a ``overlap_sampler.data.CocoDetection`` (or anything with ``__len__``,
            ``__getitem__ -> (image, target with a 0-d "image_id")``, ``.coco`` and
            ``.category_ids``).
        device: where to run the model.
        batch_size: images per forward pass, at most; a batch holds images of one size only
            (see :func:`same_size_batches`), so the padding, and thus the AP, does not depend on
            it (up to rounding).
        progress: show a tqdm bar.
        verbose: let COCOeval print its own output.

    Returns:
        ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"}}`` plus ``"segm"`` with the same keys
        when the model predicts masks. Floats in [0, 1]; -1 where there is no ground truth in
        that area range.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for attribute in ("coco", "category_ids"):
        if not hasattr(dataset, attribute):
            raise TypeError(f"dataset must be a CocoDetection (with .coco and .category_ids); "
                            f"{type(dataset).__name__} has no .{attribute}")
    device = torch.device(device)
    category_ids = list(dataset.category_ids)
    was_training = model.training
    model.eval().to(device)
    results: list[dict] = []
    image_ids: list[int] = []
    predicts_masks = has_mask_head(model)
    try:
        with torch.inference_mode(), tqdm(total=len(dataset), desc="eval", unit="img",
                                          disable=not progress, file=sys.stderr) as bar:
            for batch in same_size_batches(dataset, batch_size):
                samples = [dataset[i] for i in batch]
                images = [image.to(device) for image, _ in samples]
                outputs = detect(model, images)
                if len(outputs) != len(samples):
                    raise RuntimeError(f"the model returned {len(outputs)} detection dicts for "
                                       f"{len(samples)} images")
                for (_, target), detections in zip(samples, outputs):
                    image_id = int(target["image_id"])
                    image_ids.append(image_id)
                    predicts_masks = predicts_masks or "masks" in detections
                    results.extend(detections_to_coco(detections, image_id, category_ids))
                bar.update(len(samples))
    finally:
        model.train(was_training)

    metrics = {"bbox": coco_metrics(dataset.coco, results, "bbox", image_ids=image_ids,
                                    verbose=verbose)}
    if predicts_masks and any("segmentation" not in a for a in dataset.coco.anns.values()):
        warnings.warn("the model predicts masks but the dataset's annotations have no "
                      "'segmentation': mask AP is not computed", stacklevel=2)
        predicts_masks = False
    if predicts_masks:
        if any("segmentation" not in r for r in results):
            raise RuntimeError("the model has a mask head but some detections have no 'masks'")
        metrics["segm"] = coco_metrics(dataset.coco, results, "segm", image_ids=image_ids,
                                       verbose=verbose)
    return metrics


def format_table(metrics: dict) -> str:
    """A fixed-width table of AP values in percent, one row per IoU type.

    >>> print(format_table({"bbox": {"AP": 0.5, "AP50": 0.75, "AP75": 0.5, "APs": -1.0,
    ...                              "APm": 0.25, "APl": 0.5}}))
    type    AP     AP50   AP75   APs    APm    APl
    bbox    50.0   75.0   50.0   -      25.0   50.0
    """
    header = "type".ljust(8) + "".join(name.ljust(7) for name in METRIC_NAMES)
    lines = [header.rstrip()]
    for iou_type, values in metrics.items():
        cells = []
        for name in METRIC_NAMES:
            value = values.get(name)
            # -1 means "no ground truth in this range": a dash, not a fake score.
            cells.append("-" if value is None or value < 0 else f"{100.0 * value:.1f}")
        lines.append((iou_type.ljust(8) + "".join(c.ljust(7) for c in cells)).rstrip())
    return "\n".join(lines)


def write_metrics(metrics: dict, path: str) -> str:
    """Write ``metrics`` as indented JSON to ``path``, atomically (parent folders created); return the path."""
    prepare_output_file(path, "metrics file")
    return write_json(path, metrics, what="metrics file", indent=2, sort_keys=True)


def metrics_file_name(checkpoint: str, box_nms_thresh: Optional[float] = None) -> str:
    """The name of ``evaluate_checkpoint``'s JSON: ``eval_<checkpoint name>.json``, with
    ``_nms<threshold>`` before ``.json`` when the RoI head's NMS threshold was overridden."""
    name = os.path.splitext(os.path.basename(checkpoint))[0]
    return f"eval_{name}" + ("" if box_nms_thresh is None else f"_nms{box_nms_thresh:g}") + ".json"


def check_box_nms_thresh(value) -> float:
    """``value`` as a float in (0, 1] (the train setting's range), else a ValueError naming it."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not 0.0 < number <= 1.0:
        raise ValueError(f"box_nms_thresh must be a number in (0, 1], got {value!r}")
    return number


def evaluate_checkpoint(checkpoint: str, *, dataset: Optional[str] = "checkpoint",
                        val_images: Optional[str] = None, val_annotations: Optional[str] = None,
                        output_dir: Optional[str] = None, device: str = "auto",
                        batch_size: int = 2, progress: bool = True,
                        box_nms_thresh: Optional[float] = None) -> dict:
    """Evaluate a training checkpoint on a COCO dataset; write ``eval_<checkpoint name>.json``, print the table.

    Args:
        checkpoint: a checkpoint written by ``overlap_sampler.engine.checkpoint.save_checkpoint``, or
            a TorchScript file written by ``export`` (which holds no run: give ``dataset="synthetic"``
            or the ``val_*`` files).
        dataset: ``"checkpoint"`` for the validation set the checkpoint's run was configured with
            (its COCO files, or the built-in synthetic split), ``"synthetic"`` for the built-in
            synthetic validation split, or None to use ``val_images`` + ``val_annotations`` (a COCO
            image folder and instances json).
        output_dir: where the JSON goes (default: the checkpoint's folder). Its name follows the
            checkpoint's (``last_checkpoint.pth`` -> ``eval_last_checkpoint.json``, see
            :func:`metrics_file_name`), so the ``eval.json`` that training wrote is never overwritten.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        batch_size: images per forward pass, at most (the padding does not depend on it, see
            :func:`same_size_batches`).
        box_nms_thresh: the RoI head's test NMS IoU threshold instead of the checkpoint's (the
            paper's Table 2c varies it on one trained model); the JSON is then
            ``eval_<checkpoint name>_nms<threshold>.json``.

    Returns:
        the metrics dict of :func:`evaluate`.
    """
    if box_nms_thresh is not None:
        box_nms_thresh = check_box_nms_thresh(box_nms_thresh)
    output_dir = output_dir or os.path.dirname(os.path.abspath(checkpoint))
    output = os.path.join(output_dir, metrics_file_name(checkpoint, box_nms_thresh))
    inputs = load_eval_inputs(checkpoint, dataset=dataset, val_images=val_images, val_annotations=val_annotations,
                              device=device, outputs=[("metrics file", output)])
    if box_nms_thresh is not None:
        print(f"RoI-head NMS threshold {box_nms_thresh:g} (the checkpoint's: {inputs.model.roi_heads.nms_thresh:g})")
        inputs.model.roi_heads.nms_thresh = box_nms_thresh
    metrics = evaluate(inputs.model, inputs.data, device=inputs.device, batch_size=batch_size,
                       progress=progress)
    path = write_metrics(metrics, output)
    print(format_table(metrics))
    print(f"wrote {path}")
    return metrics
