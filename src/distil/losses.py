"""Distillation loss terms: one small `nn.Module` per method, with a pure function beside it.

Every term takes a `Views` (what one forward pass of student and teachers produced) and returns
a scalar. Its `weight` multiplies it in the total; `Distiller` logs each weighted term by name.
Convention everywhere: for Hinton's loss `alpha * soft + (1 - alpha) * hard`, `alpha` is the
weight of the `kd` term and `1 - alpha` the weight of the `ce` term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from distil.connectors import build_connector
from distil.errors import ShapeError

UNLABELED = -1  # target value of transfer-set samples: no hard label, soft targets only


@dataclass(frozen=True)
class Views:
    """One forward pass: logits (B, K), features by tap name, and targets (B,) (-1 = unlabeled)."""

    student_logits: torch.Tensor
    targets: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    student_feats: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_feats: dict[str, torch.Tensor] = field(default_factory=dict)


# --- pure functions -------------------------------------------------------------------------


def ce_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over labelled samples (targets != -1); 0 when none is labelled.

    Shapes: (B, K), (B,) -> scalar. Written as sum / count so that an all-unlabelled batch gives
    0 instead of NaN, without a host sync.
    """
    total = F.cross_entropy(logits, targets, ignore_index=UNLABELED, reduction="sum",
                            label_smoothing=label_smoothing)
    return total / (targets != UNLABELED).sum().clamp(min=1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Hinton's soft loss: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over batch.

    Shapes: (B, K) and (B, K) -> scalar. T^2 keeps the gradient scale independent of T
    (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").
    """
    student_log_p = F.log_softmax(student_logits / T, dim=1)
    teacher_log_p = F.log_softmax(teacher_logits / T, dim=1)
    kl = F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)
    return kl * T * T


def fitnet_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: mean squared error between the connected student feature and the teacher's.

    Romero et al. 2015, "FitNets: Hints for Thin Deep Nets". Shapes must already match.
    """
    return F.mse_loss(student_feat, teacher_feat)


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention: mean over channels of |F|^p, flattened and L2-normalised. (B, C, *S) -> (B, prod(S))."""
    return F.normalize(feat.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer: mean over batch and positions of (a_s - a_t)^2.

    Zagoruyko & Komodakis 2017, "Paying More Attention to Attention". As in their code, the
    squared difference is averaged over positions; the paper's beta/2 factor is the term's weight.
    """
    return (attention_map(student_feat, p) - attention_map(teacher_feat, p)).pow(2).mean()


# --- terms ----------------------------------------------------------------------------------


class CE(nn.Module):
    """Hard-label cross-entropy `weight * CE(student, y)`, optional label smoothing; ignores unlabelled samples."""

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.weight, self.label_smoothing = weight, label_smoothing
        self.name = "ce"

    def forward(self, views: Views) -> torch.Tensor:
        return ce_loss(views.student_logits, views.targets, self.label_smoothing)


class KD(nn.Module):
    """Response distillation `weight * T^2 * KL(teacher_T || student_T)` (see `kd_loss`)."""

    needs_teacher = True

    def __init__(self, T: float = 4.0, weight: float = 1.0) -> None:
        super().__init__()
        if T <= 0:
            raise ValueError(f"KD temperature T must be > 0, got {T}")
        self.T, self.weight = T, weight
        self.name = "kd"

    def forward(self, views: Views) -> torch.Tensor:
        if views.teacher_logits is None:
            raise ValueError("KD needs teacher logits; give the Distiller a teacher")
        return kd_loss(views.student_logits, views.teacher_logits, self.T)


class _FeaturePair(nn.Module):
    """Shared plumbing of feature terms: which student and teacher module, and the connector."""

    needs_teacher = True

    def __init__(self, student: str, teacher: str, weight: float, kind: str) -> None:
        super().__init__()
        self.student_layer, self.teacher_layer, self.weight = student, teacher, weight
        self.name = f"{kind}:{student}->{teacher}"
        self.connector: nn.Module = nn.Identity()

    def taps(self) -> tuple[str, str]:
        return self.student_layer, self.teacher_layer

    def pair(self, views: Views) -> tuple[torch.Tensor, torch.Tensor]:
        return views.student_feats[self.student_layer], views.teacher_feats[self.teacher_layer]


class FitNet(_FeaturePair):
    """`weight * MSE(connector(student[student]), teacher[teacher])`; the connector is learned (see `fitnet_loss`)."""

    def __init__(self, student: str, teacher: str, weight: float = 1.0) -> None:
        super().__init__(student, teacher, weight, "fitnet")

    def build(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> None:
        """Create the connector from one dry-run batch's feature shapes."""
        where = f"student '{self.student_layer}' -> teacher '{self.teacher_layer}'"
        self.connector = build_connector(tuple(student_feat.shape), tuple(teacher_feat.shape), where)

    def forward(self, views: Views) -> torch.Tensor:
        student_feat, teacher_feat = self.pair(views)
        return fitnet_loss(self.connector(student_feat), teacher_feat)


class AT(_FeaturePair):
    """`weight * attention transfer` between two feature maps of equal spatial size (see `at_loss`)."""

    def __init__(self, student: str, teacher: str, weight: float = 1000.0, p: float = 2.0) -> None:
        super().__init__(student, teacher, weight, "at")
        self.p = p

    def build(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> None:
        if student_feat.dim() < 3 or student_feat.shape[2:] != teacher_feat.shape[2:]:
            raise ShapeError(
                f"attention transfer needs feature maps of the same spatial size: student "
                f"'{self.student_layer}' gives {list(student_feat.shape)}, teacher '{self.teacher_layer}' "
                f"gives {list(teacher_feat.shape)}. Pick layers at the same resolution."
            )

    def forward(self, views: Views) -> torch.Tensor:
        student_feat, teacher_feat = self.pair(views)
        return at_loss(student_feat, teacher_feat, self.p)


LOSSES: dict[str, type[nn.Module]] = {"ce": CE, "kd": KD, "fitnet": FitNet, "at": AT}
