"""The built-in dataset: crowded, overlapping shapes written as a real COCO dataset.

Each image holds 3-10 objects of 3 classes (rectangle, ellipse, triangle) in random vivid colours
on a textured, noisy, greyish background; most are placed in clusters, so boxes overlap the way they do in
crowded scenes (what the Overlap Sampler is about). Later objects occlude earlier ones: an object's
mask is its visible part and its box is the box of that mask. Placements that would hide more than
half of an earlier object are redrawn, so every annotated object stays recognisable and no object
is visible without an annotation.

Masks are stored both ways COCO allows, so both loader paths are exercised: a polygon for a
rectangle or triangle that nothing occludes, a compressed RLE (pycocotools' encoding, counts as a
string) for ellipses and for occluded objects. Shapes are rasterised by pycocotools from the stored
polygon, so the painted pixels, the decoded mask and the box agree exactly.
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from .coco import decode_rle

__all__ = [
    "CATEGORIES", "SYNTHETIC_IMAGE_SIZE", "SYNTHETIC_NUM_IMAGES", "SYNTHETIC_SEED", "SYNTHETIC_VERSION",
    "default_cache_dir", "make_synthetic_coco", "synthetic_dataset",
]

# ---- the built-in dataset, in one place. A cached dataset is reused only if its marker file holds
# the same arguments and _GENERATOR_VERSION, so changing these numbers or bumping _GENERATOR_VERSION
# (whenever the drawing code changes) regenerates stale caches; SYNTHETIC_VERSION names the folder.
SYNTHETIC_VERSION = "synthetic-v1"
#: Images per split of the built-in dataset (sized for train + eval of the small model in well under
#: 15 minutes on 2 CPU cores).
SYNTHETIC_NUM_IMAGES = {"train": 400, "val": 100}
SYNTHETIC_IMAGE_SIZE = 128
SYNTHETIC_SEED = 0

#: COCO categories of the synthetic data (ids 1..3, so labels equal category ids).
CATEGORIES = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
_POLYGON_SHAPES = {"rectangle", "triangle"}

# Bumped whenever the generator's output changes; stored in the marker file.
_GENERATOR_VERSION = 2
_MARKER = "COMPLETE"
_ANNOTATION_FILE = "instances.json"
_IMAGE_DIR = "images"

_MIN_OBJECTS, _MAX_OBJECTS = 3, 10
_MIN_SIDE, _MAX_SIDE = 0.15, 0.55       # object size, fraction of the image side
_MIN_VISIBLE_PIXELS = 30
_MIN_VISIBLE_FRACTION = 0.5             # of an object's full area, after all later objects
_MIN_COLOUR_DISTANCE = 0.35             # Euclidean, RGB in [0, 1]: to the background and to covered objects
_NOISE_SIGMA = 0.03
_PLACEMENT_TRIES = 30


# ---------------------------------------------------------------- drawing one image

def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a ``[g, g, C]`` grid to ``[size, size, C]`` (a smooth texture)."""
    g = grid.shape[0]
    pos = np.linspace(0.0, g - 1.0, size)
    lo = np.minimum(np.floor(pos).astype(np.int64), g - 2)
    frac = (pos - lo)[:, None]
    rows = grid[lo] * (1.0 - frac[..., None]) + grid[lo + 1] * frac[..., None]             # [size, g, C]
    return rows[:, lo] * (1.0 - frac[None, :, :]) + rows[:, lo + 1] * frac[None, :, :]     # [size, size, C]


def _vivid_colour(rng: np.random.Generator) -> np.ndarray:
    """A random saturated RGB colour in [0, 1]: any hue, so colour does not tell the class."""
    hue, saturation, value = rng.uniform(0.0, 1.0), rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    # Low-saturation: mostly grey levels with a faint tint, so that objects (vivid colours) stand
    # out and a small detector trained from scratch learns objectness within minutes.
    base = rng.uniform(0.3, 0.7) + rng.normal(0.0, 0.04, size=3)
    grid = rng.normal(0.0, 0.08, size=(6, 6, 1)) + rng.normal(0.0, 0.02, size=(6, 6, 3))
    return np.clip(base + _upsample(grid, size), 0.0, 1.0)


def _shape_outline(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """Vertices ``[k, 2]`` (x, y) of a shape centred on the origin."""
    side = size * np.exp(rng.uniform(np.log(_MIN_SIDE), np.log(_MAX_SIDE)))
    aspect = np.exp(rng.uniform(np.log(0.6), np.log(1.6)))
    half_w, half_h = 0.5 * side * np.sqrt(aspect), 0.5 * side / np.sqrt(aspect)
    if shape == "rectangle":
        angle = np.deg2rad(rng.uniform(-20.0, 20.0))  # stays rectangle-like, not a diamond
        points = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    elif shape == "ellipse":
        angle = rng.uniform(0.0, np.pi)
        t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        points = np.stack([half_w * np.cos(t), half_h * np.sin(t)], axis=1)
    else:  # triangle inscribed in a slightly enlarged ellipse, so its area is comparable
        angle = rng.uniform(0.0, 2.0 * np.pi)
        t = np.pi / 2 + 2.0 * np.pi * np.arange(3) / 3 + rng.uniform(-0.25, 0.25, size=3)
        points = 1.25 * np.stack([half_w * np.cos(t), half_h * np.sin(t)], axis=1)
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _place(outline: np.ndarray, centre: np.ndarray, size: int) -> list[float]:
    """Translate an outline to ``centre``, shifted so that all of it lies inside the image."""
    extent = np.abs(outline).max(axis=0)
    scale = min(1.0, (size / 2 - 1.0) / extent.max())
    outline, extent = outline * scale, extent * scale
    centre = np.clip(centre, extent + 1.0, size - 1.0 - extent)
    # Rounded once, here: the json holds these numbers and the mask is rasterised from them.
    return [round(float(v), 2) for v in (outline + centre).reshape(-1)]


def _rasterise(polygon: list[float], size: int) -> np.ndarray:
    rle = mask_utils.frPyObjects([polygon], size, size)
    return decode_rle(mask_utils.merge(rle)).astype(bool)


def _draw_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict]]:
    """One image (uint8 ``[size, size, 3]``) and its objects (category id, polygon, visible mask)."""
    background = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int64)  # index of the object seen at each pixel
    objects: list[dict] = []
    wanted = int(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1))
    clusters = rng.uniform(0.25 * size, 0.75 * size, size=(int(rng.integers(1, 3)), 2))
    tries = 0
    while len(objects) < wanted and tries < wanted * _PLACEMENT_TRIES:
        tries += 1
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        outline = _shape_outline(rng, category["name"], size)
        if rng.random() < 0.75:  # crowd around a cluster point
            centre = clusters[int(rng.integers(len(clusters)))] + rng.normal(0.0, 0.15 * size, size=2)
        else:
            centre = rng.uniform(0.1 * size, 0.9 * size, size=2)
        polygon = _place(outline, centre, size)
        mask = _rasterise(polygon, size)
        if mask.sum() < _MIN_VISIBLE_PIXELS:
            continue
        # Redraw if this would hide too much of an earlier object.
        covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(objects))
        if any(obj["visible"] - covered[j] < max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * obj["area"])
               for j, obj in enumerate(objects)):
            continue
        # The object must stand out from what it is painted over, or its outline is invisible.
        neighbours = [background[mask].mean(axis=0)] + [objects[j]["colour"] for j in np.flatnonzero(covered)]
        for _ in range(10):
            colour = _vivid_colour(rng)
            if min(np.linalg.norm(colour - other) for other in neighbours) >= _MIN_COLOUR_DISTANCE:
                break
        else:
            continue
        for j in np.flatnonzero(covered):
            objects[j]["visible"] -= int(covered[j])
        owner[mask] = len(objects)
        objects.append({"category_id": category["id"], "shape": category["name"], "polygon": polygon,
                        "colour": colour, "area": int(mask.sum()), "visible": int(mask.sum())})

    image = background.copy()
    for j, obj in enumerate(objects):
        image[owner == j] = obj["colour"]
    image += rng.normal(0.0, _NOISE_SIGMA, size=image.shape)
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    for j, obj in enumerate(objects):
        obj["mask"] = owner == j
    return pixels, objects


def _annotation(obj: dict, size: int) -> dict | None:
    """COCO annotation (without ids) of an object's visible part; None if too little is visible."""
    mask = obj["mask"]
    area = int(mask.sum())
    if area < _MIN_VISIBLE_PIXELS:
        return None
    if obj["shape"] in _POLYGON_SHAPES and area == obj["area"]:  # unoccluded: the polygon is exact
        segmentation: list | dict = [obj["polygon"]]
    else:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {"size": [size, size], "counts": rle["counts"].decode("ascii")}
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]
    return {"category_id": obj["category_id"], "segmentation": segmentation, "area": float(area),
            "bbox": bbox, "iscrowd": 0}


# ---------------------------------------------------------------- writing a dataset

def _split_key(split: str) -> int:
    # Python's hash() of a str changes from run to run; crc32 does not.
    return zlib.crc32(split.encode("utf-8"))


def _generate(folder: str, params: dict) -> None:
    size, split = params["image_size"], params["split"]
    os.makedirs(os.path.join(folder, _IMAGE_DIR))
    images, annotations = [], []
    for i in tqdm(range(params["num_images"]), desc=f"synthetic {split}", unit="img", disable=None):
        # One generator per image: image i does not depend on how many images come before it.
        rng = np.random.default_rng(np.random.SeedSequence([params["seed"], _split_key(split), i]))
        pixels, objects = _draw_image(rng, size)
        image_id = i + 1
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(os.path.join(folder, _IMAGE_DIR, file_name), format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            ann = _annotation(obj, size)
            if ann is not None:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    data = {
        "info": {"description": "overlap-sampler synthetic crowded shapes", "version": SYNTHETIC_VERSION,
                 **params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    with open(os.path.join(folder, _ANNOTATION_FILE), "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    # Written last: a folder with this marker is complete.
    with open(os.path.join(folder, _MARKER), "w", encoding="utf-8") as f:
        json.dump(params, f, sort_keys=True)


def _is_complete(folder: str, params: dict) -> bool:
    try:
        with open(os.path.join(folder, _MARKER), encoding="utf-8") as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _lock(path: str) -> Iterator[bool]:
    """Exclusive lock on ``path`` while generating; yields whether a lock is held.

    Only saves work (other processes wait instead of generating the same bytes): correctness comes
    from the atomic rename, so where ``fcntl`` or file locking is missing this runs unlocked.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # e.g. ENOLCK on some network file systems
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(root: str, split: str, min_age_s: float = 3600.0) -> None:
    """Remove temporary folders of crashed runs (untouched for ``min_age_s``; younger ones may
    belong to a process on another machine sharing ``root``)."""
    now = time.time()
    for name in os.listdir(root):
        if not name.startswith((f".{split}.tmp-", f"{split}.old-")):
            continue
        path = os.path.join(root, name)
        with contextlib.suppress(OSError):
            touched = max(os.path.getmtime(path), os.path.getmtime(os.path.join(path, _IMAGE_DIR))
                          if os.path.isdir(os.path.join(path, _IMAGE_DIR)) else 0.0)
            if now - touched > min_age_s:
                shutil.rmtree(path, ignore_errors=True)


def _install(tmp: str, dest: str, params: dict) -> None:
    """Move the finished ``tmp`` folder to ``dest``, replacing an incomplete or different one there."""
    for _ in range(10):
        try:
            os.rename(tmp, dest)  # atomic; fails if dest is a non-empty folder
            return
        except OSError:
            if _is_complete(dest, params):  # another process got there first, with the same bytes
                return
        trash = f"{dest}.old-{os.getpid()}-{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):  # someone else may be moving it too
            os.rename(dest, trash)
        shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not move the generated dataset {tmp} to {dest}")


def make_synthetic_coco(root: str, *, num_images: int, image_size: int = 128, seed: int = 0,
                        split: str = "train") -> tuple[str, str]:
    """Write (once) a synthetic crowded-shapes dataset in COCO format; return its paths.

    The dataset goes to ``root/split/``: ``images/000001.png ...`` (RGB, ``image_size`` square,
    image ids 1..num_images) and ``instances.json`` (``info``, ``images``, ``annotations`` with
    ``bbox`` as COCO ``(x, y, w, h)``, ``segmentation`` as polygon or compressed RLE, ``area``,
    ``iscrowd=0``; ``categories`` rectangle=1, ellipse=2, triangle=3). See the module docstring
    for what the images contain.

    Deterministic: the same arguments give the same bytes (each image drawn from a numpy Generator
    seeded by ``(seed, split, index)``). Idempotent: a complete folder made with the same arguments
    is reused; an incomplete one (no marker file, which is written last) or one made with other
    arguments is regenerated. Safe to call from several processes at once (e.g. DDP ranks): each
    generates into a temporary folder under ``root`` and renames it into place; a file lock makes
    the others wait and reuse the result instead of generating too.

    Args:
        root: folder to write into (created if needed).
        num_images: number of images, >= 1.
        image_size: image side in pixels, >= 32.
        seed: non-negative int; ``split`` also enters the seed, so splits differ.
        split: split name, also the folder name.

    Returns:
        ``(image_dir, annotation_file)``, ready for :class:`~overlap_sampler.data.CocoDetection`.
    """
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(split, str) or not split or split.startswith(".") or os.sep in split or "/" in split:
        raise ValueError(f"split must be a plain folder name such as 'train', got {split!r}")

    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    dest = os.path.join(root, split)
    paths = (os.path.join(dest, _IMAGE_DIR), os.path.join(dest, _ANNOTATION_FILE))
    params = {"generator": _GENERATOR_VERSION, "num_images": num_images, "image_size": image_size,
              "seed": seed, "split": split}
    if _is_complete(dest, params):
        return paths
    os.makedirs(root, exist_ok=True)
    with _lock(os.path.join(root, f".{split}.lock")) as locked:
        if _is_complete(dest, params):  # made by another process while this one waited
            return paths
        if locked:
            _remove_leftovers(root, split)
        tmp = tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=root)
        try:
            _generate(tmp, params)
            _install(tmp, dest, params)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already unless another process won
    return paths


def default_cache_dir() -> str:
    """``$OVERLAP_SAMPLER_CACHE`` if set, else ``~/.cache/overlap_sampler``."""
    return os.environ.get("OVERLAP_SAMPLER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                      "overlap_sampler")


def synthetic_dataset(split: str = "train", *, root: str | None = None) -> tuple[str, str]:
    """The built-in crowded-shapes dataset, generated on first use; returns ``(image_dir, annotation_file)``.

    Splits: ``"train"`` (400 images) and ``"val"`` (100 images), 128 x 128 px, 3 classes (see
    :data:`SYNTHETIC_NUM_IMAGES`). Written to ``<root>/synthetic-v1/<split>/`` where ``root`` is
    the argument, else ``$OVERLAP_SAMPLER_CACHE``, else ``~/.cache/overlap_sampler``; later calls
    reuse it. Takes a few seconds the first time.
    """
    if split not in SYNTHETIC_NUM_IMAGES:
        raise ValueError(f"split must be one of {sorted(SYNTHETIC_NUM_IMAGES)}, got {split!r}")
    base = os.fspath(root) if root is not None else default_cache_dir()
    return make_synthetic_coco(os.path.join(base, SYNTHETIC_VERSION), num_images=SYNTHETIC_NUM_IMAGES[split],
                               image_size=SYNTHETIC_IMAGE_SIZE, seed=SYNTHETIC_SEED, split=split)
