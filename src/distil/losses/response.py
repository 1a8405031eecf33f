"""Response terms beyond Hinton's KD: `DKD` splits the KL of the softened predictions into its target-class and
non-target-class parts and weights them apart; `DIST` matches correlations of predictions instead of the
predictions themselves. Both read only logits (B, K) of the student and one teacher.

Each term has a pure function beside it (`dkd_loss`, `dist_loss`) that states the formula and that tests call.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from distil.distributed import gathered
from distil.errors import ConfigError, ModelError, ShapeError
from distil.losses.core import UNLABELED, Reads, Views, check_weight, kd_loss


def _check_positive(value: float, what: str, kind: str) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{kind}: {what} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_non_negative(value: float, what: str, kind: str) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{kind}: {what} must be a finite number >= 0, got {value!r}; use 0 to switch that part off")
    return float(value)


def _teacher_logits(views: Views, teacher: str | None, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(student logits, detached teacher logits), both (B, K): the teacher never gets a gradient from a term."""
    student_logits, teacher_logits = views.student.logits, views.teacher(teacher).logits
    if teacher_logits is None:
        raise ModelError(f"{kind} needs teacher logits; give the Distiller a teacher")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape or student_logits.shape[1] < 2:
        raise ShapeError(f"{kind} reads logits (B, K) with K >= 2, the same for student and teacher; got student "
                         f"{list(student_logits.shape)} and teacher {list(teacher_logits.shape)}")
    return student_logits, teacher_logits.detach()


# --- DKD ------------------------------------------------------------------------------------


def warmup_factor(epoch: int, warmup: int) -> float:
    """min((epoch + 1) / warmup, 1) for a 0-based `epoch`; 1 when `warmup` is 0 (no warm-up).

    mdistiller's epochs count from 1 and it writes min(epoch / warmup, 1): the same factor, epoch by epoch.
    """
    return 1.0 if warmup == 0 else min((epoch + 1) / warmup, 1.0)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
             alpha: float, beta: float, T: float) -> torch.Tensor:
    """Decoupled KD: `T^2 * (alpha * TCKD + beta * NCKD)`, each KL summed over its classes, mean over the batch.

    Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled Knowledge Distillation" (CVPR). With p = softmax(z / T) and y
    the target class of a sample:
        b      = (p_y, 1 - p_y)                      the binary target / non-target distribution
        p_hat  = p_k / (1 - p_y) for k != y          the distribution among the K - 1 non-target classes
        TCKD   = KL(b_teacher || b_student)
        NCKD   = KL(p_hat_teacher || p_hat_student)
    Hinton's KD is TCKD + (1 - p_y_teacher) * NCKD (the paper's reformulation); DKD frees the NCKD weight from
    the teacher's confidence. `alpha` multiplies TCKD, `beta` NCKD. p_hat is the softmax of the K - 1 non-target
    logits: they are computed as such, so no probability is divided by 1 - p_y and b comes from logsumexp.
    Unlabelled samples (target -1, `UNLABELED`) take the teacher's top-1 class as their target class.

    Shapes: (B, K), (B, K), (B,) -> scalar. As the official code (mdistiller, distillers/DKD.py) does, both
    KLs are of the T-softened predictions and multiplied by T^2 (as in Hinton's KD). Where this differs from it:
      * The code removes the target class from p_hat by subtracting 1000 from its logit / T before the softmax;
        here the target column is dropped, which is the same value (exp(-1000) is 0 in float32 and float64).
      * The code takes log(sum of p) for b, which is -inf (an infinite or NaN loss) once the student's
        non-target probabilities underflow in float32; here log b is a logsumexp of the logits: the same
        value wherever the code's is finite.
    """
    batch, classes = student_logits.shape
    targets = torch.where(targets == UNLABELED, teacher_logits.argmax(dim=1), targets)
    is_target = F.one_hot(targets, classes).bool()  # (B, K)

    def split(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = logits / T
        others = scaled[~is_target].view(batch, classes - 1)  # (B, K) -> (B, K-1): the non-target logits, in order
        # log-odds of b: [z_y, logsumexp_{k != y} z_k] / T; softmax of this (B, 2) row is (p_y, 1 - p_y)
        binary = torch.cat([scaled.gather(1, targets[:, None]), others.logsumexp(dim=1, keepdim=True)], dim=1)
        return binary, others

    student_binary, student_others = split(student_logits)
    teacher_binary, teacher_others = split(teacher_logits)
    tckd = kd_loss(student_binary, teacher_binary, 1.0)  # at T=1: the logits were divided by T above
    nckd = kd_loss(student_others, teacher_others, 1.0)
    return (T * T) * (alpha * tckd + beta * nckd)


class DKD(nn.Module):
    """Decoupled KD `weight * warmup_factor(epoch, warmup) * dkd_loss(student, teacher, targets, alpha, beta, T)`.

    Defaults are mdistiller's CIFAR-100 ones (alpha 1, beta 8, T 4, warm-up 20 epochs); its ImageNet configs
    use beta 0.5 (ResNet-34 -> 18) or 2 (ResNet-50 -> MobileNet-V1) with T 1 and no warm-up. Note: `alpha` and
    `beta` are the paper's TCKD and NCKD weights here, not the `kd`/`ce` split of Hinton's loss; the hard-label
    loss is a separate `ce` term (weight 1 in mdistiller). The warm-up ramps the term linearly over the first
    `warmup` epochs, reading `views.progress.epoch` (0-based): factor (epoch + 1) / warmup, then 1; 0 = none.
    `teacher` names the teacher it reads; None = the only teacher.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup: int = 20,
                 weight: float = 1.0, teacher: str | None = None) -> None:
        super().__init__()
        self.alpha = _check_non_negative(alpha, "alpha (the weight of TCKD)", "dkd")
        self.beta = _check_non_negative(beta, "beta (the weight of NCKD)", "dkd")
        self.T = _check_positive(T, "temperature T", "dkd")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"dkd: warmup must be a whole number of epochs >= 0 (0 = no warm-up), got {warmup!r}")
        self.warmup, self.weight, self.teacher = warmup, check_weight(weight, "dkd"), teacher
        self.name = "dkd" if teacher is None else f"dkd:{teacher}"

    def reads(self) -> Reads:
        return Reads(needs_teacher=True, teacher=self.teacher)

    def build(self, views: Views) -> None:
        pass

    def forward(self, views: Views) -> torch.Tensor:
        student_logits, teacher_logits = _teacher_logits(views, self.teacher, "dkd")
        if views.targets.shape != student_logits.shape[:1]:
            raise ShapeError(f"dkd reads one target per sample, (B,) = {list(student_logits.shape[:1])}; got targets "
                             f"{list(views.targets.shape)}")
        loss = dkd_loss(student_logits, teacher_logits, views.targets, self.alpha, self.beta, self.T)
        return loss * warmup_factor(views.progress.epoch, self.warmup)


# --- DIST -----------------------------------------------------------------------------------


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of the rows of a and b: (N, M), (N, M) -> (N,).

    The cosine of the centred rows, with the product of their norms clamped at `eps` (a constant row gives 0).
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              T: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """DIST: `T^2 * (beta * inter + gamma * intra)` on the softened predictions p = softmax(z / T), (B, K) each.

    Huang, You, Wang, Qian & Xu 2022, "Knowledge Distillation from A Stronger Teacher" (NeurIPS):
        inter = 1 - mean_b pearson(p_s[b, :], p_t[b, :])   each sample's ranking of the classes (rows)
        intra = 1 - mean_k pearson(p_s[:, k], p_t[:, k])   each class's ranking of the samples (columns)
    `beta` multiplies the inter-class relation, `gamma` the intra-class one. Both are 0 when the student's
    predictions equal the teacher's, and unchanged by any positive scale and shift of a prediction row (inter)
    or column (intra): DIST asks for the teacher's relations, not its exact probabilities.

    Shapes: (B, K), (B, K) -> scalar; intra needs B >= 2 (with B = 1 each column is constant: intra = 1, no
    gradient). As in the official code (hunto/image_classification_sota, losses/dist_kd.py) both relations are
    multiplied by T^2. That code writes pearson as x.y / (|x| |y| + eps); here the denominator is clamped at eps
    instead, so identical predictions give exactly 0 (the two differ by a factor 1 + eps / (|x| |y|)).
    """
    student_p = F.softmax(student_logits / T, dim=1)
    teacher_p = F.softmax(teacher_logits / T, dim=1)
    inter = 1 - pearson(student_p, teacher_p, eps).mean()
    intra = 1 - pearson(student_p.T, teacher_p.T, eps).mean()  # (B, K) -> (K, B): one row per class
    return (T * T) * (beta * inter + gamma * intra)


class DIST(nn.Module):
    """Relation distillation `weight * dist_loss(student, teacher, beta, gamma, T)`.

    Defaults follow the official code: beta = gamma = 1, T = 1 (ImageNet, `kd: dist`); its CIFAR-100 config
    uses T = 4 (`kd: dist_t4`). Every official config adds DIST with a loss weight of 2 beside CE at 1: use
    `weight=2.0` to reproduce them. `teacher` names the teacher it reads; None = the only teacher.
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, T: float = 1.0, weight: float = 1.0,
                 teacher: str | None = None) -> None:
        super().__init__()
        self.beta = _check_non_negative(beta, "beta (the weight of the inter-class relation)", "dist")
        self.gamma = _check_non_negative(gamma, "gamma (the weight of the intra-class relation)", "dist")
        self.T = _check_positive(T, "temperature T", "dist")
        self.weight, self.teacher = check_weight(weight, "dist"), teacher
        self.name = "dist" if teacher is None else f"dist:{teacher}"

    def reads(self) -> Reads:
        return Reads(needs_teacher=True, teacher=self.teacher)

    def build(self, views: Views) -> None:
        pass

    def forward(self, views: Views) -> torch.Tensor:
        student_logits, teacher_logits = _teacher_logits(views, self.teacher, "dist")
        if self.training:  # the intra-class relation is over the batch: every process's rows (see FeaturePairs)
            student_logits, teacher_logits = gathered(student_logits), gathered(teacher_logits)
        return dist_loss(student_logits, teacher_logits, self.beta, self.gamma, self.T)
