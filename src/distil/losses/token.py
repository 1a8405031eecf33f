"""Token-level terms for language models: divergences between the student's and the teacher's next-token
distributions, summed over the vocabulary at each position and averaged over the real tokens of the batch.

    logits (B, T, V), mask (B, T) --per chunk of positions--> divergence per token (B, c) --masked sum / count--> scalar

Forward KL is the `kd` term per token (`core.KD` calls `token_kl` on 3-D logits); this file adds reverse KL
(MiniLLM), generalized JSD (GKD), skew KL (DistiLLM) and total variation. Each pure function takes logits
(B, T, V) and a mask (B, T) (True = the token counts: not padding, not prompt) and reads only `chunk` positions
at a time, so the float32 (B, T, V) probabilities of the whole sequence never exist at once, in the forward
pass or the backward pass (see `chunked_token_mean`). Logits (B, K) are B sequences of one token.
The terms take the mask from `views.mask` when the batch has one, else from `views.targets != UNLABELED`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from distil.errors import ConfigError, ModelError, ShapeError
from distil.losses.core import CHUNK, Reads, Views, check_chunk, check_weight, token_mask

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (log p_s, log p_t) (B, c, V) -> (B, c)


def check_vocabularies(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Student and teacher logits must have the same shape: (B, T, V) (or (B, K)) with one vocabulary."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ModelError(f"teacher and student must share a vocabulary: the teacher's logits have "
                         f"{teacher_logits.shape[-1]} entries per token, the student's {student_logits.shape[-1]}. "
                         "Cross-tokenizer distillation is not supported: use a teacher and a student built with "
                         "the same tokenizer (the same vocab_size).")
    if student_logits.shape != teacher_logits.shape:
        raise ShapeError(f"student and teacher logits must have the same shape (B, T, V); got student "
                         f"{list(student_logits.shape)} and teacher {list(teacher_logits.shape)}")


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32 (logits under autocast); float32 and float64 stay as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_sum(divergence: Divergence, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               mask: torch.Tensor, T: float) -> torch.Tensor:
    """The divergence summed over the real tokens of one chunk: (B, c, V), (B, c, V), (B, c) -> scalar."""
    student_log_p = F.log_softmax(_upcast(student_logits) / T, dim=-1)  # (B, c, V), at least float32
    teacher_log_p = F.log_softmax(_upcast(teacher_logits) / T, dim=-1)
    per_token = divergence(student_log_p, teacher_log_p)  # (B, c)
    # where, not a product: a masked token's value never enters the sum (0 * inf would be NaN) and gets zero gradient
    return torch.where(mask, per_token, per_token.new_zeros(())).sum()


def chunked_token_mean(divergence: Divergence, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       mask: torch.Tensor | None, T: float, chunk: int = CHUNK) -> torch.Tensor:
    """`divergence` per token, averaged over the tokens where `mask` is True; 0 when there are none.

    Shapes: (B, T, V), (B, T, V), (B, T) -> scalar; (B, K) logits with a (B,) mask are read as (B, 1, K).
    mask None = every token counts. Written as sum / count, so an all-masked batch gives 0, not NaN, with no
    host sync.
    """
    check_vocabularies(student_logits, teacher_logits)
    if student_logits.dim() == 2:  # (B, K) -> (B, 1, K): one token per sequence
        student_logits, teacher_logits = student_logits[:, None], teacher_logits[:, None]
        mask = None if mask is None else mask[:, None]
    if student_logits.dim() != 3:
        raise ShapeError(f"token-level losses read logits (B, T, V) (or (B, K)); got {list(student_logits.shape)}")
    if mask is None:
        mask = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device)
    if mask.shape != student_logits.shape[:2]:
        raise ShapeError(f"the token mask must be (B, T) = {list(student_logits.shape[:2])}, one entry per "
                         f"position of the logits; got {list(mask.shape)}")
    check_chunk(chunk, "token-level loss")
    mask = mask.bool()
    # Without the checkpoint, autograd would keep each chunk's float32 (B, c, V) log-probabilities for the
    # backward pass, so by the end of the loop the whole (B, T, V) float32 set would exist after all. With
    # it, a chunk keeps only its input slices (views of the logits) and recomputes its softmaxes in backward,
    # one chunk at a time. torchtune's ForwardKLWithChunkedOutputLoss chunks the sequence too, upcasting one
    # chunk at a time; the checkpoint carries that saving into the backward pass.
    grad = torch.is_grad_enabled() and (student_logits.requires_grad or teacher_logits.requires_grad)
    total = None
    for start in range(0, student_logits.shape[1], chunk):
        piece = (student_logits[:, start:start + chunk], teacher_logits[:, start:start + chunk],
                 mask[:, start:start + chunk], T)  # (B, c, V), (B, c, V), (B, c)
        part = (checkpoint(_chunk_sum, divergence, *piece, use_reentrant=False) if grad
                else _chunk_sum(divergence, *piece))
        total = part if total is None else total + part
    if total is None:  # T = 0 positions
        total = _upcast(student_logits).sum() * 0
    return total / mask.sum().clamp(min=1)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_beta(beta: float) -> float:
    """The generalized JSD's beta: 0 < beta < 1 (at 0 and 1 the divergence is identically 0)."""
    if not _is_number(beta) or not 0 < beta < 1:
        raise ConfigError(f"jsd: beta must be in (0, 1), got {beta!r}; the generalized JSD is 0 at beta = 0 and 1: "
                          "for forward KL use kind 'kd', for reverse KL kind 'rkl'")
    return float(beta)


def check_alpha(alpha: float, kind: str = "skew_kl", share: str = "the teacher's") -> float:
    """A skew KL's alpha, `share` of the mixture: 0 <= alpha < 1 (at 1 the divergence is 0)."""
    if not _is_number(alpha) or not 0 <= alpha < 1:
        raise ConfigError(f"{kind}: alpha ({share} share of the mixture) must be in [0, 1), got {alpha!r}; "
                          "at alpha = 1 the divergence is 0 (the paper uses 0.1)")
    return float(alpha)


# --- the divergences, per token: (log p_s, log p_t) (B, c, V) -> (B, c) -----------------------


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dim; log-space, so no log(0)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * p + (1 - w) * q) by logsumexp: exact where a probability underflows, no log(0) for 0 < w < 1."""
    return torch.logaddexp(log_p + math.log(w), log_q + math.log1p(-w))


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
             T: float = 1.0, chunk: int = CHUNK) -> torch.Tensor:
    """Forward KL per token, `T^2 * KL(p_t || p_s)`, p = softmax(logits / T): Hinton's `kd` at each position.

    Hinton, Vinyals & Dean 2015. Mass-covering: the student is pushed to put mass wherever the teacher does.
    Shapes: (B, T, V), (B, T, V), (B, T) -> scalar, the mean over the real tokens (see `chunked_token_mean`).
    """
    return (T * T) * chunked_token_mean(lambda s, t: _kl(t, s), student_logits, teacher_logits, mask, T, chunk)


def reverse_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    T: float = 1.0, chunk: int = CHUNK) -> torch.Tensor:
    """Reverse KL per token, `T^2 * KL(p_s || p_t)`: mode-seeking, the student need not cover all of the teacher.

    Gu, Dong, Wei & Huang 2024, "MiniLLM: Knowledge Distillation of Large Language Models" (ICLR). MiniLLM
    minimises the sequence-level reverse KL by policy gradient on the student's own samples; this is its
    per-token form on given sequences (as TRL and DistiLLM compute it); sampling from the student is the
    on-policy scheme's job. T^2 as in `kd`. Shapes as `token_kl`.
    """
    return (T * T) * chunked_token_mean(_kl, student_logits, teacher_logits, mask, T, chunk)


def jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
             T: float = 1.0, beta: float = 0.5, chunk: int = CHUNK) -> torch.Tensor:
    """Generalized Jensen-Shannon per token: `beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`,
    `m = beta * p_t + (1 - beta) * p_s`, p = softmax(logits / T); no T^2 factor (as in TRL).

    Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist & Bachem 2024, "On-Policy Distillation of Language
    Models: Learning from Self-Generated Mistakes" (GKD, ICLR), with P = teacher, Q = student. beta = 0.5 is
    the usual JSD; it is bounded by log 2. As beta -> 0 the divergence vanishes like beta * KL(p_t || p_s)
    (JSD / beta -> forward KL) and as beta -> 1 like (1 - beta) * KL(p_s || p_t) (JSD / (1 - beta) -> reverse
    KL): at beta = 0 or 1 exactly the formula is 0. TRL's `generalized_jsd_loss` returns forward KL at beta = 0
    and reverse KL at beta = 1 instead; here those are the `kd` and `rkl` terms, and beta must be in (0, 1)
    (a `ConfigError` otherwise). log m is a logsumexp of log-probabilities (as in TRL). Shapes as `token_kl`.
    """
    check_beta(beta)

    def divergence(student_log_p: torch.Tensor, teacher_log_p: torch.Tensor) -> torch.Tensor:
        log_m = _log_mix(teacher_log_p, student_log_p, beta)
        return beta * _kl(teacher_log_p, log_m) + (1 - beta) * _kl(student_log_p, log_m)

    return chunked_token_mean(divergence, student_logits, teacher_logits, mask, T, chunk)


def skew_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                 T: float = 1.0, alpha: float = 0.1, chunk: int = CHUNK) -> torch.Tensor:
    """Skew forward KL per token: `KL(p_t || alpha * p_t + (1 - alpha) * p_s)`, p = softmax(logits / T).

    Ko, Kim, Chen & Yun 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models" (ICML),
    its SKL (the forward direction: the teacher against a mixture leaning on the student; the reverse one is
    `skew_rkl_loss`). alpha = 0 is forward KL; as alpha grows the mixture keeps a share of
    the teacher, so the divergence stays bounded by log(1 / alpha) and its gradient stays finite where the
    student puts almost no mass. The paper's default is alpha = 0.1. No T^2 factor. The official code
    (jongwooko/distillm, distillm/losses.py) sums only -p_t log m, which is this KL plus the teacher's entropy
    (a constant: the same gradient, a different value). log m is a logsumexp. Shapes as `token_kl`.
    """
    check_alpha(alpha)

    def divergence(student_log_p: torch.Tensor, teacher_log_p: torch.Tensor) -> torch.Tensor:
        if alpha == 0:
            return _kl(teacher_log_p, student_log_p)
        return _kl(teacher_log_p, _log_mix(teacher_log_p, student_log_p, alpha))

    return chunked_token_mean(divergence, student_logits, teacher_logits, mask, T, chunk)


def skew_rkl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                  T: float = 1.0, alpha: float = 0.1, chunk: int = CHUNK) -> torch.Tensor:
    """Skew reverse KL per token: `KL(p_s || alpha * p_s + (1 - alpha) * p_t)`, p = softmax(logits / T).

    DistiLLM's SRKL (Ko et al. 2024; `skewed_reverse_kl` in jongwooko/distillm, distillm/losses.py, with lam =
    alpha: there the mixture is (1 - lam) * p_t + lam * p_s, the same). alpha = 0 is reverse KL (mode-seeking);
    the student's own share in the mixture keeps the divergence below log(1 / alpha) where the teacher puts
    almost no mass. The paper's default is alpha = 0.1. No T^2 factor. Shapes as `token_kl`.
    """
    check_alpha(alpha, "skew_rkl", "the student's")

    def divergence(student_log_p: torch.Tensor, teacher_log_p: torch.Tensor) -> torch.Tensor:
        if alpha == 0:
            return _kl(student_log_p, teacher_log_p)
        return _kl(student_log_p, _log_mix(student_log_p, teacher_log_p, alpha))

    return chunked_token_mean(divergence, student_logits, teacher_logits, mask, T, chunk)


def tvd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
             T: float = 1.0, chunk: int = CHUNK) -> torch.Tensor:
    """Total variation distance per token: `0.5 * sum_v |p_t,v - p_s,v|`, p = softmax(logits / T), in [0, 1].

    Symmetric and bounded; used as a token-level distillation loss by Wen, Li, Du & Mou 2023 ("f-Divergence
    Minimization for Sequence-Level Knowledge Distillation", ACL). No T^2 factor. Shapes as `token_kl`.
    """
    def divergence(student_log_p: torch.Tensor, teacher_log_p: torch.Tensor) -> torch.Tensor:
        return 0.5 * (teacher_log_p.exp() - student_log_p.exp()).abs().sum(dim=-1)

    return chunked_token_mean(divergence, student_logits, teacher_logits, mask, T, chunk)


# --- terms ----------------------------------------------------------------------------------


def _check_temperature(T: float, kind: str) -> float:
    if not _is_number(T) or T <= 0:
        raise ConfigError(f"{kind}: temperature T must be a finite number > 0, got {T!r}")
    return float(T)




def _logits_and_mask(views: Views, teacher: str | None, kind: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor | None]:
    """(student logits, detached teacher logits, token mask): the teacher never gets a gradient from a term."""
    teacher_logits = views.teacher(teacher).logits
    if teacher_logits is None:
        raise ModelError(f"{kind} needs teacher logits; give the Distiller a teacher")
    check_vocabularies(views.student.logits, teacher_logits)
    return views.student.logits, teacher_logits.detach(), token_mask(views)


class RKL(nn.Module):
    """Reverse KL per token `weight * T^2 * KL(p_s || p_t)` (MiniLLM, Gu et al. 2024; see `reverse_kl_loss`).

    Averaged over the tokens of `token_mask` (not padding, not prompt), `chunk` positions at a time.
    `teacher` names the teacher it reads; None = the only teacher. On logits (B, K): per sample.
    """

    def __init__(self, T: float = 1.0, weight: float = 1.0, teacher: str | None = None, chunk: int = CHUNK) -> None:
        super().__init__()
        self.T, self.weight = _check_temperature(T, "rkl"), check_weight(weight, "rkl")
        self.teacher, self.chunk = teacher, check_chunk(chunk, "rkl")
        self.name = "rkl" if teacher is None else f"rkl:{teacher}"

    def reads(self) -> Reads:
        return Reads(needs_teacher=True, teacher=self.teacher)

    def build(self, views: Views) -> None:
        pass

    def forward(self, views: Views) -> torch.Tensor:
        return reverse_kl_loss(*_logits_and_mask(views, self.teacher, "rkl"), self.T, self.chunk)


class JSD(nn.Module):
    """Generalized JSD per token `weight * (beta * KL(p_t || m) + (1 - beta) * KL(p_s || m))`,
    `m = beta * p_t + (1 - beta) * p_s` (GKD, Agarwal et al. 2024; see `jsd_loss`).

    0 < beta < 1; beta = 0.5 is the symmetric JSD. Its limits are the `kd` term (beta -> 0, forward KL) and
    the `rkl` term (beta -> 1, reverse KL): use those for the endpoints. Averaged over the tokens of
    `token_mask`, `chunk` positions at a time; `teacher` None = the only teacher.
    """

    def __init__(self, beta: float = 0.5, T: float = 1.0, weight: float = 1.0, teacher: str | None = None,
                 chunk: int = CHUNK) -> None:
        super().__init__()
        self.beta, self.T, self.weight = check_beta(beta), _check_temperature(T, "jsd"), check_weight(weight, "jsd")
        self.teacher, self.chunk = teacher, check_chunk(chunk, "jsd")
        self.name = "jsd" if teacher is None else f"jsd:{teacher}"

    def reads(self) -> Reads:
        return Reads(needs_teacher=True, teacher=self.teacher)

    def build(self, views: Views) -> None:
        pass

    def forward(self, views: Views) -> torch.Tensor:
        student_logits, teacher_logits, mask = _logits_and_mask(views, self.teacher, "jsd")
        return jsd_loss(student_logits, teacher_logits, mask, self.T, self.beta, self.chunk)


class SkewKL(nn.Module):
    """Skew forward KL per token `weight * KL(p_t || alpha * p_t + (1 - alpha) * p_s)` (DistiLLM, Ko et al.
    2024; see `skew_kl_loss`).

    0 <= alpha < 1 (0 = forward KL without T^2); the paper's default 0.1. Averaged over the tokens of
    `token_mask`, `chunk` positions at a time; `teacher` None = the only teacher. Note: this `alpha` is the
    paper's skew, not the `kd`/`ce` split of Hinton's loss.
    """

    kind, share, loss = "skew_kl", "the teacher's", staticmethod(skew_kl_loss)

    def __init__(self, alpha: float = 0.1, T: float = 1.0, weight: float = 1.0, teacher: str | None = None,
                 chunk: int = CHUNK) -> None:
        super().__init__()
        self.alpha, self.T = check_alpha(alpha, self.kind, self.share), _check_temperature(T, self.kind)
        self.weight, self.teacher, self.chunk = check_weight(weight, self.kind), teacher, check_chunk(chunk, self.kind)
        self.name = self.kind if teacher is None else f"{self.kind}:{teacher}"

    def reads(self) -> Reads:
        return Reads(needs_teacher=True, teacher=self.teacher)

    def build(self, views: Views) -> None:
        pass

    def forward(self, views: Views) -> torch.Tensor:
        student_logits, teacher_logits, mask = _logits_and_mask(views, self.teacher, self.kind)
        return self.loss(student_logits, teacher_logits, mask, self.T, self.alpha, self.chunk)


class SkewRKL(SkewKL):
    """Skew reverse KL per token `weight * KL(p_s || alpha * p_s + (1 - alpha) * p_t)` (DistiLLM's SRKL, Ko et
    al. 2024; see `skew_rkl_loss`). Arguments as `SkewKL`; here alpha is the student's share (0 = reverse KL
    without T^2)."""

    kind, share, loss = "skew_rkl", "the student's", staticmethod(skew_rkl_loss)


class TVD(nn.Module):
    """Total variation per token `weight * 0.5 * sum_v |p_t,v - p_s,v|` (see `tvd_loss`).

    Averaged over the tokens of `token_mask`, `chunk` positions at a time; `teacher` None = the only teacher.
    """

    def __init__(self, T: float = 1.0, weight: float = 1.0, teacher: str | None = None, chunk: int = CHUNK) -> None:
        super().__init__()
        self.T, self.weight = _check_temperature(T, "tvd"), check_weight(weight, "tvd")
        self.teacher, self.chunk = teacher, check_chunk(chunk, "tvd")
        self.name = "tvd" if teacher is None else f"tvd:{teacher}"

    def reads(self) -> Reads:
        return Reads(needs_teacher=True, teacher=self.teacher)

    def build(self, views: Views) -> None:
        pass

    def forward(self, views: Views) -> torch.Tensor:
        return tvd_loss(*_logits_and_mask(views, self.teacher, "tvd"), self.T, self.chunk)
