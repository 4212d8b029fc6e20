"""Detections of a trained checkpoint (or an exported TorchScript file) on image files: one JSON of
boxes (and masks), and each image drawn with its detections.

    overlap-sampler predict --checkpoint output/train/last_checkpoint.pth photos/ street.jpg

``predictions.json`` holds, for each image in the order given (folders searched recursively, their
files sorted by path), its absolute path, size and detections above the score threshold: ``bbox``
``[x, y, width, height]`` in pixels of the image as stored, ``score``, ``category_id`` and
``category`` (the dataset's id and name) and, from Mask R-CNN, ``segmentation`` (a COCO RLE of the
mask thresholded at 0.5). A file that cannot be read is reported with an ``error`` instead and
the others go on. Drawn images go to ``drawn/`` in the output folder.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
from tqdm import tqdm

from ..data.images import image_size, read_image
from ..io_safety import atomic_write, check_not_inputs, prepare_output_dir, write_json
from .checkpoint import load_detector
from .distributed import resolve_device
from .evaluate import MASK_THRESHOLD, batches_by_key, detections_to_coco
from .export import detect

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PREDICTIONS_FILE = "predictions.json"
DRAWN_FOLDER = "drawn"
# matplotlib's tab10: one colour per label, cycled.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def find_images(inputs: Sequence[str]) -> list[str]:
    """The image files named by ``inputs``, as absolute paths: files as given, folders searched
    recursively (symbolic links followed, each folder once) for files ending in
    :data:`IMAGE_SUFFIXES` (any case), sorted; each file once (by its real path), in the order
    first named.

    Raises ``FileNotFoundError`` naming an input that does not exist or a folder without images."""
    if isinstance(inputs, str):
        inputs = [inputs]
    files: dict[str, str] = {}  # real path -> absolute path as named, in order
    for item in inputs:
        if os.path.isdir(item):
            found, folders = [], set()
            for root, dirs, names in os.walk(item, followlinks=True):
                if os.path.realpath(root) in folders:  # a link back up the tree
                    dirs[:] = []
                    continue
                folders.add(os.path.realpath(root))
                found += [os.path.join(root, name) for name in names if name.lower().endswith(IMAGE_SUFFIXES)]
            if not found:
                raise FileNotFoundError(f"no image files ({' '.join(IMAGE_SUFFIXES)}) in folder {item!r}")
            for path in sorted(found):
                files.setdefault(os.path.realpath(path), os.path.abspath(path))
        elif os.path.isfile(item):
            files.setdefault(os.path.realpath(item), os.path.abspath(item))
        else:
            raise FileNotFoundError(f"{item!r} is neither an image file nor a folder")
    if not files:
        raise ValueError("no images given")
    return list(files.values())


def _batches(paths: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of ``paths`` in batches of one image size (torchvision pads a batch to its largest image,
    so a mixed batch would change an image's detections). An unreadable file is a batch of its own."""
    if batch_size == 1:
        return [[k] for k in range(len(paths))]

    def size(k: int) -> Any:
        try:
            return image_size(paths[k])
        except ValueError:
            return ("unreadable", k)

    return batches_by_key((size(k) for k in range(len(paths))), batch_size)


def _check_settings(score_thresh: float, batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"score_thresh must be in [0, 1], got {score_thresh!r}")


@dataclasses.dataclass
class ImagePrediction:
    """What :func:`predict` gives for one file: ``image`` float32 ``[3, H, W]`` and ``detections``
    (torchvision's dict) on the CPU, or, for a file that cannot be read, ``error``."""

    index: int  # into the paths given
    image: Optional[torch.Tensor] = None
    detections: Optional[dict[str, torch.Tensor]] = None
    error: Optional[str] = None


def predict(model: torch.nn.Module, paths: Sequence[str], *, device: str | torch.device = "cpu",
            batch_size: int = 1, score_thresh: float = 0.5, progress: bool = True) -> Iterator[ImagePrediction]:
    """Run ``model`` (eval mode, ``torch.inference_mode``) on the image files ``paths``.

    Yields an :class:`ImagePrediction` per file, batch by batch (images of one size per batch, so not
    always in the order of ``paths``), keeping the detections with ``score >= score_thresh``. The
    model's training flag is restored at the end.
    """
    _check_settings(score_thresh, batch_size)
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    try:
        with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, file=sys.stderr) as bar:
            for batch in _batches(paths, batch_size):
                readable, images = [], []
                for k in batch:
                    try:
                        images.append(read_image(paths[k]))
                        readable.append(k)
                    except ValueError as e:
                        yield ImagePrediction(k, error=str(e))
                if readable:
                    # Only around the call: a generator's caller runs between the yields.
                    with torch.inference_mode():
                        outputs = detect(model, [image.to(device) for image in images])
                        kept = [{key: value[d["scores"] >= score_thresh].cpu() for key, value in d.items()}
                                for d in outputs]
                    for k, image, detections in zip(readable, images, kept):
                        yield ImagePrediction(k, image, detections)
                bar.update(len(batch))
    finally:
        model.train(was_training)


def draw_detections(image: torch.Tensor, detections: dict[str, torch.Tensor],
                    categories: Sequence[dict[str, Any]]) -> torch.Tensor:
    """``image`` (float [3, H, W] in [0, 1]) as uint8 with the masks filled in and the boxes outlined,
    each labelled "name score", one colour per category."""
    drawn = (image * 255).round().clamp(0, 255).to(torch.uint8)
    labels = detections["labels"].tolist()
    if not labels:
        return drawn
    colors = [PALETTE[(label - 1) % len(PALETTE)] for label in labels]
    if "masks" in detections:
        masks = detections["masks"][:, 0] > MASK_THRESHOLD
        drawn = draw_segmentation_masks(drawn, masks, alpha=0.45, colors=colors)
    names = [f"{categories[label - 1]['name']} {score:.2f}"
             for label, score in zip(labels, detections["scores"].tolist())]
    width = max(1, round(min(image.shape[1:]) / 200))
    return draw_bounding_boxes(drawn, detections["boxes"], labels=names, colors=colors, width=width)


def drawn_names(paths: Sequence[str]) -> list[str]:
    """A ``.png`` name per path, unique: the file's own name, numbered where names repeat."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, k = f"{stem}.png", 1
        while name in taken:  # same file names from different folders
            name, k = f"{stem}_{k}.png", k + 1
        taken.add(name)
        names.append(name)
    return names


def predict_checkpoint(checkpoint: str, inputs: Sequence[str], *, output_dir: Optional[str] = None,
                       score_thresh: float = 0.5, draw: bool = True, device: str = "auto", batch_size: int = 1,
                       progress: bool = True) -> str:
    """Detect objects in the image files or folders ``inputs`` with a training checkpoint or a
    TorchScript file written by ``export``.

    Writes ``output_dir/predictions.json`` (see the module docstring) and, with ``draw``, each image
    as ``output_dir/drawn/<name>.png`` with its detections, each file atomically; never over an input
    file. ``output_dir`` defaults to ``predictions/`` beside the checkpoint. Returns the path of the
    JSON file. ``ValueError`` if no file could be read as an image (then nothing is written).
    """
    _check_settings(score_thresh, batch_size)  # before the model is built
    paths = find_images(inputs)
    output_dir = output_dir or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "predictions")
    drawn = [os.path.join(output_dir, DRAWN_FOLDER, name) for name in drawn_names(paths)] if draw else []
    json_path = os.path.join(output_dir, PREDICTIONS_FILE)
    check_not_inputs([("drawn image", path) for path in drawn] + [("predictions file", json_path)],
                     [("input image", path) for path in paths] + [("checkpoint", checkpoint)],
                     advice="choose another output folder")
    device = resolve_device(device)
    prepare_output_dir(output_dir)  # before the model is loaded: an unwritable folder fails at once
    if draw:
        prepare_output_dir(os.path.join(output_dir, DRAWN_FOLDER), "folder of the drawn images")
    model, categories = load_detector(checkpoint, device)
    category_ids = [c["category_id"] for c in categories]

    records: list[dict[str, Any]] = [{} for _ in paths]
    for result in predict(model, paths, device=device, batch_size=batch_size, score_thresh=score_thresh,
                          progress=progress):
        k = result.index
        if result.error is not None:
            warnings.warn(f"skipped: {result.error}", stacklevel=2)
            records[k] = {"file": paths[k], "error": result.error}
            continue
        image, detections = result.image, result.detections
        found = []
        for label, coco in zip(detections["labels"].tolist(), detections_to_coco(detections, k, category_ids)):
            del coco["image_id"]
            found.append({**coco, "category": categories[label - 1]["name"]})
        records[k] = {"file": paths[k], "width": image.shape[2], "height": image.shape[1], "detections": found}
        if draw:
            records[k]["drawn"] = os.path.relpath(drawn[k], output_dir)
            array = draw_detections(image, detections, categories).permute(1, 2, 0).numpy()
            with atomic_write(drawn[k], "wb", fsync=False, what="drawn image") as f:
                Image.fromarray(np.ascontiguousarray(array)).save(f, format="PNG")

    failed = sum("error" in r for r in records)
    if failed == len(paths):
        raise ValueError(f"none of the {len(paths)} files given could be read as an image (the first: "
                         f"{records[0]['error']}): no predictions written")
    path = write_json(json_path, {"checkpoint": os.path.abspath(checkpoint), "score_thresh": score_thresh,
                                  "categories": categories, "images": records})
    count = sum(len(r.get("detections", ())) for r in records)
    print(f"{count} detections (score >= {score_thresh:g}) in {len(paths) - failed} images"
          + (f" ({failed} unreadable files skipped)" if failed else "") + f": wrote {path}"
          + (f" and the drawn images in {os.path.join(output_dir, DRAWN_FOLDER)}" if draw else ""))
    return path
