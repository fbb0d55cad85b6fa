"""Drawing: boxes on images (cv2) and the figures a run leaves behind (matplotlib, Agg, no pyplot).

Figures are built with matplotlib.figure.Figure directly, so nothing touches pyplot's global state or
needs a display, and figures are freed as soon as they go out of scope.
"""
import colorsys
import csv
import math
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.data_config import class_name
from utils.logging import LOGGER


def _palette(n=20):
    """n well separated RGB colours: hues stepped by the golden ratio, alternating saturation/value."""
    out = []
    for i in range(n):
        s, v = (0.9, 1.0) if i % 2 == 0 else (0.65, 0.8)
        r, g, b = colorsys.hsv_to_rgb((i * 0.6180339887) % 1.0, s, v)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


_PALETTE = _palette()


def _figure(figsize):
    """A pyplot-free figure; matplotlib is imported here, so runs that draw nothing (--noplots) skip its import."""
    from matplotlib.figure import Figure
    return Figure(figsize=figsize, tight_layout=True)


def colors(i, bgr=False):
    """Colour for class index i as an (r, g, b) tuple of ints (b, g, r for cv2 images with bgr=True)."""
    c = _PALETTE[int(i) % len(_PALETTE)]
    return c[::-1] if bgr else c


def _numpy(x):
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class Annotator:
    """Draws labelled boxes and text on an HWC uint8 image with cv2 (in place when it can)."""

    def __init__(self, im, line_width=None):
        im = np.asarray(im)
        if im.dtype != np.uint8 or not im.flags.c_contiguous or not im.flags.writeable:
            im = np.ascontiguousarray(im.clip(0, 255).astype(np.uint8))
        self.im = im
        self.lw = line_width or max(round(sum(im.shape[:2]) / 2 * 0.003), 2)
        self.tf = max(self.lw - 1, 1)  # font thickness
        self.fs = self.lw / 3  # font scale

    def box_label(self, box, label="", color=(128, 128, 128), txt_color=(255, 255, 255)):
        """Rectangle xyxy with an optional filled label tag above it (inside the box at the image top)."""
        x1, y1, x2, y2 = (int(round(float(v))) for v in box[:4])
        cv2.rectangle(self.im, (x1, y1), (x2, y2), color, thickness=self.lw, lineType=cv2.LINE_AA)
        if label:
            w, h = cv2.getTextSize(label, 0, fontScale=self.fs, thickness=self.tf)[0]
            outside = y1 - h - 3 >= 0
            ty2 = y1 - h - 3 if outside else y1 + h + 3
            cv2.rectangle(self.im, (x1, y1), (x1 + w, ty2), color, -1, cv2.LINE_AA)
            cv2.putText(self.im, label, (x1, y1 - 2 if outside else y1 + h + 2), 0, self.fs, txt_color,
                        thickness=self.tf, lineType=cv2.LINE_AA)

    def text(self, xy, text, txt_color=(255, 255, 255)):
        """Text whose top-left corner is at xy."""
        h = cv2.getTextSize(text, 0, fontScale=self.fs, thickness=self.tf)[0][1]
        cv2.putText(self.im, text, (int(xy[0]), int(xy[1]) + h), 0, self.fs, txt_color,
                    thickness=self.tf, lineType=cv2.LINE_AA)

    def result(self):
        return self.im


def _to_uint8_images(images):
    """[bs, 3, H, W] tensor/array (uint8, 0-255 float or 0-1 float) -> [bs, H, W, 3] uint8."""
    x = _numpy(images)
    if x.dtype != np.uint8:
        x = x * 255 if x.size and x.max() <= 1.0 else x
        x = x.clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _save_rgb(im, fname):
    fname = Path(fname)
    fname.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(fname), im[..., ::-1])
    return fname


def plot_images(images, targets, paths=None, fname="images.jpg", names=None, max_size=1920, max_subplots=16,
                conf_thres=0.25):
    """Mosaic of a batch with its boxes; saved as an RGB jpg and returned as an HWC RGB array.

    targets: [n, 6] labels (batch index, cls, x, y, w, h) or [n, 7] predictions (..., conf); xywh either
    normalised (all <= 1.01) or in input pixels. Predictions below conf_thres are not drawn.
    """
    ims = _to_uint8_images(images)[:max_subplots]
    t = _numpy(targets)
    targets = t.reshape(-1, t.shape[-1]) if t.ndim == 2 and t.size else np.zeros((0, 6))
    bs, h, w, _ = ims.shape
    ns = math.ceil(bs ** 0.5)  # tiles per side
    scale = min(1.0, max_size / ns / max(h, w))
    h, w = math.ceil(scale * h), math.ceil(scale * w)
    mosaic = np.full((ns * h, ns * w, 3), 255, dtype=np.uint8)
    for i, im in enumerate(ims):
        y0, x0 = (i // ns) * h, (i % ns) * w
        mosaic[y0:y0 + h, x0:x0 + w] = cv2.resize(im, (w, h)) if scale < 1 else im

    annotator = Annotator(mosaic, line_width=max(round(min(h, w) / 200), 1))
    normalised = targets.shape[0] > 0 and targets[:, 2:6].max() <= 1.01
    for i in range(bs):
        y0, x0 = (i // ns) * h, (i % ns) * w
        cv2.rectangle(annotator.im, (x0, y0), (x0 + w, y0 + h), (255, 255, 255), 2)  # tile border
        if paths is not None and i < len(paths):
            annotator.text((x0 + 3, y0 + 3), Path(paths[i]).name[:40], txt_color=(220, 220, 220))
        t = targets[targets[:, 0] == i]
        if not len(t):
            continue
        xywh = t[:, 2:6] * (np.array([w, h, w, h]) if normalised else scale)
        xyxy = np.concatenate((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
        xyxy = xyxy.clip(0, [w, h, w, h]) + np.array([x0, y0, x0, y0])  # keep boxes inside their tile
        is_pred = t.shape[1] > 6
        for j, box in enumerate(xyxy):
            c = int(t[j, 1])
            if is_pred and t[j, 6] < conf_thres:
                continue
            label = class_name(names, c) + (f" {t[j, 6]:.1f}" if is_pred else "")
            annotator.box_label(box, label, color=colors(c))
    _save_rgb(annotator.result(), fname)
    return annotator.result()


def plot_labels(labels, names=(), save_dir=Path("")):
    """labels.jpg: instances per class, box shapes (centred), centre x/y and width/height histograms.

    labels: [n, 5] array of (cls, x, y, w, h) normalised, e.g. np.concatenate(dataset.labels).
    """
    labels = _numpy(labels).reshape(-1, 5)
    c, b = labels[:, 0].astype(int), labels[:, 1:]
    nc = max(int(c.max()) + 1 if len(c) else 0, len(names))
    fig = _figure((8, 8))
    ax = fig.subplots(2, 2).ravel()

    counts = np.bincount(c, minlength=nc)
    ax[0].bar(range(nc), counts, color=[np.array(colors(i)) / 255 for i in range(nc)])
    ax[0].set_ylabel("instances")
    if 0 < nc <= 30:
        ax[0].set_xticks(range(nc), [class_name(names, i) for i in range(nc)], rotation=90, fontsize=8)
    else:
        ax[0].set_xlabel("classes")

    canvas = np.full((500, 500, 3), 255, dtype=np.uint8)  # first 1000 boxes, centred, by size
    for cls, (_, _, bw, bh) in zip(c[:1000], b[:1000]):
        x1, y1, x2, y2 = (np.array([0.5 - bw / 2, 0.5 - bh / 2, 0.5 + bw / 2, 0.5 + bh / 2]) * 499).astype(int)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colors(cls), 1)
    ax[1].imshow(canvas)
    ax[1].axis("off")
    ax[1].set_title("box sizes (centred)")

    for a, (i, j, xl, yl) in zip(ax[2:], ((0, 1, "x", "y"), (2, 3, "width", "height"))):
        a.hist2d(b[:, i], b[:, j], bins=50, range=[[0, 1], [0, 1]], cmap="Blues")
        a.set_xlabel(xl)
        a.set_ylabel(yl)
    fname = Path(save_dir) / "labels.jpg"
    fname.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(fname, dpi=150)
    return fname


def plot_results(csv_file="results.csv"):
    """results.png beside results.csv: one panel per column against the epoch column (or row number).
    Empty cells (metrics of epochs that were not validated) are left out of their panel."""
    csv_file = Path(csv_file)
    try:
        with open(csv_file, newline="") as f:
            rows = [[v.strip() for v in r] for r in csv.reader(f) if r]
        header = rows[0]
        rows = np.array([[float(v) if v else np.nan for v in r] for r in rows[1:]], dtype=float)
        rows = rows.reshape(-1, len(header))
    except (OSError, IndexError, ValueError) as e:
        LOGGER.warning(f"WARNING ⚠️ plot_results: cannot read {csv_file}: {e}")
        return None
    xi = header.index("epoch") if "epoch" in header else None
    x = rows[:, xi] if xi is not None else np.arange(len(rows))
    cols = [i for i in range(len(header)) if i != xi]
    ncol = max(1, math.ceil(len(cols) / 2))
    fig = _figure((2.6 * ncol, 6))
    axes = np.atleast_1d(fig.subplots(2, ncol)).ravel()
    for a, i in zip(axes, cols):
        keep = ~np.isnan(rows[:, i])
        a.plot(x[keep], rows[keep, i], marker=".", linewidth=2, markersize=6)
        a.set_title(header[i], fontsize=10)
    for a in axes[len(cols):]:
        a.axis("off")
    fname = csv_file.with_name("results.png")
    fig.savefig(fname, dpi=150)
    return fname


def plot_pr_curve(px, py, ap, fname="pr_curve.png", names=()):
    """Precision-recall curves: py [nc, len(px)] precision at recall px; ap [nc, 10] (column 0 = AP50)."""
    py = np.asarray(py).reshape(-1, len(px))
    ap = np.asarray(ap).reshape(len(py), -1)
    fig = _figure((9, 6))
    a = fig.subplots()
    if 0 < len(py) < 21:  # per-class legend only while readable
        for i, y in enumerate(py):
            a.plot(px, y, linewidth=1, label=f"{class_name(names, i)} {ap[i, 0]:.3f}")
    else:
        for y in py:
            a.plot(px, y, linewidth=1, color="grey")
    if len(py):
        a.plot(px, py.mean(0), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
    a.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-Recall Curve")
    a.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    fig.savefig(fname, dpi=150)
    return fname


def plot_mc_curve(px, py, fname="mc_curve.png", names=(), xlabel="Confidence", ylabel="Metric"):
    """A metric against confidence per class (py [nc, len(px)]) and its class mean with its best point."""
    py = np.asarray(py).reshape(-1, len(px))
    fig = _figure((9, 6))
    a = fig.subplots()
    for i, y in enumerate(py):
        a.plot(px, y, linewidth=1, **({"label": class_name(names, i)} if len(py) < 21 else {"color": "grey"}))
    if len(py):
        y = py.mean(0)
        i = int(y.argmax())
        a.plot(px, y, linewidth=3, color="blue", label=f"all classes {y[i]:.2f} at {px[i]:.3f}")
    a.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01), title=f"{ylabel}-Confidence Curve")
    a.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    fig.savefig(fname, dpi=150)
    return fname


def plot_confusion_matrix(matrix, names=(), fname="confusion_matrix.png", normalize=True):
    """matrix [nc+1, nc+1]: rows predicted, columns true; the last row/column is background."""
    m = np.asarray(matrix, dtype=float)
    nc = len(m) - 1
    if normalize:
        m = m / (m.sum(0, keepdims=True) + 1e-9)  # each true class (column) sums to 1
    m = np.where(m < 0.005, np.nan, m)  # blank the near-zero cells
    labels = [class_name(names, i) for i in range(nc)] + ["background"]
    fig = _figure((12, 9))
    a = fig.subplots()
    im = a.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=a)
    if nc < 30:
        a.set_xticks(range(nc + 1), labels, rotation=90)
        a.set_yticks(range(nc + 1), labels)
        for (i, j), v in np.ndenumerate(m):
            if not np.isnan(v):
                a.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=8,
                       color="white" if v > 0.5 * np.nanmax(m) else "black")
    a.set(xlabel="True", ylabel="Predicted", title="Confusion Matrix")
    fig.savefig(fname, dpi=150)
    return fname


def plot_distill_masks(images, targets, masks, strides, fname="distill_masks.jpg", max_images=4, cell=320):
    """Imitation masks for the first images of a batch: one row per image, one column per level.

    images [bs, 3, H, W]; targets [n, 6] (batch index, cls, xywh normalised); masks: list (one per level)
    of bool [bs, H / stride, W / stride]; strides: the level strides. Masked cells are tinted red.
    """
    if not len(masks):
        LOGGER.warning(f"WARNING ⚠️ plot_distill_masks: no masks given, {fname} not written")
        return None
    ims = _to_uint8_images(images)[:max_images]
    targets = _numpy(targets).reshape(-1, 6)
    bs, H, W, _ = ims.shape
    scale = min(1.0, cell / max(H, W))
    h, w = round(H * scale), round(W * scale)
    grid = np.full((bs * h, len(masks) * w, 3), 255, dtype=np.uint8)
    for j, (mask, s) in enumerate(zip(masks, strides)):
        mask = _numpy(mask).astype(bool)
        for i in range(bs):
            m = np.kron(mask[i], np.ones((int(s), int(s)), dtype=bool))[:H, :W]  # cell -> its pixels
            m = np.pad(m, ((0, H - m.shape[0]), (0, W - m.shape[1])))
            im = ims[i].copy()
            im[m] = (0.55 * im[m] + 0.45 * np.array([255, 0, 0])).astype(np.uint8)
            im = cv2.resize(im, (w, h)) if scale < 1 else im
            a = Annotator(im, line_width=1)
            t = targets[targets[:, 0] == i]
            for c, x, y, bw, bh in t[:, 1:6]:
                box = np.array([x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2]) * [w, h, w, h]
                a.box_label(box, "", color=colors(c))
            if i == 0:
                a.text((3, 3), f"stride {int(s)}: {int(mask[:bs].sum())} cells", txt_color=(0, 0, 0))
            grid[i * h:(i + 1) * h, j * w:(j + 1) * w] = a.result()
    return _save_rgb(grid, fname)
