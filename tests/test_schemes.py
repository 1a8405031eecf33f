"""Training schemes: several teachers, mutual learning, EMA self-distillation, assistant chains and born-again
generations, from Python and from a recipe."""

import math
import textwrap

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import hand_ce, hand_kl, hand_softmax, mlp
from distil import CE, KD, Batch, Distiller, Progress, TrainConfig, fit, load_recipe
from distil.cli import app
from distil.errors import ConfigError, ModelError
from distil.losses import MultiKD, ensemble_target
from distil.pipeline import load_metrics, run_pipeline
from distil.schemes import EMASelfDistiller, MutualLearning


class Fixed(nn.Module):
    """A 'model' that returns fixed logits plus a learnable bias, so losses can be computed by hand."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.bias = nn.Parameter(torch.zeros(logits.shape[1], dtype=logits.dtype))

    def forward(self, x):
        return self.logits[: len(x)] + self.bias


# --- several teachers: one soft target ---------------------------------------------------------


def test_ensemble_targets_mean_weights_and_confidence_by_hand():
    t1 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # sure of sample 0, unsure of 1
    t2 = torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)  # the other way round
    p1, p2 = hand_softmax(t1, 2.0), hand_softmax(t2, 2.0)
    assert torch.allclose(ensemble_target([t1, t2], 2.0, "mean"), (p1 + p2) / 2)
    assert torch.allclose(ensemble_target([t1, t2], 2.0, "weights", [3.0, 1.0]), 0.75 * p1 + 0.25 * p2)
    q1, q2 = hand_softmax(t1), hand_softmax(t2)
    h1, h2 = -(q1 * q1.log()).sum(1), -(q2 * q2.log()).sum(1)  # entropies at T=1, per sample
    c1 = torch.exp(-h1) / (torch.exp(-h1) + torch.exp(-h2))
    expected = c1[:, None] * p1 + (1 - c1)[:, None] * p2
    got = ensemble_target([t1, t2], 2.0, "confidence")
    assert torch.allclose(got, expected)
    assert got[0, 0] > (p1[0, 0] + p2[0, 0]) / 2  # the sure teacher counts more


def test_multi_kd_in_a_distiller_equals_the_hand_computed_loss():
    torch.manual_seed(0)
    s, t1, t2 = (torch.randn(4, 3, dtype=torch.float64) for _ in range(3))
    distiller = Distiller(Fixed(s), {"a": Fixed(t1), "b": Fixed(t2)},
                          [MultiKD(T=3.0, weight=0.7), CE(weight=0.3)])
    y = torch.tensor([0, 1, 2, 0])
    out = distiller(Batch(torch.zeros(4, 1), y))
    target = (hand_softmax(t1, 3.0) + hand_softmax(t2, 3.0)) / 2
    log_ps = torch.log(hand_softmax(s, 3.0))
    kd = 9.0 * (target * (target.log() - log_ps)).sum() / 4
    assert out.parts["multi_kd"].item() == pytest.approx(0.7 * kd.item(), rel=1e-9)
    assert out.loss.item() == pytest.approx(0.7 * kd.item() + 0.3 * hand_ce(s, y).item(), rel=1e-9)


def test_multi_kd_argument_errors():
    with pytest.raises(ConfigError, match="combine must be one of mean, weights, confidence"):
        MultiKD(combine="vote")
    with pytest.raises(ConfigError, match="as many non-negative `weights`"):
        MultiKD(combine="weights", teachers=["a", "b"], weights=[1.0])
    with pytest.raises(ConfigError, match="reads teacher 'c'"):
        Distiller(mlp(0), {"a": mlp(1), "b": mlp(2)}, [MultiKD(teachers=["a", "c"])])


def test_teachers_with_different_class_counts_are_refused():
    wide = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 5))
    distiller = Distiller(mlp(0), {"a": mlp(1), "five": wide}, [MultiKD()])
    with pytest.raises(ModelError, match="teacher 'five' gives 5 logits, student gives 3"):
        distiller.prepare(Batch(torch.randn(2, 4), torch.zeros(2, dtype=torch.long)))


# --- mutual learning ---------------------------------------------------------------------------


def test_mutual_learning_loss_by_hand_and_gradients_reach_every_network():
    torch.manual_seed(0)
    za, zb = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, -1])  # the last sample has no label: KL only
    task = MutualLearning({"student": Fixed(za), "peer": Fixed(zb)}, T=2.0, ce_weight=1.0, kl_weight=0.5)
    out = task(Batch(torch.zeros(5, 1), y))
    labelled = slice(0, 4)
    assert out.parts["ce:student"].item() == pytest.approx(hand_ce(za[labelled], y[labelled]).item(), rel=1e-9)
    assert out.parts["kl:student"].item() == pytest.approx(0.5 * 4.0 * hand_kl(za, zb, 2.0).item(), rel=1e-9)
    assert out.parts["kl:peer"].item() == pytest.approx(0.5 * 4.0 * hand_kl(zb, za, 2.0).item(), rel=1e-9)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.parts.values()), rel=1e-12)
    out.loss.backward()
    assert all(m.bias.grad is not None and m.bias.grad.abs().sum() > 0 for m in task.models.values())


class TokenLM(nn.Module):
    """A language model in miniature: tokens (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, seed: int, vocab: int = 7) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = nn.Embedding(vocab, 6), nn.Linear(6, vocab)

    def forward(self, tokens):
        return self.head(self.embed(tokens))


def token_kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, real: torch.Tensor, T: float) -> float:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per token, mean over the real tokens, by hand."""
    p, q = hand_softmax(teacher[real] / T), hand_softmax(student[real] / T)
    return (T * T * (p * (p.log() - q.log())).sum(1).mean()).item()


def test_mutual_learning_and_ema_on_a_language_model_count_real_tokens_and_score_bits():
    from distil.distiller import BITS_PER_BYTE, bits_score

    torch.manual_seed(0)
    tokens, targets = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5))
    targets[0, :2] = targets[2, 4] = -1  # prompt and padding: no target, no loss
    real, batch = targets != -1, Batch(tokens, targets)
    a, b = TokenLM(0), TokenLM(1)
    task = MutualLearning({"student": a, "peer": b}, T=2.0, scoring=BITS_PER_BYTE).eval()
    out = task(batch)
    za, zb = a(tokens).detach(), b(tokens).detach()
    assert out.parts["kl:student"].item() == pytest.approx(token_kl_by_hand(za, zb, real, 2.0), rel=1e-5)
    assert out.parts["ce:peer"].item() == pytest.approx(hand_ce(zb[real], targets[real]).item(), rel=1e-5)
    assert task.metric == "bpb" and not task.higher_is_better
    assert [v.item() for v in task.score(batch)] == pytest.approx([v.item() for v in bits_score(za, targets)])

    ema = EMASelfDistiller(TokenLM(2), decay=0.5, warmup=0, scoring=BITS_PER_BYTE).eval()
    with torch.no_grad():
        for p in ema.model.parameters():
            p.add_(1.0)  # the model moves away from its average, which teaches it
    out = ema(batch)
    expected = token_kl_by_hand(ema.model(tokens).detach(), ema.ema(tokens), real, ema.T)
    assert out.parts["kd:ema"].item() == pytest.approx(expected, rel=1e-4)


def test_mutual_learning_needs_two_separate_networks_of_one_class_count():
    net = mlp(0)
    with pytest.raises(ConfigError, match="at least two networks"):
        MutualLearning({"student": net})
    with pytest.raises(ConfigError, match="same network twice"):
        MutualLearning({"student": net, "peer": net})
    task = MutualLearning({"student": mlp(0), "peer": nn.Sequential(nn.Linear(4, 5))})
    with pytest.raises(ModelError, match="same number of classes"):
        task.prepare(Batch(torch.randn(2, 4), torch.zeros(2, dtype=torch.long)))


# --- EMA self-distillation ---------------------------------------------------------------------


def test_the_ema_copy_moves_toward_the_model_by_one_minus_decay_each_step():
    model = mlp(0)
    task = EMASelfDistiller(model, decay=0.9, warmup=0)
    before = [p.detach().clone() for p in task.ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    task.train()
    task(Batch(torch.randn(4, 4), torch.zeros(4, dtype=torch.long)))
    for old, new, own in zip(before, task.ema.parameters(), model.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * own)
        assert not new.requires_grad
    assert not any("ema" in name for name, p in task.named_parameters() if p.requires_grad)


def test_the_ema_soft_term_ramps_in_over_the_warmup():
    task = EMASelfDistiller(mlp(0), decay=0.5, warmup=4).eval()  # eval: no EMA update, same teacher each call
    batch = Batch(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    full = task(batch, Progress(epoch=10)).parts["kd:ema"]
    for epoch, share in [(0, 0.25), (1, 0.5), (3, 1.0)]:
        assert task(batch, Progress(epoch=epoch)).parts["kd:ema"].item() == pytest.approx(share * full.item())


def test_fit_trains_a_mutual_pair_and_an_ema_student():
    from conftest import blob_split
    from distil.evaluate import accuracy

    cfg = TrainConfig(epochs=5, batch_size=32, lr=0.02)
    a, b = mlp(0), mlp(1)
    fit(MutualLearning({"student": a, "peer": b}), blob_split(), blob_split(60, seed=1), cfg)
    student = mlp(2)
    fit(EMASelfDistiller(student, decay=0.9, warmup=1), blob_split(), None, cfg)
    for model in (a, b, student):
        assert accuracy(model, blob_split(300, seed=2)) > 0.85


# --- schemes from a recipe ---------------------------------------------------------------------


def scheme_recipe(tiny_recipe: dict) -> dict:
    train = {"epochs": 2, "batch_size": 64, "lr": 0.01}
    tiny_recipe["schemes"] = {"teachers": {"wide": {"model": "mlp", "width": 32, "train": train}},
                              "assistants": [{"model": "mlp", "width": 24, "train": train}], "born_again": 1,
                              "mutual": [{"model": "mlp", "width": 16}], "ema": True, "ema_decay": 0.9}
    tiny_recipe["distill"]["terms"] = [{"kind": "kd", "T": 4, "weight": 0.5, "teacher": "teacher"},
                                       {"kind": "multi_kd", "T": 4, "weight": 0.4, "combine": "confidence"},
                                       {"kind": "ce", "weight": 0.1}]
    return tiny_recipe


@pytest.mark.slow
def test_every_scheme_runs_from_a_recipe_and_gets_its_report_rows(tmp_path, tiny_recipe):
    run_pipeline(load_recipe(scheme_recipe(tiny_recipe)), tmp_path)
    models = load_metrics(tmp_path)["models"]
    assert list(models) == ["teacher", "teacher-wide", "baseline", "student", "ta-1", "student-takd",
                            "born-again-1", "peer-1-dml", "student-dml", "student-ema"]
    assert all(0 <= m["accuracy"] <= 1 and not math.isnan(m["accuracy"]) for m in models.values())
    stages = {line.split('"stage": "')[1].split('"')[0] for line in (tmp_path / "log.jsonl").read_text().splitlines()}
    assert {"teacher-wide", "ta-1", "student-takd", "born-again-1", "mutual", "ema"} <= stages


@pytest.mark.parametrize("where", ["assistants", "teachers"])
def test_a_chain_or_teacher_set_whose_class_counts_differ_exits_2(tmp_path, tiny_recipe, monkeypatch, where):
    (tmp_path / "fiveway.py").write_text(textwrap.dedent("""
        from torch import nn
        def five_way(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    five = {"model": "fiveway:five_way"}
    tiny_recipe["schemes"] = {"assistants": [five]} if where == "assistants" else {"teachers": {"five": five}}
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    expected = "assistant 1 (schemes.assistants)" if where == "assistants" else "teacher 'five' (schemes.teachers)"
    assert f"the {expected} (fiveway:five_way) gives outputs of shape [2, 5]" in " ".join(result.output.split())


def test_kd_with_teachers_by_name_logs_both_parts_through_fit():
    from conftest import blob_split

    teachers = {"big": mlp(1), "ta": mlp(2)}
    result = fit(Distiller(mlp(0), teachers, [KD(weight=0.5, teacher="big"), KD(weight=0.4, teacher="ta"),
                                              CE(weight=0.1)]), blob_split(), None, TrainConfig(epochs=1))
    assert set(result.history[0]["parts"]) == {"kd:big", "kd:ta", "ce"}


def test_a_term_that_does_not_fit_an_assistant_link_fails_before_training(tmp_path, tiny_recipe):
    from distil.errors import ShapeError

    tiny_recipe["distill"]["terms"].append({"kind": "at", "student": "layer1", "teacher": "layer1"})
    tiny_recipe["student"] = {"model": "cnn", "width": 4, "depth": 2, "train": tiny_recipe["student"]["train"]}
    tiny_recipe["schemes"] = {"assistants": [{"model": "mlp", "width": 24}]}  # an MLP: no feature map for AT
    with pytest.raises(ShapeError, match="the link teacher -> ta-1 of the schemes cannot use the recipe's terms"):
        run_pipeline(load_recipe(tiny_recipe), tmp_path)
    assert not (tmp_path / "teacher.safetensors").exists()  # nothing trained
