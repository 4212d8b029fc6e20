"""Training configuration: one dataclass, read from TOML/JSON files and overridden by CLI flags.

Precedence (lowest to highest): the dataclass defaults, the config file, the command-line flags.
The merged configuration is written to ``<output_dir>/config.json``; passing that file back with
``--config`` reproduces the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..sampling import SamplerConfig
from ..sampling.config import METHOD_FIELDS

ARCHS = ("fasterrcnn", "maskrcnn")
DATASETS = ("synthetic", "coco")

# The small CPU default samples 128 RoIs per image instead of the paper's 512: on 128 px images with ~20
# objects it learns faster per iteration (a quarter of the RoIs are positives instead of ~4 %) and a step
# costs about half (measured: 0.32 vs 0.71 s per 4-image step, one thread). configs/*_coco.toml set 512.
DEFAULT_BATCH_SIZE_PER_IMAGE = 128

# Paths that a run records: `train` stores them absolute ('~' expanded), so that `eval` and `--config
# config.json` find the files from any folder, not only the one training started in.
PATH_FIELDS = ("data_root", "train_images", "train_annotations", "val_images", "val_annotations", "weights",
               "backbone_weights", "output_dir")


def default_sampler() -> SamplerConfig:
    """The paper's best method (soft K=2 both, epsilon 2) with the small default budget of 128 RoIs."""
    return SamplerConfig(batch_size_per_image=DEFAULT_BATCH_SIZE_PER_IMAGE)


def apply_preset(base: dict[str, Any], name: str) -> dict[str, Any]:
    """``base`` (SamplerConfig fields) with the method fields of preset ``name``."""
    preset = SamplerConfig.preset(name).to_dict()
    return {**base, **{k: preset[k] for k in METHOD_FIELDS}}


def _f(default, help: str, **kwargs):
    """A dataclass field whose help text is shared with the CLI (``cli.py`` builds its flags from it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    """Everything `train` needs. See each field's ``help`` metadata (also the CLI help).

    The defaults train the ``small`` Faster R-CNN on the built-in synthetic dataset (400 training images of
    128 px, 4 per iteration, 1500 iterations = 15 epochs, SGD lr 0.02 with 100 warm-up iterations and
    x0.1 at 1000 and 1333, 128 RoIs per image, one CPU thread) and evaluate it on its 100 validation
    images. Measured on a 2-core machine shared with other jobs: 5 min 5 s in all (0.20 s per iteration),
    box AP 37.9, AP50 65.2; 1000 iterations (same proportions) gave AP 25.5 in 3 min 23 s.
    """

    # --- data
    dataset: str = _f("synthetic", "'synthetic' (the built-in dataset, generated on first use) or 'coco' "
                                   "(COCO-format files given by train_images/train_annotations/val_*)")
    data_root: str | None = _f(None, "where the synthetic dataset is generated/cached (default: "
                                     "$OVERLAP_SAMPLER_CACHE or ~/.cache/overlap_sampler)")
    train_images: str | None = _f(None, "directory of the training images (dataset='coco')")
    train_annotations: str | None = _f(None, "COCO json of the training images (dataset='coco')")
    val_images: str | None = _f(None, "directory of the validation images (dataset='coco')")
    val_annotations: str | None = _f(None, "COCO json of the validation images (dataset='coco')")
    hflip: float = _f(0.5, "probability of a horizontal flip of each training image (deterministic per "
                           "position in the data order, so resuming replays the same flips)")
    # --- model
    arch: str = _f("fasterrcnn", "detector: 'fasterrcnn' or 'maskrcnn'")
    backbone: str = _f("small", "backbone: 'small' (fast, CPU-friendly), 'resnet18_fpn' or 'resnet50_fpn'")
    sampler: SamplerConfig = field(default_factory=default_sampler,
                                   metadata={"help": "RoI sampler settings ([sampler] table)"})
    weights: str | None = _f(None, "initial weights of the whole detector (a local state dict or checkpoint; "
                                   "predictors of another class count keep their init; nothing is downloaded)")
    backbone_weights: str | None = _f(None, "ImageNet weights of the ResNet trunk (a local torchvision file such "
                                            "as resnet50-0676ba61.pth; '~' is expanded)")
    trainable_backbone_layers: int | None = _f(None, "ResNet stages trained, from layer4 down, 0-5 (default: 3 "
                                                     "with weights or backbone_weights, else 5); with pretrained "
                                                     "weights BatchNorm is frozen, as in torchvision")
    min_size: int = _f(128, "images are resized so that their short side is min_size ...")
    max_size: int = _f(224, "... and their long side at most max_size (pixels)")
    box_nms_thresh: float = _f(0.55, "NMS IoU threshold of the RoI head at test time (paper: 0.55)")
    # --- optimisation
    iterations: int = _f(1500, "total training iterations; the LR schedule is defined by this number")
    stop_after: int | None = _f(None, "stop (with a checkpoint) after this iteration although the schedule "
                                      "runs to `iterations`; resume later with --resume auto")
    batch_size: int = _f(4, "images per iteration per process")
    lr: float = _f(0.02, "base learning rate of SGD")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "SGD weight decay")
    warmup_iters: int = _f(100, "iterations of linear LR warm-up from warmup_factor * lr to lr")
    warmup_factor: float = _f(0.001, "LR multiplier at iteration 0 of the warm-up")
    lr_steps: list[int] | None = _f(None, "iterations at which the LR is multiplied by lr_gamma "
                                          "(default: 2/3 and 8/9 of `iterations`)")
    lr_gamma: float = _f(0.1, "LR decay factor at each of lr_steps")
    clip_grad_norm: float | None = _f(None, "clip the gradient norm to this value (off when unset)")
    amp: bool = _f(False, "mixed precision (torch.autocast + GradScaler); CUDA only, ignored with a "
                          "logged note on CPU")
    # --- run
    output_dir: str = _f("output/train", "directory for checkpoints, logs, metrics and plots")
    checkpoint_every: int = _f(500, "write a checkpoint every this many iterations (and at the end)")
    resume: str | None = _f(None, "checkpoint to resume from, or 'auto' = <output_dir>/last_checkpoint.pth "
                                  "if it exists")
    device: str = _f("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")
    seed: int = _f(0, "seed of every random number generator and of the data order")
    num_workers: int = _f(0, "data-loading worker processes per training process")
    threads: int = _f(1, "CPU threads of torch per process (0 = torch's default: all cores). 1 by default: the "
                         "small model's ops are too small to gain much from more (2 threads: 0.165 vs 0.196 "
                         "s/iter on 2 idle cores), and on a busy machine extra threads spin at every barrier "
                         "(2 threads beside one busy process: 0.44 vs 0.22 s/iter)")
    log_every: int = _f(20, "log losses, LR and fg/bg counts every this many iterations")
    progress: bool = _f(True, "show a tqdm progress bar (rank 0)")
    eval_at_end: bool = _f(True, "evaluate on the validation split at the end (COCO AP)")
    eval_batch_size: int = _f(4, "images per batch during the evaluations")
    eval_every: int | None = _f(None, "also evaluate (COCO AP, rank 0) every this many iterations, for the AP "
                                      "curve in TensorBoard and loss_curve.png (default: at the end only)")
    tensorboard: bool = _f(True, "write TensorBoard event files in <output_dir>/tb (rank 0): the logged "
                                 "scalars, the AP of every evaluation and the sampler diagnostics")
    diagnostics_every: int = _f(50, "every this many iterations, measure what the RoI sampler picked (IoU_p,n "
                                    "and IoU_g,e of the negatives, IoU_g,p and keys of the positives, soft bins, "
                                    "epsilon-weighted positives: the paper's Fig. 4) into TensorBoard and "
                                    "sampler_diagnostics.csv (rank 0's batch; 0 = off)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a plain dict (as in a config file). Unknown keys raise ``ValueError`` naming them.

        Without a ``dataset`` key, ``train_images`` or ``train_annotations`` imply ``dataset = "coco"``.
        ``d["sampler"]`` may be a dict of SamplerConfig fields, optionally with ``preset`` (a name for
        ``SamplerConfig.preset`` whose method fields apply first; the other keys then override them), or a
        preset name string. Fields not given keep the defaults of ``default_sampler()``.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a training config must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training config key(s): {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(names))})")
        values = dict(d)
        # Paths to your own data imply dataset = coco unless the dataset is named (as the CLI's flags do).
        if "dataset" not in values and any(values.get(k) is not None for k in ("train_images", "train_annotations")):
            values["dataset"] = "coco"
        if "sampler" in values:
            values["sampler"] = sampler_from_value(values["sampler"])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Read a ``.toml`` or ``.json`` file, then apply ``overrides`` (e.g. CLI flags) on top.

        ``overrides`` uses the same keys as the file; ``overrides["sampler"]`` is merged into the file's
        sampler table key by key (a ``preset`` key in the overrides replaces the file's method fields, see
        ``METHOD_FIELDS``, and keeps its RoI budget and IoU thresholds).
        """
        data = read_config_file(path)
        return cls.from_dict(merge(data, overrides or {}))

    def with_absolute_paths(self) -> "TrainConfig":
        """This config with the files and folders of ``PATH_FIELDS`` absolute and '~' expanded (relative
        paths are taken from the current folder, as when they are opened)."""
        return dataclasses.replace(self, **{name: os.path.abspath(os.path.expanduser(getattr(self, name)))
                                            for name in PATH_FIELDS if getattr(self, name) is not None})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that ``from_dict`` turns back into an equal config."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["sampler"] = self.sampler.to_dict()
        if d["lr_steps"] is not None:
            d["lr_steps"] = list(d["lr_steps"])
        return d

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        def bad(name, expected):
            raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return (isinstance(v, (int, float))) and not isinstance(v, bool)

        if self.dataset not in DATASETS:
            bad("dataset", f"one of {DATASETS}")
        paths = ("train_images", "train_annotations", "val_images", "val_annotations")
        for name in paths + ("data_root", "weights", "backbone_weights", "resume"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and v):
                bad(name, "a non-empty path string or unset")
        if not (isinstance(self.output_dir, str) and self.output_dir):
            bad("output_dir", "a non-empty path string")
        if self.dataset == "synthetic":
            given = [p for p in paths if getattr(self, p) is not None]
            if given:
                raise ValueError(f"TrainConfig.{given[0]} is set but dataset is 'synthetic'; "
                                 "set dataset = 'coco' to train on your own files")
        else:
            needed = ["train_images", "train_annotations"]
            if self.evaluates():
                needed += ["val_images", "val_annotations"]
            for p in needed:
                if getattr(self, p) is None:
                    raise ValueError(f"TrainConfig.{p} is required with dataset = 'coco'"
                                     + (" (or set eval_at_end = false, eval_every unset)" if p.startswith("val")
                                    else ""))
        if not (is_num(self.hflip) and 0.0 <= self.hflip <= 1.0):
            bad("hflip", "a probability in [0, 1]")
        if self.arch not in ARCHS:
            bad("arch", f"one of {ARCHS}")
        if not isinstance(self.backbone, str):
            bad("backbone", "a string")
        if self.trainable_backbone_layers is not None and not (
                is_int(self.trainable_backbone_layers) and 0 <= self.trainable_backbone_layers <= 5):
            bad("trainable_backbone_layers", "an integer in 0..5 or unset")
        if self.backbone == "small":
            for name in ("backbone_weights", "trainable_backbone_layers"):
                if getattr(self, name) is not None:
                    bad(name, "unset with backbone 'small' (a ResNet setting)")
        if not isinstance(self.sampler, SamplerConfig):
            bad("sampler", "a SamplerConfig")
        self.sampler.validate()
        # A file or flag that sets what the chosen sampler does not read would be silently ignored:
        # each such setting must keep the preset's value (SamplerConfig alone also accepts defaults).
        ignored = self.sampler.ignored_settings(strict=True)
        if ignored:
            raise ValueError(f"TrainConfig.sampler: sampler={self.sampler.sampler!r} does not read "
                             f"{', '.join(ignored)}; drop {'it' if len(ignored) == 1 else 'them'} or choose a "
                             "sampler that does")
        for name in ("min_size", "max_size", "iterations", "batch_size", "checkpoint_every", "log_every",
                     "eval_batch_size"):
            if not (is_int(getattr(self, name)) and getattr(self, name) > 0):
                bad(name, "a positive integer")
        if self.max_size < self.min_size:
            bad("max_size", f">= min_size ({self.min_size})")
        if self.eval_every is not None and not (is_int(self.eval_every) and self.eval_every > 0):
            bad("eval_every", "a positive integer or unset")
        for name in ("warmup_iters", "num_workers", "seed", "threads", "diagnostics_every"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, "a non-negative integer")
        if self.stop_after is not None and not (is_int(self.stop_after) and self.stop_after > 0):
            bad("stop_after", "a positive integer or unset")
        if not (is_num(self.box_nms_thresh) and 0.0 < self.box_nms_thresh <= 1.0):
            bad("box_nms_thresh", "a number in (0, 1]")
        if not (is_num(self.lr) and self.lr > 0):
            bad("lr", "a positive number")
        for name in ("momentum", "weight_decay"):
            if not (is_num(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, "a non-negative number")
        if not (is_num(self.warmup_factor) and 0 < self.warmup_factor <= 1):
            bad("warmup_factor", "a number in (0, 1]")
        if not (is_num(self.lr_gamma) and self.lr_gamma > 0):
            bad("lr_gamma", "a positive number")
        if self.lr_steps is not None:
            if not (isinstance(self.lr_steps, (list, tuple)) and all(is_int(s) and s > 0 for s in self.lr_steps)
                    and list(self.lr_steps) == sorted(self.lr_steps)):
                bad("lr_steps", "an increasing list of positive integers or unset")
            self.lr_steps = list(self.lr_steps)
        if self.clip_grad_norm is not None and not (is_num(self.clip_grad_norm) and self.clip_grad_norm > 0):
            bad("clip_grad_norm", "a positive number or unset")
        for name in ("amp", "progress", "eval_at_end", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        if not (isinstance(self.output_dir, str) and self.output_dir):
            bad("output_dir", "a non-empty path string")
        if not (isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda")
                                                  or self.device.startswith("cuda:"))):
            bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")

    # ------------------------------------------------------------------ derived values
    def evaluates(self) -> bool:
        """Whether the run reads the validation set: evaluation at the end or every ``eval_every``."""
        return self.eval_at_end or self.eval_every is not None

    def resolved_lr_steps(self) -> list[int]:
        """``lr_steps``, or 2/3 and 8/9 of ``iterations`` (the proportions of the usual 1x schedule)."""
        if self.lr_steps is not None:
            return list(self.lr_steps)
        return [max(1, (2 * self.iterations) // 3), max(1, (8 * self.iterations) // 9)]


def sampler_from_value(value: Any) -> SamplerConfig:
    """A SamplerConfig from a preset name, a SamplerConfig, or a dict (optionally with ``preset``).

    Missing fields come from ``default_sampler()``; a preset sets the method fields (``apply_preset``).
    """
    if isinstance(value, SamplerConfig):
        return value
    if isinstance(value, str):
        value = {"preset": value}
    if not isinstance(value, dict):
        raise ValueError(f"TrainConfig.sampler must be a table/dict or a preset name, got {value!r}")
    value = dict(value)
    # `sampler = "libra"` in a file means libra's preset, as `--sampler libra` does.
    preset = value.pop("preset", None) or value.get("sampler")
    base = default_sampler().to_dict()
    if preset is not None:
        base = apply_preset(base, preset)
    base.update(value)
    return SamplerConfig.from_dict(base)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` on top; the ``sampler`` sub-dict is merged key by key, except that a
    ``preset`` in the overrides discards the base's method fields (``METHOD_FIELDS``) and preset."""
    out = dict(base)
    for key, value in overrides.items():
        if key == "sampler" and isinstance(value, dict) and out.get("sampler") is not None:
            old = out["sampler"]
            if isinstance(old, str):
                old = {"preset": old}
            elif isinstance(old, SamplerConfig):
                old = old.to_dict()
            if "preset" in value:
                old = {k: v for k, v in old.items() if k not in METHOD_FIELDS and k != "preset"}
            out["sampler"] = {**old, **value}
        else:
            out[key] = value
    return out


def read_config_file(path: str) -> dict[str, Any]:
    """The dict in a ``.toml`` or ``.json`` config file; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".toml", ".json"):
        raise ValueError(f"config file {path}: expected a .toml or .json file, got extension {ext!r}")
    try:
        if ext == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path) as f:
                data = json.load(f)
    except ValueError as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"config file {path} could not be parsed: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table/object at the top level")
    return data
