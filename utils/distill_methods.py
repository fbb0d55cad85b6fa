"""Imitation terms besides FGFI (utils/distill.py), and an imitation weight set from the losses.

- ChannelWiseDistillation, CWD (Shu et al., ICCV 2021): every channel of a map becomes a distribution over
  the map's cells (softmax of map / tau); the adapted student's distributions imitate the teacher's in
  KL(teacher || student). The loss of a level is tau^2 * sum over images, channels and cells of that KL,
  divided by (channels * images).
- MaskedGenerativeDistillation, MGD (Yang et al., ECCV 2022): the student map (aligned to the teacher's
  channels by a 1x1 conv where they differ) loses a random set of cells (zeroed, one mask per image shared
  by the channels); a generation block conv3x3 - ReLU - conv3x3 must rebuild the teacher's whole map from
  what is left. The loss of a level is the sum of squared errors divided by the images.
- AutoWeight: lambda set once from the detection loss and the raw imitation loss of the first imitating
  iterations, so that the weighted term starts at a chosen multiple of the detection loss whatever the
  teacher's feature scale.

The terms imitate the same maps as FeatureImitation and share its interface: forward(student_feats,
teacher_feats, targets, anchors, strides, iteration) -> (weight * raw, stats) with the same stats keys
('masks' is empty: these terms use no imitation mask), and their state_dict holds exactly their own
trainable modules, which a checkpoint stores under 'adapters'.
"""
import argparse
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from utils.distill import build_adapters, channel_kl
from utils.logging import LOGGER

METHODS = ("fgfi", "cwd", "mgd")
WEIGHT_FLAGS = {"fgfi": "distill_weight", "cwd": "cwd_weight", "mgd": "mgd_alpha"}  # each method's lambda
# the weight an 'auto' weight falls back to when the first iterations' losses give no ratio
FALLBACK_WEIGHTS = {"fgfi": 0.01, "cwd": 1.0, "mgd": 2e-5}
AUTO = "auto"
FGFI_KL_WEIGHT = 1.0  # FGFI's lambda under --distill-norm kl unless given


def fgfi_weight(weight, norm):
    """FGFI's lambda: as given, else FGFI_KL_WEIGHT for the scale-free 'kl' term and 'auto' for the squared
    error, whose scale follows the teacher's features."""
    if weight is not None:
        return weight
    return FGFI_KL_WEIGHT if norm == "kl" else AUTO


def fallback_weight(method, norm):
    """The weight an 'auto' weight of `method` takes when the first iterations' losses give no ratio: FGFI's
    scale-free 'kl' term falls back to its default lambda, every other term to FALLBACK_WEIGHTS."""
    return FGFI_KL_WEIGHT if (method, norm) == ("fgfi", "kl") else FALLBACK_WEIGHTS[method]


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


def mgd_level_loss(s, t, generate, keep):
    """sum of (generate(s * keep) - t)^2 / N: s the aligned student map [N, C, H, W], keep [N, 1, H, W] (1 keeps a
    cell, 0 zeroes it in every channel), generate the level's generation block."""
    return (generate(s * keep) - t).pow(2).sum() / t.shape[0]


class _ImitationTerm(nn.Module):
    """Level selection, warm-up and weighting shared by the terms here; subclasses define level_loss(k, s, t)
    for the k-th imitated level (float32 maps, autocast off; t detached)."""

    def __init__(self, n_levels, levels, weight, warmup):
        super().__init__()
        levels = list(range(n_levels)) if levels is None else [int(i) for i in levels]
        if not levels or any(not 0 <= i < n_levels for i in levels):
            raise ValueError(f"imitated levels {levels} not within 0..{n_levels - 1}")
        if not float(weight) >= 0:
            raise ValueError(f"imitation weight must be >= 0, got {weight}")
        self.levels, self.weight, self.warmup = levels, float(weight), int(warmup)

    def forward(self, student_feats, teacher_feats, targets=None, anchors_px_per_level=None, strides=None,
                iteration=0):
        s = [student_feats[i] for i in self.levels]
        if iteration < self.warmup:  # a zero connected to the student and every parameter (DDP needs them all)
            zero = 0.0 * (sum(x.float().sum() for x in s) + sum(p.sum() for p in self.parameters()))
            z = zero.detach()
            return zero, {"loss": z, "raw": z, "per_level": z.repeat(len(s)), "masks": [], "active": False}
        t = [teacher_feats[i] for i in self.levels]
        for a, b in zip(s, t):
            if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
                raise ValueError(f"shapes differ: student {tuple(a.shape)}, teacher {tuple(b.shape)}")
        with torch.autocast(device_type=s[0].device.type, enabled=False):
            per_level = torch.stack([self.level_loss(k, a.float(), b.detach().float())
                                     for k, (a, b) in enumerate(zip(s, t))])
        raw = per_level.sum()
        loss = raw * self.weight
        return loss, {"loss": loss.detach(), "raw": raw.detach(), "per_level": per_level.detach(), "masks": [],
                      "active": True}


class ChannelWiseDistillation(_ImitationTerm):
    """CWD on the imitated levels: adapters as FGFI's (build_adapters kind, student -> teacher channels),
    temperature tau, weight lambda, warm-up iterations. state_dict keys: '<k>.*' per imitated level, as
    FeatureImitation's."""

    def __init__(self, student_ch, teacher_ch, levels=None, adapter="1x1", tau=1.0, weight=1.0, warmup=0):
        super().__init__(len(student_ch), levels, weight, warmup)
        if not float(tau) > 0:
            raise ValueError(f"CWD temperature tau must be > 0, got {tau}")
        self.tau = float(tau)
        adapters = build_adapters([student_ch[i] for i in self.levels], [teacher_ch[i] for i in self.levels], adapter)
        for k, m in enumerate(adapters):  # registered as '0', '1', ... like FeatureImitation's
            self.add_module(str(k), m)
        self.adapters = list(adapters)

    def level_loss(self, k, s, t):
        a = self.adapters[k](s)
        if a.shape[1] != t.shape[1]:
            raise ValueError(f"adapted student has {a.shape[1]} channels, teacher {t.shape[1]}")
        return channel_kl(a, t, self.tau)


class MaskedGenerativeDistillation(_ImitationTerm):
    """MGD on the imitated levels: 'align' (1x1 conv student -> teacher channels, identity when they are
    equal) and 'gen' (conv3x3 - ReLU - conv3x3 in the teacher's channels) per level; each cell of the aligned
    student map is zeroed with probability `ratio` (torch's random generator on the maps' device); weight
    alpha; warm-up iterations. state_dict keys: 'align.<k>.*', 'gen.<k>.*'."""

    def __init__(self, student_ch, teacher_ch, levels=None, ratio=0.65, weight=2e-5, warmup=0):
        super().__init__(len(student_ch), levels, weight, warmup)
        if not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"MGD mask ratio must be in [0, 1), got {ratio}")
        self.ratio = float(ratio)
        pairs = [(student_ch[i], teacher_ch[i]) for i in self.levels]
        self.align = nn.ModuleList(nn.Conv2d(cs, ct, 1) if cs != ct else nn.Identity() for cs, ct in pairs)
        self.gen = nn.ModuleList(nn.Sequential(nn.Conv2d(ct, ct, 3, padding=1), nn.ReLU(inplace=True),
                                               nn.Conv2d(ct, ct, 3, padding=1)) for _, ct in pairs)

    def keep_mask(self, s):
        """[N, 1, H, W] float: 1 keeps a cell of map s, 0 (probability `ratio`) zeroes it."""
        n, _, h, w = s.shape
        return (torch.rand(n, 1, h, w, device=s.device) >= self.ratio).float()

    def level_loss(self, k, s, t):
        a = self.align[k](s)
        if a.shape[1] != t.shape[1]:
            raise ValueError(f"aligned student has {a.shape[1]} channels, teacher {t.shape[1]}")
        return mgd_level_loss(a, t, self.gen[k], self.keep_mask(a))


def build_method(method, student_ch, teacher_ch, *, adapter, weight, warmup, cwd_tau=1.0, mgd_ratio=0.65):
    """The CWD or MGD term for these channels (FGFI is FeatureImitation, built by the trainer)."""
    if method == "cwd":
        return ChannelWiseDistillation(student_ch, teacher_ch, adapter=adapter, tau=cwd_tau, weight=weight,
                                       warmup=warmup)
    if method == "mgd":
        return MaskedGenerativeDistillation(student_ch, teacher_ch, ratio=mgd_ratio, weight=weight, warmup=warmup)
    raise ValueError(f"distillation method '{method}' is not one of {METHODS[1:]} (fgfi: FeatureImitation)")


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
