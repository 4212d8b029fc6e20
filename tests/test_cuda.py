"""CUDA-only behaviour: CPU/CUDA agreement, no host sync, CUDA-graph capture.
(Per-op CUDA correctness runs in every op's test file through cpu_and_cuda().)"""

import pytest
import torch

import overlap_sampler
from conftest import make_batch, needs_cuda

pytestmark = needs_cuda


def _cuda(batch):
    return [t.cuda() for t in batch]


def _assert_cuda_equals_cpu(batch, **options):
    """sample_from_uniforms on CUDA gives the CPU's outputs for the same uniforms."""
    uniforms = torch.rand(batch[0].shape[0] + batch[2].shape[0], dtype=torch.float64)
    cpu = overlap_sampler.sample_from_uniforms(*batch, uniforms, **options)
    gpu = overlap_sampler.sample_from_uniforms(*_cuda(batch), uniforms.cuda(), **options)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("staging", ["1", "0"])
@pytest.mark.parametrize("neg_strategy", overlap_sampler.NEGATIVE_STRATEGIES)
def test_cuda_equals_cpu_for_the_same_uniforms(neg_strategy, staging, monkeypatch):
    """Both of select_kernel's paths: images staged in shared memory, and (with
    OVERLAP_SAMPLER_SELECT_STAGING=0) every image read from global memory."""
    monkeypatch.setenv("OVERLAP_SAMPLER_SELECT_STAGING", staging)
    batch = make_batch([2000] * 4 + [0, 37], [20, 5, 0, 11, 2, 1], seed=1, canvas=1000.0)
    _assert_cuda_equals_cpu(batch, neg_strategy=neg_strategy, pos_strategy="soft", pos_weight=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_iou_bits_equal_cpu_on_extreme_coordinates(dtype):
    """Every CUDA kernel's IoU skips the division for disjoint boxes (the CPU
    divides always): the bits must still be the CPU's, for every box whose
    coordinates come from -max, -1, -0, +0, the smallest subnormal, 1 and max
    (7^4 boxes, all pairs). box_iou takes only finite boxes; these still
    overflow to infinite widths and areas and to NaN (inf * 0) intersections."""
    info = torch.finfo(dtype)
    values = torch.tensor([-info.max, -1.0, -0.0, 0.0, info.smallest_normal * info.eps, 1.0, info.max],
                          dtype=dtype)
    boxes = torch.cartesian_prod(values, values, values, values)
    cpu = overlap_sampler.box_iou(boxes, boxes)
    gpu = overlap_sampler.box_iou(boxes.cuda(), boxes.cuda()).cpu()
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    assert not cpu.isnan().any()
    assert ((cpu > 0) & (cpu < 1)).any()  # partial overlaps reach the division
    assert torch.equal(gpu.view(bits), cpu.view(bits))


@pytest.mark.parametrize("neg_strategy", overlap_sampler.NEGATIVE_STRATEGIES)
def test_images_beyond_the_staging_capacity_match_cpu(neg_strategy):
    """select_kernel stages an image's labels and keys in shared memory only
    when it fits (about 19k examples on an H100, 13k on an A100); a larger one
    is served from global memory. A batch with a 25k-proposal image and small
    ones runs both paths in one call, with the epsilon weights."""
    batch = make_batch([25_000, 1500, 0, 9], [30, 6, 2, 0], seed=4, canvas=2000.0)
    _assert_cuda_equals_cpu(batch, neg_strategy=neg_strategy, pos_strategy="soft", pos_weight=2.0)


def test_large_images_take_the_same_path_results():
    """Images beyond every tile and the staging capacity (100k proposals)
    still match the CPU."""
    _assert_cuda_equals_cpu(make_batch([100_000, 3000], [40, 3], seed=2, canvas=2000.0))


def test_no_host_sync_with_validate_false():
    batch = _cuda(make_batch([500] * 4, [10] * 4, seed=3))
    generator = torch.Generator("cuda").manual_seed(0)
    overlap_sampler.sample(*batch, validate=False, generator=generator)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        overlap_sampler.sample(*batch, validate=False, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_replays_like_eager():
    batch = _cuda(make_batch([800] * 4, [12] * 4, seed=4))
    uniforms = torch.rand(batch[0].shape[0] + batch[2].shape[0], dtype=torch.float64, device="cuda")
    options = dict(neg_strategy="soft", pos_strategy="soft", pos_weight=2.0, validate=False)
    eager = overlap_sampler.sample_from_uniforms(*batch, uniforms, **options)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        overlap_sampler.sample_from_uniforms(*batch, uniforms, **options)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = overlap_sampler.sample_from_uniforms(*batch, uniforms, **options)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)


def test_generator_determinism_on_cuda():
    batch = _cuda(make_batch([1000] * 2, [8] * 2, seed=5, canvas=1000.0))
    first = overlap_sampler.sample(*batch, batch_size_per_image=64, generator=torch.Generator("cuda").manual_seed(1))
    second = overlap_sampler.sample(*batch, batch_size_per_image=64, generator=torch.Generator("cuda").manual_seed(1))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _clamped(splits, rows):
    """The clamping docs/ops.md promises for validate=False on CUDA."""
    out = [0]
    for value in splits[1:-1].tolist():
        out.append(min(max(value, out[-1]), rows))
    return torch.tensor(out + [rows])


@pytest.mark.parametrize(
    "bad_proposal_splits, bad_gt_splits",
    [([0, 900, 300, 5000], [0, 2, 1, 9]), ([-7, 100, 100, 10], [3, 3, -1, 30])],
)
def test_validate_false_clamps_bad_splits(bad_proposal_splits, bad_gt_splits):
    proposals, _, gt_boxes, _ = make_batch([400, 300, 500], [3, 4, 2], seed=6)
    bad_ps, bad_gs = torch.tensor(bad_proposal_splits), torch.tensor(bad_gt_splits)
    uniforms = torch.rand(proposals.shape[0] + gt_boxes.shape[0], dtype=torch.float64)
    gpu = overlap_sampler.sample_from_uniforms(
        *_cuda([proposals, bad_ps, gt_boxes, bad_gs]), uniforms.cuda(), validate=False
    )
    cpu = overlap_sampler.sample_from_uniforms(
        proposals, _clamped(bad_ps, proposals.shape[0]), gt_boxes, _clamped(bad_gs, gt_boxes.shape[0]),
        uniforms,
    )
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


def test_validate_false_equals_validate_true_on_good_input():
    batch = _cuda(make_batch([700, 0, 300], [6, 2, 0], seed=7))
    uniforms = torch.rand(batch[0].shape[0] + batch[2].shape[0], dtype=torch.float64, device="cuda")
    checked = overlap_sampler.sample_from_uniforms(*batch, uniforms)
    unchecked = overlap_sampler.sample_from_uniforms(*batch, uniforms, validate=False)
    for a, b in zip(checked, unchecked):
        assert torch.equal(a, b)
