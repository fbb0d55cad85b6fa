"""Image lists and YOLO label files: finding the images of a split, checking each image/label pair, and
the JSON cache of the checks (keyed on paths, sizes and modification times; reading it runs no code).

Labels are .txt files found from the image path by replacing the last /images/ with /labels/ (see
img2label_paths); one row per object `class x_center y_center width height`, normalised to [0, 1].
"""
import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.files import as_list
from utils.logging import LOGGER

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp")
NUM_THREADS = min(8, max(1, (os.cpu_count() or 1) - 1))
CACHE_VERSION = 1
COORD_TOL = 1e-3  # label coordinates may leave [0, 1] by this much (rounding) before a file is corrupt
MIN_IMAGE_SIDE = 10
MAX_WARNINGS = 10
STATUSES = ("found", "missing", "empty", "corrupt")  # of an image/label pair after the check


def img2label_paths(img_paths):
    """/a/images/b/c.jpg -> /a/labels/b/c.txt (the last /images/ component); no images/ -> beside it."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    out = []
    for p in map(str, img_paths):
        head, sep, tail = p.rpartition(sa)
        p = head + sb + tail if sep else p
        out.append(os.path.splitext(p)[0] + ".txt")
    return out


def list_image_files(path, prefix=""):
    """A folder (recursive), a .txt list of image paths (relative to the list's folder), an image file,
    or a list of those -> sorted image paths. Errors name the missing path."""
    files = []
    for p in as_list(path):
        p = Path(str(p)).expanduser()
        if p.is_dir():
            files += [str(f) for f in p.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS and f.is_file()]
        elif p.is_file() and p.suffix == ".txt":
            lines = [x.strip() for x in p.read_text().splitlines() if x.strip()]
            files += [str(f if (f := Path(x)).is_absolute() else (p.parent / f).resolve()) for x in lines]
        elif p.is_file() and p.suffix[1:].lower() in IMG_FORMATS:
            files.append(str(p))
        else:
            raise FileNotFoundError(f"{prefix}{p} does not exist (expected a folder, a .txt list or an image)")
    files = sorted(set(f for f in files if f.rsplit(".", 1)[-1].lower() in IMG_FORMATS))
    if not files:
        raise FileNotFoundError(f"{prefix}No images found in {path}")
    return files


def _image_shape(im_file):
    """Verify an image without decoding all of it; returns (w, h) after EXIF rotation. Raises on bad files."""
    with Image.open(im_file) as im:
        im.verify()  # structure / checksum check
    with Image.open(im_file) as im:
        fmt = (im.format or "").lower()
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation with a 90 degree turn
            w, h = h, w
    if fmt not in IMG_FORMATS and fmt != "mpo":
        raise ValueError(f"unsupported image format {fmt}")
    if min(w, h) < MIN_IMAGE_SIDE:
        raise ValueError(f"image size {w}x{h} < {MIN_IMAGE_SIDE} pixels")
    if fmt in ("jpeg", "mpo"):
        with open(im_file, "rb") as f:
            f.seek(-2, 2)
            if f.read() != b"\xff\xd9":
                raise ValueError("truncated JPEG (no end-of-image marker)")
    return w, h


def _parse_label_rows(lb_file):
    """Label file -> float32 [k, 5] (cls, x, y, w, h) and a note; raises ValueError naming the bad row."""
    rows = []
    for n, line in enumerate(Path(lb_file).read_text().splitlines(), 1):
        if not line.strip():
            continue
        values = line.split()
        if len(values) != 5:
            raise ValueError(f"row {n} has {len(values)} values, expected 5 (class x y w h)")
        try:
            row = [float(v) for v in values]
        except ValueError:
            raise ValueError(f"row {n} is not numeric: {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in row):
            raise ValueError(f"row {n} has a non-finite value")
        if row[0] < 0 or row[0] != int(row[0]):
            raise ValueError(f"row {n}: class {values[0]} is not a non-negative integer")
        if min(row[1:]) < -COORD_TOL or max(row[1:]) > 1 + COORD_TOL:
            raise ValueError(f"row {n}: coordinates '{' '.join(values[1:])}' outside [0, 1] (not normalised?)")
        rows.append(row)
    lb = np.array(rows, dtype=np.float32).reshape(-1, 5)
    lb[:, 1:] = lb[:, 1:].clip(0, 1)
    note = ""
    _, first = np.unique(lb, axis=0, return_index=True)
    if len(first) < len(lb):
        note = f"{len(lb) - len(first)} duplicate label rows removed"
        lb = lb[np.sort(first)]
    return lb, note


def verify_image_label(im_file, lb_file):
    """Check one image/label pair -> dict(status found|missing|empty|corrupt, shape (w, h), labels, msg)."""
    out = {"im": im_file, "status": "corrupt", "shape": [0, 0], "labels": [], "msg": ""}
    try:
        out["shape"] = list(_image_shape(im_file))
        if not os.path.isfile(lb_file):
            out["status"] = "missing"
            return out
        lb, out["msg"] = _parse_label_rows(lb_file)
        out["labels"] = lb.tolist()
        out["status"] = "found" if len(lb) else "empty"
    except Exception as e:  # any failure marks just this file as corrupt
        out["msg"] = f"ignoring corrupt image/label: {e}"
    return out


def _files_hash(files):
    """Hash of paths, sizes and modification times: any change to the file set rebuilds the cache."""
    h = hashlib.sha256()
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        except OSError:
            h.update(f"{f}\0-\0".encode())
    return h.hexdigest()


def _load_cache(cache_path, key, im_files):
    """JSON cache (never executes code) -> list of entries, or None when absent, stale or malformed."""
    try:
        c = json.loads(Path(cache_path).read_text())
        entries = c["entries"]
        if c["version"] == CACHE_VERSION and c["hash"] == key and len(entries) == len(im_files) and all(
                e["im"] == f and e["status"] in STATUSES and len(e["shape"]) == 2 and isinstance(e["labels"], list)
                for e, f in zip(entries, im_files)):
            return entries
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    return None


def _save_cache(cache_path, key, entries, prefix=""):
    cache_path = Path(cache_path)
    tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "hash": key, "entries": entries}))
        os.replace(tmp, cache_path)  # atomic: a reader never sees half a cache
        LOGGER.info(f"{prefix}New cache created: {cache_path}")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        LOGGER.warning(f"{prefix}WARNING ⚠️ Cache directory {cache_path.parent} is not writeable: {e}")


def _cache_path(path, im_files, label_files):
    """labels/<split>.cache for a folder, <list>.cache for a .txt list; a hashed name for several sources."""
    sources = as_list(path)
    p = Path(str(sources[0]))
    if p.is_file():
        base = p.with_suffix(".cache")
    else:  # the labels folder matching an images folder
        base = Path(img2label_paths([str(p / "x.jpg")])[0]).parent.with_suffix(".cache")
    if not base.parent.is_dir():  # no labels folder there: beside the first label folder, else the images
        lb_dir = Path(label_files[0]).parent
        base = lb_dir.with_suffix(".cache") if lb_dir.is_dir() else Path(im_files[0]).parent.with_suffix(".cache")
    if len(sources) > 1:
        tag = hashlib.sha256("\n".join(map(str, sources)).encode()).hexdigest()[:8]
        base = base.with_name(f"{base.stem}-{tag}.cache")
    return base


def scan_labels(path, im_files, label_files, prefix=""):
    """Verified entries for all pairs, from the cache when it matches the files, else by checking each."""
    cache_path = _cache_path(path, im_files, label_files)
    key = _files_hash(im_files + label_files)
    entries = _load_cache(cache_path, key, im_files)
    if entries is not None:
        return entries, cache_path, True
    with ThreadPoolExecutor(NUM_THREADS) as pool:
        it = pool.map(verify_image_label, im_files, label_files)
        entries = list(tqdm(it, total=len(im_files), desc=f"{prefix}Scanning {cache_path.parent}",
                            disable=len(im_files) < 2000))
    _save_cache(cache_path, key, entries, prefix)
    return entries, cache_path, False


_WARNED = set()  # (image, message) pairs already warned about: a list scanned as train and val warns once


def report_scan(entries, where, from_cache, prefix):
    counts = dict.fromkeys(STATUSES, 0)
    for e in entries:
        counts[e["status"]] += 1
    LOGGER.info(f"{prefix}Scanning {where}... {counts['found']} found, {counts['missing']} missing, "
                f"{counts['empty']} empty, {counts['corrupt']} corrupt" + (" (from cache)" if from_cache else ""))
    new = [(e["im"], e["msg"]) for e in entries if e["msg"] and (e["im"], e["msg"]) not in _WARNED]
    _WARNED.update(new)
    msgs = [f"{prefix}WARNING ⚠️ {im}: {msg}" for im, msg in new]
    for m in msgs[:MAX_WARNINGS]:
        LOGGER.warning(m)
    if len(msgs) > MAX_WARNINGS:
        LOGGER.warning(f"{prefix}... and {len(msgs) - MAX_WARNINGS} more warnings")
    return counts
