"""`fit`: the one training loop for teacher, baseline, distillation and fine-tuning.

The loop reads top to bottom: seed, prepare the task (dry run), build optimiser and schedule,
resume from the last checkpoint, then per epoch train, validate, checkpoint, log. Nothing is
lost: checkpoints are atomic, a run resumes where it stopped, and a non-finite loss stops the
run with the last good checkpoint kept.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distil.checkpoint import load_tensors, save_tensors
from distil.data import Split
from distil.distiller import Task
from distil.errors import DataError, NonFiniteLossError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "adamw"  # "adamw" | "sgd"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" | "step" | "onecycle" | "constant"
    step_size: int = 30  # epochs between decays, "step" only
    gamma: float = 0.1  # decay factor, "step" only
    patience: int | None = None  # stop after this many epochs without a better val accuracy
    seed: int = 0


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one record per epoch
    best_val_acc: float = -1.0
    best_epoch: int = -1
    stopped_early: bool = False
    best_state: dict | None = field(default=None, repr=False)  # in memory, when there is no checkpoint_dir


def fit(task: Task, train: Split, val: Split | None, cfg: TrainConfig, *, name: str = "fit",
        checkpoint_dir: Path | None = None, log_path: Path | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train `task` on `train`, validating on `val` each epoch; the best weights are restored at the end.

    With `checkpoint_dir`, `<name>-last.safetensors` (full state) and `<name>-best.safetensors`
    are written each epoch, and a rerun resumes from the last one.
    """
    if len(train) == 0:
        raise DataError(f"the training split of stage '{name}' is empty: check the data source")
    torch.manual_seed(cfg.seed)
    task.prepare(train.x[: cfg.batch_size])
    module = task.trainable_module()
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    optimizer = make_optimizer(module, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    last = best = None
    if checkpoint_dir is not None:
        last, best = Path(checkpoint_dir) / f"{name}-last.safetensors", Path(checkpoint_dir) / f"{name}-best.safetensors"
    result = _resume(last, module, optimizer, scheduler) if last and last.exists() else FitResult()
    for epoch in range(len(result.history), 0 if result.stopped_early else cfg.epochs):
        record = {"stage": name, "epoch": epoch + 1, **_train_epoch(task, train, optimizer, scheduler, cfg, epoch, last)}
        record["val_acc"] = _val_accuracy(task, module, val) if val is not None and len(val) else None
        _update_best(result, record, epoch, module, best)
        result.history.append(record)
        result.stopped_early = cfg.patience is not None and epoch - result.best_epoch >= cfg.patience
        if last is not None:
            _save_state(last, module, optimizer, scheduler, result)
        _emit(record, log_path, on_epoch)
        if result.stopped_early:
            break
    if best is not None and best.exists():
        module.load_state_dict(load_tensors(best)[0])
    elif result.best_state is not None:
        module.load_state_dict(result.best_state)
    return result


def _train_epoch(task: Task, train: Split, optimizer, scheduler, cfg: TrainConfig, epoch: int,
                 last: Path | None) -> dict:
    """One pass over `train` in shuffled batches taken by indexing; returns mean loss parts and speed."""
    module = task.trainable_module()
    module.train()
    torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: same stream whether resumed or not
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    batch = min(cfg.batch_size, len(train))
    sums: dict[str, torch.Tensor] = {}
    seen, start_time = 0, time.perf_counter()
    for step, start in enumerate(range(0, len(train) - batch + 1, batch)):  # drop the ragged last batch
        idx = order[start:start + batch]
        cached = {} if train.teacher_logits is None else {"teacher_logits": train.teacher_logits[idx]}
        out = task.forward(train.x[idx], train.y[idx], **cached)
        if not torch.isfinite(out.loss):
            _raise_non_finite(out, epoch, step, last)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        for key, value in out.parts.items():
            sums[key] = sums.get(key, 0.0) + value.detach()
        seen += len(idx)
    seconds = time.perf_counter() - start_time
    steps = max(1, seen // batch)
    parts = {key: float(value) / steps for key, value in sums.items()}
    return {"loss": sum(parts.values()), "parts": parts, "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": seen / max(seconds, 1e-9), "seconds": seconds}


def _raise_non_finite(out, epoch: int, step: int, last: Path | None) -> None:
    parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in out.parts.items())
    kept = f" The last good checkpoint is kept at {last}." if last is not None and last.exists() else ""
    raise NonFiniteLossError(
        f"the loss became {float(out.loss.detach())} at epoch {epoch + 1}, step {step + 1} ({parts}).{kept} "
        "Lower the learning rate, check the inputs for NaN/inf, or lower the KD temperature.")


@torch.inference_mode()
def _val_accuracy(task: Task, module: nn.Module, split: Split, batch_size: int = 1024) -> float:
    """Top-1 accuracy of `task.predict` on `split`, with the trainable module in eval mode."""
    module.eval()
    correct = sum(int((task.predict(split.x[i:i + batch_size]).argmax(1) == split.y[i:i + batch_size]).sum())
                  for i in range(0, len(split), batch_size))
    return correct / len(split)


def _update_best(result: FitResult, record: dict, epoch: int, module: nn.Module, best: Path | None) -> None:
    score = record["val_acc"] if record["val_acc"] is not None else -record["loss"]
    if result.best_epoch < 0 or score > result.best_val_acc:
        result.best_val_acc, result.best_epoch = score, epoch
        if best is not None:
            save_tensors(best, module.state_dict())
        else:
            result.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}


def _emit(record: dict, log_path: Path | None, on_epoch: Callable[[dict], None] | None) -> None:
    log.info("%s epoch %d: loss %.4f val_acc %s", record["stage"], record["epoch"], record["loss"], record["val_acc"])
    if log_path is not None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    if on_epoch is not None:
        on_epoch(record)


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'sgd' or 'adamw'")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A per-step schedule over the whole run."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size * steps_per_epoch, cfg.gamma)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use 'cosine', 'step', 'onecycle' or 'constant'")


# --- resumable state: module + optimiser tensors in safetensors, the rest as JSON metadata ---


def _save_state(path: Path, module: nn.Module, optimizer, scheduler, result: FitResult) -> None:
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
            "history": result.history, "best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early}
    save_tensors(path, tensors, meta)


def _resume(path: Path, module: nn.Module, optimizer, scheduler) -> FitResult:
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
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    log.info("resumed from %s after epoch %d", path, len(meta["history"]))
    return FitResult(meta["history"], meta["best_val_acc"], meta["best_epoch"], meta["stopped_early"])
