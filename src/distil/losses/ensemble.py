"""Several teachers, one soft target: `MultiKD` distils the student from a weighted average of the teachers'
softened predictions. Teachers may have any architectures that share the class count.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from distil.errors import ConfigError
from distil.losses.core import Reads, Views, check_weight

COMBINE = ("mean", "weights", "confidence")


def ensemble_target(teacher_logits: list[torch.Tensor], T: float, combine: str = "mean",
                    weights: list[float] | None = None) -> torch.Tensor:
    """The teachers' combined soft target p (B, K) at temperature T.

    mean:       p = (1/M) sum_m softmax(t_m / T)
    weights:    p = sum_m w_m softmax(t_m / T), with the given w normalised to sum 1
    confidence: p = sum_m c_m(b) softmax(t_m / T), with per-sample c(b) = softmax_m(-H_m(b)), H_m(b) the entropy
                of teacher m's prediction on sample b at T=1: a teacher sure of a sample counts more there
                (an entropy-weighted variant of the confidence-aware ensembles of Zhang et al. 2022, CA-MKD).
    """
    probs = torch.stack([F.softmax(t / T, dim=-1) for t in teacher_logits])  # (M, B, K)
    if combine == "mean":
        return probs.mean(0)
    if combine == "weights":
        w = torch.tensor(weights, dtype=probs.dtype, device=probs.device)
        return (probs * (w / w.sum())[:, None, None]).sum(0)
    log_p = torch.stack([F.log_softmax(t, dim=-1) for t in teacher_logits])  # (M, B, K), at T=1
    entropy = -(log_p.exp() * log_p).sum(-1)  # (M, B)
    return (probs * F.softmax(-entropy, dim=0)[:, :, None]).sum(0)


def soft_kd_loss(student_logits: torch.Tensor, target: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(target || softmax(s / T)), summed over classes, mean over the batch. (B, K), (B, K) -> scalar."""
    student_log_p = F.log_softmax(student_logits / T, dim=-1)
    kl = (target * (torch.log(target.clamp_min(1e-12)) - student_log_p)).sum()
    return kl * (T * T / student_logits.shape[0])


class MultiKD(nn.Module):
    """`weight * T^2 * KL(p_ensemble || softmax(s / T))` with p from `ensemble_target` over `teachers`
    (None: every teacher of the Distiller), combined by `combine` ("mean", "weights", "confidence")."""

    def __init__(self, T: float = 4.0, weight: float = 1.0, teachers: list[str] | None = None,
                 combine: str = "mean", weights: list[float] | None = None) -> None:
        super().__init__()
        if not math.isfinite(T) or T <= 0:
            raise ConfigError(f"multi_kd temperature T must be > 0, got {T}")
        if combine not in COMBINE:
            raise ConfigError(f"multi_kd: combine must be one of {', '.join(COMBINE)}, got {combine!r}")
        if combine == "weights":
            if not weights or not teachers or len(weights) != len(teachers) or min(weights) < 0 or sum(weights) <= 0:
                raise ConfigError("multi_kd with combine: weights needs `teachers` and as many non-negative "
                                  f"`weights` (not all 0), one per teacher; got teachers={teachers}, weights={weights}")
        self.T, self.weight, self.teachers = T, check_weight(weight, "multi_kd"), teachers
        self.combine, self.weights = combine, weights
        self.name = "multi_kd" if not teachers else "multi_kd:" + "+".join(teachers)

    def reads(self) -> Reads:
        return Reads(ensemble=tuple(self.teachers or ()))

    def build(self, views: Views) -> None:
        pass

    def forward(self, views: Views) -> torch.Tensor:
        names = self.teachers or list(views.teachers)
        target = ensemble_target([views.teacher(n).logits for n in names], self.T, self.combine, self.weights)
        return soft_kd_loss(views.student.logits, target.detach(), self.T)
