"""A frozen teacher's forward pass with its BatchNorm folded in (what `Distiller` runs) against the teacher as built.

Two teachers of the zoo in eval mode, BatchNorm statistics set away from 0 and 1 as after training: the demo's cnn1d
(width 100, depth 3; batch 256 of MNIST-1D-shaped signals) and CIFAR's resnet32x4 (batch 64 of 32x32 images). Each
is timed over `--batches` forward passes under no_grad, alternating the two forms for several rounds (median):

    python benchmarks/fold.py [--rounds 5] [--device auto]

Each line gives both times, their ratio and the largest difference of their outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from distil.device import resolve_device
from distil.distiller import fold_batchnorm
from distil.models import build_model


def with_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def timed(model: nn.Module, x: torch.Tensor, batches: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(batches):
            model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cases = {"cnn1d (demo teacher), batch 256": (build_model("cnn1d", (1, 40), 10, width=100, depth=3), (256, 1, 40)),
             "resnet32x4 (CIFAR teacher), batch 64": (build_model("resnet32x4", (3, 32, 32), 100), (64, 3, 32, 32))}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.batches} forward passes per timing, median of {args.rounds} rounds; {where}")
    for name, (model, shape) in cases.items():
        teacher = with_statistics(model).to(device)
        folded = fold_batchnorm(teacher)
        x = torch.randn(*shape, device=device)
        with torch.no_grad():
            diff = float((folded(x) - teacher(x)).abs().max())
        times = {"as built": [], "folded": []}
        for form in (teacher, folded):  # warm-up
            timed(form, x, 2)
        for _ in range(args.rounds):
            times["as built"].append(timed(teacher, x, args.batches))
            times["folded"].append(timed(folded, x, args.batches))
        plain, fast = statistics.median(times["as built"]), statistics.median(times["folded"])
        print(f"  {name:<38} as built {plain:.3f} s, folded {fast:.3f} s: {fast / plain:.2f}x "
              f"(max |output difference| {diff:.1e})")


if __name__ == "__main__":
    main()
