"""The frozen teacher: loading (BN folded, fp16 on CUDA), its levels paired with the student's by stride,
the targets it allows, its maps for a batch, and its file's SHA-256 (what --resume checks)."""
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from models.checkpoint import load_model
from utils.logging import LOGGER, colorstr

TARGETS = ("neck", "head", "auto")


def file_sha256(path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def head_as_image(p: torch.Tensor) -> torch.Tensor:
    """Raw Detect map [bs, na, ny, nx, no] -> [bs, na*no, ny, nx], so head imitation uses the neck code."""
    return p.permute(0, 1, 4, 2, 3).flatten(1, 2)


@dataclass
class Teacher:
    model: nn.Module
    path: str
    levels: list  # the teacher's level for each student level (same stride)
    head_ok: bool  # nc and anchors equal the student's: the raw Detect maps can be imitated
    why: str  # the facts behind head_ok, for messages

    def resolve_target(self, asked: str) -> str:
        """--distill-target as the run uses it: 'auto' becomes head when the teacher allows it, else neck."""
        if asked not in TARGETS:
            raise ValueError(f"--distill-target {asked} is not one of {TARGETS}")
        if asked == "auto":
            target = "head" if self.head_ok else "neck"
            LOGGER.info(f"--distill-target auto: {target} ({self.why})")
            return target
        if asked == "head" and not self.head_ok:
            raise ValueError(f"--distill-target head needs the teacher's nc and anchors to equal the student's "
                             f"({self.why}); use --distill-target neck")
        return asked

    def channels(self, student, target) -> tuple[list, list]:
        """(student channels, teacher channels) of the imitated maps, level by level."""
        s_det, t_det = student.model[-1], self.model.model[-1]
        if target == "head":  # raw maps of equal shape
            ch = [m.out_channels for m in s_det.m]
            return ch, ch
        return [m.in_channels for m in s_det.m], [t_det.m[j].in_channels for j in self.levels]

    @torch.no_grad()
    def maps(self, imgs, target) -> list:
        """The teacher's float32 maps paired with the student's levels, from one forward: neck or raw head."""
        x = imgs.half() if next(self.model.parameters()).dtype == torch.float16 else imgs
        if target == "head":
            maps = [head_as_image(p) for p in self.model(x)[1]]  # eval mode: (decoded, raw)
        else:
            maps = self.model.features(x)  # the neck only: Detect is skipped
        return [maps[j].float() for j in self.levels]


def load_teacher(path, student, device, imgsz) -> Teacher:
    """The frozen teacher at `path`, with its levels whose strides match the student's (a P6 teacher has one
    more); --imgsz must be a multiple of its largest stride."""
    teacher = load_model(path, device=device, fuse=True)  # BN folded into the convs: same maps, fewer ops
    teacher.eval().requires_grad_(False)
    if device.type == "cuda":
        teacher.half()
    t_det, s_det = teacher.model[-1], student.model[-1]
    t_strides, s_strides = [int(s) for s in t_det.stride.tolist()], [int(s) for s in s_det.stride.tolist()]
    missing = [s for s in s_strides if s not in t_strides]
    if missing:
        raise ValueError(f"teacher {path} has strides {t_strides}; the student needs {s_strides} "
                         f"(missing {missing}): pick a teacher with the student's levels")
    if imgsz % max(t_strides):
        raise ValueError(f"--imgsz {imgsz} is not a multiple of the teacher's max stride {max(t_strides)}")
    levels = [t_strides.index(s) for s in s_strides]
    same_anchors = all(t_det.anchors[j].shape == s_det.anchors[i].shape and
                       torch.allclose(t_det.anchors[j] * t_strides[j], s_det.anchors[i].to(device) * s_strides[i])
                       for i, j in enumerate(levels))
    why = f"teacher nc={t_det.nc}, student nc={s_det.nc}, anchors equal: {same_anchors}"
    LOGGER.info(f"{colorstr('teacher:')} {path}, imitating levels {levels} (strides {s_strides})")
    teacher.info(imgsz=imgsz)
    return Teacher(teacher, str(path), levels, t_det.nc == s_det.nc and same_anchors, why)


def previous_teachers(record: dict | None, path, changed_ok: bool, epoch) -> tuple:
    """The teachers a resumed run used before: its record's list, plus the one it started with when the file at
    `path` has changed since (refused unless changed_ok)."""
    record = record or {}
    before = tuple(record.get("previous_teachers") or ())
    started, now = record.get("teacher_sha256"), file_sha256(path)
    if not started or not now or now == started:
        return before
    if not changed_ok:
        raise ValueError(f"--resume: the teacher {path} has changed since the run started (SHA-256 {started[:12]}... "
                         f"in the checkpoint, {now[:12]}... now); put the original file back, or pass "
                         f"--teacher-changed-ok to continue with this teacher (both are recorded)")
    LOGGER.warning(f"WARNING ⚠️ --teacher-changed-ok: resuming with a changed teacher {path} (SHA-256 "
                   f"{started[:12]}... until epoch {epoch}, {now[:12]}... from now on)")
    return (*before, {"teacher": record.get("teacher"), "teacher_sha256": started, "last_epoch": int(epoch)})
