"""The sampler settings of a detector's RoI head, as one plain dataclass.

A :class:`SamplerConfig` is what a training config, a checkpoint and the CLI
carry around; :func:`overlap_sampler.detection.install_sampler` turns it into
the attributes of an :class:`~overlap_sampler.detection.OverlapRoIHeads`.
Semantics of every field: ``docs/ops.md`` (the ``sample`` op).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..ops import FLOAT32_MAX, MAX_OUTPUT_WIDTH, NEGATIVE_STRATEGIES, POSITIVE_STRATEGIES

SAMPLERS = ("overlap", "random")
POSITIVE_KEYS = ("negatives", "all")

# A sampler preset names a sampling *method*: it sets these fields and leaves the RoI budget and IoU
# thresholds (BUDGET_FIELDS) alone, so that switching to "random" compares methods at equal budgets.
METHOD_FIELDS = ("sampler", "neg_strategy", "pos_strategy", "num_bins", "hard_thresh", "bin_upper", "pos_weight",
                 "pos_key")
BUDGET_FIELDS = ("batch_size_per_image", "positive_fraction", "fg_iou_thresh", "bg_iou_thresh")


@dataclass
class SamplerConfig:
    """How the RoI head picks its training examples.

    Attributes:
        sampler: ``"overlap"`` (the Overlap Sampler op, one call per batch) or
            ``"random"`` (torchvision's own ``BalancedPositiveNegativeSampler``,
            untouched; every other strategy field is then unused).
        neg_strategy: strategy for negatives by their IoU_p,n, one of
            :data:`overlap_sampler.NEGATIVE_STRATEGIES` (``soft`` = Eq. 2).
        pos_strategy: strategy for positives by their key, one of
            :data:`overlap_sampler.POSITIVE_STRATEGIES`.
        num_bins: K, the number of equal bins of ``soft`` (1 = uniform).
        hard_thresh: θ of ``hard`` (Eq. 1).
        bin_upper: fixed upper end of the ``soft`` bins (None = the image's max key).
        pos_weight: ε, loss weight of the best sampled positive of each GT (1 = off).
        pos_key: a positive's key is its max IoU with the ``"negatives"`` of its
            image (Fig. 3) or with ``"all"`` other examples.
        batch_size_per_image: RoIs sampled per image (paper: 512).
        positive_fraction: at most ``round(batch_size_per_image * positive_fraction)``
            positives per image.
        fg_iou_thresh / bg_iou_thresh: IoU with the best GT >= fg is positive,
            < bg is negative, between is ignored.

    The defaults are the paper's best setting: soft sampling with K = 2 for
    both negatives and positives, ε = 2. Every field is checked on construction
    (``ValueError`` naming the first bad one).
    """

    sampler: str = "overlap"
    neg_strategy: str = "soft"
    pos_strategy: str = "soft"
    num_bins: int = 2
    hard_thresh: float = 0.5
    bin_upper: Optional[float] = None
    pos_weight: float = 2.0
    pos_key: str = "negatives"
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5

    def __post_init__(self) -> None:
        # A bad value is named where it is written, not later at build_detector / install_sampler.
        self.validate()

    def validate(self) -> "SamplerConfig":
        """Check every field; raise ``ValueError`` naming the first bad one.

        Returns ``self`` so that ``SamplerConfig(...).validate()`` chains. NumPy scalars (an
        ``np.int64`` from an array, an ``np.float32`` from a sweep) are first replaced by the Python
        numbers they print as: ``np.float32(0.7)`` is 0.7, not 0.699999988.
        """
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value) is not int:
                setattr(self, f.name, int(value))
            elif isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) \
                    and type(value) is not float:
                setattr(self, f.name, float(str(value)) if hasattr(value, "dtype") else float(value))
        _one_of("sampler", self.sampler, SAMPLERS)
        _one_of("neg_strategy", self.neg_strategy, NEGATIVE_STRATEGIES)
        _one_of("pos_strategy", self.pos_strategy, POSITIVE_STRATEGIES)
        _one_of("pos_key", self.pos_key, POSITIVE_KEYS)
        _integer("num_bins", self.num_bins, 1, 64)
        _integer("batch_size_per_image", self.batch_size_per_image, 1, MAX_OUTPUT_WIDTH)
        _number("hard_thresh", self.hard_thresh, 0.0, 1.0)
        _number("positive_fraction", self.positive_fraction, 0.0, 1.0)
        _number("fg_iou_thresh", self.fg_iou_thresh, 0.0, 1.0)
        _number("bg_iou_thresh", self.bg_iou_thresh, 0.0, 1.0)
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ValueError(f"bg_iou_thresh ({self.bg_iou_thresh}) must not exceed fg_iou_thresh "
                             f"({self.fg_iou_thresh})")
        _number("pos_weight", self.pos_weight, 0.0, FLOAT32_MAX)  # the op's weights are float32
        if self.bin_upper is not None:
            _number("bin_upper", self.bin_upper, 0.0, None)
            if self.bin_upper <= 0.0:
                raise ValueError(f"bin_upper must be > 0 or None, got {self.bin_upper!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON/TOML friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SamplerConfig":
        """Build from a mapping of field values; missing fields keep their default.

        Raises ``ValueError`` naming an unknown key, or the first invalid field.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"SamplerConfig.from_dict expects a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"unknown SamplerConfig key {key!r}; known keys: {', '.join(sorted(known))}")
        return cls(**dict(d)).validate()

    @classmethod
    def preset(cls, name: str) -> "SamplerConfig":
        """A named setting: ``"overlap"`` (the defaults, the paper's best),
        ``"random"`` (torchvision's random sampler) or ``"iou_balanced"``
        (Libra R-CNN's IoU-balanced negatives, uniform positives, ε = 1)."""
        if name == "overlap":
            return cls()
        if name == "random":
            return cls(sampler="random", neg_strategy="uniform", pos_strategy="uniform", pos_weight=1.0)
        if name == "iou_balanced":
            return cls(neg_strategy="iou_balanced", pos_strategy="uniform", pos_weight=1.0)
        raise ValueError(f"unknown SamplerConfig preset {name!r}; expected one of overlap, random, iou_balanced")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _integer(name: str, value: Any, low: int, high: Optional[int]) -> None:
    # bool is an int subclass; True as a bin count is a config mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {'in ' if high is not None else ''}{bounds}, got {value}")


def _number(name: str, value: Any, low: float, high: Optional[float]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
