"""SamplerConfig: defaults, validation messages, dict round trip, presets."""

from __future__ import annotations

import json

import numpy as np
import pytest

import overlap_sampler
from overlap_sampler.sampling import SamplerConfig


def test_defaults_are_the_papers_best():
    c = SamplerConfig()
    assert (c.sampler, c.neg_strategy, c.pos_strategy, c.num_bins, c.pos_weight) == (
        "overlap", "soft", "soft", 2, 2.0)
    assert (c.batch_size_per_image, c.positive_fraction, c.fg_iou_thresh, c.bg_iou_thresh) == (
        512, 0.25, 0.5, 0.5)
    assert c.bin_upper is None and c.pos_key == "negatives"
    assert c.validate() is c


@pytest.mark.parametrize("strategy", overlap_sampler.NEGATIVE_STRATEGIES)
def test_every_negative_strategy_is_accepted(strategy):
    SamplerConfig(neg_strategy=strategy).validate()


@pytest.mark.parametrize("strategy", overlap_sampler.POSITIVE_STRATEGIES)
def test_every_positive_strategy_is_accepted(strategy):
    SamplerConfig(pos_strategy=strategy).validate()


@pytest.mark.parametrize("field,value", [
    ("sampler", "libra_rcnn"),
    ("neg_strategy", "softer"),
    ("pos_strategy", "iou_balanced"),  # defined for negatives only
    ("pos_key", "positives"),
    ("num_bins", 0),
    ("num_bins", 65),
    ("num_bins", 2.5),
    ("num_bins", True),
    ("batch_size_per_image", 0),
    ("positive_fraction", 1.5),
    ("fg_iou_thresh", -0.1),
    ("bg_iou_thresh", float("nan")),
    ("hard_thresh", 2.0),
    ("pos_weight", -1.0),
    ("pos_weight", float("inf")),
    ("bin_upper", 0.0),
    ("bin_upper", "0.7"),
])
def test_validate_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**{field: value})  # checked on construction
    config = SamplerConfig()
    setattr(config, field, value)  # ... and by validate() after a change
    with pytest.raises(ValueError, match=field):
        config.validate()


def test_bg_above_fg_is_rejected():
    with pytest.raises(ValueError, match="bg_iou_thresh .* fg_iou_thresh"):
        SamplerConfig(fg_iou_thresh=0.4, bg_iou_thresh=0.5).validate()


def test_dict_round_trip_through_json():
    c = SamplerConfig(neg_strategy="hard", num_bins=3, bin_upper=0.7, pos_weight=1.5)
    d = json.loads(json.dumps(c.to_dict()))
    assert SamplerConfig.from_dict(d) == c


def test_from_dict_keeps_defaults_for_missing_keys():
    assert SamplerConfig.from_dict({"num_bins": 4}) == SamplerConfig(num_bins=4)


def test_from_dict_rejects_unknown_key_by_name():
    with pytest.raises(ValueError, match="'bins'"):
        SamplerConfig.from_dict({"bins": 3})


def test_from_dict_validates():
    with pytest.raises(ValueError, match="neg_strategy"):
        SamplerConfig.from_dict({"neg_strategy": "nope"})


def test_presets():
    assert SamplerConfig.preset("overlap") == SamplerConfig()
    assert SamplerConfig.preset("random").sampler == "random"
    iou = SamplerConfig.preset("iou_balanced")
    assert (iou.sampler, iou.neg_strategy, iou.pos_strategy, iou.pos_weight) == (
        "iou_balanced", "iou_balanced", "uniform", 1.0)
    for name in ("overlap", "random", "iou_balanced", "libra", "ohem", "isr"):
        SamplerConfig.preset(name).validate()
    with pytest.raises(ValueError, match="preset 'best'"):
        SamplerConfig.preset("best")


def test_num_bins_bounds_are_inclusive():
    assert SamplerConfig(num_bins=1).num_bins == 1  # one bin: uniform
    assert SamplerConfig(num_bins=64).num_bins == 64
    for bad in (0, 65):
        with pytest.raises(ValueError, match="num_bins"):
            SamplerConfig(num_bins=bad)


def test_numpy_scalars_are_plain_numbers():
    config = SamplerConfig(num_bins=np.int64(4), batch_size_per_image=np.int32(256), fg_iou_thresh=np.float32(0.7),
                           positive_fraction=np.float32(0.25), pos_weight=np.float64(2.5), bin_upper=np.float16(0.7))
    assert config == SamplerConfig(num_bins=4, batch_size_per_image=256, positive_fraction=0.25, pos_weight=2.5,
                                   bin_upper=0.7, fg_iou_thresh=0.7)  # as printed, not 0.699999988
    config.pos_weight = np.float32(1.5)  # an edit after construction, then validated
    assert config.validate().pos_weight == 1.5 and type(config.pos_weight) is float
    assert [type(v) for v in (config.num_bins, config.positive_fraction, config.pos_weight)] == [int, float, float]
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    for bad in ({"num_bins": np.float64(4.0)}, {"num_bins": np.bool_(True)}, {"pos_weight": np.float32("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplerConfig(**bad)
