"""Datasets: COCO-format detection data (pycocotools) and the built-in synthetic crowded-shapes set.

- :class:`CocoDetection` reads a COCO instances file and its images as torchvision detection
  targets (boxes ``x1, y1, x2, y2``, contiguous labels ``1..C``, optional masks), validating every
  record up front; :func:`collate` batches them for a DataLoader.
- :func:`make_synthetic_coco` writes a deterministic synthetic COCO dataset of crowded, overlapping
  shapes; :func:`synthetic_dataset` is the built-in one, generated once into a cache folder.
"""

from .coco import BOX_TOLERANCE, MIN_BOX_SIDE, CocoDetection, DatasetError, collate, compressed_rle_counts, decode_rle
from .synthetic import (
    CATEGORIES,
    SYNTHETIC_IMAGE_SIZE,
    SYNTHETIC_NUM_IMAGES,
    SYNTHETIC_SEED,
    SYNTHETIC_VERSION,
    default_cache_dir,
    make_synthetic_coco,
    synthetic_dataset,
)

__all__ = [
    "BOX_TOLERANCE", "CATEGORIES", "MIN_BOX_SIDE", "CocoDetection", "DatasetError", "SYNTHETIC_IMAGE_SIZE",
    "SYNTHETIC_NUM_IMAGES", "SYNTHETIC_SEED", "SYNTHETIC_VERSION", "collate", "compressed_rle_counts",
    "default_cache_dir", "decode_rle", "make_synthetic_coco", "synthetic_dataset",
]
