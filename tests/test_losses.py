"""weighted_fastrcnn_loss against plain formulas and against torchvision's fastrcnn_loss."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.roi_heads import fastrcnn_loss

from overlap_sampler.detection import weighted_fastrcnn_loss

BETA = 1.0 / 9.0


def _cross_entropy(logits: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def _smooth_l1(d: float) -> float:
    d = abs(d)
    return 0.5 * d * d / BETA if d < BETA else d - 0.5 * BETA


def test_hand_computed_tiny_example():
    # 2 images, 3 RoIs, 3 classes (0 = background).
    logits = [[0.2, 1.5, -0.3], [2.0, 0.1, 0.4], [-1.0, 0.5, 0.7]]
    labels = [2, 0, 1]
    weights = [2.0, 1.0, 3.0]
    deltas = [[0.01 * k - 0.2 for k in range(12)], [0.5] * 12, [0.03 * k for k in range(12)]]
    targets = [[0.0, 0.05, -0.5, 0.3], [9.0, 9.0, 9.0, 9.0], [0.1, 0.02, 0.0, -0.2]]

    cls_expected = sum(w * _cross_entropy(lg, lab) for lg, lab, w in zip(logits, labels, weights)) / 3
    box_expected = 0.0
    for d, t, lab, w in zip(deltas, targets, labels, weights):
        if lab > 0:  # negatives have no box loss (their target is never read)
            box_expected += w * sum(_smooth_l1(d[4 * lab + k] - t[k]) for k in range(4))
    box_expected /= 3

    cls, box = weighted_fastrcnn_loss(
        torch.tensor(logits, dtype=torch.float64), torch.tensor(deltas, dtype=torch.float64),
        [torch.tensor(labels[:1]), torch.tensor(labels[1:])],
        [torch.tensor(targets[:1], dtype=torch.float64), torch.tensor(targets[1:], dtype=torch.float64)],
        [torch.tensor(weights[:1], dtype=torch.float64), torch.tensor(weights[1:], dtype=torch.float64)])
    assert cls.item() == pytest.approx(cls_expected, rel=1e-12)
    assert box.item() == pytest.approx(box_expected, rel=1e-12)


def _random_inputs(sizes, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    logits = torch.randn(total, num_classes, generator=g, requires_grad=True)
    deltas = torch.randn(total, 4 * num_classes, generator=g, requires_grad=True)
    labels = torch.randint(0, num_classes, (total,), generator=g)
    targets = torch.randn(total, 4, generator=g) * 0.3
    return logits, deltas, list(labels.split(sizes)), list(targets.split(sizes))


@pytest.mark.parametrize("sizes", [[1], [7, 5], [512, 512], [300, 0, 17]])
def test_all_ones_weights_equal_torchvision_bit_for_bit(sizes):
    logits, deltas, labels, targets = _random_inputs(sizes, 5, seed=sum(sizes))
    ones = [torch.ones(n) for n in sizes]
    expected = fastrcnn_loss(logits, deltas, labels, targets)
    got = weighted_fastrcnn_loss(logits, deltas, labels, targets, ones)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    # and the same gradients
    grads_expected = torch.autograd.grad(sum(expected), [logits, deltas])
    grads_got = torch.autograd.grad(sum(got), [logits, deltas])
    for e, g in zip(grads_expected, grads_got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)


def test_weights_scale_each_roi_and_keep_the_normaliser():
    logits, deltas, labels, targets = _random_inputs([6, 4], 4, seed=3)
    w = [torch.rand(6) * 3, torch.rand(4) * 3]
    cls, box = weighted_fastrcnn_loss(logits, deltas, labels, targets, w)
    lab = torch.cat(labels)
    tgt = torch.cat(targets)
    wt = torch.cat(w)
    ce = torch.nn.functional.cross_entropy(logits, lab, reduction="none")
    torch.testing.assert_close(cls, (wt * ce).sum() / 10)
    pos = lab > 0
    per = torch.nn.functional.smooth_l1_loss(
        deltas.reshape(10, 4, 4)[pos, lab[pos]], tgt[pos], beta=BETA, reduction="none").sum(1)
    torch.testing.assert_close(box, (wt[pos] * per).sum() / 10)
    # The weights scale the gradients too (weighting a detached term would give the value, not the gradient).
    reference = (wt * ce).sum() / 10 + (wt[pos] * per).sum() / 10
    for got, expected in zip(torch.autograd.grad(cls + box, [logits, deltas]),
                             torch.autograd.grad(reference, [logits, deltas])):
        torch.testing.assert_close(got, expected)


def test_no_positives_gives_zero_box_loss_and_finite_gradients():
    logits, deltas, _, targets = _random_inputs([5], 3, seed=1)
    labels = [torch.zeros(5, dtype=torch.int64)]
    cls, box = weighted_fastrcnn_loss(logits, deltas, labels, targets, [torch.ones(5)])
    assert box.item() == 0.0 and torch.isfinite(cls)
    (cls + box).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(deltas.grad).all()


def test_empty_batch_gives_zero_losses_not_nan():
    logits = torch.zeros(0, 3, requires_grad=True)
    deltas = torch.zeros(0, 12, requires_grad=True)
    cls, box = weighted_fastrcnn_loss(logits, deltas, [torch.zeros(0, dtype=torch.int64)],
                                      [torch.zeros(0, 4)], [torch.zeros(0)])
    assert cls.item() == 0.0 and box.item() == 0.0
    (cls + box).backward()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript():
    scripted = torch.jit.script(weighted_fastrcnn_loss)
    logits, deltas, labels, targets = _random_inputs([4, 3], 3, seed=5)
    w = [torch.full((4,), 2.0), torch.ones(3)]
    for e, g in zip(weighted_fastrcnn_loss(logits, deltas, labels, targets, w),
                    scripted(logits, deltas, labels, targets, w)):
        torch.testing.assert_close(g, e)
