"""Iteration-based detector training: SGD with warm-up and step LR, optional AMP, DDP, exact resume.

``train(TrainConfig(...))`` runs the whole job: data, model, optimisation, checkpoints, logs, the loss
curve and (on rank 0) the final COCO evaluation. Outputs in ``config.output_dir``:

    config.json                the merged configuration (``--config`` it to reproduce the run)
    train.log                  the log (appended by resumed runs)
    checkpoint_XXXXXXX.pth     every ``checkpoint_every`` iterations and at the end
    last_checkpoint.pth        the newest of them (what ``--resume auto`` reads)
    metrics.json               logged losses, LR, fg/bg counts and times; every evaluation's metrics
    loss_curve.png             losses and LR (and AP with ``eval_every``) against iterations
    eval.json                  the final evaluation (``evaluate``'s dict)
    tb/, sampler_diagnostics.csv   TensorBoard event files and the sampler's diagnostics (``monitor.py``)

Exact resume. Everything random is a function of saved state: the data order is a pure function of
(seed, global sample position) -- see ``IterationBatchSampler`` -- and the Python, NumPy, torch CPU and
CUDA generators of every rank are saved in each checkpoint and restored before the first resumed
iteration. The LR is a pure function of the iteration and the config (``lr_at``). On CPU a run killed
after a checkpoint and resumed with ``resume="auto"`` therefore ends with the same weights, bit for bit,
as an uninterrupted run (tests/test_train.py checks it).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
import random
import re
import sys
import time
import traceback
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ..io_safety import check_not_inputs, prepare_output_dir, write_figure, write_json
from . import distributed as D
from .checkpoint import (CHECKPOINT_FORMAT, LAST, backbone_layout, build_model_for, checkpoint_layout,
                         config_from_checkpoint, get_rng_state, load_checkpoint, save_checkpoint, set_rng_state)
from .config import TrainConfig
from .monitor import DIAGNOSTICS_CSV, TrainMonitor

LOGGER_NAME = "overlap_sampler.train"

# Config fields whose change between a run and its resumption changes the result (a warning is logged).
_RESULT_FIELDS = ("dataset", "data_root", "train_images", "train_annotations", "hflip", "arch", "backbone",
                  "sampler", "weights", "backbone_weights", "trainable_backbone_layers", "min_size", "max_size",
                  "iterations", "batch_size", "lr", "momentum", "weight_decay", "warmup_iters", "warmup_factor",
                  "lr_steps", "lr_gamma", "clip_grad_norm", "amp", "seed")

# What a run writes in its output folder besides the checkpoints (see the module docstring).
OUTPUT_FILES = ("config.json", "train.log", "metrics.json", "loss_curve.png", "eval.json", DIAGNOSTICS_CSV)
# Temporary files of earlier versions (written as "<name>.tmp"), removed when a run starts there.
_LEGACY_TEMPORARIES = ("config.json.tmp", "metrics.json.tmp", "eval.json.tmp")


# ---------------------------------------------------------------------- learning rate
def lr_at(config: TrainConfig, iteration: int) -> float:
    """The LR of (0-based) ``iteration``: linear warm-up from ``warmup_factor * lr`` over ``warmup_iters``,
    times ``lr_gamma`` per passed step of ``config.resolved_lr_steps()``.

    A pure function of the config and the iteration, so where a run stopped never changes the schedule.
    """
    factor = config.lr_gamma ** bisect.bisect_right(config.resolved_lr_steps(), iteration)
    if iteration < config.warmup_iters:
        alpha = iteration / config.warmup_iters
        factor *= config.warmup_factor * (1.0 - alpha) + alpha
    return config.lr * factor


def _resize_note(config: TrainConfig, dataset) -> str | None:
    """A warning when the images are much larger than the resize target (the CPU-sized defaults
    min_size 128 / max_size 224 kept for one's own large images), else None."""
    sides = sorted(min(info["width"], info["height"]) for info in dataset.coco.imgs.values())
    if not sides or sides[len(sides) // 2] <= 2 * config.min_size:
        return None
    return (f"the training images (median short side {sides[len(sides) // 2]} px) are shrunk to min_size="
            f"{config.min_size}, max_size={config.max_size}; for full resolution set min_size / max_size "
            "(torchvision's detectors use 800 / 1333)")


def _warm_up_note(config: TrainConfig) -> str | None:
    """A warning when the warm-up outlasts the run or reaches its first LR step (legal, but a short run
    that keeps the default warm-up never trains at its LR), else None."""
    if not config.warmup_iters:
        return None
    first_step = next((s for s in config.resolved_lr_steps() if s <= config.warmup_iters), None)
    if config.warmup_iters < config.iterations and first_step is None:
        return None
    until = ("the end of the run" if config.warmup_iters >= config.iterations
             else f"the first LR step (iteration {first_step})")
    return (f"the LR warm-up (warmup_iters={config.warmup_iters}) lasts until {until}: the LR never reaches "
            f"lr={config.lr:g}")


class IterationLR:
    """Sets the optimizer's LR from ``lr_at`` before each iteration. Its state is just the iteration;
    the schedule itself always comes from the current config."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig):
        self.optimizer, self.config, self.iteration = optimizer, config, 0

    def set(self, iteration: int) -> float:
        self.iteration = iteration
        lr = lr_at(self.config, iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "lr_steps": self.config.resolved_lr_steps(),
                "warmup_iters": self.config.warmup_iters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])


# ---------------------------------------------------------------------- data order
def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # SeedSequence mixes (seed, epoch) into independent streams; seed + epoch would make seed 1 / epoch 0
    # replay seed 0 / epoch 1.
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(state)


class IterationBatchSampler(Sampler):
    """Batches of ``(dataset index, flip)`` pairs in a deterministic, resumable order.

    The order is a pure function of the *global sample position* p (samples consumed by all ranks):
    epoch ``e = p // N`` is a permutation of the N images drawn with a generator seeded by (seed, e),
    and sample p is ``perm_e[p % N]``, horizontally flipped when a uniform drawn with the same generator is
    below ``hflip``. Iteration i takes positions ``[i * B * W, (i + 1) * B * W)``; rank r the slice
    ``[r * B, (r + 1) * B)`` of them (B = per-rank batch size, W = world size), so DDP ranks share one
    permutation and never see the same image in an iteration. Resuming = starting at a later position.

    Yields ``num_batches`` batches starting at global position ``start_position``.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, start_position: int, num_batches: int,
                 rank: int = 0, world_size: int = 1, hflip: float = 0.0):
        if num_samples <= 0:
            raise ValueError(f"the training dataset is empty (num_samples={num_samples})")
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start_position, self.num_batches = start_position, num_batches
        self.rank, self.world_size, self.hflip = rank, world_size, hflip
        self._epoch, self._perm, self._flip = -1, None, None

    def _sample(self, position: int) -> tuple[int, bool]:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            g = _epoch_generator(self.seed, epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._flip = (torch.rand(self.n, generator=g) < self.hflip).tolist()
            self._epoch = epoch
        return self._perm[offset], bool(self._flip[offset])

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        global_batch = self.batch_size * self.world_size
        for b in range(self.num_batches):
            first = self.start_position + b * global_batch + self.rank * self.batch_size
            yield [self._sample(p) for p in range(first, first + self.batch_size)]

    def __len__(self) -> int:
        return self.num_batches


class FlipDataset(Dataset):
    """Wraps a detection dataset so that ``ds[(i, flip)]`` is ``ds[i]``, mirrored left-right if ``flip``
    (image, ``boxes`` x1y1x2y2 and ``masks``)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        if get_worker_info() is None:
            return self._flipped(key)
        try:
            return self._flipped(key)
        except (ValueError, OSError) as error:  # bad data (DatasetError...): see _LoadFailure
            return _LoadFailure(error)

    def _flipped(self, key):
        index, flip = key
        image, target = self.base[index]
        if flip:
            width = image.shape[-1]
            image = image.flip(-1)
            target = dict(target)
            boxes = target["boxes"]
            if boxes.numel():
                target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]],
                                              dim=1)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target


class _LoadFailure:
    """A sample whose loading failed in a DataLoader worker with bad data, sent back as a value.

    Raised in a worker, an error reaches the main process as a new exception whose message is the
    worker's whole traceback; a user needs the one line that names the bad file. The traceback goes
    to the log file (:meth:`reraise`).
    """

    def __init__(self, error: Exception):
        self.error_type, self.message = type(error), str(error)
        self.detail = traceback.format_exc()

    def reraise(self, logger: logging.Logger) -> None:
        logger.error("a DataLoader worker failed to load a sample:\n%s", self.detail.rstrip(),
                     extra={"file_only": True})
        try:
            error = self.error_type(self.message)
        except Exception:  # a type whose constructor wants more than a message
            error = RuntimeError(f"{self.error_type.__name__}: {self.message}")
        raise error


def _collate(batch):
    from ..data import collate

    failed = next((item for item in batch if isinstance(item, _LoadFailure)), None)
    return failed if failed is not None else collate(batch)


# ---------------------------------------------------------------------- helpers
def _every(period: Optional[int], iteration: int) -> bool:
    """Whether ``iteration`` (1-based count) is a multiple of ``period`` (None or 0: never)."""
    return bool(period) and iteration % period == 0


def _diagnose(head, monitor: TrainMonitor, iteration: int) -> None:
    """The sampler diagnostics of the batch ``head`` just recorded, to ``monitor``; recording stops."""
    from ..detection.diagnostics import sampler_diagnostics

    samples, head.last_samples, head.record_samples = head.last_samples, None, False
    if samples is not None:
        with torch.no_grad():
            monitor.diagnostics(iteration, sampler_diagnostics(samples, head.sampler_config()))


def _empty_window() -> dict[str, float]:
    return {"loss": 0.0, "n": 0, "pos": 0, "neg": 0, "images": 0, "data": 0.0}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not break a tqdm bar; records logged with ``extra={"file_only": True}``
    (details such as a worker's traceback) go to the log file only."""

    def emit(self, record):
        if getattr(record, "file_only", False):
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logger(output_dir: str | None, is_main: bool) -> logging.Logger:
    """The train logger: console (+ ``output_dir/train.log`` on rank 0); other ranks log warnings only."""
    close_logger()
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    logger.addHandler(console)
    if is_main and output_dir is not None:
        file = logging.FileHandler(os.path.join(output_dir, "train.log"), mode="a")
        file.setFormatter(fmt)
        logger.addHandler(file)
    return logger


def close_logger() -> None:
    """Detach and close the train logger's handlers (releases ``train.log``)."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def dataset_paths(config: TrainConfig, split: str) -> tuple[str, str]:
    """(image_dir, annotation_file) of ``split`` ("train" or "val") for ``config``."""
    if config.dataset == "synthetic":
        from ..data import synthetic_dataset

        return synthetic_dataset(split, root=config.data_root)
    if split == "train":
        return config.train_images, config.train_annotations
    return config.val_images, config.val_annotations


def make_dataset(config: TrainConfig, split: str):
    """The ``CocoDetection`` of ``split``; for Mask R-CNN with masks (validation too: its
    segmentations are checked up front, as the ``eval`` command does)."""
    from ..data import CocoDetection

    images, annotations = dataset_paths(config, split)
    return CocoDetection(images, annotations, masks=config.arch == "maskrcnn")


def _resolve_resume(config: TrainConfig) -> str | None:
    if config.resume is None:
        return None
    if config.resume == "auto":
        path = os.path.join(config.output_dir, LAST)
        return path if os.path.isfile(path) else None
    if not os.path.isfile(config.resume):
        raise FileNotFoundError(f"resume checkpoint not found: {config.resume}")
    return config.resume


def plot_loss_curve(history: list[dict[str, Any]], path: str,
                    evaluations: Optional[list[dict[str, Any]]] = None) -> None:
    """Losses (log scale) and LR against iterations, as a PNG (matplotlib, Agg backend).

    With ``evaluations`` (``{"iteration", "bbox": {"AP", ...}, ["segm": ...]}`` per evaluation, a run's
    ``eval_history``; ``[]`` too) a third panel shows AP and AP50 in percent against iterations.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [3, 1] if evaluations is None else [3, 1, 2]
    fig, axes = plt.subplots(len(ratios), 1, figsize=(8, 7 + 2 * (len(ratios) - 2)), sharex=True,
                             gridspec_kw={"height_ratios": ratios})
    ax_loss, ax_lr = axes[0], axes[1]
    if history:
        its = [h["iteration"] for h in history]
        keys = ["loss"] + sorted(k for k in history[0] if k.startswith("loss_"))
        for k in keys:
            ax_loss.plot(its, [h.get(k, float("nan")) for h in history], label=k, lw=2 if k == "loss" else 1)
        ax_lr.plot(its, [h["lr"] for h in history], color="k")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (mean over each log window)")
    ax_loss.grid(True, which="both", alpha=0.3)
    if history:  # a checkpoint before the first log line has nothing to label
        ax_loss.legend(fontsize=8)
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(True, alpha=0.3)
    if evaluations is not None:
        _plot_ap(axes[2], evaluations)
    axes[-1].set_xlabel("iteration")
    fig.tight_layout()
    write_figure(path, fig, what="loss curve")


def _plot_ap(ax, evaluations: list[dict[str, Any]]) -> None:
    its = [e["iteration"] for e in evaluations]
    for iou_type in ("bbox", "segm"):
        for name, style in (("AP", "-o"), ("AP50", "--o")):
            values = [100.0 * e[iou_type][name] if iou_type in e else float("nan") for e in evaluations]
            if any(math.isfinite(v) for v in values):
                ax.plot(its, values, style, ms=3, label=f"{'box' if iou_type == 'bbox' else 'mask'} {name}")
    ax.set_ylabel("validation AP (%)")
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)


# ---------------------------------------------------------------------- the job
def train(config: TrainConfig) -> dict[str, Any]:
    """Train ``config``'s detector; returns the metrics dict that is also written to ``metrics.json``.

    Under ``torchrun`` every process calls this; only rank 0 logs to file, writes and evaluates, and the
    returned dict is rank 0's (other ranks get ``{"rank": r}``). The process group is destroyed on exit.
    """
    config.validate()
    config = config.with_absolute_paths()  # recorded in config.json and checkpoints
    check_inputs_kept(config)  # on every rank, before anything is written
    threads_before = torch.get_num_threads()
    info = D.init_distributed(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        with contextlib.ExitStack() as closing:  # what _train opens (the TensorBoard writer) is closed
            result = _train(config, info, closing)
    except BaseException:
        # No barrier: the other ranks may be stuck elsewhere; torchrun tears them down.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    finally:
        close_logger()
        torch.set_num_threads(threads_before)
    D.cleanup()
    return result


def checkpoints_at(config: TrainConfig, iteration: int) -> bool:
    """Whether a run of ``config`` may write a checkpoint at ``iteration``, wherever it resumes: at
    multiples of ``checkpoint_every``, the last iteration and ``stop_after``."""
    return 0 < iteration <= config.iterations and (iteration % config.checkpoint_every == 0 or iteration in (
        config.iterations, config.stop_after))


def check_inputs_kept(config: TrainConfig) -> None:
    """``ValueError`` if the run would write one of its input files (annotations, initial weights),
    naming both: its output folder's files (:data:`OUTPUT_FILES`), checkpoints and
    ``last_checkpoint.pth``. The ``resume`` checkpoint is exempt: it is read whole before the run
    continues in its folder, and checkpoints are replaced atomically (a new file, not rewritten).
    """
    names = {"weights": "initial weights", "backbone_weights": "backbone weights"}
    if config.dataset == "coco":
        names["train_annotations"] = "training annotations"
        if config.evaluates():
            names["val_annotations"] = "validation annotations"
    inputs = [(what, getattr(config, name)) for name, what in names.items() if getattr(config, name) is not None]
    outputs = [(f"output {name}", os.path.join(config.output_dir, name)) for name in OUTPUT_FILES + (LAST,)]
    # Checkpoints by name: there may be thousands, and only a name of an input (as given, or what
    # a link given resolves to) can be one.
    for _, path in inputs:
        for name in {os.path.basename(path), os.path.basename(os.path.realpath(path))}:
            match = re.fullmatch(r"checkpoint_([0-9]{7,})\.pth", name)
            if match and checkpoints_at(config, int(match.group(1))):
                outputs.append(("checkpoint", os.path.join(config.output_dir, name)))
    appended = [os.path.join(config.output_dir, name) for name in ("train.log", DIAGNOSTICS_CSV)]
    check_not_inputs(outputs, inputs, advice="give another --output-dir", appended=appended)


def _train(config: TrainConfig, info: D.DistInfo, closing: contextlib.ExitStack) -> dict[str, Any]:
    device = info.device
    if info.is_main:
        prepare_output_dir(config.output_dir, legacy_names=_LEGACY_TEMPORARIES)
    D.barrier()
    logger = setup_logger(config.output_dir, info.is_main)
    if info.is_main:
        write_json(os.path.join(config.output_dir, "config.json"), config.to_dict(), indent=2)
    logger.info("training %s/%s with sampler %s on %s (world size %d)", config.arch, config.backbone,
                config.sampler.to_dict(), device, info.world_size)

    use_amp = config.amp and device.type == "cuda"
    if config.amp and not use_amp:
        logger.warning("amp=true needs CUDA; training on %s in float32 instead", device)
    warm_up_note = _warm_up_note(config)
    if warm_up_note and info.is_main:  # other ranks log warnings too: once is enough
        logger.warning(warm_up_note)

    # ---- resume state (read on every rank: each restores its own generators)
    # Resolved on rank 0 only: ranks that don't share the output folder must still resume together.
    # An error on rank 0 travels too, so that no rank waits for a broadcast that never comes.
    resolved: object = None
    if info.is_main:
        try:
            resolved = _resolve_resume(config)
        except Exception as error:  # re-raised below on every rank
            resolved = error
    resolved = D.broadcast_object(resolved)
    if isinstance(resolved, Exception):
        raise resolved
    resume_path = resolved
    state = None
    layout = None  # the backbone layout: the config's, or a resumed checkpoint's
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        logger.info("resuming from %s (iteration %d)", resume_path, state["iteration"])
        trained = config_from_checkpoint(state, resume_path)
        layout = checkpoint_layout(state, trained)
        if layout != backbone_layout(config):
            # The model and optimizer state only fit the layout they were trained with.
            logger.warning("resume checkpoint %s has backbone layout %s, this config %s (set by weights, "
                           "backbone_weights and trainable_backbone_layers): continuing with the checkpoint's",
                           resume_path, layout, backbone_layout(config))
        # Checkpoints of older versions recorded paths as given: relative ones read from this folder.
        old, new = trained.with_absolute_paths().to_dict(), config.to_dict()
        changed = [k for k in _RESULT_FIELDS if old.get(k) != new.get(k)]
        if changed:
            logger.warning("resuming with changed settings %s: the result will differ from an uninterrupted "
                           "run", ", ".join(changed))
    elif config.resume == "auto":
        logger.info("resume=auto: no %s in %s, starting from scratch", LAST, config.output_dir)

    if state is None:  # the initial weights files are read after the data: check them first
        for name in ("weights", "backbone_weights"):
            path = getattr(config, name)
            if path is not None and not os.path.isfile(os.path.expanduser(path)):
                raise FileNotFoundError(f"{name} file {path!r} does not exist" + (
                    "; torchvision's ImageNet ResNets are fetched (once, on a connected machine) with e.g. "
                    "python -c \"import torchvision; torchvision.models.resnet50(weights='IMAGENET1K_V1')\"; "
                    "they land in ~/.cache/torch/hub/checkpoints" if name == "backbone_weights" else ""))

    seed_everything(config.seed)

    # ---- data (rank 0 first: generating the synthetic dataset must not race)
    val_set = None
    if info.is_main:
        train_set = make_dataset(config, "train")
        # The validation set is read and checked now, so a broken file fails before training, not after.
        if config.evaluates():
            val_set = make_dataset(config, "val")
            if list(val_set.category_ids) != list(train_set.category_ids):
                raise ValueError(f"{val_set.annotation_file}: validation categories {list(val_set.category_ids)} "
                                 f"differ from the training categories {list(train_set.category_ids)}")
    D.barrier()
    if not info.is_main:
        train_set = make_dataset(config, "train")
    num_classes, category_ids = int(train_set.num_classes), list(train_set.category_ids)
    if state is not None and (int(state["num_classes"]) != num_classes
                              or list(state["category_ids"]) != category_ids):
        raise ValueError(f"resume checkpoint {resume_path} was trained on categories {state['category_ids']}, "
                         f"the training data has {category_ids}")
    logger.info("training images: %d, classes: %d (+ background)", len(train_set), num_classes - 1)
    resize_note = _resize_note(config, train_set) if info.is_main else None
    if resize_note:
        logger.warning(resize_note)

    # ---- model and optimisation
    with warnings.catch_warnings(record=True) as caught:  # e.g. predictors of another class count
        warnings.simplefilter("always")
        model = build_model_for(config, num_classes, initial_weights=state is None, layout=layout).to(device)
    for warning in caught:
        if info.is_main:
            logger.warning("%s", warning.message)
    used_layout = backbone_layout(config) if layout is None else layout
    if device.type == "cuda":
        # The sampler's value checks would read from the GPU every step; the head builds consistent
        # splits itself and torchvision rejects degenerate GT boxes, so keep the step asynchronous.
        model.roi_heads.validate_inputs = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = IterationLR(optimizer, config)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_iter, history, evaluations, elapsed_before = 0, [], [], 0.0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            trained = config_from_checkpoint(state, resume_path)
            differ = [f"{k} {getattr(trained, k)!r} there, {getattr(config, k)!r} here" for k in ("arch", "backbone")
                      if getattr(trained, k) != getattr(config, k)]
            raise ValueError(f"resume checkpoint {resume_path} does not fit this run's model"
                             f"{' (' + '; '.join(differ) + ')' if differ else ''}; train into another "
                             f"--output-dir, or drop --resume: {e}") from e
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        if use_amp and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_iter = int(state["iteration"])
        history = list(state.get("history", []))
        evaluations = list(state.get("eval_history", []))
        elapsed_before = float(state.get("elapsed", 0.0))
        rngs = state.get("rng") or []
        if len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank])
            if rngs[info.rank].get("cuda") is None and device.type == "cuda":
                # Saved on CPU, resumed on CUDA: distinct CUDA streams per rank (RoI sampling draws there).
                torch.cuda.manual_seed(config.seed + 1000003 * (start_iter + 1) + info.rank)
        else:
            # A different world size cannot replay the old streams; give each rank a fresh, distinct one.
            logger.warning("checkpoint holds generator states of %d ranks, running %d: reseeding", len(rngs),
                           info.world_size)
            seed_everything(config.seed + 1000003 * (start_iter + 1) + info.rank)
    elif info.rank > 0:
        # Same initial weights on every rank (DDP broadcasts rank 0's anyway), distinct RoI sampling.
        seed_everything(config.seed + info.rank)
    model = D.wrap_model(model, info)
    core = D.unwrap_model(model)

    end_iter = config.iterations if config.stop_after is None else min(config.iterations, config.stop_after)
    global_batch = config.batch_size * info.world_size
    start_position = int(state["data"]["position"]) if state is not None else 0
    sampler = IterationBatchSampler(len(train_set), config.batch_size, seed=config.seed,
                                    start_position=start_position, num_batches=max(0, end_iter - start_iter),
                                    rank=info.rank, world_size=info.world_size, hflip=config.hflip)
    # Own generator: a DataLoader iterator otherwise draws its base seed from the global torch RNG,
    # which would shift every later random number of a resumed run.
    loader = DataLoader(FlipDataset(train_set), batch_sampler=sampler, num_workers=config.num_workers,
                        collate_fn=_collate, generator=torch.Generator().manual_seed(config.seed),
                        pin_memory=device.type == "cuda", persistent_workers=False)

    monitor = closing.enter_context(TrainMonitor(config, enabled=info.is_main, start_iter=start_iter,
                                                 resumed=state is not None, logger=logger))
    head = core.roi_heads

    def checkpoint(iteration: int, position: int) -> str | None:
        # Every rank's generators and partial log window, so that a resumed run replays them exactly.
        per_rank = D.all_gather_objects({"rng": get_rng_state(), "window": dict(window)})
        rngs = [r["rng"] for r in per_rank]
        windows = [r["window"] for r in per_rank]
        if not info.is_main:
            return None
        payload = {
            "format": CHECKPOINT_FORMAT, "iteration": iteration, "model": core.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict() if use_amp else {}, "config": config.to_dict(),
            "num_classes": num_classes, "category_ids": category_ids, "backbone_layout": used_layout,
            "category_names": list(getattr(train_set, "category_names", [])), "rng": rngs, "log_window": windows,
            "data": {"seed": config.seed, "position": position}, "history": history, "eval_history": evaluations,
            "elapsed": elapsed_before + (time.perf_counter() - t_start), "world_size": info.world_size,
        }
        path = save_checkpoint(payload, config.output_dir)
        write_metrics(None)
        logger.info("checkpoint %s", path)
        return path

    def write_metrics(eval_metrics):
        if not info.is_main:
            return
        metrics = {"config": config.to_dict(), "device": str(device), "world_size": info.world_size,
                   "iteration": iteration, "iterations": config.iterations,
                   "train_time_s": elapsed_before + (time.perf_counter() - t_start), "history": history,
                   "eval": eval_metrics, "eval_history": evaluations}
        write_json(os.path.join(config.output_dir, "metrics.json"), metrics, indent=2)
        plot_loss_curve(history, os.path.join(config.output_dir, "loss_curve.png"),
                        evaluations if config.eval_every else None)
        return metrics

    def evaluate_now(iteration, barrier=True):
        # Rank 0 evaluates; the others wait at the barrier, not inside a gradient all-reduce.
        metrics = None
        if info.is_main:
            from .evaluate import evaluate, format_table

            logger.info("evaluating on %d validation images at iteration %d", len(val_set), iteration)
            metrics = evaluate(core, val_set, device=device, batch_size=config.eval_batch_size,
                               progress=config.progress)
            logger.info("evaluation at iteration %d:\n%s", iteration, format_table(metrics))
            evaluations.append({"iteration": iteration, **metrics})
            monitor.evaluation(iteration, metrics)
        if barrier:
            D.barrier()
        return metrics

    # ---- the loop
    from tqdm import tqdm

    bar = tqdm(total=end_iter, initial=start_iter, disable=not (info.is_main and config.progress),
               dynamic_ncols=True, desc="train", file=sys.stderr)
    model.train()
    iteration = start_iter
    t_start = time.perf_counter()
    # Sums over the current log window (losses, iterations "n", fg "pos", bg "neg", "images", seconds
    # waiting for the data "data").
    window: dict[str, float] = _empty_window()
    if state is not None and len(state.get("log_window") or []) == info.world_size:
        window = dict(state["log_window"][info.rank])
    window_t, window_start = time.perf_counter(), iteration
    last_ckpt = None
    logger.info("iterations %d -> %d of %d, %d images per iteration, LR steps at %s", start_iter, end_iter,
                config.iterations, global_batch, config.resolved_lr_steps())
    fetch_t = time.perf_counter()
    for batch in loader:
        window["data"] = window.get("data", 0.0) + (time.perf_counter() - fetch_t)
        if isinstance(batch, _LoadFailure):
            batch.reraise(logger)
        images, targets = batch
        lr = schedule.set(iteration)
        # Rank 0's head keeps what it samples at a diagnostics step (no cost on the other steps).
        diagnose = info.is_main and _every(config.diagnostics_every, iteration + 1)
        head.record_samples = diagnose
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, enabled=use_amp):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        iteration += 1

        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        total = sum(values.values())
        if not math.isfinite(total):
            raise FloatingPointError(f"non-finite loss at iteration {iteration} (rank {info.rank}): {values}")
        for k, v in values.items():
            window[k] = window.get(k, 0.0) + v
        window["loss"] += total
        window["n"] += 1
        num_pos = getattr(core.roi_heads, "last_num_pos", None)
        num_neg = getattr(core.roi_heads, "last_num_neg", None)
        pos = int(num_pos.sum()) if num_pos is not None else 0
        neg = int(num_neg.sum()) if num_neg is not None else 0
        window["pos"] += pos
        window["neg"] += neg
        window["images"] += len(images)
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}", fg=pos, bg=neg, refresh=False)
        bar.update(1)
        if diagnose:
            _diagnose(head, monitor, iteration)

        # Not at a stop_after point: its partial window goes into the checkpoint and the resumed run logs
        # it on schedule, so the history of a run in chunks equals that of an uninterrupted one.
        if iteration % config.log_every == 0 or iteration == config.iterations:
            keys = sorted(k for k in window if k.startswith("loss"))
            packed = torch.tensor([window[k] for k in keys] + [window.get("data", 0.0)]
                                  + [window[k] for k in ("n", "pos", "neg", "images")], dtype=torch.float64)
            # Gloo reduces CPU tensors, NCCL CUDA ones.
            packed = D.all_reduce_sum(packed.to(device) if info.distributed and device.type == "cuda"
                                      else packed).cpu()
            n = float(packed[len(keys) + 1])
            entry = {"iteration": iteration, "lr": lr}
            entry.update({k: float(packed[i]) / n for i, k in enumerate(keys)})
            nimg = max(float(packed[-1]), 1.0)
            entry["fg_per_image"] = float(packed[-3]) / nimg
            entry["bg_per_image"] = float(packed[-2]) / nimg
            now = time.perf_counter()
            entry["time_per_iter"] = (now - window_t) / max(iteration - window_start, 1)
            entry["time_data_per_iter"] = float(packed[len(keys)]) / n
            entry["time"] = elapsed_before + (now - t_start)
            history.append(entry)
            monitor.scalars(entry)
            logger.info("iter %d/%d  loss %.4f (%s)  lr %.3g  fg/bg per image %.1f/%.1f  %.3fs/iter",
                        iteration, config.iterations, entry["loss"],
                        ", ".join(f"{k[5:] if k.startswith('loss_') else k} {entry[k]:.3f}"
                                  for k in keys if k != "loss"),
                        lr, entry["fg_per_image"], entry["bg_per_image"], entry["time_per_iter"])
            window = _empty_window()
            window_t, window_start = now, iteration
        if _every(config.eval_every, iteration):
            eval_t = time.perf_counter()
            evaluate_now(iteration)
            window_t += time.perf_counter() - eval_t  # not training time
        if iteration % config.checkpoint_every == 0 or iteration == end_iter:
            last_ckpt = checkpoint(iteration, start_position + (iteration - start_iter) * global_batch)
        fetch_t = time.perf_counter()
    bar.close()
    if iteration == start_iter and info.is_main:
        logger.info("nothing to train: the checkpoint is at iteration %d of %d", iteration, end_iter)

    result: dict[str, Any] = {"rank": info.rank}
    if not info.is_main:
        return result
    finished = iteration >= config.iterations
    eval_metrics = None
    if finished and config.eval_at_end:
        if evaluations and evaluations[-1]["iteration"] == iteration:  # done by eval_every just now
            eval_metrics = {k: v for k, v in evaluations[-1].items() if k != "iteration"}
        else:
            eval_metrics = evaluate_now(iteration, barrier=False)
        write_json(os.path.join(config.output_dir, "eval.json"), eval_metrics, indent=2)
    elif not finished:
        logger.info("stopped at iteration %d of %d; continue with resume='auto'", iteration, config.iterations)
    metrics = write_metrics(eval_metrics)
    metrics["checkpoint"] = last_ckpt or resume_path
    metrics["output_dir"] = config.output_dir
    return metrics
