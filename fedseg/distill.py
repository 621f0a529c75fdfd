"""Knowledge distillation: the fleet's model (a ``fedseg-sim``/``fedseg-train`` checkpoint) teaches a smaller
student on public frames only (``fedseg-distill``; docs/GUIDE.md "Distillation").

The student trains with fedseg-train's own loop (:func:`fedseg.training.train`); distillation adds two
pieces only. :class:`WithTeacher` runs the frozen teacher beside the student on the same (augmented)
batch and returns both logits stacked on the class axis, and :class:`DistillationLoss` splits them
again: Hinton et al.'s (2015) loss per pixel, ``alpha x CE(student, labels) + (1 - alpha) x T^2 x
KL(teacher_T || student_T)`` with ``_T`` the softmax at temperature ``T`` (``T^2`` keeps the soft
term's gradients at the hard term's scale whatever ``T``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedseg.checkpoints import read_checkpoint
from fedseg.config import DataSpec, bounded
from fedseg.labels import LabelMap
from fedseg.training import segmentation_loss


@dataclass(frozen=True)
class DistillSpec:
    """The ``distill`` block of conf/distill.yaml."""

    alpha: float = bounded(0.5, ge=0, le=1)  # weight of the labels' cross-entropy; 1 - alpha: the teacher's
    temperature: float = bounded(2.0, gt=0)  # softens both distributions (T > 1: the teacher's dark knowledge)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *, alpha: float,
                      temperature: float) -> torch.Tensor:
    """Hinton's loss for (N, C, H, W) logits and (N, H, W) labels: ``alpha`` x :func:`segmentation_loss` +
    ``(1 - alpha) x T^2 x`` the per-pixel KL(teacher || student) at temperature ``T``, averaged over every
    pixel (the teacher has an opinion where the labels are ignored too)."""
    hard = segmentation_loss(student, target) if alpha > 0 else student.new_zeros(())
    if alpha == 1:
        return hard
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1).mean()
    return alpha * hard + (1 - alpha) * temperature**2 * kl


@dataclass(frozen=True)
class DistillationLoss:
    """``criterion(logits, masks)`` for :func:`fedseg.training.train` when the model is a :class:`WithTeacher`:
    its output's first ``num_classes`` channels are the student's logits, the rest the teacher's."""

    num_classes: int
    spec: DistillSpec

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        student, teacher = logits.split(self.num_classes, dim=1)
        return distillation_loss(student, teacher, target, alpha=self.spec.alpha,
                                 temperature=self.spec.temperature)


class WithTeacher(nn.Module):
    """The student and a frozen teacher side by side: ``forward`` returns the student's logits and the
    teacher's (no gradients, eval mode whatever ``train()`` says) concatenated on the class axis.
    Only the student's parameters require gradients, so an optimizer over this module steps the student."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> WithTeacher:
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics and dropout stay the teacher's own
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(images)
        return torch.cat([self.student(images), teacher], dim=1)


def check_teacher(path: str | Path, *, data: DataSpec, label_map: LabelMap, seed: int) -> dict[str, Any]:
    """Read the teacher checkpoint's metadata and refuse, in one ``ValueError`` line naming ``teacher=``
    and the value, a teacher of other classes, image size or input than this run's data, or a run that
    would distil on the frames the teacher trained on (its fleet's: the same synthetic seed, or the same
    ``data.root``), which are a vehicle's, not public. Returns the metadata (no weights)."""
    try:
        content = read_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"teacher: {err}") from None
    where = f"teacher={Path(path).expanduser()}"
    saved_classes = [str(name) for name in content.get("class_names") or []]
    differs = []
    if int(content["num_classes"]) != label_map.num_classes:
        differs.append(f"{content['num_classes']} classes (this run: {label_map.num_classes}, data.tagset="
                       f"{data.tagset} data.task={data.task})")
    elif saved_classes and saved_classes != list(label_map.class_names):
        differs.append(f"classes {saved_classes} (this run: {list(label_map.class_names)})")
    for key, saved, run in (("image_size", content.get("image_size"), list(data.image_size)),
                            ("input", content.get("input"), data.input)):
        if saved is not None and saved != run:
            value = f"[{','.join(str(v) for v in saved)}]" if isinstance(saved, list) else saved
            differs.append(f"{key} {saved} (this run: {run}; set data.{key}={value})")
    if differs:
        raise ValueError(f"{where} does not fit this run: {'; '.join(differs)}")
    config = content.get("config") or {}
    trained_on = config.get("data") or {}
    if trained_on.get("name", data.name) == data.name:
        if data.name == "synthetic" and config.get("seed") == seed:
            raise ValueError(f"{where} trained on the synthetic towns of seed={seed}, its fleet's frames: distil "
                             "on public towns of another seed (conf/distill.yaml: 1001)")
        root = trained_on.get("root")
        if data.name != "synthetic" and data.root and root and Path(root).expanduser() == Path(data.root).expanduser():
            raise ValueError(f"{where} trained on data.root={data.root}, its fleet's frames: distil on public "
                             "frames (another data.root, or data=synthetic)")
    return {k: v for k, v in content.items() if k != "model_state"}
