"""COCO-format detection datasets on pycocotools, validated up front.

A COCO instances file is checked record by record when the dataset is built (structure, ids,
boxes, masks, image files, their sizes and pixel formats, read from the headers), so a broken file
fails before training starts, with a message naming the file and the record. Only an image whose
pixels cannot be decoded fails later, when it is loaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .images import check_pixel_format, image_to_tensor

__all__ = ["BOX_TOLERANCE", "MIN_BOX_SIDE", "CocoDetection", "DatasetError", "collate",
           "compressed_rle_counts", "decode_rle"]

#: How far (pixels) a box may stick out of its image before the file is rejected. Annotation tools
#: round coordinates, so boxes touching the border are often a fraction of a pixel outside; such
#: boxes are clipped to the image instead.
BOX_TOLERANCE = 1.0

#: Boxes narrower or lower than this (pixels, after clipping) are left out of the training targets:
#: they hold no object, and a sub-ulp box can collapse to zero width in float32 or when resized,
#: which torchvision's detectors reject mid-training.
MIN_BOX_SIDE = 0.01

_EXIF_ORIENTATION = 0x0112


def decode_rle(rle: dict) -> np.ndarray:
    """``pycocotools.mask.decode`` of one RLE -> uint8 ``[H, W]`` of 0/1.

    pycocotools 2.0.x calls ``np.array(..., copy=False)`` on its own mask object, which numpy 2
    answers with a DeprecationWarning on every call; the result is correct, so it is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        return mask_utils.decode(rle)


def compressed_rle_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string, or None when the string is malformed.

    The format of pycocotools' ``rleFrString``: each run is a little-endian base-32 number, 5 bits
    per character (``chr(48 + bits)``, bit 5 = more characters follow, bit 4 of the last = sign),
    and from the fourth run on the value is a difference to the run two before. pycocotools itself
    does not check the string and decodes a bad one from memory it never wrote, so a file is
    checked with this before its masks are decoded.
    """
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        bits = ord(char) - 48
        if not 0 <= bits < 64:
            return None
        value |= (bits & 0x1F) << shift
        shift += 5
        if bits & 0x20:
            continue
        if bits & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
        value = shift = 0
    return runs if shift == 0 else None


class DatasetError(ValueError):
    """A dataset file or record is malformed; the message names the file and the record."""


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `"id": true` is a broken file, not id 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class CocoDetection(torch.utils.data.Dataset):
    """Images and instance annotations of a COCO-format dataset, as torchvision detection targets.

    Args:
        image_dir: folder holding the images; an image's path is ``image_dir/file_name``.
        annotation_file: COCO instances json (``images``, ``annotations``, ``categories``).
        masks: also return instance masks (needs a ``segmentation`` on every annotation: polygons,
            uncompressed RLE or compressed RLE).

    Item ``i`` is ``(image, target)``:

    - ``image``: float32 ``[3, H, W]`` RGB in ``[0, 1]``.
    - ``target["boxes"]``: float32 ``[n, 4]``, ``(x1, y1, x2, y2)`` in absolute pixels (COCO's
      ``(x, y, w, h)`` converted; clipped to the image).
    - ``target["labels"]``: int64 ``[n]``, contiguous labels ``1..C``: label ``l`` is COCO category
      ``category_ids[l - 1]``, categories taken in increasing id order (0 is the background).
    - ``target["masks"]``: uint8 ``[n, H, W]`` of 0/1, only with ``masks=True``.
    - ``target["image_id"]``: int64 0-d tensor, the COCO image id.
    - ``target["area"]``: float32 ``[n]``, the annotation's ``area`` (box area when the file has none).
    - ``target["iscrowd"]``: int64 ``[n]``, all zeros (see below).

    Annotations left out of the targets (they stay in :attr:`coco`, so COCO evaluation still sees
    them): crowd annotations (``iscrowd=1``: regions of many objects, which COCO evaluation ignores
    and which would teach a detector to fire on groups), and boxes narrower or lower than
    :data:`MIN_BOX_SIDE` after clipping (torchvision's detectors reject empty boxes; COCO has a
    few). An image may thus have ``n = 0``.

    Images are read as stored (EXIF orientation is not applied, as in pycocotools and torchvision);
    16-bit grayscale images are scaled by 65535, other modes converted to 8-bit RGB.

    Attributes:
        coco: the pycocotools ``COCO`` of the annotation file (missing ``area``/``iscrowd`` filled in).
        num_classes: ``C + 1``, background included (what ``build_detector`` takes).
        category_ids: list of COCO category ids, label ``l`` -> ``category_ids[l - 1]``.
        image_ids: COCO image ids in dataset order (increasing id); item ``i`` is ``image_ids[i]``.

    Raises:
        DatasetError: on a malformed file or record (see :meth:`_validate`), a missing or unreadable
            image file or one whose size differs from the json's; when an item is loaded, on pixels
            that cannot be decoded (a truncated file) or an image changed since.
    """

    def __init__(self, image_dir: str, annotation_file: str, *, masks: bool = False) -> None:
        self.image_dir = os.fspath(image_dir)
        self.annotation_file = os.fspath(annotation_file)
        self.masks = bool(masks)
        data = self._read_json()
        self._validate(data)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            self.coco.createIndex()
        self.category_ids: list[int] = sorted(self.coco.cats)
        self._label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids, start=1)}
        self.num_classes = len(self.category_ids) + 1
        # label l -> category_names[l - 1] (the id where a category has no name)
        self.category_names: list[str] = [str(self.coco.cats[c].get("name", c)) for c in self.category_ids]
        self.image_ids: list[int] = sorted(self.coco.imgs)

    # ---------------------------------------------------------------- validation

    def _fail(self, record: str, problem: str) -> DatasetError:
        return DatasetError(f"{self.annotation_file}: {record}: {problem}")

    def _read_json(self) -> dict:
        try:
            with open(self.annotation_file, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DatasetError(f"{self.annotation_file}: annotation file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{self.annotation_file}: not a readable JSON file ({e})") from None
        if not isinstance(data, dict):
            raise DatasetError(
                f"{self.annotation_file}: expected a JSON object with keys 'images', 'annotations', "
                f"'categories', got {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DatasetError(f"{self.annotation_file}: missing top-level key {key!r} (a COCO "
                                   "instances file has 'images', 'annotations' and 'categories')")
            if not isinstance(data[key], list):
                raise DatasetError(f"{self.annotation_file}: top-level {key!r} must be a list, got "
                                   f"{type(data[key]).__name__}")
        return data

    def _validate(self, data: dict) -> None:
        """Cheap checks of every record, so a broken file fails before training starts.

        Images: ``id`` int, unique; ``file_name`` str naming an existing image file whose header
        gives ``width`` x ``height`` (positive ints) and pixels that can be read (not floating
        point). Categories: ``id`` int, unique. Annotations:
        ``id`` int, unique; ``image_id`` and ``category_id`` of an existing image/category; ``bbox``
        4 finite numbers with non-negative width/height, inside its image up to
        :data:`BOX_TOLERANCE` pixels; ``iscrowd`` 0/1 and ``area`` a finite number when present;
        with ``masks=True`` a well-formed ``segmentation`` (polygons of an even number of finite
        numbers; parts of fewer than 3 points are skipped when decoding, an empty list gives an
        empty mask; or an RLE whose size matches the image and whose runs cover it exactly).
        Missing ``area`` is filled with the box area and missing ``iscrowd`` with 0 (pycocotools'
        evaluation reads both).
        """
        sizes: dict[int, tuple[int, int]] = {}
        for k, img in enumerate(data["images"]):
            if not isinstance(img, dict):
                raise self._fail(f"images[{k}]", f"expected an object, got {type(img).__name__}")
            if not _is_int(img.get("id")):
                raise self._fail(f"images[{k}]", f"'id' must be an integer, got {img.get('id')!r}")
            record = f"image id {img['id']} (images[{k}])"
            if img["id"] in sizes:
                raise self._fail(record, "duplicate image id")
            name = img.get("file_name")
            if not isinstance(name, str) or not name:
                raise self._fail(record, f"'file_name' must be a non-empty string, got {name!r}")
            for key in ("width", "height"):
                if not _is_int(img.get(key)) or img[key] <= 0:
                    raise self._fail(record, f"{key!r} must be a positive integer, got {img.get(key)!r}")
            path = os.path.join(self.image_dir, name)
            if not os.path.isfile(path):
                raise self._fail(record, f"image file not found: {path}")
            self._check_size(path, img)  # the header only: about 20 us an image
            sizes[img["id"]] = (img["width"], img["height"])

        categories: set[int] = set()
        for k, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise self._fail(f"categories[{k}]", f"expected an object with an integer 'id', got {cat!r}")
            if cat["id"] in categories:
                raise self._fail(f"category id {cat['id']} (categories[{k}])", "duplicate category id")
            categories.add(cat["id"])

        annotation_ids: set[int] = set()
        for k, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict):
                raise self._fail(f"annotations[{k}]", f"expected an object, got {type(ann).__name__}")
            if not _is_int(ann.get("id")):
                raise self._fail(f"annotations[{k}]", f"'id' must be an integer, got {ann.get('id')!r}")
            record = f"annotation id {ann['id']} (annotations[{k}])"
            if ann["id"] in annotation_ids:
                raise self._fail(record, "duplicate annotation id")
            annotation_ids.add(ann["id"])
            image_id = ann.get("image_id")
            if not _is_int(image_id) or image_id not in sizes:
                raise self._fail(record, f"'image_id' {image_id!r} is not the id of any image")
            if not _is_int(ann.get("category_id")) or ann["category_id"] not in categories:
                raise self._fail(record, f"'category_id' {ann.get('category_id')!r} is not the id of any category")
            bbox = ann.get("bbox")
            if (not isinstance(bbox, list) or len(bbox) != 4
                    or not all(_is_number(v) and math.isfinite(v) for v in bbox)):
                raise self._fail(record, f"'bbox' must be 4 finite numbers [x, y, width, height], got {bbox!r}")
            x, y, w, h = bbox
            if w < 0 or h < 0:
                raise self._fail(record, f"'bbox' {bbox} has a negative width or height")
            width, height = sizes[image_id]
            tol = BOX_TOLERANCE
            if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
                raise self._fail(
                    record, f"'bbox' {bbox} (x1, y1, x2, y2 = {x}, {y}, {x + w}, {y + h}) lies outside image "
                    f"id {image_id} of width {width} and height {height} (by more than {tol:g} px)")
            crowd = ann.setdefault("iscrowd", 0)
            if not _is_int(crowd) or crowd not in (0, 1):
                raise self._fail(record, f"'iscrowd' must be 0 or 1, got {crowd!r}")
            area = ann.setdefault("area", float(w * h))
            if not _is_number(area) or not math.isfinite(area) or area < 0:
                raise self._fail(record, f"'area' must be a finite non-negative number, got {area!r}")
            if self.masks:
                self._validate_segmentation(ann.get("segmentation"), record, width, height)

    def _validate_segmentation(self, seg: Any, record: str, width: int, height: int) -> None:
        if isinstance(seg, list):
            for p, poly in enumerate(seg):
                if (not isinstance(poly, list) or len(poly) % 2
                        or not all(_is_number(v) and math.isfinite(v) for v in poly)):
                    raise self._fail(record, f"'segmentation' polygon {p} must be a list of (x, y) points "
                                     "given as an even number of finite numbers")
        elif isinstance(seg, dict):
            size, counts = seg.get("size"), seg.get("counts")
            if size != [height, width]:
                raise self._fail(record, f"'segmentation' RLE size {size!r} differs from the image's "
                                 f"[height, width] = [{height}, {width}]")
            if isinstance(counts, list):
                if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                    raise self._fail(record, "'segmentation' uncompressed RLE counts must be non-negative "
                                     f"integers summing to height * width = {height * width}")
            elif isinstance(counts, str):
                runs = compressed_rle_counts(counts)
                if runs is None or sum(runs) != height * width:
                    raise self._fail(record, "'segmentation' compressed RLE counts "
                                     + ("are not a valid RLE string" if runs is None else
                                        f"cover {sum(runs)} pixels, not height * width = {height * width}"))
            else:
                raise self._fail(record, "'segmentation' RLE counts must be a list of integers "
                                 f"(uncompressed) or a string (compressed), got {type(counts).__name__}")
        else:
            raise self._fail(record, "'segmentation' must be a list of polygons or an RLE object "
                             f"{{'size', 'counts'}} (needed with masks=True), got {seg!r}")

    # ---------------------------------------------------------------- items

    def __len__(self) -> int:
        return len(self.image_ids)

    def _check_size(self, path: str, info: dict, image: Image.Image | None = None) -> None:
        """DatasetError unless the image file (or its opened ``image``) has the json's size and pixels
        that can be read (:func:`check_pixel_format`)."""
        record = f"image id {info['id']}"
        try:
            with contextlib.nullcontext(image) if image is not None else Image.open(path) as im:
                check_pixel_format(im)
                if im.size == (info["width"], info["height"]):
                    return
                size, orientation = im.size, im.getexif().get(_EXIF_ORIENTATION, 1)
        except (OSError, ValueError) as e:  # PIL raises UnidentifiedImageError (an OSError) etc.
            raise DatasetError(f"{path} ({record} of {self.annotation_file}): cannot read image ({e})") from None
        rotated = orientation in (5, 6, 7, 8) and size == (info["height"], info["width"])
        raise DatasetError(
            f"{path} ({record} of {self.annotation_file}): image is {size[0]}x{size[1]} (width x height) "
            f"but the annotation file says {info['width']}x{info['height']}"
            + (f"; the file's EXIF orientation ({orientation}) turns it by 90 degrees for display, but "
               "images are read as stored (as pycocotools and torchvision do): annotate the stored "
               "pixels, or save the image turned" if rotated else ""))

    def _load_image(self, info: dict) -> torch.Tensor:
        path = os.path.join(self.image_dir, info["file_name"])
        record = f"image id {info['id']}"
        try:
            with Image.open(path) as im:
                self._check_size(path, info, im)  # again: the file may have changed since
                image = image_to_tensor(im)
        except DatasetError:
            raise
        except (OSError, ValueError) as e:  # PIL raises UnidentifiedImageError (an OSError) etc.
            raise DatasetError(f"{path} ({record} of {self.annotation_file}): cannot read image ({e})") from None
        return image

    def _decode_mask(self, seg: Any, height: int, width: int) -> np.ndarray:
        if isinstance(seg, list):  # polygons, possibly several parts
            # Parts of fewer than 3 points cover nothing (COCO has a few); pycocotools would
            # even read a 4-number part as a box, so they are skipped.
            polygons = [poly for poly in seg if len(poly) >= 6]
            if not polygons:
                return np.zeros((height, width), dtype=np.uint8)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(seg["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        else:  # compressed RLE, used as is
            rle = seg
        return decode_rle(rle)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        image = self._load_image(info)
        width, height = info["width"], info["height"]

        boxes, labels, areas, masks = [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann["iscrowd"]:
                continue
            x, y, w, h = ann["bbox"]
            box = [min(max(x, 0.0), width), min(max(y, 0.0), height),
                   min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]
            if box[2] - box[0] < MIN_BOX_SIDE or box[3] - box[1] < MIN_BOX_SIDE:
                continue
            boxes.append(box)
            labels.append(self._label_of[ann["category_id"]])
            areas.append(ann["area"])
            if self.masks:
                masks.append(self._decode_mask(ann["segmentation"], height, width))

        n = len(boxes)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
        }
        if self.masks:
            stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8)
            target["masks"] = torch.from_numpy(stacked.astype(np.uint8, copy=False))
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(images={len(self)}, classes={self.num_classes - 1}, "
                f"masks={self.masks}, annotation_file={self.annotation_file!r})")


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """DataLoader ``collate_fn`` for detection: ``[(image, target), ...]`` -> ``(images, targets)``.

    Images differ in size, so they are not stacked: torchvision's detectors take a list of
    ``[3, H, W]`` images and a list of target dicts.
    """
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
