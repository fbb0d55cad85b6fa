"""Metrics on hand-made cases whose answers are worked out in the comments, and the plots they feed."""
import csv

import numpy as np
import pytest
import torch

from utils.metrics import (IOU_THRESHOLDS, ConfusionMatrix, _exact_iou, ap_per_class, compute_ap, fitness,
                           greedy_match, match_predictions)
from utils.plots import Annotator, colors, plot_distill_masks, plot_images, plot_labels, plot_results

X = np.linspace(0, 1, 101)  # recall points of the AP integral


def evaluate(dets, labels):
    """One image: dets [n, 6] (xyxy, conf, cls), labels [m, 5] (cls, xyxy) -> (tp, ap, p, r, classes)."""
    dets, labels = np.asarray(dets, float).reshape(-1, 6), np.asarray(labels, float).reshape(-1, 5)
    tp = match_predictions(dets, labels, IOU_THRESHOLDS)
    tpc, fpc, p, r, f1, ap, cls = ap_per_class(tp, dets[:, 4], dets[:, 5], labels[:, 0])
    return tp, ap, p, r, cls


def test_perfect_predictions_give_ap_0995():
    # envelope 1 at every recall point below 1 and 0 at recall 1 (the closing sentinel: np.interp at a
    # repeated point takes the last value), so the trapezoid gives 0.99 + 0.01 * (1 + 0) / 2 = 0.995
    labels = [[0, 10, 10, 50, 50], [0, 60, 60, 90, 100], [0, 5, 70, 40, 95]]
    dets = [[*b[1:], conf, 0] for b, conf in zip(labels, (0.9, 0.8, 0.7))]
    tp, ap, p, r, _ = evaluate(dets, labels)
    assert tp.all()
    assert np.allclose(ap, 0.995)
    assert p[0] == pytest.approx(1.0) and r[0] == pytest.approx(1.0)


def test_missed_object():
    # 2 labels, 1 exact detection: curve (recall 0.5, precision 1) between the sentinels (0, 1) and (1, 0).
    # The envelope is 1 up to recall 0.5 and falls linearly to 0 at recall 1: AP = 0.5 + 0.5 * 0.5 / 2.
    labels = [[0, 0, 0, 10, 10], [0, 50, 50, 70, 70]]
    dets = [[0, 0, 10, 10, 0.9, 0]]
    tp, ap, p, r, _ = evaluate(dets, labels)
    assert np.allclose(ap, 0.75)
    # P stays 1 at any threshold; R is 0.5 below conf 0.9: the best F1 is there.
    assert p[0] == pytest.approx(1.0) and r[0] == pytest.approx(0.5)


def test_duplicate_detection_label_goes_to_the_first_detection():
    # One label [0, 0, 10, 10]. B: [0, 0, 10, 5.7] (IoU 0.57), conf 0.9, listed first (NMS order).
    # A: exact (IoU 1), conf 0.8. Both detections' best label is the label, which goes to the first of
    # them: B is the TP at thresholds 0.50 and 0.55, A a FP there (a highest-IoU-first matching would
    # pick A). From 0.60 on only A qualifies.
    labels = [[0, 0, 0, 10, 10]]
    dets = [[0, 0, 10, 5.7, 0.9, 0], [0, 0, 10, 10, 0.8, 0]]
    tp, ap, _, _, _ = evaluate(dets, labels)
    assert tp[0].tolist() == [True] * 2 + [False] * 8 and tp[1].tolist() == [False] * 2 + [True] * 8
    # 0.50, 0.55: ranked (TP, FP): recall (1, 1), precision (1, 0.5) -> envelope 1 below recall 1: 0.995
    assert np.allclose(ap[0, :2], 0.995)
    # 0.60+: ranked (FP, TP): recall (0, 1), precision (0, 0.5) -> envelope 0.5 on [0, 1), 0 at 1:
    # 0.99 * 0.5 + 0.01 * (0.5 + 0) / 2 = 0.4975
    assert np.allclose(ap[0, 2:], 0.4975)


def test_two_classes():
    # class 0: one label, found exactly -> AP 0.995.
    # class 1: two labels; a class-1 detection on the class-0 object (conf 0.95) can only be a false
    # positive, then one exact detection (0.9). Ranked: recall (0, 0.5), precision (0, 0.5); envelope
    # 0.5 for recall <= 0.5, then linear to 0 at recall 1 -> AP = 0.5 * 0.5 + 0.5 * 0.5 / 2 = 0.375.
    labels = [[0, 0, 0, 10, 10], [1, 20, 20, 40, 40], [1, 60, 60, 80, 80]]
    dets = [[0, 0, 10, 10, 0.99, 0], [0, 0, 10, 10, 0.95, 1], [20, 20, 40, 40, 0.9, 1]]
    _, ap, _, _, cls = evaluate(dets, labels)
    assert list(cls) == [0, 1]
    assert np.allclose(ap[0], 0.995)
    assert np.allclose(ap[1], 0.375)
    assert ap[:, 0].mean() == pytest.approx((0.995 + 0.375) / 2)


def test_class_without_predictions_and_predictions_without_labels():
    # class 1 has a label but no detection -> AP 0; class 2 has a detection but no label -> ignored.
    labels = [[0, 0, 0, 10, 10], [1, 20, 20, 40, 40]]
    dets = [[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.9, 2]]
    _, ap, _, _, cls = evaluate(dets, labels)
    assert list(cls) == [0, 1]
    assert np.allclose(ap[0], 0.995) and np.allclose(ap[1], 0.0)


def test_compute_ap_is_the_trapezoid_of_the_interpolated_envelope():
    # recall (0.5, 1.0), precision (1.0, 0.5); with sentinels the envelope is 1 on [0, 0.5], linear from
    # 1 to 0.5 on [0.5, 1), and 0 at recall 1 (the sentinel after the curve's own recall 1).
    # Trapezoid: 0.5 + 0.49 * (1 + 0.51) / 2 + 0.01 * (0.51 + 0) / 2 = 0.8725.
    # (Averaging the envelope at the 101 points, COCO-style, would give (51 + 50 * 0.5) / 101 = 0.7525.)
    ap, mpre, mrec = compute_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5]))
    assert ap == pytest.approx(0.8725, abs=1e-12)
    assert mrec.tolist() == [0.0, 0.5, 1.0, 1.0] and mpre.tolist() == [1.0, 1.0, 0.5, 0.0]
    # a dip in precision is filled in by the envelope: (0.25 @ P 1, 0.5 @ P 0.5, 0.75 @ P 0.6) gives
    # 1, 1, 0.6, 0.6, 0 at recall 0, 0.25, 0.5, 0.75, 1; piecewise linear with breakpoints on the grid:
    # 0.25 * 1 + 0.25 * (1 + 0.6) / 2 + 0.25 * 0.6 + 0.25 * 0.6 / 2 = 0.675
    ap, mpre, _ = compute_ap(np.array([0.25, 0.5, 0.75]), np.array([1.0, 0.5, 0.6]))
    assert ap == pytest.approx(0.675, abs=1e-12)
    assert np.all(np.diff(mpre) <= 0)  # monotone
    # the precision sentinel at recall 0 is 1: a curve starting with a false positive still starts at 1
    _, mpre, _ = compute_ap(np.array([0.0, 0.5]), np.array([0.0, 0.5]))
    assert mpre[0] == 1.0


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


def test_detection_keeps_its_best_label_and_labels_go_to_the_first_detection():
    # labels A=[0,0,10,10], B=[0,1,10,10]; d0=[0,0,10,9] (conf 0.9): IoU with A 90/100, with B 80/100;
    # d1=[0,0,10,9.5] (conf 0.8): IoU with A 95/100, with B 85/100. Both detections' best label is A,
    # which goes to d0 (listed first); d1 stays a FP and B unmatched. A highest-IoU-first one-to-one
    # matching would give d1-A then d0-B: two TPs.
    labels = [[0, 0, 0, 10, 10], [0, 0, 1, 10, 10]]
    dets = [[0, 0, 10, 9, 0.9, 0], [0, 0, 10, 9.5, 0.8, 0]]
    tp = match_predictions(dets, labels)
    assert tp[:, :6].tolist() == [[True] * 6, [False] * 6]  # thresholds 0.50 .. 0.75
    rows, cols = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    assert greedy_match(rows, cols, np.array([0.9, 0.95, 0.8, 0.85])).sum() == 2  # the alternative rule
    # labels A=[0,0,10,10], C=[3,0,13,10]; e0=[0,0,10,8] (conf 0.9): IoU with A 0.8, with C 56/124;
    # e1=[1,0,11,10] (conf 0.5): IoU with A 90/110, with C 80/120. e0's best is A, e1's best is A too
    # (0.818 > 0.667), A goes to e0 -> at 0.5: e0 TP, e1 FP, C unmatched.
    labels = [[0, 0, 0, 10, 10], [0, 3, 0, 13, 10]]
    dets = [[0, 0, 10, 8, 0.9, 0], [1, 0, 11, 10, 0.5, 0]]
    tp = match_predictions(dets, labels)
    assert tp[:, 0].tolist() == [True, False]
    # at 0.80 e0-A (0.8, with IoU computed exactly) still qualifies and A stays with e0; at 0.85 nothing does
    assert tp[:, 6].tolist() == [True, False] and not tp[:, 7].any()
    # two copies of the same exact box: only one can have the label, the first
    tp = match_predictions([[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0]], labels[:1])
    assert tp[:, 0].tolist() == [True, False] and tp.sum(0).tolist() == [1] * 10


def test_matching_equals_a_plain_loop_of_the_rule():
    """Random scenes: the vectorised rule equals a direct per-threshold loop written from its statement."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        m, n = int(rng.integers(1, 8)), int(rng.integers(1, 12))
        xy = rng.uniform(0, 40, (m, 2))
        labels = np.c_[rng.integers(0, 2, m), xy, xy + rng.uniform(5, 20, (m, 2))]
        src = labels[rng.integers(0, m, n), 1:]
        boxes = src + rng.normal(0, 2.5, (n, 4))
        dets = np.c_[boxes, np.sort(rng.random(n))[::-1], rng.integers(0, 2, n)]
        got = match_predictions(dets, labels)
        iou = _exact_iou(labels[:, 1:], dets[:, :4])
        for k, t in enumerate(IOU_THRESHOLDS):
            best = {}
            for d in range(n):  # each detection's best label (highest IoU; ties: higher label index)
                cands = [(iou[l, d], l) for l in range(m) if labels[l, 0] == dets[d, 5] and iou[l, d] >= t]
                if cands:
                    best[d] = max(cands)[1]
            expect = np.zeros(n, bool)
            for l in set(best.values()):  # each label to the first detection that chose it
                expect[min(d for d, bl in best.items() if bl == l)] = True
            assert got[:, k].tolist() == expect.tolist()


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
