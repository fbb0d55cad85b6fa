"""Detection metrics: IoU matching of predictions to labels, average precision, confusion matrix, fitness.

Conventions: detections are [n, 6] (x1, y1, x2, y2, conf, cls); labels are [m, 5] (cls, x1, y1, x2, y2),
both in the same pixel space. `tp` arrays are bool [n, 10], one column per IoU threshold 0.50:0.05:0.95.
"""
from pathlib import Path

import numpy as np
import torch

from utils.boxes import box_iou
from utils.data_config import class_name

IOU_THRESHOLDS = 0.5 + 0.05 * np.arange(10)  # float64, so IoU == 0.75 compares equal to its threshold


def _np64(x):
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def _exact_iou(a, b):
    """Pairwise IoU in float64 with no epsilon, so a boundary IoU (e.g. exactly 0.5) stays exact."""
    iou = box_iou(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), eps=0.0)
    return np.nan_to_num(iou, nan=0.0)  # 0/0 for two empty boxes


def greedy_match(rows, cols, iou):
    """One-to-one matching of candidate pairs, highest IoU first (ties: input order).

    rows/cols/iou: 1-D arrays describing candidate pairs. Returns a bool mask over the pairs that are
    kept. Done in rounds: a pair that is the best for both its row and its column is certainly taken by
    the sequential greedy, and every pair sharing a row or column with it is certainly dropped, so
    repeating on what is left gives exactly the sequential result with vectorised work.
    """
    order = np.argsort(-iou, kind="stable")
    rows, cols = rows[order], cols[order]
    keep = np.zeros(len(order), dtype=bool)
    alive = np.ones(len(order), dtype=bool)
    while alive.any():
        idx = np.flatnonzero(alive)
        first_r = np.zeros(len(idx), dtype=bool)
        first_r[np.unique(rows[idx], return_index=True)[1]] = True
        first_c = np.zeros(len(idx), dtype=bool)
        first_c[np.unique(cols[idx], return_index=True)[1]] = True
        take = idx[first_r & first_c]
        keep[take] = True
        alive &= ~(np.isin(rows, rows[take]) | np.isin(cols, cols[take]))
    out = np.zeros(len(order), dtype=bool)
    out[order] = keep
    return out


def match_predictions(detections, labels, iouv=IOU_THRESHOLDS):
    """Which detections are true positives at each IoU threshold -> bool [n, len(iouv)] (numpy).

    YOLOv5's rule, per threshold t: candidate pairs are a label and a detection of the same class with
    IoU >= t. Each detection keeps its best label (highest IoU; ties go to the higher label index); then
    each label keeps, among the detections that chose it, the one listed first. Detections arrive from
    NMS in decreasing confidence, so that is the most confident one. This is not a one-to-one
    highest-IoU-first matching: a label wanted by two detections goes to the first of them even when
    the second overlaps it more, and a detection whose best label was taken stays a false positive.
    """
    det, lab, iouv = _np64(detections).reshape(-1, 6), _np64(labels).reshape(-1, 5), _np64(iouv).reshape(-1)
    correct = np.zeros((len(det), len(iouv)), dtype=bool)
    if not len(det) or not len(lab):
        return correct
    iou = _exact_iou(lab[:, 1:5], det[:, :4])  # [m, n]
    iou[lab[:, 0:1] != det[None, :, 5]] = 0.0
    li, di = np.nonzero(iou >= iouv.min())  # label-major order
    v = iou[li, di]
    for k, t in enumerate(iouv):
        s = v >= t
        order = np.argsort(v[s], kind="stable")[::-1]  # highest IoU first; equal IoU: later pair first
        lab_i, det_i = li[s][order], di[s][order]
        _, best = np.unique(det_i, return_index=True)  # each detection's first (best) pair, by detection index
        lab_i, det_i = lab_i[best], det_i[best]
        _, first = np.unique(lab_i, return_index=True)  # each label's lowest-index detection
        correct[det_i[first], k] = True
    return correct


def compute_ap(recall, precision):
    """AP of one PR curve -> (ap, mpre, mrec), computed as YOLOv5 does.

    The curve gets sentinels (recall 0 at precision 1 before it, recall 1 at precision 0 after it), its
    precision becomes the envelope (max precision at any recall >= r), and AP is the trapezoid integral
    of that envelope, interpolated linearly at the 101 recall points 0, 0.01, ..., 1. Perfect detections
    give 0.995 (the last half step falls to the closing sentinel); COCO's step sampling gives 1.0 there.
    mrec/mpre are the curve with sentinels, for plotting.
    """
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    x = np.linspace(0, 1, 101)
    ap = np.trapezoid(np.interp(x, mrec, mpre), x)
    return float(ap), mpre, mrec


def smooth(y, f=0.05):
    """Box filter over a fraction f of the points (odd width), edges padded with the end values."""
    nf = round(len(y) * f * 2) // 2 + 1
    p = np.ones(nf // 2)
    yp = np.concatenate((p * y[0], y, p * y[-1]))
    return np.convolve(yp, np.ones(nf) / nf, mode="valid")


def ap_per_class(tp, conf, pred_cls, target_cls, plot=False, save_dir=".", names=(), prefix="", eps=1e-16):
    """Per-class AP at every IoU threshold, plus P, R, F1 at the confidence of maximum mean F1.

    tp [n, t] bool, conf [n], pred_cls [n] over all detections of the split; target_cls [m] over all
    labels. Classes are those present in target_cls (predictions of other classes are ignored).
    Returns (tp, fp, p, r, f1, ap [nc, t], unique_classes), the first five per class at that confidence.
    The mean F1 curve is smoothed over 10% of the confidence axis before its argmax, as upstream does.
    """
    tp = np.asarray(tp)
    tp = tp[:, None] if tp.ndim == 1 else tp
    conf, pred_cls, target_cls = (np.asarray(x).reshape(-1) for x in (conf, pred_cls, target_cls))
    i = np.argsort(-conf)  # numpy's default sort, as YOLOv5 calls it, so equal confidences rank alike
    tp, conf, pred_cls = tp[i], conf[i], pred_cls[i]
    unique_classes, nt = np.unique(target_cls, return_counts=True)
    nc = len(unique_classes)

    px = np.linspace(0, 1, 1000)  # confidence axis for P, R, F1; recall axis for the PR plot
    ap = np.zeros((nc, tp.shape[1]))
    p, r, prc = np.zeros((nc, 1000)), np.zeros((nc, 1000)), np.zeros((nc, 1000))
    for ci, c in enumerate(unique_classes):
        i = pred_cls == c
        if not i.any():
            continue
        tpc = tp[i].cumsum(0)
        fpc = (1 - tp[i]).cumsum(0)
        recall = tpc / nt[ci]
        precision = tpc / (tpc + fpc)
        # P and R as functions of the confidence threshold (conf decreasing, so interpolate on -conf)
        r[ci] = np.interp(-px, -conf[i], recall[:, 0], left=0)
        p[ci] = np.interp(-px, -conf[i], precision[:, 0], left=1)
        for j in range(tp.shape[1]):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if j == 0:
                prc[ci] = np.interp(px, mrec, mpre)

    f1 = 2 * p * r / (p + r + eps)
    if plot:
        from utils.plots import plot_mc_curve, plot_pr_curve

        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        cls_names = [class_name(names, c) for c in unique_classes]
        plot_pr_curve(px, prc, ap, save_dir / f"{prefix}PR_curve.png", cls_names)
        for y, short, name in ((f1, "F1", "F1"), (p, "P", "Precision"), (r, "R", "Recall")):
            plot_mc_curve(px, y, save_dir / f"{prefix}{short}_curve.png", cls_names, ylabel=name)

    k = int(smooth(f1.mean(0), 0.1).argmax()) if nc else 0
    p, r, f1 = p[:, k], r[:, k], f1[:, k]
    tp = (r * nt).round()
    fp = (tp / (p + eps) - tp).round()
    return tp, fp, p, r, f1, ap, unique_classes.astype(int)


class ConfusionMatrix:
    """[nc + 1, nc + 1] counts, rows predicted class, columns true class; index nc is background.

    Detections below `conf` are ignored; a detection and a label pair up (any class) when IoU > iou_thres,
    one-to-one, highest IoU first. Unmatched labels are missed (background row), unmatched detections
    are false alarms (background column).
    """

    def __init__(self, nc, conf=0.25, iou_thres=0.45):
        self.matrix = np.zeros((nc + 1, nc + 1))
        self.nc, self.conf, self.iou_thres = nc, conf, iou_thres

    def process_batch(self, detections, labels):
        """detections [n, 6] (xyxy, conf, cls) or None; labels [m, 5] (cls, xyxy)."""
        lab = _np64(labels).reshape(-1, 5)
        det = np.zeros((0, 6)) if detections is None else _np64(detections).reshape(-1, 6)
        det = det[det[:, 4] > self.conf]
        lab, det = lab[(lab[:, 0] >= 0) & (lab[:, 0] < self.nc)], det[(det[:, 5] >= 0) & (det[:, 5] < self.nc)]
        gc, dc = lab[:, 0].astype(int), det[:, 5].astype(int)
        matched_l, matched_d = np.zeros(len(lab), bool), np.zeros(len(det), bool)
        if len(lab) and len(det):
            iou = _exact_iou(lab[:, 1:5], det[:, :4])
            li, di = np.nonzero(iou > self.iou_thres)
            kept = greedy_match(li, di, iou[li, di])
            li, di = li[kept], di[kept]
            np.add.at(self.matrix, (dc[di], gc[li]), 1)
            matched_l[li], matched_d[di] = True, True
        np.add.at(self.matrix, (self.nc, gc[~matched_l]), 1)  # missed: predicted background
        np.add.at(self.matrix, (dc[~matched_d], self.nc), 1)  # false alarm: true background

    def tp_fp(self):
        """True and false positives per class (background excluded)."""
        tp = self.matrix.diagonal()[:-1]
        return tp, self.matrix.sum(1)[:-1] - tp

    def plot(self, save_dir=".", names=(), normalize=True):
        from utils.plots import plot_confusion_matrix

        return plot_confusion_matrix(self.matrix, names, Path(save_dir) / "confusion_matrix.png", normalize)


def fitness(x):
    """Model fitness for best.pt selection: 0.1 mAP50 + 0.9 mAP50-95 over columns (P, R, mAP50, mAP50-95)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, np.asarray(x).shape[-1])
    return (x[:, :4] * np.array([0.0, 0.0, 0.1, 0.9])).sum(1)
