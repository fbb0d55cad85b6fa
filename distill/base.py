"""What every distillation method shares: its settings' command-line options, the weight (fixed or 'auto'),
the warm-up, the pairing of student and teacher levels, and the named result of one forward.

A method subclasses DistillMethod, declares its settings as a frozen dataclass `Params` whose fields are
made with `option(...)` (the flags come from there), and defines `level_loss(k, s, t, mask)`: the raw loss
of the k-th level for the student map s and the teacher map t (float32, autocast off, t detached).
"""
import argparse
import math
from dataclasses import dataclass, field, fields
from typing import ClassVar, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from utils.logging import LOGGER

AUTO = "auto"


def weight_arg(value):
    """argparse type of an imitation weight: a number >= 0, or 'auto' (AutoWeight)."""
    if str(value).lower() == AUTO:
        return AUTO
    try:
        w = float(value)
    except ValueError:
        w = float("nan")
    if not math.isfinite(w) or w < 0:
        raise argparse.ArgumentTypeError(f"an imitation weight must be a number >= 0 or '{AUTO}', got '{value}'")
    return w


def option(default, *flags, help, type=None, choices=None, boolean=False, before=None):
    """A field of a method's Params: its default and the command-line flags that set it (the first names its
    argparse dest; the others are aliases). before: the value that runs written before the method had this
    setting trained with, which --resume of such a run keeps (None: the default)."""
    return field(default=default, metadata=dict(flags=flags, help=help, type=type, choices=choices, boolean=boolean,
                                                before=before))


def dest(f) -> str:
    """argparse dest of a Params field: its first flag, '--fgfi-mask' -> 'fgfi_mask'."""
    return f.metadata["flags"][0].lstrip("-").replace("-", "_")


def params_fields(params_cls):
    return [f for f in fields(params_cls) if "flags" in f.metadata]


@dataclass(frozen=True)
class NoParams:
    """A method without settings of its own."""


class Result(NamedTuple):
    """One forward of a method. loss: weight x raw, connected to the student and the method's modules;
    raw and per_level: detached; masks: the bool imitation masks per level (FGFI; empty for methods without
    one, also computed during the warm-up so that the mask plot and coverage exist from the start);
    active: False during the warm-up and after --distill-stop, where loss is a connected zero; loss includes the
    weight schedule's factor at the iteration."""
    loss: torch.Tensor
    raw: torch.Tensor
    per_level: torch.Tensor
    masks: list
    active: bool


class AutoWeight:
    """lambda = ratio * sum(detection loss) / sum(raw imitation loss) over the first `iters` imitating
    iterations (both per image; under DDP summed over the ranks, so every rank gets the same lambda). The
    imitation term is computed but weighted 0 while the sums are collected. If the sums are not positive
    and finite, `fallback` is used, with a warning."""

    def __init__(self, fallback, ratio=1.0, iters=20):
        if not (float(ratio) > 0 and int(iters) >= 1):
            raise ValueError(f"auto weight needs ratio > 0 and iterations >= 1, got {ratio} and {iters}")
        self.fallback, self.ratio, self.iters = float(fallback), float(ratio), int(iters)
        self.sums, self.n = None, 0

    def observe(self, det_loss, raw):
        """Add one iteration's detection loss (tensor, summed) and raw imitation loss; -> lambda (float) at the
        `iters`-th call, else None. Host sync (and, under DDP, one all_reduce) only at that call."""
        x = torch.stack((det_loss.detach().float().sum(), raw.detach().float().reshape(())))
        self.sums = x if self.sums is None else self.sums + x
        self.n += 1
        if self.n < self.iters:
            return None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)
        det, raw = self.sums.tolist()
        if not (math.isfinite(det) and math.isfinite(raw) and det > 0 and raw > 0):
            LOGGER.warning(f"WARNING auto imitation weight: detection loss {det:.4g} and raw imitation loss {raw:.4g} "
                           f"over {self.n} iterations give no ratio; using {self.fallback:g}")
            return self.fallback
        return self.ratio * det / raw


class DistillMethod(nn.Module):
    """Base of the methods. Built from the run's resolved DistillSettings and the channels of the paired
    levels (student level k imitates teacher_ch[k]); state_dict() holds exactly the method's own trainable
    modules, which a checkpoint stores under 'adapters'."""
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for --help and README: what the method does, and its paper
    Params: ClassVar[type] = NoParams
    weight_aliases: ClassVar[tuple] = ()  # the method's own spellings of --distill-weight
    uses_mask: ClassVar[bool] = False

    @classmethod
    def default_weight(cls, params):
        """The weight when --distill-weight is not given: a number or AUTO."""
        return 1.0

    @classmethod
    def fallback_weight(cls, params) -> float:
        """The weight an 'auto' weight takes when its first iterations give no ratio: the default weight when
        that is a number (a method whose default is AUTO names its own)."""
        w = cls.default_weight(params)
        return 1.0 if w == AUTO else float(w)

    def __init__(self, settings, student_ch, teacher_ch):
        super().__init__()
        if len(student_ch) != len(teacher_ch) or not len(student_ch):
            raise ValueError(f"student has {len(student_ch)} imitated levels, teacher {len(teacher_ch)}")
        self.params, self.target, self.warmup = settings.params, settings.target, int(settings.warmup)
        self.factor = settings.factor  # the schedule's share of the weight at an iteration
        self.n_levels = len(student_ch)
        auto = settings.weight == AUTO
        self.weight = 0.0 if auto else float(settings.weight)
        if not self.weight >= 0:
            raise ValueError(f"imitation weight must be >= 0, got {settings.weight}")
        self.auto = AutoWeight(self.fallback_weight(self.params), settings.auto_ratio, settings.auto_iters) \
            if auto else None

    def add_adapters(self, adapters):
        """Register per-level modules under '0', '1', ... (the checkpoint keys '<k>.*' of every release)."""
        for k, m in enumerate(adapters):
            self.add_module(str(k), m)
        self.adapters = list(adapters)  # plain list: registered once, above

    def masks(self, student_feats, targets, anchors_px, strides) -> list:
        """Per-level bool masks [bs, h, w] of the cells the loss reads; [] when the method reads whole maps."""
        return []

    def level_loss(self, k, s, t, mask):
        raise NotImplementedError

    def forward(self, student_feats, teacher_feats, targets=None, anchors_px=None, strides=None, iteration=0):
        """-> Result for the student's maps of every level and the teacher's maps paired with them (lists of
        [bs, c, h, w]), the batch targets [n, 6], the anchors in pixels per level and the strides."""
        if len(student_feats) != self.n_levels or len(teacher_feats) != self.n_levels:
            raise ValueError(f"levels differ: {len(student_feats)} student, {len(teacher_feats)} teacher maps, "
                             f"{self.n_levels} imitated")
        for s, t in zip(student_feats, teacher_feats):
            if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
                raise ValueError(f"shapes differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        masks = self.masks(student_feats, targets, anchors_px, strides)
        factor = self.factor(iteration)
        if iteration < self.warmup or factor == 0:  # a zero connected to the student and every parameter (DDP)
            zero = 0.0 * (sum(x.float().sum() for x in student_feats) + sum(p.sum() for p in self.parameters()))
            z = zero.detach()
            return Result(zero, z, z.repeat(self.n_levels), masks, False)
        with torch.autocast(device_type=student_feats[0].device.type, enabled=False):
            per_level = torch.stack([self.level_loss(k, s.float(), t.detach().float(), masks[k] if masks else None)
                                     for k, (s, t) in enumerate(zip(student_feats, teacher_feats))])
        raw = per_level.sum()
        return Result(raw * (self.weight * factor), raw.detach(), per_level.detach(), masks, True)

    def observe(self, det_loss_items, result: Result):
        """Feed an imitating step to an 'auto' weight; once measured it becomes the fixed weight (logged)."""
        if self.auto is None or not result.active:
            return
        lam = self.auto.observe(det_loss_items, result.raw)
        if lam is not None:
            self.weight, self.auto = float(lam), None
            LOGGER.info(f"distill: --distill-weight auto set to {lam:.4g}")
