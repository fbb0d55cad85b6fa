"""Data sets for training and validation: data yaml checking, label verification with a cache, the
augmenting Dataset and the DataLoader factory.

Conventions: labels are YOLO .txt files found from the image path by replacing the last /images/
with /labels/ (see img2label_paths); one row per object `class x_center y_center width height`,
normalised to [0, 1]. Images are kept BGR internally (cv2) and leave the loader as RGB uint8 CHW.

Runtime switches: `dataset.mosaic = False` (close-mosaic) is read in __getitem__, but DataLoader
workers hold a copy of the dataset made when an iterator starts. The loader is built with
persistent_workers=False, so the change takes effect at the next `iter(loader)` (the next epoch);
a trainer that keeps one iterator alive across epochs must recreate it.
"""
import hashlib
import importlib
import json
import math
import os
import random
import re
import shutil
import tarfile
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, distributed
from tqdm import tqdm

from utils.augmentations import augment_hsv, letterbox, mixup, mosaic4, random_flip, random_perspective
from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.files import ROOT, find_file, yaml_load
from utils.logging import LOGGER, UserError
from utils.torch_utils import torch_distributed_zero_first

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp")
NUM_THREADS = min(8, max(1, (os.cpu_count() or 1) - 1))
DATASETS_DIR = ROOT / "datasets"  # where a relative yaml `path` lives (upstream's ../datasets)
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


# ----------------------------------------------------------------------------- data yaml

def _names_list(names, src):
    """names as a list or {index: name} -> list; dict keys must be 0..n-1."""
    if isinstance(names, dict):
        keys = sorted(int(k) for k in names)
        if keys != list(range(len(keys))):
            raise ValueError(f"{src}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
        return [str(names[k] if k in names else names[str(k)]) for k in keys]
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    raise ValueError(f"{src}: 'names' must be a list or a {{index: name}} mapping, got {type(names).__name__}")


def _dataset_root(path, yaml_file):
    """Absolute data set root: absolute stays; relative resolves under ROOT/datasets."""
    if path in (None, ""):
        return Path(yaml_file).parent.resolve() if yaml_file else Path.cwd()
    p = Path(str(path)).expanduser()
    if p.is_absolute():
        return p
    parts = p.parts
    if parts[:2] == ("..", "datasets"):  # upstream yaml files say ../datasets/<name>
        p = Path(*parts[2:]) if len(parts) > 2 else Path()
    return (DATASETS_DIR / p).resolve()


def _resolve_split(value, root):
    """A split entry (str or list of str) -> absolute path string(s)."""
    if value in (None, ""):
        return None
    if isinstance(value, (list, tuple)):
        return [str(root / v) for v in value]
    return str(root / value)


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def check_dataset(data, autodownload=True):
    """Load and check a data yaml (name, path or dict): absolute paths, names list, nc; fetch if missing.

    Returns a dict with absolute `path`, `train`, `val`, `test` (str, list or None), `names` (list),
    `nc`, and `yaml_file`. A missing split triggers the yaml's `download` step (see _run_download).
    """
    yaml_file = None
    if isinstance(data, (str, Path)):
        yaml_file = find_file(data)
        d = yaml_load(yaml_file)
    elif isinstance(data, dict):
        d = dict(data)
    else:
        raise TypeError(f"check_dataset expects a yaml path or a dict, got {type(data).__name__}")
    src = str(yaml_file or "data dict")
    for k in ("train", "val", "names"):
        if k not in d:
            raise ValueError(f"{src}: missing required key '{k}'")
    names = _names_list(d["names"], src)
    if d.get("nc") is not None and int(d["nc"]) != len(names):
        raise ValueError(f"{src}: nc={d['nc']} but {len(names)} names are given")
    root = _dataset_root(d.get("path"), yaml_file)
    d.update(path=str(root), names=names, nc=len(names), yaml_file=yaml_file and str(yaml_file))
    for k in ("train", "val", "test"):
        d[k] = _resolve_split(d.get(k), root)

    missing = [p for k in ("train", "val") for p in _as_list(d[k]) if not Path(p).exists()]
    if missing:
        if not (autodownload and d.get("download")):
            raise FileNotFoundError(f"{src}: data set not found: {', '.join(missing)}"
                                    " (and no 'download' step is given)")
        LOGGER.info(f"Data set not found ({', '.join(missing)}), running the download step of {src}")
        _run_download(d["download"], d, src)
        still = [p for p in _as_list(d["val"]) if not Path(p).exists()]
        if still:
            raise FileNotFoundError(f"{src}: download step ran but {', '.join(still)} is still missing")
        for p in _as_list(d["train"]):
            if not Path(p).exists():
                LOGGER.warning(f"WARNING ⚠️ {src}: train split {p} is missing")
    return d


# ----------------------------------------------------------------------------- download steps

def _run_download(spec, d, src):
    """Run a yaml `download` step. Allowed forms (nothing from the yaml is executed as code):

    - 'python:data.<module>': calls download(data_dict) of that module of this repository's data/ package
    - a URL, or a list of URLs / {url, dir} items: archives unpacked into `dir` relative to `path`
      (default: the parent of `path`, as archives hold the set's top folder)
    - {urls: <list as above>, convert: voc}: then converts Pascal VOC xml annotations to YOLO labels
    """
    if isinstance(spec, str) and spec.startswith("python:"):
        m = re.fullmatch(r"python:data\.([A-Za-z_]\w*)", spec.strip())
        if not m or not (ROOT / "data" / f"{m.group(1)}.py").is_file():
            raise ValueError(f"{src}: download hook '{spec}' must name a module of {ROOT / 'data'}")
        module = importlib.import_module(f"data.{m.group(1)}")
        if Path(module.__file__).resolve().parent != (ROOT / "data").resolve():
            raise ValueError(f"{src}: 'data.{m.group(1)}' does not resolve inside {ROOT / 'data'}")
        module.download(d)
        return
    convert = None
    if isinstance(spec, dict):
        spec, convert = spec.get("urls", []), spec.get("convert")
    root = Path(d["path"])
    if convert == "voc" and (root / "images" / "VOCdevkit").is_dir():
        spec = []  # already unpacked (e.g. by hand, offline): only convert
    for item in _as_list(spec):
        url, sub = (item.get("url"), item.get("dir")) if isinstance(item, dict) else (item, None)
        dest = (root / sub).resolve() if sub else root.parent.resolve()
        if not str(url).startswith(("http://", "https://")) or not dest.is_relative_to(root.parent.resolve()):
            raise ValueError(f"{src}: bad download item {item!r} (need an http(s) URL and a relative dir)")
        _fetch_and_unpack(url, dest, src)
    if convert == "voc":
        _voc_to_yolo(root, d["names"])
    elif convert:
        raise ValueError(f"{src}: unknown download convert step '{convert}' (known: voc)")


def _fetch_and_unpack(url, dest, src):
    """Download an archive into dest and unpack it there; an archive already in dest (put there by hand) is
    unpacked and kept, a downloaded one is deleted once unpacked."""
    dest.mkdir(parents=True, exist_ok=True)
    f = dest / Path(url).name
    by_hand = f.is_file()
    if by_hand:
        LOGGER.info(f"Unpacking {f} (already present)")
    else:
        _fetch(url, f, src)
    if f.suffix == ".zip":
        with zipfile.ZipFile(f) as z:
            for info in z.infolist():  # every entry checked before anything is written
                _check_archive_entry(f, info.filename)
            z.extractall(dest)
    elif f.name.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(f) as t:
            members = t.getmembers()
            for m in members:
                _check_archive_entry(f, m.name)
                if m.issym() or m.islnk():
                    _check_archive_entry(f, m.linkname, f"link '{m.name}' ->")
                elif not (m.isfile() or m.isdir()):
                    raise ValueError(f"{f}: entry '{m.name}' is not a file or folder; refusing to unpack the archive")
            t.extractall(dest, members=members, filter="data")
    else:
        return
    if not by_hand:
        f.unlink()


def _check_archive_entry(archive, name, what="entry"):
    """Refuse an archive entry (or link target) that is absolute or climbs out with '..': it would land
    outside the set's folder (zipfile silently drops such parts, tarfile's data filter stops halfway)."""
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise ValueError(f"{archive}: {what} '{name}' points outside the folder it unpacks into; refusing to unpack "
                         f"the archive (nothing was unpacked)")


def _fetch(url, f, src):
    LOGGER.info(f"Downloading {url} to {f}...")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(f.with_suffix(".part"), "wb") as out:
            shutil.copyfileobj(r, out)
        os.replace(f.with_suffix(".part"), f)
    except OSError as e:
        f.with_suffix(".part").unlink(missing_ok=True)
        raise ConnectionError(f"Download of {url} failed ({e}). Without network, fetch it by hand and put it "
                              f"at {f} (it is unpacked on the next use of {src}).") from e


def _voc_to_yolo(root, names):
    """VOCdevkit (unpacked under root/images) -> images/<split><year>/ + labels/<split><year>/ YOLO files."""
    devkit = root / "images" / "VOCdevkit"
    for year, split in (("2012", "train"), ("2012", "val"), ("2007", "train"), ("2007", "val"), ("2007", "test")):
        voc = devkit / f"VOC{year}"
        ids = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        im_dir, lb_dir = root / "images" / f"{split}{year}", root / "labels" / f"{split}{year}"
        im_dir.mkdir(parents=True, exist_ok=True)
        lb_dir.mkdir(parents=True, exist_ok=True)
        for i in tqdm(ids, desc=f"VOC{year} {split}"):
            tree = ET.parse(voc / "Annotations" / f"{i}.xml").getroot()
            w, h = (int(tree.find("size").find(k).text) for k in ("width", "height"))
            rows = []
            for obj in tree.iter("object"):
                name, difficult = obj.find("name").text, obj.find("difficult")
                if name not in names or (difficult is not None and int(difficult.text)):
                    continue
                b = [float(obj.find("bndbox").find(k).text) for k in ("xmin", "xmax", "ymin", "ymax")]
                # VOC pixels are 1-based inclusive: shift the centre by one pixel, as upstream does
                x, y = ((b[0] + b[1]) / 2 - 1) / w, ((b[2] + b[3]) / 2 - 1) / h
                rows.append(f"{names.index(name)} {x:.6f} {y:.6f} {(b[1] - b[0]) / w:.6f} {(b[3] - b[2]) / h:.6f}")
            (lb_dir / f"{i}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
            (voc / "JPEGImages" / f"{i}.jpg").rename(im_dir / f"{i}.jpg")


# ----------------------------------------------------------------------------- image lists and label checks

def list_image_files(path, prefix=""):
    """A folder (recursive), a .txt list of image paths (relative to the list's folder), an image file,
    or a list of those -> sorted image paths. Errors name the missing path."""
    files = []
    for p in _as_list(path):
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
    sources = _as_list(path)
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


def _report(entries, where, from_cache, prefix):
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


# ----------------------------------------------------------------------------- dataset

class ImageLoadError(OSError):
    """An image that passed the scan but cannot be read now."""


class LoadImagesAndLabels(Dataset):
    """Images + YOLO labels, with mosaic/perspective/HSV/flip/mixup augmentation when augment=True.

    Attributes (read by the trainer, val.py and autoanchor): im_files, label_files, labels (list of float32 [k, 5] cls + xywhn),
    shapes (int [N, 2] original w, h), mosaic (bool, may be switched off at runtime), and for rect
    batches batch_shapes ([nb, 2] h, w) with batch (image -> batch index).
    """

    def __init__(self, path, img_size=640, batch_size=16, augment=False, hyp=None, rect=False,
                 image_weights=False, cache_images=False, single_cls=False, stride=32, pad=0.0, prefix="",
                 nc=None):
        self.img_size, self.augment, self.rect, self.stride = img_size, augment, rect, stride
        self.hyp = _load_hyp(hyp) if augment else (hyp or {})
        self.mosaic = augment and not rect  # rect batches and a 4-image mosaic exclude each other
        self.mosaic_border = (-img_size // 2, -img_size // 2)
        self.prefix = prefix
        if image_weights:
            LOGGER.warning(f"{prefix}WARNING ⚠️ image_weights is not implemented and is ignored")
        if augment and self.hyp.get("copy_paste", 0) > 0:
            LOGGER.warning(f"{prefix}WARNING ⚠️ copy_paste needs segment labels and is ignored")

        im_files = list_image_files(path, prefix)
        label_files = img2label_paths(im_files)
        entries, cache_path, from_cache = scan_labels(path, im_files, label_files, prefix)
        if nc is not None and not single_cls:  # the class range depends on the data yaml: checked after the cache
            for e in entries:
                if e["status"] == "found" and max(row[0] for row in e["labels"]) >= nc:
                    e.update(status="corrupt", labels=[], msg=f"ignoring corrupt image/label: class >= nc={nc}")
        counts = _report(entries, cache_path.parent / cache_path.stem, from_cache, prefix)
        good = [i for i, e in enumerate(entries) if e["status"] != "corrupt"]
        if not good:
            raise UserError(f"{prefix}No usable images in {path}: {counts['corrupt']} corrupt of "
                               f"{len(entries)} (see the warnings above)")
        if counts["found"] == 0 and augment:
            LOGGER.warning(f"{prefix}WARNING ⚠️ No labels found in {path}: training will learn nothing")
        self.im_files = [im_files[i] for i in good]
        self.label_files = [label_files[i] for i in good]
        self.labels = [np.array(entries[i]["labels"], dtype=np.float32).reshape(-1, 5) for i in good]
        self.shapes = np.array([entries[i]["shape"] for i in good], dtype=np.int64).reshape(-1, 2)
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        n = len(self.im_files)
        self.indices = range(n)
        self.batch = np.floor(np.arange(n) / batch_size).astype(int)
        if rect:
            self._set_rect_batches(batch_size, pad)

        self.ims = [None] * n  # RAM cache of resized images
        self.hw0, self.hw = [None] * n, [None] * n
        self.npy_files = [str(Path(f).with_suffix(".npy")) for f in self.im_files]
        if cache_images:
            self._cache_images("ram" if cache_images is True else str(cache_images).lower())

    def _set_rect_batches(self, batch_size, pad):
        """Sort by aspect ratio and give every batch one stride-multiple (h, w) that fits its images."""
        ar = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
        order = ar.argsort()
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.shapes, ar = self.shapes[order], ar[order]
        nb = int(self.batch[-1]) + 1
        shapes = np.ones((nb, 2))
        for b in range(nb):
            a = ar[self.batch == b]
            if a.max() < 1:  # all wide: height shrinks to the tallest image
                shapes[b] = (a.max(), 1)
            elif a.min() > 1:  # all tall: width shrinks to the widest image
                shapes[b] = (1, 1 / a.min())
        self.batch_shapes = (np.ceil(shapes * self.img_size / self.stride + pad).astype(int) * self.stride)

    def _cache_images(self, mode):
        if mode not in ("ram", "disk"):
            raise ValueError(f"cache must be 'ram', 'disk' or False, got {mode!r}")
        if mode == "ram" and not self._ram_fits():
            return
        fn = self._save_npy if mode == "disk" else self.load_image
        nbytes = 0
        with ThreadPoolExecutor(NUM_THREADS) as pool:
            for i, x in enumerate(pool.map(fn, range(len(self)))):
                if mode == "ram":
                    self.ims[i], self.hw0[i], self.hw[i] = x
                    nbytes += x[0].nbytes
        LOGGER.info(f"{self.prefix}Cached {len(self)} images ({mode}" +
                    (f", {nbytes / 1e9:.2f} GB)" if mode == "ram" else ", .npy beside the images)"))

    def _ram_fits(self, margin=0.3):
        """Estimate the RAM cache size from a few images; skip caching (with a warning) when it won't fit."""
        k = min(len(self), 30)
        b = sum(self.load_image(random.randrange(len(self)))[0].nbytes for _ in range(k)) / k * len(self)
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return True
        if b * (1 + margin) > avail:
            LOGGER.warning(f"{self.prefix}WARNING ⚠️ RAM cache needs {b / 1e9:.1f} GB, {avail / 1e9:.1f} GB free:"
                           " not caching")
            return False
        return True

    def _save_npy(self, i):
        f = Path(self.npy_files[i])
        if not f.exists():
            im = cv2.imread(self.im_files[i])
            if im is not None:
                np.save(f, im)

    def __len__(self):
        return len(self.im_files)

    def load_image(self, i):
        """Image i resized so its long side is img_size -> (BGR image, (h0, w0), (h, w)). Raises ImageLoadError."""
        if self.ims[i] is not None:
            return self.ims[i], self.hw0[i], self.hw[i]
        im = None
        if os.path.isfile(self.npy_files[i]):
            try:
                im = np.load(self.npy_files[i], allow_pickle=False)
            except (OSError, ValueError):
                im = None
        if im is None:
            im = cv2.imread(self.im_files[i])  # BGR, EXIF orientation applied
        if im is None or im.ndim != 3 or min(im.shape[:2]) == 0:
            raise ImageLoadError(f"cannot read image {self.im_files[i]}")
        h0, w0 = im.shape[:2]
        r = self.img_size / max(h0, w0)
        if r != 1:
            interp = cv2.INTER_LINEAR if (self.augment or r > 1) else cv2.INTER_AREA
            im = cv2.resize(im, (max(1, round(w0 * r)), max(1, round(h0 * r))), interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    def load_mosaic(self, index):
        """Mosaic of image `index` and 3 random others, cut back to img_size by random_perspective."""
        s, hyp = self.img_size, self.hyp
        indices = [index] + random.choices(self.indices, k=3)
        random.shuffle(indices)
        tiles = []
        for i in indices:
            im, _, (h, w) = self.load_image(i)
            lb = self.labels[i].copy()
            lb[:, 1:] = xywhn2xyxy(lb[:, 1:], w, h)
            tiles.append((im, lb))
        im, labels = mosaic4(tiles, s)
        return random_perspective(im, labels, degrees=hyp["degrees"], translate=hyp["translate"],
                                  scale=hyp["scale"], shear=hyp["shear"], perspective=hyp["perspective"],
                                  border=self.mosaic_border)

    def __getitem__(self, index):
        """-> (image uint8 [3, H, W] RGB, labels [n, 6] (0, cls, xywhn), path, shapes or None for mosaic)."""
        for _ in range(10):
            try:
                return self._get(index)
            except ImageLoadError as e:  # unreadable since the scan: warn, use another image
                LOGGER.warning(f"{self.prefix}WARNING ⚠️ {e}; using another image instead")
                index = random.randrange(len(self))
        raise UserError(f"{self.prefix}10 images in a row could not be read; is the data set still there?")

    def _get(self, index):
        index = self.indices[index]
        hyp = self.hyp
        if self.mosaic and random.random() < hyp["mosaic"]:
            im, labels = self.load_mosaic(index)
            shapes = None
            if random.random() < hyp["mixup"]:
                im, labels = mixup(im, labels, *self.load_mosaic(random.choice(self.indices)))
        else:
            im, (h0, w0), (h, w) = self.load_image(index)
            shape = tuple(int(x) for x in self.batch_shapes[self.batch[index]]) if self.rect else self.img_size
            im, ratio, pad = letterbox(im, shape, auto=False, scaleup=self.augment)
            shapes = (h0, w0), ((h / h0, w / w0), pad)  # for rescaling predictions to the original image
            labels = self.labels[index].copy()
            if labels.size:
                labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
            if self.augment:
                im, labels = random_perspective(im, labels, degrees=hyp["degrees"], translate=hyp["translate"],
                                                scale=hyp["scale"], shear=hyp["shear"],
                                                perspective=hyp["perspective"])
        labels = np.asarray(labels, dtype=np.float32).reshape(-1, 5)
        if len(labels):
            labels[:, 1:] = xyxy2xywhn(labels[:, 1:], w=im.shape[1], h=im.shape[0], clip=True, eps=1e-3)
        if self.augment:
            augment_hsv(im, hgain=hyp["hsv_h"], sgain=hyp["hsv_s"], vgain=hyp["hsv_v"])
            im, labels = random_flip(im, labels, flipud=hyp["flipud"], fliplr=hyp["fliplr"])
        out = torch.zeros((len(labels), 6))
        out[:, 1:] = torch.from_numpy(labels)
        im = np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])  # HWC BGR -> CHW RGB
        return torch.from_numpy(im), out, self.im_files[index], shapes

    @staticmethod
    def collate_fn(batch):
        """Stack images; concatenate labels, writing each one's image index into column 0."""
        ims, labels, paths, shapes = zip(*batch)
        for i, lb in enumerate(labels):
            lb[:, 0] = i
        return torch.stack(ims, 0), torch.cat(labels, 0), paths, shapes


HYP_KEYS = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud",
            "fliplr", "mosaic", "mixup")


def _load_hyp(hyp):
    """Augmentation hyperparameters from a dict or yaml name; missing keys come from hyp.scratch-low.yaml."""
    defaults = yaml_load(find_file("hyp.scratch-low.yaml"))
    if isinstance(hyp, (str, Path)):
        hyp = yaml_load(find_file(hyp))
    hyp = {**defaults, **(hyp or {})}
    bad = [k for k in HYP_KEYS if not isinstance(hyp.get(k), (int, float))]
    if bad:
        raise ValueError(f"hyperparameters {bad} must be numbers")
    return hyp


def seed_worker(worker_id):
    """Seed python and numpy in each worker from torch's per-worker seed (set by the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def create_dataloader(path, imgsz, batch_size, stride, single_cls=False, hyp=None, augment=False, cache=False,
                      pad=0.0, rect=False, rank=-1, workers=8, image_weights=False, quad=False, prefix="",
                      shuffle=False, seed=0, nc=None):
    """-> (DataLoader, LoadImagesAndLabels). Batches: (uint8 [bs, 3, H, W] RGB, targets [n, 6], paths, shapes).

    `nc` (optional) marks label files with a class >= nc as corrupt.
    Under DDP (rank != -1) a DistributedSampler is used: call loader.sampler.set_epoch(epoch).
    A given seed makes the shuffling and the worker augmentations reproducible; with workers=0 the
    augmentations draw from the process's global random state instead (seed it: init_seeds).
    """
    if rect and shuffle:
        LOGGER.warning(f"{prefix}WARNING ⚠️ rect=True is incompatible with shuffle, setting shuffle=False")
        shuffle = False
    if quad:
        LOGGER.warning(f"{prefix}WARNING ⚠️ quad is not implemented and is ignored")
    with torch_distributed_zero_first(rank):  # rank 0 scans and writes the cache, the others then read it
        dataset = LoadImagesAndLabels(path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect,
                                      image_weights=image_weights, cache_images=cache, single_cls=single_cls,
                                      stride=int(stride), pad=pad, prefix=prefix, nc=nc)
    batch_size = min(batch_size, len(dataset))
    nd = max(torch.cuda.device_count(), 1)
    nw = min((os.cpu_count() or 1) // nd, batch_size if batch_size > 1 else 0, workers)
    sampler = None if rank == -1 else distributed.DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(seed + max(rank, 0))  # shuffling order and the workers' base seeds
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, num_workers=nw,
                        sampler=sampler, pin_memory=torch.cuda.is_available(), collate_fn=dataset.collate_fn,
                        worker_init_fn=seed_worker, generator=generator, persistent_workers=False)
    return loader, dataset
