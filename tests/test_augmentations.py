"""Augmentations: letterbox geometry, and boxes that stay inside the image and on the drawn objects."""
import random

import cv2
import numpy as np
import pytest

from utils.augmentations import (augment_hsv, box_candidates, clipped_bbox, letterbox, mixup, mosaic4,
                                 random_flip, random_perspective)
from utils.dataloaders import LoadImagesAndLabels

BG = (40, 40, 40)
# saturated BGR colours, pairwise far apart and far from the background and the grey padding (114)
COLOURS = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255), (255, 255, 0)]


def colour_mask(im, colour, tol=70):
    """Pixels within tol of a colour (edges blended by interpolation fall outside)."""
    return np.linalg.norm(im.astype(np.float32) - np.array(colour, np.float32), axis=2) < tol


def check_tight(im, labels_xyxy, colours, tol=2.0):
    """Every box bounds its class colour tightly (within tol px), and lies inside the image."""
    h, w = im.shape[:2]
    for c, x1, y1, x2, y2 in labels_xyxy:
        assert -1e-3 <= x1 < x2 <= w + 1e-3 and -1e-3 <= y1 < y2 <= h + 1e-3
        m = colour_mask(im, colours[int(c)])
        # only the pixels of this colour near the box (another copy of the object may be elsewhere)
        xa, ya, xb, yb = int(max(x1 - 3, 0)), int(max(y1 - 3, 0)), int(min(x2 + 3, w)), int(min(y2 + 3, h))
        ys, xs = np.nonzero(m[ya:yb, xa:xb])
        assert len(xs), f"no pixels of class {c} in its box"
        got = np.array([xs.min() + xa, ys.min() + ya, xs.max() + xa + 1, ys.max() + ya + 1])
        assert np.abs(got - [x1, y1, x2, y2]).max() <= tol, (c, got, (x1, y1, x2, y2))


def scene(w=120, h=90):
    """A background with three filled boxes of classes 0-2, and their xyxy labels."""
    im = np.full((h, w, 3), BG, np.uint8)
    boxes = [(c, round(x1 * w / 120), round(y1 * h / 90), round(x2 * w / 120), round(y2 * h / 90))
             for c, x1, y1, x2, y2 in [(0, 10, 12, 50, 40), (1, 60, 20, 110, 80), (2, 30, 55, 48, 85)]]
    for c, x1, y1, x2, y2 in boxes:
        cv2.rectangle(im, (x1, y1), (x2 - 1, y2 - 1), COLOURS[c], -1)
    return im, np.array(boxes, np.float32)


# ----------------------------------------------------------------------------- letterbox

@pytest.mark.parametrize("hw", [(90, 120), (120, 90), (37, 200), (64, 64)])
def test_letterbox_shapes(hw):
    im = np.zeros((*hw, 3), np.uint8)
    out, ratio, (dw, dh) = letterbox(im, 96, auto=True, stride=32)
    assert out.shape[0] % 32 == 0 and out.shape[1] % 32 == 0 and max(out.shape[:2]) == 96
    out, ratio, (dw, dh) = letterbox(im, (64, 160), auto=False)
    assert out.shape[:2] == (64, 160)
    r = min(64 / hw[0], 160 / hw[1])
    assert ratio == (r, r)
    assert round(hw[1] * r) + 2 * dw == pytest.approx(160) and round(hw[0] * r) + 2 * dh == pytest.approx(64)
    out, _, _ = letterbox(im, 640, auto=False, scaleup=False)  # no enlargement, only padding
    assert out.shape[:2] == (640, 640) and (out == 114).sum() == 640 * 640 * 3 - hw[0] * hw[1] * 3
    out, ratio, pad = letterbox(im, (50, 70), auto=False, scaleFill=True)
    assert out.shape[:2] == (50, 70) and pad == (0, 0) and ratio == (70 / hw[1], 50 / hw[0])


def test_letterbox_keeps_boxes():
    im, boxes = scene()
    out, (rw, rh), (dw, dh) = letterbox(im, 160, auto=False)
    b = boxes.copy()
    b[:, [1, 3]] = b[:, [1, 3]] * rw + dw
    b[:, [2, 4]] = b[:, [2, 4]] * rh + dh
    check_tight(out, b, COLOURS)


# ----------------------------------------------------------------------------- geometric augmentations

def test_random_perspective_boxes_tight():
    """Rotated, sheared, scaled, projected objects (kept inside the frame): boxes bound the pixels."""
    random.seed(0)
    np.random.seed(0)
    im, boxes = scene(80, 80)
    im = cv2.copyMakeBorder(im, 60, 60, 60, 60, cv2.BORDER_CONSTANT, value=BG)  # objects in the middle
    boxes[:, 1:] += 60
    n_kept = 0
    for _ in range(25):
        out, lb = random_perspective(im, boxes, degrees=30, translate=0.05, scale=0.3, shear=8, perspective=0.0005)
        assert out.shape == im.shape
        check_tight(out, lb, COLOURS, tol=2.0)
        n_kept += len(lb)
    assert n_kept == 75  # nothing leaves the frame, nothing is dropped


def test_random_perspective_clips_inside():
    """Objects pushed partly out of the frame: boxes are clipped to the image and keep their pixels."""
    random.seed(1)
    im, boxes = scene()
    for _ in range(25):
        out, lb = random_perspective(im, boxes, degrees=20, translate=0.3, scale=0.2, shear=5)
        h, w = out.shape[:2]
        assert ((lb[:, 1:3] >= 0) & (lb[:, [3]] <= w) & (lb[:, [4]] <= h) & (lb[:, 1:3] < lb[:, 3:5])).all()
        for c, x1, y1, x2, y2 in lb:  # every pixel of the object near its box lies inside the box
            m = colour_mask(out, COLOURS[int(c)])[int(max(y1 - 5, 0)):int(y2 + 5), int(max(x1 - 5, 0)):int(x2 + 5)]
            ys, xs = np.nonzero(m)
            assert len(xs) and xs.min() + max(x1 - 5, 0) >= x1 - 1.5 and xs.max() + max(x1 - 5, 0) < x2 + 1.5


def test_clipped_bbox_exact():
    diamond = np.array([[50.0, -20], [80, 10], [50, 40], [20, 10]])  # top corner above the image
    np.testing.assert_allclose(clipped_bbox(diamond, 100, 100), [20, 0, 80, 40])  # not y1 = -20 clipped at 0
    np.testing.assert_allclose(clipped_bbox(diamond, 60, 100), [20, 0, 60, 40])
    tip = np.array([[90.0, 90], [130, 90], [130, 130]])  # only the corner (100..., 100) region is inside
    np.testing.assert_allclose(clipped_bbox(tip, 100, 100), [90, 90, 100, 100])
    np.testing.assert_allclose(clipped_bbox(diamond + 500, 100, 100), [0, 0, 0, 0])
    x_tip = np.array([[0.0, 95], [40, 105], [0, 115]])  # a triangle poking in from below: tip at x=20, y=100
    np.testing.assert_allclose(clipped_bbox(x_tip, 100, 100), [0, 95, 20, 100])


def test_flip_boxes_tight():
    im, boxes = scene()
    h, w = im.shape[:2]
    lb = boxes.copy()
    lb[:, 1:] = np.stack(((boxes[:, 1] + boxes[:, 3]) / 2 / w, (boxes[:, 2] + boxes[:, 4]) / 2 / h,
                          (boxes[:, 3] - boxes[:, 1]) / w, (boxes[:, 4] - boxes[:, 2]) / h), 1)
    out, lb = random_flip(im.copy(), lb, flipud=1.0, fliplr=1.0)
    xyxy = np.stack((lb[:, 0], (lb[:, 1] - lb[:, 3] / 2) * w, (lb[:, 2] - lb[:, 4] / 2) * h,
                     (lb[:, 1] + lb[:, 3] / 2) * w, (lb[:, 2] + lb[:, 4] / 2) * h), 1)
    check_tight(np.ascontiguousarray(out), xyxy, COLOURS, tol=0.01)


def test_mosaic4_placement():
    random.seed(1)
    tiles = []
    for i in range(4):
        im, boxes = scene(100 - 10 * i, 80 + 5 * i)
        tiles.append((im, boxes))
    canvas, labels = mosaic4(tiles, 100)
    assert canvas.shape == (200, 200, 3) and len(labels) == 12
    # clipped boxes may be empty; the visible ones are tight
    visible = labels[(labels[:, 3] - labels[:, 1] > 1) & (labels[:, 4] - labels[:, 2] > 1)]
    check_tight(canvas, visible, COLOURS, tol=0.01)


def test_box_candidates():
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 100, 100]], float).T
    after = np.array([[0, 0, 9, 9], [0, 0, 2, 9], [0, 0, 3, 3], [0, 0, 100, 0.9]], float).T
    assert box_candidates(before, after).tolist() == [True, False, False, False]


def test_hsv_and_mixup():
    np.random.seed(0)
    im, boxes = scene()
    out = augment_hsv(im.copy(), 0.5, 0.7, 0.4)
    assert out.shape == im.shape and out.dtype == np.uint8 and not np.array_equal(out, im)
    same = augment_hsv(im.copy(), 0, 0, 0)
    assert np.array_equal(same, im)
    mixed, lb = mixup(im, boxes, np.zeros_like(im), boxes[:1])
    assert len(lb) == 4 and mixed.dtype == np.uint8 and (mixed <= im).all()


# ----------------------------------------------------------------------------- through the dataset

@pytest.fixture
def coloured_set(tmp_path):
    """3 images with 2 boxes each: 6 distinct class colours (class = colour index), no overlaps, and a
    6 px margin so that copies of one image in a mosaic never touch each other."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(3):
        w, h = int(rng.integers(70, 100)), int(rng.integers(60, 100))
        im = np.full((h, w, 3), BG, np.uint8)
        rows = []
        for c, x_lo, x_hi in ((i, 6, w // 2), (i + 3, w // 2 + 1, w - 6)):  # left half, right half
            bw, bh = int(rng.integers(10, x_hi - x_lo)), int(rng.integers(10, h - 12))
            x1, y1 = int(rng.integers(x_lo, x_hi - bw + 1)), int(rng.integers(6, h - 6 - bh + 1))
            cv2.rectangle(im, (x1, y1), (x1 + bw - 1, y1 + bh - 1), COLOURS[c], -1)
            rows.append(f"{c} {(x1 + bw / 2) / w} {(y1 + bh / 2) / h} {bw / w} {bh / h}")
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), im)
        (tmp_path / "labels" / f"{i}.txt").write_text("\n".join(rows) + "\n")
    return tmp_path / "images"


@pytest.mark.parametrize("mosaic", [1.0, 0.0])
def test_dataset_augment_labels_follow_pixels(coloured_set, mosaic):
    # the default hyps' geometry (no rotation/shear: rotated objects cut by the frame get thin tips
    # whose pixels fade out, see test_random_perspective_clips_inside), plus up-down flips
    hyp = dict(hsv_h=0, hsv_s=0, hsv_v=0, degrees=0, translate=0.1, scale=0.5, shear=0, perspective=0.0,
               flipud=0.5, fliplr=0.5, mosaic=mosaic, mixup=0.0)
    ds = LoadImagesAndLabels(coloured_set, img_size=128, augment=True, hyp=hyp)
    random.seed(0)
    np.random.seed(0)
    n = 0
    for k in range(12):
        im, labels, _, shapes = ds[k % len(ds)]
        assert (shapes is None) == (mosaic == 1.0)
        im = np.ascontiguousarray(im.numpy().transpose(1, 2, 0)[:, :, ::-1])  # back to HWC BGR
        h, w = im.shape[:2]
        assert (h, w) == (128, 128)
        lb = labels[:, 1:].numpy()
        assert ((lb[:, 1:] >= 0) & (lb[:, 1:] <= 1)).all()
        xyxy = np.stack((lb[:, 0], (lb[:, 1] - lb[:, 3] / 2) * w, (lb[:, 2] - lb[:, 4] / 2) * h,
                         (lb[:, 1] + lb[:, 3] / 2) * w, (lb[:, 2] + lb[:, 4] / 2) * h), 1)
        check_tight(im, xyxy, COLOURS, tol=2.0)
        n += len(lb)
    assert n >= 12


def test_rect_batch_shapes_stride_multiples(coloured_set):
    ds = LoadImagesAndLabels(coloured_set, img_size=100, batch_size=2, rect=True, stride=32, pad=0.5)
    assert (ds.batch_shapes % 32 == 0).all()
    for i in range(len(ds)):
        im, _, _, ((h0, w0), ((rh, rw), (dw, dh))) = ds[i]
        assert tuple(im.shape[1:]) == tuple(ds.batch_shapes[ds.batch[i]])
        assert round(h0 * rh) + 2 * dh == pytest.approx(im.shape[1]) and round(w0 * rw) + 2 * dw == pytest.approx(im.shape[2])
