"""DKD and DIST (distil.losses.response) against hand computations, gradient checks, warm-up and argument checks."""

import math

import pytest
import torch

from distil.batches import Progress
from distil.errors import ConfigError, ModelError, ShapeError
from distil.losses.core import UNLABELED, Outputs, Reads, Term, Views, kd_loss
from distil.losses.response import DIST, DKD, dist_loss, dkd_loss, pearson

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [1.0, 0.5, -1.0]]  # teacher's top-1: class 0, then class 0


def softened(row: list[float], T: float) -> list[float]:
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def hand_tckd_nckd(student_row: list[float], teacher_row: list[float], y: int, T: float) -> tuple[float, float]:
    """The paper's definitions, written out: b = (p_y, 1 - p_y), p_hat_k = p_k / (1 - p_y) for k != y."""
    p_s, p_t = softened(student_row, T), softened(teacher_row, T)
    b_s, b_t = [p_s[y], 1 - p_s[y]], [p_t[y], 1 - p_t[y]]
    tckd = sum(bt * math.log(bt / bs) for bs, bt in zip(b_s, b_t))
    hat_s = [p_s[k] / (1 - p_s[y]) for k in range(len(p_s)) if k != y]
    hat_t = [p_t[k] / (1 - p_t[y]) for k in range(len(p_t)) if k != y]
    nckd = sum(ht * math.log(ht / hs) for hs, ht in zip(hat_s, hat_t))
    return tckd, nckd


def views_at(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, epoch: int) -> Views:
    return Views({"student": Outputs(student), "teacher": Outputs(teacher)}, targets, ("teacher",),
                 progress=Progress(epoch=epoch))


# --- dkd_loss -------------------------------------------------------------------------------


def test_dkd_loss_matches_a_hand_computation_on_a_2x3_example():
    student, teacher = torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64)
    targets, T, alpha, beta = torch.tensor([0, 2]), 2.0, 1.5, 8.0
    (tckd1, nckd1), (tckd2, nckd2) = hand_tckd_nckd(STUDENT[0], TEACHER[0], 0, T), hand_tckd_nckd(
        STUDENT[1], TEACHER[1], 2, T)
    tckd, nckd = (tckd1 + tckd2) / 2, (nckd1 + nckd2) / 2  # batch mean, B = 2
    assert tckd > 1e-3 and nckd > 1e-3  # both parts matter in this example
    got = dkd_loss(student, teacher, targets, alpha, beta, T)
    assert got.dim() == 0
    assert float(got) == pytest.approx(T * T * (alpha * tckd + beta * nckd), rel=1e-9)
    # alpha multiplies TCKD only, beta NCKD only
    assert float(dkd_loss(student, teacher, targets, 1.0, 0.0, T)) == pytest.approx(T * T * tckd, rel=1e-9)
    assert float(dkd_loss(student, teacher, targets, 0.0, 1.0, T)) == pytest.approx(T * T * nckd, rel=1e-9)


def test_dkd_with_beta_one_minus_the_teacher_target_probability_is_hintons_kd():
    # the paper's reformulation: KD = TCKD + (1 - p_y_teacher) * NCKD, sample by sample (B = 1 here)
    student, teacher, T = torch.tensor([STUDENT[1]], dtype=torch.float64), torch.tensor([TEACHER[1]],
                                                                                         dtype=torch.float64), 3.0
    teacher_target_p = softened(TEACHER[1], T)[1]
    dkd = dkd_loss(student, teacher, torch.tensor([1]), 1.0, 1 - teacher_target_p, T)
    assert float(dkd) == pytest.approx(float(kd_loss(student, teacher, T)), rel=1e-9)


def test_dkd_loss_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    student = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    teacher, targets = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 3, UNLABELED, 4])
    assert torch.autograd.gradcheck(lambda s: dkd_loss(s, teacher, targets, 1.0, 8.0, 4.0), (student,),
                                    eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(lambda s: dkd_loss(s, teacher, targets, 1.0, 8.0, 4.0), (student,))


def test_dkd_loss_is_zero_when_student_equals_teacher_and_positive_otherwise():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 5) * 3, torch.tensor([0, 1, UNLABELED, 4])
    for T in (1.0, 4.0):
        assert dkd_loss(logits, logits.clone(), targets, 1.0, 8.0, T).item() == pytest.approx(0.0, abs=1e-6)
    assert dkd_loss(logits, logits.flip(1), targets, 1.0, 8.0, 4.0).item() > 1e-3


def test_dkd_stays_finite_when_the_student_is_sure_in_float32():
    # log(1 - p_y) of summed probabilities would be log(0) here; the logsumexp form is not
    student, teacher = torch.tensor([[400.0, 0.0, 0.0]]), torch.tensor([[3.0, 1.0, 0.0]])
    loss = dkd_loss(student, teacher, torch.tensor([0]), 1.0, 8.0, 1.0)
    assert torch.isfinite(loss)
    # TCKD by hand: to float precision log b_s = (log 1, log(2 / e^400)) = (0, log 2 - 400)
    p_t = softened([3.0, 1.0, 0.0], 1.0)
    log_other_s = math.log(2.0) - 400.0
    tckd = p_t[0] * math.log(p_t[0]) + (1 - p_t[0]) * (math.log(1 - p_t[0]) - log_other_s)
    hat_t = [p_t[1] / (1 - p_t[0]), p_t[2] / (1 - p_t[0])]
    nckd = sum(h * math.log(h / 0.5) for h in hat_t)  # the student's non-target logits are equal: p_hat = (1/2, 1/2)
    assert loss.item() == pytest.approx(tckd + 8.0 * nckd, rel=1e-5)


def test_unlabelled_samples_take_the_teachers_top1_class_as_target():
    student, teacher = torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64)
    assert teacher.argmax(1).tolist() == [0, 0]
    unlabelled = dkd_loss(student, teacher, torch.tensor([UNLABELED, 2]), 1.0, 8.0, 2.0)
    labelled = dkd_loss(student, teacher, torch.tensor([0, 2]), 1.0, 8.0, 2.0)
    assert float(unlabelled) == pytest.approx(float(labelled), rel=1e-12)
    assert float(unlabelled) != pytest.approx(float(dkd_loss(student, teacher, torch.tensor([1, 2]), 1.0, 8.0, 2.0)),
                                              rel=1e-3)  # the target class really changes the value
    both = dkd_loss(student, teacher, torch.tensor([UNLABELED, UNLABELED]), 1.0, 8.0, 2.0)
    assert float(both) == pytest.approx(float(dkd_loss(student, teacher, torch.tensor([0, 0]), 1.0, 8.0, 2.0)))


# --- the DKD term ---------------------------------------------------------------------------


@pytest.mark.parametrize("epoch, factor", [(0, 1 / 20), (9, 10 / 20), (19, 1.0), (30, 1.0)])
def test_dkd_warm_up_ramps_linearly_over_the_first_epochs(epoch, factor):
    student, teacher, targets = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor([0, 2])
    full = dkd_loss(student, teacher, targets, 1.0, 8.0, 4.0)
    got = DKD(warmup=20)(views_at(student, teacher, targets, epoch))
    assert got.item() == pytest.approx(factor * full.item(), rel=1e-6)
    assert DKD(warmup=0)(views_at(student, teacher, targets, epoch)).item() == pytest.approx(full.item(), rel=1e-6)


def test_dkd_term_follows_the_term_protocol_and_reads_its_named_teacher():
    term = DKD(alpha=2.0, beta=4.0, T=3.0, warmup=0, weight=0.5, teacher="big")
    assert isinstance(term, Term)
    assert (term.name, term.weight) == ("dkd:big", 0.5) and DKD().name == "dkd"
    assert term.reads() == Reads(needs_teacher=True, teacher="big")
    student, small, big = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TEACHER).flip(1)
    targets = torch.tensor([0, UNLABELED])
    views = Views({"student": Outputs(student), "small": Outputs(small), "big": Outputs(big)}, targets,
                  ("small", "big"))
    term.build(views)
    expected = dkd_loss(student, big, targets, 2.0, 4.0, 3.0)  # the weight is applied by the Distiller, not here
    assert term(views).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ModelError, match="there are 2 teachers"):
        DKD()(views)


def test_dkd_gradients_reach_the_student_logits_only():
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)  # a teacher that could take a gradient
    DKD(warmup=0)(views_at(student, teacher, torch.tensor([0, UNLABELED]), 0)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_dkd_term_refuses_targets_of_another_shape():
    with pytest.raises(ShapeError, match=r"one target per sample.*\[2\].*\[2, 4\]"):
        DKD()(Views.of(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3)))
    with pytest.raises(ShapeError, match=r"K >= 2.*\[2, 3\].*\[2, 4\]"):
        DKD()(Views.of(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4)))


@pytest.mark.parametrize("kwargs, message", [
    ({"T": 0}, r"dkd: temperature T must be a finite number > 0, got 0"),
    ({"T": -1.0}, r"temperature T must be a finite number > 0"),
    ({"T": float("nan")}, r"temperature T must be a finite number > 0"),
    ({"weight": -1.0}, r"dkd: weight must be a finite number >= 0"),
    ({"alpha": -0.5}, r"dkd: alpha \(the weight of TCKD\) must be a finite number >= 0, got -0.5"),
    ({"beta": -8.0}, r"dkd: beta \(the weight of NCKD\) must be a finite number >= 0"),
    ({"warmup": -1}, r"dkd: warmup must be a whole number of epochs >= 0"),
    ({"warmup": 2.5}, r"warmup must be a whole number"),
])
def test_dkd_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DKD(**kwargs)


# --- dist_loss ------------------------------------------------------------------------------


DIST_STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 0.0, 1.0]]
DIST_TEACHER = [[2.0, 1.0, 0.0], [1.0, 0.5, -1.0], [0.0, 3.0, 1.0]]


def hand_pearson(u: list[float], v: list[float]) -> float:
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    num = sum((a - mu) * (b - mv) for a, b in zip(u, v))
    return num / (math.sqrt(sum((a - mu) ** 2 for a in u)) * math.sqrt(sum((b - mv) ** 2 for b in v)))


def test_dist_loss_matches_a_hand_computation_on_a_3x3_example():
    T, beta, gamma = 2.0, 1.5, 0.5
    p_s = [softened(row, T) for row in DIST_STUDENT]
    p_t = [softened(row, T) for row in DIST_TEACHER]
    inter = 1 - sum(hand_pearson(p_s[b], p_t[b]) for b in range(3)) / 3  # rows: one per sample
    columns = lambda p, k: [p[b][k] for b in range(3)]  # noqa: E731
    intra = 1 - sum(hand_pearson(columns(p_s, k), columns(p_t, k)) for k in range(3)) / 3  # one per class
    assert inter > 1e-2 and intra > 1e-2 and abs(inter - intra) > 1e-2  # the two parts differ here
    student, teacher = torch.tensor(DIST_STUDENT, dtype=torch.float64), torch.tensor(DIST_TEACHER, dtype=torch.float64)
    got = dist_loss(student, teacher, beta, gamma, T)
    assert got.dim() == 0
    assert float(got) == pytest.approx(T * T * (beta * inter + gamma * intra), rel=1e-9)
    assert float(dist_loss(student, teacher, 1.0, 0.0, T)) == pytest.approx(T * T * inter, rel=1e-9)
    assert float(dist_loss(student, teacher, 0.0, 1.0, T)) == pytest.approx(T * T * intra, rel=1e-9)


def test_dist_loss_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    student = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: dist_loss(s, teacher, 1.0, 2.0, 4.0), (student,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(lambda s: dist_loss(s, teacher, 1.0, 2.0, 4.0), (student,))


def test_dist_loss_is_zero_when_student_equals_teacher_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(6, 5) * 3
    for T in (1.0, 4.0):
        assert dist_loss(logits, logits.clone(), 1.0, 1.0, T).item() == pytest.approx(0.0, abs=1e-5)
    assert dist_loss(logits, logits.flip(1), 1.0, 1.0, 4.0).item() > 1e-2


def test_pearson_of_a_constant_row_is_zero_with_a_finite_gradient():
    a = torch.tensor([[0.2, 0.2, 0.2], [0.1, 0.5, 0.4]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.1, 0.7, 0.2], [0.3, 0.3, 0.4]], dtype=torch.float64)
    r = pearson(a, b)
    assert r[0].item() == pytest.approx(0.0, abs=1e-12)
    assert r[1].item() == pytest.approx(hand_pearson([0.1, 0.5, 0.4], [0.3, 0.3, 0.4]), rel=1e-12)
    r.sum().backward()
    assert torch.isfinite(a.grad).all()
    # a batch of one: each class column is constant, so intra = 1 whatever the predictions
    one = torch.tensor([DIST_STUDENT[0]])
    assert dist_loss(one, one, 0.0, 1.0, 2.0).item() == pytest.approx(4.0)


# --- the DIST term --------------------------------------------------------------------------


def test_dist_term_follows_the_term_protocol_and_gives_the_pure_functions_value():
    term = DIST(beta=2.0, gamma=0.5, T=4.0, weight=2.0, teacher="big")
    assert isinstance(term, Term)
    assert (term.name, term.weight) == ("dist:big", 2.0) and DIST().name == "dist"
    assert term.reads() == Reads(needs_teacher=True, teacher="big")
    student, teacher = torch.tensor(DIST_STUDENT), torch.tensor(DIST_TEACHER)
    views = Views({"student": Outputs(student), "big": Outputs(teacher)}, torch.tensor([0, UNLABELED, 2]), ("big",))
    term.build(views)
    assert term(views).item() == pytest.approx(dist_loss(student, teacher, 2.0, 0.5, 4.0).item(), rel=1e-6)


def test_dist_gradients_reach_the_student_logits_only():
    student = torch.tensor(DIST_STUDENT, requires_grad=True)
    teacher = torch.tensor(DIST_TEACHER, requires_grad=True)
    DIST()(Views.of(student, torch.zeros(3, dtype=torch.long), teacher)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("kwargs, message", [
    ({"T": 0}, r"dist: temperature T must be a finite number > 0, got 0"),
    ({"T": -2.0}, r"temperature T must be a finite number > 0"),
    ({"weight": -1.0}, r"dist: weight must be a finite number >= 0"),
    ({"beta": -1.0}, r"dist: beta \(the weight of the inter-class relation\) must be a finite number >= 0"),
    ({"gamma": float("inf")}, r"dist: gamma \(the weight of the intra-class relation\) must be a finite number"),
])
def test_dist_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DIST(**kwargs)
