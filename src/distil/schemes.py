"""Training schemes that are more than one frozen teacher and one student, as tasks for the one loop `fit`.

- `MutualLearning`: networks that train together from scratch and teach each other (DML; one may be large:
  a teacher that also learns from its student).
- `EMASelfDistiller`: a model taught online by an exponential moving average of its own weights.

Teaching-assistant chains, born-again generations and several teachers need no task of their own: they are
chains of `Distiller` stages, or a `Distiller` with teachers by name (see `distil.stages`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from distil.batches import Batch, Progress
from distil.distiller import TOP1, Scoring, StepOutput, check_class_targets
from distil.errors import ConfigError, ModelError
from distil.losses import ce_loss, kd_loss
from distil.losses.core import counted


class MutualLearning(nn.Module):
    """Deep mutual learning (Zhang et al. 2018, "Deep Mutual Learning"). For each network i of M:

        loss_i = ce_weight * CE(z_i, y)
                 + kl_weight * T^2 / (M - 1) * sum_{j != i} KL(softmax(z_j / T) || softmax(z_i / T))

    and the step minimises sum_i loss_i. The paper updates the networks in turn; here all update together, each
    against the others' predictions of the same step, detached (the usual implementation: one forward pass each).
    The first network is the one scored and saved as the student; `parts` logs `ce:<name>` and `kl:<name>`.
    Language models (logits (B, T, V)): CE and KL per token, over the tokens with a target; `scoring` gives the
    validation metric (top-1 by default, bits per byte for a language model).
    """

    def __init__(self, models: dict[str, nn.Module], T: float = 1.0, ce_weight: float = 1.0,
                 kl_weight: float = 1.0, scoring: Scoring = TOP1) -> None:
        super().__init__()
        if len(models) < 2:
            raise ConfigError(f"mutual learning needs at least two networks, got {len(models)}")
        if len({id(m) for m in models.values()}) != len(models):
            raise ConfigError("mutual learning got the same network twice: pass separate copies")
        if not math.isfinite(T) or T <= 0:
            raise ConfigError(f"mutual learning temperature T must be > 0, got {T}")
        self.models = nn.ModuleDict(models)
        self.T, self.ce_weight, self.kl_weight = T, ce_weight, kl_weight
        self.scoring, self.metric, self.higher_is_better = scoring, scoring.metric, scoring.higher_is_better
        self.num_classes: int | None = None

    @property
    def student(self) -> nn.Module:
        return next(iter(self.models.values()))

    def prepare(self, batch: Batch) -> None:
        with torch.no_grad():
            was = self.training
            counts = {name: model.eval()(batch.inputs).shape[-1] for name, model in self.models.items()}
            self.train(was)
        if len(set(counts.values())) != 1:
            raise ModelError(f"mutual learning needs networks with the same number of classes, got {counts}")
        self.num_classes = next(iter(counts.values()))
        self.check_targets(batch.targets)

    def check_targets(self, targets: torch.Tensor) -> None:
        if self.num_classes is not None:
            check_class_targets(targets, self.num_classes, allow_unlabeled=True)

    def forward(self, batch: Batch, progress: Progress | None = None) -> StepOutput:
        logits = {name: model(batch.inputs) for name, model in self.models.items()}
        mask = counted(next(iter(logits.values())), batch.targets, batch.mask)
        parts = {}
        for name, own in logits.items():
            others = [z.detach() for other, z in logits.items() if other != name]
            parts[f"ce:{name}"] = self.ce_weight * ce_loss(own, batch.targets, mask=batch.mask)
            parts[f"kl:{name}"] = self.kl_weight * sum(kd_loss(own, z, self.T, mask) for z in others) / len(others)
        return StepOutput(sum(parts.values()), parts, next(iter(logits.values())))

    def score(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scoring.fn(self.student(batch.inputs), batch.targets)

    def trainable_module(self) -> nn.Module:
        return self

    def compile(self, mode: str | None = None) -> None:
        for model in self.models.values():
            model.compile(mode=mode)


class EMASelfDistiller(nn.Module):
    """Online self-distillation from an exponential moving average (EMA) of the model's own weights:

        loss = ce_weight * CE(z, y) + kd_weight * r(t) * T^2 * KL(softmax(z_ema / T) || softmax(z / T))
        ema <- decay * ema + (1 - decay) * model        (before each step, under no_grad)

    r(t) = min(1, (epoch + 1) / warmup) ramps the soft term in while the average is still close to the random
    initialisation. The EMA copy is part of the state (so a resumed run continues it) but never trains.
    The mean-teacher idea (Tarvainen & Valpola 2017) used as a teacher for distillation. Language models: CE and
    KL per token, as `MutualLearning`; `scoring` gives the validation metric.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99, T: float = 4.0, ce_weight: float = 1.0,
                 kd_weight: float = 1.0, warmup: int = 5, scoring: Scoring = TOP1) -> None:
        super().__init__()
        if not 0 < decay < 1:
            raise ConfigError(f"ema decay must be in (0, 1), got {decay}")
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay, self.T, self.ce_weight, self.kd_weight, self.warmup = decay, T, ce_weight, kd_weight, warmup
        self.scoring, self.metric, self.higher_is_better = scoring, scoring.metric, scoring.higher_is_better
        self.num_classes: int | None = None

    def train(self, mode: bool = True) -> EMASelfDistiller:
        super().train(mode)
        self.ema.eval()
        return self

    def prepare(self, batch: Batch) -> None:
        with torch.no_grad():
            was = self.training
            self.num_classes = self.model.eval()(batch.inputs).shape[-1]
            self.train(was)
        self.check_targets(batch.targets)

    def check_targets(self, targets: torch.Tensor) -> None:
        if self.num_classes is not None:
            check_class_targets(targets, self.num_classes, allow_unlabeled=True)

    @torch.no_grad()
    def update_ema(self) -> None:
        for ema, own in zip(self.ema.parameters(), self.model.parameters()):
            ema.lerp_(own, 1 - self.decay)
        for ema, own in zip(self.ema.buffers(), self.model.buffers()):
            ema.copy_(own)

    def forward(self, batch: Batch, progress: Progress | None = None) -> StepOutput:
        if self.training:
            self.update_ema()
        progress = progress or Progress()
        ramp = min(1.0, (progress.epoch + 1) / self.warmup) if self.warmup > 0 else 1.0
        logits = self.model(batch.inputs)
        with torch.no_grad():
            teacher_logits = self.ema(batch.inputs)
        mask = counted(logits, batch.targets, batch.mask)
        parts = {"ce": self.ce_weight * ce_loss(logits, batch.targets, mask=batch.mask),
                 "kd:ema": self.kd_weight * ramp * kd_loss(logits, teacher_logits, self.T, mask)}
        return StepOutput(parts["ce"] + parts["kd:ema"], parts, logits)

    def score(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scoring.fn(self.model(batch.inputs), batch.targets)

    def trainable_module(self) -> nn.Module:
        return self

    def compile(self, mode: str | None = None) -> None:
        self.model.compile(mode=mode)
        self.ema.compile(mode=mode)
