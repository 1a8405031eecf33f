"""Loss functions and terms against hand computation, gradient checks, the LOSSES contract, and the Distiller."""

import math

import pytest
import torch
from torch import nn

from conftest import Tiny, TinyBN, hand_ce, hand_kl, hand_softmax
from distil import CE, KD, Batch, Distiller, FitNet, hinton_terms
from distil.data import Split
from distil.errors import ModelError, ShapeError, TapError
from distil.losses import AT, LOSSES, UNLABELED, Views, at_loss, attention_map, ce_loss, fitnet_loss, kd_loss

# --- kd_loss --------------------------------------------------------------------------------


def test_kd_loss_matches_a_hand_computation_on_a_2x3_example():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    T = 2.0
    # written out: row 1 softened by T=2 -> exp([0.5, 1.0, 0.25]) and exp([1.0, 0.5, 0.0]), normalised
    e_s1, e_t1 = [math.exp(0.5), math.exp(1.0), math.exp(0.25)], [math.exp(1.0), math.exp(0.5), math.exp(0.0)]
    e_s2, e_t2 = [math.exp(0.0), math.exp(-0.5), math.exp(1.5)], [1.0, 1.0, 1.0]
    total = 0.0
    for e_s, e_t in ((e_s1, e_t1), (e_s2, e_t2)):
        p_s = [v / sum(e_s) for v in e_s]
        p_t = [v / sum(e_t) for v in e_t]
        total += sum(pt * (math.log(pt) - math.log(ps)) for ps, pt in zip(p_s, p_t))
    expected = T * T * total / 2  # T^2 * sum_k p_t (log p_t - log p_s) / B, B = 2
    got = kd_loss(student, teacher, T)
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(float(T * T * hand_kl(student, teacher, T)), rel=1e-6)


def test_kd_loss_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, teacher, 3.0), (student,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(lambda s: kd_loss(s, teacher, 3.0), (student,))


def test_kd_loss_is_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    logits = torch.randn(4, 5) * 3
    for T in (1.0, 4.0, 10.0):
        assert kd_loss(logits, logits.clone(), T).item() == pytest.approx(0.0, abs=1e-6)
    # and strictly positive when they differ
    assert kd_loss(logits, logits.flip(1), 4.0).item() > 1e-3


@pytest.mark.parametrize("T", [1.0, 3.0, 5.0])
def test_kd_loss_carries_the_t_squared_factor(T):
    student = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.0, -0.5]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 0.5, -1.0], [-0.2, 2.2, 0.1]], dtype=torch.float64)
    kl = hand_kl(student, teacher, T)  # KL of the T-softened distributions, no factor
    got = kd_loss(student, teacher, T)
    assert float(got) == pytest.approx(T * T * float(kl), rel=1e-9)
    if T != 1.0:
        assert float(got) != pytest.approx(float(kl), rel=1e-3)  # the factor is really there


def test_kd_gradient_is_t_times_the_softened_probability_difference_over_b():
    # d/ds [T^2 KL(p_t || softmax(s/T))] / B = T * (softmax(s/T) - p_t) / B
    student = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0, -1.0], [2.0, 2.0, 2.0]])
    T = 2.0
    kd_loss(student, teacher, T).backward()
    expected = T * (hand_softmax(student.detach(), T) - hand_softmax(teacher, T)) / 2
    assert torch.allclose(student.grad.double(), expected, atol=1e-6)


# --- ce_loss --------------------------------------------------------------------------------


def test_ce_loss_matches_hand_computation_and_ignores_unlabeled():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    targets = torch.tensor([0, 1, UNLABELED])
    # -log(e^2 / (e^2 + 1)) and -log(e / (1 + e)), averaged over the 2 labelled rows only
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (1 + math.e))) / 2
    assert ce_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_unlabeled_rows_do_not_change_the_ce_loss_nor_get_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([2, UNLABELED, 0, UNLABELED])
    loss = ce_loss(logits, targets)
    expected = hand_ce(logits.detach()[[0, 2]], torch.tensor([2, 0]))
    assert loss.item() == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    assert torch.equal(logits.grad[[1, 3]], torch.zeros(2, 3))
    assert logits.grad[[0, 2]].abs().sum() > 0
    moved = logits.detach().clone()
    moved[[1, 3]] += 100.0
    assert ce_loss(moved, targets).item() == pytest.approx(loss.item(), rel=1e-6)


def test_ce_loss_of_an_all_unlabeled_batch_is_zero_with_a_gradient_path():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = ce_loss(logits, torch.full((3,), UNLABELED))
    assert not torch.isnan(loss)
    assert loss.item() == 0.0
    assert loss.requires_grad  # still part of the graph: backward works
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3, 4))


def test_ce_label_smoothing_by_hand():
    logits, target, eps = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([0]), 0.3
    z = [1.0, 0.0, -1.0]
    p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    q = [1 - eps + eps / 3, eps / 3, eps / 3]  # smoothed target
    expected = -sum(qi * math.log(pi) for qi, pi in zip(q, p))
    assert ce_loss(logits, target, label_smoothing=eps).item() == pytest.approx(expected, rel=1e-6)


def test_ce_label_smoothing_also_ignores_unlabeled():
    logits = torch.tensor([[1.0, 0.0, -1.0], [3.0, -2.0, 0.5]])
    both = ce_loss(logits, torch.tensor([0, UNLABELED]), label_smoothing=0.3)
    alone = ce_loss(logits[:1], torch.tensor([0]), label_smoothing=0.3)
    assert both.item() == pytest.approx(alone.item(), rel=1e-6)


# --- feature losses -------------------------------------------------------------------------


def test_fitnet_loss_is_the_mean_squared_error():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 2.0], [5.0, 1.0]])
    # squared differences 1, 0, 4, 9 -> mean 14 / 4
    assert fitnet_loss(s, t).item() == pytest.approx(14 / 4)


def test_attention_map_by_hand():
    x = torch.tensor([[[[1.0, -2.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, -1.0]]]])  # (1, 2, 2, 2)
    # mean over channels of x^2: [(1+1)/2, (4+0)/2, (0+4)/2, (1+1)/2] = [1, 2, 2, 1]; norm sqrt(10)
    expected = torch.tensor([[1.0, 2.0, 2.0, 1.0]]) / math.sqrt(10)
    assert torch.allclose(attention_map(x), expected, atol=1e-6)


def test_at_loss_by_hand_on_a_1x2x2x2_example():
    s = torch.tensor([[[[1.0, -2.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, -1.0]]]])  # a_s = [1, 2, 2, 1] / sqrt(10)
    t = torch.tensor([[[[3.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]])  # mean x^2 [5,0,0,0]: a_t = [1,0,0,0]
    r = 1 / math.sqrt(10)
    expected = ((r - 1) ** 2 + (2 * r) ** 2 + (2 * r) ** 2 + r ** 2) / 4
    assert at_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    # scale-invariant: multiplying a feature map does not change its normalised attention
    assert at_loss(5 * s, t).item() == pytest.approx(expected, rel=1e-5)


# --- terms on the tiny models (Tiny, TinyBN: see conftest.py) -------------------------------


def make_term(kind: str) -> nn.Module:
    """One term of each kind on the Tiny models' `layer1`, with small settings where the defaults need more data."""
    if kind == "crd":
        return LOSSES[kind](student="layer1", teacher="layer1", num_samples=12, negatives=4, feat_dim=8)
    if kind in ("fitnet", "at", "pkt", "nst", "vid", "rkd", "sp", "cc"):
        return LOSSES[kind](student="layer1", teacher="layer1")
    return LOSSES[kind]()


# --- Hinton's loss through the Distiller ----------------------------------------------------


def test_hinton_terms_in_a_distiller_match_a_hand_computation():
    torch.manual_seed(0)
    student, teacher = Tiny(2).double(), Tiny(4).double()  # float64: the KD term is small, compare tightly
    x, y = torch.randn(5, 1, 4, 4, dtype=torch.float64) * 3, torch.tensor([0, 1, 2, 0, 1])
    alpha, T = 0.7, 3.0
    terms = hinton_terms(T=T, alpha=alpha)
    assert [t.name for t in terms] == ["kd", "ce"]
    assert terms[0].weight == alpha and terms[1].weight == pytest.approx(1 - alpha)
    distiller = Distiller(student, teacher, terms)
    distiller.prepare(Batch(x, torch.zeros(len(x), dtype=torch.long)))
    out = distiller(Batch(x, y))
    with torch.no_grad():
        s, t = student(x), teacher(x)
    kd_hand = T * T * hand_kl(s, t, T)
    ce_hand = hand_ce(s, y)
    assert out.parts["kd"].item() == pytest.approx(float(alpha * kd_hand), rel=1e-9)
    assert out.parts["ce"].item() == pytest.approx(float((1 - alpha) * ce_hand), rel=1e-9)
    assert out.loss.item() == pytest.approx(float(alpha * kd_hand + (1 - alpha) * ce_hand), rel=1e-9)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.parts.values()), rel=1e-6)
    assert set(out.parts) == {"kd", "ce"}
    assert torch.equal(out.outputs, s)


def test_cached_teacher_logits_give_the_same_loss_as_the_live_teacher():
    torch.manual_seed(0)
    student, teacher = Tiny(2), Tiny(4)
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, UNLABELED])
    distiller = Distiller(student, teacher, hinton_terms(T=4.0, alpha=0.9))
    distiller.prepare(Batch(x, torch.zeros(len(x), dtype=torch.long)))
    cached = distiller.with_teacher_logits(Split(x, y), batch_size=4)
    with torch.no_grad():
        assert torch.allclose(cached.teacher_logits["teacher"], teacher(x))
    live = distiller(Batch(x, y)).loss
    replay = distiller(Batch(x, y, teacher_logits={"teacher": cached.teacher_logits["teacher"]})).loss
    assert replay.item() == pytest.approx(live.item(), rel=1e-6)


# --- the contract over every loss term ------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_every_loss_term_gives_a_finite_scalar_and_trains_only_the_student(kind):
    torch.manual_seed(0)
    student, teacher = Tiny(2), Tiny(4)
    distiller = Distiller(student, teacher, [make_term(kind)])
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
    distiller.prepare(Batch(x, torch.zeros(len(x), dtype=torch.long), torch.arange(6)))
    out = distiller(Batch(x, y, torch.arange(6)))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.parts.values()), rel=1e-6)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("kind", ["kd", "dkd", "dist", "multi_kd", "fitnet", "at", "pkt", "nst", "rkd", "sp", "cc",
                                  "rkl", "jsd", "skew_kl", "tvd"])
def test_teacher_terms_vanish_when_the_student_is_the_teacher(kind):
    torch.manual_seed(0)
    teacher, student = Tiny(4), Tiny(4)
    student.load_state_dict(teacher.state_dict())
    distiller = Distiller(student, teacher, [make_term(kind)])
    x = torch.randn(6, 1, 4, 4)
    distiller.prepare(Batch(x, torch.zeros(len(x), dtype=torch.long)))
    if kind == "fitnet":
        assert isinstance(distiller.terms[0].connector, nn.Identity)  # same shapes: nothing to learn
    assert distiller(Batch(x, torch.zeros(6, dtype=torch.long))).loss.item() == pytest.approx(0.0, abs=1e-6)


def test_fitnet_term_learns_a_connector_that_is_saved_apart_from_the_student(tmp_path):
    student, teacher = Tiny(2), Tiny(4)
    distiller = Distiller(student, teacher, [FitNet(student="layer1", teacher="layer1")])
    distiller.prepare(Batch(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)))
    connector = distiller.terms[0].connector
    assert isinstance(connector.proj, nn.Conv2d)
    assert (connector.proj.in_channels, connector.proj.out_channels) == (2, 4)
    assert any("connector" in k for k in distiller.state_dict())
    assert not any("connector" in k for k in student.state_dict())
    distiller.save_connectors(tmp_path / "c.safetensors")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "c.safetensors")) == {"0.connectors.0.proj.weight", "0.connectors.0.proj.bias"}


def test_at_term_refuses_feature_maps_of_different_spatial_size():
    class Pooled(Tiny):
        def __init__(self) -> None:
            super().__init__(2)
            self.layer1 = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2))
            self.fc = nn.Linear(2 * 4, 3)

    distiller = Distiller(Pooled(), Tiny(4), [AT(student="layer1", teacher="layer1")])
    with pytest.raises(ShapeError, match=r"same spatial size.*\[2, 2, 2, 2\].*\[2, 4, 4, 4\]"):
        distiller.prepare(Batch(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)))


def test_kd_term_validates_temperature_and_needs_teacher_logits():
    with pytest.raises(ValueError, match="T must be > 0"):
        KD(T=0)
    with pytest.raises(ValueError, match="T must be > 0"):
        KD(T=-1.0)
    with pytest.raises(ModelError, match="there are 0 teachers"):
        KD()(Views.of(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)))


def test_views_defaults():
    v = Views.of(torch.zeros(1, 2), torch.zeros(1))
    assert v.teachers == () and v.student.feats == {} and list(v.outputs) == ["student"]


# --- Distiller ------------------------------------------------------------------------------


def test_teacher_stays_in_eval_mode_after_distiller_train():
    teacher = TinyBN().train()
    distiller = Distiller(TinyBN(), teacher, [KD(), CE()])
    assert not teacher.training  # frozen at construction
    distiller.train()
    assert distiller.training and distiller.student.training
    assert not teacher.training and not any(m.training for m in teacher.modules())
    distiller.train(True).eval().train()
    assert not teacher.training
    teacher.train()  # someone flips the teacher: the next train() call puts it back in eval mode
    distiller.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    # the teacher's BatchNorm statistics do not move during a training step
    stats = teacher.layer1[1].running_mean.clone()
    distiller(Batch(torch.randn(4, 1, 4, 4) * 5 + 3, torch.zeros(4, dtype=torch.long))).loss.backward()
    assert torch.equal(teacher.layer1[1].running_mean, stats)
    assert not torch.equal(distiller.student.layer1[1].running_mean, torch.zeros(4))  # the student's did


def test_teacher_is_not_in_the_distiller_state_dict():
    teacher = Tiny(4)
    distiller = Distiller(Tiny(2), teacher, [KD(), FitNet(student="layer1", teacher="layer1")])
    distiller.prepare(Batch(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)))
    keys = set(distiller.state_dict())
    assert {f"student.{k}" for k in distiller.student.state_dict()} <= keys
    assert not any(k.startswith(("teacher", "_teacher")) for k in keys)
    teacher_ptrs = {t.data_ptr() for t in teacher.state_dict().values()}
    assert not any(v.data_ptr() in teacher_ptrs for v in distiller.state_dict().values())
    assert not any(p.data_ptr() in teacher_ptrs for p in distiller.parameters())


def test_mismatched_class_counts_raise_model_error_from_prepare():
    distiller = Distiller(Tiny(2, classes=5), Tiny(4, classes=10), [KD(), CE()])
    with pytest.raises(ModelError, match=r"classes.*teacher 'teacher' gives 10 logits, student gives 5"):
        distiller.prepare(Batch(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)))


def test_prepare_restores_the_training_mode():
    distiller = Distiller(TinyBN(), TinyBN(), [KD()])
    distiller.train()
    distiller.prepare(Batch(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)))
    assert distiller.training and distiller.student.training and not distiller.teacher.training
    distiller.eval()
    distiller.prepare(Batch(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)))
    assert not distiller.student.training


def test_a_distiller_needs_at_least_one_term():
    with pytest.raises(ValueError, match="at least one loss term"):
        Distiller(Tiny(2), Tiny(4), [])


def test_a_feature_term_with_a_wrong_layer_name_fails_at_construction():
    with pytest.raises(TapError, match=r"the teacher has no module named 'layr1'.*layer1"):
        Distiller(Tiny(2), Tiny(4), [FitNet(student="layer1", teacher="layr1")])
    with pytest.raises(TapError, match=r"the student has no module named 'fcc'.*fc"):
        Distiller(Tiny(2), Tiny(4), [AT(student="fcc", teacher="layer1")])


def test_library_errors_on_bad_arguments_are_distil_errors_the_cli_catches():
    from distil.errors import ConfigError, DistilError

    for make in (lambda: KD(T=0), lambda: KD(weight=-1), lambda: CE(label_smoothing=1.5),
                 lambda: Distiller(Tiny(2), Tiny(4), [])):
        with pytest.raises(ConfigError) as caught:
            make()
        assert isinstance(caught.value, DistilError) and isinstance(caught.value, ValueError)


def test_a_feature_term_over_several_layer_pairs_is_the_mean_of_its_pairs():
    torch.manual_seed(0)
    student, teacher = Tiny(2), Tiny(4)
    x = torch.randn(3, 1, 4, 4)
    both = Distiller(student, teacher, [AT(student=["layer1", "layer1"], teacher=["layer1", "layer1"], weight=1.0,
                                           p=1.0)])
    one = Distiller(student, teacher, [AT(student="layer1", teacher="layer1", weight=1.0, p=1.0)])
    for d in (both, one):
        d.prepare(Batch(x, torch.zeros(3, dtype=torch.long)))
    assert both.terms[0].name == "at:layer1->layer1,layer1->layer1"
    same = both(Batch(x, torch.zeros(3, dtype=torch.long))).loss
    assert same.item() == pytest.approx(one(Batch(x, torch.zeros(3, dtype=torch.long))).loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="as many student layers as teacher layers"):
        FitNet(student=["layer1", "fc"], teacher="layer1")
