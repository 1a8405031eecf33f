"""Tasks: what one training step computes.

`ClassificationTask` (teacher, baseline, fine-tune) and `Distiller` (student learning from a
teacher) both give `forward(inputs, targets) -> StepOutput(loss, parts, logits)`, so the one
training loop `fit` never knows which method runs. `parts` holds each weighted term by name
and `loss == sum(parts.values())`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from distil.checkpoint import save_tensors
from distil.data import Split
from distil.errors import ModelError
from distil.losses import CE, KD, Views, ce_loss
from distil.taps import FeatureTaps


@dataclass(frozen=True)
class StepOutput:
    loss: torch.Tensor  # scalar, what is minimised
    parts: dict[str, torch.Tensor]  # each weighted term by name; they sum to `loss`
    logits: torch.Tensor  # (B, K) of the model being trained


class Task(Protocol):
    def prepare(self, inputs: torch.Tensor) -> None: ...
    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, **cached: torch.Tensor) -> StepOutput: ...
    def predict(self, inputs: torch.Tensor) -> torch.Tensor: ...
    def trainable_module(self) -> nn.Module: ...


class ClassificationTask:
    """Plain supervised training: `loss = CE(model(x), y)` with optional label smoothing."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        self.model, self.label_smoothing = model, label_smoothing

    def prepare(self, inputs: torch.Tensor) -> None:
        pass

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, **cached: torch.Tensor) -> StepOutput:
        logits = self.model(inputs)
        loss = ce_loss(logits, targets, self.label_smoothing)
        return StepOutput(loss, {"ce": loss}, logits)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def trainable_module(self) -> nn.Module:
        return self.model


class Distiller(nn.Module):
    """A student learning from a frozen teacher through weighted loss terms.

        Distiller(student, teacher, [KD(T=4, weight=0.9), CE(weight=0.1),
                                     FitNet(student="layer2", teacher="layer3", weight=1.0)])

    The trainable part is this module: the student plus the terms' connectors. The teacher is
    not registered as a submodule: it never trains, never enters `state_dict`, and stays in eval
    mode whatever `train()` is called with.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, terms: list[nn.Module]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("Distiller needs at least one loss term, e.g. [KD(T=4, weight=0.9), CE(weight=0.1)]")
        self.student = student
        self.terms = nn.ModuleList(terms)
        self._teacher = (teacher,)  # a tuple: not registered as a submodule
        teacher.eval().requires_grad_(False)
        pairs = [term.taps() for term in terms if hasattr(term, "taps")]
        self.student_taps = FeatureTaps(student, [s for s, _ in pairs], "student")
        self.teacher_taps = FeatureTaps(teacher, [t for _, t in pairs], "teacher")
        self.needs_teacher = any(getattr(term, "needs_teacher", False) for term in terms)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare(self, inputs: torch.Tensor) -> None:
        """Dry-run one batch: check class counts agree and build connectors from feature shapes."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            views = self._views(inputs, torch.zeros(len(inputs), dtype=torch.long))
        self.train(was_training)
        student_k = views.student_logits.shape[-1]
        if views.teacher_logits is not None and views.teacher_logits.shape[-1] != student_k:
            raise ModelError(
                f"teacher and student disagree on the number of classes: teacher gives "
                f"{views.teacher_logits.shape[-1]} logits, student gives {student_k}. Build both "
                "for the same data (same num_classes).")
        for term in self.terms:
            if hasattr(term, "build"):
                student_feat, teacher_feat = term.pair(views)
                term.build(student_feat, teacher_feat)

    def _views(self, inputs: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> Views:
        with self.student_taps:
            student_logits = self.student(inputs)
        if self.needs_teacher and (teacher_logits is None or self.teacher_taps.modules):
            with torch.no_grad(), self.teacher_taps:
                teacher_logits = self.teacher(inputs)
        return Views(student_logits, targets, teacher_logits,
                     self.student_taps.outputs, self.teacher_taps.outputs)

    def with_teacher_logits(self, split: Split, batch_size: int = 1024) -> Split:
        """`split` with the teacher's logits precomputed, so training skips the teacher's forward pass.

        Exact because the teacher is frozen in eval mode and the inputs are fixed tensors (no
        augmentation). Feature terms still need the teacher's features each step: the split is
        then returned unchanged.
        """
        if not self.needs_teacher or self.teacher_taps.modules:
            return split
        with torch.no_grad():
            logits = torch.cat([self.teacher(split.x[i:i + batch_size]) for i in range(0, len(split), batch_size)])
        return Split(split.x, split.y, logits)  # (N, K)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> StepOutput:
        """One step: `teacher_logits` (B, K), when given, replace the teacher's forward pass."""
        views = self._views(inputs, targets, teacher_logits)
        parts = {term.name: term.weight * term(views) for term in self.terms}
        loss = torch.stack(list(parts.values())).sum()
        return StepOutput(loss, parts, views.student_logits)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.student(inputs)

    def trainable_module(self) -> nn.Module:
        return self

    def save_connectors(self, path) -> None:
        """Write the connectors (training-only parts) to their own file, apart from the student."""
        save_tensors(path, {k: v for k, v in self.terms.state_dict().items()})


def hinton_terms(T: float = 4.0, alpha: float = 0.9) -> list[nn.Module]:
    """Hinton's loss as terms: `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`."""
    return [KD(T=T, weight=alpha), CE(weight=1.0 - alpha)]
