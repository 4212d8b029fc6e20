"""OHEM (``sampling/ohem.py``): rivals.md section 3, cases of section 6 (3), against a plain per-image reference."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from conftest import cpu_and_cuda
from overlap_sampler.sampling.examples import ExampleBatch, match_examples
from overlap_sampler.sampling.ohem import ohem_losses, ohem_select
from overlap_sampler.testing import make_batch

CODER = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))


# --------------------------------------------------------------------------------------------------------------
# helpers


def hand_batch(boxes, image, label, matched_gt, iou, gt_boxes, gt_labels, proposal_counts, gt_counts,
               device="cpu") -> ExampleBatch:
    """An ExampleBatch written out by hand (rows: proposals of every image, then GT copies)."""
    f = dict(dtype=torch.float32, device=device)
    i = dict(dtype=torch.int64, device=device)
    return ExampleBatch(torch.tensor(boxes, **f).reshape(-1, 4), torch.tensor(image, **i), list(proposal_counts),
                        list(gt_counts), torch.tensor(iou, **f), torch.tensor(matched_gt, **i),
                        torch.tensor(label, **i), torch.tensor(gt_boxes, **f).reshape(-1, 4),
                        torch.tensor(gt_labels, **i))


def logits_for_ce(ce: float, label: int, num_classes: int) -> list[float]:
    """Logits (zero but the target's) whose cross-entropy against ``label`` is ``ce``:
    CE = log(1 + (n-1) e^-a)  =>  a = log(n-1) - log(expm1(ce))."""
    row = [0.0] * num_classes
    row[label] = math.log(num_classes - 1) - math.log(math.expm1(ce))
    return row


class TableScorer:
    """A fake RoI head: fixed per-row outputs, and a record of every call."""

    def __init__(self, logits: torch.Tensor, regression: torch.Tensor):
        self.logits, self.regression, self.calls = logits, regression, []

    def __call__(self, rows):
        self.calls.append(rows.clone())
        return self.logits[rows], self.regression[rows]


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def hand_loss(logits: list[float], regression: list[float], label: int, target: list[float], box_loss: bool):
    """The OHEM loss of one example, from the definitions (float64)."""
    m = max(logits)
    log_z = m + math.log(sum(math.exp(v - m) for v in logits))
    loss = log_z - logits[label]
    if box_loss and label > 0:
        loss += sum(smooth_l1(regression[4 * label + j] - target[j]) for j in range(4))
    return loss


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------------------------------------------
# rivals.md section 6, case 3: paper


def paper_case(device):
    """r0 fg1 [0,0,10,10] 0.9; r1 fg1 [0,0,10,9] 0.8; r2 bg [20,20,30,30] 2.0; r3 bg [20,20,30,29] 1.9;
    r4 bg [40,40,50,50] 0.1; r5 fg2 [0,0,10,10] 0.5; plus the GT copies g6 (class 1) and g7 (class 2), both
    [0,0,10,10], with losses 0.05 and 0.04.

    Each positive's loss is CE + a box term: the regression is the target plus offsets on some of the 4
    deltas, so the box term matters (r5 has CE 0.05 < r4's 0.1: without it, per-label NMS would keep r4).
    Background rows and the other classes' deltas hold junk (5.0) that must not count.
    """
    boxes = [[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [20, 20, 30, 29], [40, 40, 50, 50], [0, 0, 10, 10],
             [0, 0, 10, 10], [0, 0, 10, 10]]
    batch = hand_batch(boxes, [0] * 8, [1, 1, 0, 0, 0, 1, 1, 1], [0, 0, -1, -1, -1, 1, 0, 1],
                       [1, .9, 0, 0, 0, 1, 1, 1], [[0, 0, 10, 10], [0, 0, 10, 10]], [1, 2], [6], [2], device)
    labels = [1, 1, 0, 0, 0, 2, 1, 2]
    ce = [0.4, 0.3, 2.0, 1.9, 0.1, 0.05, 0.05, 0.04]
    # box term: r0 0.5 (dx off by 1), r1 0.25 + 0.25 (dy, dh off by sqrt(.5)), r5 0.45 (dw off by sqrt(.9))
    offsets = {0: [1.0, 0, 0, 0], 1: [0, math.sqrt(.5), 0, -math.sqrt(.5)], 5: [0, 0, math.sqrt(.9), 0]}
    total = [0.9, 0.8, 2.0, 1.9, 0.1, 0.5, 0.05, 0.04]
    num_classes = 3
    logits = torch.tensor([logits_for_ce(c, l, num_classes) for c, l in zip(ce, labels)], dtype=torch.float64)
    regression = torch.full((8, 4 * num_classes), 5.0, dtype=torch.float64)
    gt_of = batch.matched_gt.cpu()
    box_cpu = batch.boxes.cpu().double()
    for r in (0, 1, 5, 6, 7):
        target = CODER.encode_single(batch.gt_boxes.cpu().double()[gt_of[r]][None], box_cpu[r][None])[0]
        regression[r, 4 * labels[r]: 4 * labels[r] + 4] = target + torch.tensor(offsets.get(r, [0.0] * 4),
                                                                                dtype=torch.float64)
    scorer = TableScorer(logits.float().to(device), regression.float().to(device))
    return batch, scorer, labels, total


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_paper_case_losses(device):
    batch, scorer, labels, total = paper_case(device)
    rows = torch.arange(8, device=device)
    logits, regression = scorer(rows)
    gt = batch.matched_gt.clamp(min=0)
    targets = torch.where((batch.label == 1)[:, None], CODER.encode_single(batch.gt_boxes[gt], batch.boxes),
                          torch.zeros(8, 4, device=device))
    loss = ohem_losses(logits, regression, torch.tensor(labels, device=device), targets, box_loss=True)
    torch.testing.assert_close(loss.cpu(), torch.tensor(total), atol=2e-5, rtol=0)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("nms_thresh, agnostic, expected, num_pos", [
    (0.7, False, [0, 5, 2], 2),  # per-label NMS: r2, r0, r5 (positives first in the output row)
    (0.7, True, [0, 2, 4], 1),  # class-agnostic: r2, r0, r4
    (None, False, [0, 2, 3], 1),  # no NMS: r2, r3, r0
    (None, True, [0, 2, 3], 1),  # class_agnostic_nms is moot without NMS
])
def test_paper_case_picks(device, nms_thresh, agnostic, expected, num_pos):
    batch, scorer, _, _ = paper_case(device)
    out = ohem_select(batch, scorer, CODER, 3, variant="paper", nms_thresh=nms_thresh,
                      class_agnostic_nms=agnostic)
    assert out.indices.tolist() == [expected]
    assert out.num_pos.tolist() == [num_pos] and out.num_neg.tolist() == [3 - num_pos]
    assert out.weights.tolist() == [[1.0, 1.0, 1.0]]
    assert out.matched_gt.tolist() == [[int(batch.matched_gt[r]) if batch.label[r] == 1 else -1 for r in expected]]
    assert len(scorer.calls) == 1 and scorer.calls[0].tolist() == list(range(8))


def test_paper_case_without_box_loss_would_differ():
    """Guards the case itself: on CE alone, per-label NMS keeps r4 instead of r5."""
    batch, scorer, labels, _ = paper_case("cpu")
    logits, _ = scorer(torch.arange(8))
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(labels), reduction="none")
    assert ce[4] > ce[5]


# --------------------------------------------------------------------------------------------------------------
# rivals.md section 6, case 3: mmdetection


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_mmdet_case(device):
    """q+ = int(8 * 0.25) = 2: positives CE {.2, 1.5, .9} -> 1.5, .9 (the .9 one is the GT copy); q- = 6 of the
    8 negatives CE {.05, 2, .3, .3, 1.1, .01, .7, .02}: all but .01 and .02. Row 10 is ignored (never scored)."""
    boxes = [[0, 0, 10, 9.5], [0, 0, 9.5, 10]] + [[20 + i, 20, 30 + i, 30] for i in range(8)] + \
            [[0, 0, 10, 8]] + [[0, 0, 10, 10]]
    label = [1, 1] + [0] * 8 + [-1, 1]
    matched = [0, 0] + [-1] * 8 + [0, 0]
    batch = hand_batch(boxes, [0] * 12, label, matched, [.95, .95] + [0] * 8 + [.8, 1], [[0, 0, 10, 10]], [3],
                       [11], [1], device)
    ce = [.2, 1.5, .05, 2, .3, .3, 1.1, .01, .7, .02, 0.0, .9]
    cls = [3, 3] + [0] * 8 + [0, 3]
    logits = torch.tensor([logits_for_ce(c, l, 4) if c > 0 else [0, 0, 0, 0] for c, l in zip(ce, cls)])
    logits[10] = torch.tensor([-50.0, 0, 0, 0])  # the ignored row would be the hardest of all
    scorer = TableScorer(logits.to(device), torch.zeros(12, 16, device=device))
    out = ohem_select(batch, scorer, CODER, 8, 0.25, variant="mmdet", nms_thresh=None)
    # positives by CE desc: 1 (1.5), 11 (.9); negatives by CE desc, the two .3 by row: 3, 6, 8, 4, 5, 2
    assert out.indices.tolist() == [[1, 11, 3, 6, 8, 4, 5, 2]]
    assert out.num_pos.tolist() == [2] and out.num_neg.tolist() == [6]
    assert out.matched_gt.tolist() == [[0, 0, -1, -1, -1, -1, -1, -1]]
    assert out.weights.tolist() == [[1.0] * 8]
    assert len(scorer.calls) == 1 and 10 not in scorer.calls[0].tolist()
    assert sorted(scorer.calls[0].tolist()) == [r for r in range(12) if r != 10]


def test_mmdet_takes_all_when_short():
    """#pos <= q+ takes every positive: 1 positive (the GT copy) with q+ = 2, so q- = 8 - 1 = 7 of the 9
    negatives, the two lowest-CE ones (.2, .1) dropped."""
    boxes = [[0, 0, 10, 9.5]] + [[20 + i, 20, 30 + i, 30] for i in range(8)] + [[0, 0, 10, 10]]
    batch = hand_batch(boxes, [0] * 10, [0] * 9 + [1], [-1] * 9 + [0], [0] * 9 + [1], [[0, 0, 10, 10]], [1],
                       [9], [1])
    ce = [.5, .4, .3, .2, .1, .6, .7, .8, .9, .05]
    cls = [0] * 9 + [1]
    scorer = TableScorer(torch.tensor([logits_for_ce(c, l, 2) for c, l in zip(ce, cls)]), torch.zeros(10, 8))
    out = ohem_select(batch, scorer, CODER, 8, 0.25, variant="mmdet", nms_thresh=None)
    assert out.indices.tolist() == [[9, 8, 7, 6, 5, 0, 1, 2]]
    assert out.num_pos.tolist() == [1] and out.num_neg.tolist() == [7]


def test_paper_budget_is_shared():
    """2 images, batch_size_per_image 2: the 4 hardest of the batch, 3 of them in image 0 (width 3 > 2)."""
    boxes = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [0, 0, 10, 10], [20, 0, 30, 10], [60, 60, 70, 70]]
    batch = hand_batch(boxes, [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1], [-1] * 5 + [0], [0] * 5 + [1],
                       [[60, 60, 70, 70]], [1], [3, 2], [0, 1])
    ce = [3.0, 2.5, 2.0, 0.2, 1.0, 0.1]
    cls = [0] * 5 + [1]
    scorer = TableScorer(torch.tensor([logits_for_ce(c, l, 2) for c, l in zip(ce, cls)]), torch.zeros(6, 8))
    out = ohem_select(batch, scorer, CODER, 2, variant="paper", nms_thresh=0.7)
    assert out.indices.tolist() == [[0, 1, 2], [4, -1, -1]]
    assert out.num_pos.tolist() == [0, 0] and out.num_neg.tolist() == [3, 1]
    assert out.weights.tolist() == [[1, 1, 1], [1, 0, 0]]


# --------------------------------------------------------------------------------------------------------------
# ohem_losses against the formula


@pytest.mark.parametrize("box_loss", [True, False])
def test_ohem_losses_formula(box_loss):
    g = torch.Generator().manual_seed(3)
    k, n = 60, 5
    logits = torch.randn(k, n, generator=g) * 3
    regression = torch.randn(k, 4 * n, generator=g)
    labels = torch.randint(0, n, (k,), generator=g)
    targets = torch.randn(k, 4, generator=g) * 1.5  # both branches of smooth L1
    got = ohem_losses(logits, regression, labels, targets, box_loss=box_loss)
    assert got.dtype == torch.float32 and got.shape == (k,) and not got.requires_grad
    want = [hand_loss(logits[i].tolist(), regression[i].tolist(), int(labels[i]), targets[i].tolist(), box_loss)
            for i in range(k)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    if box_loss:  # the box term is really there
        assert (got - ohem_losses(logits, regression, labels, targets, box_loss=False))[labels > 0].min() > 0


def test_ohem_losses_extremes_and_dtype():
    # log-softmax keeps losses beyond -log(FLT_MIN) ~ 87.3 distinct (the reference's clamp would tie them)
    logits = torch.tensor([[0.0, 200.0], [0.0, 300.0]])
    loss = ohem_losses(logits, torch.zeros(2, 8), torch.tensor([0, 0]), torch.zeros(2, 4), box_loss=True)
    torch.testing.assert_close(loss, torch.tensor([200.0, 300.0]))
    half = ohem_losses(logits.half(), torch.zeros(2, 8).half(), torch.tensor([1, 1]), torch.zeros(2, 4),
                       box_loss=True)
    assert half.dtype == torch.float32 and half.abs().max() < 1e-6
    empty = ohem_losses(torch.zeros(0, 3), torch.zeros(0, 12), torch.zeros(0, dtype=torch.int64),
                        torch.zeros(0, 4), box_loss=True)
    assert empty.shape == (0,)


# --------------------------------------------------------------------------------------------------------------
# an independent reference on random batches


def random_batch(seed, device="cpu", num_classes=5, counts=(40, 25, 60), gts=(3, 0, 5), bg=0.3):
    proposals, p_splits, gt_boxes, g_splits = make_batch(list(counts), list(gts), seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 100)
    gt_labels = torch.randint(1, num_classes, (gt_boxes.shape[0],), generator=g).to(device)
    p, gb, gl = [], [], []
    for b in range(len(counts)):
        p.append(proposals[p_splits[b]:p_splits[b + 1]])
        gb.append(gt_boxes[g_splits[b]:g_splits[b + 1]])
        gl.append(gt_labels[g_splits[b]:g_splits[b + 1]])
    batch = match_examples(p, gb, gl, 0.5, bg)
    e = batch.boxes.shape[0]
    logits = torch.randn(e, num_classes, generator=g) * 2
    regression = torch.randn(e, 4 * num_classes, generator=g) * 0.7
    return batch, TableScorer(logits.to(device), regression.to(device))


def reference_losses(batch, scorer, box_loss):
    """Per row (candidates only): (loss, class label) from the definitions, float64."""
    out = {}
    for r in range(batch.boxes.shape[0]):
        if int(batch.label[r]) < 0:
            continue
        pos = int(batch.label[r]) == 1
        gt = int(batch.matched_gt[r])
        label = int(batch.gt_labels[gt]) if pos else 0
        target = [0.0] * 4
        if pos:
            target = CODER.encode_single(batch.gt_boxes[gt][None].cpu().double(),
                                         batch.boxes[r][None].cpu().double())[0].tolist()
        out[r] = (hand_loss(scorer.logits[r].tolist(), scorer.regression[r].tolist(), label, target, box_loss),
                  label)
    values = sorted(v for v, _ in out.values())
    assert min(b - a for a, b in zip(values, values[1:])) > 1e-5, "losses too close: pick another seed"
    return out


def reference_paper(batch, scorer, per_image, nms_thresh, agnostic):
    losses = reference_losses(batch, scorer, box_loss=True)
    boxes = batch.boxes.cpu().tolist()
    image = batch.image.cpu().tolist()
    groups = {}
    for r, (_, label) in losses.items():
        groups.setdefault((image[r],) if agnostic else (image[r], label), []).append(r)
    survivors = []
    for rows in groups.values():
        kept = []
        for r in sorted(rows, key=lambda r: -losses[r][0]):  # greedy NMS, the loss as the score
            if nms_thresh is None or all(iou(boxes[r], boxes[k]) <= nms_thresh for k in kept):
                kept.append(r)
        survivors += kept
    survivors.sort(key=lambda r: -losses[r][0])
    picked = survivors[:batch.num_images * per_image]
    return arrange(batch, picked, losses, width=None)


def reference_mmdet(batch, scorer, per_image, fraction):
    losses = reference_losses(batch, scorer, box_loss=False)
    image = batch.image.cpu().tolist()
    label = batch.label.cpu().tolist()
    picked = []
    q_pos = int(per_image * fraction)
    for b in range(batch.num_images):
        pos = sorted((r for r in losses if image[r] == b and label[r] == 1), key=lambda r: -losses[r][0])
        neg = sorted((r for r in losses if image[r] == b and label[r] == 0), key=lambda r: -losses[r][0])
        pos = pos[:q_pos]
        picked += pos + neg[:per_image - len(pos)]
    return arrange(batch, picked, losses, width=per_image)


def arrange(batch, picked, losses, width):
    """Per image: positives by loss desc, then negatives by loss desc; -1 padding."""
    label = batch.label.cpu().tolist()
    image = batch.image.cpu().tolist()
    per = []
    for b in range(batch.num_images):
        mine = sorted((r for r in picked if image[r] == b), key=lambda r: (label[r] != 1, -losses[r][0]))
        per.append(mine)
    width = width if width is not None else max(1, max(len(p) for p in per))
    indices = [p + [-1] * (width - len(p)) for p in per]
    num_pos = [sum(label[r] == 1 for r in p) for p in per]
    return indices, num_pos, [len(p) - n for p, n in zip(per, num_pos)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed", [0, 2, 3])  # seeds whose losses are >= 1e-5 apart
@pytest.mark.parametrize("per_image", [4, 16, 200])
@pytest.mark.parametrize("nms_thresh, agnostic", [(0.7, False), (0.7, True), (0.3, True), (0.5, False), (None, False)])
def test_paper_matches_reference(device, seed, per_image, nms_thresh, agnostic):
    batch, scorer = random_batch(seed, device)
    want = reference_paper(batch, scorer, per_image, nms_thresh, agnostic)
    out = ohem_select(batch, scorer, CODER, per_image, variant="paper", nms_thresh=nms_thresh,
                      class_agnostic_nms=agnostic)
    assert (out.indices.tolist(), out.num_pos.tolist(), out.num_neg.tolist()) == want


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed", [0, 2, 3])  # seeds whose losses are >= 1e-5 apart
@pytest.mark.parametrize("per_image, fraction", [(8, 0.25), (14, 0.25), (16, 0.5), (64, 0.25), (12, 0.0), (10, 1.0)])
def test_mmdet_matches_reference(device, seed, per_image, fraction):
    batch, scorer = random_batch(seed, device)
    want = reference_mmdet(batch, scorer, per_image, fraction)
    out = ohem_select(batch, scorer, CODER, per_image, fraction, variant="mmdet", nms_thresh=None)
    assert (out.indices.tolist(), out.num_pos.tolist(), out.num_neg.tolist()) == want


def test_reference_cases_are_not_trivial():
    """The random batches exercise what the comparisons above claim to: ignored rows, an image without GT,
    NMS that suppresses, a binding budget, more positives than q+."""
    batch, scorer = random_batch(0)
    assert (batch.label == -1).any() and batch.gt_counts[1] == 0
    full = reference_paper(batch, scorer, 200, None, False)
    nms = reference_paper(batch, scorer, 200, 0.7, False)
    assert sum(full[1]) + sum(full[2]) > sum(nms[1]) + sum(nms[2])
    agnostic = reference_paper(batch, scorer, 200, 0.3, True)
    assert agnostic != reference_paper(batch, scorer, 200, 0.3, False)
    small = reference_paper(batch, scorer, 4, 0.7, False)
    assert sum(small[1]) + sum(small[2]) == 12
    pos = torch.bincount(batch.image[batch.label == 1], minlength=3)
    assert int(pos.max()) > int(8 * 0.25)


# --------------------------------------------------------------------------------------------------------------
# invariants


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("variant, per_image, nms_thresh", [("paper", 6, 0.7), ("paper", 6, None),
                                                            ("paper", 100, 0.4), ("mmdet", 16, None),
                                                            ("mmdet", 100, None)])
def test_invariants(seed, variant, per_image, nms_thresh):
    batch, scorer = random_batch(seed, counts=(30, 50, 10, 20), gts=(2, 6, 1, 0))
    out = ohem_select(batch, scorer, CODER, per_image, 0.25, variant=variant, nms_thresh=nms_thresh)
    candidates = torch.nonzero(batch.label >= 0).reshape(-1)
    assert len(scorer.calls) == 1 and torch.equal(scorer.calls[0], candidates)
    valid = out.indices >= 0
    picks = out.indices[valid]
    assert picks.unique().numel() == picks.numel()
    assert (batch.label[picks] >= 0).all()
    total = out.num_pos + out.num_neg
    assert torch.equal(valid.sum(1), total)
    assert torch.equal(out.weights, valid.float())
    for b in range(batch.num_images):
        row = out.indices[b, :int(total[b])]
        assert (batch.image[row] == b).all()
        npos = int(out.num_pos[b])
        assert (batch.label[row[:npos]] == 1).all() and (batch.label[row[npos:]] == 0).all()
        assert torch.equal(out.matched_gt[b, :npos], batch.matched_gt[row[:npos]])
        assert (out.matched_gt[b, npos:] == -1).all()
        assert (out.indices[b, int(total[b]):] == -1).all()
    avail_pos = torch.bincount(batch.image[batch.label == 1], minlength=batch.num_images)
    avail_neg = torch.bincount(batch.image[batch.label == 0], minlength=batch.num_images)
    if variant == "mmdet":
        assert out.indices.shape[1] == per_image
        assert torch.equal(out.num_pos, avail_pos.clamp(max=int(per_image * 0.25)))
        assert torch.equal(out.num_neg, torch.minimum(avail_neg, per_image - out.num_pos))
    else:
        assert out.indices.shape[1] == max(1, int(total.max()))
        if nms_thresh is None:
            assert int(total.sum()) == min(candidates.numel(), batch.num_images * per_image)
        else:
            assert int(total.sum()) <= batch.num_images * per_image


def test_nms_thresh_one_is_no_nms():
    batch, scorer = random_batch(5)
    a = ohem_select(batch, scorer, CODER, 10, variant="paper", nms_thresh=1.0)
    b = ohem_select(batch, scorer, CODER, 10, variant="paper", nms_thresh=None)
    assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("variant, width", [("paper", 1), ("mmdet", 8)])
def test_no_candidates(variant, width):
    batch = hand_batch([[0, 0, 10, 10], [0, 0, 5, 5]], [0, 1], [-1, -1], [-1, -1], [.4, .4], [], [], [1, 1],
                       [0, 0])
    scorer = TableScorer(torch.zeros(2, 3), torch.zeros(2, 12))
    out = ohem_select(batch, scorer, CODER, 8, variant=variant, nms_thresh=None)
    assert scorer.calls == []
    assert out.indices.tolist() == [[-1] * width, [-1] * width]
    assert out.num_pos.tolist() == [0, 0] and out.num_neg.tolist() == [0, 0]


# --------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, name", [
    (dict(variant="ohem"), "variant"),
    (dict(variant="Paper"), "variant"),
    (dict(nms_thresh=0.0), "nms_thresh"),
    (dict(nms_thresh=-0.1), "nms_thresh"),
    (dict(nms_thresh=1.5), "nms_thresh"),
    (dict(nms_thresh=float("nan")), "nms_thresh"),
    (dict(variant="mmdet"), "nms_thresh"),  # the default 0.7 with mmdet
    (dict(variant="mmdet", nms_thresh=0.7), "nms_thresh"),
    (dict(batch_size_per_image=0), "batch_size_per_image"),
    (dict(batch_size_per_image=2.5), "batch_size_per_image"),
    (dict(positive_fraction=-0.1), "positive_fraction"),
    (dict(positive_fraction=1.5), "positive_fraction"),
])
def test_bad_args(kwargs, name):
    batch, scorer = random_batch(0)
    with pytest.raises(ValueError, match=name):
        ohem_select(batch, scorer, CODER, **kwargs)
    assert scorer.calls == []


def test_bad_scorer_output():
    batch, scorer = random_batch(0)
    short = lambda rows: (scorer.logits[rows][1:], scorer.regression[rows][1:])  # noqa: E731
    with pytest.raises(ValueError, match="scorer"):
        ohem_select(batch, short, CODER, 8)
    narrow = lambda rows: (scorer.logits[rows], scorer.regression[rows][:, :8])  # noqa: E731
    with pytest.raises(ValueError, match="box_regression"):
        ohem_select(batch, narrow, CODER, 8)
    few_classes = lambda rows: (scorer.logits[rows][:, :2], scorer.regression[rows][:, :8])  # noqa: E731
    with pytest.raises(ValueError, match="labels"):  # GT classes up to 4 do not fit 2 logits
        ohem_select(batch, few_classes, CODER, 8)


@pytest.mark.parametrize("args, name", [
    ((torch.zeros(3), torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), torch.zeros(3, 4)), "class_logits"),
    ((torch.zeros(3, 2), torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), torch.zeros(3, 4)),
     "box_regression"),
    ((torch.zeros(3, 2), torch.zeros(3, 8), torch.zeros(2, dtype=torch.int64), torch.zeros(3, 4)), "labels"),
    ((torch.zeros(3, 2), torch.zeros(3, 8), torch.zeros(3), torch.zeros(3, 4)), "labels"),
    ((torch.zeros(3, 2), torch.zeros(3, 8), torch.tensor([0, 1, 2]), torch.zeros(3, 4)), "labels"),
    ((torch.zeros(3, 2), torch.zeros(3, 8), torch.tensor([0, -1, 1]), torch.zeros(3, 4)), "labels"),
    ((torch.zeros(3, 2), torch.zeros(3, 8), torch.zeros(3, dtype=torch.int64), torch.zeros(3, 3)),
     "regression_targets"),
])
def test_ohem_losses_bad_args(args, name):
    with pytest.raises(ValueError, match=name):
        ohem_losses(*args, box_loss=True)
