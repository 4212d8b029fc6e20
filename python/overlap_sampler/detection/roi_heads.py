"""torchvision's RoI heads with the Overlap Sampler and the ε loss weights.

The only place where sampling plugs in is :meth:`OverlapRoIHeads.select_weighted_training_samples`:
one ``torch.ops.overlap_sampler.sample`` call for the whole batch, then a
gather of boxes, labels, regression targets and loss weights. Everything else
(box and mask heads, inference, TorchScript) is torchvision's.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    keypointrcnn_inference,
    keypointrcnn_loss,
    maskrcnn_inference,
    maskrcnn_loss,
)

from ..sampling.config import BUDGET_FIELDS, SamplerConfig
from ..sampling.examples import ExampleBatch, match_examples
from ..sampling.rivals import SCORE_CHUNK, SCORING_SAMPLERS, isr_loss_terms, select_rival
from .diagnostics import SampledBatch, from_torchvision_samples
from .losses import weighted_fastrcnn_loss


# The head holds each SamplerConfig field as a typed attribute (TorchScript cannot hold a dataclass).
_SETTING_TYPES = typing.get_type_hints(SamplerConfig)


def _as_attribute(name: str, value: Any) -> Any:
    # TorchScript types the attributes from the annotations: 2 for a float setting must be 2.0.
    if isinstance(value, int) and not isinstance(value, bool) and _SETTING_TYPES[name] in (float, Optional[float]):
        return float(value)
    return value


class OverlapRoIHeads(RoIHeads):
    """A :class:`torchvision.models.detection.roi_heads.RoIHeads` whose training
    examples come from the Overlap Sampler and whose Fast R-CNN loss weighs
    each RoI (ε for the best sampled positive of each GT).

    Build it with :meth:`from_roi_heads` (or :func:`overlap_sampler.detection.install_sampler`):
    it reuses the box/mask/keypoint modules of an existing head, so weights and
    ``state_dict`` keys are unchanged. The :class:`SamplerConfig` is stored as
    plain typed attributes (``sampler``, ``neg_strategy``, ..., ``bg_iou_thresh``)
    because TorchScript cannot hold a dataclass; :meth:`sampler_config` gives it back.

    Training (``self.training``), by ``sampler``:
      * ``"overlap"`` / ``"iou_balanced"``: one ``torch.ops.overlap_sampler.sample``
        call for the batch (GT boxes appended as examples);
      * ``"random"``: torchvision's own sampling, unchanged, and all-ones
        weights (the loss then equals torchvision's);
      * ``"libra"``, ``"ohem"``, ``"isr"``: the rival samplers of
        :mod:`overlap_sampler.sampling.rivals` (eager mode only; ``ohem`` and
        ``isr`` score the candidates with this head's box branch, no grad).
      Every sampler's picks go through the same gather and one weighted loss,
      :func:`weighted_fastrcnn_loss`.
      After each training forward ``last_num_pos`` / ``last_num_neg`` hold the
      sampled fg / bg counts per image (int64 ``[B]``, on the boxes' device).
    Inference is torchvision's, unchanged (the test NMS threshold is ``nms_thresh``).

    Other attributes:
      * ``generator``: a ``torch.Generator`` on the boxes' device used by the
        sampler, or None (the default) for the global RNG, so ``torch.manual_seed``
        makes training reproducible. Not used under TorchScript (global RNG).
      * ``validate_inputs``: let the op check box values and splits (default
        True). On CUDA those checks read values on the host; set False to skip
        them (the splits built here are always consistent and torchvision's
        ``GeneralizedRCNN`` already rejects degenerate GT boxes). The head
        still reads the per-image sample counts once per step, to cut the
        batch into torchvision's per-image lists.
      * ``record_samples``: keep the batch just sampled in ``last_samples``
        (a :class:`~overlap_sampler.detection.diagnostics.SampledBatch`, the
        op's layout whichever sampler ran) for
        :func:`~overlap_sampler.detection.diagnostics.sampler_diagnostics`.
        Default False (``last_samples`` None); training sets it at its
        diagnostics steps only. Eager mode only.
    """

    # TorchScript reads attribute types from the class annotations, and a
    # subclass's own annotations hide its base's: repeat torchvision's.
    __annotations__ = {
        **RoIHeads.__annotations__,
        **_SETTING_TYPES,
        "validate_inputs": bool,
        "record_samples": bool,
        "last_num_pos": Tensor,
        "last_num_neg": Tensor,
    }
    __jit_ignored_attributes__ = ["generator", "last_samples"]

    def __init__(
        self,
        box_roi_pool,
        box_head,
        box_predictor,
        bbox_reg_weights,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        sampler_config: Optional[SamplerConfig] = None,
        mask_roi_pool=None,
        mask_head=None,
        mask_predictor=None,
        keypoint_roi_pool=None,
        keypoint_head=None,
        keypoint_predictor=None,
    ):
        """Same modules and inference settings as torchvision's ``RoIHeads``;
        the training-sample settings (IoU thresholds, batch size per image,
        positive fraction) come from ``sampler_config`` (None = defaults)."""
        config = SamplerConfig() if sampler_config is None else sampler_config
        config.validate()
        super().__init__(
            box_roi_pool, box_head, box_predictor,
            config.fg_iou_thresh, config.bg_iou_thresh, config.batch_size_per_image,
            config.positive_fraction, bbox_reg_weights, score_thresh, nms_thresh,
            detections_per_img, mask_roi_pool, mask_head, mask_predictor,
            keypoint_roi_pool, keypoint_head, keypoint_predictor,
        )
        self.generator: Optional[torch.Generator] = None
        self.validate_inputs = True
        self.record_samples = False
        self.last_samples: Optional[SampledBatch] = None
        self.last_num_pos = torch.zeros(0, dtype=torch.int64)
        self.last_num_neg = torch.zeros(0, dtype=torch.int64)
        self.set_sampler(config)

    @classmethod
    def from_roi_heads(cls, roi_heads: RoIHeads, config: Optional[SamplerConfig] = None) -> "OverlapRoIHeads":
        """A new head sharing every submodule and setting of ``roi_heads``
        (box pool/head/predictor, box coder, score/NMS thresholds, detections
        per image, mask and keypoint branches, train/eval mode), with the
        training-sample settings (thresholds, batch size, fraction) of ``config``."""
        if not isinstance(roi_heads, RoIHeads):
            raise TypeError(f"roi_heads must be a torchvision RoIHeads, got {type(roi_heads).__name__}")
        head = cls(
            roi_heads.box_roi_pool, roi_heads.box_head, roi_heads.box_predictor,
            roi_heads.box_coder.weights, roi_heads.score_thresh, roi_heads.nms_thresh,
            roi_heads.detections_per_img, config,
            roi_heads.mask_roi_pool, roi_heads.mask_head, roi_heads.mask_predictor,
            roi_heads.keypoint_roi_pool, roi_heads.keypoint_head, roi_heads.keypoint_predictor,
        )
        head.box_coder = roi_heads.box_coder  # keeps bbox_xform_clip too
        head.box_similarity = roi_heads.box_similarity
        if isinstance(roi_heads, OverlapRoIHeads):
            head.generator = roi_heads.generator
            head.validate_inputs = roi_heads.validate_inputs
            head.record_samples = roi_heads.record_samples
        head.train(roi_heads.training)
        return head

    def set_sampler(self, config: SamplerConfig) -> None:
        """Switch the training-sample settings to ``config`` (validated).

        Also rebuilds torchvision's matcher and random sampler from it, so the
        ``"random"`` path uses the same thresholds and budget. With
        ``sampler="random"`` the method fields (strategies, bins, ε, ...) are
        stored as the ``"random"`` preset's, which is what torchvision's sampler
        does, so that :meth:`sampler_config` reports what runs (every sampler:
        :meth:`SamplerConfig.normalized`)."""
        config = config.validate().normalized()
        for name, value in config.to_dict().items():
            setattr(self, name, _as_attribute(name, value))
        self.proposal_matcher = det_utils.Matcher(self.fg_iou_thresh, self.bg_iou_thresh,
                                                  allow_low_quality_matches=False)
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(self.batch_size_per_image,
                                                                       self.positive_fraction)

    def sampler_config(self) -> SamplerConfig:
        """The current settings as a :class:`SamplerConfig`."""
        return SamplerConfig(**{name: getattr(self, name) for name in _SETTING_TYPES})

    def extra_repr(self) -> str:
        # The attributes as they are: printing must work even after an invalid edit.
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(SamplerConfig))
        return f"sampler_config=SamplerConfig({fields})"

    @torch.jit.unused
    def _eager_generator(self) -> Optional[torch.Generator]:
        return self.generator

    def _generator(self) -> Optional[torch.Generator]:
        if torch.jit.is_scripting():
            return None
        return self._eager_generator()

    # Called under `if not torch.jit.is_scripting()`, a branch TorchScript does not compile.
    def _record(self, proposals: Tensor, proposal_counts: list[int], gt_boxes: Tensor, gt_counts: list[int],
                indices: Tensor, num_pos: Tensor, weights: Tensor) -> None:
        self.last_samples = SampledBatch(proposals, proposal_counts, gt_boxes, gt_counts, indices, num_pos, weights)

    def _record_torchvision(self, proposals_with_gt: list[Tensor], gt_boxes: list[Tensor],
                            sampled: list[Tensor], labels: list[Tensor]) -> None:
        self.last_samples = from_torchvision_samples(proposals_with_gt, gt_boxes, sampled, labels)

    def check_targets(self, targets):
        # type: (Optional[list[dict[str, Tensor]]]) -> None
        # torchvision's checks (TorchScript cannot call super()), plus shapes.
        if targets is None:
            raise ValueError("targets should not be None")
        if not all(["boxes" in t for t in targets]):
            raise ValueError("Every element of targets should have a boxes key")
        if not all(["labels" in t for t in targets]):
            raise ValueError("Every element of targets should have a labels key")
        if self.has_mask():
            if not all(["masks" in t for t in targets]):
                raise ValueError("Every element of targets should have a masks key")
        for t in targets:
            # Shapes only (no host sync): mismatched labels would silently
            # give positives the wrong class after the gather.
            if t["boxes"].dim() != 2 or t["boxes"].shape[-1] != 4:
                raise ValueError(f"target boxes must have shape [n, 4], got {t['boxes'].shape}")
            if t["labels"].shape[0] != t["boxes"].shape[0]:
                raise ValueError(f"target labels ({t['labels'].shape[0]}) and boxes "
                                 f"({t['boxes'].shape[0]}) must have the same length")

    def select_training_samples(
        self,
        proposals,  # type: list[Tensor]
        targets,  # type: Optional[list[dict[str, Tensor]]]
    ):
        # type: (...) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]
        """torchvision's interface: ``(proposals, matched_idxs, labels,
        regression_targets)`` per image; see :meth:`select_weighted_training_samples`."""
        proposals, matched_idxs, labels, regression_targets, _ = self.select_weighted_training_samples(
            proposals, targets)
        return proposals, matched_idxs, labels, regression_targets

    def select_weighted_training_samples(
        self,
        proposals: list[Tensor],
        targets: Optional[list[dict[str, Tensor]]],
        features: Optional[dict[str, Tensor]] = None,
        image_shapes: Optional[list[tuple[int, int]]] = None,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """The RoIs the box head trains on, per image: the one place where the sampler plugs in.

        Args:
            proposals: per image, RPN proposals ``[n_i, 4]`` (x1, y1, x2, y2).
            targets: per image, ``boxes`` ``[g_i, 4]`` float and ``labels`` int64 ``[g_i]``.
            features / image_shapes: the box head's inputs, needed by the samplers that score the
                candidates with the box head (``ohem``, ``isr``).

        The chosen sampler returns its picks in the ``sample`` op's layout (``random`` runs
        torchvision's own code); the gather below is shared.

        Returns:
            ``(boxes, matched_idxs, labels, regression_targets, weights)``, lists
            over images: sampled boxes ``[r_i, 4]`` (positives first, GT copies
            included), index of the matched GT *within the image* (int64, 0 for
            negatives, as torchvision), labels (int64, 0 = background),
            ``box_coder`` targets ``[r_i, 4]`` (zeros for negatives) and loss
            weights (float32: ε / 1, or the sampler's). Also sets ``last_num_pos`` / ``last_num_neg``.
        """
        if self.sampler == "random":
            return self._torchvision_training_samples(proposals, targets)
        self.check_targets(targets)
        if targets is None:
            raise ValueError("targets should not be None")
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        # The batch concatenated once: the op, the recording and the gather read it.
        all_proposals = torch.cat(proposals)
        all_gt = torch.cat(gt_boxes)
        if self.sampler == "overlap" or self.sampler == "iou_balanced":
            indices, matched_gt, weights, num_pos, num_neg = self._overlap_selection(
                all_proposals, [p.shape[0] for p in proposals], all_gt, targets)
        elif torch.jit.is_scripting():
            raise RuntimeError("this sampler is written in Python and trains in eager mode only; a scripted "
                               "model trains with sampler 'overlap', 'iou_balanced' or 'random'")
        else:
            indices, matched_gt, weights, num_pos, num_neg = self._rival_selection(
                proposals, targets, features, image_shapes)
        self.last_num_pos = num_pos
        self.last_num_neg = num_neg
        if not torch.jit.is_scripting():
            if self.record_samples:
                self._record(all_proposals.float(), [p.shape[0] for p in proposals],
                             torch.cat([t["boxes"] for t in targets]).float(), [g.shape[0] for g in gt_boxes],
                             indices, num_pos, weights)
        return self._gather_samples(all_proposals, all_gt, [g.shape[0] for g in gt_boxes], gt_labels, indices,
                                    matched_gt, weights, num_pos, num_neg)

    def _overlap_selection(
        self,
        all_proposals: Tensor,
        proposal_counts: list[int],
        all_gt: Tensor,
        targets: list[dict[str, Tensor]],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One ``torch.ops.overlap_sampler.sample`` call for the batch (GT boxes appended)."""
        device = all_proposals.device
        # Under autocast the proposals are 16-bit: match and sample in float32
        # (GT boxes at their own precision), as bfloat16 coordinates near 1000 px
        # are 4 px apart and the op takes no bfloat16.
        if all_proposals.dtype == torch.float16 or all_proposals.dtype == torch.bfloat16:
            sample_proposals = all_proposals.float()
            sample_gt = torch.cat([t["boxes"] for t in targets]).float()
        else:
            sample_proposals = all_proposals
            sample_gt = all_gt
        # The op's own arguments (its C++ schema): each is a SamplerConfig field of the same name;
        # tests/test_sampler_settings.py checks that every op setting is passed.
        indices, matched_gt, weights, num_pos, num_neg = torch.ops.overlap_sampler.sample(
            sample_proposals, _splits(proposal_counts, device),
            sample_gt, _splits([t["boxes"].shape[0] for t in targets], device),
            batch_size_per_image=self.batch_size_per_image,
            positive_fraction=self.positive_fraction,
            fg_iou_thresh=self.fg_iou_thresh,
            bg_iou_thresh=self.bg_iou_thresh,
            append_gt=True,
            neg_strategy=self.neg_strategy,
            pos_strategy=self.pos_strategy,
            num_bins=self.num_bins,
            hard_thresh=self.hard_thresh,
            bin_upper=self.bin_upper,
            pos_weight=self.pos_weight,
            generator=self._generator(),
            pos_key=self.pos_key,
            validate=self.validate_inputs,
        )
        return indices, matched_gt, weights, num_pos, num_neg

    @torch.jit.unused
    def _rival_selection(
        self,
        proposals: list[Tensor],
        targets: list[dict[str, Tensor]],
        features: Optional[dict[str, Tensor]],
        image_shapes: Optional[list[tuple[int, int]]],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The Python samplers (``libra``, ``ohem``, ``isr``; eager mode only), in the op's layout."""
        batch = match_examples(proposals, [t["boxes"] for t in targets], [t["labels"] for t in targets],
                               self.fg_iou_thresh, self.bg_iou_thresh)
        scorer = None
        if self.sampler in SCORING_SAMPLERS:
            if features is None or image_shapes is None:
                raise ValueError(f"sampler {self.sampler!r} scores the candidates with the box head: pass "
                                 "features and image_shapes to select_weighted_training_samples")
            scorer = self._box_scorer(batch, features, image_shapes, proposals[0].dtype)
        return tuple(select_rival(self.sampler_config(), batch, scorer, self.box_coder, self._generator()))

    @torch.jit.unused
    def _box_scorer(self, batch: ExampleBatch, features: dict[str, Tensor], image_shapes: list[tuple[int, int]],
                    dtype: torch.dtype) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """``rows -> (class_logits, box_regression)`` of those examples by the box head, without grad,
        in chunks of ``SCORE_CHUNK`` RoIs so that memory stays bounded for any number of proposals.
        The head keeps its mode (as the OHEM and PISA reference code)."""
        num_images = batch.num_images

        def score(rows: Tensor) -> tuple[Tensor, Tensor]:
            logits, deltas = [], []
            with torch.no_grad():
                for chunk in rows.split(SCORE_CHUNK):
                    order = torch.argsort(batch.image[chunk], stable=True)
                    counts = torch.bincount(batch.image[chunk], minlength=num_images).tolist()
                    per_image = list(batch.boxes[chunk[order]].to(dtype).split(counts))
                    pooled = self.box_head(self.box_roi_pool(features, per_image, image_shapes))
                    chunk_logits, chunk_deltas = self.box_predictor(pooled)
                    back = torch.argsort(order)
                    logits.append(chunk_logits.float()[back])
                    deltas.append(chunk_deltas.float()[back])
            if not logits:
                num_classes = self.box_predictor.cls_score.out_features
                return rows.new_zeros((0, num_classes), dtype=torch.float32), \
                    rows.new_zeros((0, 4 * num_classes), dtype=torch.float32)
            return torch.cat(logits), torch.cat(deltas)

        return score

    def _gather_samples(
        self,
        all_proposals: Tensor,
        all_gt: Tensor,
        gt_counts: list[int],
        gt_labels: list[Tensor],
        indices: Tensor,
        matched_gt: Tensor,
        weights: Tensor,
        num_pos: Tensor,
        num_neg: Tensor,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Boxes, labels, regression targets and weights of the picks (op layout), per image."""
        dtype = all_proposals.dtype
        device = all_proposals.device
        num_images = indices.shape[0]
        num_proposals = all_proposals.shape[0]
        num_gt = all_gt.shape[0]

        # Gather over the whole batch at once. A dummy unit box ends both the
        # example table (target of -1 padding) and the GT table (target of
        # negatives), so every index is valid and every encoded delta finite.
        dummy = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=dtype, device=device)
        examples = torch.cat([all_proposals, all_gt, dummy])
        gt_table = torch.cat([all_gt, dummy])
        label_table = torch.cat(gt_labels + [torch.zeros(1, dtype=torch.int64, device=device)]).to(torch.int64)
        local_gt_table = torch.cat(
            [torch.arange(c, device=device) for c in gt_counts] + [torch.zeros(1, dtype=torch.int64, device=device)])

        flat_indices = indices.reshape(-1)
        flat_indices = torch.where(flat_indices >= 0, flat_indices,
                                   torch.full_like(flat_indices, num_proposals + num_gt))
        flat_matched = matched_gt.reshape(-1)
        is_pos = flat_matched >= 0
        flat_matched = torch.where(is_pos, flat_matched, torch.full_like(flat_matched, num_gt))

        boxes = examples[flat_indices]
        labels = label_table[flat_matched]
        local_matched = local_gt_table[flat_matched]
        target_boxes = torch.where(is_pos[:, None], gt_table[flat_matched], boxes)
        regression_targets = self.box_coder.encode_single(target_boxes, boxes)
        flat_weights = weights.reshape(-1)  # float32 even under autocast: ε is not rounded to 16 bits

        # Each row holds its samples as a prefix (positives, negatives, then
        # -1 padding): one host read of the counts, then plain slices.
        counts: list[int] = (num_pos + num_neg).tolist()
        width = indices.shape[1]
        out_boxes: list[Tensor] = []
        out_matched: list[Tensor] = []
        out_labels: list[Tensor] = []
        out_targets: list[Tensor] = []
        out_weights: list[Tensor] = []
        for b in range(num_images):
            start = b * width
            end = start + counts[b]
            out_boxes.append(boxes[start:end])
            out_matched.append(local_matched[start:end])
            out_labels.append(labels[start:end])
            out_targets.append(regression_targets[start:end])
            out_weights.append(flat_weights[start:end])
        return out_boxes, out_matched, out_labels, out_targets, out_weights

    def _torchvision_training_samples(
        self,
        proposals: list[Tensor],
        targets: Optional[list[dict[str, Tensor]]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        # torchvision's RoIHeads.select_training_samples, verbatim (TorchScript
        # cannot call super()), plus all-ones weights and the fg/bg counts.
        self.check_targets(targets)
        if targets is None:
            raise ValueError("targets should not be None")
        dtype = proposals[0].dtype
        device = proposals[0].device

        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]

        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        sampled_inds = self.subsample(labels)
        with_gt = list(proposals)  # the loop below replaces the entries by their samples
        matched_gt_boxes = []
        num_images = len(proposals)
        for img_id in range(num_images):
            img_sampled_inds = sampled_inds[img_id]
            proposals[img_id] = proposals[img_id][img_sampled_inds]
            labels[img_id] = labels[img_id][img_sampled_inds]
            matched_idxs[img_id] = matched_idxs[img_id][img_sampled_inds]

            gt_boxes_in_image = gt_boxes[img_id]
            if gt_boxes_in_image.numel() == 0:
                gt_boxes_in_image = torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt_boxes.append(gt_boxes_in_image[matched_idxs[img_id]])

        regression_targets = self.box_coder.encode(matched_gt_boxes, proposals)
        weights = [torch.ones(lab.shape[0], dtype=torch.float32, device=device) for lab in labels]
        self.last_num_pos = torch.stack([(lab > 0).sum() for lab in labels])
        self.last_num_neg = torch.stack([(lab == 0).sum() for lab in labels])
        if not torch.jit.is_scripting():
            if self.record_samples:
                self._record_torchvision(with_gt, gt_boxes, sampled_inds, labels)
        return proposals, matched_idxs, labels, list(regression_targets), weights

    @torch.jit.unused
    def _isr_loss_terms(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        boxes: list[Tensor],
        matched_idxs: list[Tensor],
        labels: list[Tensor],
        regression_targets: list[Tensor],
        weights: list[Tensor],
        targets: Optional[list[dict[str, Tensor]]],
    ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """PISA's terms that need the box head's output on the sampled RoIs: ISR-P's classification
        weights of the positives (their box-loss weights stay 1; the negatives keep ISR-N's weights
        from the sampler) and, with ``carl``, the CARL loss."""
        if targets is None:
            raise ValueError("targets should not be None")
        return isr_loss_terms(self.sampler_config(), class_logits, box_regression, boxes, matched_idxs, labels,
                              regression_targets, weights, [t["boxes"] for t in targets], self.box_coder)

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, torch.Tensor]]] = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """torchvision's ``RoIHeads.forward`` with the weighted training samples
        and loss. Args and returns as torchvision: features per FPN level,
        proposals per image ``[n_i, 4]``, image sizes ``(H, W)``, targets in
        training; returns ``(detections, losses)``."""
        if targets is not None:
            for t in targets:
                floating_point_types = (torch.float, torch.double, torch.half)
                if t["boxes"].dtype not in floating_point_types:
                    raise TypeError(f"target boxes must of float type, instead got {t['boxes'].dtype}")
                if not t["labels"].dtype == torch.int64:
                    raise TypeError(f"target labels must of int64 type, instead got {t['labels'].dtype}")
                if self.has_keypoint():
                    if not t["keypoints"].dtype == torch.float32:
                        raise TypeError(f"target keypoints must of float type, instead got {t['keypoints'].dtype}")

        if self.training:
            proposals, matched_idxs, labels, regression_targets, weights = self.select_weighted_training_samples(
                proposals, targets, features, image_shapes)
        else:
            labels = None
            regression_targets = None
            matched_idxs = None
            weights = None

        box_features = self.box_roi_pool(features, proposals, image_shapes)
        box_features = self.box_head(box_features)
        class_logits, box_regression = self.box_predictor(box_features)

        result: list[dict[str, torch.Tensor]] = []
        losses: dict[str, Tensor] = {}
        if self.training:
            if labels is None:
                raise ValueError("labels cannot be None")
            if regression_targets is None:
                raise ValueError("regression_targets cannot be None")
            if weights is None:
                raise ValueError("weights cannot be None")
            box_weights: Optional[list[Tensor]] = None
            if not torch.jit.is_scripting():
                if self.sampler == "isr":
                    weights, box_weights, losses = self._isr_loss_terms(
                        class_logits, box_regression, proposals, matched_idxs, labels, regression_targets,
                        weights, targets)
            loss_classifier, loss_box_reg = weighted_fastrcnn_loss(
                class_logits, box_regression, labels, regression_targets, weights, box_weights)
            losses.update({"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg})
        else:
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            num_images = len(boxes)
            for i in range(num_images):
                result.append(
                    {
                        "boxes": boxes[i],
                        "labels": labels[i],
                        "scores": scores[i],
                    }
                )

        if self.has_mask():
            mask_proposals = [p["boxes"] for p in result]
            if self.training:
                if matched_idxs is None:
                    raise ValueError("if in training, matched_idxs should not be None")

                # The mask loss uses the sampled positives, unweighted (as torchvision).
                num_images = len(proposals)
                mask_proposals = []
                pos_matched_idxs = []
                for img_id in range(num_images):
                    pos = torch.where(labels[img_id] > 0)[0]
                    mask_proposals.append(proposals[img_id][pos])
                    pos_matched_idxs.append(matched_idxs[img_id][pos])
            else:
                pos_matched_idxs = None

            if self.mask_roi_pool is not None:
                mask_features = self.mask_roi_pool(features, mask_proposals, image_shapes)
                mask_features = self.mask_head(mask_features)
                mask_logits = self.mask_predictor(mask_features)
            else:
                raise Exception("Expected mask_roi_pool to be not None")

            loss_mask = {}
            if self.training:
                if targets is None or pos_matched_idxs is None or mask_logits is None:
                    raise ValueError("targets, pos_matched_idxs, mask_logits cannot be None when training")

                gt_masks = [t["masks"] for t in targets]
                gt_labels = [t["labels"] for t in targets]
                rcnn_loss_mask = maskrcnn_loss(mask_logits, mask_proposals, gt_masks, gt_labels, pos_matched_idxs)
                loss_mask = {"loss_mask": rcnn_loss_mask}
            else:
                labels = [r["labels"] for r in result]
                masks_probs = maskrcnn_inference(mask_logits, labels)
                for mask_prob, r in zip(masks_probs, result):
                    r["masks"] = mask_prob

            losses.update(loss_mask)

        if (
            self.keypoint_roi_pool is not None
            and self.keypoint_head is not None
            and self.keypoint_predictor is not None
        ):
            keypoint_proposals = [p["boxes"] for p in result]
            if self.training:
                num_images = len(proposals)
                keypoint_proposals = []
                pos_matched_idxs = []
                if matched_idxs is None:
                    raise ValueError("if in training, matched_idxs should not be None")

                for img_id in range(num_images):
                    pos = torch.where(labels[img_id] > 0)[0]
                    keypoint_proposals.append(proposals[img_id][pos])
                    pos_matched_idxs.append(matched_idxs[img_id][pos])
            else:
                pos_matched_idxs = None

            keypoint_features = self.keypoint_roi_pool(features, keypoint_proposals, image_shapes)
            keypoint_features = self.keypoint_head(keypoint_features)
            keypoint_logits = self.keypoint_predictor(keypoint_features)

            loss_keypoint = {}
            if self.training:
                if targets is None or pos_matched_idxs is None:
                    raise ValueError("both targets and pos_matched_idxs should not be None when in training mode")

                gt_keypoints = [t["keypoints"] for t in targets]
                rcnn_loss_keypoint = keypointrcnn_loss(
                    keypoint_logits, keypoint_proposals, gt_keypoints, pos_matched_idxs
                )
                loss_keypoint = {"loss_keypoint": rcnn_loss_keypoint}
            else:
                if keypoint_logits is None or keypoint_proposals is None:
                    raise ValueError(
                        "both keypoint_logits and keypoint_proposals should not be None when not in training mode"
                    )

                keypoints_probs, kp_scores = keypointrcnn_inference(keypoint_logits, keypoint_proposals)
                for keypoint_prob, kps, r in zip(keypoints_probs, kp_scores, result):
                    r["keypoints"] = keypoint_prob
                    r["keypoints_scores"] = kps
            losses.update(loss_keypoint)

        return result, losses


def _splits(counts: list[int], device: torch.device) -> Tensor:
    """int64 ``[B+1]`` offsets of a ragged batch, built on the host from the
    (host-known) shapes and copied without waiting for the device."""
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return torch.tensor(offsets, dtype=torch.int64).to(device, non_blocking=True)


def install_sampler(model: nn.Module, config: Optional[SamplerConfig | str] = None) -> nn.Module:
    """Swap ``model.roi_heads`` (a torchvision ``RoIHeads``) for an
    :class:`OverlapRoIHeads`, in place, keeping every submodule, weight,
    inference setting and forward/backward hook of the head. Returns ``model``.

    ``config=None`` installs the Overlap Sampler's defaults (the ``"overlap"``
    preset) with the head's own training-sample settings: batch size per
    image, positive fraction and IoU thresholds (an :class:`OverlapRoIHeads`
    keeps its whole config). A sampler's name (one of
    :data:`overlap_sampler.sampling.SAMPLERS`: ``"overlap"``, ``"iou_balanced"``,
    ``"random"``, ``"libra"``, ``"ohem"``, ``"isr"``) does the same with that
    sampler's preset. A
    :class:`SamplerConfig` is installed as given; where its training-sample
    settings differ from the head's, a ``UserWarning`` names each change, so a
    model built with, say, ``box_batch_size_per_image=256`` does not silently
    train with 512.

    What the new head cannot keep is named in a ``UserWarning``: state-dict
    hooks, the methods of a ``RoIHeads`` subclass, a matcher that allows
    low-quality matches and a replaced ``fg_bg_sampler``.
    """
    roi_heads = getattr(model, "roi_heads", None)
    if not isinstance(roi_heads, RoIHeads):
        wrapped = getattr(model, "module", None)
        hint = (f"; {type(model).__name__} wraps the detector: install into its .module (before wrapping "
                "it in DistributedDataParallel)" if isinstance(getattr(wrapped, "roi_heads", None), RoIHeads)
                else "")
        raise TypeError(f"model must have a torchvision RoIHeads as .roi_heads (a GeneralizedRCNN such as "
                        f"FasterRCNN or MaskRCNN); got {type(roi_heads).__name__}{hint}")
    current = training_sample_settings(roi_heads)
    if config is None or isinstance(config, str):
        if config is not None:
            base = SamplerConfig.preset(config)
        elif isinstance(roi_heads, OverlapRoIHeads):
            base = roi_heads.sampler_config()
        else:
            base = SamplerConfig()
        config = dataclasses.replace(base, **current)
    if not isinstance(config, SamplerConfig):
        raise TypeError(f"config must be a SamplerConfig, a preset name or None, got {type(config).__name__} "
                        "(SamplerConfig.from_dict builds one from a dict)")
    config.validate()
    changed = [f"{name} {current[name]!r} -> {getattr(config, name)!r}" for name in current
               if getattr(config, name) != current[name]]
    if changed:
        warnings.warn(f"install_sampler: the config replaces the model's {', '.join(changed)}; pass a "
                      "SamplerConfig with the model's values (or config=None) to keep them", stacklevel=2)
    for note in _not_kept(roi_heads):
        warnings.warn(f"install_sampler: {note}", stacklevel=2)
    head = OverlapRoIHeads.from_roi_heads(roi_heads, config)
    _carry_hooks(roi_heads, head)
    model.roi_heads = head
    return model


def _not_kept(roi_heads: RoIHeads) -> list[str]:
    """What of a torchvision-style head an :class:`OverlapRoIHeads` built from it does not keep."""
    notes = []
    # Classes between the head's own class and RoIHeads / OverlapRoIHeads: the user's.
    own = [c for c in type(roi_heads).__mro__ if issubclass(c, RoIHeads) and c not in (RoIHeads, OverlapRoIHeads)]
    methods = sorted({name for c in own for name, value in vars(c).items() if not name.startswith("__")
                      and (callable(value) or isinstance(value, (staticmethod, classmethod, property)))})
    if methods:
        notes.append(f"{type(roi_heads).__name__} defines {', '.join(methods)}, which the new OverlapRoIHeads "
                     "does not have (subclass OverlapRoIHeads to keep them)")
    if getattr(roi_heads.proposal_matcher, "allow_low_quality_matches", False):
        notes.append("the head's matcher allows low-quality matches; the sampler matches as torchvision's "
                     "RoIHeads does, without them")
    if type(roi_heads.fg_bg_sampler) is not det_utils.BalancedPositiveNegativeSampler:
        notes.append(f"the head's fg_bg_sampler ({type(roi_heads.fg_bg_sampler).__name__}) is replaced by the "
                     "configured sampler")
    return notes


# nn.Module's forward and backward hook tables. The new head shares them, so handles returned before
# the swap still remove. Their hooks get the module as an argument when called; state-dict hooks may
# hold a reference to the old module instead, so they are not carried (a warning says so).
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                "_backward_hooks", "_is_full_backward_hook")
_STATE_DICT_HOOK_TABLES = ("_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                           "_load_state_dict_post_hooks")


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    for name in _HOOK_TABLES:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))
    if any(getattr(old, name, None) for name in _STATE_DICT_HOOK_TABLES):
        warnings.warn("install_sampler: state-dict hooks on the old head are not carried over: register them "
                      "on model.roi_heads again", stacklevel=3)


def training_sample_settings(roi_heads: RoIHeads) -> dict[str, Any]:
    """The training-sample settings of a ``RoIHeads``, as :class:`SamplerConfig`
    fields: batch size per image, positive fraction and the matcher's IoU
    thresholds. An :class:`OverlapRoIHeads` gives its own attributes; a
    torchvision head, what its ``fg_bg_sampler`` and ``proposal_matcher``
    hold, leaving out what a custom replacement of either does not have."""
    if isinstance(roi_heads, OverlapRoIHeads):
        config = roi_heads.sampler_config()
        return {name: getattr(config, name) for name in BUDGET_FIELDS}
    sources = {
        "batch_size_per_image": (roi_heads.fg_bg_sampler, "batch_size_per_image", int),
        "positive_fraction": (roi_heads.fg_bg_sampler, "positive_fraction", float),
        "fg_iou_thresh": (roi_heads.proposal_matcher, "high_threshold", float),
        "bg_iou_thresh": (roi_heads.proposal_matcher, "low_threshold", float),
    }
    settings: dict[str, Any] = {}
    for name, (owner, attribute, kind) in sources.items():
        value = getattr(owner, attribute, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            settings[name] = kind(value)
    return settings
