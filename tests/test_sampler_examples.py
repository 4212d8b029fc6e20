"""The rival samplers' common input and output: match_examples against torchvision's box_iou and
Matcher, pack_selection against a per-image reading of the op's layout."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

from overlap_sampler.sampling.examples import match_examples, pack_selection


def _boxes(n, generator, size=100.0):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * 40 + 1
    return torch.cat([xy, xy + wh], 1)


def _batch(counts, gts, seed=0):
    g = torch.Generator().manual_seed(seed)
    proposals = [_boxes(n, g) for n in counts]
    gt = [_boxes(m, g) for m in gts]
    labels = [torch.randint(1, 5, (m,), generator=g) for m in gts]
    return proposals, gt, labels


@pytest.mark.parametrize("seed", range(5))
def test_match_examples_equals_torchvision_per_image(seed):
    counts, gts = [30, 0, 45, 12], [3, 2, 0, 5]
    proposals, gt, labels = _batch(counts, gts, seed)
    # Make some IoUs land between the thresholds and exactly on them.
    batch = match_examples(proposals, gt, labels, 0.6, 0.4)
    matcher = det_utils.Matcher(0.6, 0.4, allow_low_quality_matches=False)
    n_total = sum(counts)
    p0 = g0 = 0
    for b, (p, t) in enumerate(zip(proposals, gt)):
        rows = list(range(p0, p0 + counts[b])) + list(range(n_total + g0, n_total + g0 + gts[b]))
        rows = torch.tensor(rows, dtype=torch.int64)
        examples = torch.cat([p, t])
        assert torch.equal(batch.image[rows], torch.full((len(rows),), b))
        assert torch.equal(batch.boxes[rows], examples)
        if t.shape[0] == 0:
            assert torch.all(batch.iou[rows] == 0) and torch.all(batch.matched_gt[rows] == -1)
            assert torch.all(batch.label[rows] == 0)
        else:
            iou = box_iou(t, examples)
            m = matcher(iou)
            want_iou = iou.max(0).values
            torch.testing.assert_close(batch.iou[rows], want_iou, rtol=0, atol=1e-6)
            is_copy = torch.arange(len(rows)) >= counts[b]
            want_label = torch.where(m >= 0, 1, torch.where(m == -1, 0, -1))
            want_label[is_copy] = 1
            assert torch.equal(batch.label[rows], want_label)
            matched_local = batch.matched_gt[rows] - g0
            own = torch.arange(gts[b])
            assert torch.equal(matched_local[is_copy], own)
            assert torch.equal(matched_local[~is_copy], iou[:, ~is_copy].argmax(0))
        p0 += counts[b]
        g0 += gts[b]
    assert torch.equal(batch.gt_labels, torch.cat(labels))
    assert torch.equal(batch.is_gt_copy(), torch.arange(batch.boxes.shape[0]) >= n_total)


def test_pack_selection_puts_each_images_positives_first_in_the_given_order():
    proposals, gt, labels = _batch([20, 10, 15], [2, 1, 3], seed=3)
    batch = match_examples(proposals, gt, labels, 0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    rows = torch.randperm(batch.boxes.shape[0], generator=g)[:25]
    rows = rows[batch.label[rows] >= 0]
    weights = torch.rand(rows.shape[0], generator=g)
    out = pack_selection(batch, rows, weights, width=30)
    for b in range(3):
        mine = [(int(r), float(w)) for r, w in zip(rows, weights) if int(batch.image[r]) == b]
        pos = [x for x in mine if int(batch.label[x[0]]) == 1]
        neg = [x for x in mine if int(batch.label[x[0]]) == 0]
        want = pos + neg
        n = len(want)
        assert out.indices[b, :n].tolist() == [r for r, _ in want]
        assert torch.all(out.indices[b, n:] == -1) and torch.all(out.weights[b, n:] == 0)
        assert out.weights[b, :n].tolist() == pytest.approx([w for _, w in want])
        assert out.matched_gt[b, :len(pos)].tolist() == [int(batch.matched_gt[r]) for r, _ in pos]
        assert torch.all(out.matched_gt[b, len(pos):] == -1)
        assert (int(out.num_pos[b]), int(out.num_neg[b])) == (len(pos), len(neg))


def test_pack_selection_refuses_more_picks_than_the_width():
    proposals, gt, labels = _batch([20], [2])
    batch = match_examples(proposals, gt, labels, 0.5, 0.5)
    with pytest.raises(ValueError, match="more than the output width 5"):
        pack_selection(batch, torch.arange(6), torch.ones(6), width=5)
