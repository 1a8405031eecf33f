"""Training on several processes: `torchrun --nproc-per-node N -m distil run RECIPE` or `distil run --nproc N`.

`fit` reads the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK), joins the process group (gloo on CPUs,
nccl on GPUs), gives each process its share of every global batch, wraps only the trainable part (the student and
its connectors) in DistributedDataParallel, reduces the logged metrics across processes, and lets rank 0 alone
write checkpoints, logs and reports. Teachers are replicated in eval mode and never wrapped.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from distil.errors import ConfigError


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes (rank 0 of 1 when there is no launcher)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def group() -> Group:
    """The launcher's process group, joined on first use (gloo, or nccl when every process has a GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    here = Group(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "gloo" and not dist.is_gloo_available():
            raise ConfigError("several processes were launched, but this torch has neither the gloo nor the nccl "
                              "backend: install a torch build with distributed support, or run one process")
        dist.init_process_group(backend)
        atexit.register(_leave)
    return here


def _leave() -> None:
    """Destroy the process group this process joined before the interpreter exits: left to the interpreter's
    teardown, gloo's worker threads can outlive their group, and the process aborts ("terminate called without
    an active exception", SIGABRT) after its work is done."""
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(spec: str, here: Group) -> str:
    """Under several processes with GPUs, `auto`/`cuda` means this process's own GPU (LOCAL_RANK)."""
    if here.active and spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{here.local_rank}"
    return spec


def barrier(here: Group) -> None:
    if here.active:
        dist.barrier()


def all_sum(tensor: torch.Tensor, here: Group) -> torch.Tensor:
    """The sum over processes (the tensor itself with one process)."""
    if here.active:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


class Step(nn.Module):
    """What DDP wraps: the task's trainable module as a child (its parameters are synchronised), with a forward
    that runs the task's step, so teachers and terms stay outside the wrapper."""

    def __init__(self, task) -> None:
        super().__init__()
        self.trainable = task.trainable_module()
        self._task = (task,)  # a tuple: not a submodule

    def forward(self, batch, progress):
        return step_of(self._task[0])(batch, progress)


def step_of(task) -> Callable:
    """The task's step: a module's call (which `nn.Module.compile` compiles, forward and all), else its forward."""
    return task if isinstance(task, nn.Module) else task.forward


def wrap(task, device: torch.device, here: Group):
    """A callable `(batch, progress) -> StepOutput`: the task's own forward, or through DDP under a launcher."""
    if not here.active:
        return step_of(task)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(Step(task), device_ids=ids)


_TRAINING: contextvars.ContextVar[Group | None] = contextvars.ContextVar("distil_training_group", default=None)


@contextlib.contextmanager
def training(here: Group) -> Iterator[None]:
    """Within: `fit` trains across the processes of `here` (`gathered` gathers over them). A `fit` that trains on
    one process while a group is up (`group=Group()`, e.g. rank 0's export fine-tune) gathers nothing."""
    token = _TRAINING.set(here)
    try:
        yield
    finally:
        _TRAINING.reset(token)


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """Every training process's `tensor`, concatenated along dim 0 in rank order (`tensor` itself unless the
    running `fit` trains on several processes). Each process's share must have the same shape (training batches
    do: the last, smaller one is dropped).

    Differentiable: each process gets back the gradient of its own rows, summed over the processes. Every process
    computes the same loss from the gathered rows, so the sum is N times the gradient of one loss, and DDP's mean
    over the N processes brings it back to exactly the gradient of that loss on the whole batch.
    """
    here = _TRAINING.get()
    if here is None or not here.active:
        return tensor
    return _Gather.apply(tensor)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.rank = tensor.shape[0], dist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # an all-reduce, not a reduce-scatter: gloo has no reduce-scatter
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
