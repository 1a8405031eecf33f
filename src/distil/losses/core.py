"""The core of the loss terms: what a step looks like to a term (`Views`), what a term is (`Term`), and the
two response terms every recipe starts from, hard-label `CE` and Hinton's `KD`.

Every term follows the `Term` protocol: it says what it reads (`reads()`: which teacher, which
layers), may build connectors from a dry run (`build`), and maps a `Views` (what one forward pass
of the student and its teachers produced, by participant name) to a scalar. Its `weight`
multiplies it in the total; `Distiller` logs each weighted term by its unique `name`.
Convention everywhere: for Hinton's loss `alpha * soft + (1 - alpha) * hard`, `alpha` is the
weight of the `kd` term and `1 - alpha` the weight of the `ce` term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

from distil.batches import Progress
from distil.errors import ConfigError, ModelError, ShapeError

UNLABELED = -1  # target value of transfer-set samples: no hard label, soft targets only
STUDENT = "student"  # the participant name of the model being trained
CHUNK = 128  # token-level losses read (B, CHUNK, V) logits at a time (`distil.losses.token`)


@dataclass(frozen=True)
class Outputs:
    """One participant's forward pass: logits (B, K) and features by tap (module) name."""

    logits: torch.Tensor
    feats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Views:
    """One step as the terms see it: each participant's outputs by name ("student" and the teachers'
    names), targets (B,) (-1 = unlabeled), the samples' indices, a mask, and the training progress."""

    outputs: dict[str, Outputs]
    targets: torch.Tensor
    teachers: tuple[str, ...] = ()  # the frozen participants' names, in the Distiller's order
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    progress: Progress = field(default_factory=Progress)

    @classmethod
    def of(cls, student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
           student_feats: dict | None = None, teacher_feats: dict | None = None) -> Views:
        """Views of one student and (optionally) one teacher named "teacher": handy in tests and notebooks."""
        outputs = {STUDENT: Outputs(student_logits, student_feats or {})}
        if teacher_logits is not None or teacher_feats:
            outputs["teacher"] = Outputs(teacher_logits, teacher_feats or {})
        return cls(outputs, targets, tuple(k for k in outputs if k != STUDENT))

    @property
    def student(self) -> Outputs:
        return self.outputs[STUDENT]

    def teacher(self, name: str | None = None) -> Outputs:
        """The outputs of teacher `name`; `None` means the only teacher (an error when there are several)."""
        if name is None:
            if len(self.teachers) != 1:
                raise ModelError(f"a term reads 'the teacher' but there are {len(self.teachers)} teachers "
                                 f"({list(self.teachers)}): name the one it reads, e.g. KD(teacher='...').")
            name = self.teachers[0]
        if name not in self.outputs:
            raise ModelError(f"no teacher named '{name}' in this step (participants: {list(self.outputs)}).")
        return self.outputs[name]


@dataclass(frozen=True)
class Reads:
    """What a term needs from a step: a teacher (by name; None = the only one) and tapped layers."""

    needs_teacher: bool = False
    teacher: str | None = None
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()
    ensemble: tuple[str, ...] | None = None  # the logits of several teachers by name; () = every teacher


@runtime_checkable
class Term(Protocol):
    """A loss term: `weight * term(views)` enters the total under the unique part name `name`."""

    name: str
    weight: float

    def reads(self) -> Reads: ...

    def build(self, views: Views) -> None: ...

    def __call__(self, views: Views) -> torch.Tensor: ...


def check_weight(weight: float, kind: str) -> float:
    """A term weight must be a finite number >= 0 (a negative weight would maximise the term)."""
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"{kind}: weight must be a finite number >= 0, got {weight!r}. A weight multiplies the "
                          "term in the total loss; use 0 to switch a term off.")
    return float(weight)


def check_chunk(chunk: int, kind: str) -> int:
    """Positions per chunk of a token-level loss: a whole number >= 1."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"{kind}: chunk must be a whole number of positions >= 1, got {chunk!r}; smaller chunks "
                          "hold less of the (B, T, V) float32 probabilities at once, larger ones run faster")
    return chunk


def ce_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over labelled samples (targets != -1); 0 when none is labelled.

    Shapes: (B, K), (B,) -> scalar; or, for language models, (B, T, V), (B, T) -> scalar, the mean over the
    tokens with a target (next-token cross-entropy). `mask` (the targets' shape, True = counts) leaves out
    more positions (padding, prompt) on top of the -1 targets. Written as sum / count so that an
    all-unlabelled batch gives 0 instead of NaN, without a host sync.
    """
    if logits.shape[:-1] != targets.shape or logits.dim() not in (2, 3):
        raise ShapeError(f"ce reads logits (B, K) with targets (B,), or (B, T, V) with targets (B, T); got logits "
                         f"{list(logits.shape)} and targets {list(targets.shape)}")
    if mask is not None:
        if mask.shape != targets.shape:
            raise ShapeError(f"ce: the mask must have the targets' shape {list(targets.shape)}, got "
                             f"{list(mask.shape)}")
        targets = targets.masked_fill(~mask.bool(), UNLABELED)
    if logits.dim() == 3:  # (B, T, V) -> (B*T, V), (B, T) -> (B*T,): one row per token
        logits, targets = logits.flatten(0, 1), targets.flatten()
    total = F.cross_entropy(logits, targets, ignore_index=UNLABELED, reduction="sum",
                            label_smoothing=label_smoothing)
    return total / (targets != UNLABELED).sum().clamp(min=1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float,
            mask: torch.Tensor | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """Hinton's soft loss: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over batch.

    Shapes: (B, K) and (B, K) -> scalar. T^2 keeps the gradient scale independent of T
    (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").
    Language models: (B, T, V), (B, T, V) and `mask` (B, T) (None = every token) -> the same KL per token,
    averaged over the tokens where the mask is True (`distil.losses.token.token_kl`, chunked over T); a mask
    (B,) with logits (B, K) likewise averages over the samples where it is True.
    """
    if student_logits.dim() == 3 or mask is not None:
        from distil.losses.token import token_kl  # here, not at the top: token.py builds on this file

        return token_kl(student_logits, teacher_logits, mask, T, chunk)
    student_log_p = F.log_softmax(student_logits / T, dim=1)
    teacher_log_p = F.log_softmax(teacher_logits / T, dim=1)
    kl_sum = F.kl_div(student_log_p, teacher_log_p, reduction="sum", log_target=True)
    return kl_sum * (T * T / student_logits.shape[0])  # one multiply: batch mean and T^2 together


def token_mask(views: Views) -> torch.Tensor | None:
    """The tokens a term counts in this step's views (see `counted`)."""
    return counted(views.student.logits, views.targets, views.mask)


def counted(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The tokens a soft term counts: `mask` when the batch has one, else the positions with a target
    (`targets != UNLABELED`: not padding, not prompt) for language-model logits (B, T, V); None (every sample
    counts, labelled or not) for logits (B, K)."""
    if mask is not None or logits.dim() != 3:
        return mask
    if targets.shape != logits.shape[:2]:
        raise ShapeError(f"language-model logits {list(logits.shape)} need targets (B, T) = {list(logits.shape[:2])} "
                         f"(-1 = padding or prompt) or a Batch mask; got targets {list(targets.shape)}")
    return targets != UNLABELED


# --- terms ----------------------------------------------------------------------------------


class CE(nn.Module):
    """Hard-label cross-entropy `weight * CE(student, y)`, optional label smoothing; ignores unlabelled samples."""

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"ce: label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.weight, self.label_smoothing = check_weight(weight, "ce"), label_smoothing
        self.name = "ce"

    def reads(self) -> Reads:
        return Reads()

    def build(self, views: Views) -> None:
        pass

    def forward(self, views: Views) -> torch.Tensor:
        return ce_loss(views.student.logits, views.targets, self.label_smoothing, views.mask)


class KD(nn.Module):
    """Response distillation `weight * T^2 * KL(teacher_T || student_T)` (see `kd_loss`).

    `teacher` names the teacher it reads (several teachers: one KD term each); None = the only teacher.
    Language models (logits (B, T, V)): the same KL per token, averaged over the tokens of `token_mask` (not
    padding, not prompt), `chunk` positions at a time; a recipe keeps `kind: kd` unchanged.
    """

    def __init__(self, T: float = 4.0, weight: float = 1.0, teacher: str | None = None, chunk: int = CHUNK) -> None:
        super().__init__()
        if not math.isfinite(T) or T <= 0:
            raise ConfigError(f"KD temperature T must be > 0, got {T}")
        self.T, self.weight, self.teacher, self.chunk = T, check_weight(weight, "kd"), teacher, check_chunk(chunk, "kd")
        self.name = "kd" if teacher is None else f"kd:{teacher}"

    def reads(self) -> Reads:
        return Reads(needs_teacher=True, teacher=self.teacher)

    def build(self, views: Views) -> None:
        pass

    def forward(self, views: Views) -> torch.Tensor:
        teacher_logits = views.teacher(self.teacher).logits
        if teacher_logits is None:
            raise ModelError("KD needs teacher logits; give the Distiller a teacher")
        if views.student.logits.dim() == 3:  # language model: the teacher never gets a gradient from a term
            return kd_loss(views.student.logits, teacher_logits.detach(), self.T, token_mask(views), self.chunk)
        return kd_loss(views.student.logits, teacher_logits, self.T)
