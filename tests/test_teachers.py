"""Several teachers by name: each KD term against a hand computation, teachers of different architectures,
unique part names, errors that say how to fix, the teacher-logit cache, and teachers that stay frozen."""

import copy
import json

import pytest
import torch
from torch import nn

from conftest import blobs, hand_ce, hand_softmax, mlp
from distil import CE, KD, Batch, Distiller, FitNet, TrainConfig, fit
from distil.batches import Batches
from distil.build import load_recipe
from distil.data import Split
from distil.errors import ConfigError, ModelError, RecipeError

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_kd(student: torch.Tensor, teacher: torch.Tensor, T: float) -> float:
    """T^2 * sum_k p_t (log p_t - log p_s), mean over the batch."""
    p_s, p_t = hand_softmax(student, T), hand_softmax(teacher, T)
    return float(T * T * (p_t * (torch.log(p_t) - torch.log(p_s))).sum() / student.shape[0])


def two_teachers(extra: list | None = None) -> Distiller:
    """Student mlp(0); teacher 'big' mlp(1, 16 wide), teacher 'ta' mlp(2, 8 wide)."""
    return Distiller(mlp(0), {"big": mlp(1), "ta": mlp(2, hidden=8)},
                     [KD(T=4, weight=0.5, teacher="big"), KD(T=2, weight=0.3, teacher="ta"), CE(weight=0.2)]
                     + (extra or []))


# --- several teachers, by hand ----------------------------------------------------------------


def test_two_teachers_give_each_part_and_the_total_as_computed_by_hand():
    distiller = two_teachers()
    x, y = blobs(6)
    distiller.prepare(Batch(x, y))
    out = distiller(Batch(x, y))
    assert list(out.parts) == ["kd:big", "kd:ta", "ce"]
    with torch.no_grad():
        student, big, ta = (m(x) for m in (distiller.student, distiller.teachers["big"], distiller.teachers["ta"]))
    kd_big, kd_ta, ce = hand_kd(student, big, T=4), hand_kd(student, ta, T=2), float(hand_ce(student, y))
    assert out.parts["kd:big"].item() == pytest.approx(0.5 * kd_big, rel=1e-5)
    assert out.parts["kd:ta"].item() == pytest.approx(0.3 * kd_ta, rel=1e-5)
    assert out.parts["ce"].item() == pytest.approx(0.2 * ce, rel=1e-5)
    assert out.loss.item() == pytest.approx(0.5 * kd_big + 0.3 * kd_ta + 0.2 * ce, rel=1e-5)
    assert torch.equal(out.outputs, student)


def test_gradients_reach_the_student_only():
    distiller = two_teachers()
    x, y = blobs(6)
    distiller(Batch(x, y)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
    for teacher in distiller.teachers.values():
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_fit_logs_every_teacher_part_and_leaves_the_teachers_unchanged(tmp_path):
    distiller = two_teachers()
    before = {name: copy.deepcopy(t.state_dict()) for name, t in distiller.teachers.items()}
    x, y = blobs(48)
    fit(distiller, Split(x, y), None, TrainConfig(epochs=2, batch_size=16, lr=0.02), log_path=tmp_path / "log.jsonl")
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [set(r["parts"]) for r in records] == [{"kd:big", "kd:ta", "ce"}] * 2
    assert all(r["loss"] == pytest.approx(sum(r["parts"].values())) for r in records)
    for name, teacher in distiller.teachers.items():
        # fit runs on the auto device: the teachers may now live on a GPU
        assert all(torch.equal(before[name][k], v.cpu()) for k, v in teacher.state_dict().items()), name


# --- teachers of different architectures -------------------------------------------------------


def image_models(cnn_classes: int = 3) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Student and an MLP teacher on flattened (1, 8, 8) images, and a small CNN teacher."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # (B, 1, 8, 8) -> (B, 64) -> (B, 3)
    mlp_teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    cnn_teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),  # (B, 4, 1, 1)
                                nn.Flatten(), nn.Linear(4, cnn_classes))  # (B, 4) -> (B, K)
    return student, mlp_teacher, cnn_teacher


def images(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(n) % 3


def test_teachers_of_different_architectures_teach_one_student():
    student, mlp_teacher, cnn_teacher = image_models()
    terms = [KD(T=4, weight=0.4, teacher="mlp"), KD(T=4, weight=0.4, teacher="cnn"), CE(weight=0.2)]
    x, y = images()
    result = fit(Distiller(student, {"mlp": mlp_teacher, "cnn": cnn_teacher}, terms), Split(x, y), None,
                 TrainConfig(epochs=2, batch_size=8))
    assert set(result.history[-1]["parts"]) == {"kd:mlp", "kd:cnn", "ce"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_a_teacher_with_another_class_count_is_named_at_prepare():
    student, mlp_teacher, cnn_teacher = image_models(cnn_classes=4)
    distiller = Distiller(student, {"mlp": mlp_teacher, "cnn": cnn_teacher},
                          [KD(teacher="mlp"), KD(teacher="cnn"), CE()])
    x, y = images(4)
    with pytest.raises(ModelError, match="teacher 'cnn' gives 4 logits, student gives 3.*same num_classes"):
        distiller.prepare(Batch(x, y))


# --- unique part names and errors that say how to fix -----------------------------------------


def test_two_kd_terms_without_names_share_a_part_name():
    with pytest.raises(ConfigError, match=r"share the part name \['kd'\]"):
        Distiller(mlp(0), mlp(1), [KD(T=4), KD(T=2), CE()])


def test_two_kd_terms_reading_the_same_teacher_share_a_part_name():
    with pytest.raises(ConfigError, match=r"share the part name \['kd:big'\].*Give them different teachers"):
        Distiller(mlp(0), {"big": mlp(1), "ta": mlp(2)}, [KD(T=4, teacher="big"), KD(T=2, teacher="big")])


def test_a_recipe_with_two_kd_terms_names_the_second(tiny_recipe):
    tiny_recipe["distill"]["terms"] = [{"kind": "kd", "T": 4, "weight": 0.5}, {"kind": "kd", "T": 2, "weight": 0.4},
                                       {"kind": "ce", "weight": 0.1}]
    with pytest.raises(RecipeError, match=r"distill\.terms\[1\] \(kd\) repeats the term 'kd' of distill\.terms\[0\]"):
        load_recipe(tiny_recipe)


def test_an_unknown_teacher_name_suggests_the_nearest():
    with pytest.raises(ConfigError, match="reads teacher 'bgi', which the Distiller does not have. Did you mean 'big'"):
        Distiller(mlp(0), {"big": mlp(1), "ta": mlp(2)}, [KD(teacher="bgi")])


def test_kd_without_a_teacher_name_among_two_teachers_says_to_pass_one():
    with pytest.raises(ConfigError, match=r"there are 2 teachers \(\['big', 'ta'\]\): pass teacher='<name>'"):
        Distiller(mlp(0), {"big": mlp(1), "ta": mlp(2)}, [KD(), CE()])


@pytest.mark.parametrize("teachers", ["module", "dict"])
def test_the_student_as_its_own_teacher_asks_for_a_copy(teachers):
    student = mlp(0)
    with pytest.raises(ConfigError, match=r"passed as its own teacher.*Pass a copy: copy\.deepcopy\(student\)"):
        Distiller(student, student if teachers == "module" else {"big": mlp(1), "self": student}, [KD(), CE()])


def test_no_terms_is_an_error_with_an_example():
    with pytest.raises(ConfigError, match=r"at least one loss term, e\.g\. \[KD\(T=4"):
        Distiller(mlp(0), mlp(1), [])


def test_an_object_that_is_no_term_is_named_by_position_and_type():
    with pytest.raises(ConfigError, match=r"term 1 \(Linear\) is not a loss term: it needs `name`, `weight`"):
        Distiller(mlp(0), mlp(1), [KD(), nn.Linear(2, 2)])


def test_a_teacher_named_student_is_refused():
    with pytest.raises(ConfigError, match="'student' names the model being trained; give the teacher another name"):
        Distiller(mlp(0), {"student": mlp(1)}, [KD(teacher="student")])


def test_a_teacher_that_is_no_module_is_named():
    with pytest.raises(ConfigError, match="teacher 'big' is a str, not an nn.Module"):
        Distiller(mlp(0), {"big": "resnet8"}, [KD()])


# --- the teacher-logit cache ------------------------------------------------------------------


def test_cached_logits_are_each_teachers_and_give_the_live_loss():
    distiller = two_teachers()
    x, y = blobs(10)
    cached = distiller.with_teacher_logits(Split(x, y), batch_size=4)  # chunks of 4, 4, 2
    assert set(cached.teacher_logits) == {"big", "ta"}
    with torch.no_grad():
        for name, teacher in distiller.teachers.items():
            assert torch.allclose(cached.teacher_logits[name], teacher(x), atol=1e-6), name
    batch = next(Batches(cached, 10, shuffle=False).epoch(0))
    live, from_cache = distiller(Batch(x, y)), distiller(batch)
    assert from_cache.loss.item() == pytest.approx(live.loss.item(), rel=1e-6)
    for name in live.parts:
        assert from_cache.parts[name].item() == pytest.approx(live.parts[name].item(), rel=1e-6), name
    with torch.no_grad():  # the cache replaces the forward pass: a changed teacher changes the live loss only
        distiller.teachers["big"][0].weight.add_(1.0)
    assert torch.equal(distiller(batch).parts["kd:big"], from_cache.parts["kd:big"])
    assert not torch.allclose(distiller(Batch(x, y)).parts["kd:big"], live.parts["kd:big"])


def test_a_teacher_whose_features_a_term_reads_is_cached_with_those_features():
    distiller = two_teachers([FitNet(student="0", teacher="0", weight=1.0, teacher_name="ta")])
    x, y = blobs(10)
    distiller.prepare(Batch(x, y))  # builds the connector (B, 16) -> (B, 8)
    cached = distiller.with_teacher_logits(Split(x, y))
    assert set(cached.teacher_logits) == {"big", "ta", "ta/0"}
    calls = {"big": 0, "ta": 0}
    for name, teacher in distiller.teachers.items():
        teacher.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    batch = next(Batches(cached, 10, shuffle=False).epoch(0))
    from_cache = distiller(batch)
    assert calls == {"big": 0, "ta": 0}
    live = distiller(Batch(x, y))
    assert calls == {"big": 1, "ta": 1}
    assert from_cache.loss.item() == pytest.approx(live.loss.item(), rel=1e-6)
    assert "fitnet:0->ta.0" in from_cache.parts


def test_a_teacher_whose_features_are_too_large_to_cache_stays_online():
    distiller = two_teachers([FitNet(student="0", teacher="0", weight=1.0, teacher_name="ta")])
    x, y = blobs(10)
    distiller.prepare(Batch(x, y))
    cached = distiller.with_teacher_logits(Split(x, y), max_feature_mb=0.0)
    assert set(cached.teacher_logits) == {"big"} and distiller.cache_events["ta"]["status"] == "online"
    calls = {"big": 0, "ta": 0}
    for name, teacher in distiller.teachers.items():
        teacher.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    distiller(next(Batches(cached, 10, shuffle=False).epoch(0)))
    assert calls == {"big": 0, "ta": 1}


# --- teachers stay frozen, move with the distiller --------------------------------------------


def test_teachers_stay_frozen_in_eval_mode_and_outside_the_state_dict():
    big, ta = mlp(1).train(), mlp(2).train()
    distiller = Distiller(mlp(0), {"big": big, "ta": ta}, [KD(teacher="big"), KD(teacher="ta"), CE()])
    for mode in (True, False, True):
        distiller.train(mode)
        assert distiller.student.training is mode
        assert not big.training and not ta.training
    assert not any(p.requires_grad for t in (big, ta) for p in t.parameters())
    assert all(p.requires_grad for p in distiller.student.parameters())
    assert all(k.startswith(("student.", "terms.")) for k in distiller.state_dict())
    assert {p.data_ptr() for p in distiller.parameters()} == {p.data_ptr() for p in distiller.student.parameters()}


def test_to_moves_and_casts_the_teachers_too():
    distiller = two_teachers()
    assert distiller.to("cpu") is distiller
    distiller.to(torch.float64)
    for model in (distiller.student, *distiller.teachers.values()):
        assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())
    x, y = blobs(4)
    assert distiller(Batch(x.double(), y)).loss.dtype == torch.float64


@pytest.mark.cuda
def test_to_cuda_moves_the_teachers():
    distiller = two_teachers().to("cuda")
    for model in (distiller.student, *distiller.teachers.values()):
        assert all(p.device.type == "cuda" for p in model.parameters())
    x, y = blobs(4)
    assert distiller(Batch(x, y).to(torch.device("cuda"))).loss.device.type == "cuda"


def test_connectors_are_built_on_the_students_device():
    from conftest import Tiny

    student, teacher = Tiny(2).to("meta"), Tiny(4).to("meta")  # a device other than the CPU, with no GPU
    distiller = Distiller(student, teacher, [FitNet(student="layer1", teacher="layer1")])
    distiller.prepare(Batch(torch.empty(2, 1, 4, 4, device="meta"), torch.zeros(2, dtype=torch.long)))
    assert {p.device.type for p in distiller.terms.parameters()} == {"meta"}


def test_every_module_move_reaches_the_teachers():
    teacher = mlp(1)
    distiller = Distiller(mlp(0), {"t": teacher}, [KD()])
    distiller.double()
    assert next(teacher.parameters()).dtype == torch.float64
    distiller.float().cpu()
    assert next(teacher.parameters()).dtype == torch.float32


# --- BatchNorm folded into the teacher that runs ------------------------------------------------


def bn_teacher(seed: int = 3) -> nn.Module:
    """(B, 4) -> Linear -> BatchNorm1d -> ReLU -> Linear (B, 3), with running statistics far from 0 and 1."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    bn = model[1]
    bn.running_mean.uniform_(-2, 2)
    bn.running_var.uniform_(0.2, 3)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    return model.eval()


def count_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_fold_batchnorm_gives_the_same_outputs_without_norms_and_leaves_the_teacher_alone():
    from distil.distiller import fold_batchnorm
    from distil.models import build_model

    for teacher, x in [(bn_teacher(), torch.randn(64, 4)),
                       (build_model("cnn1d", (1, 40), 10, width=16, depth=2).eval(), torch.randn(8, 1, 40))]:
        before = copy.deepcopy(teacher.state_dict())
        folded = fold_batchnorm(teacher)
        assert count_norms(folded) == 0 and count_norms(teacher) > 0
        assert not folded.training and not any(p.requires_grad for p in folded.parameters())
        with torch.no_grad():
            assert torch.allclose(folded(x), teacher(x), atol=1e-5)
        assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_fold_batchnorm_returns_the_model_itself_when_there_is_nothing_to_fold_or_no_trace():
    from distil.distiller import fold_batchnorm

    plain = mlp(0)
    assert fold_batchnorm(plain) is plain  # no BatchNorm

    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.body = bn_teacher()

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else -self.body(x)

    branchy = Branchy().eval()
    assert fold_batchnorm(branchy) is branchy


def test_a_distiller_runs_the_folded_teacher_with_the_unfolded_loss():
    x, y = blobs(32)
    teacher = bn_teacher()
    folded, plain = (Distiller(mlp(0), teacher, [KD(T=2, weight=0.7), CE(weight=0.3)], fold_bn=fold)
                     for fold in (True, False))
    assert folded._runners == {}  # nothing is copied before the teacher first runs
    for distiller in (folded, plain):
        distiller.prepare(Batch(x, y))
    assert count_norms(folded._runners["teacher"]) == 0 and plain._runners["teacher"] is teacher
    calls = []
    hook = teacher.register_forward_hook(lambda *_: calls.append(1))
    loss = folded(Batch(x, y)).loss
    assert calls == []  # the copy ran, not the teacher
    assert plain(Batch(x, y)).loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert len(calls) == 1
    hook.remove()
    folded.double()  # .to() and friends reach the copy too
    assert all(p.dtype == torch.float64 for p in folded._runners["teacher"].parameters())


def test_a_teacher_whose_outputs_are_all_cached_is_never_run_nor_copied(tmp_path):
    from distil.cache import TeacherCache

    x, y = blobs(32)
    teacher = bn_teacher()
    with torch.no_grad():
        unfolded = teacher(x)
    first = Distiller(mlp(0), teacher, [KD(T=2, weight=0.7), CE(weight=0.3)])
    built = first.with_teacher_logits(Split(x, y), batch_size=8, cache=TeacherCache(tmp_path))
    assert torch.allclose(built.teacher_logits["teacher"], unfolded, atol=1e-5)  # computed by the folded copy
    assert first._runners == {}  # used for the cache, not kept
    from distil.distiller import _FOLDED

    assert teacher not in _FOLDED  # nor kept for later Distillers: the teacher's memory is not doubled
    second = Distiller(mlp(0), teacher, [KD(T=2, weight=0.7), CE(weight=0.3)])
    rows = []
    teacher.register_forward_hook(lambda m, inputs, out: rows.append(len(inputs[0])))
    cached = second.with_teacher_logits(Split(x, y), batch_size=8, cache=TeacherCache(tmp_path))
    assert second.cache_events["teacher"]["status"] == "reused" and rows == [1]  # one sample, for the shapes
    fit(second, cached, None, TrainConfig(epochs=1, batch_size=16, lr=0.01))
    assert rows == [1] and second._runners == {}


def test_a_folded_copy_is_made_again_when_its_teacher_changes_between_fits():
    x, y = blobs(16)
    teacher = bn_teacher()
    distiller = Distiller(mlp(0), teacher, [KD(), CE()])
    distiller.prepare(Batch(x, y))
    first = distiller._runners["teacher"]
    distiller.prepare(Batch(x, y))
    assert distiller._runners["teacher"] is first  # unchanged teacher: the same copy
    teacher.load_state_dict(bn_teacher(seed=4).state_dict())
    distiller.prepare(Batch(x, y))
    again = distiller._runners["teacher"]
    assert again is not first and count_norms(again) == 0
    with torch.no_grad():
        assert torch.allclose(again(x), teacher(x), atol=1e-5)



def test_distillers_of_one_unchanged_teacher_share_its_folded_copy(monkeypatch):
    """A sweep's trials fold the teacher once, and run one module (which a compiled step then need not be
    compiled again for); a teacher whose weights changed is folded anew."""
    import distil.distiller

    folds = []
    fold = distil.distiller.fold_batchnorm
    monkeypatch.setattr(distil.distiller, "fold_batchnorm", lambda model: folds.append(1) or fold(model))
    x, y = blobs(16)
    teacher = bn_teacher()
    first, second = (Distiller(mlp(seed), teacher, [KD(), CE()]) for seed in (0, 1))
    for distiller in (first, second):
        distiller.prepare(Batch(x, y))
    assert second._runners["teacher"] is first._runners["teacher"] and len(folds) == 1
    teacher.load_state_dict(bn_teacher(seed=4).state_dict())
    third = Distiller(mlp(2), teacher, [KD(), CE()])
    third.prepare(Batch(x, y))
    assert third._runners["teacher"] is not first._runners["teacher"] and len(folds) == 2
    with torch.no_grad():
        assert torch.allclose(third._runners["teacher"](x), teacher(x), atol=1e-5)


@pytest.mark.slow
def test_a_compiled_step_is_compiled_once_for_several_distillers_of_one_teacher():
    """Before the folded copy was shared, each new Distiller's copy (a new torch.fx class) made torch.compile
    compile the step again, and after 8 of them run it uncompiled."""
    from torch._dynamo.utils import counters

    teacher = bn_teacher()
    torch._dynamo.reset()
    counters.clear()
    for seed in range(3):
        distiller = Distiller(mlp(seed), teacher, [KD(T=2, weight=0.7), CE(weight=0.3)])
        fit(distiller, Split(*blobs(64)), None, TrainConfig(epochs=1, batch_size=32, lr=0.01), compile=True)
    assert counters["stats"]["unique_graphs"] == 1

def test_a_teacher_with_hooks_of_its_own_is_not_folded():
    from distil.distiller import fold_batchnorm

    teacher = bn_teacher()
    teacher[1].register_forward_hook(lambda *_: None)
    assert fold_batchnorm(teacher) is teacher



def test_distils_own_held_taps_do_not_stop_a_fold_but_hooks_of_yours_do():
    """A student distilled with compile: true keeps its taps' hooks (they record nothing outside a step); used
    later as a teacher, it is still folded."""
    from distil.distiller import fold_batchnorm
    from distil.taps import FeatureTaps

    model = bn_teacher()
    FeatureTaps(model, ["1", "3"]).hold()
    folded = fold_batchnorm(model)
    assert folded is not model and count_norms(folded) == 0
    assert not any(m._forward_hooks for m in folded.modules())  # the copy carries none of them
    model[3].register_forward_hook(lambda *_: None)
    assert fold_batchnorm(model) is model

def test_no_tf32_turns_tf32_off_inside_and_restores_it():
    from distil.distiller import no_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with no_tf32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_tapped_teacher_is_not_folded_and_a_fold_that_disagrees_is_not_used(caplog, monkeypatch):
    import distil.distiller

    x, y = blobs(16)
    teacher = bn_teacher()
    tapped = Distiller(mlp(0), teacher, [KD(), FitNet(student="1", teacher="1", weight=1.0)])
    tapped.prepare(Batch(x, y))
    assert tapped._runners["teacher"] is teacher  # the term reads the BatchNorm's own output
    monkeypatch.setattr(distil.distiller, "fold_batchnorm", lambda model: bn_teacher(seed=4))  # other outputs
    distiller = Distiller(mlp(0), teacher, [KD(), CE()])
    with caplog.at_level("WARNING", logger="distil.distiller"):
        distiller.prepare(Batch(x, y))
    assert distiller._runners["teacher"] is teacher
    assert "running it unfolded" in caplog.text


def resnet_teacher(name: str = "resnet8") -> nn.Module:
    """A CIFAR ResNet of the zoo with trained-looking BatchNorm statistics, in eval mode."""
    from distil.models import build_model

    torch.manual_seed(0)
    teacher = build_model(name, (3, 32, 32), 10)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return teacher.eval()


def test_the_zoo_resnets_fold_through_their_residual_blocks():
    from distil.distiller import fold_batchnorm

    teacher, x = resnet_teacher(), torch.randn(8, 3, 32, 32)
    folded = fold_batchnorm(teacher)
    assert count_norms(folded) == 0 and count_norms(teacher) > 0  # the shortcut's BatchNorm too
    with torch.no_grad():
        assert torch.allclose(folded(x), teacher(x), atol=1e-4)


@pytest.mark.cuda
def test_a_resnet_teacher_is_folded_on_the_gpu_with_tf32_on():
    """On a GPU, fp32 convolutions run in TF32 by default; the fold's check must still accept the fold."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        teacher = resnet_teacher().cuda()
        student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).cuda()
        distiller = Distiller(student, teacher, [KD(T=4, weight=0.9), CE(weight=0.1)])
        x, y = torch.randn(64, 3, 32, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
        distiller.prepare(Batch(x, y))
        runner = distiller._runners["teacher"]
        assert runner is not teacher and count_norms(runner) == 0
        assert torch.backends.cudnn.allow_tf32  # the check turned TF32 off for itself only
        assert distiller(Batch(x, y)).loss.isfinite()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
