"""Devices and precision: device names, bf16/fp16 autocast on the CPU, the loss scaler, checkpoints that load
onto any device, a resumed bf16 run, and the non-finite check read every 50 steps."""

import logging

import pytest
import torch
from torch import nn

from conftest import NaNAfter, blob_split, mlp
from distil import CE, KD, ClassificationTask, Distiller, TrainConfig, fit
from distil.checkpoint import load_tensors, save_tensors
from distil.device import check_precision, grad_scaler, resolve_device
from distil.errors import ConfigError, NonFiniteLossError
from distil.evaluate import accuracy, model_device, predict_logits

pytestmark = pytest.mark.usefixtures("one_thread")


# --- device names -----------------------------------------------------------------------------


def test_auto_is_the_cpu_without_an_accelerator():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("an accelerator is present: auto picks it")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_says_so(spec):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ConfigError, match=rf"device '{spec}': no CUDA GPU is available.*Use device: auto or cpu"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["tpu", "gpu", "xla"])
def test_an_unknown_device_names_the_valid_choices(spec):
    with pytest.raises(ConfigError, match=rf"device '{spec}'.*use auto, cpu, cuda, cuda:N or mps"):
        resolve_device(spec)


def test_an_unknown_precision_names_the_valid_choices():
    with pytest.raises(ConfigError, match="precision 'fp8': use one of fp32, bf16, fp16"):
        check_precision("fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="precision 'half'"):
        fit(ClassificationTask(mlp(0)), blob_split(), None, TrainConfig(epochs=1), precision="half")


def test_only_fp16_scales_the_loss():
    cpu = torch.device("cpu")
    assert grad_scaler(cpu, "fp16").is_enabled()
    assert not grad_scaler(cpu, "bf16").is_enabled()
    assert not grad_scaler(cpu, "fp32").is_enabled()


# --- autocast on the CPU ----------------------------------------------------------------------


def _fit_recording_dtypes(precision: str) -> tuple[nn.Module, set[torch.dtype]]:
    """Fit on blobs in `precision`, recording the output dtype of the first Linear at each training forward."""
    model = mlp(0)
    dtypes: set[torch.dtype] = set()
    handle = model[0].register_forward_hook(lambda m, i, out: dtypes.add(out.dtype) if m.training else None)
    try:
        fit(ClassificationTask(model), blob_split(), blob_split(60, seed=1),
            TrainConfig(epochs=5, batch_size=32, lr=0.02), precision=precision, device="cpu")
    finally:
        handle.remove()
    return model, dtypes


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             ("fp32", torch.float32)])
def test_fit_trains_under_cpu_autocast_and_the_forward_runs_in_that_dtype(precision, dtype):
    try:
        model, dtypes = _fit_recording_dtypes(precision)
    except RuntimeError as err:  # an older torch without CPU autocast (or loss scaling) for this dtype
        pytest.skip(f"torch {torch.__version__} cannot run {precision} on the CPU: {err}")
    assert dtypes == {dtype}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay fp32
    assert accuracy(model, blob_split(300, seed=2)) > 0.85


def test_a_distiller_trains_under_bf16():
    teacher = mlp(1)
    fit(ClassificationTask(teacher), blob_split(), None, TrainConfig(epochs=5, batch_size=32, lr=0.02))
    student = mlp(0)
    result = fit(Distiller(student, teacher, [KD(T=2, weight=0.8), CE(weight=0.2)]), blob_split(),
                 blob_split(60, seed=1), TrainConfig(epochs=5, batch_size=32, lr=0.02), precision="bf16")
    assert set(result.history[0]["parts"]) == {"kd", "ce"}
    assert accuracy(student, blob_split(300, seed=2)) > 0.85


# --- checkpoints on any device ----------------------------------------------------------------


def test_load_tensors_puts_them_on_the_device_asked_for(tmp_path):
    save_tensors(tmp_path / "w.safetensors", {"a": torch.arange(3.0)}, {"epoch": 2})
    tensors, meta = load_tensors(tmp_path / "w.safetensors", device="cpu")
    assert tensors["a"].device.type == "cpu" and torch.equal(tensors["a"], torch.tensor([0.0, 1.0, 2.0]))
    assert meta == {"epoch": 2}
    tensors, _ = load_tensors(tmp_path / "w.safetensors", device=torch.device("cpu"))
    assert tensors["a"].device.type == "cpu"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])  # fp16: the loss scale is resumed too
def test_a_resumed_low_precision_run_equals_the_uninterrupted_one(tmp_path, precision):
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05, optimizer="sgd", schedule="cosine")
    train, val = blob_split(), blob_split(60, seed=1)
    full = mlp(0)
    fit(ClassificationTask(full), train, val, cfg, precision=precision, checkpoint_dir=tmp_path / "a")

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(ClassificationTask(mlp(0)), train, val, cfg, precision=precision, checkpoint_dir=tmp_path / "b",
            on_epoch=stop_after_two)
    resumed = mlp(123)  # another init: everything must come from the checkpoint
    result = fit(ClassificationTask(resumed), train, val, cfg, precision=precision, checkpoint_dir=tmp_path / "b")
    assert len(result.history) == 4
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.cuda
def test_bf16_on_the_gpu_and_checkpoints_that_cross_devices(tmp_path):
    model = mlp(0)
    fit(ClassificationTask(model), blob_split(), blob_split(60, seed=1), TrainConfig(epochs=2, batch_size=32, lr=0.02),
        name="g", device="cuda", precision="bf16", checkpoint_dir=tmp_path)
    assert next(model.parameters()).device.type == "cuda"
    tensors, meta = load_tensors(tmp_path / "g-last.safetensors", device="cpu")  # written on the GPU
    assert len(meta["history"]) == 2
    assert all(t.device.type == "cpu" for t in tensors.values())
    weights = {k: v.cpu() for k, v in model.state_dict().items()}
    save_tensors(tmp_path / "cpu.safetensors", weights)  # written from the CPU
    on_gpu, _ = load_tensors(tmp_path / "cpu.safetensors", device="cuda")
    assert all(t.device.type == "cuda" for t in on_gpu.values())
    assert all(torch.equal(on_gpu[k].cpu(), v) for k, v in weights.items())


@pytest.mark.cuda
def test_fp16_on_the_gpu_steps_the_fused_optimiser_through_the_loss_scaler():
    """fp16 on a GPU: the scaler hands its scale and overflow flag to the fused AdamW kernel (make_optimizer
    builds AdamW fused for a model on the GPU); training still converges."""
    from distil.train import make_optimizer

    model = mlp(0)
    fit(ClassificationTask(model), blob_split(), None, TrainConfig(epochs=3, batch_size=32, lr=0.02), device="cuda",
        precision="fp16")
    assert make_optimizer(model, TrainConfig()).defaults["fused"] is True
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert accuracy(model, blob_split(300, seed=2)) > 0.85


@pytest.mark.cuda
def test_a_compiled_distillation_step_on_the_gpu_trains_as_the_eager_one():
    teacher = mlp(1)
    data = blob_split()
    fit(ClassificationTask(teacher), data, None, TrainConfig(epochs=2, batch_size=32, lr=0.05))

    def distilled(compile: bool) -> Distiller:
        torch.manual_seed(0)
        distiller = Distiller(mlp(0), teacher, [KD(T=4, weight=0.9), CE(weight=0.1)])
        fit(distiller, distiller.with_teacher_logits(data), None, TrainConfig(epochs=2, batch_size=32, lr=0.02),
            device="cuda", compile=compile)
        return distiller

    eager, compiled = distilled(False), distilled(True)
    for name, weights in eager.student.state_dict().items():
        torch.testing.assert_close(compiled.student.state_dict()[name], weights, atol=1e-4, rtol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("cached", [True, False], ids=["cached-logits", "teacher-online"])
def test_reduce_overhead_replays_the_step_as_cuda_graphs_and_trains_as_eager(cached, monkeypatch):
    """compile: reduce-overhead on a GPU: the step runs as CUDA graphs (replayed, none skipped), the losses read
    every 50 steps and averaged per epoch are the ones eager training gives, and so are the weights."""
    from torch._dynamo.utils import counters

    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))

    teacher = mlp(1)
    data = blob_split()
    fit(ClassificationTask(teacher), data, None, TrainConfig(epochs=2, batch_size=32, lr=0.05))

    def distilled(compile) -> tuple[Distiller, object]:
        torch.manual_seed(0)
        distiller = Distiller(mlp(0), teacher, [KD(T=4, weight=0.9), CE(weight=0.1)])
        train = distiller.with_teacher_logits(data) if cached else data
        result = fit(distiller, train, None, TrainConfig(epochs=3, batch_size=4, lr=0.02), device="cuda",
                     compile=compile)  # 60 steps per epoch: the losses are read after step 50 and at the end
        return distiller, result

    eager, eager_result = distilled(False)
    counters.clear()
    graphed, result = distilled("reduce-overhead")
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert len(replays) >= 3 * 60  # a forward and a backward graph per step, once recorded
    for name, weights in eager.student.state_dict().items():
        torch.testing.assert_close(graphed.student.state_dict()[name], weights, atol=1e-4, rtol=1e-3)
    for ours, theirs in zip(result.history, eager_result.history):
        assert ours["parts"] == pytest.approx(theirs["parts"], rel=1e-3)


# --- the non-finite check, read every 50 steps ------------------------------------------------


# 240 samples in batches of 2: 120 steps per epoch; the flag is read after steps 50 and 100 and at the epoch's end
@pytest.mark.parametrize("good,step,calls", [
    (120 + 74, 75, 120 + 100),  # bad from epoch 2 step 75: seen at the read after step 100
    (120 + 49, 50, 120 + 50),  # bad exactly at a read point
    (120 + 100, 101, 120 + 120),  # after the last periodic read: seen at the end of the epoch
])
def test_a_nan_mid_epoch_names_its_first_bad_step_not_the_read_point(tmp_path, good, step, calls):
    task = NaNAfter(mlp(0), good)
    cfg = TrainConfig(epochs=3, batch_size=2, lr=0.01)
    with pytest.raises(NonFiniteLossError, match=rf"loss became nan at epoch 2, step {step} \(.*ce=nan.*"
                                                 r"last good checkpoint is kept at .*t-last\.safetensors"):
        fit(task, blob_split(), None, cfg, name="t", checkpoint_dir=tmp_path)
    assert task.calls == calls  # no step waited on the device: training ran on up to the read
    tensors, meta = load_tensors(tmp_path / "t-last.safetensors")
    assert [r["epoch"] for r in meta["history"]] == [1]
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("module."))


def test_a_nan_in_the_first_epoch_keeps_no_checkpoint(tmp_path):
    task = NaNAfter(mlp(0), 60)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 1, step 61 \(.*ce=nan") as err:
        fit(task, blob_split(), None, TrainConfig(epochs=2, batch_size=2, lr=0.01), name="t", checkpoint_dir=tmp_path)
    assert "checkpoint" not in str(err.value)
    assert task.calls == 100 and not (tmp_path / "t-last.safetensors").exists()


def test_the_fp16_loss_scale_is_checkpointed_and_resumed(tmp_path):
    from distil.train import FitResult, _resume, _save_state, make_optimizer, make_scheduler

    model, cfg = mlp(0), TrainConfig(epochs=1, lr=0.1)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, 1)
    scaler = grad_scaler(torch.device("cpu"), "fp16")
    scaler.scale(torch.ones(()))  # the scale exists from the first step on
    scaler.update(new_scale=128.0)  # as after overflowing steps halved it
    _save_state(tmp_path / "s.safetensors", model, optimizer, scheduler, scaler, FitResult())
    fresh = grad_scaler(torch.device("cpu"), "fp16")
    _resume(tmp_path / "s.safetensors", mlp(1), make_optimizer(mlp(1), cfg), scheduler, fresh)
    assert fresh.get_scale() == 128.0



class CompileRecorded(ClassificationTask):
    """A task that records the mode `fit` compiles it in, without compiling."""

    def compile(self, mode=None):
        self.compiled_with = mode


@pytest.mark.parametrize("compile,mode", [(False, "not compiled"), (True, None), ("default", None),
                                          ("reduce-overhead", None)])
def test_fit_compiles_the_task_in_the_mode_asked_for(compile, mode, caplog):
    """True and "default" are torch.compile's default mode (mode=None); reduce-overhead's CUDA graphs need a
    CUDA GPU, so on the CPU it compiles as True does, and says so."""
    from distil.train import _say_no_graphs

    _say_no_graphs.cache_clear()
    task = CompileRecorded(mlp(0))
    task.compiled_with = "not compiled"
    with caplog.at_level(logging.WARNING, logger="distil.train"):
        fit(task, blob_split(), None, TrainConfig(epochs=1, batch_size=32), compile=compile, device="cpu")
    assert task.compiled_with == mode
    assert ("which only a CUDA GPU has; on cpu the step is compiled as with compile: true" in caplog.text) == (
        compile == "reduce-overhead")


@pytest.mark.cuda
def test_reduce_overhead_reaches_the_task_on_a_gpu():
    task = CompileRecorded(mlp(0))
    fit(task, blob_split(), None, TrainConfig(epochs=1, batch_size=32), compile="reduce-overhead", device="cuda")
    assert task.compiled_with == "reduce-overhead"




def test_a_task_of_yours_with_a_compile_that_takes_no_mode_still_compiles():
    class Yours(ClassificationTask):
        def compile(self):  # written before compile took a mode
            self.compiled = True

    task = Yours(mlp(0))
    fit(task, blob_split(), None, TrainConfig(epochs=1, batch_size=32), compile=True)
    assert task.compiled

def _tasks_that_compile():
    from distil.onpolicy import OnPolicyDistiller
    from distil.schemes import EMASelfDistiller, MutualLearning

    return {
        "classification": lambda: ClassificationTask(mlp(0)),
        "distiller": lambda: Distiller(mlp(0), mlp(1), [KD(T=4, weight=0.9), CE(weight=0.1)]),
        "mutual": lambda: MutualLearning({"student": mlp(0), "peer": mlp(1)}),
        "ema": lambda: EMASelfDistiller(mlp(0)),
        "on-policy": lambda: OnPolicyDistiller(Distiller(mlp(0), mlp(1), [KD(T=4)])),
    }


@pytest.mark.parametrize("kind", list(_tasks_that_compile()))
def test_every_task_hands_the_compile_mode_to_torch_compile(kind, monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: modes.append(kwargs.get("mode")) or fn)
    task = _tasks_that_compile()[kind]()
    task.compile("reduce-overhead")
    assert modes and set(modes) == {"reduce-overhead"}
    modes.clear()
    task.compile()
    assert modes and set(modes) == {None}

def test_an_unknown_compile_mode_is_refused_by_fit():
    with pytest.raises(ConfigError, match=r"compile must be true, false or one of default, reduce-overhead; got 'fa"):
        fit(ClassificationTask(mlp(0)), blob_split(), None, TrainConfig(epochs=1), compile="fast")

@pytest.mark.slow
def test_compile_trains_and_keeps_the_state_dict_keys():
    model = mlp(0)
    keys = list(model.state_dict())
    fit(ClassificationTask(model), blob_split(), None, TrainConfig(epochs=3, batch_size=32, lr=0.02), compile=True)
    assert list(model.state_dict()) == keys  # checkpoints stay loadable without torch.compile
    assert accuracy(model, blob_split(300, seed=2)) > 0.85


@pytest.mark.slow
def test_a_compiled_distillation_step_is_one_graph_and_trains_as_the_eager_one():
    """compile: true traces the whole step (student, cached teacher logits, loss terms) as one graph, so the
    terms' small operations fuse with the student's; with no graph break, and the same weights as eager."""
    from torch._dynamo.utils import counters

    from distil.batches import Batch, Progress

    data = blob_split()
    teacher = mlp(1)
    fit(ClassificationTask(teacher), data, None, TrainConfig(epochs=2, batch_size=32, lr=0.05))

    def distilled(compile: bool) -> tuple[Distiller, object]:
        distiller = Distiller(mlp(0), teacher, [KD(T=4, weight=0.9), CE(weight=0.1)])
        cached = distiller.with_teacher_logits(data)
        fit(distiller, cached, None, TrainConfig(epochs=2, batch_size=32, lr=0.02), compile=compile)
        return distiller, cached

    torch._dynamo.reset()
    counters.clear()
    (eager, _), (compiled, cached) = distilled(False), distilled(True)
    assert counters["stats"]["unique_graphs"] >= 1  # fit ran the compiled step
    for name, weights in eager.student.state_dict().items():
        torch.testing.assert_close(compiled.student.state_dict()[name], weights, atol=1e-5, rtol=1e-4)
    batch = Batch(cached.x[:32], cached.y[:32], torch.arange(32), None,
                  {name: logits[:32] for name, logits in cached.teacher_logits.items()})
    torch._dynamo.reset()
    counters.clear()
    step = Distiller(mlp(0), teacher, [KD(T=4, weight=0.9), CE(weight=0.1)])
    step.compile()
    step(batch, Progress(0, 0, 8, 2))
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1




@pytest.mark.slow
def test_a_compiled_feature_distillation_step_is_one_graph_and_trains_as_the_eager_one(tmp_path):
    """FitNet taps a student and a teacher layer: compiled, the taps' hooks are held through the fit, so the step
    stays one graph (entering the taps broke it before); the student trains as eager, and after the fit the
    hooks are gone."""
    from torch._dynamo.utils import counters

    from distil import FitNet
    from distil.export import export_onnx

    data = blob_split()
    teacher = mlp(1)
    fit(ClassificationTask(teacher), data, None, TrainConfig(epochs=1, batch_size=32, lr=0.05))

    def distilled(compile: bool) -> Distiller:
        distiller = Distiller(mlp(0), teacher, [KD(T=4, weight=0.9), CE(weight=0.1),
                                                FitNet(student="1", teacher="1", weight=0.5)])
        fit(distiller, data, None, TrainConfig(epochs=2, batch_size=32, lr=0.02), compile=compile)
        return distiller

    eager = distilled(False)
    torch._dynamo.reset()
    counters.clear()
    compiled = distilled(True)
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    for name, weights in eager.state_dict().items():  # the student and the FitNet connector
        torch.testing.assert_close(compiled.state_dict()[name], weights, atol=1e-5, rtol=1e-4)
    # the taps' hooks came off with the end of the fit: the models are as they were (picklable, exportable)
    assert not any(m._forward_hooks for model in (compiled.student, teacher) for m in model.modules())
    torch.save(compiled.student, tmp_path / "student.pt")
    assert export_onnx(compiled.student, data.x[:4], tmp_path / "student.onnx") < 1e-4
    distilled(True)  # another Distiller of the teacher (a sweep's next trial): the same graph, not compiled again
    assert counters["stats"]["unique_graphs"] == 1

def test_model_device_reads_parameters_then_buffers_then_the_default():
    assert model_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    buffers_only = nn.BatchNorm1d(3, affine=False).to("meta")
    assert model_device(buffers_only) == torch.device("meta")
    assert model_device(nn.ReLU(), torch.device("meta")) == torch.device("meta")
    assert model_device(nn.ReLU()) == torch.device("cpu")


@pytest.mark.cuda
def test_a_model_left_on_the_gpu_by_fit_is_evaluated_on_cpu_data():
    model = mlp(0)
    fit(ClassificationTask(model), blob_split(), None, TrainConfig(epochs=3, batch_size=32, lr=0.02), device="cuda")
    assert model_device(model).type == "cuda"
    test = blob_split(300, seed=2)
    logits = predict_logits(model, test.x, batch_size=64)
    assert logits.device.type == "cpu" and logits.shape == (300, 3)
    assert accuracy(model, test) > 0.85
