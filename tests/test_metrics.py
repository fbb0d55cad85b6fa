"""Metrics on hand-made cases whose answers are worked out in the comments, and the plots they feed."""
import csv

import numpy as np
import pytest
import torch

from utils.metrics import (IOU_THRESHOLDS, ConfusionMatrix, ap_per_class, compute_ap, fitness, greedy_match,
                           match_predictions)
from utils.plots import Annotator, colors, plot_distill_masks, plot_images, plot_labels, plot_results

N_THR = 101  # COCO-style recall sampling points 0, 0.01, ..., 1


def evaluate(dets, labels):
    """One image: dets [n, 6] (xyxy, conf, cls), labels [m, 5] (cls, xyxy) -> (tp, ap, p, r, classes)."""
    dets, labels = np.asarray(dets, float).reshape(-1, 6), np.asarray(labels, float).reshape(-1, 5)
    tp = match_predictions(dets, labels, IOU_THRESHOLDS)
    tpc, fpc, p, r, f1, ap, cls = ap_per_class(tp, dets[:, 4], dets[:, 5], labels[:, 0])
    return tp, ap, p, r, cls


def test_perfect_predictions_give_ap_one():
    labels = [[0, 10, 10, 50, 50], [0, 60, 60, 90, 100], [0, 5, 70, 40, 95]]
    dets = [[*b[1:], conf, 0] for b, conf in zip(labels, (0.9, 0.8, 0.7))]
    tp, ap, p, r, _ = evaluate(dets, labels)
    assert tp.all()
    assert np.allclose(ap, 1.0)  # precision 1 at every recall up to 1
    assert p[0] == pytest.approx(1.0) and r[0] == pytest.approx(1.0)


def test_missed_object():
    # 2 labels, 1 exact detection: recall reaches 0.5 at precision 1, recall > 0.5 is never reached.
    # Sampled recall points 0.00..0.50 (51 of 101) have precision 1, the other 50 have 0 -> AP = 51/101.
    labels = [[0, 0, 0, 10, 10], [0, 50, 50, 70, 70]]
    dets = [[0, 0, 10, 10, 0.9, 0]]
    tp, ap, p, r, _ = evaluate(dets, labels)
    assert np.allclose(ap, 51 / N_THR)
    # P stays 1 at any threshold; R is 0.5 below conf 0.9: the best F1 is there.
    assert p[0] == pytest.approx(1.0) and r[0] == pytest.approx(0.5)


def test_duplicate_detection():
    # One label [0, 0, 10, 10]. A: exact (IoU 1), conf 0.8. B: [0, 0, 10, 6] (IoU 0.6), conf 0.9.
    # Matching is by IoU, so A takes the label; B is a false positive and ranks first:
    # ranked (B, A): recall (0, 1), precision (0, 0.5); envelope 0.5 at every recall -> AP = 0.5,
    # at every IoU threshold (A matches at all of them).
    labels = [[0, 0, 0, 10, 10]]
    dets = [[0, 0, 10, 6, 0.9, 0], [0, 0, 10, 10, 0.8, 0]]
    tp, ap, _, _, _ = evaluate(dets, labels)
    assert not tp[0].any() and tp[1].all()
    assert np.allclose(ap, 0.5)
    # The same duplicate ranked after the true positive costs nothing: AP = 1.
    dets = [[0, 0, 10, 6, 0.7, 0], [0, 0, 10, 10, 0.8, 0]]
    _, ap, _, _, _ = evaluate(dets, labels)
    assert np.allclose(ap, 1.0)


def test_two_classes():
    # class 0: one label, found exactly -> AP 1.
    # class 1: two labels; a class-1 detection on the class-0 object (conf 0.95) can only be a false
    # positive, then one exact detection (0.9). Ranked: recall (0, 0.5), precision (0, 0.5); envelope
    # 0.5 for recall <= 0.5 (51 points), 0 beyond -> AP = 0.5 * 51 / 101.
    labels = [[0, 0, 0, 10, 10], [1, 20, 20, 40, 40], [1, 60, 60, 80, 80]]
    dets = [[0, 0, 10, 10, 0.99, 0], [0, 0, 10, 10, 0.95, 1], [20, 20, 40, 40, 0.9, 1]]
    _, ap, _, _, cls = evaluate(dets, labels)
    assert list(cls) == [0, 1]
    assert np.allclose(ap[0], 1.0)
    assert np.allclose(ap[1], 0.5 * 51 / N_THR)
    assert ap[:, 0].mean() == pytest.approx((1 + 0.5 * 51 / N_THR) / 2)


def test_class_without_predictions_and_predictions_without_labels():
    # class 1 has a label but no detection -> AP 0; class 2 has a detection but no label -> ignored.
    labels = [[0, 0, 0, 10, 10], [1, 20, 20, 40, 40]]
    dets = [[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.9, 2]]
    _, ap, _, _, cls = evaluate(dets, labels)
    assert list(cls) == [0, 1]
    assert np.allclose(ap[0], 1.0) and np.allclose(ap[1], 0.0)


def test_compute_ap_envelope():
    # recall (0.5, 1.0), precision (1.0, 0.5): recall <= 0.5 -> 1 (51 points), (0.5, 1] -> 0.5 (50 points)
    ap, mpre, mrec = compute_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5]))
    assert ap == pytest.approx((51 * 1.0 + 50 * 0.5) / N_THR)
    # a dip in precision is filled in by the envelope: (0.25 @ P 1, 0.5 @ P 0.5, 0.75 @ P 0.6)
    ap, mpre, _ = compute_ap(np.array([0.25, 0.5, 0.75]), np.array([1.0, 0.5, 0.6]))
    assert ap == pytest.approx((26 * 1.0 + 50 * 0.6) / N_THR)
    assert np.all(np.diff(mpre) <= 0)  # monotone


def test_iou_threshold_boundary():
    label = [[0, 0, 0, 10, 10]]
    # IoU exactly 0.5 matches at 0.50 only (rule: IoU >= threshold)
    assert match_predictions([[0, 0, 10, 5, 0.9, 0]], label).tolist() == [[True] + [False] * 9]
    # IoU exactly 0.75 matches at 0.50 .. 0.75 (six thresholds)
    assert match_predictions([[0, 0, 10, 7.5, 0.9, 0]], label).tolist() == [[True] * 6 + [False] * 4]
    # just below 0.5: nothing
    assert not match_predictions([[0, 0, 10, 4.99, 0.9, 0]], label).any()
    # right box, wrong class: nothing
    assert not match_predictions([[0, 0, 10, 10, 0.9, 1]], label).any()
    # torch inputs work too
    assert match_predictions(torch.tensor([[0, 0, 10, 10, 0.9, 0]]), torch.tensor(label)).all()


def test_label_matched_once_highest_iou_first():
    # labels a=[0,0,10,10], b=[3,0,13,10]; d1=[1,0,11,10]: IoU with a 90/110=0.818, with b 80/120=0.667;
    # d2=[0,0,10,8]: IoU with a 0.8, with b 56/124=0.45. Pairs are taken by decreasing IoU: d1-a first,
    # which rules out d2-a and d1-b -> at 0.5 d1 is TP, d2 FP and b stays unmatched (greedy, as stated;
    # an optimal assignment would have found two matches).
    labels = [[0, 0, 0, 10, 10], [0, 3, 0, 13, 10]]
    dets = [[1, 0, 11, 10, 0.5, 0], [0, 0, 10, 8, 0.9, 0]]
    tp = match_predictions(dets, labels)
    assert tp[:, 0].tolist() == [True, False]
    assert tp[:, 6].tolist() == [True, False]  # 0.80: d1-a (0.818) still beats d2-a (0.8)
    assert not tp[:, 7].any()  # 0.85: neither pair is strong enough
    # two copies of the same exact box: only one can have the label
    tp = match_predictions([[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0]], labels[:1])
    assert tp.sum(0).tolist() == [1] * 10


def test_greedy_match_equals_sequential_greedy():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        rows, cols = rng.integers(0, 6, n), rng.integers(0, 6, n)
        iou = rng.choice([0.5, 0.6, 0.7, 0.8, 0.9], n)  # many ties
        kept = greedy_match(rows, cols, iou)
        used_r, used_c, expect = set(), set(), np.zeros(n, bool)
        for k in sorted(range(n), key=lambda k: -iou[k]):  # Python's sort is stable
            if rows[k] not in used_r and cols[k] not in used_c:
                used_r.add(rows[k]), used_c.add(cols[k])
                expect[k] = True
        assert kept.tolist() == expect.tolist()


def test_confusion_matrix():
    cm = ConfusionMatrix(nc=2, conf=0.25, iou_thres=0.45)
    labels = [[0, 0, 0, 10, 10], [1, 20, 20, 40, 40], [1, 60, 60, 80, 80]]
    dets = [[0, 0, 10, 10, 0.9, 0],       # right class on label 0
            [20, 20, 40, 40, 0.8, 0],     # class 0 on a class-1 object: confusion
            [100, 100, 120, 120, 0.7, 1],  # nothing there: background false alarm
            [60, 60, 80, 80, 0.1, 1]]     # below conf: ignored, so label 2 is missed
    cm.process_batch(np.array(dets), np.array(labels))
    cm.process_batch(None, np.array([[0, 0, 0, 5, 5]]))  # image with no detections: a miss
    cm.process_batch(np.array([[0, 0, 5, 5, 0.9, 1]]), np.zeros((0, 5)))  # image with no labels
    expect = np.zeros((3, 3))
    expect[0, 0] = 1
    expect[0, 1] = 1
    expect[1, 2] = 2
    expect[2, 1] = 1
    expect[2, 0] = 1
    assert cm.matrix.tolist() == expect.tolist()
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0] and fp.tolist() == [1, 2]
    cm.process_batch(None, np.array([[7, 0, 0, 5, 5]]))  # a class outside [0, nc): ignored, no crash
    assert cm.matrix.tolist() == expect.tolist()


def test_fitness():
    assert fitness(np.array([[0.5, 0.5, 0.6, 0.4], [0, 0, 1, 0]])).tolist() == pytest.approx([0.42, 0.1])


def test_metric_plots(tmp_path):
    rng = np.random.default_rng(1)
    n = 60
    tp = rng.random((n, 10)) > 0.4
    ap_per_class(tp, rng.random(n), rng.integers(0, 3, n), rng.integers(0, 3, 40), plot=True,
                 save_dir=tmp_path, names=["a", "b", "c"])
    cm = ConfusionMatrix(3)
    cm.process_batch(np.array([[0, 0, 10, 10, 0.9, 1]]), np.array([[2, 0, 0, 10, 10]]))
    cm.plot(tmp_path, names=["a", "b", "c"])
    for f in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png"):
        assert (tmp_path / f).stat().st_size > 1000, f


def test_drawing(tmp_path):
    im = np.zeros((64, 96, 3), np.uint8)
    a = Annotator(im)
    a.box_label([10, 10, 50, 40], "cls 0.9", color=colors(3, bgr=True))
    assert a.result() is im and im.any()  # drew in place
    assert colors(3) == colors(23) and colors(3, bgr=True) == colors(3)[::-1]

    images = torch.randint(0, 255, (3, 3, 64, 96), dtype=torch.uint8)
    labels = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [2, 0, 0.2, 0.2, 0.1, 0.1]])
    preds = torch.tensor([[0, 1, 48.0, 32, 20, 20, 0.9], [1, 0, 10.0, 10, 8, 8, 0.1]])  # pixels + conf
    m1 = plot_images(images, labels, ["a.jpg"] * 3, tmp_path / "l.jpg", names=["x", "y"])
    m2 = plot_images(images, preds, None, tmp_path / "p.jpg", names={0: "x", 1: "y"})
    m3 = plot_images(images.float() / 255, torch.zeros(0, 6), None, tmp_path / "e.jpg")
    assert m1.shape == m2.shape == m3.shape == (128, 192, 3)
    assert (m1 != m3).any() and (m2 != m3).any()
    masks = [torch.rand(3, 8, 12) > 0.7, torch.rand(3, 4, 6) > 0.7]
    plot_distill_masks(images, labels, masks, [8, 16], tmp_path / "m.jpg")
    plot_labels(np.array([[0, 0.5, 0.5, 0.2, 0.3], [1, 0.2, 0.3, 0.1, 0.1]]), ["x", "y"], tmp_path)
    with open(tmp_path / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([["epoch", " train/box_loss", " metrics/mAP_0.5"], [0, 0.1, 0.2], [1, 0.08, 0.3]])
    plot_results(tmp_path / "results.csv")
    assert plot_results(tmp_path / "missing.csv") is None  # warns, no crash
    for f in ("l.jpg", "p.jpg", "e.jpg", "m.jpg", "labels.jpg", "results.png"):
        assert (tmp_path / f).stat().st_size > 1000, f
