"""Distillation set-up outside the training loop: the frozen teacher, the imitation term the --distill-* flags
describe, the trainable step module (student + imitation), the teacher's maps for a batch, and what a
distilled checkpoint records about its teacher."""
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from models.checkpoint import load_model
from models.yolo import DetectionModel
from utils.distill import FeatureImitation
from utils.distill_methods import AUTO, WEIGHT_FLAGS, AutoWeight, build_method, fgfi_weight
from utils.logging import LOGGER, colorstr


class StudentWithImitation(nn.Module):
    """The trainable part of a step: the student and, when distilling, its adapters.

    One module so that DDP wraps (and synchronises) the adapters together with the student; checkpoints
    still store the two apart, so the student's state_dict keys are exactly those of a plain run.
    """

    def __init__(self, model: DetectionModel, imitation: FeatureImitation | None = None, target: str = "neck"):
        super().__init__()
        self.model = model
        self.imitation = imitation
        self.target = target  # 'neck': the maps Detect consumes; 'head': the raw Detect maps

    def forward(self, imgs, targets=None, teacher_feats=None, iteration=0):
        if self.imitation is None:
            return self.model(imgs), None, {}
        pred, feats = self.model(imgs, return_features=True)
        student_feats = [head_as_image(p) for p in pred] if self.target == "head" else feats
        detect, strides = self.model.model[-1], self.model.stride.tolist()  # model.stride lives on the CPU: no sync
        anchors_px = [detect.anchors[i] * s for i, s in enumerate(strides)]
        kd_loss, stats = self.imitation(student_feats, teacher_feats, targets, anchors_px, strides, iteration)
        return pred, kd_loss, stats



def file_sha256(path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_teacher(opt, student: DetectionModel, device) -> tuple[nn.Module, list[int]]:
    """Load the frozen teacher and pick its levels whose strides match the student's (P6 teachers have one more)."""
    teacher = load_model(opt.teacher, device=device, fuse=True)  # BN folded into the convs: same maps, fewer ops
    teacher.eval().requires_grad_(False)
    if device.type == "cuda":
        teacher.half()
    t_det, s_det = teacher.model[-1], student.model[-1]
    t_strides, s_strides = [int(s) for s in t_det.stride.tolist()], [int(s) for s in s_det.stride.tolist()]
    missing = [s for s in s_strides if s not in t_strides]
    if missing:
        raise ValueError(f"teacher {opt.teacher} has strides {t_strides}; the student needs {s_strides} "
                         f"(missing {missing}): pick a teacher with the student's levels")
    levels = [t_strides.index(s) for s in s_strides]
    same_anchors = all(t_det.anchors[j].shape == s_det.anchors[i].shape and
                       torch.allclose(t_det.anchors[j] * t_strides[j], s_det.anchors[i].to(device) * s_strides[i])
                       for i, j in enumerate(levels))
    head_ok = t_det.nc == s_det.nc and same_anchors
    if opt.distill_target == "auto":  # resolved once: checkpoints (opt, distill record) and --resume keep it
        opt.distill_target = "head" if head_ok else "neck"
        LOGGER.info(f"--distill-target auto: {opt.distill_target} (teacher nc={t_det.nc}, student nc={s_det.nc}, "
                    f"anchors equal: {same_anchors})")
    if opt.distill_target == "head" and not head_ok:
        raise ValueError(f"--distill-target head needs the teacher's nc and anchors to equal the student's "
                         f"(teacher nc={t_det.nc}, student nc={s_det.nc}, anchors equal: {same_anchors}); "
                         f"use --distill-target neck")
    LOGGER.info(f"{colorstr('teacher:')} {opt.teacher}, imitating levels {levels} (strides {s_strides}), "
                f"target {opt.distill_target}")
    teacher.info(imgsz=opt.imgsz)
    return teacher, levels


def build_imitation(opt, student: DetectionModel, teacher: nn.Module, levels: list[int],
                    anchor_t: float) -> nn.Module:
    """The imitation term (adapters or other trainable parts + settings) the --distill-* flags describe, for
    this student and teacher; weighted 0 while an 'auto' weight is being set (AutoWeight)."""
    s_det, t_det = student.model[-1], teacher.model[-1]
    if opt.distill_target == "head":  # raw maps of equal shape: no adapter
        student_ch = teacher_ch = [m.out_channels for m in s_det.m]
    else:
        student_ch = [m.in_channels for m in s_det.m]
        teacher_ch = [t_det.m[j].in_channels for j in levels]
    weight = getattr(opt, WEIGHT_FLAGS[opt.distill_method])
    if opt.distill_method == "fgfi":
        weight = fgfi_weight(weight, opt.distill_norm)
    weight = 0.0 if weight == AUTO else weight
    adapter = "none" if opt.distill_target == "head" else opt.distill_adapter
    if opt.distill_method != "fgfi":
        return build_method(opt.distill_method, student_ch, teacher_ch, adapter=adapter, weight=weight,
                            warmup=opt.distill_warmup or 0, cwd_tau=opt.cwd_tau, mgd_ratio=opt.mgd_ratio)
    return FeatureImitation(student_ch, teacher_ch, kind=opt.distill_mask, thresh=opt.distill_thresh,
                            weight=weight, warmup=opt.distill_warmup or 0,  # set once nb is known
                            adapter=adapter,
                            anchor_t=anchor_t if opt.distill_assign else None,
                            normalize=None if opt.distill_norm == "none" else opt.distill_norm)


DISTILL_WARMUP = 100  # default imitation warm-up (iterations): the trainer's minimum LR warm-up


def distill_warmup(warmup: int | None, nb: int, epochs: int) -> int:
    """The imitation warm-up for a run of nb batches x epochs: --distill-warmup as given (with a warning
    when the term would never start), or by default DISTILL_WARMUP capped to half the run."""
    total = nb * epochs
    if warmup is None:
        warmup = min(DISTILL_WARMUP, total // 2)
        if warmup < DISTILL_WARMUP:
            LOGGER.warning(f"WARNING ⚠️ distill: warm-up shortened to {warmup} iterations, half of this run's "
                           f"{total} ({nb} batches x {epochs} epochs); the default {DISTILL_WARMUP} needs a run of "
                           f"at least {2 * DISTILL_WARMUP} iterations")
    elif warmup >= total:
        LOGGER.warning(f"WARNING ⚠️ distill: --distill-warmup {warmup} >= this run's {total} iterations ({nb} "
                       f"batches x {epochs} epochs): the imitation term stays 0 for the whole run, which trains as a "
                       f"baseline with the teacher loaded; pass a smaller --distill-warmup or more epochs")
    return warmup


def head_as_image(p: torch.Tensor) -> torch.Tensor:
    """Raw Detect map [bs, na, ny, nx, no] -> [bs, na*no, ny, nx], so head imitation uses the neck code."""
    return p.permute(0, 1, 4, 2, 3).flatten(1, 2)


@torch.no_grad()
def teacher_features(teacher, imgs, levels, target: str) -> list[torch.Tensor]:
    """The teacher's maps at the imitated levels, from one forward pass: neck features or raw head maps."""
    x = imgs.half() if next(teacher.parameters()).dtype == torch.float16 else imgs
    if target == "head":
        maps = [head_as_image(p) for p in teacher(x)[1]]  # eval mode: (decoded, raw)
    else:
        maps = teacher.features(x)  # the neck only: Detect is skipped
    return [maps[j].float() for j in levels]


@dataclass
class Distillation:
    """The teacher side of training. For plain training every part is absent: no teacher maps, no imitation
    term, and the step runs the student alone."""
    teacher: nn.Module | None = None
    levels: list = field(default_factory=list)  # the teacher's levels matching the student's strides
    target: str = "neck"
    imitation: nn.Module | None = None
    auto_weight: AutoWeight | None = None  # while an 'auto' weight is being measured; None once it is set
    weight_flag: str = ""  # the opt attribute holding the method's weight
    opt: object = None  # the run's arguments: an 'auto' weight is recorded there, so checkpoints and --resume keep it

    def teacher_maps(self, imgs):
        return teacher_features(self.teacher, imgs, self.levels, self.target) if self.teacher is not None else None

    def observe(self, loss_items, kd_stats):
        """Feed an imitating step to an 'auto' weight; once measured, it becomes the term's fixed weight."""
        if self.auto_weight is None or not kd_stats.get("active"):
            return
        lam = self.auto_weight.observe(loss_items, kd_stats["raw"])
        if lam is not None:
            self.imitation.weight, self.auto_weight = lam, None
            setattr(self.opt, self.weight_flag, lam)
            LOGGER.info(f"distill: --{self.weight_flag.replace('_', '-')} auto set to {lam:.4g}")


def check_image_size_vs_teacher(teacher, imgsz):
    gs_t = int(teacher.stride.max())
    if imgsz % gs_t:
        raise ValueError(f"--imgsz {imgsz} is not a multiple of the teacher's max stride {gs_t}")



def distill_record(opt) -> dict:
    """What a distilled checkpoint records about how it was distilled."""
    return {"teacher": str(opt.teacher), "teacher_sha256": file_sha256(opt.teacher), "target": opt.distill_target,
            "mask": opt.distill_mask, "thresh": opt.distill_thresh, "weight": opt.distill_weight,
            "warmup": opt.distill_warmup, "adapter": opt.distill_adapter, "assign": bool(opt.distill_assign),
            "normalize": opt.distill_norm, "previous_teachers": getattr(opt, "previous_teachers", []),
            "method": opt.distill_method, "cwd_tau": opt.cwd_tau, "cwd_weight": opt.cwd_weight,
            "mgd_ratio": opt.mgd_ratio, "mgd_alpha": opt.mgd_alpha}

