"""Distillation inside a training step: the trainable module (student + method) that DDP wraps, and the
run's distillation (settings, teacher, method) that the loop asks for the teacher's maps."""
from dataclasses import dataclass

import torch.nn as nn

from distill.base import DistillMethod, Result
from distill.settings import DistillSettings
from distill.teacher import Teacher, head_as_image
from models.yolo import DetectionModel


class StudentWithImitation(nn.Module):
    """The trainable part of a step: the student and, when distilling, the method's modules.

    One module so that DDP wraps (and synchronises) them together; checkpoints still store the two apart, so
    the student's state_dict keys are exactly those of a plain run.
    """

    def __init__(self, model: DetectionModel, method: DistillMethod | None = None, target: str = "neck"):
        super().__init__()
        self.model, self.method, self.target = model, method, target

    def forward(self, imgs, targets=None, teacher_maps=None, iteration=0) -> tuple[list, Result | None]:
        if self.method is None:
            return self.model(imgs), None
        pred, feats = self.model(imgs, return_features=True)
        student_maps = [head_as_image(p) for p in pred] if self.target == "head" else feats
        detect, strides = self.model.model[-1], self.model.stride.tolist()  # model.stride lives on the CPU: no sync
        anchors_px = [detect.anchors[i] * s for i, s in enumerate(strides)]
        return pred, self.method(student_maps, teacher_maps, targets, anchors_px, strides, iteration)


@dataclass
class Distillation:
    """The teacher side of training; for plain training every part is None and the step runs the student alone."""
    settings: DistillSettings | None = None
    teacher: Teacher | None = None
    method: DistillMethod | None = None

    def teacher_maps(self, imgs):
        return self.teacher.maps(imgs, self.settings.target) if self.teacher is not None else None

    def observe(self, loss_items, result):
        if self.method is not None:
            self.method.observe(loss_items, result)

    def factor(self, iteration):
        """The weight schedule's factor at an iteration; '' for plain training (an empty results.csv cell)."""
        return self.settings.factor(iteration) if self.settings is not None else ""

    def record(self):
        """The checkpoint's 'distill' record (None for plain training)."""
        if self.method is None:
            return None
        return self.settings.record(self.method.weight if self.method.auto is None else self.settings.weight)
