"""`analyze upper-bound` (the paper's Table 1): the oracles on hand-built boxes with a known NMS outcome,
the rescoring hook against torchvision's postprocess, and the command on a tiny trained checkpoint.

No test asserts that an oracle row is >= the model's row: it need not be. Rescoring changes which
boxes NMS keeps, and a box it revives can be a worse one (see
test_zeroing_negatives_can_lower_ap75), so only what holds by construction is asserted end to end.
"""

from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch

from overlap_sampler.analysis.upper_bound import (
    ORACLES,
    ROWS,
    candidate_detections,
    format_rows,
    gt_iou,
    install_oracles,
    overlapped,
    rescore,
    select_detections,
)
from overlap_sampler.cli import main

# One image, ground truth g = [0, 0, 10, 10] of class 1. Class-1 candidates stacked on it:
#   p1 [0,0,10,8] IoU_g 0.8, p2 [0,0,10,6] IoU_g 0.6 (positives), n1 [0,0,10,4] IoU_g 0.4 (negative);
#   IoU(p1,p2) = 0.75, IoU(p2,n1) = 2/3, IoU(p1,n1) = 0.5 exactly.
#   x [20,20,30,30] class 1, far from everything (negative, not overlapped).
#   c2 [0,0,10,10] class 2: on g, but no ground truth of class 2 (negative; overlaps only other classes).
BOXES = torch.tensor([[0, 0, 10, 8], [0, 0, 10, 6], [0, 0, 10, 4], [20, 20, 30, 30], [0, 0, 10, 10]],
                     dtype=torch.float32)
SCORES = torch.tensor([0.6, 0.7, 0.9, 0.5, 0.3])
LABELS = torch.tensor([1, 1, 1, 1, 2])
GT_BOXES = torch.tensor([[0, 0, 10, 10]], dtype=torch.float32)
GT_LABELS = torch.tensor([1])
P1, P2, N1, X, C2 = range(5)
NMS = 0.55  # the models' default test NMS (paper, Table 2c)


def _kept(scores, nms_thresh=NMS):
    return select_detections(BOXES, scores, LABELS, score_thresh=0.05, nms_thresh=nms_thresh,
                             detections_per_img=100).tolist()


def test_ground_truth_iou_and_overlap_look_at_the_candidates_class():
    assert gt_iou(BOXES, LABELS, GT_BOXES, GT_LABELS).tolist() == pytest.approx([0.8, 0.6, 0.4, 0.0, 0.0])
    assert overlapped(BOXES, LABELS, NMS).tolist() == [True, True, True, False, False]
    # IoU(p1, n1) = 0.5 is not above 0.5; p2 still overlaps both.
    assert overlapped(BOXES, LABELS, 0.5).tolist() == [True, True, True, False, False]
    assert overlapped(BOXES, LABELS, 0.7).tolist() == [True, True, False, False, False]
    assert overlapped(BOXES, LABELS, 0.8).tolist() == [False] * 5


def test_the_model_keeps_the_negative_that_suppresses_p2():
    # n1 (0.9) suppresses p2 (IoU 2/3) but not p1 (IoU 0.5).
    assert _kept(SCORES) == [N1, P1, X, C2]


@pytest.mark.parametrize("oracle, scores, kept", [
    # Every negative 0 (then below the 0.05 threshold): p2 is no longer suppressed and now suppresses p1.
    ("iou_balanced", [0.6, 0.7, 0.0, 0.0, 0.0], [P2]),
    # Positives score their IoU with g, negatives keep theirs: n1 still suppresses p2.
    ("isr", [0.8, 0.6, 0.9, 0.5, 0.3], [N1, P1, X, C2]),
    # Overlapped candidates (p1, p2, n1) score their IoU with g, n1 included; x and c2 keep theirs.
    ("overlap", [0.8, 0.6, 0.4, 0.5, 0.3], [P1, X, N1, C2]),
    # The same with the overlapped negative n1 at 0 (then below the threshold); x and c2 keep theirs.
    ("overlap_neg0", [0.8, 0.6, 0.0, 0.5, 0.3], [P1, X, C2]),
])
def test_each_oracle_on_hand_built_boxes(oracle, scores, kept):
    new = rescore(BOXES, SCORES, LABELS, GT_BOXES, GT_LABELS, oracle, NMS)
    assert new.tolist() == pytest.approx(scores)
    assert _kept(new) == kept
    assert SCORES.tolist() == pytest.approx([0.6, 0.7, 0.9, 0.5, 0.3])  # not changed in place


def test_overlap_oracle_follows_the_nms_threshold():
    # At 0.8 no pair is overlapped: the model's scores, the model's outcome.
    new = rescore(BOXES, SCORES, LABELS, GT_BOXES, GT_LABELS, "overlap", 0.8)
    assert torch.equal(new, SCORES)
    # At 0.7 only p1 and p2 are: n1 keeps 0.9 and suppresses neither (IoU 0.5, 2/3 <= 0.7).
    new = rescore(BOXES, SCORES, LABELS, GT_BOXES, GT_LABELS, "overlap", 0.7)
    assert new.tolist() == pytest.approx([0.8, 0.6, 0.9, 0.5, 0.3])
    assert _kept(new, 0.7) == [N1, P1, X, C2]
    # n1 is not overlapped at 0.7, so the zeroing reading keeps its 0.9 too.
    assert torch.equal(rescore(BOXES, SCORES, LABELS, GT_BOXES, GT_LABELS, "overlap_neg0", 0.7), new)


def test_without_ground_truth():
    empty = torch.zeros(0, 4)
    labels = torch.zeros(0, dtype=torch.int64)
    assert rescore(BOXES, SCORES, LABELS, empty, labels, "iou_balanced", NMS).tolist() == [0.0] * 5
    assert torch.equal(rescore(BOXES, SCORES, LABELS, empty, labels, "isr", NMS), SCORES)
    assert rescore(BOXES, SCORES, LABELS, empty, labels, "overlap", NMS).tolist() == pytest.approx(
        [0.0, 0.0, 0.0, 0.5, 0.3])
    assert rescore(BOXES, SCORES, LABELS, empty, labels, "overlap_neg0", NMS).tolist() == pytest.approx(
        [0.0, 0.0, 0.0, 0.5, 0.3])
    for oracle in ORACLES:  # no candidates
        assert rescore(empty, torch.zeros(0), labels, GT_BOXES, GT_LABELS, oracle, NMS).shape == (0,)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="oracle must be one of iou_balanced, isr, overlap, overlap_neg0; got 'nms'"):
        rescore(BOXES, SCORES, LABELS, GT_BOXES, GT_LABELS, "nms", NMS)
    with pytest.raises(ValueError, match=r"scores and labels \[N\]; got \[5, 4\], \[4\], \[5\]"):
        rescore(BOXES, SCORES[:4], LABELS, GT_BOXES, GT_LABELS, "isr", NMS)
    with pytest.raises(ValueError, match=r"gt_boxes must be \[G, 4\]"):
        rescore(BOXES, SCORES, LABELS, GT_BOXES, torch.tensor([1, 1]), "isr", NMS)


def test_zeroing_negatives_can_lower_ap75():
    """Why the end-to-end test does not assert oracle >= model: with the IoU-balanced oracle the
    hand-built image loses its only detection at IoU >= 0.75 (p1, suppressed by the revived p2)."""
    from pycocotools.coco import COCO

    from overlap_sampler.engine.evaluate import coco_metrics, detections_to_coco

    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": 40, "height": 40}], "categories": [{"id": 1}, {"id": 2}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10],
                                     "area": 100.0, "iscrowd": 0}]}
    coco.createIndex()

    def ap(scores):
        keep = torch.tensor(_kept(scores))
        detections = {"boxes": BOXES[keep], "scores": scores[keep], "labels": LABELS[keep]}
        return coco_metrics(coco, detections_to_coco(detections, 1, [1, 2]), "bbox")

    model = ap(SCORES)
    oracle = ap(rescore(BOXES, SCORES, LABELS, GT_BOXES, GT_LABELS, "iou_balanced", NMS))
    assert oracle["AP50"] > model["AP50"]
    assert oracle["AP75"] < model["AP75"]


def _small_detector():
    from overlap_sampler.detection import build_detector

    torch.manual_seed(0)
    return build_detector("fasterrcnn", 4, backbone="small", min_size=64, max_size=64).eval()


def test_candidates_then_selection_is_torchvisions_postprocess():
    """The oracles' path with the scores unchanged gives exactly torchvision's detections."""
    heads = _small_detector().roi_heads
    generator = torch.Generator().manual_seed(0)
    proposals = []
    for count in (60, 0, 45):
        xy = torch.rand(count, 2, generator=generator) * 50
        proposals.append(torch.cat([xy, xy + 4 + torch.rand(count, 2, generator=generator) * 20], 1))
    total = sum(len(p) for p in proposals)
    class_logits = torch.randn(total, 4, generator=generator) * 2
    box_regression = torch.randn(total, 16, generator=generator) * 0.3
    shapes = [(64, 64), (64, 64), (48, 64)]
    expected = heads.postprocess_detections(class_logits, box_regression, proposals, shapes)
    candidates = candidate_detections(heads, class_logits, box_regression, proposals, shapes)
    assert sum(len(b) for b in expected[0]) > 20  # not vacuous
    for i, (boxes, scores, labels) in enumerate(candidates):
        keep = select_detections(boxes, scores, labels, score_thresh=heads.score_thresh,
                                 nms_thresh=heads.nms_thresh, detections_per_img=heads.detections_per_img)
        assert torch.equal(boxes[keep], expected[0][i])
        assert torch.equal(scores[keep], expected[1][i])
        assert torch.equal(labels[keep], expected[2][i])


def test_the_hook_leaves_the_models_detections_and_is_removed():
    model = _small_detector()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    with torch.no_grad():
        expected = model(images)
        with install_oracles(model, nms_thresh=model.roi_heads.nms_thresh) as hook:
            hook.expect(targets, [(64, 64), (64, 64)])
            actual = model(images)
        assert set(hook.detections) == set(ORACLES)
        assert all(len(hook.detections[o]) == 2 for o in ORACLES)
    for a, b in zip(expected, actual):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert "postprocess_detections" not in vars(model.roi_heads) and model.roi_heads.nms_thresh == 0.55
    # Another threshold inside, the model's own again after, also when the block raises.
    for fails in (False, True):
        with contextlib.suppress(RuntimeError):
            with install_oracles(model, nms_thresh=0.3):
                assert model.roi_heads.nms_thresh == 0.3
                if fails:
                    raise RuntimeError("a failing evaluation")
        assert "postprocess_detections" not in vars(model.roi_heads) and model.roi_heads.nms_thresh == 0.55
    with pytest.raises(ValueError, match="nms_thresh must be an IoU in"):
        install_oracles(model, nms_thresh=1.5)


def test_format_rows():
    rows = {row: {"AP": 0.1 * k, "AP50": 0.2, "AP75": -1.0} for k, row in enumerate(ROWS)}
    assert format_rows(rows).splitlines() == ["row           AP     AP50   AP75",
                                              "model         0.0    20.0   -",
                                              "iou_balanced  10.0   20.0   -",
                                              "isr           20.0   20.0   -",
                                              "overlap       30.0   20.0   -",
                                              "overlap_neg0  40.0   20.0   -"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A checkpoint trained for a few iterations on 64 px synthetic COCO files (its run has a val set)."""
    from overlap_sampler.data import make_synthetic_coco

    root = tmp_path_factory.mktemp("upper_bound")
    train_images, train_ann = make_synthetic_coco(str(root / "data"), num_images=4, image_size=64, seed=0,
                                                  split="train")
    val_images, val_ann = make_synthetic_coco(str(root / "data"), num_images=3, image_size=64, seed=1, split="val")
    # Validated on its training images, where a few iterations already give a nonzero AP to compare.
    assert main(["train", "--train-images", train_images, "--train-annotations", train_ann,
                 "--val-images", train_images, "--val-annotations", train_ann, "--iterations", "40",
                 "--warmup-iters", "5", "--batch-size", "2", "--min-size", "64", "--max-size", "64",
                 "--batch-size-per-image", "32", "--no-eval-at-end", "--no-progress", "--output-dir",
                 str(root / "run"), "--device", "cpu"]) == 0
    return root, str(root / "run" / "last_checkpoint.pth"), val_images, val_ann


def test_command_on_a_tiny_checkpoint(tiny_run, capsys):
    root, checkpoint, val_images, val_ann = tiny_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "--checkpoint", checkpoint, "--output-dir", str(root / "eval"), "--device", "cpu",
                     "--no-progress"]) == 0
        capsys.readouterr()
        # Defaults: the run's own validation set, the model's NMS, analysis/ beside the checkpoint.
        assert main(["analyze", "upper-bound", "--checkpoint", checkpoint, "--device", "cpu", "--no-progress"]) == 0
    evaluated = json.loads((root / "eval" / "eval_last_checkpoint.json").read_text())["bbox"]
    report = json.loads((root / "run" / "analysis" / "upper_bound.json").read_text())
    assert list(report["rows"]) == list(ROWS)
    assert report["nms_thresh"] == 0.55 and report["images"] == 4
    # The model row is eval's box AP: same detector, data, batches and NMS.
    assert report["rows"]["model"] == evaluated and evaluated["AP50"] > 0
    for metrics in report["rows"].values():
        assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(v == -1.0 or 0.0 <= v <= 1.0 for v in metrics.values())
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[0] == "model" and "upper_bound.md" in out
    markdown = (root / "run" / "analysis" / "upper_bound.md").read_text()
    assert all(f"| {row} |" in markdown for row in ROWS)


def test_command_errors_are_one_line(tiny_run, tmp_path, capsys):
    root, checkpoint, val_images, val_ann = tiny_run
    data = ["--val-images", val_images, "--val-annotations", val_ann]
    assert main(["analyze", "upper-bound", "--checkpoint", checkpoint, "--nms-thresh", "2", *data]) == 2
    assert capsys.readouterr().err == ("overlap-sampler analyze: error: nms_thresh must be an IoU in [0, 1], "
                                       "got 2.0\n")
    # An annotation file where upper_bound.json would go is never written over, before any image is run.
    named = tmp_path / "upper_bound.json"
    named.write_text(open(val_ann).read())
    assert main(["analyze", "upper-bound", "--checkpoint", checkpoint, "--val-images", val_images,
                 "--val-annotations", str(named), "--output-dir", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"overlap-sampler analyze: error: writing the upper-bound JSON {named} would "
                          f"overwrite the annotation file {named}") and err.count("\n") == 1
    assert named.read_text() == open(val_ann).read()
    assert main(["analyze", "upper-bound", "--checkpoint", str(tmp_path / "absent.pth"), *data]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", "upper-bound", "--checkpoint", checkpoint, "--val-images", val_images])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # "TorchScript is deprecated"
def test_an_exported_model_is_refused(tmp_path, capsys):
    scripted = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(scripted))
    assert main(["analyze", "upper-bound", "--checkpoint", str(scripted), "--dataset", "synthetic"]) == 2
    assert capsys.readouterr().err == (f"overlap-sampler analyze: error: {scripted} is an exported TorchScript "
                                       "model: the upper bounds rescore the RoI head's candidates inside the model; "
                                       "give the training checkpoint it was exported from\n")
