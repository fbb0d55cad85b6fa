"""The augmenting Dataset of images and YOLO labels, and the DataLoader factory (data yaml files are read
by utils/data_config.py, label files checked by utils/labels.py).

Images are kept BGR internally (cv2) and leave the loader as RGB uint8 CHW.

Runtime switches: `dataset.mosaic = False` (close-mosaic) is read in __getitem__, but DataLoader
workers hold a copy of the dataset made when an iterator starts. The loader is built with
persistent_workers=False, so the change takes effect at the next `iter(loader)` (the next epoch);
a trainer that keeps one iterator alive across epochs must recreate it.
"""
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, distributed

from utils.augmentations import augment_hsv, letterbox, mixup, mosaic4, random_flip, random_perspective
from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.files import find_file, yaml_load
from utils.labels import NUM_THREADS, img2label_paths, list_image_files, report_scan, scan_labels
from utils.logging import LOGGER, UserError
from utils.torch_utils import torch_distributed_zero_first


class ImageLoadError(OSError):
    """An image that passed the scan but cannot be read now."""


class LoadImagesAndLabels(Dataset):
    """Images + YOLO labels, with mosaic/perspective/HSV/flip/mixup augmentation when augment=True.

    Attributes (read by the trainer, val.py and autoanchor): im_files, label_files, labels (list of float32 [k, 5] cls + xywhn),
    shapes (int [N, 2] original w, h), mosaic (bool, may be switched off at runtime), and for rect
    batches batch_shapes ([nb, 2] h, w) with batch (image -> batch index).
    """

    def __init__(self, path, img_size=640, batch_size=16, augment=False, hyp=None, rect=False,
                 cache_images=False, single_cls=False, stride=32, pad=0.0, prefix="", nc=None):
        self.img_size, self.augment, self.rect, self.stride = img_size, augment, rect, stride
        self.hyp = _load_hyp(hyp) if augment else (hyp or {})
        self.mosaic = augment and not rect  # rect batches and a 4-image mosaic exclude each other
        self.mosaic_border = (-img_size // 2, -img_size // 2)
        self.prefix = prefix
        if augment and self.hyp.get("copy_paste", 0) > 0:
            LOGGER.warning(f"{prefix}WARNING ⚠️ copy_paste needs segment labels and is ignored")

        im_files = list_image_files(path, prefix)
        label_files = img2label_paths(im_files)
        entries, cache_path, from_cache = scan_labels(path, im_files, label_files, prefix)
        if nc is not None and not single_cls:  # the class range depends on the data yaml: checked after the cache
            for e in entries:
                if e["status"] == "found" and max(row[0] for row in e["labels"]) >= nc:
                    e.update(status="corrupt", labels=[], msg=f"ignoring corrupt image/label: class >= nc={nc}")
        counts = report_scan(entries, cache_path.parent / cache_path.stem, from_cache, prefix)
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
            # sizes round up (upstream YOLOv5's rule, so val sees the pixels upstream's val sees); float error
            # can leave the long side at img_size + 1 (a 147 px side at 160), letterbox then shrinks it to fit
            im = cv2.resize(im, (max(1, math.ceil(w0 * r)), max(1, math.ceil(h0 * r))), interpolation=interp)
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
                      pad=0.0, rect=False, rank=-1, workers=8, prefix="",
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
    with torch_distributed_zero_first(rank):  # rank 0 scans and writes the cache, the others then read it
        dataset = LoadImagesAndLabels(path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect,
                                      cache_images=cache, single_cls=single_cls,
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
