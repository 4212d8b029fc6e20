"""The ops under torch.library.opcheck, torch.compile, TorchScript and torch.export."""

from typing import Optional

import pytest
import torch

import overlap_sampler
from conftest import cpu_and_cuda, make_batch

ops = torch.ops.overlap_sampler


def op_cases(device):
    proposals, ps, gt, gs = make_batch([40, 0, 25], [3, 2, 0], seed=5, device=device)
    uniforms = torch.rand(proposals.shape[0] + gt.shape[0], dtype=torch.float64, device=device)
    weights = torch.rand(proposals.shape[0], device=device)
    return [
        (ops.box_iou, (proposals, gt), {}),
        (ops.max_iou, (proposals, ps, gt, gs), {}),
        (ops.max_iou, (proposals, ps, proposals, ps),
         dict(query_mask=weights > 0.5, key_mask=weights <= 0.5)),
        (ops.max_iou, (proposals, ps, proposals, ps), dict(exclude_self=True)),
        (ops.assign_bins, (weights, ps), dict(num_bins=3)),
        (ops.assign_bins, (weights, ps), dict(mask=weights > 0.2, upper=0.7)),
        (ops.weighted_sample, (weights, uniforms[: weights.shape[0]], ps,
                               torch.tensor([5, 0, 30], device=device), 8), {}),
        (ops.sample_from_uniforms, (proposals, ps, gt, gs, uniforms),
         dict(batch_size_per_image=16, pos_strategy="soft", pos_weight=2.0)),
        (ops.sample_from_uniforms, (proposals, ps, gt, gs, uniforms[: proposals.shape[0]]),
         dict(batch_size_per_image=16, neg_strategy="linear", append_gt=False)),
    ]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck_deterministic_ops(device):
    for op, args, kwargs in op_cases(device):
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck_sample(device):
    proposals, ps, gt, gs = make_batch([40, 25], [3, 2], seed=6, device=device)
    # Randomness: the aot-dispatch comparison of two runs cannot hold for a
    # random op, so check the schema, fake kernel and autograd registration.
    torch.library.opcheck(
        ops.sample, (proposals, ps, gt, gs), dict(batch_size_per_image=16),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _sample_batch(proposals, ps, gt, gs, generator=None):
    return torch.ops.overlap_sampler.sample(proposals, ps, gt, gs, batch_size_per_image=32,
                                            pos_weight=2.0, generator=generator, validate=False)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile_fullgraph(device):
    batch = make_batch([60, 30], [4, 1], seed=7, device=device)
    compiled = torch.compile(_sample_batch, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    eager = _sample_batch(*batch)
    torch.manual_seed(3)
    traced = compiled(*batch)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)


def _deterministic_pipeline(proposals, ps, gt, gs, uniforms):
    values, _ = overlap_sampler.max_iou(proposals, ps, gt, gs)
    bins = overlap_sampler.assign_bins(values.double(), ps, num_bins=2)
    return bins, overlap_sampler.sample_from_uniforms(proposals, ps, gt, gs, uniforms,
                                                      batch_size_per_image=16)


def test_torch_compile_with_inductor_matches_eager():
    batch = make_batch([50, 20], [3, 2], seed=8)
    uniforms = torch.rand(75, dtype=torch.float64)
    eager = _deterministic_pipeline(*batch, uniforms)
    compiled = torch.compile(_deterministic_pipeline, fullgraph=True)(*batch, uniforms)
    assert torch.equal(eager[0], compiled[0])
    for a, b in zip(eager[1], compiled[1]):
        assert torch.equal(a, b)


class _ScriptedSampler(torch.nn.Module):
    def forward(self, proposals: torch.Tensor, ps: torch.Tensor, gt: torch.Tensor, gs: torch.Tensor):
        return torch.ops.overlap_sampler.sample(proposals, ps, gt, gs, batch_size_per_image=32,
                                                neg_strategy="soft", num_bins=2)


def test_torchscript_script_save_load(tmp_path):
    batch = make_batch([60, 30], [4, 1], seed=9)
    scripted = torch.jit.script(_ScriptedSampler())
    path = tmp_path / "sampler.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    torch.manual_seed(11)
    expected = _ScriptedSampler()(*batch)
    torch.manual_seed(11)
    got = loaded(*batch)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


class _ExportedPipeline(torch.nn.Module):
    def forward(self, proposals, ps, gt, gs, uniforms):
        return _deterministic_pipeline(proposals, ps, gt, gs, uniforms)


def test_torch_export_round_trip():
    batch = make_batch([50, 20], [3, 2], seed=10)
    uniforms = torch.rand(75, dtype=torch.float64)
    exported = torch.export.export(_ExportedPipeline(), (*batch, uniforms))
    eager = _ExportedPipeline()(*batch, uniforms)
    got = exported.module()(*batch, uniforms)
    assert torch.equal(eager[0], got[0])
    for a, b in zip(eager[1], got[1]):
        assert torch.equal(a, b)


def _scripted_with_generator(proposals: torch.Tensor, ps: torch.Tensor, gt: torch.Tensor, gs: torch.Tensor,
                             generator: Optional[torch.Generator]):
    return torch.ops.overlap_sampler.sample(proposals, ps, gt, gs, batch_size_per_image=16,
                                            generator=generator)


def test_torchscript_passes_a_generator():
    scripted = torch.jit.script(_scripted_with_generator)
    batch = make_batch([100, 50], [3, 2], seed=12)
    got = scripted(*batch, torch.Generator().manual_seed(3))
    eager = overlap_sampler.sample(*batch, batch_size_per_image=16, generator=torch.Generator().manual_seed(3))
    for a, b in zip(got, eager):
        assert torch.equal(a, b)
