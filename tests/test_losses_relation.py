"""Relation terms (RKD, SP, CC, CRD): pure functions against hand computation, gradient checks, invariances, and
CRD's memory banks through the Distiller."""

import itertools
import math

import pytest
import torch

from conftest import Tiny
from distil import Batch, Distiller
from distil.errors import ConfigError
from distil.losses import Outputs, Views
from distil.losses.relation import (
    CC,
    CRD,
    RKD,
    SP,
    cc_loss,
    correlation_matrix,
    crd_nce_loss,
    draw_negatives,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    sp_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# three samples: the student in 2-D, the teacher in 3-D (different widths)
STUDENT = [[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]
TEACHER = [[0.5, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, -1.0, 1.5]]


def as_tensor(rows):
    return torch.tensor(rows, dtype=torch.float64)


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def dist(a, b) -> float:
    return math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b)))


def unit(v):
    n = math.sqrt(sum(u * u for u in v))
    return [u / n for u in v] if n > 0 else [0.0] * len(v)


def dot(a, b) -> float:
    return sum(u * v for u, v in zip(a, b))


# --- RKD ------------------------------------------------------------------------------------


def hand_distances(rows):
    """Distances / their mean over the i != j pairs, as a B x B list."""
    n = len(rows)
    d = [[dist(rows[i], rows[j]) for j in range(n)] for i in range(n)]
    mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return [[d[i][j] / mean for j in range(n)] for i in range(n)]


def hand_cosine(rows, i, j, k) -> float:
    """cos of the angle at sample j between i and k; 0 when i == j or k == j."""
    e_ij = unit([a - b for a, b in zip(rows[i], rows[j])])
    e_kj = unit([a - b for a, b in zip(rows[k], rows[j])])
    return dot(e_ij, e_kj)


def test_rkd_distance_loss_by_hand():
    ds, dt = hand_distances(STUDENT), hand_distances(TEACHER)
    expected = sum(smooth_l1(ds[i][j] - dt[i][j]) for i in range(3) for j in range(3)) / 9  # mean over B^2
    got = rkd_distance_loss(as_tensor(STUDENT), as_tensor(TEACHER))
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_rkd_angle_loss_by_hand():
    triplets = list(itertools.product(range(3), repeat=3))  # all 27, the degenerate ones (cos 0 = 0) included
    expected = sum(smooth_l1(hand_cosine(STUDENT, i, j, k) - hand_cosine(TEACHER, i, j, k))
                   for i, j, k in triplets) / 27
    assert rkd_angle_loss(as_tensor(STUDENT), as_tensor(TEACHER)).item() == pytest.approx(expected, rel=1e-10)
    # the angle at sample 1 (0, 2) between samples 0 and 2 of the student, checked directly:
    # e_01 = unit(1, -2), e_21 = unit(-1, -3): cos = (-1 + 6) / (sqrt(5) sqrt(10)) = 5 / sqrt(50)
    assert hand_cosine(STUDENT, 0, 1, 2) == pytest.approx(5 / math.sqrt(50))


def test_rkd_loss_weights_its_two_parts():
    s, t = as_tensor(STUDENT), as_tensor(TEACHER)
    expected = 25 * rkd_distance_loss(s, t).item() + 50 * rkd_angle_loss(s, t).item()
    assert rkd_loss(s, t).item() == pytest.approx(expected, rel=1e-12)
    assert rkd_loss(s, t, distance=1.0, angle=0.0).item() == pytest.approx(rkd_distance_loss(s, t).item())


def test_rkd_is_zero_for_identical_features_and_invariant_to_scale():
    torch.manual_seed(0)
    feats = torch.randn(5, 4, dtype=torch.float64)
    assert rkd_loss(feats, feats.clone()).item() == pytest.approx(0.0, abs=1e-10)
    assert rkd_distance_loss(3.0 * feats, feats).item() == pytest.approx(0.0, abs=1e-10)
    assert rkd_angle_loss(3.0 * feats, feats).item() == pytest.approx(0.0, abs=1e-10)
    other = torch.randn(5, 6, dtype=torch.float64)
    assert rkd_distance_loss(7.0 * other, feats).item() == pytest.approx(rkd_distance_loss(other, feats).item())
    assert rkd_loss(other, feats).item() > 1e-3


# --- SP -------------------------------------------------------------------------------------


def hand_sp_matrix(rows):
    g = [[dot(a, b) for b in rows] for a in rows]
    return [unit(row) for row in g]


def test_sp_loss_by_hand():
    gs, gt = hand_sp_matrix(STUDENT), hand_sp_matrix(TEACHER)
    # student G = [[1, 0, -1], [0, 4, -2], [-1, -2, 2]]; row 0 / sqrt(2) -> [0.707, 0, -0.707]
    assert gs[0] == pytest.approx([1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)])
    expected = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(3) for j in range(3)) / 9  # / B^2
    assert sp_loss(as_tensor(STUDENT), as_tensor(TEACHER)).item() == pytest.approx(expected, rel=1e-10)


def test_sp_loss_is_zero_for_identical_features():
    feats = torch.randn(4, 2, 3, 3)
    assert sp_loss(feats, feats.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert sp_loss(feats, feats.flip(0)).item() > 1e-4


# --- CC -------------------------------------------------------------------------------------


def hand_cc_matrix(rows, gamma, order):
    units = [unit(r) for r in rows]
    return [[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot(a, b) ** p
                 for p in range(order + 1)) for b in units] for a in units]


def test_cc_loss_by_hand():
    cs, ct = hand_cc_matrix(STUDENT, 0.4, 2), hand_cc_matrix(TEACHER, 0.4, 2)
    # a sample with itself: cos 1, so C_ii = e^-0.8 (1 + 0.8 + 0.32)
    assert cs[0][0] == pytest.approx(math.exp(-0.8) * 2.12)
    expected = sum((cs[i][j] - ct[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert cc_loss(as_tensor(STUDENT), as_tensor(TEACHER)).item() == pytest.approx(expected, rel=1e-10)
    cs1, ct1 = hand_cc_matrix(STUDENT, 1.5, 3), hand_cc_matrix(TEACHER, 1.5, 3)
    expected = sum((cs1[i][j] - ct1[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    got = cc_loss(as_tensor(STUDENT), as_tensor(TEACHER), gamma=1.5, order=3)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_cc_correlation_tends_to_the_gaussian_kernel_as_the_order_grows():
    units = [unit(r) for r in STUDENT]
    rbf = torch.tensor([[math.exp(-0.4 * dist(a, b) ** 2) for b in units] for a in units], dtype=torch.float64)
    assert torch.allclose(correlation_matrix(as_tensor(STUDENT), 0.4, order=20), rbf, atol=1e-12)
    assert not torch.allclose(correlation_matrix(as_tensor(STUDENT), 0.4, order=2), rbf, atol=1e-3)


def test_cc_loss_is_zero_for_identical_features():
    feats = torch.randn(4, 5)
    assert cc_loss(feats, feats.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert cc_loss(feats, feats.flip(0)).item() > 1e-5


# --- all three: gradients, widths ------------------------------------------------------------


RELATION_LOSSES = {"rkd": rkd_loss, "sp": sp_loss, "cc": cc_loss}


@pytest.mark.parametrize("kind", sorted(RELATION_LOSSES))
def test_relation_losses_pass_gradcheck_in_float64(kind):
    torch.manual_seed(0)
    student = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 5, dtype=torch.float64)
    loss = RELATION_LOSSES[kind]
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher), (student,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(RELATION_LOSSES))
def test_relation_losses_send_gradients_to_the_student_only(kind):
    torch.manual_seed(0)
    student = torch.randn(4, 2, 2, 2, requires_grad=True)  # (B, 8) once flattened
    teacher = torch.randn(4, 7, requires_grad=True)  # another width
    RELATION_LOSSES[kind](student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("term", [RKD, SP, CC])
def test_relation_terms_train_a_student_of_another_width_without_a_connector(term):
    torch.manual_seed(0)
    student, teacher = Tiny(2), Tiny(4)  # layer1: (B, 2, 4, 4) and (B, 4, 4, 4)
    distiller = Distiller(student, teacher, [term(student="layer1", teacher="layer1", weight=2.0)])
    x = torch.randn(6, 1, 4, 4)
    distiller.prepare(Batch(x, torch.zeros(6, dtype=torch.long)))
    assert isinstance(distiller.terms[0].connector, torch.nn.Identity)
    out = distiller(Batch(x, torch.zeros(6, dtype=torch.long)))
    name = f"{term.kind}:layer1->layer1"
    assert set(out.parts) == {name} and torch.isfinite(out.loss)
    with torch.no_grad():
        s_feat, t_feat = student.layer1(x), teacher.layer1(x)
    expected = RELATION_LOSSES[term.kind](s_feat, t_feat)
    assert out.parts[name].item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_relation_terms_vanish_when_the_student_is_the_teacher():
    torch.manual_seed(0)
    teacher, student = Tiny(4), Tiny(4)
    student.load_state_dict(teacher.state_dict())
    terms = [RKD("layer1", "layer1"), SP("layer1", "layer1"), CC("layer1", "layer1")]
    distiller = Distiller(student, teacher, terms)
    x = torch.randn(6, 1, 4, 4)
    distiller.prepare(Batch(x, torch.zeros(6, dtype=torch.long)))
    out = distiller(Batch(x, torch.zeros(6, dtype=torch.long)))
    for name, part in out.parts.items():
        assert part.item() == pytest.approx(0.0, abs=1e-6), name


def test_relation_term_arguments_are_checked():
    with pytest.raises(ConfigError, match="distance and angle weights must be finite and >= 0"):
        RKD("layer1", "layer1", distance=-1.0)
    with pytest.raises(ConfigError, match="order must be an integer >= 0 and gamma > 0"):
        CC("layer1", "layer1", gamma=0.0)


# --- CRD ------------------------------------------------------------------------------------


def test_crd_nce_loss_by_hand():
    probs = torch.tensor([[0.5, 0.1, 0.2], [0.05, 0.3, 0.01]], dtype=torch.float64)  # positive first, K = 2
    n, eps = 10, 1e-7
    m = 2 / n  # K * P_n
    total = 0.0
    for row in probs.tolist():
        total += math.log(row[0] / (row[0] + m + eps))
        total += sum(math.log(m / (p + m + eps)) for p in row[1:])
    assert crd_nce_loss(probs, n).item() == pytest.approx(-total / 2, rel=1e-10)


def test_crd_negatives_never_draw_the_sample_itself():
    torch.manual_seed(0)
    index = torch.tensor([0, 3, 4])
    drawn = draw_negatives(index, 2000, 5)
    assert drawn.shape == (3, 2000)
    assert not (drawn == index[:, None]).any()
    assert drawn.min() >= 0 and drawn.max() <= 4
    assert set(drawn[1].tolist()) == {0, 1, 2, 4}  # every other sample turns up


def crd_distiller(num_samples: int = 20, negatives: int = 8, seed: int = 0) -> Distiller:
    torch.manual_seed(seed)
    term = CRD("layer1", "layer1", num_samples=num_samples, feat_dim=8, negatives=negatives)
    return Distiller(Tiny(2), Tiny(4), [term])


def test_crd_runs_in_a_distiller_and_updates_only_the_batch_rows_of_its_memory():
    distiller = crd_distiller()
    term = distiller.terms[0]
    x, y, index = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([3, 7, 11, 12, 0, 19])
    distiller.prepare(Batch(x, y, index=index))
    assert term.connector.linear.in_features == 2 * 16 and term.teacher_heads[0].linear.in_features == 4 * 16
    before = {bank: getattr(term, bank).clone() for bank in ("student_memory", "teacher_memory")}
    out = distiller(Batch(x, y, index=index))
    assert set(out.parts) == {"crd:layer1->layer1"} and out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert term.teacher_heads[0].linear.weight.grad.abs().sum() > 0  # the teacher's head trains
    others = torch.ones(20, dtype=torch.bool)
    others[index] = False
    for bank, old in before.items():
        new = getattr(term, bank)
        assert not torch.allclose(new[index], old[index]), bank
        assert torch.equal(new[others], old[others]), bank
        assert torch.allclose(new[index].norm(dim=1), torch.ones(6))  # updated rows are unit vectors
    assert term.z_student.item() > 0 and term.z_teacher.item() > 0  # estimated on the first batch
    # the heads and banks save with the connectors
    keys = set(distiller.terms.state_dict())
    assert {"0.student_memory", "0.teacher_memory", "0.connectors.0.linear.weight",
            "0.teacher_heads.0.linear.weight", "0.z_student"} <= keys


def test_crd_memory_stays_unchanged_in_eval_mode():
    distiller = crd_distiller()
    x, index = torch.randn(4, 1, 4, 4), torch.arange(4)
    distiller.prepare(Batch(x, torch.zeros(4, dtype=torch.long), index=index))
    term = distiller.terms[0]
    before = term.student_memory.clone()
    distiller.eval()
    with torch.no_grad():
        distiller(Batch(x, torch.zeros(4, dtype=torch.long), index=index))
    assert torch.equal(term.student_memory, before)


def test_crd_loss_decreases_on_a_tiny_fixed_problem():
    distiller = crd_distiller(num_samples=16, negatives=8)
    torch.manual_seed(1)
    batch = Batch(torch.randn(16, 1, 4, 4), torch.arange(16) % 3, index=torch.arange(16))
    distiller.prepare(batch)
    optimizer = torch.optim.Adam(distiller.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = distiller(batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_crd_asks_for_fewer_negatives_than_samples():
    with pytest.raises(ConfigError, match=r"negatives=100 asks for more negatives than other samples exist: the "
                                          r"memory bank has num_samples=100 rows .* Lower negatives below num_samples"):
        CRD("layer1", "layer1", num_samples=100, negatives=100)
    CRD("layer1", "layer1", num_samples=100, negatives=99)  # every other sample: fine


def test_crd_needs_sample_indices():
    distiller = crd_distiller()
    x = torch.randn(4, 1, 4, 4)
    with pytest.raises(ConfigError, match=r"no sample indices .* DataLoader that yields \(x, y, index\)"):
        distiller.prepare(Batch(x, torch.zeros(4, dtype=torch.long)))  # no index
    term = distiller.terms[0]
    feats = {"layer1": torch.randn(4, 2, 4, 4)}
    views = Views.of(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(4, 3), feats,
                     {"layer1": torch.randn(4, 4, 4, 4)})
    with pytest.raises(ConfigError, match="no sample indices"):
        term.build(views)  # the same check, on the term alone
    with pytest.raises(ConfigError, match="no sample indices"):
        term(views)  # and at each step


def test_crd_indices_must_fit_the_memory_bank():
    term = CRD("layer1", "layer1", num_samples=20, feat_dim=8, negatives=4)
    outputs = {"student": Outputs(torch.randn(3, 3), {"layer1": torch.randn(3, 2, 4, 4)}),
               "teacher": Outputs(torch.randn(3, 3), {"layer1": torch.randn(3, 4, 4, 4)})}
    views = Views(outputs, torch.zeros(3, dtype=torch.long), ("teacher",), index=torch.tensor([0, 5, 20]))
    with pytest.raises(ConfigError, match=r"sample index 20 is outside the memory bank of num_samples=20 rows: "
                                          r"num_samples must be the training set size"):
        term.build(views)
    distiller = crd_distiller()
    x = torch.randn(3, 1, 4, 4)
    with pytest.raises(ConfigError, match="sample index 25 is outside the memory bank"):
        distiller.prepare(Batch(x, torch.zeros(3, dtype=torch.long), index=torch.tensor([1, 25, 2])))


def test_crd_takes_one_layer_pair():
    with pytest.raises(ConfigError, match="crd takes one layer pair"):
        CRD(["layer1", "fc"], ["layer1", "fc"], num_samples=100)
