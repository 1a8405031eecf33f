"""Top-k teacher logits against full logits, on a synthetic 100-class task, over several seeds.

`distill.top_k: k` keeps each sample's k largest teacher logits and the log of the remaining mass, which the other
classes share equally when the targets are rebuilt (`distil.cache.top_k_pack` / `top_k_unpack`). This measures
what that costs the student: 100 Gaussian classes in 32 dimensions, a 256-wide MLP teacher trained on labels,
a 32-wide MLP student distilled at T=4 (alpha 0.9) from full logits and from the top k, same data and steps.
The seed sets the data, the teacher and the student.

    python benchmarks/top_k.py [--seeds 3] [--k 5 10]

The last line reads `top-k gap: k=5 X.XX pt, ...` (mean full-logit accuracy minus mean top-k accuracy).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from distil import CE, KD, ClassificationTask, Distiller, Split, TrainConfig, fit
from distil.evaluate import accuracy

CLASSES, DIM = 100, 32


def synthetic(n: int, centres: torch.Tensor, seed: int) -> Split:
    """n samples of Gaussian clusters around `centres` (100, 32), unit noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return Split(centres[y] + torch.randn(n, DIM, generator=g), y)


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, width), nn.ReLU(), nn.Linear(width, CLASSES))


def one_seed(seed: int, ks: list[int], epochs: int) -> dict[str, float]:
    """Test accuracy of the teacher, and of the student from full logits and from each top k."""
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(seed)) * 1.5
    train, test = synthetic(6000, centres, 10 * seed + 1), synthetic(3000, centres, 10 * seed + 2)
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=3e-3)
    teacher = mlp(256, seed)
    fit(ClassificationTask(teacher), train, None, cfg, device="cpu", seed=seed)
    result = {"teacher": accuracy(teacher, test)}
    for k in [None, *ks]:
        student = mlp(32, seed + 1)
        distiller = Distiller(student, teacher, [KD(T=4, weight=0.9), CE(weight=0.1)])
        fit(distiller, distiller.with_teacher_logits(train, top_k=k), None, cfg, device="cpu", seed=seed)
        result["full" if k is None else f"top-{k}"] = accuracy(student, test)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    runs = [one_seed(seed, args.k, args.epochs) for seed in range(args.seeds)]
    print(f"synthetic {CLASSES} classes, 6,000 train / 3,000 test, {args.epochs} epochs, {args.seeds} seeds")
    for name in runs[0]:
        values = [r[name] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {name:<8} {statistics.mean(values):.4f} +- {spread:.4f}   " + " ".join(f"{v:.4f}" for v in values))
    full = statistics.mean(r["full"] for r in runs)
    gaps = [f"k={k} {(full - statistics.mean(r[f'top-{k}'] for r in runs)) * 100:.2f} pt" for k in args.k]
    print("top-k gap: " + ", ".join(gaps))


if __name__ == "__main__":
    main()
