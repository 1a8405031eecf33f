"""`fit`: the one training loop for teacher, baseline, distillation and fine-tuning.

The loop reads top to bottom: seed, put the task on its device, prepare it (dry run), build
optimiser and schedule, resume from the last checkpoint, then per epoch train, validate,
checkpoint, log. Data comes as batches (`distil.batches`) from in-memory tensors, a Dataset or a
DataLoader. Nothing is lost: checkpoints are atomic, a run resumes where it stopped, and a
non-finite loss stops the run with the last good checkpoint kept. No step waits on the device:
losses are summed and checked for non-finite values on the device, and read every
`CHECK_EVERY` steps and at the end of each epoch.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from distil import distributed
from distil.batches import Batch, Batches, Progress
from distil.checkpoint import load_tensors, save_tensors
from distil.data import Split
from distil.device import autocast, check_precision, grad_scaler, resolve_device
from distil.distiller import Task
from distil.errors import ConfigError, DataError, NonFiniteLossError
from distil.recipe import COMPILE_MODES, TrainConfig

log = logging.getLogger(__name__)
CHECK_EVERY = 50  # steps between reads of the non-finite flag (each read waits for the device)
Augmenter = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def compile_mode(compile: bool | str | None) -> str | None:
    """`fit`'s `compile` as a torch.compile mode: None for no compiling, "default" for True."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "default"
    if compile not in COMPILE_MODES:
        raise ConfigError(f"compile must be true, false or one of {', '.join(COMPILE_MODES)}; got {compile!r}. "
                          "'reduce-overhead' also replays each training step as CUDA graphs on a GPU.")
    return compile


@functools.cache  # once per device type and process, not at every stage
def _say_no_graphs(device_type: str) -> None:
    log.warning("compile: reduce-overhead replays CUDA graphs, which only a CUDA GPU has; on %s the step is "
                "compiled as with compile: true", device_type)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one record per epoch
    best_score: float = -1.0  # the task's validation metric at the best epoch (or -loss without validation)
    best_epoch: int = -1
    stopped_early: bool = False
    best_state: dict | None = field(default=None, repr=False)  # in memory, when there is no checkpoint_dir


@dataclass(frozen=True)
class _Env:
    """Where and how the steps run: device, precision, loss scaler and train-time augmentation."""

    device: torch.device
    precision: str
    scaler: torch.amp.GradScaler
    augment: Augmenter | None
    seed: int
    group: distributed.Group = distributed.Group()
    forward: Callable | None = None  # (batch, progress) -> StepOutput: the task's, or through DDP
    graphs: bool = False  # steps replayed as CUDA graphs (compile: reduce-overhead on a GPU): mark each new step


def fit(task: Task, train, val, cfg: TrainConfig, *, name: str = "fit", seed: int = 0,
        device: str | torch.device = "auto", precision: str = "fp32", compile: bool | str = False,
        augment: Augmenter | None = None, checkpoint_dir: Path | None = None, log_path: Path | None = None,
        on_epoch: Callable[[dict], None] | None = None, group: distributed.Group | None = None) -> FitResult:
    """Train `task` on `train`, validating on `val` each epoch; the best weights are restored at the end.

    `train`/`val`: a `Split`, a map-style `Dataset` yielding `(input, target)`, or a `DataLoader`.
    `compile`: True (or "default") traces each training step through torch.compile as one graph;
    "reduce-overhead" also replays its forward and backward as CUDA graphs on a GPU (a launch each, not one per kernel).
    `augment(inputs, generator)` transforms each training batch on the device; the student and its
    teachers see the same view. With `checkpoint_dir`, `<name>-last.safetensors` (full state) and
    `<name>-best.safetensors` are written each epoch, and a rerun resumes from the last one. Under a launcher
    (torchrun) it trains on every process, unless `group` says otherwise (`Group()`: this process alone).
    """
    here = distributed.group() if group is None else group
    where = resolve_device(distributed.device_for(device, here) if isinstance(device, str) else device)
    check_precision(precision, where)
    mode = compile_mode(compile)
    if mode == "reduce-overhead" and where.type != "cuda":
        _say_no_graphs(where.type)
        mode = "default"
    env = _Env(where, precision, grad_scaler(where, precision), augment, seed, here, graphs=mode == "reduce-overhead")
    torch.manual_seed(seed)
    if augment is not None and isinstance(train, Split) and train.teacher_logits:
        raise ConfigError("cached teacher logits cannot be used with random augmentation: the teacher must see the "
                          "student's augmented view. Pass the split without cached logits (the teacher then runs "
                          "at every step), or turn augmentation off for distillation.")
    batches = _batches(train, cfg, env, shuffle=True)
    if len(batches) == 0:
        raise DataError(f"the training split of stage '{name}' is empty: check the data source")
    module, release = _prepare(task, batches, train, env, mode)
    try:  # whatever compiling set up for the steps (feature taps' hooks) comes off the models at the end
        env = replace(env, forward=distributed.wrap(task, env.device, here))
        optimizer = make_optimizer(module, cfg)
        scheduler = make_scheduler(optimizer, cfg, max(1, len(batches)))
        last = best = None
        if checkpoint_dir is not None:
            folder = Path(checkpoint_dir)
            last, best = folder / f"{name}-last.safetensors", folder / f"{name}-best.safetensors"
        result = _resume(last, module, optimizer, scheduler, env.scaler) if last and last.exists() else FitResult()
        val_batches = _batches(val, cfg, env, shuffle=False) if val is not None and len(val) else None
        for epoch in range(len(result.history), 0 if result.stopped_early else cfg.epochs):
            progress = Progress(epoch, epoch * len(batches), len(batches), cfg.epochs)
            with distributed.training(here):  # terms over the batch gather every process's rows (or none)
                record = {"stage": name, "epoch": epoch + 1,
                          **_train_epoch(task, batches, optimizer, scheduler, env, progress, last)}
            record[f"val_{task.metric}"] = _validate(task, module, val_batches, env) if val_batches else None
            _update_best(result, record, task, epoch, module, best if here.main else None)
            result.history.append(record)
            result.stopped_early = cfg.patience is not None and epoch - result.best_epoch >= cfg.patience
            if last is not None and here.main:
                _save_state(last, module, optimizer, scheduler, env.scaler, result)
            if here.main:
                _emit(record, log_path, on_epoch)
            if result.stopped_early:
                break
        distributed.barrier(here)  # rank 0's best checkpoint is on disk before anyone reads it
        if best is not None and best.exists():
            module.load_state_dict(load_tensors(best, device=env.device)[0])
        elif result.best_state is not None:
            module.load_state_dict(result.best_state)
        return result
    finally:
        release()


def _batches(data, cfg: TrainConfig, env: _Env, shuffle: bool) -> Batches:
    """Training batches (shuffled, ragged last batch dropped) or validation batches (in order, all samples).
    In-memory data moves to the device once, so batches are taken there."""
    if isinstance(data, Split) and env.device.type != "cpu":
        data = data.to(env.device)
    if isinstance(data, DataLoader):
        from torch.utils.data import DistributedSampler

        if env.group.active and not isinstance(data.sampler, DistributedSampler):
            raise ConfigError("under several processes your own DataLoader must split the data between them: give "
                              "it a torch.utils.data.DistributedSampler, or pass the Dataset and let distil batch it")
        return Batches(data, cfg.batch_size)
    if not isinstance(data, Split) and (isinstance(data, IterableDataset) or not hasattr(data, "__len__")):
        return Batches(data, cfg.batch_size)  # raises the DataError that says what data fit takes
    here = env.group
    if shuffle:
        size = min(cfg.batch_size, max(1, len(data)))
        if size % here.world:
            raise ConfigError(f"batch_size {size} must be divisible by the {here.world} training processes: each "
                              f"takes an equal share of every batch. Use a multiple of {here.world}.")
        if here.active and 0 < len(data) < here.world:
            raise DataError(f"{len(data)} training samples cannot be shared by {here.world} processes; use fewer.")
    else:  # validation: in-memory data takes large batches, a Dataset the training batch size
        size = max(cfg.batch_size, 1024 if isinstance(data, Split) else 0)
    return Batches(data, size, shuffle=shuffle, seed=env.seed, drop_last=shuffle, workers=cfg.workers,
                   pin_memory=env.device.type == "cuda", rank=here.rank, world=here.world)


def _prepare(task: Task, batches: Batches, train, env: _Env,
             mode: str | None) -> tuple[nn.Module, Callable[[], None]]:
    """Move the task to its device, dry-run one batch (connectors, class counts), check the labels, compile.
    Returns the trainable module and what undoes the compiling's setup when the fit ends (a no-op if none)."""
    task.to(env.device)
    first = batches.first(batches.batch_size).to(env.device)
    if env.augment is not None:
        first = first.with_inputs(env.augment(first.inputs, torch.Generator().manual_seed(env.seed)))
    with autocast(env.device, env.precision):
        task.prepare(first)
    task.to(env.device)  # what the dry run built (connectors) goes to the device too
    if isinstance(train, Split):
        task.check_targets(train.y)
    module, undo = task.trainable_module(), None
    if mode is not None:
        if not hasattr(torch, "compile"):
            raise ConfigError("compile: true needs torch.compile (torch >= 2.0)")
        # compile() for the default mode: a Task of yours written as `def compile(self)` keeps working
        undo = task.compile() if mode == "default" else task.compile(mode)
    return module, undo if callable(undo) else _nothing


def _nothing() -> None:
    pass


def _train_epoch(task: Task, batches: Batches, optimizer, scheduler, env: _Env, progress: Progress,
                 last: Path | None) -> dict:
    """One pass over the training batches; returns mean loss parts and speed."""
    module = task.trainable_module()
    module.train()
    # dropout etc.: the same stream whether resumed or not, and apart from the shuffle's (seed * 1000 + epoch)
    torch.manual_seed(env.seed * 1000 + progress.epoch + 2**32)
    views = torch.Generator().manual_seed(env.seed * 1000 + progress.epoch + 10**9)  # augmentation; resumable too
    # per step, the loss and its parts stacked in one copy on the device (a copy: a step replayed as a CUDA graph
    # reuses its outputs' memory); read every CHECK_EVERY steps, averaged once per epoch
    values: list[torch.Tensor] = []
    seen, start_time, steps = 0, time.perf_counter(), 0
    for step, batch in enumerate(batches.epoch(progress.epoch)):
        batch = batch.to(env.device)
        if env.augment is not None:
            batch = batch.with_inputs(env.augment(batch.inputs, views))
        if env.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = _step(task, batch, optimizer, env, Progress(progress.epoch, progress.step + step,
                                                          progress.steps_per_epoch, progress.epochs))
        scheduler.step()
        values.append(torch.stack([out.loss.detach().float(), *(v.detach().float() for v in out.parts.values())]))
        if len(values) % CHECK_EVERY == 0:
            _check_finite(values, out.parts, progress.epoch, last)
        seen, steps = seen + len(batch), steps + 1
    names = list(out.parts) if steps else []
    _check_finite(values, names, progress.epoch, last)
    seconds = time.perf_counter() - start_time
    here = env.group
    means = (distributed.all_sum(torch.stack(values)[:, 1:].mean(0), here) / here.world).tolist() if values else []
    record = dict(zip(names, means))
    return {"loss": sum(record.values()), "parts": record, "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": seen * here.world / max(seconds, 1e-9), "seconds": seconds}


def _step(task: Task, batch: Batch, optimizer, env: _Env, progress: Progress):
    """Forward under autocast, backward (loss-scaled for fp16), optimiser step."""
    try:
        with autocast(env.device, env.precision):
            out = env.forward(batch, progress)
    except IndexError as err:  # a label out of range in data the loop could not check up front (on the CPU;
        if "out of bounds" not in str(err) or "Target" not in str(err):  # a GPU stops with a device-side assert)
            raise
        raise DataError(f"a training step failed on the batch's labels: {str(err).rstrip('.')}. Labels must be "
                        "0..K-1 for a model with K outputs (or -1 for unlabeled samples).") from err
    optimizer.zero_grad(set_to_none=True)
    env.scaler.scale(out.loss).backward()
    env.scaler.step(optimizer)
    env.scaler.update()
    return out


def _check_finite(values: list[torch.Tensor], names, epoch: int, last: Path | None) -> None:
    """Read the losses of the epoch's steps so far (one wait for the device); raise at the first non-finite one.
    `values`: per step, the loss then its parts (`names`)."""
    if not values:
        return
    losses = torch.stack(values)[:, 0]
    bad = ~torch.isfinite(losses)
    if not bool(bad.any()):
        return
    step = int(bad.nonzero()[0, 0])
    parts = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, values[step][1:].tolist()))
    kept = f" The last good checkpoint is kept at {last}." if last is not None and last.exists() else ""
    raise NonFiniteLossError(
        f"the loss became {float(losses[step])} at epoch {epoch + 1}, step {step + 1} ({parts}).{kept} "
        "Lower the learning rate, check the inputs for NaN/inf, or lower the KD temperature.")


@torch.inference_mode()
def _validate(task: Task, module: nn.Module, batches: Batches, env: _Env) -> float:
    """The task's validation metric (e.g. top-1 accuracy) over all batches, with the trainable module in eval mode."""
    module.eval()
    total = count = torch.zeros((), device=env.device)
    for batch in batches.epoch(0):
        with autocast(env.device, env.precision):
            score, n = task.score(batch.to(env.device))
        total, count = total + score, count + n
    both = distributed.all_sum(torch.stack([total.float(), count.float()]), env.group)  # every process's share
    return float(both[0]) / max(1.0, float(both[1]))


def _update_best(result: FitResult, record: dict, task: Task, epoch: int, module: nn.Module,
                 best: Path | None) -> None:
    value = record[f"val_{task.metric}"]
    score = -record["loss"] if value is None else value if task.higher_is_better else -value
    if result.best_epoch < 0 or score > result.best_score:
        result.best_score, result.best_epoch = score, epoch
        if best is not None:
            save_tensors(best, module.state_dict())
        else:
            result.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}


def _emit(record: dict, log_path: Path | None, on_epoch: Callable[[dict], None] | None) -> None:
    log.info("%s epoch %d: loss %.4f %s", record["stage"], record["epoch"], record["loss"],
             {k: v for k, v in record.items() if k.startswith("val_")})
    if log_path is not None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    if on_epoch is not None:
        on_epoch(record)


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters, fused (one kernel for every parameter; on the demo's student
    a CPU step 1.9-2.5x faster than torch's default, `benchmarks/optimizer.py`) where torch has the kernels."""
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        make = functools.partial(torch.optim.SGD, params, lr=cfg.lr, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
    elif cfg.optimizer == "adamw":
        make = functools.partial(torch.optim.AdamW, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use 'sgd' or 'adamw'")
    if all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
        try:
            return make(fused=True)
        except (RuntimeError, TypeError):  # a torch without fused kernels for this device (CPU: torch < 2.4)
            pass
    return make()


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A per-step schedule over the whole run."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size * steps_per_epoch, cfg.gamma)
    if cfg.schedule == "multistep":
        if not cfg.milestones:
            raise ConfigError("schedule 'multistep' needs milestones: the epochs at which lr is multiplied by gamma, "
                              "e.g. milestones: [150, 180, 210]")
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [m * steps_per_epoch for m in cfg.milestones],
                                                    cfg.gamma)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ConfigError(f"unknown schedule {cfg.schedule!r}; use 'cosine', 'step', 'multistep', 'onecycle' or 'constant'")


# --- resumable state: module + optimiser tensors in safetensors, the rest as JSON metadata ---


def _save_state(path: Path, module: nn.Module, optimizer, scheduler, scaler, result: FitResult) -> None:
    tensors = {f"module.{k}": v for k, v in module.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    sched = scheduler.state_dict()
    meta = {"param_groups": opt["param_groups"], "optim_scalars": scalars, "scheduler": sched,
            "history": result.history, "best_score": result.best_score, "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early, "scaler": scaler.state_dict() if scaler.is_enabled() else None}
    save_tensors(path, tensors, meta)


def _resume(path: Path, module: nn.Module, optimizer, scheduler, scaler) -> FitResult:
    # read onto the CPU: load_state_dict copies weights to the module's device and moves optimiser state to its
    # parameters' device (Adam's `step` too when fused; unfused, it stays on the CPU: a device `step` would cost
    # a sync per step). The optimiser keeps its own implementation (fused or not), whatever the checkpoint's was.
    tensors, meta = load_tensors(path)
    module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["optim_scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    how = ("fused", "foreach")
    groups = [{**saved, **{k: now[k] for k in how if k in now}}
              for saved, now in zip(meta["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    if meta.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(meta["scaler"])
    log.info("resumed from %s after epoch %d", path, len(meta["history"]))
    best = meta.get("best_score", meta.get("best_val_acc", -1.0))  # best_val_acc: checkpoints of distil 0.1
    return FitResult(meta["history"], best, meta["best_epoch"], meta["stopped_early"])
