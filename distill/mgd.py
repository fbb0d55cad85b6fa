"""Masked generative distillation, MGD (Yang et al., ECCV 2022): the student map (aligned to the teacher's
channels by a 1x1 conv where they differ) loses a random set of cells (zeroed, one mask per image shared by
the channels); a generation block conv3x3 - ReLU - conv3x3 must rebuild the teacher's whole map from what
is left. A level's loss: the sum of squared errors / images."""
from dataclasses import dataclass

import torch
import torch.nn as nn

from distill.base import DistillMethod, option


@dataclass(frozen=True)
class MGDParams:
    ratio: float = option(0.65, "--mgd-ratio", type=float, help="mgd: probability that a cell is zeroed")

    def __post_init__(self):
        if not 0.0 <= float(self.ratio) < 1.0:
            raise ValueError(f"--mgd-ratio must be in [0, 1), got {self.ratio}")


def mgd_level_loss(s, t, generate, keep):
    """sum of (generate(s * keep) - t)^2 / N: s the aligned student map [N, C, H, W], keep [N, 1, H, W] (1 keeps a
    cell, 0 zeroes it in every channel), generate the level's generation block."""
    return (generate(s * keep) - t).pow(2).sum() / t.shape[0]


class MGD(DistillMethod):
    """Per level: 'align' (1x1 conv student -> teacher channels, identity when they are equal) and 'gen'
    (conv3x3 - ReLU - conv3x3 in the teacher's channels); state_dict keys 'align.<k>.*', 'gen.<k>.*'."""
    name = "mgd"
    summary = ("masked generative distillation (Yang et al., ECCV 2022): rebuild the teacher's map from the "
               "student's with random cells zeroed")
    Params = MGDParams
    weight_aliases = ("--mgd-alpha",)

    @classmethod
    def default_weight(cls, params):
        return 2e-5  # the paper's alpha

    @classmethod
    def fallback_weight(cls, params):
        return 2e-5

    def __init__(self, settings, student_ch, teacher_ch, anchor_t=None, teacher=None):
        super().__init__(settings, student_ch, teacher_ch)
        pairs = list(zip(student_ch, teacher_ch))
        self.align = nn.ModuleList(nn.Conv2d(cs, ct, 1) if cs != ct else nn.Identity() for cs, ct in pairs)
        self.gen = nn.ModuleList(nn.Sequential(nn.Conv2d(ct, ct, 3, padding=1), nn.ReLU(inplace=True),
                                               nn.Conv2d(ct, ct, 3, padding=1)) for _, ct in pairs)

    def keep_mask(self, s):
        """[N, 1, H, W] float: 1 keeps a cell of map s, 0 (probability `ratio`) zeroes it."""
        n, _, h, w = s.shape
        return (torch.rand(n, 1, h, w, device=s.device) >= self.params.ratio).float()

    def level_loss(self, k, s, t, mask):
        a = self.align[k](s)
        if a.shape[1] != t.shape[1]:
            raise ValueError(f"aligned student has {a.shape[1]} channels, teacher {t.shape[1]}")
        return mgd_level_loss(a, t, self.gen[k], self.keep_mask(a))
