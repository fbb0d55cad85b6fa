"""Synthetic detection set: coloured shapes on textured backgrounds, in YOLO format.

The offline stage for training and for showing the distillation gain: classes come in pairs that
look alike when small (circle/ellipse, square/rectangle, hexagon/star), colours are random (not tied
to the class), sizes range from 16 to 64 px on ~128 px images, 1 to 4 shapes that may occlude each
other, so a small model learns it on 2 CPU cores in minutes (with Adam, data/hyps/hyp.shapes.yaml) while
a bigger one does clearly better. An earlier default (8-70 px objects, up to 8 per 160 px image) was
too hard for short CPU runs (yolov5n: mAP50-95 ~0.001 after 8 epochs with SGD); `--obj-size 8 70
--max-objects 8 --size 160` still makes it.

Every image is drawn from its own generator seeded by (seed, split, index): the same seed gives
byte-identical files. A shape hidden by more than MAX_OCCLUDED of its area is left out of the
image altogether; the label of a kept shape is its full box even where partly covered.

    python -m data.shapes_generator --out DIR --n-train 800 --n-val 200 --seed 0 --size 128
    python data/shapes_generator.py --out DIR     # the same, as a script
"""
import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

if not __package__:  # run as a script: the repository's packages are not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.logging import LOGGER  # noqa: E402

CLASSES = ("circle", "ellipse", "square", "rectangle", "hexagon", "star")
MIN_OBJ, MAX_OBJ = 16, 64  # object size range in pixels (long side of the shape)
MAX_OBJECTS = 4
SIZE = 128  # nominal image side
MAX_OCCLUDED = 0.6
SPLITS = {"train": 0, "val": 1}


def _outline(cls, size, angle, rng):
    """Polygon [k, 2] of a shape of the given size, centred on the origin and rotated by angle (rad)."""
    r = size / 2
    if cls in ("circle", "ellipse"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        b = r if cls == "circle" else r / rng.uniform(1.5, 2.2)
        pts = np.stack((r * np.cos(t), b * np.sin(t)), 1)
    elif cls in ("square", "rectangle"):
        b = r if cls == "square" else r / rng.uniform(1.5, 2.2)
        pts = np.array([(-r, -b), (r, -b), (r, b), (-r, b)]) * 0.8  # a side of 0.8 size: diagonal fits size
    elif cls == "hexagon":
        t = np.arange(6) * np.pi / 3
        pts = np.stack((r * np.cos(t), r * np.sin(t)), 1)
    else:  # five-pointed star: outer and inner radius alternate
        t = np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        pts = np.stack((rad * np.cos(t), rad * np.sin(t)), 1)
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _background(h, w, rng):
    """Noise, gradient or stripe texture between two random colours, float32 [h, w, 3]."""
    c1, c2 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # smooth noise: a coarse random grid upsampled
        g = rng.uniform(0, 1, (rng.integers(3, 9), rng.integers(3, 9))).astype(np.float32)
        t = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    else:
        a = rng.uniform(0, np.pi)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        u = (x * math.cos(a) + y * math.sin(a)) / max(h, w)
        t = u - u.min() if kind == 1 else 0.5 + 0.5 * np.sin(2 * np.pi * u * rng.uniform(3, 12))
        t = t / max(t.max(), 1e-6)
    return (c1 + (c2 - c1) * t[..., None]).astype(np.float32)


def _place(h, w, rng, obj_size, max_objects):
    """Random candidate shapes -> list of (class index, polygon in image pixels), fully inside the image."""
    objects = []
    s_min, s_max = obj_size[0], max(min(obj_size[1], 0.6 * min(h, w)), obj_size[0])
    for _ in range(rng.integers(1, max_objects + 1)):
        cls = int(rng.integers(len(CLASSES)))
        size = math.exp(rng.uniform(math.log(s_min), math.log(s_max)))  # log-uniform: as many small as large
        pts = _outline(CLASSES[cls], size, rng.uniform(0, 2 * np.pi), rng)
        lo, hi = pts.min(0), pts.max(0)
        centre = (rng.uniform(-lo[0], w - hi[0]), rng.uniform(-lo[1], h - hi[1]))
        objects.append((cls, pts + centre))
    return objects


def _mask(pts, h, w):
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return m.astype(bool)


def _drop_occluded(masks):
    """Indices (bottom to top) of shapes that stay visible enough; removing one only uncovers others."""
    keep = list(range(len(masks)))
    while keep:
        frac = []
        for j, i in enumerate(keep):
            above = np.zeros_like(masks[i])
            for k in keep[j + 1:]:
                above |= masks[k]
            frac.append((masks[i] & ~above).sum() / max(masks[i].sum(), 1))
        worst = int(np.argmin(frac))
        if frac[worst] >= 1 - MAX_OCCLUDED:
            break
        keep.pop(worst)
    return keep


def make_image(seed, split, index, size=SIZE, obj_size=(MIN_OBJ, MAX_OBJ), max_objects=MAX_OBJECTS):
    """One image and its labels: (BGR uint8 [h, w, 3], float [n, 5] cls + xywhn)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    h, w = (int(round(size * rng.uniform(0.8, 1.2))) for _ in range(2))
    im = _background(h, w, rng)
    objects = _place(h, w, rng, obj_size, max_objects)
    masks = [_mask(pts, h, w) for _, pts in objects]
    labels = []
    for i in _drop_occluded(masks):
        cls, pts = objects[i]
        region = im[masks[i]].mean(0)
        for _ in range(10):  # a colour that stands out from the background under the shape
            colour = rng.uniform(0, 255, 3)
            if np.linalg.norm(colour - region) > 90:
                break
        cv2.fillPoly(im, [np.round(pts * 16).astype(np.int32)], colour.tolist(), lineType=cv2.LINE_AA, shift=4)
        ys, xs = np.nonzero(masks[i])
        x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1  # full box, pixel edges
        labels.append((cls, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h))
    im += rng.standard_normal(im.shape, dtype=np.float32) * rng.uniform(2, 10)  # sensor-like noise everywhere
    return im.clip(0, 255).astype(np.uint8), np.array(labels, dtype=np.float64).reshape(-1, 5)


def generate(out, n_train=800, n_val=200, seed=0, size=SIZE, overwrite=False, obj_size=(MIN_OBJ, MAX_OBJ),
             max_objects=MAX_OBJECTS):
    """Write out/images/{train,val}/*.jpg and out/labels/{train,val}/*.txt; returns out.

    Files are written into a temporary folder first and moved in place at the end, so an
    interrupted run never leaves a half-made set behind.
    """
    out = Path(out)
    for sub in ("images", "labels"):
        if (out / sub).exists():
            if not overwrite:
                raise FileExistsError(f"{out / sub} exists; remove it or pass overwrite=True (--overwrite)")
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    # a private folder per call: two runs started together (e.g. benchmark jobs side by side) each build
    # their own copy, and the first to finish provides the set
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-shapes-{seed}-", dir=out))
    try:
        for split, n in (("train", n_train), ("val", n_val)):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            for i in range(n):
                im, labels = make_image(seed, split, i, size, obj_size, max_objects)
                cv2.imwrite(str(tmp / "images" / split / f"{i:06d}.jpg"), im, [cv2.IMWRITE_JPEG_QUALITY, 92])
                rows = "".join(f"{int(c)} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}\n" for c, x, y, bw, bh in labels)
                (tmp / "labels" / split / f"{i:06d}.txt").write_text(rows)
        for sub in ("images", "labels"):
            try:
                (tmp / sub).rename(out / sub)
            except OSError:  # the target exists and is not empty: another call finished first
                if not (out / sub).is_dir():
                    raise
                LOGGER.info(f"{out / sub}: already built by another process; discarding this copy")
    finally:  # also after an error or Ctrl-C: no temporary copy is left behind
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def download(data):
    """Hook named by shapes.yaml (`download: python:data.shapes_generator`): build the set at data['path']."""
    t = time.time()
    out = generate(data["path"])
    LOGGER.info(f"Generated the shapes data set in {out} ({time.time() - t:.1f}s)")


def parse_opt(argv=None):
    p = argparse.ArgumentParser(description="Generate the synthetic shapes detection data set (YOLO format).")
    p.add_argument("--out", required=True, help="output folder (images/ and labels/ are created inside)")
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=SIZE, help="nominal image side; each side varies +/-20%%")
    p.add_argument("--obj-size", type=float, nargs=2, default=[MIN_OBJ, MAX_OBJ], metavar=("MIN", "MAX"),
                   help="object size range in pixels (larger MIN: an easier set)")
    p.add_argument("--max-objects", type=int, default=MAX_OBJECTS, help="objects per image: 1 to this")
    p.add_argument("--overwrite", action="store_true", help="replace existing images/ and labels/")
    return p.parse_args(argv)


def main(argv=None):
    opt = parse_opt(argv)
    t = time.time()
    generate(opt.out, opt.n_train, opt.n_val, opt.seed, opt.size, opt.overwrite, tuple(opt.obj_size), opt.max_objects)
    LOGGER.info(f"{opt.n_train} train + {opt.n_val} val images in {opt.out} ({time.time() - t:.1f}s)")


if __name__ == "__main__":
    main()
