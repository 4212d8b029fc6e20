"""The paper's Figure 4 on a detector's own proposals: what each sampler picks from the same RoIs.

Figure 4 shows the distribution of IoU_p,n -- a sampled negative's max IoU with the positives of its
image -- among the negatives that random sampling, IoU-balanced sampling and the overlap sampler
pick: the first two pick few negatives with a high IoU_p,n, the overlap sampler many more. Here the
proposals are a detector's: :func:`iou_histograms` runs its backbone and RPN over training images,
then lets every sampler preset pick from the *same* proposals with the *same* budget (the model's
RoIs per image, positive fraction and IoU thresholds), and bins what each picked:

* a sampled negative by its IoU_p,n (the x axis of Figure 4);
* a sampled positive by its key, its max IoU with the negatives of its image (``pos_key``).

Both come from :func:`~overlap_sampler.detection.diagnostics.sampler_diagnostics` (the training
diagnostics' one implementation of IoU_p,n; terms as in ``docs/ops.md``), binned by
:data:`~overlap_sampler.detection.diagnostics.IOU_EDGES` (tenths of IoU) with :func:`histogram`.
:func:`iou_hist_checkpoint` is ``overlap-sampler analyze iou-hist``: it writes ``iou_hist.csv``,
``iou_hist.png`` and ``iou_hist.md``. ``overlap-sampler demo`` bins and prints with the same
:func:`histogram` and :func:`format_share_table`, on a synthetic batch.

What "as in training" means here, and what differs:

* proposals: the RPN's training-mode ones (its ``training`` flag set, so its training pre/post-NMS
  top-n), computed without grad; every BatchNorm runs in eval mode (running statistics used, never
  updated) and the image transform in eval mode (no random choice among several ``min_size``);
  images are not flipped.
* the RoI head appends the GT boxes to the proposals and labels them as in training; each sampler
  then picks through the head's one plug point,
  :meth:`~overlap_sampler.detection.OverlapRoIHeads.select_weighted_training_samples`, on a copy of
  the head that shares its modules (box-only: a mask head is not needed to pick RoIs).
* randomness: before each batch every sampler starts from the same seed (its own generator and the
  global one, which torchvision's ``random`` sampler and the RPN's loss draw from), so a sampler's
  numbers do not depend on which other samplers run. The caller's global RNG state is restored.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import sys
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..detection.diagnostics import IOU_EDGES, SampledBatch, SamplerDiagnostics, histogram, sampler_diagnostics
from ..io_safety import atomic_write, check_not_inputs, prepare_output_dir, write_figure, write_text
from ..sampling.config import BUDGET_FIELDS, SAMPLERS, SamplerConfig

CSV_NAME = "iou_hist.csv"
PNG_NAME = "iou_hist.png"
MARKDOWN_NAME = "iou_hist.md"
#: Images analysed by default (``--images``).
DEFAULT_IMAGES = 200
#: The IoU_p,n from which a negative counts as "high" in the tables (the hard strategy's default theta).
HIGH_IOU = 0.5
CSV_COLUMNS = ("sampler", "bin_low", "bin_high", "neg_count", "neg_share", "pos_count", "pos_share")


# ---------------------------------------------------------------------- histograms and tables
def shares(counts: np.ndarray) -> np.ndarray:
    """``counts`` as fractions of their total (all 0 when there is nothing to count)."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts / max(counts.sum(), 1.0)


def bin_labels(edges: Sequence[float]) -> list[str]:
    """``[0.0,0.1)`` ... for each bin of ``edges``, the last one closed: ``[0.9,1.0]``."""
    last = len(edges) - 2
    return [f"[{lo:.1f},{hi:.1f}{']' if k == last else ')'}" for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]


def format_share_table(rows: Mapping[str, Sequence[float]], edges: Sequence[float], *, first: str = "sampler",
                       extra: Optional[Mapping[str, Mapping[str, str]]] = None) -> list[str]:
    """A fixed-width text table, one line per row: its share of each bin of ``edges`` in percent,
    then the ``extra`` columns (column name -> {row name: text}, right-aligned).

    >>> print("\\n".join(format_share_table({"random": [0.75, 0.25]}, [0.0, 0.5, 1.0],
    ...                                      extra={"n": {"random": "8"}})))
    sampler         [0.0,0.5) [0.5,1.0]   n
    random              75.0%     25.0%   8
    """
    extra = extra or {}
    widths = {name: max([len(name)] + [len(v) for v in values.values()]) for name, values in extra.items()}
    lines = [f"{first:<15} " + " ".join(bin_labels(edges)) + "".join(f"   {name:>{widths[name]}}" for name in extra)]
    for row, values in rows.items():
        lines.append(f"{row:<15} " + " ".join(f"{100.0 * s:8.1f}%" for s in values)
                     + "".join(f"   {extra[name].get(row, ''):>{widths[name]}}" for name in extra))
    return lines


@dataclasses.dataclass
class IouHistogram:
    """What one sampler picked over the analysed images, binned by :data:`IOU_EDGES`.

    Attributes:
        sampler: its name (a preset, or the caller's name for a config).
        config: the :class:`SamplerConfig` it ran with.
        images: images analysed.
        neg_counts: int64 ``[10]``, the sampled negatives per bin of IoU_p,n.
        pos_counts: int64 ``[10]``, the sampled positives per bin of their key.
        neg_sum, pos_sum: the sums of those IoU_p,n and keys (for the means).
    """

    sampler: str
    config: SamplerConfig
    images: int = 0
    neg_counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(len(IOU_EDGES) - 1, np.int64))
    pos_counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(len(IOU_EDGES) - 1, np.int64))
    neg_sum: float = 0.0
    pos_sum: float = 0.0

    def add(self, diagnostics: SamplerDiagnostics) -> None:
        """Count the RoIs of one sampled batch."""
        negatives = diagnostics.key[~diagnostics.positive]
        positives = diagnostics.key[diagnostics.positive]
        self.neg_counts += histogram(negatives)
        self.pos_counts += histogram(positives)
        self.neg_sum += float(negatives.sum())
        self.pos_sum += float(positives.sum())
        self.images += diagnostics.num_images

    @property
    def num_neg(self) -> int:
        return int(self.neg_counts.sum())

    @property
    def num_pos(self) -> int:
        return int(self.pos_counts.sum())

    @property
    def neg_shares(self) -> np.ndarray:
        return shares(self.neg_counts)

    @property
    def pos_shares(self) -> np.ndarray:
        return shares(self.pos_counts)

    @property
    def neg_mean(self) -> float:
        """Mean IoU_p,n of the sampled negatives (nan without any)."""
        return self.neg_sum / self.num_neg if self.num_neg else float("nan")

    @property
    def pos_mean(self) -> float:
        """Mean key of the sampled positives (nan without any)."""
        return self.pos_sum / self.num_pos if self.num_pos else float("nan")

    def neg_share_from(self, low: float = HIGH_IOU) -> float:
        """The share of the sampled negatives with IoU_p,n >= ``low``, one of the edges 0.0, 0.1, ..., 0.9."""
        first = np.flatnonzero(np.isclose(IOU_EDGES[:-1], low))
        if first.size == 0:
            raise ValueError(f"low must be a lower bin edge (0.0, 0.1, ..., 0.9), got {low!r}")
        return float(self.neg_shares[int(first[0]):].sum())


# ---------------------------------------------------------------------- the samplers on a model's proposals
def sampler_configs(samplers: Sequence[str] | Mapping[str, SamplerConfig], roi_heads) -> dict[str, SamplerConfig]:
    """Each sampler's config: a preset name gets its :meth:`SamplerConfig.preset` with the budget
    (:data:`BUDGET_FIELDS`) of ``roi_heads``; a mapping ``name -> SamplerConfig`` is used as given.
    ``ValueError`` names an unknown preset; duplicates are dropped."""
    from ..detection.roi_heads import training_sample_settings

    if isinstance(samplers, Mapping):
        if not samplers:
            raise ValueError("samplers must name at least one sampler")
        return {str(name): config.validate() for name, config in samplers.items()}
    budget = training_sample_settings(roi_heads)
    return {name: dataclasses.replace(SamplerConfig.preset(name), **budget) for name in check_sampler_names(samplers)}


def check_sampler_names(samplers: Sequence[str]) -> list[str]:
    """``samplers`` without duplicates, in order; ``ValueError`` naming the first that is not a
    preset (:data:`SAMPLERS`), or for none at all."""
    names = [samplers] if isinstance(samplers, str) else list(samplers)
    unknown = [name for name in names if name not in SAMPLERS]
    if unknown:
        raise ValueError(f"samplers must be among {', '.join(SAMPLERS)}; got {unknown[0]!r}")
    if not names:
        raise ValueError(f"samplers must name at least one of {', '.join(SAMPLERS)}")
    return list(dict.fromkeys(names))


def _analysis_head(roi_heads, config: SamplerConfig, device: torch.device):
    """A copy of ``roi_heads`` sampling with ``config`` that shares its modules and records its picks.

    The model's own head is not touched. The copy has no mask or keypoint branch: picking RoIs
    needs none, and without one the targets need no masks."""
    from ..detection.roi_heads import OverlapRoIHeads

    head = OverlapRoIHeads.from_roi_heads(roi_heads, config)
    for name in ("mask_roi_pool", "mask_head", "mask_predictor", "keypoint_roi_pool", "keypoint_head",
                 "keypoint_predictor"):
        setattr(head, name, None)
    head.record_samples = True
    head.validate_inputs = True
    head.generator = torch.Generator(device=device)
    return head


def _cuda_index(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def _seed(seed: int, device: torch.device) -> None:
    """Seed the global generators the analysis draws from: the CPU's and ``device``'s."""
    torch.random.default_generator.manual_seed(seed)
    index = _cuda_index(device)
    if index is not None:
        torch.cuda.default_generators[index].manual_seed(seed)


@contextlib.contextmanager
def _untouched(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Inside: ``model`` in eval mode; on exit every module's own mode and the global RNG states
    (CPU and ``device``) are back as they were."""
    modes = [(module, module.training) for module in model.modules()]
    index = _cuda_index(device)
    try:
        with torch.random.fork_rng(devices=[] if index is None else [index]):
            model.eval()
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def train_proposals(model: torch.nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]):
    """Backbone and RPN of a torchvision ``GeneralizedRCNN`` as in its training forward, minus the
    state changes. Call under ``torch.no_grad()`` with the model in eval mode.

    The RPN's own ``training`` flag is set for the call (so its training pre/post-NMS top-n apply;
    its submodules keep eval mode) and restored; its losses are computed (it needs the targets)
    and dropped: they draw from the global RNG.

    Args:
        images: per image float ``[3, H, W]`` in [0, 1], on the model's device.
        targets: per image ``boxes`` float ``[g, 4]`` (x1, y1, x2, y2, pixels of ``images``) and
            ``labels`` int64 ``[g]``.

    Returns:
        ``(features, proposals, image_sizes, targets)`` in the resized frame the heads see:
        the FPN feature maps (dict), per image ``[n, 4]`` proposals, ``(H, W)`` sizes, and the
        resized targets.
    """
    image_list, targets = model.transform(images, targets)
    features = model.backbone(image_list.tensors)
    if isinstance(features, Tensor):
        features = {"0": features}
    rpn = model.rpn
    was_training = rpn.training
    rpn.training = True  # the module's own flag only: not rpn.train(), which would reach its children
    try:
        proposals, _ = rpn(image_list, features, targets)
    finally:
        rpn.training = was_training
    return features, proposals, image_list.image_sizes, targets


def iou_histograms(model: torch.nn.Module, samples: Sequence[tuple[Tensor, dict[str, Tensor]]], *,
                   samplers: Sequence[str] | Mapping[str, SamplerConfig] = SAMPLERS, batch_size: int = 2,
                   seed: int = 0, progress: bool = True,
                   on_batch: Optional[Callable[[str, SampledBatch, SamplerDiagnostics], None]] = None,
                   ) -> dict[str, IouHistogram]:
    """Figure 4 on ``model``'s proposals: per sampler, the IoU_p,n of the negatives it picks and the
    keys of the positives, over ``samples`` (see the module docstring for what runs as in training).

    Each batch of ``batch_size`` consecutive samples goes through the backbone and the RPN once
    (:func:`train_proposals`); then every sampler picks from the same proposals through the RoI
    head's :meth:`select_weighted_training_samples` (the GT boxes appended, matched with the
    config's thresholds), starting from the seed ``seed + batch index``, and
    :func:`sampler_diagnostics` measures the picks. The model's weights, buffers (BatchNorm
    statistics), modes, RoI head and the global RNG states are unchanged afterwards.

    Args:
        model: an eager torchvision Faster/Mask R-CNN (``transform``, ``backbone``, ``rpn``,
            ``roi_heads``) on the device the analysis runs on.
        samples: a sequence (a dataset) of ``(image, target)``: image float ``[3, H, W]`` in
            [0, 1]; target ``boxes`` float ``[g, 4]`` (x1, y1, x2, y2, pixels) and ``labels``
            int64 ``[g]`` (other keys are ignored).
        samplers: preset names (:data:`SAMPLERS`; each with the model's RoI budget and IoU
            thresholds) or a mapping ``name -> SamplerConfig`` used as given.
        batch_size: images per forward pass (the samplers draw per image, the proposals of an
            image depend a little on the padding of its batch, as in training).
        seed: the samplers' seed.
        progress: a tqdm bar on stderr.
        on_batch: called as ``on_batch(sampler, picks, diagnostics)`` after each sampler's picks
            of each batch (the recorded :class:`SampledBatch` and its measures).

    Returns:
        ``{sampler: IouHistogram}`` in the order of ``samplers``.
    """
    from tqdm import tqdm

    if isinstance(model, torch.jit.ScriptModule) or not all(
            hasattr(model, name) for name in ("transform", "backbone", "rpn", "roi_heads")):
        raise ValueError(f"the IoU histograms need an eager torchvision Faster/Mask R-CNN (transform, backbone, "
                         f"rpn, roi_heads); got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    configs = sampler_configs(samplers, model.roi_heads)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    results = {name: IouHistogram(name, config) for name, config in configs.items()}
    with _untouched(model, device), torch.no_grad(), \
            tqdm(total=len(samples), desc="iou-hist", unit="img", disable=not progress, file=sys.stderr) as bar:
        heads = {name: _analysis_head(model.roi_heads, config, device) for name, config in configs.items()}
        for index, start in enumerate(range(0, len(samples), batch_size)):
            batch = [samples[i] for i in range(start, min(start + batch_size, len(samples)))]
            images = [image.to(device) for image, _ in batch]
            targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for _, t in batch]
            _seed(seed + index, device)
            features, proposals, sizes, targets = train_proposals(model, images, targets)
            for name, head in heads.items():
                _seed(seed + index, device)
                head.generator.manual_seed(seed + index)
                head.select_weighted_training_samples(proposals, targets, features, sizes)
                diagnostics = sampler_diagnostics(head.last_samples, head.sampler_config())
                results[name].add(diagnostics)
                if on_batch is not None:
                    on_batch(name, head.last_samples, diagnostics)
            bar.update(len(batch))
    return results


# ---------------------------------------------------------------------- the files
def write_csv(path: str, results: Mapping[str, IouHistogram]) -> str:
    """``iou_hist.csv``: per sampler and bin of IoU, the count and share of the sampled negatives
    (by IoU_p,n) and positives (by key); each sampler's shares sum to 1 (0 without any RoI)."""
    with atomic_write(path, "w", what="IoU histogram CSV") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for name, result in results.items():
            for k, (lo, hi) in enumerate(zip(IOU_EDGES[:-1], IOU_EDGES[1:])):
                writer.writerow([name, f"{lo:.1f}", f"{hi:.1f}", int(result.neg_counts[k]),
                                 repr(float(result.neg_shares[k])), int(result.pos_counts[k]),
                                 repr(float(result.pos_shares[k]))])
    return path


def plot_histograms(path: str, results: Mapping[str, IouHistogram], title: str = "") -> str:
    """``iou_hist.png``: the share of the sampled negatives per tenth of IoU_p,n (left, Figure 4)
    and of the sampled positives per tenth of their key (right), one step line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = ((axes[0], "neg_shares", "num_neg", "sampled negatives by IoU_p,n (max IoU with the positives)"),
              (axes[1], "pos_shares", "num_pos", "sampled positives by key (max IoU with the negatives)"))
    for ax, values, count, label in panels:
        for name, result in results.items():
            ax.stairs(100.0 * getattr(result, values), IOU_EDGES, label=f"{name} ({getattr(result, count)})",
                      linewidth=1.8)
        ax.set_xlabel(label)
        ax.set_ylabel("% of them")
        ax.set_xlim(0.0, 1.0)
        ax.set_xticks(IOU_EDGES)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return write_figure(path, fig, what="IoU histogram plot")


def _number(value: float, digits: int = 3) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def format_markdown(results: Mapping[str, IouHistogram], description: str) -> str:
    """``iou_hist.md``: per sampler the counts, the share of negatives with IoU_p,n >= 0.5 and in
    each tenth, the mean IoU_p,n and the positives' mean key."""
    labels = bin_labels(IOU_EDGES)
    lines = ["# IoU_p,n of the sampled negatives (Figure 4)", "", description, "",
             "IoU_p,n: a sampled negative's max IoU with the positives of its image (GT copies included; 0 "
             "without any). Key of a positive: its max IoU with the negatives of its image. Shares in percent "
             "of each sampler's sampled negatives.", "",
             f"| sampler | images | negatives | per image | IoU_p,n >= {HIGH_IOU:g} | mean IoU_p,n | "
             + " | ".join(labels) + " | positives | mean key |",
             "|---|" + "---:|" * (len(labels) + 7)]
    for name, r in results.items():
        images = max(r.images, 1)
        lines.append(f"| {name} | {r.images} | {r.num_neg} | {r.num_neg / images:.1f} | "
                     f"{100.0 * r.neg_share_from(HIGH_IOU):.1f} | {_number(r.neg_mean)} | "
                     + " | ".join(f"{100.0 * s:.1f}" for s in r.neg_shares)
                     + f" | {r.num_pos} | {_number(r.pos_mean)} |")
    return "\n".join(lines) + "\n"


def format_rows(results: Mapping[str, IouHistogram]) -> str:
    """The negatives' shares per tenth of IoU_p,n as the text table the command prints."""
    extra = {f">={HIGH_IOU:g}": {n: f"{100.0 * r.neg_share_from(HIGH_IOU):.1f}%" for n, r in results.items()},
             "mean": {n: _number(r.neg_mean) for n, r in results.items()},
             "neg/img": {n: f"{r.num_neg / max(r.images, 1):.1f}" for n, r in results.items()}}
    return "\n".join(format_share_table({n: r.neg_shares for n, r in results.items()}, IOU_EDGES, extra=extra))


# ---------------------------------------------------------------------- the command
@dataclasses.dataclass
class TrainingInputs:
    """A detector and the training images to analyse it on (:func:`load_training_inputs`).

    ``config`` is the checkpoint's ``TrainConfig`` (the defaults without a checkpoint);
    ``description`` says in one sentence which model and data they are, ``name`` in a few words."""

    model: torch.nn.Module
    config: Any
    data: Any
    annotation_file: str
    device: torch.device
    description: str
    name: str


def _fresh_model(config, num_classes: int, seed: int, layout: Optional[dict] = None) -> torch.nn.Module:
    """The detector ``config`` describes with initial weights drawn from ``seed`` (no weights file
    read); the global RNG is left as it was."""
    from ..engine.checkpoint import build_model_for

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return build_model_for(config, num_classes, initial_weights=False, layout=layout).eval()


def load_training_inputs(checkpoint: Optional[str], *, untrained: bool = False, dataset: Optional[str] = "checkpoint",
                         train_images: Optional[str] = None, train_annotations: Optional[str] = None,
                         seed: int = 0, device: str = "auto", outputs: Sequence[tuple[str, str]] = (),
                         output_dir: Optional[str] = None) -> TrainingInputs:
    """Load the detector and the training set of ``analyze iou-hist``, every check before the slow part.

    Args:
        checkpoint: a checkpoint written by ``train``, or None with ``untrained`` (the default
            ``TrainConfig``'s model: the small Faster R-CNN).
        untrained: the checkpoint's architecture with fresh weights drawn from ``seed`` (its layout,
            class count and RoI budget kept, its weights not read).
        dataset: ``"checkpoint"`` for the training set of the checkpoint's run (its COCO files, or the
            built-in synthetic train split from its ``data_root``; without a checkpoint the built-in
            split), ``"synthetic"`` for the built-in synthetic train split, or None for
            ``train_images`` + ``train_annotations`` (a COCO image folder and instances json).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        outputs: ``(what, path)`` of the files to write, checked against the inputs.
        output_dir: created and proven writable before the model loads.

    Raises:
        ValueError: a bad data choice, no checkpoint without ``untrained``, an output that is an
            input, a TorchScript file, other categories than the checkpoint's.
        FileNotFoundError: the checkpoint does not exist.
        OutputError: ``output_dir`` cannot be written.
    """
    from ..data import CocoDetection, synthetic_dataset
    from ..engine.checkpoint import (
        checkpoint_layout,
        config_from_checkpoint,
        load_checkpoint,
        model_from_checkpoint_state,
    )
    from ..engine.config import TrainConfig
    from ..engine.distributed import resolve_device

    if dataset not in ("checkpoint", "synthetic", None):
        raise ValueError(f"dataset must be 'checkpoint', 'synthetic' or None, got {dataset!r}")
    if (dataset is None) != (train_images is not None and train_annotations is not None) or \
            (dataset is not None and (train_images is not None or train_annotations is not None)):
        raise ValueError("give either dataset ('checkpoint' or 'synthetic') or both train_images and "
                         f"train_annotations with dataset=None (got dataset={dataset!r}, "
                         f"train_images={train_images!r}, train_annotations={train_annotations!r})")
    if checkpoint is None and not untrained:
        raise ValueError("a checkpoint is needed (or untrained=True for fresh weights of the default small model)")
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
        check_not_inputs(outputs, [("checkpoint", checkpoint)], advice="give another output folder")
    target = resolve_device(device)
    if output_dir is not None:
        prepare_output_dir(output_dir, "analysis folder")

    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    config = config_from_checkpoint(state, checkpoint) if state is not None else TrainConfig()
    if dataset == "checkpoint" and config.dataset == "coco":
        image_dir, annotation_file = config.train_images, config.train_annotations
    elif dataset is not None:
        image_dir, annotation_file = synthetic_dataset("train", root=config.data_root)
    else:
        image_dir, annotation_file = train_images, train_annotations
    check_not_inputs(outputs, [("annotation file", annotation_file)], advice="give another output folder")
    data = CocoDetection(image_dir, annotation_file, masks=False)
    if state is not None and list(data.category_ids) != [int(c) for c in state["category_ids"]]:
        raise ValueError(f"{annotation_file}: categories {list(data.category_ids)} differ from the categories "
                         f"{list(state['category_ids'])} the checkpoint was trained on")

    if state is None:
        model = _fresh_model(config, data.num_classes, seed)
        what = f"untrained default model ({config.arch}, {config.backbone} backbone; weights from seed {seed})"
        name = f"untrained {config.arch} {config.backbone} (seed {seed})"
    elif untrained:
        model = _fresh_model(config, int(state["num_classes"]), seed, checkpoint_layout(state, config))
        what = (f"untrained {config.arch} ({config.backbone} backbone) of checkpoint `{os.path.abspath(checkpoint)}` "
                f"(weights from seed {seed}, not the checkpoint's)")
        name = f"{os.path.basename(checkpoint)} untrained (seed {seed})"
    else:
        model, _ = model_from_checkpoint_state(state, checkpoint)
        what = (f"checkpoint `{os.path.abspath(checkpoint)}` (iteration {int(state['iteration'])}, trained with "
                f"sampler {config.sampler.sampler})")
        name = f"{os.path.basename(checkpoint)} (iteration {int(state['iteration'])})"
    description = f"Model: {what}. Training images: `{os.path.abspath(annotation_file)}`."
    return TrainingInputs(model.to(target), config, data, annotation_file, target, description, name)


def iou_hist_checkpoint(checkpoint: Optional[str], *, untrained: bool = False, dataset: Optional[str] = "checkpoint",
                        train_images: Optional[str] = None, train_annotations: Optional[str] = None,
                        samplers: Sequence[str] = SAMPLERS, images: int = DEFAULT_IMAGES, seed: int = 0,
                        output_dir: Optional[str] = None, device: str = "auto", batch_size: int = 2,
                        progress: bool = True) -> dict[str, IouHistogram]:
    """``overlap-sampler analyze iou-hist``: Figure 4 for a checkpoint on its first ``images``
    training images (in dataset order; all of them if fewer); prints the negatives' table and
    writes ``iou_hist.csv``, ``iou_hist.png`` and ``iou_hist.md`` to ``output_dir``.

    Args:
        checkpoint, untrained, dataset, train_images, train_annotations, seed, device: the model and
            data, see :func:`load_training_inputs` (``seed`` also seeds the samplers).
        samplers: preset names (:data:`SAMPLERS`), each run with the model's RoI budget.
        images: how many training images to analyse.
        output_dir: default ``analysis/`` in the checkpoint's folder (without a checkpoint:
            ``output/analysis``). Inputs (checkpoint, annotation file) are never written over.
        batch_size, progress: see :func:`iou_histograms`.

    Returns:
        ``{sampler: IouHistogram}`` as written.
    """
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"images must be a positive int, got {images!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    samplers = check_sampler_names(samplers)  # before the model loads
    if output_dir is None:
        output_dir = (os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "analysis") if checkpoint
                      else os.path.join("output", "analysis"))
    paths = {name: os.path.join(output_dir, name) for name in (CSV_NAME, PNG_NAME, MARKDOWN_NAME)}
    outputs = [("IoU histogram CSV", paths[CSV_NAME]), ("IoU histogram plot", paths[PNG_NAME]),
               ("IoU histogram markdown", paths[MARKDOWN_NAME])]
    inputs = load_training_inputs(checkpoint, untrained=untrained, dataset=dataset, train_images=train_images,
                                  train_annotations=train_annotations, seed=seed, device=device, outputs=outputs,
                                  output_dir=output_dir)
    subset = torch.utils.data.Subset(inputs.data, range(min(images, len(inputs.data))))
    results = iou_histograms(inputs.model, subset, samplers=samplers, batch_size=batch_size, seed=seed,
                             progress=progress)
    budget = next(iter(results.values())).config
    description = (f"{inputs.description} {len(subset)} images, {batch_size} per batch, seed {seed}; RPN proposals "
                   "of training mode; every sampler with the model's budget: "
                   + ", ".join(f"{name} {getattr(budget, name)}" for name in BUDGET_FIELDS) + ".")
    write_csv(paths[CSV_NAME], results)
    plot_histograms(paths[PNG_NAME], results, title=f"{inputs.name}: proposals of {len(subset)} training images")
    write_text(paths[MARKDOWN_NAME], format_markdown(results, description), what="IoU histogram markdown")
    print(format_rows(results))
    print(f"wrote {paths[CSV_NAME]}, {paths[PNG_NAME]} and {paths[MARKDOWN_NAME]}")
    return results
