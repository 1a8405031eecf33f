"""Feature terms: a student layer learns a teacher layer, chosen by module name, through a learned connector
where the shapes differ. Every feature term takes one layer pair or several (`student=["layer1", "layer2"],
teacher=["layer2", "layer3"]`): the term is the mean over the pairs, each with its own connector.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from distil.connectors import build_connector
from distil.distributed import gathered
from distil.errors import ConfigError, ShapeError
from distil.losses.core import Reads, Views, check_weight


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


def per_token_features(feat: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether `feat` holds a sequence model's per-token features (B, T, C), channels last: the targets are per
    token (B, T) and the feature's dim 1 is that T."""
    return targets.dim() == 2 and feat.dim() == 3 and feat.shape[:2] == targets.shape


# --- terms ----------------------------------------------------------------------------------


class FeaturePairs(nn.Module):
    """Shared plumbing of feature terms: which student and teacher modules (of which teacher), one connector per
    pair, and the mean of `pair_loss` over the pairs. A feature term subclasses it and defines
    `pair_loss(student_feat, teacher_feat, pair_index)` and, where it needs one, `make_connector`."""

    kind = "feature"
    # the loss compares the samples of a batch with each other (relation terms): under several training
    # processes it is computed over every process's rows (`distributed.gathered`), as one process would
    over_batch = False

    def __init__(self, student: str | list[str], teacher: str | list[str], weight: float,
                 teacher_name: str | None) -> None:
        super().__init__()
        self.student_layers = [student] if isinstance(student, str) else list(student)
        self.teacher_layers = [teacher] if isinstance(teacher, str) else list(teacher)
        if len(self.student_layers) != len(self.teacher_layers) or not self.student_layers:
            raise ConfigError(f"{self.kind}: give as many student layers as teacher layers (one pair or several), got "
                              f"{self.student_layers} and {self.teacher_layers}")
        self.weight, self.teacher = check_weight(weight, self.kind), teacher_name
        owner = "" if teacher_name is None else f"{teacher_name}."
        pairs = ",".join(f"{s}->{owner}{t}" for s, t in zip(self.student_layers, self.teacher_layers))
        self.name = f"{self.kind}:{pairs}"
        self.connectors = nn.ModuleList([nn.Identity() for _ in self.student_layers])
        self.per_token = False  # set by `build`: (B, T, C) features of a sequence model

    @property
    def student_layer(self) -> str:  # the first pair: the common case of one
        return self.student_layers[0]

    @property
    def teacher_layer(self) -> str:
        return self.teacher_layers[0]

    @property
    def connector(self) -> nn.Module:
        return self.connectors[0]

    def reads(self) -> Reads:
        return Reads(True, self.teacher, tuple(self.student_layers), tuple(self.teacher_layers))

    def pairs(self, views: Views) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student feature, teacher feature) of each pair, as the taps saw them."""
        teacher = views.teacher(self.teacher)
        return [(views.student.feats[s], teacher.feats[t]) for s, t in zip(self.student_layers, self.teacher_layers)]

    def where(self, i: int) -> str:
        return f"student '{self.student_layers[i]}' -> teacher '{self.teacher_layers[i]}'"

    def build(self, views: Views) -> None:
        """Check each pair and create its connector from one dry-run batch's feature shapes."""
        for i, (student_feat, teacher_feat) in enumerate(self.pairs(views)):
            if student_feat.shape[0] != teacher_feat.shape[0]:
                raise ShapeError(f"{self.kind}: {self.where(i)} give features of batch sizes {student_feat.shape[0]} "
                                 f"and {teacher_feat.shape[0]}; both models must see the same batch.")
            self.per_token = per_token_features(student_feat, views.targets)
            self.connectors[i] = self.make_connector(student_feat, teacher_feat, i).to(student_feat.device)

    def make_connector(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> nn.Module:
        """No connector by default (terms that compare shapes-free statistics); FitNet-like terms override it."""
        return nn.Identity()

    def pair_loss(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, views: Views) -> torch.Tensor:
        pairs = [(self.connectors[i](s), t) for i, (s, t) in enumerate(self.pairs(views))]
        if self.over_batch and self.training:
            pairs = [(gathered(s), gathered(t)) for s, t in pairs]
        losses = [self.pair_loss(s, t, i) for i, (s, t) in enumerate(pairs)]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


class FitNet(FeaturePairs):
    """`weight * MSE(connector(student[layer]), teacher[layer])`, mean over the pairs; the connector is learned
    (see `fitnet_loss`)."""

    kind = "fitnet"

    def __init__(self, student: str | list[str], teacher: str | list[str], weight: float = 1.0,
                 teacher_name: str | None = None) -> None:
        super().__init__(student, teacher, weight, teacher_name)

    def make_connector(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> nn.Module:
        return build_connector(tuple(student_feat.shape), tuple(teacher_feat.shape), self.where(i), self.per_token)

    def pair_loss(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> torch.Tensor:
        return fitnet_loss(student_feat, teacher_feat)


class AT(FeaturePairs):
    """`weight * attention transfer` between feature maps of equal spatial size, mean over the pairs (see `at_loss`)."""

    kind = "at"

    def __init__(self, student: str | list[str], teacher: str | list[str], weight: float = 1000.0, p: float = 2.0,
                 teacher_name: str | None = None) -> None:
        super().__init__(student, teacher, weight, teacher_name)
        self.p = p

    def make_connector(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> nn.Module:
        if student_feat.dim() < 3 or student_feat.shape[2:] != teacher_feat.shape[2:]:
            raise ShapeError(
                f"attention transfer needs feature maps of the same spatial size: student "
                f"'{self.student_layers[i]}' gives {list(student_feat.shape)}, teacher '{self.teacher_layers[i]}' "
                f"gives {list(teacher_feat.shape)}. Pick layers at the same resolution."
            )
        return nn.Identity()  # attention maps compare across channel counts

    def pair_loss(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, i: int) -> torch.Tensor:
        return at_loss(student_feat, teacher_feat, self.p)
