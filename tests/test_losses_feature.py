"""PKT, NST and VID (distil.losses.feature_more): the pure functions against hand computations and gradcheck,
then the terms in a Distiller on the tiny models (gradients, several pairs, shape errors, saved regressors)."""

import math

import pytest
import torch
from torch import nn

from conftest import Tiny, mlp
from distil import Batch, Distiller
from distil.errors import ConfigError, ModelError, ShapeError
from distil.losses.feature_more import (
    NST,
    PKT,
    VID,
    VIDRegressor,
    neuron_selectivity,
    nst_loss,
    pkt_loss,
    pkt_probabilities,
    vid_loss,
    vid_variance,
)

TERMS = {"pkt": PKT, "nst": NST, "vid": VID}


def dry_run(distiller: Distiller, x: torch.Tensor) -> None:
    distiller.prepare(Batch(x, torch.zeros(len(x), dtype=torch.long)))


def step(distiller: Distiller, x: torch.Tensor):
    return distiller(Batch(x, torch.zeros(len(x), dtype=torch.long)))


class Pooled(Tiny):
    """Like Tiny, with a 2x2 max-pool in layer1: (B, 1, 4, 4) -> layer1 (B, width, 2, 2)."""

    def __init__(self, width: int = 2) -> None:
        super().__init__(width)
        self.layer1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.MaxPool2d(2))
        self.fc = nn.Linear(width * 4, 3)


# --- hand-written references (plain Python floats) ------------------------------------------


def hand_pkt(student_rows: list, teacher_rows: list, eps: float = 1e-7) -> float:
    """sum_ij p_t log((p_t + eps) / (p_s + eps)) / B^2, p(j | i) = k_ij / sum_m k_im, k = (cos + 1) / 2."""

    def probabilities(rows):
        unit = [[v / (math.sqrt(sum(u * u for u in r)) + eps) for v in r] for r in rows]
        k = [[(sum(a * b for a, b in zip(ui, uj)) + 1) / 2 for uj in unit] for ui in unit]
        return [[kij / sum(ki) for kij in ki] for ki in k]

    p_s, p_t = probabilities(student_rows), probabilities(teacher_rows)
    n = len(student_rows)
    return sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(n) for j in range(n)) / n**2


def hand_nst(student: list, teacher: list, degree: int = 2, c: float = 0.0) -> float:
    """student[b][channel][position]: per image, MMD^2 of the normalised channels under (x.y + c)^d; batch mean."""

    def unit(v):
        norm = math.sqrt(sum(a * a for a in v))
        return [a / norm for a in v]

    def k(x, y):
        return (sum(a * b for a, b in zip(x, y)) + c) ** degree

    total = 0.0
    for s_image, t_image in zip(student, teacher):
        s, t = [unit(ch) for ch in s_image], [unit(ch) for ch in t_image]
        tt = sum(k(a, b) for a in t for b in t) / len(t) ** 2
        ss = sum(k(a, b) for a in s for b in s) / len(s) ** 2
        st = sum(k(a, b) for a in s for b in t) / (len(s) * len(t))
        total += tt + ss - 2 * st
    return total / len(student)


def hand_vid(mean: list, teacher: list, variance: list) -> float:
    """mean[b][channel][position]: 0.5 * (log v_c + (t - mu)^2 / v_c), averaged over every (b, c, position)."""
    total, count = 0.0, 0
    for mu_image, t_image in zip(mean, teacher):
        for c, (mu_ch, t_ch) in enumerate(zip(mu_image, t_image)):
            for mu, t in zip(mu_ch, t_ch):
                total += 0.5 * (math.log(variance[c]) + (t - mu) ** 2 / variance[c])
                count += 1
    return total / count


# --- PKT ------------------------------------------------------------------------------------


def test_pkt_loss_by_hand_on_orthogonal_and_parallel_rows():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # cos 0: k = [[1, .5], [.5, 1]]
    teacher = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)  # cos 1: k all 1
    # p_s rows [2/3, 1/3] and [1/3, 2/3]; p_t all 1/2:
    # (0.5 log(0.5 / (2/3)) * 2 + 0.5 log(0.5 / (1/3)) * 2) / 2^2 = (log 0.75 + log 1.5) / 4
    assert pkt_loss(student, teacher).item() == pytest.approx(math.log(1.125) / 4, rel=1e-6)
    assert torch.allclose(pkt_probabilities(student), torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]],
                                                                   dtype=torch.float64), atol=1e-9)


def test_pkt_loss_matches_a_hand_computation_across_widths():
    student = [[1.0, -2.0], [0.5, 0.5], [-1.0, 3.0]]  # (3, 2)
    teacher = [[0.2, 1.0, -1.0], [2.0, 0.0, 1.0], [0.0, -0.5, 0.3]]  # (3, 3): another width
    got = pkt_loss(torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64))
    assert got.dim() == 0
    assert got.item() == pytest.approx(hand_pkt(student, teacher), rel=1e-9)


def test_pkt_flattens_feature_maps():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    rows = student.flatten(1).tolist()  # (4, 2, 3, 3) -> (4, 18)
    assert pkt_loss(student, teacher).item() == pytest.approx(hand_pkt(rows, teacher.tolist()), rel=1e-9)


def test_pkt_loss_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    student = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: pkt_loss(s, teacher), (student,), eps=1e-6, atol=1e-6)


def test_pkt_loss_is_zero_for_equal_features_and_positive_otherwise():
    torch.manual_seed(0)
    feats = torch.randn(5, 6)
    assert pkt_loss(feats, feats.clone()).item() == pytest.approx(0.0, abs=1e-7)
    scales = torch.tensor([[0.5], [2.0], [3.0], [1.0], [10.0]])  # a positive factor per sample: same cosines
    assert pkt_loss(feats * scales, feats).item() == pytest.approx(0.0, abs=1e-6)
    assert pkt_loss(torch.randn(5, 6), feats).item() > 1e-4


# --- NST ------------------------------------------------------------------------------------


def test_nst_loss_by_hand_on_a_one_image_example():
    student = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # (1, 2, 1, 2): unit channels [1, 0] and [0, 1]
    teacher = torch.tensor([[[[3.0, 4.0]]]])  # (1, 1, 1, 2): unit channel [0.6, 0.8]
    # k = dot^2: tt = 1; ss = (1 + 0 + 0 + 1) / 4 = 0.5; st = (0.36 + 0.64) / 2 = 0.5 -> 1 + 0.5 - 2 * 0.5
    assert nst_loss(student, teacher).item() == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize(("degree", "c"), [(2, 0.0), (1, 0.0), (2, 1.0)])
def test_nst_loss_matches_a_hand_computation(degree, c):
    student = [[[1.0, -2.0, 0.5, 0.0], [0.3, 0.3, 1.0, -1.0]],
               [[2.0, 1.0, 0.0, 1.0], [0.0, -1.0, 2.0, 0.5]]]  # (B=2, Cs=2, 4 positions)
    teacher = [[[0.5, 1.0, 1.5, 2.0], [-1.0, 0.0, 1.0, 0.0], [1.0, 1.0, -1.0, 2.0]],
               [[0.1, 0.2, 0.3, 0.4], [3.0, -1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]]]  # (B=2, Ct=3, 4 positions)
    s = torch.tensor(student, dtype=torch.float64).view(2, 2, 2, 2)  # positions as a 2x2 map
    t = torch.tensor(teacher, dtype=torch.float64).view(2, 3, 2, 2)
    got = nst_loss(s, t, degree, c)
    assert got.dim() == 0
    assert got.item() == pytest.approx(hand_nst(student, teacher, degree, c), rel=1e-9)


def test_neuron_selectivity_normalises_each_channel_over_positions():
    feat = torch.tensor([[[[3.0, 4.0]], [[0.0, -2.0]]]])  # (1, 2, 1, 2)
    assert torch.allclose(neuron_selectivity(feat), torch.tensor([[[0.6, 0.8], [0.0, -1.0]]]))


def test_nst_loss_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: nst_loss(s, teacher), (student,), eps=1e-6, atol=1e-6)


def test_nst_loss_is_zero_for_the_same_channels_and_positive_otherwise():
    torch.manual_seed(0)
    feats = torch.randn(3, 4, 3, 3)
    assert nst_loss(feats, feats.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # MMD compares sets of channels: their order and scale do not matter
    shuffled = feats[:, [2, 0, 3, 1]] * torch.tensor([1.0, 5.0, 0.2, 3.0]).view(1, 4, 1, 1)
    assert nst_loss(shuffled, feats).item() == pytest.approx(0.0, abs=1e-6)
    assert nst_loss(torch.randn(3, 4, 3, 3), feats).item() > 1e-3


# --- VID ------------------------------------------------------------------------------------


def test_vid_loss_by_hand_on_a_small_example():
    mean = torch.zeros(1, 2, 1, 2)
    teacher = torch.tensor([[[[1.0, -1.0]], [[2.0, 0.0]]]])  # (1, 2, 1, 2)
    variance = torch.tensor([1.0, 4.0])
    # channel 0: 0.5 * (log 1 + 1) twice; channel 1: 0.5 * (log 4 + 4 / 4) and 0.5 * log 4 -> mean of the four
    assert vid_loss(mean, teacher, variance).item() == pytest.approx((1.5 + math.log(4)) / 4, rel=1e-6)


def test_vid_loss_matches_a_hand_computation_for_maps_and_vectors():
    mean = [[[0.5, -1.0, 2.0], [0.0, 0.3, 1.0]], [[1.0, 1.0, -0.5], [2.0, -2.0, 0.1]]]  # (B=2, C=2, 3 positions)
    teacher = [[[1.0, 0.0, 1.5], [0.2, 0.2, 0.2]], [[-1.0, 2.0, 0.0], [1.0, -1.0, 0.0]]]
    variance = [0.7, 2.5]
    m, t = torch.tensor(mean, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64)
    expected = hand_vid(mean, teacher, variance)
    assert vid_loss(m, t, torch.tensor(variance, dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-9)
    # (B, C) features: positions are a single one
    rows = [[[v] for v in row] for row in [[0.5, -1.0], [2.0, 0.0]]]
    targets = [[[v] for v in row] for row in [[1.0, 1.0], [0.0, 3.0]]]
    got = vid_loss(torch.tensor([[0.5, -1.0], [2.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 3.0]]),
                   torch.tensor(variance))
    assert got.item() == pytest.approx(hand_vid(rows, targets, variance), rel=1e-6)


def test_vid_variance_is_softplus_plus_eps():
    alpha = torch.tensor([0.0, math.log(math.e - 1), -3.0], dtype=torch.float64)
    expected = [math.log(2) + 1e-5, 1.0 + 1e-5, math.log(1 + math.exp(-3.0)) + 1e-5]
    assert vid_variance(alpha, 1e-5).tolist() == pytest.approx(expected, rel=1e-12)


def test_vid_loss_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    mean = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, a: vid_loss(m, teacher, vid_variance(a)), (mean, alpha),
                                    eps=1e-6, atol=1e-6)


def test_vid_regressor_widths_start_variance_and_pooling():
    regressor = VIDRegressor((2, 3, 4, 4), (2, 5, 2, 2), init_var=5.0, eps=1e-5)
    convs = [m for m in regressor.regressor if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
        (3, 5, (1, 1), None), (5, 5, (1, 1), None), (5, 5, (1, 1), None)]
    assert [type(m) for m in regressor.regressor] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert regressor.variance().tolist() == pytest.approx([5.0] * 5, rel=1e-6)
    assert regressor(torch.randn(2, 3, 4, 4)).shape == (2, 5, 2, 2)  # the student's 4x4 pooled to 2x2
    linear = VIDRegressor((2, 8), (2, 16), init_var=1.0)
    assert [(m.in_features, m.out_features) for m in linear.regressor if isinstance(m, nn.Linear)] == [
        (8, 16), (16, 16), (16, 16)]
    assert linear.variance().tolist() == pytest.approx([1.0] * 16, rel=1e-6)


def test_vid_regressor_learns_the_teacher_and_its_variance():
    torch.manual_seed(0)
    student = torch.randn(32, 3, 2, 2)
    teacher = torch.relu(student[:, [0, 1]] * 2.0)  # (32, 2, 2, 2): a function of the student
    regressor = VIDRegressor(tuple(student.shape), tuple(teacher.shape))
    optimizer = torch.optim.Adam(regressor.parameters(), lr=0.05)
    first = vid_loss(regressor(student), teacher, regressor.variance()).item()
    for _ in range(300):
        loss = vid_loss(regressor(student), teacher, regressor.variance())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first - 1.0
    with torch.no_grad():  # for a fixed mean, the best sigma^2_c is channel c's mean squared error
        mse = (regressor(student) - teacher).pow(2).mean(dim=(0, 2, 3))
    assert torch.allclose(regressor.variance().detach(), mse, rtol=0.05, atol=1e-3)
    assert regressor.variance().max().item() < 5.0  # down from init_var


# --- the terms in a Distiller ---------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TERMS))
def test_each_term_trains_the_student_and_never_the_teacher(kind):
    torch.manual_seed(0)
    student, teacher = Tiny(2), Tiny(4)
    term = TERMS[kind](student="layer1", teacher="layer1")
    assert term.kind == kind and term.name == f"{kind}:layer1->layer1"
    distiller = Distiller(student, teacher, [term])
    x = torch.randn(6, 1, 4, 4)
    dry_run(distiller, x)
    out = step(distiller, x)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(out.parts[term.name].item(), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.layer1.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    if kind == "vid":  # the regressor and the variance learn too
        assert isinstance(term.connector, VIDRegressor)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.connector.parameters())
        assert {id(p) for p in term.connector.parameters()} <= {id(p) for p in distiller.parameters()}


@pytest.mark.parametrize("kind", ["pkt", "nst"])
def test_pkt_and_nst_vanish_when_the_student_is_the_teacher(kind):
    torch.manual_seed(0)
    teacher, student = Tiny(4), Tiny(4)
    student.load_state_dict(teacher.state_dict())
    distiller = Distiller(student, teacher, [TERMS[kind](student="layer1", teacher="layer1")])
    x = torch.randn(6, 1, 4, 4)
    dry_run(distiller, x)
    assert step(distiller, x).loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", sorted(TERMS))
def test_two_layer_pairs_give_the_mean_of_their_pair_losses(kind):
    torch.manual_seed(0)
    student, teacher = Tiny(2), Tiny(4)
    term = TERMS[kind](student=["layer1", "layer1.0"], teacher=["layer1.0", "layer1"], weight=1.0)
    assert term.name == f"{kind}:layer1->layer1.0,layer1.0->layer1"
    distiller = Distiller(student, teacher, [term])
    x = torch.randn(5, 1, 4, 4)
    dry_run(distiller, x)
    out = step(distiller, x)
    with torch.no_grad():  # "layer1.0" is the conv, "layer1" the conv then ReLU
        pairs = [(student.layer1(x), teacher.layer1[0](x)), (student.layer1[0](x), teacher.layer1(x))]
        expected = [term.pair_loss(term.connectors[i](s), t, i).item() for i, (s, t) in enumerate(pairs)]
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert expected[0] != pytest.approx(expected[1], rel=1e-3)  # two different pairs, really
    out.loss.backward()
    assert student.layer1[0].weight.grad.abs().sum() > 0
    if kind == "vid":  # one regressor per pair, each learning
        assert term.connectors[0] is not term.connectors[1]
        assert all(p.grad is not None for c in term.connectors for p in c.parameters())


@pytest.mark.parametrize("kind", ["pkt", "vid"])
def test_pkt_and_vid_work_on_fully_connected_features_of_different_widths(kind):
    torch.manual_seed(0)
    student, teacher = mlp(0, hidden=8), mlp(1, hidden=16)  # layer "1" (the ReLU) gives (B, 8) and (B, 16)
    term = TERMS[kind](student="1", teacher="1")
    distiller = Distiller(student, teacher, [term])
    x = torch.randn(7, 4)
    dry_run(distiller, x)
    out = step(distiller, x)
    out.loss.backward()
    assert torch.isfinite(out.loss) and student[0].weight.grad.abs().sum() > 0
    if kind == "vid":
        assert [type(m) for m in term.connector.regressor] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


def test_a_term_reads_the_teacher_it_names():
    torch.manual_seed(0)
    student, big, small = Tiny(2), Tiny(4), Tiny(3)
    term = NST(student="layer1", teacher="layer1", teacher_name="small", weight=1.0)
    assert term.name == "nst:layer1->small.layer1"
    distiller = Distiller(student, {"big": big, "small": small}, [term])
    x = torch.randn(4, 1, 4, 4)
    dry_run(distiller, x)
    with torch.no_grad():
        expected = nst_loss(student.layer1(x), small.layer1(x)).item()
    assert step(distiller, x).loss.item() == pytest.approx(expected, rel=1e-6)


# --- shapes, saving, arguments --------------------------------------------------------------


def test_nst_refuses_feature_maps_of_different_spatial_size():
    distiller = Distiller(Pooled(2), Tiny(4), [NST(student="layer1", teacher="layer1")])
    with pytest.raises(ShapeError, match=r"nst: .*same spatial size.*\[2, 2, 2, 2\].*\[2, 4, 4, 4\]"):
        dry_run(distiller, torch.randn(2, 1, 4, 4))
    fully_connected = Distiller(Tiny(2), Tiny(4), [NST(student="layer1", teacher="fc")])
    with pytest.raises(ShapeError, match=r"same spatial size.*\[2, 2, 4, 4\].*\[2, 3\]"):
        dry_run(fully_connected, torch.randn(2, 1, 4, 4))


def test_vid_pools_a_larger_student_map_and_refuses_a_smaller_one():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4, 4)
    larger = Distiller(Tiny(2), Pooled(4), [VID(student="layer1", teacher="layer1")])
    dry_run(larger, x)
    assert larger.terms[0].connector.pool_to == (2, 2)
    step(larger, x).loss.backward()
    smaller = Distiller(Pooled(2), Tiny(4), [VID(student="layer1", teacher="layer1")])
    with pytest.raises(ShapeError, match=r"vid: .*spatial size \[2, 2\].*\[2, 2, 2, 2\].*smaller than the "
                                         r"teacher's \[4, 4\].*\[2, 4, 4, 4\]"):
        dry_run(smaller, torch.randn(2, 1, 4, 4))
    ranks = Distiller(Tiny(2), Tiny(4), [VID(student="layer1", teacher="fc")])
    with pytest.raises(ShapeError, match=r"vid: cannot connect student 'layer1' -> teacher 'fc'.*\[2, 2, 4, 4\].*"
                                         r"\[2, 3\] have different ranks"):
        dry_run(ranks, torch.randn(2, 1, 4, 4))


def test_vid_regressors_are_saved_with_the_connectors_not_the_student(tmp_path):
    from safetensors.torch import load_file

    student = Tiny(2)
    distiller = Distiller(student, Tiny(4), [VID(student="layer1", teacher="layer1")])
    dry_run(distiller, torch.randn(2, 1, 4, 4))
    distiller.save_connectors(tmp_path / "c.safetensors")
    saved = load_file(tmp_path / "c.safetensors")
    assert set(saved) == {"0.connectors.0.alpha", "0.connectors.0.regressor.0.weight",
                          "0.connectors.0.regressor.2.weight", "0.connectors.0.regressor.4.weight"}
    assert saved["0.connectors.0.regressor.0.weight"].shape == (4, 2, 1, 1)
    assert not any("connector" in k or "regressor" in k for k in student.state_dict())


def test_vid_before_prepare_says_to_call_prepare():
    distiller = Distiller(Tiny(2), Tiny(4), [VID(student="layer1", teacher="layer1")])
    with pytest.raises(ModelError, match=r"Did you forget to call Distiller.prepare\(batch\)"):
        step(distiller, torch.randn(2, 1, 4, 4))


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="init_var > eps"):
        VID(student="layer1", teacher="layer1", init_var=0.0)
    with pytest.raises(ConfigError, match="eps must be in"):
        PKT(student="layer1", teacher="layer1", eps=0.0)
    with pytest.raises(ConfigError, match="nst: weight must be a finite number >= 0"):
        NST(student="layer1", teacher="layer1", weight=-1.0)
    with pytest.raises(ConfigError, match="as many student layers as teacher layers"):
        PKT(student=["layer1", "fc"], teacher="layer1")
