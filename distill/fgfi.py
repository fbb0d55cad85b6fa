"""Fine-grained Feature Imitation (Wang et al., CVPR 2019).

The adapted student map imitates the teacher map at the cells whose anchors overlap a ground-truth box by
more than psi x that box's best anchor IoU (distill/masks.py). The paper's term is the squared error
over masked cells and channels / (2 x masked cells) (norm 'none'); the default, norm 'kl', compares there
each channel's softmax over an image's masked cells in KL(teacher || student), which depends on neither
the teacher's feature scale nor its channel count, so one lambda suits every teacher.
"""
from dataclasses import dataclass

import torch

from distill.adapters import ADAPTER_HELP, ADAPTERS, adapt_at, build_adapters
from distill.base import AUTO, DistillMethod, option
from distill.kernels import masked_channel_kl, standardize_channels
from distill.masks import KINDS, imitation_masks

NORMS = ("kl", "none", "channel", "pkd")


@dataclass(frozen=True)
class FGFIParams:
    mask: str = option("fine", "--fgfi-mask", "--distill-mask", choices=KINDS,
                       help="where to imitate: near-object anchor cells (fine), cells inside boxes (gt), all (full)")
    thresh: float = option(0.5, "--fgfi-thresh", "--distill-thresh", type=float,
                           help="psi: cells whose anchor IoU > psi x the box's best anchor IoU")
    assign: bool = option(False, "--fgfi-assign", "--distill-assign", boolean=True,
                          help="a box shapes a level's mask only if YOLOv5 matching assigns it to that level")
    norm: str = option("kl", "--distill-norm", choices=NORMS,
                       help="fgfi: kl (default): per image and channel, KL divergence between the softmax of the "
                            "teacher and of the adapted student over the masked cells; none: the paper's squared "
                            "error; channel: that / channels; pkd: both maps standardised per channel first, then "
                            "the squared error / channels")
    adapter: str = option("1x1", "--distill-adapter", choices=ADAPTERS[:2], help=ADAPTER_HELP)

    def __post_init__(self):
        if self.mask not in KINDS or self.norm not in NORMS or self.adapter not in ADAPTERS[:2]:
            raise ValueError(f"fgfi: bad mask '{self.mask}', norm '{self.norm}' or adapter '{self.adapter}'")
        if not 0.0 < float(self.thresh) <= 1.0:
            raise ValueError(f"--fgfi-thresh (psi) must be in (0, 1], got {self.thresh}")


class FGFI(DistillMethod):
    name = "fgfi"
    summary = ("Fine-grained Feature Imitation (Wang et al., CVPR 2019): the adapted student map imitates the "
               "teacher's at the cells near ground-truth objects")
    Params = FGFIParams
    uses_mask = True

    @classmethod
    def default_weight(cls, params):
        # the kl term is scale-free; the squared error's scale follows the teacher's features: auto
        return 1.0 if params.norm == "kl" else AUTO

    @classmethod
    def fallback_weight(cls, params):
        return 1.0 if params.norm == "kl" else 0.01

    def __init__(self, settings, student_ch, teacher_ch, anchor_t=None, teacher=None):
        super().__init__(settings, student_ch, teacher_ch)
        p = self.params
        self.add_adapters(build_adapters(student_ch, teacher_ch, "none" if self.target == "head" else p.adapter))
        self.anchor_t = anchor_t if p.assign else None

    def masks(self, student_feats, targets, anchors_px, strides):
        return imitation_masks(targets, anchors_px, [float(s) for s in strides], [x.shape[2:] for x in student_feats],
                               student_feats[0].shape[0], self.params.thresh, self.params.mask, self.anchor_t)

    def level_loss(self, k, s, t, mask):
        adapt, norm = self.adapters[k], self.params.norm
        if mask.shape != (t.shape[0], *t.shape[2:]):
            raise ValueError(f"shapes differ: mask {tuple(mask.shape)}, teacher {tuple(t.shape)}")
        b, y, x = mask.nonzero(as_tuple=True)  # one host sync per level: the number of masked cells
        if norm == "pkd":  # standardised over the whole maps of the batch, so the whole adapted map
            a, t = standardize_channels(adapt(s))[b, :, y, x], standardize_channels(t)
        else:
            a = adapt_at(adapt, s, b, y, x)  # [N_p, C_t]
        if a.shape[1] != t.shape[1]:
            raise ValueError(f"adapted student has {a.shape[1]} channels, teacher {t.shape[1]}")
        if norm == "kl":
            return masked_channel_kl(a, t[b, :, y, x], b, t.shape[0])
        term = (a - t[b, :, y, x]).pow(2).sum() / (2 * max(b.numel(), 1))  # no masked cell: 0, still connected
        return term if norm == "none" else term / t.shape[1]  # channel, pkd
