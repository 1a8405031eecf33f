import json

import pytest
import torch

from conftest import NaNAfter, blob_split, mlp
from distil import CE, KD, ClassificationTask, Distiller, TrainConfig, fit
from distil.data import Split
from distil.errors import DataError, NonFiniteLossError
from distil.evaluate import accuracy


def test_fit_learns_and_logs_one_record_per_epoch(tmp_path):
    model = mlp(0, dropout=0.1)
    cfg = TrainConfig(epochs=5, batch_size=32, lr=0.02)
    result = fit(ClassificationTask(model), blob_split(), blob_split(90, seed=1), cfg, name="t",
                 log_path=tmp_path / "log.jsonl")
    assert accuracy(model, blob_split(300, seed=2)) > 0.85
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4, 5]
    assert set(lines[0]) >= {"stage", "loss", "parts", "val_acc", "lr", "samples_per_s"}
    assert lines[-1]["parts"]["ce"] < lines[0]["parts"]["ce"]
    assert result.best_score == max(r["val_acc"] for r in lines)


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "onecycle"), ("adamw", "cosine"), ("sgd", "step"),
                                                ("adamw", "constant")])
def test_resumed_run_equals_uninterrupted_run(tmp_path, optimizer, schedule):
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05, optimizer=optimizer, schedule=schedule, step_size=1)
    train, val = blob_split(), blob_split(60, seed=1)
    full = mlp(0, dropout=0.1)
    fit(ClassificationTask(full), train, val, cfg, checkpoint_dir=tmp_path / "a")

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    interrupted = mlp(0, dropout=0.1)
    with pytest.raises(KeyboardInterrupt):
        fit(ClassificationTask(interrupted), train, val, cfg, checkpoint_dir=tmp_path / "b", on_epoch=stop_after_two)
    resumed = mlp(123, dropout=0.1)  # a different init: everything must come from the checkpoint
    result = fit(ClassificationTask(resumed), train, val, cfg, checkpoint_dir=tmp_path / "b")
    assert len(result.history) == 4
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(epochs=5, batch_size=40, lr=0.01)  # 6 steps per epoch
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, step 3.*last good checkpoint.*t-last"):
        fit(NaNAfter(mlp(0, dropout=0.1), 8), blob_split(), None, cfg, name="t", checkpoint_dir=tmp_path)
    from distil.checkpoint import load_tensors

    tensors, meta = load_tensors(tmp_path / "t-last.safetensors")
    assert len(meta["history"]) == 1
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("module."))


def test_early_stopping_stops_after_patience_without_improvement():
    cfg = TrainConfig(epochs=10, batch_size=32, lr=1e-12, patience=2, schedule="constant")
    result = fit(ClassificationTask(mlp(0, dropout=0.1)), blob_split(), blob_split(60, seed=1), cfg)
    assert result.stopped_early and len(result.history) == 3  # best at epoch 1, then 2 without gain


@pytest.mark.parametrize("with_dir", [True, False])
def test_best_weights_are_restored(tmp_path, with_dir):
    model = mlp(0, dropout=0.1)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=3.0, optimizer="sgd")  # a wild lr: val accuracy jumps around
    result = fit(ClassificationTask(model), blob_split(), blob_split(60, seed=1), cfg,
                 checkpoint_dir=tmp_path if with_dir else None)
    assert accuracy(model, blob_split(60, seed=1)) == pytest.approx(result.best_score)


def test_empty_training_split_is_a_clear_error():
    empty = Split(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="training split of stage 'x' is empty"):
        fit(ClassificationTask(mlp(0, dropout=0.1)), empty, None, TrainConfig(), name="x")


def test_distillation_trains_the_student_only_and_learns_from_unlabeled_samples():
    teacher = mlp(0, dropout=0.1)
    fit(ClassificationTask(teacher), blob_split(), None, TrainConfig(epochs=6, batch_size=32, lr=0.02))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = mlp(1, dropout=0.1)
    unlabeled = blob_split(240, seed=5)
    only_soft = Split(unlabeled.x, torch.full((240,), -1))  # no labels at all: KD alone must teach it
    fit(Distiller(student, teacher, [KD(T=2, weight=1.0), CE(weight=0.0)]), only_soft, None,
        TrainConfig(epochs=8, batch_size=32, lr=0.02))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert accuracy(student, blob_split(300, seed=2)) > 0.85


@pytest.mark.parametrize("bad", [3, 7, -2])
def test_a_label_outside_the_class_range_is_a_clear_error_before_training(bad):
    data = blob_split()
    y = data.y.clone()
    y[17] = bad
    with pytest.raises(DataError, match=rf"label {bad} \(sample 17\) is outside the model's 3 classes"):
        fit(ClassificationTask(mlp(0, dropout=0.1)), Split(data.x, y), None, TrainConfig(epochs=1, batch_size=32))


def test_a_label_outside_the_class_range_in_a_dataset_is_a_clear_error():
    from torch.utils.data import TensorDataset

    data = blob_split()
    y = data.y.clone()
    y[200:] = 5  # not in the first batch: found by the step, not by the dry run
    with pytest.raises(DataError, match=r"batch.s labels: Target 5 is out of bounds. Labels must be 0..K-1"):
        fit(ClassificationTask(mlp(0, dropout=0.1)), TensorDataset(data.x, y), None,
            TrainConfig(epochs=1, batch_size=32))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optimisers_are_fused_where_torch_has_the_kernels_and_step_as_the_default_ones(optimizer):
    from distil.train import make_optimizer

    cfg = TrainConfig(optimizer=optimizer, lr=0.05, weight_decay=1e-3, momentum=0.9)
    models = [mlp(0), mlp(0)]
    fused = make_optimizer(models[0], cfg)
    assert fused.defaults["fused"] is True  # one kernel for every parameter (CPU and CUDA)
    plain = (torch.optim.AdamW(models[1].parameters(), lr=0.05, weight_decay=1e-3) if optimizer == "adamw" else
             torch.optim.SGD(models[1].parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True))
    data = blob_split(64)
    for model, opt in zip(models, (fused, plain)):
        for _ in range(20):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(data.x), data.y).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # the same updates, to float rounding
    on_meta = make_optimizer(mlp(0).to("meta"), cfg)  # no fused kernels there: torch's default
    assert not on_meta.defaults["fused"]


def test_a_checkpoint_of_an_unfused_optimiser_resumes_into_the_fused_one(tmp_path):
    """Checkpoints written before optimisers were fused (or on a device without the kernels) resume fused: the
    optimiser keeps its own implementation, and its state (AdamW's moments and step) carries over."""
    from distil.train import FitResult, _resume, _save_state, make_optimizer, make_scheduler

    cfg = TrainConfig(optimizer="adamw", lr=0.01, epochs=2)
    data = blob_split(64)

    def steps(model, optimizer, n):
        for _ in range(n):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(data.x), data.y).backward()
            optimizer.step()

    model = mlp(0)
    plain = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=cfg.weight_decay)
    steps(model, plain, 5)
    _save_state(tmp_path / "s.safetensors", model, plain, make_scheduler(plain, cfg, 5), torch.amp.GradScaler(
        "cpu", enabled=False), FitResult())
    resumed = mlp(1)
    fused = make_optimizer(resumed, cfg)
    _resume(tmp_path / "s.safetensors", resumed, fused, make_scheduler(fused, cfg, 5),
            torch.amp.GradScaler("cpu", enabled=False))
    assert fused.param_groups[0]["fused"] is True and not fused.param_groups[0]["foreach"]
    steps(model, plain, 3)
    steps(resumed, fused, 3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
