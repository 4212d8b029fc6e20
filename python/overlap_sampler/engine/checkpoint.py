"""Checkpoints: everything needed to continue a run bit for bit, written atomically.

A checkpoint is a dict saved with ``torch.save`` holding only tensors, numbers, strings, lists, tuples
and dicts, so it loads with ``torch.load(weights_only=True)`` (no pickled code is ever executed):

    format            CHECKPOINT_FORMAT
    iteration         iterations completed
    model             state_dict of the (unwrapped) detector
    optimizer, scheduler, scaler    their state_dicts (scaler: {} when AMP is off)
    config            TrainConfig.to_dict()
    num_classes       int, background included
    category_ids      list: label l -> COCO category id category_ids[l - 1]
    category_names    list: label l -> category name (optional: absent from older checkpoints)
    rng               list over ranks of {"python", "numpy", "torch", "cuda"} generator states
    data              {"seed", "position"}: the data order (see train.IterationBatchSampler)
    history           the metrics logged so far (continued by a resumed run)
"""

from __future__ import annotations

import os
import random
import zipfile
from typing import Any

import numpy as np
import torch

from ..io_safety import atomic_write, replace_with_link
from ..torch_load import load_error_reason, not_a_torch_file
from .config import TrainConfig, apply_preset

CHECKPOINT_FORMAT = 1
LAST = "last_checkpoint.pth"
REQUIRED_KEYS = ("format", "iteration", "model", "config", "num_classes", "category_ids")


def checkpoint_name(iteration: int) -> str:
    return f"checkpoint_{iteration:07d}.pth"


# ---------------------------------------------------------------------- RNG states
def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as weights_only-loadable values.

    ``cuda`` is the current device's generator (each DDP process owns one GPU), or None when CUDA was
    never initialised in this process (asking would create a context on every GPU).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned (the CUDA state into the current device's generator)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


# ---------------------------------------------------------------------- save / load
def save_checkpoint(state: dict[str, Any], output_dir: str) -> str:
    """Write ``state`` to ``<output_dir>/checkpoint_<iteration:07d>.pth`` and update
    ``<output_dir>/last_checkpoint.pth`` (a hard link to it), both atomically (``io_safety``: a run
    killed mid-write never leaves half a checkpoint under either name). Returns the numbered file's path.

    ``state`` must hold at least the keys of ``REQUIRED_KEYS`` (see the module docstring).
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"save_checkpoint: state lacks {', '.join(missing)}")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, checkpoint_name(int(state["iteration"])))
    with atomic_write(path, "wb", what="checkpoint") as f:
        torch.save(state, f)
    replace_with_link(path, os.path.join(output_dir, LAST), what="checkpoint")
    return path


def is_torchscript_archive(path: str) -> bool:
    """Whether ``path`` is a ``torch.jit.save`` archive (a zip with ``<archive>/constants.pkl``;
    ``torch.save``'s zips have none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (``weights_only`` loading: no code runs).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not a readable
    checkpoint of this format (truncated, another format, keys missing); both messages name ``path``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_torchscript_archive(path):
        raise ValueError(f"checkpoint {path} is a TorchScript model (as `export` writes), not a training "
                         "checkpoint: give the .pth file it was exported from")
    other = not_a_torch_file(path)
    if other:  # torch's unpickler would answer e.g. "KeyError: 101" for a text file
        raise ValueError(f"checkpoint {path} is not a readable checkpoint ({other})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise ValueError(f"checkpoint {path} is not a readable checkpoint ({load_error_reason(e)})") from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is not an overlap-sampler training checkpoint "
                         f"(missing {', '.join(missing)})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {state['format']}, this version reads "
                         f"{CHECKPOINT_FORMAT}")
    return state


def config_from_checkpoint(state: dict[str, Any], path: str = "") -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (``path`` names it in errors).

    With ``sampler='random'``, older versions accepted method settings that torchvision's sampler
    ignores (``num_bins`` and the like); they never took effect, so they read as the preset's values.
    """
    settings = dict(state["config"])
    sampler = settings.get("sampler")
    if isinstance(sampler, dict) and sampler.get("sampler") == "random":
        settings["sampler"] = apply_preset(dict(sampler), "random")
    try:
        return TrainConfig.from_dict(settings)
    except ValueError as e:
        raise ValueError(f"checkpoint {path or '(in memory)'}: its config is not valid: {e}") from e


def backbone_layout(config: TrainConfig) -> dict[str, Any]:
    """A ResNet backbone's ``frozen_batchnorm`` and ``trainable_backbone_layers`` (empty for "small").

    They follow the config (torchvision's rule: frozen BatchNorm and 3 trainable stages with
    pretrained weights), not whether files are loaded now, so that a checkpoint's state dict and
    optimizer state fit the model rebuilt from its config."""
    if config.backbone == "small":
        return {}
    pretrained = config.weights is not None or config.backbone_weights is not None
    layers = config.trainable_backbone_layers
    return {"frozen_batchnorm": pretrained, "trainable_backbone_layers": (3 if pretrained else 5) if layers is None
            else layers}


def checkpoint_layout(state: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """The backbone layout a checkpoint was trained with: stored in it since this version; older
    versions always built ResNets with trainable BatchNorm and every stage trainable."""
    if "backbone_layout" in state:
        return dict(state["backbone_layout"])
    return {} if config.backbone == "small" else {"frozen_batchnorm": False, "trainable_backbone_layers": 5}


def build_model_for(config: TrainConfig, num_classes: int, *, initial_weights: bool = True,
                    layout: dict[str, Any] | None = None) -> torch.nn.Module:
    """The detector ``config`` describes (``initial_weights=False`` skips ``config.weights``: used when a
    checkpoint's state dict is about to replace them anyway). ``layout`` overrides
    :func:`backbone_layout` (a checkpoint's own, see :func:`checkpoint_layout`)."""
    from ..detection import build_detector

    resnet = dict(backbone_layout(config) if layout is None or config.backbone == "small" else layout)
    if resnet:
        resnet["backbone_weights"] = config.backbone_weights if initial_weights else None
    return build_detector(config.arch, num_classes, backbone=config.backbone, sampler=config.sampler,
                          weights=config.weights if initial_weights else None,
                          box_nms_thresh=config.box_nms_thresh, min_size=config.min_size,
                          max_size=config.max_size, **resnet)



def categories_of(state: dict[str, Any]) -> list[dict[str, Any]]:
    """A checkpoint's label mapping: ``[{"label": l, "category_id": id, "name": name}, ...]`` for
    labels 1.. (0 is the background); the name is the id as a string where the checkpoint has none."""
    ids = [int(i) for i in state["category_ids"]]
    names = state.get("category_names") or [str(i) for i in ids]
    return [{"label": label, "category_id": i, "name": str(name)}
            for label, (i, name) in enumerate(zip(ids, names), start=1)]


def load_model_from_checkpoint(path: str, map_location: Any = "cpu") -> tuple[torch.nn.Module, TrainConfig]:
    """Rebuild the detector saved in a training checkpoint and load its weights.

    Returns ``(model in eval mode on map_location, TrainConfig)``. The label -> COCO category mapping is
    ``load_checkpoint(path)["category_ids"]`` (not attached to the model, which stays scriptable).
    Errors: ``FileNotFoundError`` / ``ValueError`` naming ``path`` (see ``load_checkpoint``).
    """
    return model_from_checkpoint_state(load_checkpoint(path, map_location="cpu"), path, map_location)


def model_from_checkpoint_state(state: dict[str, Any], path: str,
                                map_location: Any = "cpu") -> tuple[torch.nn.Module, TrainConfig]:
    """:func:`load_model_from_checkpoint` for a checkpoint already loaded (``path`` names it in errors)."""
    config = config_from_checkpoint(state, path)
    model = build_model_for(config, int(state["num_classes"]), initial_weights=False,
                            layout=checkpoint_layout(state, config))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: weights do not fit the model its config describes: {e}") from e
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(torch.device(map_location))
    return model.eval(), config


def load_detector(path: str, map_location: Any = "cpu") -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """The detector in ``path`` (eval mode) and its categories (see :func:`categories_of`): from a
    training checkpoint, or from a TorchScript file written by ``export`` (its ``categories.json``)."""
    from .export import load_categories

    if os.path.isfile(path) and is_torchscript_archive(path):
        categories = load_categories(path)  # first: a file without them was not written by export
        return torch.jit.load(path, map_location=map_location).eval(), categories
    state = load_checkpoint(path, map_location="cpu")
    model, _ = model_from_checkpoint_state(state, path, map_location)
    return model, categories_of(state)
