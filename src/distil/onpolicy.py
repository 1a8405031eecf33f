"""On-policy distillation for language models (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes").

With probability `fraction` (GKD's lambda) at each step, the student continues each sequence's first `prompt`
tokens with its own samples, and the terms compare student and teacher on those generated tokens only:
the teacher scores, token by token, text the student actually writes, so the student learns where its own
mistakes lead (off-policy KD only ever shows it the corpus). The other steps are ordinary off-policy
distillation on the corpus. A generated sequence has no ground truth, so the hard-label term adds nothing on
those steps; the teacher runs online for them (cached logits belong to the corpus's text).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distil.batches import Batch, Progress
from distil.distiller import Distiller, StepOutput
from distil.errors import ConfigError
from distil.losses import UNLABELED
from distil.models.gpt import generate


class OnPolicyDistiller(nn.Module):
    """A `Distiller` of a language model whose steps are on-policy with probability `fraction`.

        OnPolicyDistiller(Distiller(student, teacher, [JSD(beta=0.5)]), fraction=0.5, prompt=32)

    The draw is seeded by the global step (`seed`), so a resumed run takes the same steps on-policy.
    Checkpoints hold the wrapped `Distiller`'s state: the same keys as off-policy distillation.
    """

    def __init__(self, distiller: Distiller, fraction: float = 0.5, prompt: int = 32, temperature: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__()
        if not 0 <= fraction <= 1:
            raise ConfigError(f"distill.on_policy must be a fraction of steps in [0, 1], got {fraction}")
        if prompt < 1:
            raise ConfigError(f"distill.prompt_tokens must be >= 1, got {prompt}")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ConfigError(f"on-policy sampling temperature must be > 0, got {temperature}")
        self.distiller, self.fraction, self.prompt, self.temperature, self.seed = (
            distiller, fraction, prompt, temperature, seed)
        self.metric, self.higher_is_better = distiller.metric, distiller.higher_is_better

    def prepare(self, batch: Batch) -> None:
        if batch.inputs.dim() != 2 or self.prompt >= batch.inputs.shape[1]:
            raise ConfigError(f"on-policy distillation needs token sequences longer than the prompt "
                              f"({self.prompt} tokens); got inputs of shape {list(batch.inputs.shape)}. Lower "
                              "distill.prompt_tokens below the block length.")
        self.distiller.prepare(batch)

    def check_targets(self, targets: torch.Tensor) -> None:
        self.distiller.check_targets(targets)

    def on_policy(self, step: int) -> bool:
        """Whether global step `step` rolls out the student (a host-side draw: no device sync)."""
        draw = torch.rand((), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + step))
        return bool(draw < self.fraction)

    def rollout(self, batch: Batch, step: int) -> Batch:
        """The student's own continuations of each sequence's first `prompt` tokens, as a batch whose mask keeps
        the generated positions only. Inputs (B, T) -> prompt (B, P) -> sequence (B, T + 1)."""
        tokens = batch.inputs
        T = tokens.shape[1]
        g = torch.Generator(device=tokens.device).manual_seed(self.seed * 1_000_003 + step)
        sequence = generate(self.distiller.student, tokens[:, :self.prompt], T + 1 - self.prompt,
                            temperature=self.temperature, generator=g)  # (B, T + 1)
        generated = torch.arange(T, device=tokens.device) >= self.prompt - 1  # position i predicts token i + 1
        targets = torch.full_like(tokens, UNLABELED)  # no ground truth for the student's own text
        return Batch(sequence[:, :-1], targets, batch.index, generated.expand(len(tokens), T))

    def forward(self, batch: Batch, progress: Progress | None = None) -> StepOutput:
        progress = progress or Progress()
        if self.distiller.training and self.on_policy(progress.step):  # `fit` sets the trainable module's mode
            batch = self.rollout(batch, progress.step)
        return self.distiller(batch, progress)

    def score(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.distiller.score(batch)

    def trainable_module(self) -> nn.Module:
        return self.distiller

    def compile(self, mode: str | None = None):
        return self.distiller.compile(mode)  # what undoes it at the end of the fit (the taps' hooks)
