"""Overhead of distil's training loop against a minimal hand-written PyTorch KD loop.

Same teacher (cnn1d width 100), student (mlp width 100), data shape (MNIST-1D: 1x40, 10
classes), batch size, optimiser and loss (Hinton KD at T=4, alpha=0.9). Both loops take
batches by indexing in-memory tensors. The two are timed alternately, several rounds, and the
ratio of median epoch times is printed.

    python benchmarks/overhead.py [--samples 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from distil import CE, KD, Distiller, TrainConfig, fit
from distil.data import Split
from distil.models import build_model


def hand_written_epoch(student, teacher, x, y, optimizer, scheduler, batch_size: int, T: float, alpha: float):
    """The loop a practitioner writes by hand: shuffle, slice, teacher under no_grad, KD + CE, step."""
    student.train()
    order = torch.randperm(len(x))
    for start in range(0, len(x) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        inputs, targets = x[idx], y[idx]
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        student_logits = student(inputs)
        soft = F.kl_div(F.log_softmax(student_logits / T, 1), F.log_softmax(teacher_logits / T, 1),
                        reduction="batchmean", log_target=True) * T * T
        loss = alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per round, for both loops")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(args.samples, 1, 40), torch.randint(0, 10, (args.samples,))
    teacher = build_model("cnn1d", (1, 40), 10, width=100).eval().requires_grad_(False)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=3e-3)
    ours, theirs = [], []
    for _ in range(args.rounds):
        student = build_model("mlp", (1, 40), 10, width=100)
        start = time.perf_counter()
        fit(Distiller(student, teacher, [KD(T=4, weight=0.9), CE(weight=0.1)]), Split(x, y), None, cfg)
        ours.append(time.perf_counter() - start)

        student = build_model("mlp", (1, 40), 10, width=100)
        optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * (len(x) // args.batch_size))
        start = time.perf_counter()
        for _ in range(args.epochs):
            hand_written_epoch(student, teacher, x, y, optimizer, scheduler, args.batch_size, 4.0, 0.9)
        theirs.append(time.perf_counter() - start)
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"{args.epochs} epochs of {args.samples} samples, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"distil fit:        {statistics.median(ours) * 1000:8.1f} ms")
    print(f"hand-written loop: {statistics.median(theirs) * 1000:8.1f} ms")
    print(f"overhead ratio:    {ratio:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
