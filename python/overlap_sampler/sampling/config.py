"""The sampler settings of a detector's RoI head: every setting defined once, here.

Each field of :class:`SamplerConfig` carries its type, default, bounds, choices, help text and the
samplers that read it (``metadata``). The CLI flags (``cli.py``), the config-file keys and the
checkpoint record (``to_dict``/``from_dict``), the RoI head's attributes (``OverlapRoIHeads``) and the
validation below are all derived from these fields. Adding a setting means adding a field here, plus
the C++ option parser and kernels only when the ``sample`` op itself needs it.

A *sampler* (``SamplerConfig.sampler``) names the method that picks the RoI head's training examples:

========================  =========================================================================
``overlap``               the Overlap Sampler op (the paper's method; strategies below)
``iou_balanced``          the same op with Libra R-CNN's IoU-balanced negatives (bins of IoU_g,n over
                          [0, bg_iou_thresh)), uniform positives, ε = 1
``random``                torchvision's ``BalancedPositiveNegativeSampler``, untouched
``libra``                 Libra R-CNN as mmdetection configures it (instance-balanced positives,
                          IoU-balanced negatives with bins up to the image's max IoU_g,e)
``ohem``                  online hard example mining (Shrivastava et al. 2016, or mmdetection's variant)
``isr``                   PISA's importance-based sample reweighting (ISR-N + ISR-P, optional CARL)
========================  =========================================================================

Every sampler keeps the RoI budget (``BUDGET_FIELDS``); a setting that the chosen sampler does not
read must keep its default or the preset's value, else ``ValueError`` names it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ..ops import FLOAT32_MAX, MAX_OUTPUT_WIDTH, NEGATIVE_STRATEGIES, POSITIVE_STRATEGIES

SAMPLERS = ("overlap", "iou_balanced", "random", "libra", "ohem", "isr")
POSITIVE_KEYS = ("negatives", "all")
OHEM_VARIANTS = ("paper", "mmdet")
ALL = SAMPLERS  # a budget setting: every sampler reads it
_OVERLAP = ("overlap",)


def setting(default: Any, help: str, *, used_by: tuple[str, ...], choices: tuple = (), low: Optional[float] = None,
            high: Optional[float] = None, positive: bool = False) -> Any:
    """A :class:`SamplerConfig` field: its default and, in ``metadata``, what the CLI and checks need.

    ``used_by``: the samplers that read it; ``choices``: allowed strings; ``low``/``high``: inclusive
    bounds of a number (``positive``: strictly above ``low``); ``None`` is allowed when the default is.
    """
    return field(default=default, metadata={"help": help, "used_by": used_by, "choices": choices, "low": low,
                                            "high": high, "positive": positive})


@dataclass
class SamplerConfig:
    """How the RoI head picks (and weighs) its training examples. See the module docstring for the
    samplers and each field's ``metadata["help"]`` (also the CLI's help) for the settings.

    The defaults are the paper's best setting: the Overlap Sampler with soft sampling (K = 2) for
    both negatives and positives, ε = 2. :meth:`preset` gives each sampler's own setting. Every field
    is checked on construction (``ValueError`` naming the first bad one).
    """

    sampler: str = setting("overlap", "the sampling method", used_by=ALL, choices=SAMPLERS)
    neg_strategy: str = setting(
        "soft", "strategy for negatives by their IoU_p,n: uniform, hard, soft (Eq. 2), soft_reference, "
        "linear (Eq. 3) or iou_balanced", used_by=_OVERLAP, choices=NEGATIVE_STRATEGIES)
    pos_strategy: str = setting(
        "soft", "strategy for positives by their max IoU with the negatives (same list, no iou_balanced)",
        used_by=_OVERLAP, choices=POSITIVE_STRATEGIES)
    num_bins: int = setting(2, "K, the number of equal IoU bins of the soft and iou_balanced strategies "
                               "(1 = uniform)", used_by=("overlap", "iou_balanced"), low=1, high=64)
    hard_thresh: float = setting(0.5, "theta of the hard strategy: candidates with key >= theta are drawn first",
                                 used_by=_OVERLAP, low=0.0, high=1.0)
    bin_upper: Optional[float] = setting(
        None, "fixed upper end of the soft bins (paper footnote 3: 0.7); default: each image's max key",
        used_by=_OVERLAP, low=0.0, positive=True)
    pos_weight: float = setting(2.0, "epsilon, loss weight of the best sampled positive of each ground truth "
                                     "(1 = off)", used_by=_OVERLAP, low=0.0, high=FLOAT32_MAX)
    pos_key: str = setting("negatives", "a positive's key is its max IoU with the 'negatives' of its image or "
                                        "with 'all' other examples", used_by=_OVERLAP, choices=POSITIVE_KEYS)
    libra_num_bins: int = setting(3, "Libra: K equal bins of IoU_g,e for the negatives", used_by=("libra",),
                                  low=1, high=64)
    libra_floor_thresh: float = setting(
        -1.0, "Libra: negatives with IoU_g,e below this are the floor set, sampled apart (-1: no floor; "
        "0: IoU 0 only)", used_by=("libra",), low=-1.0, high=1.0)
    libra_floor_fraction: float = setting(0.0, "Libra: share of the negative quota drawn from the floor set",
                                          used_by=("libra",), low=0.0, high=1.0)
    ohem_variant: str = setting(
        "paper", "OHEM: 'paper' (loss = classification + box, NMS of the RoIs by loss, one budget for the "
        "batch, no positive fraction) or 'mmdet' (classification loss only, per image, positive fraction kept)",
        used_by=("ohem",), choices=OHEM_VARIANTS)
    ohem_nms_thresh: float = setting(0.7, "OHEM 'paper': IoU of the NMS of the RoIs by loss (1 = no NMS; the "
                                          "'mmdet' variant has none)", used_by=("ohem",), low=0.0, high=1.0,
                                     positive=True)
    isr_pos_k: float = setting(2.0, "ISR-P: exponent k of the positives' weights", used_by=("isr",), low=0.0)
    isr_pos_bias: float = setting(0.0, "ISR-P: bias of the positives' weights", used_by=("isr",), low=0.0, high=1.0)
    isr_neg_k: float = setting(0.5, "ISR-N: exponent k of the negatives' weights", used_by=("isr",), low=0.0)
    isr_neg_bias: float = setting(0.0, "ISR-N: bias of the negatives' weights", used_by=("isr",), low=0.0, high=1.0)
    isr_score_thresh: float = setting(0.05, "ISR-N: negatives with a foreground score above this are ranked "
                                            "(the rest drawn at random)", used_by=("isr",), low=0.0, high=1.0)
    isr_iou_thresh: float = setting(0.5, "ISR-N: IoU that groups the negatives' predicted boxes",
                                    used_by=("isr",), low=0.0, high=1.0)
    carl: bool = setting(False, "ISR: add PISA's classification-aware regression loss (CARL)", used_by=("isr",))
    carl_k: float = setting(1.0, "CARL: exponent k", used_by=("isr",), low=0.0)
    carl_bias: float = setting(0.2, "CARL: bias", used_by=("isr",), low=0.0, high=1.0)
    batch_size_per_image: int = setting(512, "RoIs sampled per image for the RoI-head losses (paper: 512)",
                                        used_by=ALL, low=1, high=MAX_OUTPUT_WIDTH)
    positive_fraction: float = setting(0.25, "at most round(batch_size_per_image * positive_fraction) positives "
                                             "per image (libra, ohem 'mmdet', isr: int(), as mmdetection; "
                                             "ohem 'paper': unused)", used_by=ALL, low=0.0, high=1.0)
    fg_iou_thresh: float = setting(0.5, "IoU with the best ground truth >= this: positive", used_by=ALL,
                                   low=0.0, high=1.0)
    bg_iou_thresh: float = setting(0.5, "IoU with the best ground truth < this: negative", used_by=ALL,
                                   low=0.0, high=1.0)

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
            _check_field(f, getattr(self, f.name))
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ValueError(f"bg_iou_thresh ({self.bg_iou_thresh}) must not exceed fg_iou_thresh "
                             f"({self.fg_iou_thresh})")
        if self.sampler == "ohem" and self.ohem_variant == "mmdet" and self.ohem_nms_thresh not in (0.7, 1.0):
            raise ValueError(f"ohem_nms_thresh={self.ohem_nms_thresh!r}: the 'mmdet' OHEM variant has no NMS "
                             "(use ohem_variant='paper')")
        ignored = self.ignored_settings()
        if ignored:
            raise ValueError(f"sampler={self.sampler!r} does not read {', '.join(ignored)}: drop "
                             f"{'it' if len(ignored) == 1 else 'them'} or choose a sampler that does")
        return self

    def ignored_settings(self, strict: bool = False) -> list[str]:
        """``name=value`` of each setting the chosen sampler does not read that is set to neither its
        default nor the sampler's preset value (such a setting would be silently ignored);
        ``strict``: to anything but the preset's value (a config built from the preset)."""
        preset = PRESETS.get(self.sampler, {})
        return [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                if self.sampler not in f.metadata["used_by"]
                and getattr(self, f.name) != preset.get(f.name, f.default)
                and (strict or getattr(self, f.name) != f.default)]

    def normalized(self) -> "SamplerConfig":
        """This config with every setting the sampler does not read at the preset's value: what runs."""
        preset = PRESETS[self.sampler]
        return dataclasses.replace(self, **{f.name: preset.get(f.name, f.default) for f in dataclasses.fields(self)
                                            if self.sampler not in f.metadata["used_by"]})

    def op_arguments(self) -> dict[str, Any]:
        """The settings that the ``overlap_sampler.sample`` op takes, by name, as the RoI head passes
        them for the op's samplers (``overlap``, ``iou_balanced``): for benchmarks and scripts that call
        the op as training does."""
        import inspect

        from ..ops import sample

        accepted = inspect.signature(sample).parameters
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in accepted}

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
        """Sampler ``name``'s own setting (one of :data:`SAMPLERS`), with the default RoI budget:
        ``overlap`` is the defaults (the paper's best); ``random``, ``libra``, ``ohem``, ``isr`` and
        ``iou_balanced`` set ``sampler`` and, for the Overlap Sampler's fields they do not read, the
        values that describe what runs (uniform strategies, ε = 1; ``iou_balanced``: its negative
        strategy)."""
        if name not in PRESETS:
            raise ValueError(f"unknown SamplerConfig preset {name!r}; expected one of {', '.join(SAMPLERS)}")
        return cls(**PRESETS[name])


# Each sampler's preset: the fields it sets (the rest keep their defaults). For the Overlap Sampler
# fields a rival does not read, the values say what runs, as SamplerConfig.normalized() stores them.
_NOT_OVERLAP = {"neg_strategy": "uniform", "pos_strategy": "uniform", "pos_weight": 1.0}
PRESETS: dict[str, dict[str, Any]] = {
    "overlap": {},
    "iou_balanced": {"sampler": "iou_balanced", "neg_strategy": "iou_balanced", "pos_strategy": "uniform",
                     "pos_weight": 1.0},
    "random": {"sampler": "random", **_NOT_OVERLAP},
    "libra": {"sampler": "libra", **_NOT_OVERLAP},
    "ohem": {"sampler": "ohem", **_NOT_OVERLAP},
    "isr": {"sampler": "isr", **_NOT_OVERLAP},
}

#: The RoI budget and IoU thresholds: every sampler reads them, and a preset keeps them.
BUDGET_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig) if f.metadata["used_by"] == ALL
                      and f.name != "sampler")
#: What a preset replaces: the sampler and every setting of a method.
METHOD_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig) if f.name not in BUDGET_FIELDS)


def _check_field(f: dataclasses.Field, value: Any) -> None:
    meta, name = f.metadata, f.name
    if value is None and f.default is None:
        return
    if meta["choices"]:
        if not isinstance(value, str) or value not in meta["choices"]:
            raise ValueError(f"{name} must be one of {', '.join(meta['choices'])}; got {value!r}")
    elif isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif isinstance(f.default, int):
        # bool is an int subclass; True as a bin count is a config mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        _bounds(name, value, meta)
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        _bounds(name, value, meta)


def _bounds(name: str, value: float, meta: Mapping[str, Any]) -> None:
    low, high = meta["low"], meta["high"]
    if (low is not None and (value < low or (meta["positive"] and value <= low))) or \
            (high is not None and value > high):
        lower = "" if low is None else f"{'>' if meta['positive'] else '>='} {low}"
        upper = "" if high is None else f"<= {high}"
        raise ValueError(f"{name} must be {' and '.join(x for x in (lower, upper) if x)}, got {value}")
