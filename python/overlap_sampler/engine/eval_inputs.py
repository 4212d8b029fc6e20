"""What a checkpoint's evaluation reads: its detector and the COCO validation set to score it on.

One place for ``eval`` and the analyses (``analyze upper-bound``) to resolve ``--checkpoint`` and the
data flags the same way: the checkpoint's own validation set by default (its run's COCO files or the
built-in synthetic split, from the cache the run used), the synthetic split, or given COCO files;
outputs checked against the inputs and their folders proven writable before the slow part.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Optional

import torch

from ..io_safety import check_not_inputs, prepare_output_file
from .distributed import resolve_device

DATASET_CHOICES = ("checkpoint", "synthetic", None)


def has_mask_head(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a detector with a mask head (torchvision's ``roi_heads.has_mask()``)."""
    roi_heads = getattr(model, "roi_heads", None)
    has_mask = getattr(roi_heads, "has_mask", None)
    return bool(has_mask()) if callable(has_mask) else False


@dataclasses.dataclass
class EvalInputs:
    """A loaded detector and its validation set.

    Attributes:
        model: the detector, eval mode, on the CPU (a TorchScript module for an ``export`` file).
        config: the run's ``TrainConfig``; None for a TorchScript file (it holds no run).
        data: the validation set, a :class:`overlap_sampler.data.CocoDetection` whose
            ``category_ids`` are the checkpoint's (label ``l`` is ``category_ids[l - 1]``).
        image_dir, annotation_file: where ``data`` was read from.
        device: the resolved device to run on.
    """

    model: torch.nn.Module
    config: Optional[Any]
    data: Any
    image_dir: str
    annotation_file: str
    device: torch.device


def check_data_choice(dataset: Optional[str], val_images: Optional[str], val_annotations: Optional[str]) -> None:
    """``ValueError`` unless exactly one data source is named: ``dataset`` ("checkpoint" or
    "synthetic"), or ``dataset=None`` with both ``val_images`` and ``val_annotations``."""
    if dataset not in DATASET_CHOICES:
        raise ValueError(f"dataset must be 'checkpoint', 'synthetic' or None, got {dataset!r}")
    if dataset is None and (val_images is None or val_annotations is None):
        raise ValueError("val_images and val_annotations are both needed when dataset is None "
                         f"(got val_images={val_images!r}, val_annotations={val_annotations!r})")
    if dataset is not None and (val_images is not None or val_annotations is not None):
        raise ValueError(f"give either dataset={dataset!r} or val_images + val_annotations (with "
                         "dataset=None), not both")


def load_eval_inputs(checkpoint: str, *, dataset: Optional[str] = "checkpoint", val_images: Optional[str] = None,
                     val_annotations: Optional[str] = None, device: str = "auto",
                     outputs: Iterable[tuple[str, str]] = (), masks: Optional[bool] = None,
                     advice: str = "give another output folder") -> EvalInputs:
    """Load ``checkpoint``'s detector and the validation set to evaluate it on, after checking the outputs.

    Steps, each failing before the next (and all before any image is run): the data choice
    (:func:`check_data_choice`); the checkpoint exists; no output is the checkpoint; the device;
    each output's folder is writable (:func:`~overlap_sampler.io_safety.prepare_output_file`); the
    model loads; no output is the annotation file; the annotation file is valid and has the
    categories the checkpoint was trained on.

    Args:
        checkpoint: a checkpoint written by ``train``, or a TorchScript file written by ``export``
            (which holds no run: give ``dataset="synthetic"`` or the ``val_*`` files).
        dataset: ``"checkpoint"`` for the validation set the checkpoint's run was configured with
            (its COCO files, or the built-in synthetic split from the run's ``data_root``),
            ``"synthetic"`` for the built-in synthetic validation split, or None to use
            ``val_images`` + ``val_annotations`` (a COCO image folder and instances json).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        outputs: ``(what, path)`` of each file the caller will write (e.g. ``("metrics file",
            "run/eval_last_checkpoint.json")``); ``what`` names it in errors.
        masks: load the instance masks (None: when the model has a mask head).
        advice: the end of the error message when an output is an input.

    Raises:
        ValueError: a bad data choice, an output that is an input, a TorchScript file with
            ``dataset="checkpoint"``, a run without a validation set, other categories.
        FileNotFoundError: the checkpoint does not exist.
        OutputError: an output folder that cannot be written.
    """
    from overlap_sampler.data import CocoDetection, synthetic_dataset
    from overlap_sampler.engine.checkpoint import (
        is_torchscript_archive,
        load_checkpoint,
        load_detector,
        model_from_checkpoint_state,
    )

    check_data_choice(dataset, val_images, val_annotations)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    outputs = list(outputs)
    check_not_inputs(outputs, [("checkpoint", checkpoint)], advice=advice)
    target = resolve_device(device)  # before the slow part: a bad device fails at once
    for what, path in outputs:
        prepare_output_file(path, what)  # so does a folder that cannot be written
    if is_torchscript_archive(checkpoint):
        if dataset == "checkpoint":
            raise ValueError(f"{checkpoint} is an exported TorchScript model: it holds no run, so no validation "
                             "set; give val_images and val_annotations (or dataset='synthetic')")
        model, categories = load_detector(checkpoint, target)
        config, trained_categories = None, [c["category_id"] for c in categories]
    else:
        state = load_checkpoint(checkpoint, map_location="cpu")
        model, config = model_from_checkpoint_state(state, checkpoint)
        trained_categories = state["category_ids"]
    if dataset == "checkpoint" and config.dataset == "coco":
        if config.val_images is None or config.val_annotations is None:
            raise ValueError(f"the run of checkpoint {checkpoint} had no validation set: give val_images and "
                             "val_annotations")
        image_dir, annotation_file = config.val_images, config.val_annotations
    elif dataset is not None:
        # The cache the checkpoint was trained from (train's --data-root).
        image_dir, annotation_file = synthetic_dataset("val", root=config.data_root if config else None)
    else:
        image_dir, annotation_file = val_images, val_annotations
    check_not_inputs(outputs, [("annotation file", annotation_file)], advice=advice)

    if masks is None:
        masks = getattr(config, "arch", None) == "maskrcnn" or has_mask_head(model)
    data = CocoDetection(image_dir, annotation_file, masks=masks)
    # The model's label l means trained_categories[l - 1]; evaluation maps labels with the
    # dataset's list, so the two must agree.
    if list(data.category_ids) != list(trained_categories):
        raise ValueError(f"{annotation_file}: categories {list(data.category_ids)} differ from the "
                         f"categories {list(trained_categories)} the checkpoint was trained on")
    return EvalInputs(model, config, data, image_dir, annotation_file, target)
