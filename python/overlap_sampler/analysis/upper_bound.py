"""Upper bounds of IoU-based sampling heuristics (the paper's Table 1) for a trained detector.

The paper (Sec. 3.1, Table 1) asks what AP a detector would reach if training made its scores
meet the ideal of a sampling heuristic, and measures it by replacing the scores of the candidate
boxes before NMS with an *oracle* that knows the ground truth:

========================  ====================================================================
row                       scores before NMS
========================  ====================================================================
``model``                 the model's own (the detector unchanged)
``iou_balanced``          Libra R-CNN's ideal, "for any negative n, S_n = 0"
``isr``                   PISA's ideal, "for any positive p and the corresponding GT g, S_p = IoU_g,p"
``overlap``               the overlap sampler's ideal, "for any overlapped examples e_i and e_j,
                          S_ei = IoU_g,ei, S_ej = IoU_g,ej"
``overlap_neg0``          the same with overlapped negatives at 0 (issue 15's reading of it)
========================  ====================================================================

then runs the detector's own NMS and COCO evaluation. :func:`rescore` is the oracle of one image,
:func:`upper_bound` runs it on a dataset and :func:`upper_bound_checkpoint` is
``overlap-sampler analyze upper-bound``.

Where the oracle plugs in: torchvision's ``RoIHeads.postprocess_detections`` turns every proposal
into one candidate per foreground class (its class-specific box, clipped; its softmax score),
drops candidates scoring <= ``score_thresh`` (0.05), drops empty boxes, runs NMS per class at
``nms_thresh`` and keeps the ``detections_per_img`` best (torchvision has no top-k before NMS in
the RoI head; the RPN's top-k happens before and is left alone). The oracle rescores *all*
candidates, before the score threshold, which then applies to the new scores: the paper replaces
the scores of all candidates, and an oracle that zeroes negatives would otherwise only see the
candidates the model already scored above 0.05, and ISR would not promote a well-placed positive
the model scored low. The model's ``score_thresh`` and ``detections_per_img`` are kept.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import boxes as box_ops

from ..io_safety import write_json, write_text
from ..ops import max_iou, splits_from_counts

#: The oracles, in the order of the paper's Table 1, then the other reading of its overlap row.
ORACLES = ("iou_balanced", "isr", "overlap", "overlap_neg0")
#: The rows of the table: the unchanged model, then each oracle.
ROWS = ("model",) + ORACLES
#: What each row sets the scores to (the paper's Table 1 condition), for the printed tables.
CONDITIONS = {
    "model": "the model's own scores",
    "iou_balanced": "S_n = 0 for every negative n",
    "isr": "S_p = IoU_g,p for every positive p",
    "overlap": "S_e = IoU_g,e for every overlapped candidate e",
    "overlap_neg0": "S_p = IoU_g,p for every overlapped positive p, S_n = 0 for every overlapped negative n",
}
#: The three AP numbers the tables show (the JSON has all six of COCOeval's summary).
SHOWN = ("AP", "AP50", "AP75")
#: A candidate is positive when its IoU with a ground truth of its class is at least this (the paper, Sec. 3.2).
POSITIVE_IOU = 0.5

JSON_NAME = "upper_bound.json"
MARKDOWN_NAME = "upper_bound.md"


# ---------------------------------------------------------------------- the oracle, per image
def _class_segments(labels: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """(order sorting ``labels`` stably, splits [num_segments + 1] of the sorted rows by label)."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_segments)
    return order, splits_from_counts(counts, device=labels.device)


def _max_iou_by_class(boxes: Tensor, labels: Tensor, keys: Tensor, key_labels: Tensor, *,
                      exclude_self: bool) -> Tensor:
    """Per box, its max IoU with the ``keys`` of its own label (0 where there is none)."""
    if len(boxes) == 0:
        return boxes.new_zeros(0)
    num_segments = int(max(labels.max(), key_labels.max() if len(key_labels) else 0)) + 1
    order, splits = _class_segments(labels, num_segments)
    key_order, key_splits = _class_segments(key_labels, num_segments)
    values, _ = max_iou(boxes[order].contiguous(), splits, keys[key_order].to(boxes.dtype).contiguous(),
                        key_splits, exclude_self=exclude_self)
    out = torch.empty_like(values)
    out[order] = values
    return out


def gt_iou(boxes: Tensor, labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> Tensor:
    """IoU_g,e of each candidate: its IoU with the best-overlapping ground truth *of its class*.

    Args:
        boxes: float [N, 4] x1y1x2y2; labels: int64 [N]; gt_boxes: float [G, 4] x1y1x2y2 in the
            same frame; gt_labels: int64 [G].

    Returns:
        float [N] in [0, 1], 0 where the image has no ground truth of that class.
    """
    return _max_iou_by_class(boxes, labels, gt_boxes, gt_labels, exclude_self=False)


def overlapped(boxes: Tensor, labels: Tensor, nms_thresh: float) -> Tensor:
    """bool [N]: whether a candidate overlaps another candidate of its class by an IoU above
    ``nms_thresh`` -- the pairs an NMS at that threshold decides between."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.bool, device=boxes.device)
    return _max_iou_by_class(boxes, labels, boxes, labels, exclude_self=True) > nms_thresh


def rescore(boxes: Tensor, scores: Tensor, labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
            oracle: str, nms_thresh: float, *, positive_iou: float = POSITIVE_IOU) -> Tensor:
    """The scores an ideally trained detector would give one image's candidates (Table 1's conditions).

    A candidate is one proposal's class-specific box for one foreground class. IoU_g,e is its IoU
    with the best-overlapping ground truth of *its class* (:func:`gt_iou`); it is positive when
    IoU_g,e >= ``positive_iou`` (0.5), else negative. Each oracle changes some scores and keeps
    the others:

    - ``"iou_balanced"``: every negative scores 0 (paper: "S_n = 0"; issue 15: "IoU with every GT
      of its class < 0.5").
    - ``"isr"``: every positive scores its IoU_g,p (paper: "S_p = IoU_g,p"; issue 15 the same).
    - ``"overlap"``: every *overlapped* candidate scores its IoU_g,e, negatives included (paper:
      "for any overlapped examples e_i and e_j, S_ei = IoU_g,ei", with IoU_g,e defined for every
      example, a negative's being its IoU < 0.5). The paper leaves "overlapped" open; here (as
      issue 15 proposes) it is an IoU *above* ``nms_thresh`` with another candidate of the same
      class, among all the candidates (:func:`overlapped`): exactly the pairs the test NMS decides
      between. (The hard sampler's Eq. 1 uses >= theta for its own IoU_p,n; NMS suppresses only
      above it.)
    - ``"overlap_neg0"``: as ``"overlap"``, but an overlapped negative scores 0: issue 15's reading
      ("every candidate that overlaps another candidate scores its IoU with its GT (0 for
      negatives)"). The paper's formula and that reading differ, so both rows are reported.

    Classes: the paper's sampler matches examples to ground truths of any class; a candidate here
    carries a class, and a box of class c is only a correct detection of a ground truth of class c,
    so both IoU_g,e and "overlapped" look at its class only (issue 15's reading).

    Args:
        boxes: float [N, 4] x1y1x2y2, the candidates of one image.
        scores: float [N], the model's scores.
        labels: int64 [N], 1..C.
        gt_boxes: float [G, 4] x1y1x2y2, in the frame of ``boxes`` (crowd regions left out).
        gt_labels: int64 [G], 1..C.
        oracle: one of :data:`ORACLES`.
        nms_thresh: the test NMS IoU threshold (paper: the model's own); used by ``"overlap"`` and ``"overlap_neg0"``.
        positive_iou: IoU_g,e from which a candidate is positive.

    Returns:
        float [N], the new scores (a new tensor; ``scores`` is not changed).
    """
    if oracle not in ORACLES:
        raise ValueError(f"oracle must be one of {', '.join(ORACLES)}; got {oracle!r}")
    n = len(boxes)
    if boxes.shape != (n, 4) or scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(f"boxes must be [N, 4], scores and labels [N]; got {list(boxes.shape)}, "
                         f"{list(scores.shape)}, {list(labels.shape)}")
    if gt_boxes.shape != (len(gt_labels), 4) or gt_labels.dim() != 1:
        raise ValueError(f"gt_boxes must be [G, 4] and gt_labels [G]; got {list(gt_boxes.shape)}, "
                         f"{list(gt_labels.shape)}")
    iou = gt_iou(boxes, labels, gt_boxes, gt_labels).to(scores.dtype)
    if oracle == "iou_balanced":
        return torch.where(iou >= positive_iou, scores, torch.zeros_like(scores))
    if oracle == "isr":
        return torch.where(iou >= positive_iou, iou, scores)
    target = iou if oracle == "overlap" else torch.where(iou >= positive_iou, iou, torch.zeros_like(iou))
    return torch.where(overlapped(boxes, labels, nms_thresh), target, scores)


# ---------------------------------------------------------------------- torchvision's postprocess, in two halves
def candidate_detections(roi_heads, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                         image_shapes: list[tuple[int, int]]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Every candidate of each image, as torchvision's ``RoIHeads.postprocess_detections`` forms them
    before its score threshold: per proposal and foreground class, the decoded class box clipped to
    the image and the softmax score. Returns per image ``(boxes [P*(C-1), 4], scores, labels)``."""
    num_classes = class_logits.shape[-1]
    counts = [len(p) for p in proposals]
    pred_boxes = roi_heads.box_coder.decode(box_regression, proposals).split(counts, 0)
    pred_scores = F.softmax(class_logits, -1).split(counts, 0)
    out = []
    for boxes, scores, image_shape in zip(pred_boxes, pred_scores, image_shapes):
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
        labels = torch.arange(num_classes, device=class_logits.device).view(1, -1).expand_as(scores)
        out.append((boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)))
    return out


def select_detections(boxes: Tensor, scores: Tensor, labels: Tensor, *, score_thresh: float, nms_thresh: float,
                      detections_per_img: int) -> Tensor:
    """The rest of torchvision's ``postprocess_detections`` for one image: indices (int64, best first)
    of the candidates scoring above ``score_thresh``, not empty, kept by the per-class NMS at
    ``nms_thresh``, at most ``detections_per_img``."""
    keep = torch.where(scores > score_thresh)[0]
    keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
    keep = keep[box_ops.batched_nms(boxes[keep], scores[keep], labels[keep], nms_thresh)]
    return keep[:detections_per_img]


class OracleHook:
    """Stands in for ``roi_heads.postprocess_detections`` while installed: returns the model's own
    detections unchanged and, from the same candidates, those of every oracle.

    Before each forward, :meth:`expect` gives the batch's ground truth (boxes in the input images'
    pixels) and the input sizes; after it, :attr:`detections` holds per oracle one dict per image
    (``boxes`` in input pixels, ``scores``, ``labels``), as the model would have returned them.
    """

    def __init__(self, roi_heads, oracles: Sequence[str], nms_thresh: float):
        self.roi_heads = roi_heads
        self.original = roi_heads.postprocess_detections
        self.oracles = tuple(oracles)
        self.nms_thresh = float(nms_thresh)
        self.targets: list[tuple[Tensor, Tensor]] = []
        self.sizes: list[tuple[int, int]] = []
        self.detections: dict[str, list[dict[str, Tensor]]] = {}

    def expect(self, targets: Sequence[dict], sizes: Sequence[tuple[int, int]]) -> None:
        self.targets = [(t["boxes"], t["labels"]) for t in targets]
        self.sizes = [tuple(s) for s in sizes]
        self.detections = {}

    def __call__(self, class_logits, box_regression, proposals, image_shapes):
        from torchvision.models.detection.transform import resize_boxes

        if len(self.targets) != len(proposals):
            raise RuntimeError(f"OracleHook: ground truth for {len(self.targets)} images, the batch has "
                               f"{len(proposals)}; call expect() before each forward")
        heads = self.roi_heads
        detections: dict[str, list[dict[str, Tensor]]] = {oracle: [] for oracle in self.oracles}
        candidates = candidate_detections(heads, class_logits, box_regression, proposals, image_shapes)
        for (boxes, scores, labels), (gt_boxes, gt_labels), shape, size in zip(
                candidates, self.targets, image_shapes, self.sizes):
            # The candidates are in the resized image the network saw; IoU does not change with
            # the resize, but the ground truth must be in the same frame.
            gt_boxes = resize_boxes(gt_boxes.to(boxes.device, boxes.dtype), list(size), list(shape))
            gt_labels = gt_labels.to(labels.device)
            for oracle in self.oracles:
                new = rescore(boxes, scores, labels, gt_boxes, gt_labels, oracle, self.nms_thresh)
                keep = select_detections(boxes, new, labels, score_thresh=heads.score_thresh,
                                         nms_thresh=self.nms_thresh, detections_per_img=heads.detections_per_img)
                detections[oracle].append({"boxes": resize_boxes(boxes[keep], list(shape), list(size)),
                                           "scores": new[keep], "labels": labels[keep]})
        self.detections = detections
        return self.original(class_logits, box_regression, proposals, image_shapes)


class _Installed:
    """Context manager: ``roi_heads.postprocess_detections`` replaced by ``hook`` and ``nms_thresh`` set."""

    def __init__(self, roi_heads, hook: OracleHook):
        self.roi_heads, self.hook = roi_heads, hook

    def __enter__(self) -> OracleHook:
        self.saved_nms = self.roi_heads.nms_thresh
        self.roi_heads.nms_thresh = self.hook.nms_thresh  # the model row uses the same threshold
        self.roi_heads.postprocess_detections = self.hook  # an instance attribute shadows the method
        return self.hook

    def __exit__(self, *exc) -> None:
        del self.roi_heads.postprocess_detections
        self.roi_heads.nms_thresh = self.saved_nms


def install_oracles(model: torch.nn.Module, nms_thresh: Optional[float] = None,
                    oracles: Sequence[str] = ORACLES) -> _Installed:
    """``with install_oracles(model) as hook:`` the detector's RoI head computes, besides its own
    detections, those of each oracle (see :class:`OracleHook`); restored on exit.

    ``nms_thresh`` (None: the model's own ``roi_heads.nms_thresh``) is the test NMS threshold of
    the model's own detections too, so that every row is measured with one NMS.
    """
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is None or not callable(getattr(roi_heads, "postprocess_detections", None)) \
            or not hasattr(roi_heads, "box_coder") or isinstance(model, torch.jit.ScriptModule):
        raise ValueError(f"the upper bounds need an eager torchvision Faster/Mask R-CNN (a RoIHeads whose "
                         f"postprocess_detections can be replaced); got {type(model).__name__}")
    unknown = [o for o in oracles if o not in ORACLES]
    if unknown:
        raise ValueError(f"oracles must be among {', '.join(ORACLES)}; got {unknown[0]!r}")
    nms = roi_heads.nms_thresh if nms_thresh is None else check_nms_thresh(nms_thresh)
    return _Installed(roi_heads, OracleHook(roi_heads, oracles, nms))


def check_nms_thresh(value) -> float:
    """``value`` as a float in [0, 1], else a ValueError naming it."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise ValueError(f"nms_thresh must be an IoU in [0, 1], got {value!r}")
    return number


# ---------------------------------------------------------------------- a dataset
def _boxes_only(detections: dict) -> dict:
    return {key: detections[key] for key in ("boxes", "scores", "labels")}


def upper_bound(model: torch.nn.Module, dataset, *, nms_thresh: Optional[float] = None,
                device: str | torch.device = "cpu", batch_size: int = 2, progress: bool = True) -> dict:
    """Box AP of ``model`` on ``dataset`` with its own scores and with each oracle's (Table 1).

    One forward pass per batch (the batches of ``evaluate``, :func:`same_size_batches`, so the
    ``model`` row is ``evaluate``'s box AP when ``nms_thresh`` is the model's own); the oracles
    rescore the same candidates (:class:`OracleHook`). Boxes only: a mask head runs but its masks
    are not scored.

    Args:
        model: an eager torchvision Faster/Mask R-CNN (its training flag and ``nms_thresh`` are
            restored afterwards; it is moved to ``device``).
        dataset: a ``overlap_sampler.data.CocoDetection`` (targets: ``boxes`` x1y1x2y2 in pixels,
            ``labels`` 1..C, crowd regions left out, which COCOeval ignores too).
        nms_thresh: the test NMS IoU threshold of every row (None: the model's own).
        device, batch_size, progress: as for ``evaluate``.

    Returns:
        ``{row: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}`` for each row of :data:`ROWS`, in
        that order; floats in [0, 1], -1 where there is no ground truth in that area range.
    """
    from ..engine.evaluate import coco_metrics, detections_to_coco, same_size_batches
    from ..engine.export import detect
    from tqdm import tqdm

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device)
    category_ids = list(dataset.category_ids)
    results: dict[str, list[dict]] = {row: [] for row in ROWS}
    image_ids: list[int] = []
    was_training = model.training
    model.eval().to(device)
    try:
        with install_oracles(model, nms_thresh) as hook, torch.inference_mode(), \
                tqdm(total=len(dataset), desc="upper bound", unit="img", disable=not progress,
                     file=sys.stderr) as bar:
            for batch in same_size_batches(dataset, batch_size):
                samples = [dataset[i] for i in batch]
                images = [image.to(device) for image, _ in samples]
                hook.expect([target for _, target in samples], [tuple(image.shape[-2:]) for image in images])
                outputs = detect(model, images)
                rows = {"model": outputs, **hook.detections}
                for k, (_, target) in enumerate(samples):
                    image_id = int(target["image_id"])
                    image_ids.append(image_id)
                    for row in ROWS:
                        results[row].extend(detections_to_coco(_boxes_only(rows[row][k]), image_id, category_ids))
                bar.update(len(samples))
    finally:
        model.train(was_training)
    return {row: coco_metrics(dataset.coco, results[row], "bbox", image_ids=image_ids) for row in ROWS}


# ---------------------------------------------------------------------- tables and the command
def _percent(value: float) -> str:
    return "-" if value is None or value < 0 else f"{100.0 * value:.1f}"


def format_rows(rows: dict) -> str:
    """The rows side by side as a fixed-width text table of AP, AP50, AP75 in percent.

    >>> print(format_rows({"model": {"AP": 0.25, "AP50": 0.5, "AP75": 0.2},
    ...                    "isr": {"AP": 0.3, "AP50": 0.5, "AP75": 0.3}}))
    row           AP     AP50   AP75
    model         25.0   50.0   20.0
    isr           30.0   50.0   30.0
    """
    lines = ["row".ljust(14) + "".join(name.ljust(7) for name in SHOWN)]
    for row, values in rows.items():
        lines.append(row.ljust(14) + "".join(_percent(values.get(name)).ljust(7) for name in SHOWN))
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(report: dict) -> str:
    """``report`` (as :func:`upper_bound_checkpoint` writes it) as a markdown table with each row's condition."""
    lines = ["# Upper bounds of the sampling heuristics (Table 1)", "",
             f"Checkpoint `{report['checkpoint']}`, data `{report['annotation_file']}` "
             f"({report['images']} images); test NMS {report['nms_thresh']:g}, score threshold "
             f"{report['score_thresh']:g}, at most {report['detections_per_img']} detections an image; "
             f"positives: IoU with a ground truth of their class >= {report['positive_iou']:g}; "
             f"overlapped: IoU > {report['nms_thresh']:g} with another candidate of their class.", "",
             "| row | scores before NMS | " + " | ".join(SHOWN) + " |",
             "|---|---|" + "---:|" * len(SHOWN)]
    for row, values in report["rows"].items():
        lines.append(f"| {row} | {CONDITIONS[row]} | " + " | ".join(_percent(values[n]) for n in SHOWN) + " |")
    return "\n".join(lines) + "\n"


def upper_bound_checkpoint(checkpoint: str, *, dataset: Optional[str] = "checkpoint",
                           val_images: Optional[str] = None, val_annotations: Optional[str] = None,
                           output_dir: Optional[str] = None, nms_thresh: Optional[float] = None,
                           device: str = "auto", batch_size: int = 2, progress: bool = True) -> dict:
    """``overlap-sampler analyze upper-bound``: the Table 1 rows of a training checkpoint; prints them,
    writes ``upper_bound.json`` and ``upper_bound.md`` to ``output_dir``.

    Args:
        checkpoint: a checkpoint written by ``train`` (not an exported TorchScript file: its RoI
            head cannot be rescored).
        dataset, val_images, val_annotations: the validation set, as for ``evaluate_checkpoint``
            (default: the checkpoint's own).
        output_dir: where the two files go (default: ``analysis/`` in the checkpoint's folder).
            Files that are inputs (the checkpoint, the annotation file) are never written over.
        nms_thresh: the test NMS IoU threshold of every row (None: the model's own, the paper's
            choice, so that the ``model`` row is ``eval``'s box AP).
        device, batch_size, progress: as for ``evaluate_checkpoint``.

    Returns:
        the report written as JSON: ``checkpoint``, ``annotation_file``, ``images``, ``nms_thresh``,
        ``score_thresh``, ``detections_per_img``, ``positive_iou`` and ``rows`` (see
        :func:`upper_bound`).
    """
    from ..engine.checkpoint import is_torchscript_archive
    from ..engine.eval_inputs import load_eval_inputs

    if nms_thresh is not None:
        nms_thresh = check_nms_thresh(nms_thresh)
    if os.path.isfile(checkpoint) and is_torchscript_archive(checkpoint):
        raise ValueError(f"{checkpoint} is an exported TorchScript model: the upper bounds rescore the RoI head's "
                         "candidates inside the model; give the training checkpoint it was exported from")
    output_dir = output_dir or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "analysis")
    json_path, md_path = os.path.join(output_dir, JSON_NAME), os.path.join(output_dir, MARKDOWN_NAME)
    inputs = load_eval_inputs(checkpoint, dataset=dataset, val_images=val_images, val_annotations=val_annotations,
                              device=device, outputs=[("upper-bound JSON", json_path),
                                                      ("upper-bound markdown", md_path)],
                              masks=False)
    heads = inputs.model.roi_heads
    nms = heads.nms_thresh if nms_thresh is None else nms_thresh
    rows = upper_bound(inputs.model, inputs.data, nms_thresh=nms, device=inputs.device, batch_size=batch_size,
                       progress=progress)
    report = {"checkpoint": os.path.abspath(checkpoint), "annotation_file": os.path.abspath(inputs.annotation_file),
              "images": len(inputs.data), "nms_thresh": float(nms), "score_thresh": float(heads.score_thresh),
              "detections_per_img": int(heads.detections_per_img), "positive_iou": POSITIVE_IOU, "rows": rows}
    write_json(json_path, report, what="upper-bound JSON", indent=2)
    write_text(md_path, format_markdown(report), what="upper-bound markdown")
    print(format_rows(rows))
    print(f"wrote {json_path} and {md_path}")
    return report

