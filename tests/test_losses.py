"""Loss terms against hand computation, gradient checks, and a contract over every entry of LOSSES."""

import math

import pytest
import torch
from torch import nn

from distil import CE, KD, Distiller, FitNet, hinton_terms
from distil.losses import AT, LOSSES, UNLABELED, Views, at_loss, ce_loss, fitnet_loss, kd_loss


def softmax(row: list[float], T: float) -> list[float]:
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_hand_computation():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    T = 2.0
    expected = 0.0
    for s_row, t_row in zip(student, teacher):
        p_s, p_t = softmax(s_row, T), softmax(t_row, T)
        expected += sum(pt * (math.log(pt) - math.log(ps)) for ps, pt in zip(p_s, p_t))
    expected = T * T * expected / 2  # T^2 * KL summed over classes, mean over the batch of 2
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), T)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_is_zero_when_the_student_equals_the_teacher_and_scales_with_t_squared():
    logits = torch.randn(4, 5)
    assert float(kd_loss(logits, logits.clone(), 4.0)) == pytest.approx(0.0, abs=1e-6)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    # the same tempered distributions at T=1 and T=3 (logits scaled by 3): the loss differs by exactly 3^2
    assert kd_loss(3 * s, 3 * t, 3.0).item() == pytest.approx(9 * float(kd_loss(s, t, 1.0)), rel=1e-5)


def test_kd_passes_gradcheck():
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, teacher, 3.0), (student,))


def test_kd_gradient_is_the_softened_probability_difference():
    # d/ds [T^2 KL(p_t || softmax(s/T))] = T * (softmax(s/T) - p_t), divided by the batch size
    student = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0, -1.0]])
    kd_loss(student, teacher, 2.0).backward()
    expected = 2.0 * (torch.tensor(softmax([0.5, -1.0, 2.0], 2.0)) - torch.tensor(softmax([1.0, 0.0, -1.0], 2.0)))
    assert torch.allclose(student.grad[0], expected, atol=1e-6)


def test_ce_matches_hand_computation_and_skips_unlabeled_samples():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    targets = torch.tensor([0, 1, UNLABELED])
    expected = (-math.log(softmax([2.0, 0.0], 1)[0]) - math.log(softmax([0.0, 1.0], 1)[1])) / 2
    assert float(ce_loss(logits, targets)) == pytest.approx(expected, rel=1e-6)


def test_ce_of_an_all_unlabeled_batch_is_zero_not_nan():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = ce_loss(logits, torch.full((3,), UNLABELED))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3, 4))


def test_label_smoothing_by_hand():
    logits, target, eps = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([0]), 0.3
    p = softmax([1.0, 0.0, -1.0], 1)
    q = [1 - eps + eps / 3, eps / 3, eps / 3]
    expected = -sum(qi * math.log(pi) for qi, pi in zip(q, p))
    assert float(ce_loss(logits, target, label_smoothing=eps)) == pytest.approx(expected, rel=1e-6)


def test_fitnet_loss_is_the_mean_squared_error():
    s, t = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 2.0], [5.0, 4.0]])
    assert float(fitnet_loss(s, t)) == pytest.approx((1 + 0 + 4 + 0) / 4)


def test_attention_transfer_by_hand():
    s = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2): all energy at (0, 0)
    t = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]])  # uniform
    a_s = torch.tensor([1.0, 0.0, 0.0, 0.0])  # mean over channels of x^2, flattened, L2-normalised
    a_t = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert float(at_loss(s, t)) == pytest.approx(float(((a_s - a_t) ** 2).mean()))  # (0.25 + 3 * 0.25) / 4


class Tiny(nn.Module):
    def __init__(self, width: int, classes: int = 3) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(width * 16, classes)

    def forward(self, x):
        return self.fc(self.layer1(x).flatten(1))


def test_hinton_loss_through_the_distiller_equals_the_formula():
    torch.manual_seed(0)
    student, teacher = Tiny(2), Tiny(4)
    x, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    alpha, T = 0.7, 3.0
    distiller = Distiller(student, teacher, hinton_terms(T=T, alpha=alpha))
    distiller.prepare(x)
    out = distiller(x, y)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    expected = alpha * kd_loss(s, t, T) + (1 - alpha) * nn.functional.cross_entropy(s, y)
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-6)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.parts.values()), rel=1e-6)
    assert set(out.parts) == {"kd", "ce"}


def make_term(kind: str) -> nn.Module:
    if kind in ("fitnet", "at"):
        return LOSSES[kind](student="layer1", teacher="layer1")
    return LOSSES[kind]()


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_every_loss_term_gives_a_finite_scalar_and_trains_only_the_student(kind):
    torch.manual_seed(0)
    student, teacher = Tiny(2), Tiny(4)
    distiller = Distiller(student, teacher, [make_term(kind)])
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
    distiller.prepare(x)
    out = distiller(x, y)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("kind", ["kd", "fitnet", "at"])
def test_teacher_terms_vanish_when_the_student_is_the_teacher(kind):
    torch.manual_seed(0)
    teacher = Tiny(4)
    student = Tiny(4)
    student.load_state_dict(teacher.state_dict())
    distiller = Distiller(student, teacher, [make_term(kind)])
    x = torch.randn(6, 1, 4, 4)
    distiller.prepare(x)
    if kind == "fitnet":
        assert isinstance(distiller.terms[0].connector, nn.Identity)  # same shapes: nothing to learn
    assert distiller(x, torch.zeros(6, dtype=torch.long)).loss.item() == pytest.approx(0.0, abs=1e-6)


def test_fitnet_connector_is_learned_and_saved_apart(tmp_path):
    student, teacher = Tiny(2), Tiny(4)
    distiller = Distiller(student, teacher, [FitNet(student="layer1", teacher="layer1")])
    distiller.prepare(torch.randn(2, 1, 4, 4))
    connector = distiller.terms[0].connector
    assert isinstance(connector.proj, nn.Conv2d) and connector.proj.in_channels == 2
    assert connector.proj.out_channels == 4
    assert not any("connector" in k for k in student.state_dict())
    distiller.save_connectors(tmp_path / "c.safetensors")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "c.safetensors")) == {"0.connector.proj.weight", "0.connector.proj.bias"}


def test_teacher_stays_frozen_in_eval_mode():
    teacher = Tiny(4).train()
    distiller = Distiller(Tiny(2), teacher, [KD(), CE()])
    distiller.train()
    assert not teacher.training and distiller.student.training
    assert not any(k.startswith("teacher") for k in distiller.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())


def test_class_count_mismatch_is_named():
    distiller = Distiller(Tiny(2, classes=5), Tiny(4, classes=3), [KD()])
    with pytest.raises(Exception, match="teacher gives 3 logits, student gives 5"):
        distiller.prepare(torch.randn(2, 1, 4, 4))


def test_a_distiller_needs_terms_and_kd_a_positive_temperature():
    with pytest.raises(ValueError, match="at least one loss term"):
        Distiller(Tiny(2), Tiny(4), [])
    with pytest.raises(ValueError, match="T must be > 0"):
        KD(T=0)


def test_views_defaults():
    v = Views(torch.zeros(1, 2), torch.zeros(1))
    assert v.teacher_logits is None and v.student_feats == {}
