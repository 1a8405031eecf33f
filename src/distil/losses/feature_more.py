"""More feature terms on the `FeaturePairs` plumbing: PKT (similarities between samples), NST (neuron
selectivity patterns) and VID (a learned Gaussian likelihood of the teacher's feature). Each has a pure
function that tests call directly; the term classes only choose layers, check shapes and build what they learn.
The default weights are the betas of RepDistiller's CIFAR-100 scripts (Tian et al. 2020), where most people
meet these methods; note that RepDistiller sums NST and VID over its layer pairs while a term here takes the mean.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from distil.errors import ConfigError, ModelError, ShapeError
from distil.losses.feature import FeaturePairs

# --- PKT ------------------------------------------------------------------------------------


def pkt_probabilities(feat: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Row-conditional probabilities of the cosine similarities between the samples of a batch.

    (B, *) -> (B, B): row i holds p(j | i) = k(i, j) / sum_m k(i, m), with k(i, j) = (cos(x_i, x_j) + 1) / 2.
    As in the reference code, x / (||x|| + eps) normalises (a zero feature stays zero instead of NaN).
    """
    flat = feat.flatten(1)  # (B, *) -> (B, D)
    unit = flat / (flat.norm(dim=1, keepdim=True) + eps)
    similarity = (unit @ unit.t() + 1.0) / 2.0  # (B, B), cosine in [-1, 1] -> [0, 1]
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer: mean over the B x B pairs (i, j) of p_t log((p_t + eps) / (p_s + eps)).

    Passalis & Tefas, ECCV 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer".
    p_s, p_t = `pkt_probabilities` of the student and teacher features: (B, *) each, any widths (only the
    B x B similarity structure is compared, so no connector). 0 when the features are equal (and, up to
    eps, when they differ by a positive factor per sample).

    Paper and reference code (github:passalis/probabilistic_kt `cosine_similarity_loss`, copied verbatim
    into RepDistiller's PKT) differ; this follows the code:
    - the paper's KL divergence is a sum over pairs; the code takes the mean over all B^2 entries, i.e.
      the row sums of KL divided by B^2. This is why the usual weight is large (RepDistiller: 3e4).
    - as we read the paper, p(j | i) leaves out j = i (as in t-SNE); the code keeps the diagonal
      (self-similarity 1), and so does this function.
    - the code adds eps inside the log ratio and to the norms; it also zeroes NaNs of the normalised
      features, which only a NaN input can produce: left out here, so a NaN is not hidden.
    """
    p_student, p_teacher = pkt_probabilities(student_feat, eps), pkt_probabilities(teacher_feat, eps)
    return (p_teacher * torch.log((p_teacher + eps) / (p_student + eps))).mean()


class PKT(FeaturePairs):
    """`weight * pkt_loss(student[layer], teacher[layer])`, mean over the pairs (see `pkt_loss`).

    Features of any shapes (B, *) and widths; no connector. Default weight 3e4 (RepDistiller's beta, which
    it applies to the penultimate, pooled features).
    """

    kind = "pkt"
    over_batch = True

    def __init__(self, student: str | list[str], teacher: str | list[str], weight: float = 30000.0,
                 eps: float = 1e-7, teacher_name: str | None = None) -> None:
        super().__init__(student, teacher, weight, teacher_name)
        if not 0 < eps < 1:
            raise ConfigError(f"pkt: eps must be in (0, 1), got {eps!r}; it keeps the log finite (default 1e-7).")
        self.eps = eps

    def make_connector(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> nn.Module:
        if student_feat.dim() < 2 or teacher_feat.dim() < 2:
            raise ShapeError(f"pkt: {self.where(i)} give features {list(student_feat.shape)} and "
                             f"{list(teacher_feat.shape)}; PKT needs (B, ...) features with a batch dimension.")
        return nn.Identity()  # PKT compares B x B similarities: any widths

    def pair_loss(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> torch.Tensor:
        return pkt_loss(student_feat, teacher_feat, self.eps)


# --- NST ------------------------------------------------------------------------------------


def neuron_selectivity(feat: torch.Tensor) -> torch.Tensor:
    """Each channel's activations over the positions, L2-normalised: (B, C, *S) -> (B, C, prod(S))."""
    return F.normalize(feat.flatten(2), dim=2)  # (B, C, H, W) -> (B, C, H*W), unit rows


def poly_kernel(a: torch.Tensor, b: torch.Tensor, degree: int = 2, c: float = 0.0) -> torch.Tensor:
    """k(x, y) = (x . y + c)^degree between all rows of a and b: (B, Ca, N), (B, Cb, N) -> (B, Ca, Cb)."""
    return (a @ b.transpose(1, 2) + c).pow(degree)


def nst_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, degree: int = 2, c: float = 0.0) -> torch.Tensor:
    """Neuron selectivity transfer: squared MMD between the student's and the teacher's channels, mean over batch.

    Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer". Each channel
    is one sample of a distribution: its activations over the positions, L2-normalised (`neuron_selectivity`).
    Per image, with s_j (Cs of them) and t_i (Ct of them),

        MMD^2 = 1/Ct^2 sum_{i,i'} k(t_i, t_i') + 1/Cs^2 sum_{j,j'} k(s_j, s_j') - 2/(Cs Ct) sum_{i,j} k(s_j, t_i)

    with the paper's polynomial kernel k(x, y) = (x . y + c)^d, d = 2, c = 0. Shapes (B, Cs, *S) and
    (B, Ct, *S): same positions S, channel counts may differ. 0 when both give the same set of channels.

    The paper's total is CE + lambda/2 * MMD^2: lambda/2 is the term's weight. RepDistiller's NSTLoss computes
    the same MMD^2 (its d = 2, c = 0 kernel, teacher-teacher part detached, which changes no gradient since the
    teacher is frozen) but pools the larger map to the smaller one's (square) size; here differing sizes
    are an error (see `NST`).
    """
    student, teacher = neuron_selectivity(student_feat), neuron_selectivity(teacher_feat)
    return (poly_kernel(teacher, teacher, degree, c).mean() + poly_kernel(student, student, degree, c).mean()
            - 2 * poly_kernel(student, teacher, degree, c).mean())  # means over (B, Ca, Cb) = 1/C^2 sums


class NST(FeaturePairs):
    """`weight * nst_loss(student[layer], teacher[layer])`, mean over the pairs (see `nst_loss`).

    Feature maps (B, C, *S) of the same spatial size S; channel counts may differ; no connector.
    Default weight 50 (RepDistiller's beta, summed there over three or four layer pairs).
    """

    kind = "nst"

    def __init__(self, student: str | list[str], teacher: str | list[str], weight: float = 50.0,
                 teacher_name: str | None = None) -> None:
        super().__init__(student, teacher, weight, teacher_name)

    def make_connector(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> nn.Module:
        if student_feat.dim() < 3 or teacher_feat.dim() < 3 or student_feat.shape[2:] != teacher_feat.shape[2:]:
            raise ShapeError(
                f"nst: neuron selectivity transfer needs feature maps of the same spatial size: student "
                f"'{self.student_layers[i]}' gives {list(student_feat.shape)}, teacher '{self.teacher_layers[i]}' "
                f"gives {list(teacher_feat.shape)}. Pick convolutional layers at the same resolution."
            )
        return nn.Identity()  # MMD compares sets of channels: any counts

    def pair_loss(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> torch.Tensor:
        return nst_loss(student_feat, teacher_feat)


# --- VID ------------------------------------------------------------------------------------


def vid_variance(alpha: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The per-channel variance sigma^2 = softplus(alpha) + eps = log(1 + exp(alpha)) + eps: (C,) -> (C,)."""
    return F.softplus(alpha) + eps


def vid_loss(predicted_mean: torch.Tensor, teacher_feat: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Variational information distillation: the Gaussian negative log-likelihood of the teacher's feature.

    Ahn et al., CVPR 2019, "Variational Information Distillation for Knowledge Transfer". With mu the
    regressed student feature and sigma^2_c a learned variance per channel,

        loss = mean over b, c, positions of 0.5 * (log sigma^2_c + (t_bc. - mu_bc.)^2 / sigma^2_c)

    Shapes: (B, C, *S), (B, C, *S), (C,) -> scalar. The constant 0.5 log(2 pi) is left out.
    The paper writes -log q(t | s) summed over channels and positions; the authors' code (as copied into
    RepDistiller's VIDLoss) takes the mean, as here. Minimising over sigma alone gives sigma^2_c = the mean
    squared error of channel c, so the loss can be negative: it is not 0 at its optimum.
    """
    variance = variance.view(1, -1, *([1] * (teacher_feat.dim() - 2)))  # (C,) -> (1, C, 1, ...) to broadcast
    return 0.5 * (variance.log() + (teacher_feat - predicted_mean).pow(2) / variance).mean()


def _pointwise(rank: int, in_ch: int, out_ch: int) -> nn.Module:
    """A Linear (rank 2) or 1x1 convolution (rank 3, 4) without bias, as the reference regressor's."""
    if rank == 2:
        return nn.Linear(in_ch, out_ch, bias=False)
    conv = nn.Conv1d if rank == 3 else nn.Conv2d
    return conv(in_ch, out_ch, kernel_size=1, bias=False)


class VIDRegressor(nn.Module):
    """VID's learned parts for one pair: the mean mu(student) and the variance per teacher channel.

    (B, Cs, *S_s) -> (B, Ct, *S_t): adaptive average pooling when the student's positions are more, then
    Cs -> Ct -> Ct -> Ct by three 1x1 convolutions (Linear layers for (B, D) features) with ReLU between,
    no bias (RepDistiller's VIDLoss, built as VIDLoss(Cs, Ct, Ct): the middle width is the teacher's).
    `alpha` (Ct,) starts where sigma^2 = `init_var`.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], init_var: float = 5.0,
                 eps: float = 1e-5) -> None:
        super().__init__()
        rank, in_ch, out_ch = len(teacher_shape), student_shape[1], teacher_shape[1]
        self.pool_to = tuple(teacher_shape[2:]) if tuple(student_shape[2:]) != tuple(teacher_shape[2:]) else None
        self.regressor = nn.Sequential(_pointwise(rank, in_ch, out_ch), nn.ReLU(),
                                       _pointwise(rank, out_ch, out_ch), nn.ReLU(),
                                       _pointwise(rank, out_ch, out_ch))
        # softplus^-1(init_var - eps), so that vid_variance(alpha) == init_var at the start
        self.alpha = nn.Parameter(torch.full((out_ch,), math.log(math.expm1(init_var - eps))))
        self.eps = eps

    def forward(self, student_feat: torch.Tensor) -> torch.Tensor:
        if self.pool_to is not None:
            pool = F.adaptive_avg_pool1d if len(self.pool_to) == 1 else F.adaptive_avg_pool2d
            student_feat = pool(student_feat, self.pool_to)  # (B, Cs, *S_s) -> (B, Cs, *S_t)
        return self.regressor(student_feat)

    def variance(self) -> torch.Tensor:
        return vid_variance(self.alpha, self.eps)  # (Ct,)


def check_vid_shapes(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], where: str) -> None:
    """`ShapeError` unless VID's regressor can map the student feature onto the teacher's (as build_connector)."""
    s_rank, t_rank = len(student_shape), len(teacher_shape)
    if s_rank != t_rank or s_rank not in (2, 3, 4):
        raise ShapeError(
            f"vid: cannot connect {where}: student feature {list(student_shape)} and teacher feature "
            f"{list(teacher_shape)} " + ("have different ranks" if s_rank != t_rank else f"are {s_rank}-D")
            + ". VID's regressor maps 2-D (B, D), 3-D or 4-D (B, C, H, W) features onto a teacher feature of the "
            "same rank: pick layers of the same kind (both convolutional or both fully connected)."
        )
    if any(s < t for s, t in zip(student_shape[2:], teacher_shape[2:])):
        raise ShapeError(
            f"vid: cannot connect {where}: the student feature's spatial size {list(student_shape[2:])} "
            f"(feature {list(student_shape)}) is smaller than the teacher's {list(teacher_shape[2:])} "
            f"(feature {list(teacher_shape)}). Pick an earlier student layer or a later teacher layer."
        )


class VID(FeaturePairs):
    """`weight * vid_loss(mu(student[layer]), teacher[layer], sigma^2)`, mean over the pairs (see `vid_loss`).

    Each pair gets a `VIDRegressor` (mu and sigma^2, built from the dry-run shapes) as its connector: it
    trains with the student and is saved with the connectors, never with the student. A larger student
    map is average-pooled to the teacher's size; a smaller one, or features of different ranks, are a
    `ShapeError`. RepDistiller pools whichever map is larger, the teacher's included; here the teacher's
    feature stays what the teacher computed.
    Defaults as RepDistiller's VIDLoss: sigma^2 starts at `init_var` = 5 (not 1), `eps` = 1e-5; weight 1
    (its beta, summed there over the layer pairs).
    """

    kind = "vid"

    def __init__(self, student: str | list[str], teacher: str | list[str], weight: float = 1.0,
                 init_var: float = 5.0, eps: float = 1e-5, teacher_name: str | None = None) -> None:
        super().__init__(student, teacher, weight, teacher_name)
        if not (0 < eps < 1 and math.isfinite(init_var) and init_var > eps):
            raise ConfigError(f"vid: need 0 < eps < 1 and init_var > eps, got eps={eps!r}, init_var={init_var!r}. "
                              "init_var is the starting variance sigma^2 (default 5.0), eps its floor (1e-5).")
        self.init_var, self.eps = float(init_var), float(eps)

    def make_connector(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> nn.Module:
        check_vid_shapes(tuple(student_feat.shape), tuple(teacher_feat.shape), self.where(i))
        return VIDRegressor(tuple(student_feat.shape), tuple(teacher_feat.shape), self.init_var, self.eps)

    def pair_loss(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> torch.Tensor:
        regressor = self.connectors[i]
        if not isinstance(regressor, VIDRegressor):
            raise ModelError(f"vid: the regressor of {self.where(i)} is not built yet: it is made from one "
                             "dry-run batch. Did you forget to call Distiller.prepare(batch) before training?")
        return vid_loss(student_feat, teacher_feat, regressor.variance())  # student_feat is mu here
