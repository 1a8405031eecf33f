"""Token-level language-model losses (distil.losses.token, and `kd`/`ce` on (B, T, V) logits): hand computations on a
3-word vocabulary, zero at student = teacher, gradcheck with chunking on, masks (padding and prompt get no gradient),
the chunked pass never keeping float32 (B, T, V) tensors for backward, and argument and vocabulary checks."""

import math

import pytest
import torch
from torch.nn import functional as F

from distil.errors import ConfigError, ModelError, ShapeError
from distil.losses import CE, JSD, KD, LOSSES, RKL, TVD, SkewKL, SkewRKL, Views, ce_loss, kd_loss
from distil.losses.core import UNLABELED, Outputs
from distil.losses.token import jsd_loss, reverse_kl_loss, skew_kl_loss, skew_rkl_loss, token_kl, tvd_loss

# one sequence (B = 1) of two tokens (T = 2) over a vocabulary of V = 3
STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [1.0, 0.5, -1.0]]


def softened(row: list[float], T: float) -> list[float]:
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pv * math.log(pv / qv) for pv, qv in zip(p, q))


def mix(w: float, p: list[float], q: list[float]) -> list[float]:
    return [w * pv + (1 - w) * qv for pv, qv in zip(p, q)]


def by_hand(per_token, T: float) -> float:
    """The mean over the two tokens of per_token(p_s, p_t), written out."""
    return sum(per_token(softened(s, T), softened(t, T)) for s, t in zip(STUDENT, TEACHER)) / 2


def logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float64)  # (1, 2, 3)


FUNCTIONS = {
    "kd": token_kl,
    "rkl": reverse_kl_loss,
    "jsd": lambda s, t, mask=None, T=1.0, chunk=128: jsd_loss(s, t, mask, T, 0.3, chunk),
    "skew_kl": lambda s, t, mask=None, T=1.0, chunk=128: skew_kl_loss(s, t, mask, T, 0.2, chunk),
    "skew_rkl": lambda s, t, mask=None, T=1.0, chunk=128: skew_rkl_loss(s, t, mask, T, 0.2, chunk),
    "tvd": tvd_loss,
}


# --- each loss against a hand computation -----------------------------------------------------


def test_token_forward_kl_by_hand():
    T = 2.0
    expected = T * T * by_hand(lambda ps, pt: kl(pt, ps), T)  # T^2 * KL(p_t || p_s), mean over 2 tokens
    assert float(token_kl(logits(STUDENT), logits(TEACHER), None, T)) == pytest.approx(expected, rel=1e-12)


def test_reverse_kl_by_hand():
    T = 2.0
    expected = T * T * by_hand(lambda ps, pt: kl(ps, pt), T)  # T^2 * KL(p_s || p_t)
    got = float(reverse_kl_loss(logits(STUDENT), logits(TEACHER), None, T))
    assert got == pytest.approx(expected, rel=1e-12)
    assert got != pytest.approx(float(token_kl(logits(STUDENT), logits(TEACHER), None, T)), rel=1e-3)


def test_generalized_jsd_by_hand():
    T, beta = 1.5, 0.3

    def jsd(ps, pt):
        m = mix(beta, pt, ps)  # m = beta * p_t + (1 - beta) * p_s
        return beta * kl(pt, m) + (1 - beta) * kl(ps, m)

    got = float(jsd_loss(logits(STUDENT), logits(TEACHER), None, T, beta))
    assert got == pytest.approx(by_hand(jsd, T), rel=1e-12)


def test_jsd_at_one_half_is_symmetric_and_below_log_2():
    forward = float(jsd_loss(logits(STUDENT), logits(TEACHER), None, 1.0, 0.5))
    swapped = float(jsd_loss(logits(TEACHER), logits(STUDENT), None, 1.0, 0.5))
    assert forward == pytest.approx(swapped, rel=1e-12)
    assert 0 < forward < math.log(2)


def test_jsd_divided_by_beta_tends_to_forward_kl_and_by_one_minus_beta_to_reverse_kl():
    s, t, eps = logits(STUDENT), logits(TEACHER), 1e-5
    forward, reverse = by_hand(lambda ps, pt: kl(pt, ps), 1.0), by_hand(lambda ps, pt: kl(ps, pt), 1.0)
    assert float(jsd_loss(s, t, None, 1.0, eps)) / eps == pytest.approx(forward, rel=1e-3)
    assert float(jsd_loss(s, t, None, 1.0, 1 - eps)) / eps == pytest.approx(reverse, rel=1e-3)


def test_skew_kl_by_hand_and_its_alpha_zero_end_is_forward_kl():
    T, alpha = 2.0, 0.1
    expected = by_hand(lambda ps, pt: kl(pt, mix(alpha, pt, ps)), T)  # KL(p_t || alpha p_t + (1 - alpha) p_s)
    assert float(skew_kl_loss(logits(STUDENT), logits(TEACHER), None, T, alpha)) == pytest.approx(expected, rel=1e-12)
    no_skew = by_hand(lambda ps, pt: kl(pt, ps), T)  # no T^2 factor here
    assert float(skew_kl_loss(logits(STUDENT), logits(TEACHER), None, T, 0.0)) == pytest.approx(no_skew, rel=1e-12)
    assert expected < no_skew  # the teacher's share in the mixture pulls it towards the teacher


def test_skew_reverse_kl_by_hand_and_its_alpha_zero_end_is_reverse_kl():
    T, alpha = 2.0, 0.1
    expected = by_hand(lambda ps, pt: kl(ps, mix(alpha, ps, pt)), T)  # KL(p_s || alpha p_s + (1 - alpha) p_t)
    got = float(skew_rkl_loss(logits(STUDENT), logits(TEACHER), None, T, alpha))
    assert got == pytest.approx(expected, rel=1e-12)
    no_skew = by_hand(lambda ps, pt: kl(ps, pt), T)  # reverse KL, no T^2 factor
    assert float(skew_rkl_loss(logits(STUDENT), logits(TEACHER), None, T, 0.0)) == pytest.approx(no_skew, rel=1e-12)
    assert expected < no_skew
    assert got != pytest.approx(float(skew_kl_loss(logits(STUDENT), logits(TEACHER), None, T, alpha)), rel=1e-3)


def test_total_variation_by_hand():
    T = 1.0
    expected = by_hand(lambda ps, pt: 0.5 * sum(abs(a - b) for a, b in zip(pt, ps)), T)
    got = float(tvd_loss(logits(STUDENT), logits(TEACHER), None, T))
    assert got == pytest.approx(expected, rel=1e-12)
    assert 0 < got < 1


@pytest.mark.parametrize("kind", sorted(FUNCTIONS))
def test_a_masked_token_is_left_out_of_the_mean(kind):
    loss = FUNCTIONS[kind]
    s, t = logits(STUDENT), logits(TEACHER)
    only_first = loss(s, t, torch.tensor([[True, False]]), 2.0)
    assert float(only_first) == pytest.approx(float(loss(s[:, :1], t[:, :1], None, 2.0)), rel=1e-12)
    both = (loss(s[:, :1], t[:, :1], None, 2.0) + loss(s[:, 1:], t[:, 1:], None, 2.0)) / 2
    assert float(loss(s, t, None, 2.0)) == pytest.approx(float(both), rel=1e-12)


# --- properties every token-level loss has --------------------------------------------------


@pytest.mark.parametrize("kind", sorted(FUNCTIONS))
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_zero_when_the_student_equals_the_teacher(kind, T):
    torch.manual_seed(0)
    same = torch.randn(2, 5, 7) * 3
    assert abs(float(FUNCTIONS[kind](same, same.clone(), None, T, 2))) < 1e-6
    assert float(FUNCTIONS[kind](same, same.flip(-1), None, T, 2)) > 1e-3


@pytest.mark.parametrize("kind", sorted(FUNCTIONS))
def test_gradcheck_in_float64_with_chunking_and_a_mask(kind):
    torch.manual_seed(0)
    student = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    loss = FUNCTIONS[kind]
    # chunk 2 < T = 5: three chunks, each under a checkpoint
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, mask, 2.0, 2), (student,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(FUNCTIONS))
def test_chunked_equals_unchunked_in_value_and_gradient(kind):
    torch.manual_seed(1)
    teacher, mask = torch.randn(3, 7, 6, dtype=torch.float64), torch.rand(3, 7) > 0.3
    values, grads = [], []
    for chunk in (1, 3, 7, 100):
        student = torch.randn(3, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        student.requires_grad_(True)
        loss = FUNCTIONS[kind](student, teacher, mask, 1.5, chunk)
        loss.backward()
        values.append(loss.item())
        grads.append(student.grad)
    assert all(v == pytest.approx(values[0], rel=1e-12) for v in values)
    assert all(torch.allclose(g, grads[0], rtol=1e-12, atol=1e-15) for g in grads)


@pytest.mark.parametrize("kind", sorted(FUNCTIONS))
def test_masked_tokens_get_exactly_zero_gradient_and_do_not_change_the_loss(kind):
    torch.manual_seed(0)
    student = torch.randn(2, 6, 5, requires_grad=True)
    teacher = torch.randn(2, 6, 5)
    mask = torch.tensor([[False, False, True, True, True, False],  # prompt, prompt, answer x3, padding
                         [False, True, True, False, False, False]])
    loss = FUNCTIONS[kind](student, teacher, mask, 2.0, 4)
    loss.backward()
    assert torch.equal(student.grad[~mask], torch.zeros(int((~mask).sum()), 5))
    assert (student.grad[mask].abs().sum(dim=-1) > 0).all()
    moved = student.detach().clone()
    moved[~mask] += 100.0
    assert float(FUNCTIONS[kind](moved, teacher, mask, 2.0, 4)) == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("kind", sorted(FUNCTIONS))
def test_an_all_masked_batch_gives_zero_not_nan(kind):
    student = torch.randn(2, 3, 4, requires_grad=True)
    loss = FUNCTIONS[kind](student, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool), 1.0, 2)
    assert not torch.isnan(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros(2, 3, 4))


def test_the_backward_pass_keeps_only_the_low_precision_chunks_not_float32_probabilities():
    # what autograd keeps for backward: under the checkpoints, only each chunk's bf16 slices (views of the logits)
    # and its mask; the float32 log-probabilities are recomputed chunk by chunk in backward
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    student = torch.randn(2, 8, 50, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(2, 8, 50, dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = jsd_loss(student, teacher, None, 1.0, 0.5, chunk=2)
    assert loss.dtype == torch.float32  # computed in float32 from bf16 logits
    assert saved and not any(dtype == torch.float32 and len(shape) == 3 for shape, dtype in saved)
    assert all(shape[1] <= 2 for shape, _ in saved if len(shape) >= 2)
    loss.backward()
    assert student.grad.dtype == torch.bfloat16 and student.grad.abs().sum() > 0
    exact = jsd_loss(student.detach().float(), teacher.float(), None, 1.0, 0.5)
    assert loss.item() == pytest.approx(float(exact), rel=1e-5)


def test_logits_b_k_are_b_sequences_of_one_token():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    for loss in FUNCTIONS.values():
        flat = loss(student, teacher, None, 2.0)
        assert float(flat) == pytest.approx(float(loss(student[:, None], teacher[:, None], None, 2.0)), rel=1e-6)
    assert float(token_kl(student, teacher, None, 2.0)) == pytest.approx(float(kd_loss(student, teacher, 2.0)),
                                                                          rel=1e-6)
    some = torch.tensor([True, False, True, True])  # a (B,) mask leaves samples out of kd_loss too
    kept = kd_loss(student[some], teacher[some], 2.0)
    assert float(kd_loss(student, teacher, 2.0, some)) == pytest.approx(float(kept), rel=1e-6)


# --- the terms: masks from the batch, kd and ce on (B, T, V) ----------------------------------


def lm_views(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
             mask: torch.Tensor | None = None) -> Views:
    return Views({"student": Outputs(student), "teacher": Outputs(teacher)}, targets, ("teacher",), mask=mask)


TERMS = {"kd": lambda: KD(T=2.0, chunk=2), "rkl": lambda: RKL(T=2.0, chunk=2), "jsd": lambda: JSD(0.3, T=2.0, chunk=2),
         "skew_kl": lambda: SkewKL(0.2, T=2.0, chunk=2), "skew_rkl": lambda: SkewRKL(0.2, T=2.0, chunk=2),
         "tvd": lambda: TVD(T=2.0, chunk=2)}


@pytest.mark.parametrize("kind", sorted(TERMS))
def test_a_term_reads_the_mask_from_the_targets_or_from_the_batch_mask(kind):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 6, requires_grad=True), torch.randn(2, 5, 6)
    targets = torch.tensor([[UNLABELED, 3, 1, UNLABELED, UNLABELED], [UNLABELED, UNLABELED, 0, 2, 5]])
    real = targets != UNLABELED  # prompt and padding are -1
    term = TERMS[kind]()
    assert term.name == kind and term.reads().needs_teacher
    loss = term(lm_views(student, teacher, targets))
    assert loss.item() == pytest.approx(FUNCTIONS[kind](student, teacher, real, 2.0).item(), rel=1e-6)
    loss.backward()
    assert torch.equal(student.grad[~real], torch.zeros(int((~real).sum()), 6))
    only_first = torch.zeros(2, 5, dtype=torch.bool)
    only_first[0, 1] = True  # a batch mask wins over the targets
    masked = term(lm_views(student, teacher, targets, only_first))
    assert masked.item() == pytest.approx(FUNCTIONS[kind](student[:1, 1:2], teacher[:1, 1:2], None, 2.0).item(),
                                          rel=1e-6)


def test_the_kd_term_on_token_logits_is_kd_loss_on_each_real_token_averaged():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    targets = torch.tensor([[UNLABELED, 1, 2, 0], [3, 4, UNLABELED, UNLABELED]])
    rows = [(b, i) for b in range(2) for i in range(4) if targets[b, i] != UNLABELED]
    per_token = [float(kd_loss(student[b, i][None], teacher[b, i][None], 3.0)) for b, i in rows]  # (1, V) each
    got = KD(T=3.0, chunk=3)(lm_views(student, teacher, targets))
    assert float(got) == pytest.approx(sum(per_token) / len(per_token), rel=1e-12)


def test_ce_on_token_logits_is_the_mean_cross_entropy_of_the_real_tokens():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [3.0, 0.0, 0.0]]])  # (1, 3, 3)
    targets = torch.tensor([[UNLABELED, 2, 0]])  # a prompt token, then two next tokens
    z1, z2 = [0.5, 0.5, 2.0], [3.0, 0.0, 0.0]
    expected = (-math.log(math.exp(z1[2]) / sum(map(math.exp, z1))) - math.log(math.exp(z2[0]) / sum(
        map(math.exp, z2)))) / 2
    assert float(ce_loss(student, targets)) == pytest.approx(expected, rel=1e-6)
    assert float(CE()(lm_views(student, student, targets))) == pytest.approx(expected, rel=1e-6)
    # a batch mask leaves out more positions: here the last one
    mask = torch.tensor([[True, True, False]])
    only_second = -math.log(math.exp(z1[2]) / sum(map(math.exp, z1)))
    assert float(CE()(lm_views(student, student, targets, mask))) == pytest.approx(only_second, rel=1e-6)
    assert float(ce_loss(student, targets, mask=torch.zeros(1, 3, dtype=torch.bool))) == 0.0
    assert float(ce_loss(student, targets, 0.1)) == pytest.approx(
        float(F.cross_entropy(student[0, 1:], targets[0, 1:], label_smoothing=0.1)), rel=1e-6)


def test_a_teacher_with_another_vocabulary_is_refused_naming_both_sizes():
    student, teacher = torch.randn(2, 4, 5), torch.randn(2, 4, 7)
    targets = torch.zeros(2, 4, dtype=torch.long)
    message = r"teacher and student must share a vocabulary.*7.*5.*[Cc]ross-tokenizer distillation is not supported"
    for term in TERMS.values():
        with pytest.raises(ModelError, match=message):
            term()(lm_views(student, teacher, targets))
    with pytest.raises(ModelError, match=message):
        tvd_loss(student, teacher)


def test_token_shapes_that_do_not_fit_are_shape_errors():
    student = torch.randn(2, 4, 5)
    with pytest.raises(ShapeError, match=r"targets \(B, T\) = \[2, 4\].*got targets \[2\]"):
        RKL()(lm_views(student, student, torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ShapeError, match=r"mask must be \(B, T\) = \[2, 4\].*got \[2, 3\]"):
        token_kl(student, student, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"ce reads logits.*\[2, 4, 5\].*\[2, 3\]"):
        ce_loss(student, torch.zeros(2, 3, dtype=torch.long))


def test_term_arguments_are_checked_with_a_hint():
    with pytest.raises(ConfigError, match=r"jsd: beta must be in \(0, 1\).*kind 'kd'.*kind 'rkl'"):
        JSD(beta=0.0)
    with pytest.raises(ConfigError, match=r"jsd: beta must be in \(0, 1\)"):
        JSD(beta=1.0)
    with pytest.raises(ConfigError, match=r"skew_kl: alpha .* must be in \[0, 1\)"):
        SkewKL(alpha=1.0)
    with pytest.raises(ConfigError, match=r"skew_rkl: alpha \(the student's share of the mixture\) must be in"):
        SkewRKL(alpha=1.5)
    with pytest.raises(ConfigError, match=r"jsd: beta must be in \(0, 1\)"):  # the pure functions check too
        jsd_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), beta=0.0)
    with pytest.raises(ConfigError, match=r"skew_kl: alpha"):
        skew_kl_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), alpha=-0.1)
    with pytest.raises(ConfigError, match="rkl: temperature T must be a finite number > 0"):
        RKL(T=0)
    with pytest.raises(ConfigError, match="tvd: chunk must be a whole number of positions >= 1"):
        TVD(chunk=0)
    with pytest.raises(ConfigError, match="kd: chunk must be a whole number"):
        KD(chunk=1.5)
    with pytest.raises(ConfigError, match="tvd: weight must be"):
        TVD(weight=-1)
    assert RKL(teacher="big").name == "rkl:big" and RKL(teacher="big").reads().teacher == "big"


def test_the_token_kinds_are_registered():
    assert {"rkl": RKL, "jsd": JSD, "skew_kl": SkewKL, "skew_rkl": SkewRKL, "tvd": TVD}.items() <= LOSSES.items()
