"""PISA's importance-based sample reweighting (``overlap_sampler.sampling.isr``): ISR-N, ISR-P, CARL.

* rivals.md section 6 cases 4 (Score-HLR), 5 (ISR-P) and 6 (CARL), verbatim, to 1e-4;
* ``nms_match`` semantics on designed boxes: IoU exactly at the threshold absorbs (>=), grouping is greedy
  (not transitive), a box joins the earliest-visited leader absorbing it;
* an independent per-image reference written from the spec (plain Python loops and floats, the box decode
  and the greedy ``nms_match`` written out, ``imp`` sorted as the formula says), compared on random 3-image
  batches with 3 classes. The reference reads the same uniforms as the sampler (one float64 uniform per
  example row from the same seeded generator, a uniform m-subset = the m smallest), so picks compare exactly;
* statistics of the random parts (uniform positives, uniform invalid negatives): inclusion counts over
  many calls with one fixed-seed generator, chi-square at p < 1e-3 (deterministic);
* invariants of the output layout, bad arguments, CARL's value and gradient (gradcheck; the weights carry
  gradient, as in mmdetection).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torchvision.models.detection._utils import BoxCoder

from overlap_sampler.sampling.examples import match_examples
from overlap_sampler.sampling.isr import carl_loss, isr_p_weights, isr_select, score_hlr_rank

from conftest import cpu_and_cuda

ALPHA = 1e-3  # significance of the goodness-of-fit tests
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
CODER = BoxCoder(BOX_WEIGHTS)


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


class FakeScorer:
    """The box head's no-grad outputs as fixed tables indexed by example row; records its calls."""

    def __init__(self, logits, deltas):
        self.logits, self.deltas, self.calls = logits, deltas, []

    def __call__(self, rows):
        self.calls.append(rows.clone())
        return self.logits[rows], self.deltas[rows]


# ----------------------------------------------------------------------------------------------
# rivals.md section 6, case 4: Score-HLR
# ----------------------------------------------------------------------------------------------

CASE4_BOXES = [[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 6], [40, 0, 50, 10], [20, 0, 30, 10], [20, 0, 30, 7]]
CASE4_SCORES = [0.9, 0.8, 0.6, 0.03, 0.7, 0.5]  # rows 0..5 = n0, n1, n2, n3, n4, n5
N0, N1, N2, N3, N4, N5 = range(6)


def _one_class_batch(boxes, scores, device, gt=((100.0, 100.0, 110.0, 110.0),)):
    """One image whose proposals are all negatives (the GT lies far away; its copy is the one positive),
    one fg class with fg probability = score, zero deltas."""
    proposals = torch.tensor(boxes, dtype=torch.float32, device=device)
    gt_boxes = torch.tensor(gt, dtype=torch.float32, device=device).reshape(-1, 4)
    batch = match_examples([proposals], [gt_boxes], [torch.ones(gt_boxes.shape[0], dtype=torch.int64,
                                                                device=device)], 0.5, 0.5)
    count = batch.boxes.shape[0]
    s = torch.tensor(scores, dtype=torch.float64)
    logits = torch.zeros(count, 2, dtype=torch.float64)
    logits[:len(scores), 0] = torch.log1p(-s)
    logits[:len(scores), 1] = torch.log(s)
    return batch, FakeScorer(logits.float().to(device), torch.zeros(count, 8, device=device))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_case4_score_hlr_rank(device):
    valid = [N0, N1, N2, N4, N5]
    boxes = torch.tensor([CASE4_BOXES[i] for i in valid], dtype=torch.float32, device=device)
    scores = torch.tensor([CASE4_SCORES[i] for i in valid], device=device)
    rho, rank = score_hlr_rank(boxes, scores, torch.zeros(5, dtype=torch.int64, device=device), 1, 0.5)
    # groups {n0, n1, n2}, {n4, n5}; R: n0 0, n4 1, n1 2, n5 3, n2 4
    assert rho.tolist() == [0, 1, 2, 0, 1]
    assert rank.tolist() == [0, 2, 4, 1, 3]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_case4_quota_4(device):
    """q- = 4 (W = 5, q+ = int(1.25) = 1 taken by the GT copy): n0 n4 n1 n5, u 1 .8 .6 .4."""
    batch, scorer = _one_class_batch(CASE4_BOXES, CASE4_SCORES, device)
    out = isr_select(batch, scorer, CODER, 5, 0.25, generator=_generator(device, 0))
    assert out.indices.tolist() == [[6, N0, N4, N1, N5]]
    assert out.num_pos.tolist() == [1] and out.num_neg.tolist() == [4]
    expected = torch.tensor([[1.0, 1.1470, 1.0259, 0.8885, 0.7254]])
    torch.testing.assert_close(out.weights.cpu(), expected, atol=1e-4, rtol=0)
    # The scorer saw every negative once, no positive.
    assert len(scorer.calls) == 1 and sorted(scorer.calls[0].tolist()) == list(range(6))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_case4_quota_6(device):
    """q- = 6 = n (no early return): adds n2 (R 4) and n3 (random pick); U = 6, u = 1, 5/6, 4/6, 3/6, 2/6 and
    n3 gets the smallest u taken, 2/6. w = sqrt(u) * sum(CE) / sum(sqrt(u) CE), CE = -log(1 - s):
    1.1744 1.0721 0.9589 0.8304 0.6781 0.6781 (hand-computed)."""
    batch, scorer = _one_class_batch(CASE4_BOXES, CASE4_SCORES, device)
    out = isr_select(batch, scorer, CODER, 7, 0.25, generator=_generator(device, 0))
    assert out.indices.tolist() == [[6, N0, N4, N1, N5, N2, N3]]
    ce = [-math.log(1 - CASE4_SCORES[i]) for i in (N0, N4, N1, N5, N2, N3)]
    u = [1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 2 / 6]
    ratio = sum(ce) / sum(math.sqrt(x) * c for x, c in zip(u, ce))
    expected = torch.tensor([[1.0] + [math.sqrt(x) * ratio for x in u]])
    torch.testing.assert_close(out.weights.cpu(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.weights.cpu(), torch.tensor([[1.0, 1.1744, 1.0721, 0.9589, 0.8304, 0.6781,
                                                                 0.6781]]), atol=1e-4, rtol=0)


def test_case4_bias_and_k():
    """The mapping (bias + (1 - bias) u)^k with other k and bias (q- = 4, u 1 .8 .6 .4)."""
    batch, scorer = _one_class_batch(CASE4_BOXES, CASE4_SCORES, "cpu")
    out = isr_select(batch, scorer, CODER, 5, 0.25, k=2.0, bias=0.3)
    ce = [-math.log(1 - CASE4_SCORES[i]) for i in (N0, N4, N1, N5)]
    w = [(0.3 + 0.7 * x) ** 2 for x in (1, 0.8, 0.6, 0.4)]
    ratio = sum(ce) / sum(a * c for a, c in zip(w, ce))
    torch.testing.assert_close(out.weights[0, 1:], torch.tensor([a * ratio for a in w]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# nms_match semantics
# ----------------------------------------------------------------------------------------------

def _rank(boxes, scores, iou_thresh=0.5):
    n = len(scores)
    rho, rank = score_hlr_rank(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores),
                               torch.zeros(n, dtype=torch.int64), 1, iou_thresh)
    return rho.tolist(), rank.tolist()


def test_nms_match_iou_equal_to_threshold_absorbs():
    # IoU(a, b) = 50 / 100 = 0.5 exactly: b joins a's group (torchvision's nms alone would keep b).
    rho, rank = _rank([[0, 0, 10, 10], [0, 0, 10, 5], [20, 0, 30, 10]], [0.9, 0.8, 0.7])
    assert rho == [0, 1, 0] and rank == [0, 2, 1]
    # Just below: b leads its own group.
    rho, rank = _rank([[0, 0, 10, 10], [0, 0, 10, 4.99], [20, 0, 30, 10]], [0.9, 0.8, 0.7])
    assert rho == [0, 0, 0] and rank == [0, 1, 2]
    # A threshold that float32 cannot hold: IoU 70 / 100 in float32 is the float32 nearest 0.7, which lies
    # below 0.7, so ">= 0.7" does not absorb; ">= that float32 value" does.
    rho, _ = _rank([[0, 0, 10, 10], [0, 0, 10, 7]], [0.9, 0.8], iou_thresh=0.7)
    assert rho == [0, 0]
    rho, _ = _rank([[0, 0, 10, 10], [0, 0, 10, 7]], [0.9, 0.8], iou_thresh=float(torch.tensor(0.7)))
    assert rho == [0, 1]


def test_nms_match_is_greedy_not_transitive():
    # a absorbs b (IoU .8); b and c overlap (IoU .6) but a and c do not (IoU .4): c leads its own group.
    rho, rank = _rank([[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 4.0]], [0.9, 0.8, 0.7])
    assert rho == [0, 1, 0] and rank == [0, 2, 1]


def test_nms_match_box_joins_earliest_leader():
    # Leaders L1 .9, L2 .8 (IoU .43), L3 .65; m .85 in L1's group; j .7 overlaps L1 and L2 (IoU .67 each):
    # j belongs to L1 (rho 2), not L2 (rho 1). k .6 in L3's group (rho 1).
    boxes = [[0, 0, 10, 10], [0, 0, 10, 9], [4, 0, 14, 10], [2, 0, 12, 10], [40, 0, 50, 10], [40, 0, 50, 9]]
    scores = [0.9, 0.85, 0.8, 0.7, 0.65, 0.6]
    rho, rank = _rank(boxes, scores)
    assert rho == [0, 1, 0, 2, 0, 1]
    assert rank == [0, 3, 1, 5, 2, 4]  # with j in L2's group it would be R 4, k R 5


def test_groups_are_per_image():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 8]], dtype=torch.float32)
    rho, rank = score_hlr_rank(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0]), 2)
    assert rho.tolist() == [0, 0, 1] and rank.tolist() == [0, 0, 1]


# ----------------------------------------------------------------------------------------------
# rivals.md section 6, case 5: ISR-P
# ----------------------------------------------------------------------------------------------

def _logits_with_ce(label, ce, num_classes):
    """Logits whose softmax gives class ``label`` the probability exp(-ce), the rest to the background."""
    row = [-100.0] * (num_classes + 1)
    row[label] = 0.0
    row[0] = math.log(math.exp(ce) - 1.0)
    return row


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_case5_isr_p(device):
    """Class c = 1: GT A (id 0) IoU .9 .7 .6 (p0-p2), GT B (id 1) .8 .5 (p3, p4); class d = 2: p5 .95.
    Zero deltas; each RoI is [0, 0, 10, 10 IoU] in its GT [0, 0, 10, 10]."""
    ious = [0.9, 0.7, 0.6, 0.8, 0.5, 0.95]
    labels = [1, 1, 1, 1, 1, 2]
    gt_ids = [0, 0, 0, 1, 1, 2]
    ce = [0.1, 0.5, 1.0, 0.2, 0.8, 0.3]
    rois = torch.tensor([[0, 0, 10, 10 * x] for x in ious], device=device)
    gt = torch.tensor([[0, 0, 10, 10]] * 6, dtype=torch.float32, device=device)
    logits = torch.tensor([_logits_with_ce(lab, c, 2) for lab, c in zip(labels, ce)], device=device)
    w = isr_p_weights(logits, torch.zeros(6, 12, device=device), torch.tensor(labels, device=device), rois, gt,
                      torch.tensor(gt_ids, device=device), CODER)
    assert w.dtype == torch.float32 and w.device.type == torch.device(device).type
    expected = torch.tensor([3.3105, 1.1918, 0.1324, 2.1187, 0.5297, 3.3105])
    torch.testing.assert_close(w.cpu(), expected, atol=1e-4, rtol=0)
    got_ce = F.cross_entropy(logits, torch.tensor(labels, device=device), reduction="none")
    torch.testing.assert_close(got_ce.cpu(), torch.tensor(ce), atol=1e-5, rtol=0)  # the case's CE, built right


def test_isr_p_uses_the_regressed_box():
    """The IoU of decode(roi, deltas of the label), not of the RoI: deltas that move p1 onto its GT make it
    the top of its group (swap with p0)."""
    rois = torch.tensor([[0, 0, 10, 9], [0, 0, 10, 8]], dtype=torch.float32)
    gt = torch.tensor([[0, 0, 10, 10]] * 2, dtype=torch.float32)
    logits = torch.zeros(2, 2)
    labels = torch.tensor([1, 1])
    plain = isr_p_weights(logits, torch.zeros(2, 8), labels, rois, gt, torch.tensor([0, 0]), CODER)
    deltas = torch.zeros(2, 8)
    # class-1 deltas of row 1: dy so that y-centre moves from 4 to 5, dh = 5 log(10 / 8): exactly the GT
    deltas[1, 5] = 10 * (1 / 8)
    deltas[1, 7] = 5 * math.log(10 / 8)
    deltas[1, 1] = 100.0  # class-0 deltas are ignored
    moved = isr_p_weights(logits, deltas, labels, rois, gt, torch.tensor([0, 0]), CODER)
    assert plain[0] > plain[1] and moved[1] > moved[0]


def test_isr_p_gt_ids_are_global():
    """Two GTs of the same class with the same per-image index but different global ids rank separately."""
    rois = torch.tensor([[0, 0, 10, 9], [0, 0, 10, 8], [0, 0, 10, 7]], dtype=torch.float32)
    gt = torch.tensor([[0, 0, 10, 10]] * 3, dtype=torch.float32)
    args = (torch.zeros(3, 2), torch.zeros(3, 8), torch.tensor([1, 1, 1]), rois, gt)
    shared = isr_p_weights(*args, torch.tensor([0, 0, 0]), CODER)
    separate = isr_p_weights(*args, torch.tensor([0, 0, 5]), CODER)
    # one GT: rho 0 1 2 -> u 1 2/3 1/3; two GTs: rho 0 1 | 0 -> R 0 2 1 -> u 1 1/3 2/3 (k 2, then normalised)
    assert shared[1] > shared[2] and separate[2] > separate[1]


# ----------------------------------------------------------------------------------------------
# rivals.md section 6, case 6: CARL
# ----------------------------------------------------------------------------------------------

def _carl_inputs(dtype=torch.float32, device="cpu"):
    """4 RoIs, 2 positives (labels 1 and 2) with GT-class probability .8 and .3 and SmoothL1 sums .4 and 1.0."""
    logits = torch.tensor([[math.log(0.2), math.log(0.8), -100.0],
                           [math.log(0.7), -100.0, math.log(0.3)],
                           [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=dtype, device=device)
    deltas = torch.zeros(4, 12, dtype=dtype, device=device)
    deltas[0, 4:8] = torch.tensor([math.sqrt(0.8), 0.0, 0.0, 0.0])  # 0.5 * 0.8 = 0.4
    deltas[1, 8:12] = torch.tensor([1.5, 0.0, 0.0, 0.0])  # 1.5 - 0.5 = 1.0
    deltas[2, 0:4] = 7.0  # background rows: never in the loss
    deltas[3, 0:4] = 7.0
    labels = torch.tensor([1, 2, 0, 0], device=device)
    targets = torch.zeros(4, 4, dtype=dtype, device=device)
    return logits, deltas, labels, targets


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_case6_carl(device):
    logits, deltas, labels, targets = _carl_inputs(device=device)
    loss = carl_loss(logits, deltas, labels, targets, 4)
    assert loss.shape == ()
    # c = (.2 + .8 p) -> .84, .44 -> 2 c / 1.28 = 1.3125, .6875; L = (1.3125 .4 + .6875 1.0) / 4
    assert abs(float(loss) - 0.303125) < 1e-5


def test_carl_gradient_flows_through_the_weights():
    logits, deltas, labels, targets = _carl_inputs(torch.float64)
    logits.requires_grad_(True)
    deltas.requires_grad_(True)
    loss = carl_loss(logits, deltas, labels, targets, 4)
    loss.backward()
    # Positive rows' logits get gradient (through c, incl. its normalisation); background rows none.
    assert logits.grad[:2].abs().sum() > 1e-3 and logits.grad[2:].abs().sum() == 0
    assert deltas.grad[2:].abs().sum() == 0 and deltas.grad[0, :4].abs().sum() == 0  # only the label's deltas
    # The same loss with c computed from detached probabilities has no logit gradient at all: the
    # non-zero gradient above is the weights'. And it is the one of the formula, by autograd.
    p = torch.softmax(logits.detach(), 1)[[0, 1], [1, 2]].requires_grad_(True)
    c = 0.2 + 0.8 * p
    c = 2 * c / c.sum()
    formula = (c * torch.tensor([0.4, 1.0], dtype=torch.float64)).sum() / 4
    (dp,) = torch.autograd.grad(formula, p)
    probs = torch.softmax(logits.detach(), 1)
    for row, cls in ((0, 1), (1, 2)):  # chain rule through the softmax of each positive row
        jac = probs[row, cls] * ((torch.arange(3) == cls).double() - probs[row])
        torch.testing.assert_close(logits.grad[row], dp[row] * jac)
    # Finite differences agree with autograd (k and bias away from the defaults too).
    for k, bias in ((1.0, 0.2), (2.0, 0.5)):
        assert torch.autograd.gradcheck(
            lambda lg, dl: carl_loss(lg, dl, labels, targets, 4, k=k, bias=bias),
            (logits.detach().clone().requires_grad_(True), deltas.detach().clone().requires_grad_(True)))


def test_carl_without_positives_is_an_attached_zero():
    logits = torch.randn(3, 3, requires_grad=True)
    deltas = torch.randn(3, 12, requires_grad=True)
    loss = carl_loss(logits, deltas, torch.zeros(3, dtype=torch.int64), torch.zeros(3, 4), 3)
    assert loss.detach().item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad.abs().sum() == 0


# ----------------------------------------------------------------------------------------------
# Independent reference (rivals.md section 4, plain loops)
# ----------------------------------------------------------------------------------------------

def ref_decode(box, d):
    """torchvision/MM delta decode written out: weights (10, 10, 5, 5), dw/dh clipped at log(1000/16)."""
    clip = math.log(1000.0 / 16)
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = box[0] + 0.5 * w, box[1] + 0.5 * h
    dx, dy = d[0] / BOX_WEIGHTS[0], d[1] / BOX_WEIGHTS[1]
    dw, dh = min(d[2] / BOX_WEIGHTS[2], clip), min(d[3] / BOX_WEIGHTS[3], clip)
    px, py, pw, ph = cx + dx * w, cy + dy * h, math.exp(dw) * w, math.exp(dh) * h
    return [px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph]


def ref_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_softmax(row):
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return [x / sum(e) for x in e]


def ref_nms_match(order, boxes, thr):
    """Greedy nms_match: visit ``order`` (score descending); each unabsorbed box opens a group and absorbs
    every later unabsorbed box with IoU >= thr. Returns the groups, members in visit order."""
    absorbed, groups = set(), []
    for pos, i in enumerate(order):
        if i in absorbed:
            continue
        group = [i]
        for j in order[pos + 1:]:
            if j not in absorbed and ref_iou(boxes[i], boxes[j]) >= thr:
                absorbed.add(j)
                group.append(j)
        groups.append(group)
    return groups


def ref_isr_select(batch, logits, deltas, width, fraction, k, bias, score_thresh, iou_thresh, uniforms):
    """Per image: (sorted positive rows, [(negative row, weight)] with the Score-HLR picks in R order, then the
    random picks by row)."""
    image, label = batch.image.tolist(), batch.label.tolist()
    boxes, uniforms = batch.boxes.double().tolist(), uniforms.tolist()
    logits, deltas = logits.double().tolist(), deltas.double().tolist()
    out = []
    for b in range(batch.num_images):
        rows = [e for e in range(len(image)) if image[e] == b]
        pos = [e for e in rows if label[e] == 1]
        q_pos = int(width * fraction)
        if len(pos) > q_pos:
            pos = sorted(pos, key=lambda e: uniforms[e])[:q_pos]
        neg = [e for e in rows if label[e] == 0]
        q = min(len(neg), width - len(pos))
        score, cls, ce = {}, {}, {}
        for e in neg:
            p = ref_softmax(logits[e])
            cls[e] = max(range(1, len(p)), key=lambda c: p[c])
            score[e], ce[e] = p[cls[e]], -math.log(p[0])
        valid = [e for e in neg if score[e] > score_thresh]
        invalid = [e for e in neg if score[e] <= score_thresh]
        h = min(len(valid), q)
        r = q - h
        if not valid:
            out.append((sorted(pos), [(e, 1.0) for e in sorted(sorted(neg, key=lambda e: uniforms[e])[:q])]))
            continue
        decoded = {e: ref_decode(boxes[e], deltas[e][4 * cls[e]:4 * cls[e] + 4]) for e in valid}
        order = sorted(valid, key=lambda e: -score[e])
        rho = {}
        for group in ref_nms_match(order, decoded, iou_thresh):
            for local, e in enumerate(group):
                rho[e] = local
        imp = {e: len(valid) - rho[e] + score[e] for e in valid}
        by_rank = sorted(valid, key=lambda e: -imp[e])
        upper = max(q, len(valid))
        u = {e: (upper - rank) / upper for rank, e in enumerate(by_rank[:h])}
        picks = by_rank[:h]
        rand = sorted(sorted(invalid, key=lambda e: uniforms[e])[:r])
        for e in rand:
            u[e] = min(u[x] for x in picks)
        picks = picks + rand
        w = {e: (bias + (1 - bias) * u[e]) ** k for e in picks}
        ratio = sum(ce[e] for e in picks) / sum(w[e] * ce[e] for e in picks)
        out.append((sorted(pos), [(e, w[e] * ratio) for e in picks]))
    return out


def random_setup(seed, device, sizes=((50, 2), (10, 1), (30, 3)), num_classes=3, bg_offsets=((-1, 4), (3, 7),
                                                                                             (-1, 5))):
    """A batch of proposals jittered around random GTs (many overlaps, distinct scores) and fixed head outputs;
    ``bg_offsets`` per image: range of the background logit's offset (high: mostly invalid negatives)."""
    g = torch.Generator().manual_seed(seed)
    proposals, gts, labels = [], [], []
    for n, m in sizes:
        xy = torch.rand(m, 2, generator=g) * 60
        gt = torch.cat([xy, xy + 10 + torch.rand(m, 2, generator=g) * 30], 1)
        if m:
            pick = torch.randint(m, (n,), generator=g)
            wh = (gt[pick, 2:] - gt[pick, :2]).repeat(1, 2)
            jitter = gt[pick] + torch.randn(n, 4, generator=g) * wh * 0.25
        else:  # no GT: boxes anywhere, all negatives
            jitter = torch.rand(n, 4, generator=g) * 80
        proposals.append(torch.cat([torch.minimum(jitter[:, :2], jitter[:, 2:]),
                                    torch.maximum(jitter[:, :2], jitter[:, 2:]) + 0.5], 1).to(device))
        gts.append(gt.to(device))
        labels.append(torch.randint(1, num_classes + 1, (m,), generator=g).to(device))
    batch = match_examples(proposals, gts, labels, 0.5, 0.5)
    count = batch.boxes.shape[0]
    logits = torch.randn(count, num_classes + 1, generator=g) * 1.5
    low = torch.tensor([lo for (n, m), (lo, hi) in zip(sizes, bg_offsets) for _ in range(n)] +
                       [0.0] * (count - sum(n for n, _ in sizes)))
    span = torch.tensor([hi - lo for (n, m), (lo, hi) in zip(sizes, bg_offsets) for _ in range(n)] +
                        [0.0] * (count - sum(n for n, _ in sizes)))
    logits[:, 0] += low + span * torch.rand(count, generator=g)
    deltas = torch.randn(count, 4 * (num_classes + 1), generator=g) * 0.5
    return batch, logits.to(device), deltas.to(device)


def _as_lists(out, batch):
    result = []
    for b in range(batch.num_images):
        p, n = int(out.num_pos[b]), int(out.num_neg[b])
        rows, weights = out.indices[b].tolist(), out.weights[b].tolist()
        result.append((sorted(rows[:p]), [(rows[p + i], weights[p + i]) for i in range(n)]))
    return result


REFERENCE_CASES = [  # seed, width, fraction, k, bias, score_thresh, iou_thresh
    (0, 24, 0.25, 0.5, 0.0, 0.05, 0.5),
    (1, 24, 0.25, 0.5, 0.0, 0.05, 0.5),
    (2, 32, 0.5, 2.0, 0.2, 0.1, 0.3),
    (3, 12, 0.25, 1.0, 0.0, 0.05, 0.7),
    (4, 64, 0.25, 0.5, 0.0, 0.05, 0.5),
]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_matches_reference(device, case):
    seed, width, fraction, k, bias, score_thresh, iou_thresh = case
    batch, logits, deltas = random_setup(seed, device)
    kwargs = dict(k=k, bias=bias, score_thresh=score_thresh, iou_thresh=iou_thresh)
    out = isr_select(batch, FakeScorer(logits, deltas), CODER, width, fraction,
                     generator=_generator(device, 100 + seed), **kwargs)
    uniforms = torch.rand(batch.boxes.shape[0], dtype=torch.float64, device=device,
                          generator=_generator(device, 100 + seed)).cpu()
    ref = ref_isr_select(batch, logits.cpu(), deltas.cpu(), width, fraction, k, bias, score_thresh, iou_thresh,
                         uniforms)
    got = _as_lists(out, batch)
    regimes = set()
    for (gp, gn), (rp, rn) in zip(got, ref):
        assert gp == rp
        assert [e for e, _ in gn] == [e for e, _ in rn]
        torch.testing.assert_close(torch.tensor([w for _, w in gn]), torch.tensor([w for _, w in rn],
                                                                                   dtype=torch.float32),
                                   rtol=1e-5, atol=1e-6)
        weights = {round(w, 5) for _, w in rn}
        regimes.add("weighted" if len(weights) > 1 else "flat")
    assert "weighted" in regimes  # the case exercises the ranking, not only uniform draws


def test_reference_cases_cover_the_regimes():
    """Across the reference cases: images with more and with fewer negatives than q-, with random picks of
    invalid negatives next to Score-HLR picks, and with more positives than q+ (the test above is not vacuous)."""
    seen = set()
    for seed, width, fraction, k, bias, score_thresh, iou_thresh in REFERENCE_CASES:
        batch, logits, deltas = random_setup(seed, "cpu")
        uniforms = torch.rand(batch.boxes.shape[0], dtype=torch.float64,
                              generator=_generator("cpu", 100 + seed))
        ref = ref_isr_select(batch, logits, deltas, width, fraction, k, bias, score_thresh, iou_thresh, uniforms)
        probs = torch.softmax(logits.double(), 1)[:, 1:].max(1).values
        for b, (pos, neg) in enumerate(ref):
            in_image = batch.image == b
            n_pos = int((in_image & (batch.label == 1)).sum())
            negatives = in_image & (batch.label == 0)
            seen.add("pos>q+" if n_pos > int(width * fraction) else "pos<=q+")
            seen.add("n>q-" if int(negatives.sum()) > width - len(pos) else "n<=q-")
            picked = torch.tensor([e for e, _ in neg], dtype=torch.int64)
            if picked.numel() and bool((probs[picked] <= score_thresh).any()) and \
                    bool((probs[picked] > score_thresh).any()):
                seen.add("random+hlr")
    assert seen >= {"pos>q+", "pos<=q+", "n>q-", "n<=q-", "random+hlr"}, seen


def ref_isr_p(logits, deltas, labels, rois, gts, gt_ids, k, bias):
    logits, deltas, rois, gts = (t.double().tolist() for t in (logits, deltas, rois, gts))
    labels, gt_ids = labels.tolist(), gt_ids.tolist()
    count = len(labels)
    iou = [ref_iou(ref_decode(rois[i], deltas[i][4 * labels[i]:4 * labels[i] + 4]), gts[i]) for i in range(count)]
    n_max = max(labels.count(c) for c in set(labels))
    u = [0.0] * count
    for c in set(labels):
        members = [i for i in range(count) if labels[i] == c]
        key = {}
        for t in {gt_ids[i] for i in members}:
            group = sorted([i for i in members if gt_ids[i] == t], key=lambda i: -iou[i])
            for rho, i in enumerate(group):
                key[i] = iou[i] + n_max - rho
        for rank, i in enumerate(sorted(members, key=lambda i: -key[i])):
            u[i] = (n_max - rank) / n_max
    w = [(bias + (1 - bias) * x) ** k for x in u]
    ce = [-math.log(ref_softmax(logits[i])[labels[i]]) for i in range(count)]
    ratio = sum(ce) / sum(a * b for a, b in zip(w, ce))
    return [a * ratio for a in w]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed,k,bias", [(0, 2.0, 0.0), (1, 2.0, 0.0), (2, 1.0, 0.3)])
def test_isr_p_matches_reference(device, seed, k, bias):
    g = torch.Generator().manual_seed(seed)
    num_gt, count, num_classes = 7, 60, 3
    xy = torch.rand(num_gt, 2, generator=g) * 50
    gt = torch.cat([xy, xy + 10 + torch.rand(num_gt, 2, generator=g) * 20], 1)
    gt_class = torch.randint(1, num_classes + 1, (num_gt,), generator=g)
    gt_ids = torch.randint(num_gt, (count,), generator=g)
    wh = (gt[gt_ids, 2:] - gt[gt_ids, :2]).repeat(1, 2)
    rois = gt[gt_ids] + torch.randn(count, 4, generator=g) * wh * 0.1
    rois = torch.cat([torch.minimum(rois[:, :2], rois[:, 2:]), torch.maximum(rois[:, :2], rois[:, 2:]) + 0.5], 1)
    logits = torch.randn(count, num_classes + 1, generator=g)
    deltas = torch.randn(count, 4 * (num_classes + 1), generator=g) * 0.3
    labels = gt_class[gt_ids]
    ref = ref_isr_p(logits, deltas, labels, rois, gt[gt_ids], gt_ids, k, bias)
    to = dict(device=device)
    w = isr_p_weights(logits.to(**to), deltas.to(**to), labels.to(**to), rois.to(**to), gt[gt_ids].to(**to),
                      gt_ids.to(**to), CODER, k=k, bias=bias)
    torch.testing.assert_close(w.cpu(), torch.tensor(ref, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert len({round(x, 4) for x in ref}) > 10  # distinct weights: the ranking is exercised
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert abs(float((w.cpu() * ce).sum() - ce.sum())) < 1e-4  # loss-preserving


# ----------------------------------------------------------------------------------------------
# Invariants, special cases, statistics
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed,width,fraction", [(5, 16, 0.25), (6, 40, 0.5), (7, 8, 1.0), (8, 20, 0.0)])
def test_invariants(device, seed, width, fraction):
    batch, logits, deltas = random_setup(seed, device, sizes=((40, 2), (0, 2), (25, 0), (15, 1)),
                                         bg_offsets=((-1, 4), (0, 1), (-1, 5), (4, 8)))
    out = isr_select(batch, FakeScorer(logits, deltas), CODER, width, fraction, generator=_generator(device, seed))
    ce = F.cross_entropy(logits.float(), torch.zeros(len(logits), dtype=torch.int64, device=device),
                         reduction="none").cpu()
    assert out.indices.shape == (4, width) and out.weights.dtype == torch.float32
    image, label, matched = batch.image.cpu(), batch.label.cpu(), batch.matched_gt.cpu()
    for b in range(4):
        p, n = int(out.num_pos[b]), int(out.num_neg[b])
        rows = out.indices[b].cpu()
        w = out.weights[b].cpu()
        picked = rows[:p + n]
        assert (rows[p + n:] == -1).all() and (w[p + n:] == 0).all()
        assert len(set(picked.tolist())) == p + n
        assert (image[picked] == b).all()
        assert (label[rows[:p]] == 1).all() and (label[rows[p:p + n]] == 0).all()
        n_pos = int(((image == b) & (label == 1)).sum())
        n_neg = int(((image == b) & (label == 0)).sum())
        assert p == min(n_pos, int(width * fraction))
        assert n == min(n_neg, width - p)
        assert (w[:p] == 1).all() and (w[p:p + n] > 0).all()
        assert (out.matched_gt[b, :p].cpu() == matched[rows[:p]]).all() and (out.matched_gt[b, p:] == -1).all()
        if n:
            neg = rows[p:p + n]
            assert abs(float((w[p:p + n].double() * ce[neg]).sum() - ce[neg].double().sum())) < 1e-4


def test_no_valid_negative_means_uniform_with_weight_1():
    batch, scorer = _one_class_batch(CASE4_BOXES, [0.01, 0.02, 0.03, 0.04, 0.05, 0.001], "cpu")
    out = isr_select(batch, scorer, CODER, 5, 0.25, generator=_generator("cpu", 3))
    assert out.num_neg.tolist() == [4] and (out.weights[0, 1:] == 1).all()
    seen = set()
    g = _generator("cpu", 4)
    for _ in range(30):
        seen.update(isr_select(batch, scorer, CODER, 5, 0.25, generator=g).indices[0, 1:].tolist())
    assert seen == set(range(6))


def test_same_seed_same_result_and_generator_advances():
    batch, logits, deltas = random_setup(9, "cpu")
    a = isr_select(batch, FakeScorer(logits, deltas), CODER, 16, generator=_generator("cpu", 1))
    b = isr_select(batch, FakeScorer(logits, deltas), CODER, 16, generator=_generator("cpu", 1))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    g = _generator("cpu", 1)
    first = isr_select(batch, FakeScorer(logits, deltas), CODER, 16, generator=g)
    second = isr_select(batch, FakeScorer(logits, deltas), CODER, 16, generator=g)
    assert not torch.equal(first.indices, second.indices)


def _inclusion_chi2(counts, trials, picked):
    """Chi-square p-value of inclusion counts of a uniform ``picked``-subset of ``len(counts)`` items: with
    p = picked / m, Cov = T p (1-p) m / (m-1) (I - 11^T / m), so sum((O - Tp)^2) / (T p (1-p) m / (m-1)) is
    chi-square with m - 1 degrees of freedom."""
    m = len(counts)
    p = picked / m
    stat = sum((c - trials * p) ** 2 for c in counts) / (trials * p * (1 - p) * m / (m - 1))
    return stats.chi2.sf(stat, m - 1)


def test_statistics_uniform_positives_and_random_invalid_picks():
    """Images are sampled independently, so one call on many copies gives many draws (20 calls x 100 copies).
    Image A: 10 positives (9 proposals + the GT copy), q+ = int(16 x .25) = 4: each in with probability .4,
    uniformly; its 2 negatives are invalid. Image B (no GT): 2 valid + 20 invalid negatives, q- = 16: both
    valid always first, 14 of the 20 invalid uniformly, all random picks weighted alike (u = 15/16)."""
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    image_a = torch.cat([torch.tensor([[0.0, 0.0, 10.0, 10.0 - 0.3 * i] for i in range(9)]),
                         torch.tensor([[50.0 + 12 * i, 50.0, 60.0 + 12 * i, 60.0] for i in range(2)])])
    image_b = torch.tensor([[12.0 * i, 0.0, 12.0 * i + 10, 10.0] for i in range(22)])
    copies = 100
    batch = match_examples([image_a, image_b] * copies, [gt, torch.zeros(0, 4)] * copies,
                           [torch.tensor([1]), torch.zeros(0, dtype=torch.int64)] * copies, 0.5, 0.5)
    count = batch.boxes.shape[0]
    # local index of each row in its image: proposals in order, then the GT copy
    local = torch.empty(count, dtype=torch.int64)
    for b in range(batch.num_images):
        rows = (batch.image == b).nonzero().squeeze(1)
        local[rows] = torch.arange(rows.numel())
    is_b = (batch.image % 2 == 1)
    s = torch.full((count,), 0.01)
    s[is_b & (local < 2)] = torch.tensor([0.9, 0.8]).repeat(copies)  # image B's first two proposals: valid
    scorer = FakeScorer(torch.stack([torch.log1p(-s), torch.log(s)], 1), torch.zeros(count, 8))
    assert batch.label[~is_b].eq(1).sum() == 10 * copies and batch.label[is_b].eq(0).all()

    calls = 20
    trials = calls * copies
    pos_counts, inv_counts = [0] * 10, [0] * 20
    g = _generator("cpu", 1234)
    for _ in range(calls):
        out = isr_select(batch, scorer, CODER, 16, 0.25, generator=g)
        assert out.num_pos.tolist() == [4, 0] * copies and out.num_neg.tolist() == [2, 16] * copies
        pos_picks = local[out.indices[0::2, :4]]  # local 0..8 proposals, 11 the GT copy
        for e in pos_picks.flatten().tolist():
            pos_counts[e if e < 9 else 9] += 1
        negs = local[out.indices[1::2, :16]]
        assert (negs[:, :2] == torch.tensor([0, 1])).all()
        rand_w = out.weights[1::2, 2:16]
        assert torch.allclose(rand_w, rand_w[:, :1].expand(-1, 14))
        for e in negs[:, 2:].flatten().tolist():
            inv_counts[e - 2] += 1
    # The weights of image B: u = 1, 15/16 (valid), 15/16 (random); sqrt, normalised.
    ce = -torch.log1p(-torch.tensor([0.9, 0.8] + [0.01] * 14, dtype=torch.float64))
    w = torch.tensor([1.0, 15 / 16] + [15 / 16] * 14, dtype=torch.float64).sqrt()
    torch.testing.assert_close(out.weights[1, :16].double(), w * ce.sum() / (w * ce).sum(), rtol=1e-5, atol=0)
    assert _inclusion_chi2(pos_counts, trials, 4) > ALPHA, pos_counts
    assert _inclusion_chi2(inv_counts, trials, 14) > ALPHA, inv_counts


def test_statistics_detect_a_biased_pick():
    """The chi-square above rejects a sampler that prefers low rows (its power on these counts)."""
    trials = 2000
    g = torch.Generator().manual_seed(0)
    counts = [0] * 10
    for _ in range(trials):
        keys = torch.rand(10, generator=g) + torch.arange(10) * 0.03
        for i in torch.argsort(keys)[:4].tolist():
            counts[i] += 1
    assert _inclusion_chi2(counts, trials, 4) < ALPHA


# ----------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size_per_image=0), "batch_size_per_image"),
    (dict(batch_size_per_image=2.5), "batch_size_per_image"),
    (dict(positive_fraction=1.5), "positive_fraction"),
    (dict(positive_fraction=float("nan")), "positive_fraction"),
    (dict(k=-0.5), "k must"),
    (dict(k=float("inf")), "k must"),
    (dict(bias=-0.1), "bias"),
    (dict(score_thresh=1.1), "score_thresh"),
    (dict(iou_thresh=-0.1), "iou_thresh"),
])
def test_isr_select_bad_args(kwargs, match):
    batch, scorer = _one_class_batch(CASE4_BOXES, CASE4_SCORES, "cpu")
    with pytest.raises(ValueError, match=match):
        isr_select(batch, scorer, CODER, **{"batch_size_per_image": 5, **kwargs})


@pytest.mark.parametrize("logits_shape,deltas_shape,match", [
    ((6, 1), (6, 4), "class_logits"),
    ((5, 2), (6, 8), "class_logits"),
    ((6, 2), (6, 4), "box_regression"),
])
def test_isr_select_bad_scorer_outputs(logits_shape, deltas_shape, match):
    batch, _ = _one_class_batch(CASE4_BOXES, CASE4_SCORES, "cpu")

    def scorer(rows):
        return torch.zeros(logits_shape), torch.zeros(deltas_shape)
    with pytest.raises(ValueError, match=f"scorer: {match}"):
        isr_select(batch, scorer, CODER, 5)


def test_isr_p_bad_args():
    logits, deltas = torch.zeros(2, 3), torch.zeros(2, 12)
    labels, boxes, ids = torch.tensor([1, 2]), torch.zeros(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="labels must be fg classes in 1..2"):
        isr_p_weights(logits, deltas, torch.tensor([0, 1]), boxes, boxes, ids, CODER)
    with pytest.raises(ValueError, match="labels must be fg classes"):
        isr_p_weights(logits, deltas, torch.tensor([1, 3]), boxes, boxes, ids, CODER)
    with pytest.raises(ValueError, match="box_regression"):
        isr_p_weights(logits, torch.zeros(2, 8), labels, boxes, boxes, ids, CODER)
    with pytest.raises(ValueError, match="rois"):
        isr_p_weights(logits, deltas, labels, torch.zeros(3, 4), boxes, ids, CODER)
    with pytest.raises(ValueError, match="gt_boxes"):
        isr_p_weights(logits, deltas, labels, boxes, torch.zeros(2, 5), ids, CODER)
    with pytest.raises(ValueError, match="gt_ids"):
        isr_p_weights(logits, deltas, labels, boxes, boxes, torch.tensor([0]), CODER)
    with pytest.raises(ValueError, match="k must"):
        isr_p_weights(logits, deltas, labels, boxes, boxes, ids, CODER, k=-1.0)
    with pytest.raises(ValueError, match="bias"):
        isr_p_weights(logits, deltas, labels, boxes, boxes, ids, CODER, bias=2.0)
    empty = isr_p_weights(torch.zeros(0, 3), torch.zeros(0, 12), torch.zeros(0, dtype=torch.int64),
                          torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), CODER)
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_carl_bad_args():
    logits, deltas, labels, targets = _carl_inputs()
    with pytest.raises(ValueError, match="num_rois must count every sampled RoI"):
        carl_loss(logits, deltas, labels, targets, 1)
    with pytest.raises(ValueError, match="num_rois"):
        carl_loss(logits, deltas, labels, targets, -1)
    with pytest.raises(ValueError, match="regression_targets"):
        carl_loss(logits, deltas, labels, torch.zeros(4, 3), 4)
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        carl_loss(logits, deltas, torch.tensor([1, 3, 0, 0]), targets, 4)
    with pytest.raises(ValueError, match="k must"):
        carl_loss(logits, deltas, labels, targets, 4, k=-1.0)
    with pytest.raises(ValueError, match="bias"):
        carl_loss(logits, deltas, labels, targets, 4, bias=1.5)
    with pytest.raises(ValueError, match="beta"):
        carl_loss(logits, deltas, labels, targets, 4, beta=0.0)
