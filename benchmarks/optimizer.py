"""Fused optimisers against torch's default (foreach) ones, on the demo's student.

distil builds SGD and AdamW with `fused=True` where torch has the kernels (CPUs with torch >= 2.4, CUDA GPUs):
one kernel updates every parameter. This times, for the demo's MLP student (40 -> 100 -> 10, 5k parameters):

  step     the optimiser step alone (gradients in place), AdamW and SGD with momentum, fused and foreach
  epoch    one epoch of the student on labels by hand (53,601 samples with the demo's 50,000 unlabeled ones,
           label -1; batch 256; CE), with AdamW fused and foreach

alternated over several rounds (median), and prints each fused/foreach ratio.

    python benchmarks/optimizer.py [--rounds 7] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch
from torch import nn
from torch.nn import functional as F

from distil.device import resolve_device

N, LABELLED, B = 53601, 3601, 256


def student(device: torch.device) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 10)).to(device)


def make(kind: str, params, fused: bool) -> torch.optim.Optimizer:
    how = {"fused": True} if fused else {"foreach": True}
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=3e-3, **how)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True, **how)


def step_seconds(kind: str, fused: bool, device: torch.device, rounds: int) -> float:
    model = student(device)
    optimizer = make(kind, model.parameters(), fused)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()

    def step() -> None:
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return min(timeit.repeat(step, number=200, repeat=rounds)) / 200


def epoch_seconds(x: torch.Tensor, y: torch.Tensor, fused: bool, device: torch.device) -> float:
    model = student(device)
    optimizer = make("adamw", model.parameters(), fused)
    start = time.perf_counter()
    order = torch.randperm(len(x), device=device)
    for first in range(0, len(x) - B + 1, B):
        idx = order[first:first + B]
        loss = F.cross_entropy(model(x.index_select(0, idx)), y.index_select(0, idx), ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 40, generator=g).to(device)
    y = torch.cat([torch.randint(0, 10, (LABELLED,), generator=g), torch.full((N - LABELLED,), -1)]).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}; the demo's student, 5,110 parameters")
    for kind in ("adamw", "sgd"):
        fused, foreach = (step_seconds(kind, f, device, args.rounds) for f in (True, False))
        print(f"  {kind} step: fused {fused * 1e6:6.1f} us, foreach {foreach * 1e6:6.1f} us, "
              f"fused/foreach {fused / foreach:.2f}")
    epochs: dict[bool, list[float]] = {True: [], False: []}
    for fused in (True, False):  # warm-up
        epoch_seconds(x, y, fused, device)
    for _ in range(args.rounds):
        for fused in (True, False):
            epochs[fused].append(epoch_seconds(x, y, fused, device))
    fused, foreach = (statistics.median(epochs[f]) for f in (True, False))
    print(f"  student epoch on labels, AdamW: fused {fused:.3f} s, foreach {foreach:.3f} s, "
          f"fused/foreach {fused / foreach:.2f}")


if __name__ == "__main__":
    main()
