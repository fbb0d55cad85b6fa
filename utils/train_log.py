"""What the main process records while it trains: the progress bar, the first batches' plots, the imitation's
TensorBoard scalars and each epoch's results.csv row (TensorBoard too)."""
import csv
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from distill.masks import mask_coverage
from utils.logging import LOGGER
from utils.plots import plot_distill_masks, plot_images


class TrainLogger:
    """One per run, on the main process. results.csv starts with `keys` unless a resumed run continues its own."""

    def __init__(self, save_dir, keys, epochs: int, names, strides: list, plots: bool, resume: bool):
        from torch.utils.tensorboard import SummaryWriter
        self.save_dir, self.keys, self.epochs, self.names, self.plots = Path(save_dir), keys, epochs, names, plots
        self.strides = strides
        self.levels = [f"P{int(math.log2(s))}" for s in strides]
        self.csv = self.save_dir / "results.csv"
        self.tb = SummaryWriter(str(save_dir))
        self.pbar = None
        self.cover, self.cover_n = [], 0  # summed mask coverage (% of cells) per level, and batches sampled
        if not (resume and self.csv.exists()):  # a new run in a reused folder (--exist-ok) starts its own table
            with open(self.csv, "w", newline="") as f:
                csv.writer(f).writerow(keys)

    def progress(self, batches, total: int):
        self.pbar = tqdm(batches, total=total, bar_format="{l_bar}{bar:10}{r_bar}", file=sys.stdout)
        return self.pbar

    def batch(self, epoch, i, ni, imgs, targets, paths, mloss, kd):
        """After a step: the progress line; the first three batches and FGFI's masks drawn once; mask coverage and
        raw imitation losses sampled every 10th batch (they need a device sync)."""
        mem = f"{torch.cuda.memory_reserved() / 1e9 if imgs.is_cuda else 0:.3g}G"
        self.pbar.set_description(("%11s" * 2 + "%11.4g" * 6) % (f"{epoch}/{self.epochs - 1}", mem, *mloss,
                                                                 targets.shape[0], imgs.shape[-1]))
        if self.plots and ni < 3:
            plot_images(imgs, targets, paths, self.save_dir / f"train_batch{ni}.jpg", names=self.names)
        if self.plots and ni == 0 and kd is not None and kd.masks:  # FGFI's masks (cwd and mgd have none)
            plot_distill_masks(imgs, targets, kd.masks, self.strides, self.save_dir / "distill_masks.jpg")
        if kd is not None and i % 10 == 0:
            self.distill_scalars(ni, kd)

    def distill_scalars(self, ni, kd):
        cover = mask_coverage(kd.masks)  # empty for the terms without a mask (cwd, mgd)
        if cover:
            self.cover = [c + x for c, x in zip(self.cover, cover)] if self.cover else list(cover)
            self.cover_n += 1
        if kd.active:  # during warm-up the term is not computed
            self.tb.add_scalar("distill/raw_loss", float(kd.raw), ni)
        for k, (level, raw) in enumerate(zip(self.levels, kd.per_level.tolist())):
            if cover:
                self.tb.add_scalar(f"distill/{level}_coverage", cover[k], ni)
            if kd.active:
                self.tb.add_scalar(f"distill/{level}_raw_loss", raw, ni)

    def epoch_coverage(self) -> list:
        """Mean sampled mask coverage (% of cells) per level since the last call; empty without a mask."""
        cover = [c / self.cover_n for c in self.cover] if self.cover_n else []
        self.cover, self.cover_n = [], 0
        return cover

    def distill_summary(self, coverage, mloss, weight, method, factor=1.0):
        head = ("mask coverage " + ", ".join(f"{level} {c:.1f}%" for level, c in zip(self.levels, coverage))
                if coverage else method)
        LOGGER.info(f"distill: {head}; mean weighted imitation loss {mloss[3]:.4g} vs detection loss "
                    f"{mloss[:3].sum():.4g} (per image; lambda {weight:.4g}, schedule factor {factor:.3g})")

    def epoch(self, epoch, losses, metrics, validated: bool, lr):
        """The epoch's results.csv row and TensorBoard scalars; an epoch left unvalidated (--noval) has empty
        metric and val-loss cells, not zeros."""
        row = [epoch, *losses, *(metrics if validated else [""] * len(metrics)), *lr]
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([f"{x:.6g}" if isinstance(x, float) else x for x in row])
        for k, v in zip(self.keys[1:], row[1:]):
            if v != "":
                self.tb.add_scalar(k, float(v), epoch)

    def close(self):
        self.tb.close()
