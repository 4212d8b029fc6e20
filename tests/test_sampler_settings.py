"""The sampler settings are defined once (SamplerConfig's fields) and everything else derives from
them: the CLI flags, the config/checkpoint dict, the RoI head's attributes, the op call, the presets
and the "a sampler does not read this setting" errors."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap

import pytest
import torch

import overlap_sampler  # noqa: F401  (loads the ops)
from overlap_sampler.cli import build_parser, config_from_args
from overlap_sampler.detection import OverlapRoIHeads
from overlap_sampler.sampling import BUDGET_FIELDS, METHOD_FIELDS, PRESETS, SAMPLERS, SamplerConfig

FIELDS = dataclasses.fields(SamplerConfig)
# The op's arguments that are not sampler settings: the batch, and what the head decides itself.
OP_ONLY = {"proposals", "proposal_splits", "gt_boxes", "gt_splits", "append_gt", "generator", "validate"}


def _head(config: SamplerConfig) -> OverlapRoIHeads:
    return OverlapRoIHeads(None, None, None, None, 0.05, 0.5, 100, config).train()


def test_every_setting_declares_help_readers_and_a_valid_default():
    for f in FIELDS:
        assert f.metadata["help"], f.name
        assert set(f.metadata["used_by"]) <= set(SAMPLERS), f.name
    assert set(BUDGET_FIELDS) | set(METHOD_FIELDS) == {f.name for f in FIELDS}
    assert not set(BUDGET_FIELDS) & set(METHOD_FIELDS)
    SamplerConfig().validate()


def test_the_op_call_passes_every_op_setting_by_its_field_name():
    # Every `sample` argument that is a setting is a SamplerConfig field of the same name, and the
    # head's call passes it from the attribute of that name.
    schema = {a.name for a in torch.ops.overlap_sampler.sample.default._schema.arguments}
    settings = schema - OP_ONLY
    assert settings <= {f.name for f in FIELDS}
    source = textwrap.dedent(inspect.getsource(OverlapRoIHeads._overlap_selection))
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
             and ast.unparse(n.func) == "torch.ops.overlap_sampler.sample"]
    assert len(calls) == 1
    passed = {k.arg: ast.unparse(k.value) for k in calls[0].keywords}
    for name in settings:
        assert passed.get(name) == f"self.{name}", name
    # op_arguments() (what the benchmarks pass) is exactly those settings, at the config's values.
    config = SamplerConfig(num_bins=3, pos_weight=1.5)
    assert config.op_arguments() == {name: getattr(config, name) for name in settings}


@pytest.mark.parametrize("name", SAMPLERS)
def test_presets_round_trip_through_dict_head_and_flag(name):
    preset = SamplerConfig.preset(name)
    assert preset.sampler == name
    assert SamplerConfig.from_dict(preset.to_dict()) == preset
    head = _head(preset)
    assert head.sampler_config() == preset
    for f in FIELDS:  # typed attributes, as TorchScript needs them
        value = getattr(head, f.name)
        assert value is None or isinstance(value, type(f.default) if f.default is not None else float), f.name
    cfg = config_from_args(build_parser().parse_args(["train", "--sampler", name]))
    assert cfg.sampler == dataclasses.replace(preset, batch_size_per_image=cfg.sampler.batch_size_per_image)


@pytest.mark.parametrize("name", SAMPLERS)
def test_a_setting_the_sampler_does_not_read_is_an_error_naming_it(name):
    for f in FIELDS:
        if name in f.metadata["used_by"]:
            continue
        other = _other_value(f)
        if other is None or other == PRESETS[name].get(f.name, f.default):
            continue
        with pytest.raises(ValueError, match=rf"sampler='{name}' does not read {f.name}="):
            SamplerConfig(**{**PRESETS[name], f.name: other})


def test_each_rival_setting_reaches_its_sampler(monkeypatch):
    # The head hands its whole config to the rival dispatcher: a changed setting arrives there.
    import overlap_sampler.detection.roi_heads as roi_heads
    seen = {}

    def fake_select(config, batch, scorer, box_coder, generator):
        seen["config"] = config
        raise RuntimeError("stop")

    monkeypatch.setattr(roi_heads, "select_rival", fake_select)
    proposals, targets = _small_batch()
    for name in ("libra", "ohem", "isr"):
        for f in FIELDS:
            if name not in f.metadata["used_by"] or f.name in BUDGET_FIELDS or f.name == "sampler":
                continue
            other = _other_value(f)
            config = SamplerConfig(**{**PRESETS[name], f.name: other})
            head = _head(config)
            with pytest.raises(RuntimeError, match="stop"):
                head.select_weighted_training_samples(proposals, targets, {"0": torch.zeros(1)}, [(64, 64)])
            assert getattr(seen["config"], f.name) == other, (name, f.name)


def test_the_cli_has_a_flag_for_every_setting_with_its_help():
    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    text = train.format_help()
    for f in FIELDS:
        if f.name != "sampler":
            assert "--" + f.name.replace("_", "-") in text, f.name
    for name in SAMPLERS:
        assert name in text


def test_mmdet_ohem_refuses_an_nms_threshold():
    with pytest.raises(ValueError, match="ohem_nms_thresh"):
        SamplerConfig(sampler="ohem", ohem_variant="mmdet", ohem_nms_thresh=0.5)
    SamplerConfig(sampler="ohem", ohem_variant="mmdet")  # the default means "the variant's own"


def _other_value(f: dataclasses.Field):
    """A valid value of field ``f`` other than its default (None if there is none)."""
    meta = f.metadata
    if meta["choices"]:
        return next((c for c in meta["choices"] if c != f.default and c != "iou_balanced"), None)
    if isinstance(f.default, bool):
        return not f.default
    if f.default is None:
        return 0.7
    if isinstance(f.default, int):
        return f.default + 1 if meta["high"] is None or f.default + 1 <= meta["high"] else f.default - 1
    high = meta["high"]
    candidate = f.default + 0.1
    if high is not None and candidate > high:
        candidate = f.default - 0.1
    return round(candidate, 6)


def _small_batch():
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [30.0, 30.0, 40.0, 40.0]])]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}]
    return boxes, targets
