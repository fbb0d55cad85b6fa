"""Image + box augmentations used by the training loader, and the letterbox used everywhere.

Images are HWC uint8 BGR (as cv2 reads them); labels are float arrays [n, 5] = (cls, box) where the
box is xyxy in pixels unless a function says xywhn. All randomness comes from python `random` and
`np.random`, which the loader seeds per worker.
"""
import math
import random

import cv2
import numpy as np

from utils.logging import LOGGER

PAD_COLOR = (114, 114, 114)


def check_img_size(imgsz, stride: int, as_hw: bool = False):
    """--imgsz rounded up to a multiple of the model's largest stride (at least one stride), with a warning
    when it changes. An int gives an int; a list or tuple, or any value with as_hw, gives (h, w), one value
    meaning a square."""
    def up(x):
        return max(math.ceil(int(x) / stride) * stride, stride)

    if as_hw and not isinstance(imgsz, (list, tuple)):
        imgsz = [imgsz]
    if isinstance(imgsz, (list, tuple)):
        hw = [int(x) for x in imgsz]
        hw = (hw * 2)[:2] if len(hw) == 1 else hw[:2]
        new = tuple(up(x) for x in hw)
        changed, given = new != tuple(hw), list(hw)
    else:
        new = up(imgsz)
        changed, given = new != int(imgsz), int(imgsz)
    if changed:
        LOGGER.warning(f"WARNING ⚠️ --imgsz {given} must be a multiple of max stride {stride}, using "
                       f"{list(new) if isinstance(new, tuple) else new}")
    return new


def letterbox(im, new_shape=640, color=PAD_COLOR, auto=True, scaleFill=False, scaleup=True, stride=32):
    """Resize keeping the aspect ratio, then pad to `new_shape` ((h, w) or int).

    auto=True pads only up to the next multiple of `stride` (minimum rectangle); scaleFill stretches
    without padding; scaleup=False never enlarges (val keeps small images small).
    Returns (image, (ratio_w, ratio_h), (pad_w, pad_h)) with the pads per side, possibly fractional.
    """
    h0, w0 = im.shape[:2]
    new_h, new_w = (new_shape, new_shape) if isinstance(new_shape, int) else new_shape
    r = min(new_h / h0, new_w / w0)
    if not scaleup:
        r = min(r, 1.0)
    w, h = int(round(w0 * r)), int(round(h0 * r))  # resized, unpadded size
    ratio = (r, r)
    dw, dh = new_w - w, new_h - h  # total padding
    if auto:
        dw, dh = dw % stride, dh % stride
    elif scaleFill:
        dw, dh = 0, 0
        w, h = new_w, new_h
        ratio = (new_w / w0, new_h / h0)
    dw, dh = dw / 2, dh / 2  # split between the two sides

    if (w0, h0) != (w, h):
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    # an odd total pad puts the extra pixel on the bottom/right side
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, ratio, (dw, dh)


def augment_hsv(im, hgain=0.5, sgain=0.5, vgain=0.5):
    """Random hue/saturation/value gains, applied in place to a BGR uint8 image through lookup tables."""
    if not (hgain or sgain or vgain):
        return im
    gains = np.random.uniform(-1, 1, 3) * (hgain, sgain, vgain) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * gains[0]) % 180).astype(np.uint8)  # OpenCV hue range is [0, 180)
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)
    return im


def box_candidates(box1, box2, wh_thr=2, ar_thr=100, area_thr=0.1, eps=1e-16):
    """Keep boxes that survive an augmentation: box1 before, box2 after, both [4, n] xyxy.

    A box is kept when it stays wider and taller than wh_thr pixels, keeps more than area_thr of its
    (scaled) area and its aspect ratio stays below ar_thr.
    """
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (aspect < ar_thr)


def clipped_bbox(poly, width, height):
    """xyxy box of the part of a convex polygon [k, 2] inside [0, width] x [0, height] (zeros if none).

    Clipping the polygon first (one image edge at a time) keeps the box of a rotated object that
    leaves the image tight; clipping the corner box instead would keep the off-image corner's extent.
    """
    for axis, limit, sign in ((0, 0, 1), (0, width, -1), (1, 0, 1), (1, height, -1)):
        inside = (poly[:, axis] - limit) * sign >= 0
        if inside.all():
            continue
        if not inside.any():
            return np.zeros(4)
        out = []
        for p, q, p_in, q_in in zip(poly, np.roll(poly, -1, 0), inside, np.roll(inside, -1)):
            if p_in:
                out.append(p)
            if p_in != q_in:  # the edge p -> q crosses the limit
                out.append(p + (q - p) * (limit - p[axis]) / (q[axis] - p[axis]))
        poly = np.array(out)
    return np.concatenate((poly.min(0), poly.max(0)))


def random_perspective(im, targets=(), degrees=10, translate=0.1, scale=0.1, shear=10, perspective=0.0,
                       border=(0, 0)):
    """Random rotation/scale/shear/translation/perspective of an image and its xyxy targets [n, 5].

    `border` (y, x) grows (positive) or shrinks (negative) the output: the mosaic passes -s/2 to cut
    its 2s canvas back to s. Boxes are mapped through their four corners, clipped to the output (as
    polygons, so rotated boxes stay tight) and filtered with box_candidates. Returns (image, targets).
    """
    height = im.shape[0] + border[0] * 2
    width = im.shape[1] + border[1] * 2

    # the transform is composed right to left: centre, perspective, rotate+scale, shear, translate
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -im.shape[1] / 2, -im.shape[0] / 2
    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = random.uniform(-perspective, perspective), random.uniform(-perspective, perspective)
    rot = np.eye(3)
    s = random.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=random.uniform(-degrees, degrees), scale=s)
    sh = np.eye(3)
    sh[0, 1] = math.tan(math.radians(random.uniform(-shear, shear)))
    sh[1, 0] = math.tan(math.radians(random.uniform(-shear, shear)))
    trans = np.eye(3)
    trans[0, 2] = random.uniform(0.5 - translate, 0.5 + translate) * width
    trans[1, 2] = random.uniform(0.5 - translate, 0.5 + translate) * height
    M = trans @ sh @ rot @ persp @ centre

    if border[0] or border[1] or not np.allclose(M, np.eye(3)):
        if perspective:
            im = cv2.warpPerspective(im, M, dsize=(width, height), borderValue=PAD_COLOR)
        else:
            im = cv2.warpAffine(im, M[:2], dsize=(width, height), borderValue=PAD_COLOR)

    targets = np.asarray(targets, dtype=np.float32).reshape(-1, 5)
    if len(targets):
        n = len(targets)
        corners = np.ones((n * 4, 3))
        corners[:, :2] = targets[:, [1, 2, 3, 2, 3, 4, 1, 4]].reshape(n * 4, 2)  # x1y1 x2y1 x2y2 x1y2 (a cycle)
        corners = corners @ M.T
        xy = (corners[:, :2] / corners[:, 2:3] if perspective else corners[:, :2]).reshape(n, 4, 2)
        boxes = np.concatenate((xy.min(1), xy.max(1)), 1)
        for i in np.nonzero((boxes[:, :2] < 0).any(1) | (boxes[:, 2] > width) | (boxes[:, 3] > height))[0]:
            boxes[i] = clipped_bbox(xy[i], width, height)  # tight box of the part left in the image
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)  # rounding of the clipping arithmetic
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        keep = box_candidates(targets[:, 1:5].T * s, boxes.T, area_thr=0.10)
        targets = targets[keep]
        targets[:, 1:5] = boxes[keep]
    return im, targets


def mixup(im, labels, im2, labels2):
    """Blend two same-size images with a Beta(32, 32) ratio (about 0.5) and keep both label sets."""
    r = np.random.beta(32.0, 32.0)
    im = (im.astype(np.float32) * r + im2.astype(np.float32) * (1 - r)).astype(np.uint8)
    return im, np.concatenate((labels, labels2), 0)


def mosaic_placement(i, xc, yc, w, h, s):
    """Where tile i (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of size (w, h) goes.

    Each tile touches the mosaic centre (xc, yc) with one corner and is cropped only by the 2s x 2s
    canvas edge. Returns (canvas slice xyxy, tile slice xyxy).
    """
    if i == 0:
        a = (max(xc - w, 0), max(yc - h, 0), xc, yc)
        b = (w - (a[2] - a[0]), h - (a[3] - a[1]), w, h)
    elif i == 1:
        a = (xc, max(yc - h, 0), min(xc + w, 2 * s), yc)
        b = (0, h - (a[3] - a[1]), min(w, a[2] - a[0]), h)
    elif i == 2:
        a = (max(xc - w, 0), yc, xc, min(2 * s, yc + h))
        b = (w - (a[2] - a[0]), 0, w, min(a[3] - a[1], h))
    else:
        a = (xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h))
        b = (0, 0, min(w, a[2] - a[0]), min(a[3] - a[1], h))
    return a, b


def mosaic4(tiles, s):
    """Paste 4 (image, xyxy labels [n, 5]) tiles around a random centre of a 2s x 2s grey canvas.

    Tiles are already resized so their long side is s. Labels are shifted into canvas pixels and
    clipped to it. Returns (canvas, labels); the caller crops it back to s with random_perspective.
    """
    xc, yc = (int(random.uniform(s // 2, 2 * s - s // 2)) for _ in range(2))
    canvas = np.full((2 * s, 2 * s, tiles[0][0].shape[2]), PAD_COLOR[0], dtype=np.uint8)
    out = []
    for i, (im, labels) in enumerate(tiles):
        h, w = im.shape[:2]
        (x1a, y1a, x2a, y2a), (x1b, y1b, x2b, y2b) = mosaic_placement(i, xc, yc, w, h, s)
        canvas[y1a:y2a, x1a:x2a] = im[y1b:y2b, x1b:x2b]
        labels = np.array(labels, dtype=np.float32).reshape(-1, 5)
        labels[:, [1, 3]] += x1a - x1b
        labels[:, [2, 4]] += y1a - y1b
        out.append(labels)
    labels = np.concatenate(out, 0)
    labels[:, 1:] = labels[:, 1:].clip(0, 2 * s)
    return canvas, labels


def random_flip(im, labels, flipud=0.0, fliplr=0.0):
    """Up-down / left-right flips with the given probabilities; labels [n, 5] are cls + xywhn."""
    if random.random() < flipud:
        im = np.flipud(im)
        labels[:, 2] = 1 - labels[:, 2]
    if random.random() < fliplr:
        im = np.fliplr(im)
        labels[:, 1] = 1 - labels[:, 1]
    return im, labels
