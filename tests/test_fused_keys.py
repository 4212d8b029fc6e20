"""The CPU kernel computes the negatives' keys (max IoU with a positive) and the
positives' keys (max IoU with a negative) in one pass over the pairs whenever
both classes are drawn by their overlaps (soft/soft is the training default).
Those keys must be bit for bit the two-pass ones: checked here against the
independent per-image reference over two thousand random batches, the shapes,
crowding, dtypes and strategy pairs varied, with both classes over their quota
(the only case that takes the fused pass)."""

import random

import pytest
import torch

import overlap_sampler
from overlap_sampler import reference
from conftest import make_batch

OVERLAP_STRATEGIES = ("hard", "soft", "soft_reference", "linear")


def random_case(seed):
    rng = random.Random(seed)
    images = rng.randint(1, 4)
    proposals = [rng.choice([0, 5, 40, 150, 300]) for _ in range(images)]
    gts = [rng.randint(0, 8) for _ in range(images)]
    batch = make_batch(proposals, gts, seed=seed, dtype=rng.choice([torch.float32, torch.float64]),
                       crowded_fraction=rng.uniform(0.1, 0.9), canvas=rng.choice([100.0, 400.0, 1000.0]))
    options = dict(
        # Small budgets: both classes over their quota in most images.
        batch_size_per_image=rng.choice([8, 16, 48]),
        positive_fraction=rng.choice([0.25, 0.5]),
        neg_strategy=rng.choice(OVERLAP_STRATEGIES),
        pos_strategy=rng.choice(OVERLAP_STRATEGIES),
        num_bins=rng.randint(1, 5),
        hard_thresh=rng.uniform(0.05, 0.6),
        pos_weight=2.0,
        append_gt=rng.random() < 0.8,
    )
    if rng.random() < 0.3:
        options.update(fg_iou_thresh=0.6, bg_iou_thresh=0.4)  # ignored examples between them
    examples = batch[0].shape[0] + (batch[2].shape[0] if options["append_gt"] else 0)
    uniforms = torch.rand(examples, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return batch, uniforms, options


@pytest.mark.parametrize("block", range(8))
def test_fused_keys_equal_the_reference_on_random_batches(block):
    fused_images = 0
    for seed in range(250 * block, 250 * (block + 1)):
        batch, uniforms, options = random_case(seed)
        got = overlap_sampler.sample_from_uniforms(*batch, uniforms, **options)
        expected = reference.sample_from_uniforms(*batch, uniforms, **options)
        for name, a, b in zip(overlap_sampler.SampleResult._fields, got, expected):
            assert torch.equal(a, b), f"seed {seed}, {options}: {name} differs\n{a}\n{b}"
        # Count the images that took the fused pass: both classes drawn below their size.
        quota_pos = round(options["batch_size_per_image"] * options["positive_fraction"])
        counts = reference_counts(batch, options)
        fused_images += sum(1 for p, n in counts
                            if 0 < min(quota_pos, p) < p
                            and 0 < options["batch_size_per_image"] - min(quota_pos, p) < n)
    assert fused_images >= 200, f"only {fused_images} images exercised the fused pass"


def reference_counts(batch, options):
    """(positives, negatives) per image, from the reference's matching."""
    proposals, proposal_splits, gt_boxes, gt_splits = batch
    counts = []
    for b in range(proposal_splits.numel() - 1):
        p = proposals[proposal_splits[b]:proposal_splits[b + 1]]
        g = gt_boxes[gt_splits[b]:gt_splits[b + 1]]
        examples = torch.cat([p, g]) if options["append_gt"] else p
        if g.numel() == 0:
            counts.append((0, examples.shape[0]))
            continue
        best = overlap_sampler.box_iou(examples, g).max(1).values
        copies = torch.zeros(examples.shape[0], dtype=torch.bool)
        if options["append_gt"]:
            copies[p.shape[0]:] = True
        positive = copies | (best >= options.get("fg_iou_thresh", 0.5))
        negative = ~positive & (best < options.get("bg_iou_thresh", 0.5))
        counts.append((int(positive.sum()), int(negative.sum())))
    return counts
