"""Relation terms: the student learns how the samples of a batch relate to each other in the teacher's feature
space (distances, angles, similarities, kernels, contrast against a memory of other samples), not the features
themselves. Features of any widths compare without a connector: each is flattened, (B, ...) -> (B, D).

`RKD`, `SP` and `CC` are pure functions of one batch; `CRD` keeps one memory row per training sample and so
needs each sample's index in its data set (`Views.index`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from distil.distributed import gathered
from distil.errors import ConfigError
from distil.losses.core import Views
from distil.losses.feature import FeaturePairs

# --- pure functions -------------------------------------------------------------------------


def pairwise_distances(feats: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ||e_i - e_j|| between the rows of (B, D), as (B, B) with an exact zero diagonal.

    Written through the Gram matrix (B x D memory, not B x B x D); squared distances are clamped at 1e-12 before
    the root, so the gradient stays finite where two samples coincide (as in the official RKD code).
    """
    squares = feats.pow(2).sum(1)  # (B,)
    squared = (squares[:, None] + squares[None, :] - 2 * feats @ feats.t()).clamp(min=1e-12)  # (B, B)
    off_diagonal = 1 - torch.eye(len(feats), dtype=feats.dtype, device=feats.device)
    return squared.sqrt() * off_diagonal


def rkd_distance_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """RKD distance-wise loss: mean over all B^2 pairs of smooth_l1(d_s(i, j), d_t(i, j)), where
    d(i, j) = ||e_i - e_j|| / mu and mu is the mean distance over the pairs with d > 0 (i != j).

    Shapes: (B, ...) and (B, ...) of any widths -> scalar. Invariant to the scale of either feature.
    The teacher side is a target (detached).
    """
    def normalised(feats: torch.Tensor) -> torch.Tensor:
        dist = pairwise_distances(feats.flatten(1))  # (B, ...) -> (B, D) -> (B, B)
        mean = dist.sum() / (dist > 0).sum().clamp(min=1)  # mean over non-zero pairs, without a host sync
        return dist / mean.clamp(min=1e-12)

    return F.smooth_l1_loss(normalised(student_feat), normalised(teacher_feat.detach()))


def triplet_cosines(feats: torch.Tensor) -> torch.Tensor:
    """cos of the angle at e_j between e_i and e_k, <unit(e_i - e_j), unit(e_k - e_j)>, as (B, B, B) [j, i, k].

    Degenerate triplets (i == j or k == j) give 0: the zero vector stays zero when normalised.
    """
    directions = F.normalize(feats[None, :, :] - feats[:, None, :], dim=2)  # (B, B, D): [j, i] = unit(e_i - e_j)
    return directions @ directions.transpose(1, 2)  # (B, B, D) @ (B, D, B) -> (B, B, B)


def rkd_angle_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """RKD angle-wise loss: mean over all B^3 triplets of smooth_l1 between the students' and the teachers'
    `triplet_cosines`. Shapes: (B, ...) and (B, ...) -> scalar; the teacher side is detached."""
    student_cos = triplet_cosines(student_feat.flatten(1))  # (B, ...) -> (B, D) -> (B, B, B)
    teacher_cos = triplet_cosines(teacher_feat.detach().flatten(1))
    return F.smooth_l1_loss(student_cos, teacher_cos)


def rkd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, distance: float = 25.0,
             angle: float = 50.0) -> torch.Tensor:
    """Relational KD: `distance * rkd_distance_loss + angle * rkd_angle_loss`. (B, ...), (B, ...) -> scalar."""
    return (distance * rkd_distance_loss(student_feat, teacher_feat)
            + angle * rkd_angle_loss(student_feat, teacher_feat))


def similarity_matrix(feats: torch.Tensor) -> torch.Tensor:
    """SP's batch similarity: G = f f^T with each row L2-normalised. (B, ...) -> (B, D) -> (B, B)."""
    flat = feats.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving loss ||G_s - G_t||_F^2 / B^2 (see `similarity_matrix`). (B, ...), (B, ...) -> scalar;
    the teacher side is detached."""
    batch = student_feat.shape[0]
    diff = similarity_matrix(student_feat) - similarity_matrix(teacher_feat.detach())  # (B, B)
    return diff.pow(2).sum() / (batch * batch)


def correlation_matrix(feats: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """CC's correlation C_ij = sum_{p=0..order} exp(-2 gamma) (2 gamma)^p / p! (x_i . x_j)^p, with x the
    L2-normalised rows: the Taylor expansion of the Gaussian RBF exp(-gamma ||x_i - x_j||^2), since
    ||x_i - x_j||^2 = 2 - 2 x_i . x_j for unit vectors. (B, ...) -> (B, D) -> (B, B)."""
    unit = F.normalize(feats.flatten(1), dim=1)
    cosines = unit @ unit.t()  # (B, B)
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * cosines.pow(p)
               for p in range(order + 1))


def cc_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, gamma: float = 0.4,
            order: int = 2) -> torch.Tensor:
    """Correlation congruence ||C_s - C_t||^2 / B^2 (see `correlation_matrix`). (B, ...), (B, ...) -> scalar;
    the teacher side is detached."""
    batch = student_feat.shape[0]
    diff = correlation_matrix(student_feat, gamma, order) - correlation_matrix(teacher_feat.detach(), gamma, order)
    return diff.pow(2).sum() / (batch * batch)


def contrast_scores(anchor: torch.Tensor, memory_rows: torch.Tensor, nce_t: float) -> torch.Tensor:
    """exp(<m_k, v> / nce_t) of each anchor v (B, D) with its memory rows m (B, 1+K, D) -> (B, 1+K).

    An elementwise product and sum, not a bmm: the memory is float32, and this keeps the exponent in float32
    under autocast, where exp(1 / 0.07) of a half-precision bmm would overflow float16.
    """
    return torch.exp((memory_rows * anchor[:, None, :]).sum(-1) / nce_t)


def crd_nce_loss(probs: torch.Tensor, num_samples: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss of one direction (the official ContrastLoss) on probs P (B, 1+K): column 0 the positive,
    columns 1..K the negatives, drawn from a uniform noise P_n = 1 / num_samples. With m = K * P_n:

        loss = -(sum_b log(P_b0 / (P_b0 + m + eps)) + sum_b sum_k log(m / (P_bk + m + eps))) / B
    """
    noise = (probs.shape[1] - 1) / num_samples  # K * P_n
    positive = torch.log(probs[:, 0] / (probs[:, 0] + noise + eps))  # (B,)
    negative = torch.log(noise / (probs[:, 1:] + noise + eps))  # (B, K)
    return -(positive.sum() + negative.sum()) / probs.shape[0]


def draw_negatives(index: torch.Tensor, negatives: int, num_samples: int) -> torch.Tensor:
    """`negatives` indices per sample, uniform over the other num_samples - 1 samples, on index's device.
    (B,) -> (B, K). Drawn from [0, N - 1) and shifted past the sample's own index: never the positive."""
    drawn = torch.randint(0, num_samples - 1, (len(index), negatives), device=index.device)
    return drawn + (drawn >= index[:, None]).long()


# --- terms ----------------------------------------------------------------------------------


class RKD(FeaturePairs):
    """Relational KD, `weight * (distance * L_D + angle * L_A)` on flattened features, mean over the pairs.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019. With e_i a sample's flattened feature
    (B, D), any widths:
      L_D = mean_{i,j} smooth_l1(||s_i - s_j|| / mu_s, ||t_i - t_j|| / mu_t), mu = mean distance over i != j;
      L_A = mean_{i,j,k} smooth_l1(cos_s(i, j, k), cos_t(i, j, k)), cos(i, j, k) = <unit(e_i - e_j), unit(e_k - e_j)>
    (see `rkd_distance_loss`, `rkd_angle_loss`); smooth_l1 is the Huber loss with delta 1. `distance` = 25 and
    `angle` = 50 are the defaults of RepDistiller's RKDLoss (its CIFAR script then uses weight 1).

    Paper vs code: the paper sums the Huber losses over distinct pairs and triplets; the official code
    (lenscloth/RKD, RepDistiller) averages over all B^2 pairs and B^3 triplets, the zero diagonal and the
    degenerate triplets (cos 0 on both sides) included, and computes mu over the non-zero distances. We follow
    the code: its weights are tuned for that mean. The teacher's relations are targets (no gradient).
    """

    kind = "rkd"
    over_batch = True

    def __init__(self, student: str | list[str], teacher: str | list[str], distance: float = 25.0,
                 angle: float = 50.0, weight: float = 1.0, teacher_name: str | None = None) -> None:
        super().__init__(student, teacher, weight, teacher_name)
        if min(distance, angle) < 0 or not math.isfinite(distance + angle):
            raise ConfigError(f"rkd: distance and angle weights must be finite and >= 0, got {distance}, {angle}")
        self.distance, self.angle = float(distance), float(angle)

    def pair_loss(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> torch.Tensor:
        return rkd_loss(student_feat, teacher_feat, self.distance, self.angle)


class SP(FeaturePairs):
    """Similarity-preserving KD, `weight * ||G_s - G_t||_F^2 / B^2`, mean over the pairs (see `sp_loss`).

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019: G = f f^T (B, B) of the flattened
    features (B, D), each row L2-normalised; widths may differ. Paper and RepDistiller's `Similarity` agree on
    the formula; the paper sums over layer pairs where this term averages (the weight absorbs it), and
    RepDistiller's CIFAR script uses one pair (the last block's output) with weight 3000, our default.
    """

    kind = "sp"
    over_batch = True

    def __init__(self, student: str | list[str], teacher: str | list[str], weight: float = 3000.0,
                 teacher_name: str | None = None) -> None:
        super().__init__(student, teacher, weight, teacher_name)

    def pair_loss(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> torch.Tensor:
        return sp_loss(student_feat, teacher_feat)


class CC(FeaturePairs):
    """Correlation congruence, `weight * ||C_s - C_t||^2 / B^2`, mean over the pairs (see `cc_loss`).

    Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019. C (B, B) is the Gaussian RBF
    kernel exp(-gamma ||x_i - x_j||^2) of the L2-normalised flattened features x, approximated by its Taylor
    expansion of order `order`: C_ij = sum_{p<=order} exp(-2 gamma) (2 gamma)^p / p! (x_i . x_j)^p. The paper's
    choice, order 2 and gamma 0.4, is the default.

    Paper vs code: RepDistiller's `Correlation` (restructured from the authors' code) differs: it passes both
    models' features through learned 128-d linear embeddings and takes mean_i sum_d |s_i - t_i|_d |s_{i+1} -
    t_{i+1}|_d, a correlation of consecutive samples' embedding differences, with no kernel and no B x B matrix
    (weight 0.02 in its CIFAR script). We implement the paper's kernel, on the tapped features without a
    learned projection; the weight has no tuned default (1.0).
    """

    kind = "cc"
    over_batch = True

    def __init__(self, student: str | list[str], teacher: str | list[str], gamma: float = 0.4, order: int = 2,
                 weight: float = 1.0, teacher_name: str | None = None) -> None:
        super().__init__(student, teacher, weight, teacher_name)
        if not (isinstance(order, int) and order >= 0) or not (math.isfinite(gamma) and gamma > 0):
            raise ConfigError(f"cc: order must be an integer >= 0 and gamma > 0, got order={order!r}, gamma={gamma}")
        self.gamma, self.order = float(gamma), order

    def pair_loss(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> torch.Tensor:
        return cc_loss(student_feat, teacher_feat, self.gamma, self.order)


class Embed(nn.Module):
    """CRD's embedding head: flatten, linear to `feat_dim`, L2-normalise. (B, ...) -> (B, feat_dim)."""

    def __init__(self, in_features: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, feat_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(feats.flatten(1)), dim=1)


class CRD(FeaturePairs):
    """Contrastive representation distillation, `weight * (NCE_student + NCE_teacher)`, one layer pair.

    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020; follows the official
    ContrastMemory + ContrastLoss (RepDistiller crd/). Heads embed each model's flattened feature (B, D_s) and
    (B, D_t) into unit vectors (B, feat_dim) (`Embed`: the student's is this pair's connector, the teacher's is
    in `teacher_heads`; both train and save with the terms). Two memory banks (num_samples, feat_dim) hold an
    embedding per training sample, initialised uniform in [-s, s], s = 1 / sqrt(feat_dim / 3). For each sample
    b with data-set index i_b, rows r_b = [i_b, K negatives drawn uniformly from the other samples]:
      student-anchored: P_bk = exp(<teacher_memory[r_bk], v_s,b> / nce_t) / Z_s, then `crd_nce_loss`;
      teacher-anchored: P_bk = exp(<student_memory[r_bk], v_t,b> / nce_t) / Z_t, likewise.
    Z = num_samples * mean(exp(...)) is estimated once, on the first batch (all processes' rows), and kept (a
    buffer: resumes keep it).
    After each training forward, without gradient, memory[i_b] <- unit(momentum * memory[i_b] + (1 - momentum) v_b).

    Paper vs code: the paper's critic is h = e^s / (e^s + N / M) (N negatives, M samples) with the teacher as
    anchor; the code divides e^s by the estimated constant Z and sums both anchors: we follow the code. The
    code's CIFAR loader draws negatives from other classes' samples and defaults to 16384 of them; we draw
    uniformly among the other samples (no labels needed), 4096 by default. weight 0.8 is the code's beta.
    Needs `views.index` (a Split, a Dataset, or a DataLoader yielding (x, y, index)).
    """

    kind = "crd"

    def __init__(self, student: str | list[str], teacher: str | list[str], num_samples: int, feat_dim: int = 128,
                 negatives: int = 4096, nce_t: float = 0.07, momentum: float = 0.5, weight: float = 0.8,
                 teacher_name: str | None = None) -> None:
        super().__init__(student, teacher, weight, teacher_name)
        _check_crd_args(len(self.student_layers), num_samples, feat_dim, negatives, nce_t, momentum)
        self.num_samples, self.feat_dim, self.negatives = num_samples, feat_dim, negatives
        self.nce_t, self.momentum = float(nce_t), float(momentum)
        self.teacher_heads = nn.ModuleList([nn.Identity()])
        bound = 1.0 / math.sqrt(feat_dim / 3)  # uniform rows of expected squared norm 1, as in the official code
        for bank in ("student_memory", "teacher_memory"):
            self.register_buffer(bank, torch.rand(num_samples, feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("z_student", torch.tensor(-1.0))  # < 0: not yet estimated
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        self._z_known: set[str] = set()  # the buffers set by now (estimated here, or loaded): after the first call

    def build(self, views: Views) -> None:
        """Check the sample indices, then build both heads from the dry run's shapes, on the features' device."""
        _check_index(views.index, self.num_samples, at_build=True)
        super().build(views)  # batch sizes; the student's head as the pair's connector (`make_connector`)
        teacher_feat = self.pairs(views)[0][1]
        self.teacher_heads[0] = Embed(teacher_feat[0].numel(), self.feat_dim)
        self.to(teacher_feat.device)  # heads and memory banks

    def make_connector(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> nn.Module:
        return Embed(student_feat[0].numel(), self.feat_dim)

    def forward(self, views: Views) -> torch.Tensor:
        index = _check_index(views.index, self.num_samples)  # (B,)
        student_feat, teacher_feat = self.pairs(views)[0]
        student_embed = self.connectors[0](student_feat)  # (B, D_s) -> (B, feat_dim), unit rows
        teacher_embed = self.teacher_heads[0](teacher_feat)
        rows = torch.cat([index[:, None], draw_negatives(index, self.negatives, self.num_samples)], 1)  # (B, 1+K)
        # index_select copies the rows: the memory update below does not touch what autograd saved
        teacher_rows = self.teacher_memory.index_select(0, rows.flatten()).view(*rows.shape, -1)  # (B, 1+K, D)
        student_rows = self.student_memory.index_select(0, rows.flatten()).view(*rows.shape, -1)
        student_scores = contrast_scores(student_embed, teacher_rows, self.nce_t)  # (B, 1+K)
        teacher_scores = contrast_scores(teacher_embed, student_rows, self.nce_t)
        loss = (crd_nce_loss(student_scores / self._normaliser("z_student", student_scores), self.num_samples)
                + crd_nce_loss(teacher_scores / self._normaliser("z_teacher", teacher_scores), self.num_samples))
        if self.training:
            self._remember(index, student_embed, teacher_embed)
        return loss

    @torch.no_grad()
    def _normaliser(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """Z: the stored estimate, or num_samples * mean(scores) on the first batch (kept). No host sync.

        Under several processes the mean is over the whole batch (the mean of the processes' equal shares'
        means: one number each), so that every process divides by the same Z, as one process would. That gather
        runs on the first call only (every process makes it at the same step); later calls read the buffer."""
        z = getattr(self, name)  # the buffer z_student or z_teacher
        if name not in self._z_known:
            batch_mean = gathered(scores.mean()[None]).mean()
            z.copy_(torch.where(z > 0, z, batch_mean * self.num_samples))
            self._z_known.add(name)
        return z.clone()

    @torch.no_grad()
    def _remember(self, index: torch.Tensor, student_embed: torch.Tensor, teacher_embed: torch.Tensor) -> None:
        """Update the banks at this batch's rows; under several processes, at every process's rows, so that the
        banks stay the same everywhere (DDP would otherwise broadcast rank 0's, missing the others' rows)."""
        index, student_embed, teacher_embed = (gathered(t) for t in (index, student_embed, teacher_embed))
        for memory, embed in ((self.student_memory, student_embed), (self.teacher_memory, teacher_embed)):
            mixed = memory.index_select(0, index) * self.momentum + embed.to(memory.dtype) * (1 - self.momentum)
            memory.index_copy_(0, index, F.normalize(mixed, dim=1))


def _check_crd_args(pairs: int, num_samples: int, feat_dim: int, negatives: int, nce_t: float,
                    momentum: float) -> None:
    if pairs != 1:
        raise ConfigError(f"crd takes one layer pair (one embedding of each model, e.g. the penultimate layers), "
                          f"got {pairs}: add one CRD term per pair if you want several.")
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ConfigError(f"crd: num_samples must be the training set size (an integer >= 2), got {num_samples!r}")
    if not isinstance(negatives, int) or negatives < 1 or not isinstance(feat_dim, int) or feat_dim < 1:
        raise ConfigError(f"crd: negatives and feat_dim must be integers >= 1, got {negatives!r}, {feat_dim!r}")
    if negatives >= num_samples:
        raise ConfigError(
            f"crd: negatives={negatives} asks for more negatives than other samples exist: the memory bank has "
            f"num_samples={num_samples} rows (one per training sample), so {num_samples - 1} others. Lower "
            f"negatives below num_samples (e.g. negatives={max(1, num_samples // 4)}), or set num_samples to the "
            "training set size.")
    if not (math.isfinite(nce_t) and nce_t > 0) or not 0 <= momentum < 1:
        raise ConfigError(f"crd: nce_t must be > 0 and momentum in [0, 1), got nce_t={nce_t}, momentum={momentum}")


def _check_index(index: torch.Tensor | None, num_samples: int, at_build: bool = False) -> torch.Tensor:
    """The samples' data-set indices as int64 (B,); at build, also that they fit the memory bank (one sync)."""
    if index is None:
        raise ConfigError("crd: the data gives no sample indices (views.index is None), and CRD keeps one memory "
                          "row per training sample. Train on a distil Split or a map-style Dataset (distil adds the "
                          "index), or use a DataLoader that yields (x, y, index).")
    index = index.long()
    if at_build:
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= num_samples:
            raise ConfigError(f"crd: sample index {high if high >= num_samples else low} is outside the memory bank "
                              f"of num_samples={num_samples} rows: num_samples must be the training set size "
                              "(len of the training data), and indices 0..num_samples-1.")
    return index
