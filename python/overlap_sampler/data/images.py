"""Image files as detector inputs: float32 ``[3, H, W]`` in [0, 1], pixels as stored.

One conversion for training data, evaluation and prediction, so that a model sees the same values
whichever way an image reaches it. EXIF orientation is not applied (as pycocotools and torchvision).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["check_pixel_format", "image_size", "image_to_tensor", "read_image"]

# PIL modes of single-channel images with more than 8 bits (16-bit PNGs open as "I;16" or "I"):
# PIL's convert("RGB") clips them at 255, so they are scaled by 65535 instead.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I")
# Floating-point pixels have no agreed range ([0, 1], [0, 255], radiance...): converting them would
# guess, and PIL's own conversion truncates [0, 1] to black.
_UNSUPPORTED_MODES = ("F",)


def check_pixel_format(image: Image.Image) -> None:
    """``ValueError`` if :func:`image_to_tensor` refuses the pixels of the opened ``image``
    (floating point, mode ``F``). Reads the header only, so datasets check every file up front."""
    if image.mode in _UNSUPPORTED_MODES:
        raise ValueError(f"floating-point pixels (PIL mode {image.mode!r}) have no known range: save the image "
                         "with 8 or 16 bits per channel")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An opened PIL image as float32 ``[3, H, W]`` in [0, 1] (grey and palette images as RGB,
    alpha dropped, 16-bit grey scaled by 65535, wider integers clipped there). ``ValueError`` for
    floating-point images (mode ``F``, see :func:`check_pixel_format`)."""
    check_pixel_format(image)
    if image.mode in _WIDE_GRAY_MODES:
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        return torch.from_numpy(np.clip(gray, 0.0, 1.0)).expand(3, *gray.shape).contiguous()
    rgb = np.array(image.convert("RGB"))  # a writable copy for torch.from_numpy
    return torch.from_numpy(rgb).permute(2, 0, 1).to(torch.float32).div_(255.0).contiguous()


def read_image(path: str) -> torch.Tensor:
    """:func:`image_to_tensor` of the file at ``path``; ``ValueError`` naming it if it cannot be read."""
    try:
        with Image.open(path) as image:
            return image_to_tensor(image)
    except (OSError, ValueError) as e:  # PIL raises UnidentifiedImageError (an OSError) etc.
        raise ValueError(f"{path}: cannot read image ({e})") from None


def image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of the image file at ``path``, from its header; ``ValueError`` naming it if
    it cannot be read (or :func:`read_image` would refuse its pixels)."""
    try:
        with Image.open(path) as image:
            check_pixel_format(image)
            return image.size
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
