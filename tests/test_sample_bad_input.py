"""Bad input to `sample` raises a clear error naming the argument; never a crash."""

import subprocess
import sys
import textwrap

import pytest
import torch

import overlap_sampler

PROPOSALS = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
GT = torch.tensor([[0.0, 0, 10, 10]])
SPLITS = torch.tensor([0, 3])
GT_SPLITS = torch.tensor([0, 1])


def call(**overrides):
    args = dict(proposals=PROPOSALS, proposal_splits=torch.tensor([0, 3]), gt_boxes=GT,
                gt_splits=torch.tensor([0, 1]))
    args.update(overrides)
    return overlap_sampler.sample(args.pop("proposals"), args.pop("proposal_splits"),
                                  args.pop("gt_boxes"), args.pop("gt_splits"), **args)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(proposals=torch.rand(3, 5)), ValueError, r"proposals must have shape \[R, 4\]"),
        (dict(proposals=torch.rand(12)), ValueError, "proposals must have shape"),
        (dict(gt_boxes=torch.ones(1, 4, dtype=torch.int32)), TypeError, "gt_boxes must be float"),
        (dict(gt_boxes=GT.double()), TypeError, "proposals and gt_boxes must share a dtype"),
        (dict(proposals=PROPOSALS.bfloat16()), TypeError, "proposals must be float16, float32 or float64"),
        (dict(proposals=torch.tensor([[0.0, 0, float("nan"), 1]] * 3)), ValueError, "proposals contains NaN"),
        (dict(gt_boxes=torch.tensor([[0.0, 0, float("inf"), 1]])), ValueError, "gt_boxes contains NaN"),
        (dict(gt_boxes=torch.tensor([[10.0, 0, 0, 10]])), ValueError, "gt_boxes has a box with x2 < x1"),
        (dict(proposal_splits=torch.tensor([0, 2])), ValueError, "proposal_splits must end at the row count 3"),
        (dict(proposal_splits=torch.tensor([1, 3])), ValueError, "proposal_splits must start at 0"),
        (dict(proposal_splits=torch.tensor([0, 3, 2, 3]), gt_splits=torch.tensor([0, 1, 1, 1])),
         ValueError, "proposal_splits must be non-decreasing"),
        (dict(gt_splits=torch.tensor([0, 0, 1])), ValueError, "describe the same number of images"),
        (dict(gt_splits=torch.tensor([0, 1], dtype=torch.int32)), TypeError, "gt_splits must be int64"),
        (dict(gt_splits=torch.tensor([[0, 1]])), ValueError, "gt_splits must be a 1-D offsets tensor"),
        (dict(neg_strategy="random"), ValueError, "neg_strategy must be one of"),
        (dict(pos_strategy="iou_balanced"), ValueError, "pos_strategy 'iou_balanced' is defined for negatives"),
        (dict(num_bins=0), ValueError, "num_bins must be in"),
        (dict(num_bins=1000), ValueError, "num_bins must be in"),
        (dict(positive_fraction=1.5), ValueError, "positive_fraction must be in"),
        (dict(positive_fraction=-0.1), ValueError, "positive_fraction must be in"),
        (dict(fg_iou_thresh=2.0), ValueError, "fg_iou_thresh must be in"),
        (dict(bg_iou_thresh=0.7, fg_iou_thresh=0.5), ValueError, "bg_iou_thresh .* must not exceed"),
        (dict(batch_size_per_image=-1), ValueError, "batch_size_per_image must be >= 0"),
        (dict(bin_upper=0.0), ValueError, "bin_upper must be a positive"),
        (dict(pos_weight=float("nan")), ValueError, "pos_weight must be a finite"),
        (dict(pos_key="everything"), ValueError, "pos_key must be"),
        (dict(hard_thresh=float("inf")), ValueError, "hard_thresh must be finite"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


def test_validate_false_skips_value_checks_only():
    with pytest.raises(ValueError, match="proposals must have shape"):
        call(proposals=torch.rand(3, 5), validate=False)
    # NaN coordinates pass unchecked but still never crash or read out of bounds.
    result = call(proposals=torch.tensor([[0.0, 0, float("nan"), 1]] * 3), validate=False)
    assert result.indices.shape == (1, 512)


def test_nan_x1_without_validation_never_crashes():
    """NaN x1 reaches the CPU's x-sort with validate=False: std::sort needs a strict
    weak order, so a NaN there could read out of bounds. In a child process."""
    script = textwrap.dedent(
        """
        import torch, overlap_sampler as o
        from overlap_sampler.testing import make_batch
        proposals, ps, gt, gs = make_batch([600, 300], [8, 5], seed=0, canvas=500.0)
        proposals[::3, 0] = float("nan")
        gt[1, 0] = float("nan")
        for neg in o.NEGATIVE_STRATEGIES:
            for pos_key in ("negatives", "all"):
                r = o.sample(proposals, ps, gt, gs, neg_strategy=neg, pos_strategy="linear", pos_key=pos_key,
                             validate=False, generator=torch.Generator().manual_seed(0))
                assert r.indices.shape == (2, 512)
                for row, limit in zip(r.indices, (range(0, 600), range(600, 900))):
                    taken = row[row >= 0].tolist()
                    assert len(taken) == len(set(taken))
                    assert all(i in limit or i >= 900 for i in taken)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_nan_query_still_meets_the_positives_it_overlaps():
    """With validate=False a NaN coordinate is not an error: box_iou_pair's
    min/max then take the other box's coordinate (as on CUDA), so the negative
    (NaN, 0, 100, 10) has IoU 600 / 5400 = 0.111 with the positive (0, 0, 60, 100).
    `hard` with θ = 0.1 must always take it, among 20 far-away negatives."""
    far = [[200.0 + 10 * i, 0.0, 205.0 + 10 * i, 5.0] for i in range(20)]
    proposals = torch.tensor([[float("nan"), 0.0, 100.0, 10.0]] + far)
    gt = torch.tensor([[0.0, 0.0, 60.0, 100.0]])
    for seed in range(20):
        result = overlap_sampler.sample(proposals, torch.tensor([0, 21]), gt, torch.tensor([0, 1]),
                                        batch_size_per_image=4, neg_strategy="hard", hard_thresh=0.1,
                                        validate=False, generator=torch.Generator().manual_seed(seed))
        assert result.num_pos.item() == 1 and result.num_neg.item() == 3
        assert 0 in result.indices[0, 1:].tolist(), seed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices():
    with pytest.raises(ValueError, match="on one device"):
        call(gt_boxes=GT.cuda())


META_MIXES = {
    "sample": lambda o, m: o.sample(PROPOSALS, SPLITS, m(GT), GT_SPLITS),
    "sample_splits": lambda o, m: o.sample(PROPOSALS, m(SPLITS), GT, GT_SPLITS),
    "sample_from_uniforms": lambda o, m: o.sample_from_uniforms(
        PROPOSALS, SPLITS, GT, GT_SPLITS, m(torch.rand(PROPOSALS.shape[0] + GT.shape[0], dtype=torch.float64))),
    "box_iou": lambda o, m: o.box_iou(PROPOSALS, m(GT)),
    "max_iou": lambda o, m: o.max_iou(PROPOSALS, m(SPLITS), GT, GT_SPLITS),
    "assign_bins": lambda o, m: o.assign_bins(torch.rand(5), m(torch.tensor([0, 5]))),
    "weighted_sample": lambda o, m: o.weighted_sample(torch.rand(5), m(torch.rand(5, dtype=torch.float64)),
                                                      torch.tensor([0, 5]), torch.tensor([2]), 2),
}


@pytest.mark.parametrize("op", list(META_MIXES))
def test_meta_tensor_beside_cpu_ones_is_an_error(op):
    # The dispatcher sends a CPU/meta mix to the fake kernel, which used to
    # return uninitialised CPU tensors.
    with pytest.raises(ValueError, match="on one device, got"):
        META_MIXES[op](overlap_sampler, lambda t: t.to("meta"))


def test_nastiest_inputs_never_crash_the_process():
    """Each case runs in one child process: a segfault or abort would show up as a
    non-zero return code; every case must end in a Python exception or a result."""
    script = textwrap.dedent(
        """
        import torch, overlap_sampler as o
        ops = torch.ops.overlap_sampler
        big = torch.tensor([[0.0, 0, 1e38, 1e38], [-1e38, -1e38, 1e38, 1e38]])
        cases = [
            lambda: ops.sample(big, torch.tensor([0, 2]), big[:1], torch.tensor([0, 1])),
            lambda: ops.sample(torch.zeros(0, 4), torch.tensor([0]), torch.zeros(0, 4), torch.tensor([0])),
            lambda: ops.sample(torch.zeros(4, 4), torch.tensor([0, 9]), torch.zeros(0, 4), torch.tensor([0, 0]),
                               validate=False),
            lambda: ops.sample(torch.zeros(4, 4), torch.tensor([0, -5]), torch.zeros(0, 4), torch.tensor([0, 0])),
            lambda: ops.sample_from_uniforms(torch.rand(4, 4), torch.tensor([0, 4]), torch.rand(1, 4),
                                             torch.tensor([0, 1]), torch.rand(2, dtype=torch.float64)),
            lambda: ops.max_iou(torch.rand(4, 4), torch.tensor([0, 7]), torch.rand(2, 4), torch.tensor([0, 2])),
            lambda: ops.max_iou(torch.rand(4, 4), torch.tensor([0, 4]), torch.rand(2, 4), torch.tensor([3, 2])),
            lambda: ops.weighted_sample(torch.rand(4), torch.rand(4), torch.tensor([0, 9]), torch.tensor([2]), 2),
            lambda: ops.weighted_sample(torch.rand(4), torch.rand(4), torch.tensor([0, 4]), torch.tensor([-3]), 2),
            lambda: ops.weighted_sample(torch.rand(4), torch.rand(4), torch.tensor([0, 4]), torch.tensor([3]), -1),
            lambda: ops.assign_bins(torch.rand(4), torch.tensor([0, 2, 1, 4]), num_bins=3),
            lambda: ops.box_iou(torch.rand(0, 4), torch.rand(0, 4)),
            lambda: ops.sample(torch.rand(3, 4).expand(3, 4).t().contiguous().t(), torch.tensor([0, 3]),
                               torch.rand(2, 4)[:, [0, 1, 2, 3]], torch.tensor([0, 2])),
            lambda: ops.sample(torch.rand(6, 8)[:, ::2], torch.tensor([0, 6]), torch.rand(2, 8)[:, ::2],
                               torch.tensor([0, 2]), validate=False),
        ]
        outcomes = []
        for case in cases:
            try:
                case()
                outcomes.append("ok")
            except (ValueError, TypeError, RuntimeError, IndexError) as error:
                outcomes.append(type(error).__name__)
        print(outcomes)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    outcomes = eval(done.stdout.strip().splitlines()[-1])
    assert len(outcomes) == 14
    # Splits index memory: on the CPU they are checked even with validate=False.
    assert outcomes[2:5] == ["ValueError"] * 3
    assert outcomes[5:11] == ["ValueError"] * 6


def test_splits_from_counts():
    import numpy as np

    expected = [0, 3, 3, 5]
    for counts in ([3, 0, 2], (np.int64(3), 0, 2), [torch.tensor(3), 0, 2], torch.tensor([3, 0, 2]),
                   torch.tensor([3, 0, 2], dtype=torch.int32)):
        got = overlap_sampler.splits_from_counts(counts)
        assert got.dtype == torch.int64 and got.tolist() == expected
    assert overlap_sampler.splits_from_counts([]).tolist() == [0]
    for counts, error, match in [([3, -1], ValueError, r"counts\[1\] must be >= 0, got -1"),
                                 (torch.tensor([3, -1]), ValueError, "counts must be >= 0"),
                                 ([1.5, 2], TypeError, r"counts\[0\] must be an integer, got 1.5"),
                                 ([True, 2], TypeError, r"counts\[0\] must be an integer"),
                                 (torch.tensor([1.0, 2.0]), TypeError, "integer tensor, got torch.float32"),
                                 (torch.tensor([[1, 2]]), ValueError, "counts must be 1-D")]:
        with pytest.raises(error, match=match):
            overlap_sampler.splits_from_counts(counts)


NONE_ARGUMENTS = {
    "proposals": lambda o: o.sample(None, SPLITS, GT, GT_SPLITS),
    "gt_splits": lambda o: o.sample(PROPOSALS, SPLITS, GT, None),
    "uniforms": lambda o: o.sample_from_uniforms(PROPOSALS, SPLITS, GT, GT_SPLITS, None),
    "boxes2": lambda o: o.box_iou(PROPOSALS, None),
    "keys": lambda o: o.max_iou(PROPOSALS, SPLITS, None, GT_SPLITS),
    "values": lambda o: o.assign_bins(None, SPLITS),
    "counts": lambda o: o.weighted_sample(torch.rand(3), torch.rand(3, dtype=torch.float64), SPLITS, None, 1),
}


@pytest.mark.parametrize("argument", list(NONE_ARGUMENTS))
def test_none_for_a_tensor_is_named(argument):
    with pytest.raises(TypeError, match=f"{argument} must be .*, got None"):
        NONE_ARGUMENTS[argument](overlap_sampler)
