"""Four ways to write the KD loss from stored teacher logits, timed against CE alone, by hand.

The demo pair's student (MLP 40 -> 100 -> 10, 5k parameters), 53,601 samples (the demo's 3,601 labelled and
50,000 unlabeled, label -1), batch 256, AdamW, T=4, alpha=0.9, random teacher logits. One epoch of each form,
alternated over five rounds (median):

  ce       CE alone on the labelled samples: the floor
  kd       KL(log_softmax(s/T) || log_softmax(t/T)), the teacher softened at every step (what distil does)
  pre      the same with the teacher's log-probabilities at T computed once for all samples
  softce   cross-entropy against the teacher's probabilities at T (computed once) plus their entropy
  fused    one autograd function: forward from log_softmax(s/T), backward (softmax(s/T) - p) T / B

and with `--compile`, two more: `ce_c` and `kd_c`, the `ce` and `kd` losses through torch.compile (the network
itself eager), which fuses each loss's small operations into one kernel forward and one backward.

    python benchmarks/kd_loss_forms.py [--rounds 5] [--compile]

Each line gives the epoch and its ratio to `ce`: how much of the cached-KD epoch's cost is the loss itself,
and whether another form of the same loss is cheaper.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

N, LABELLED, B, T, ALPHA = 53601, 3601, 256, 4.0, 0.9


class FusedKD(torch.autograd.Function):
    """T^2 * mean_b KL(p || softmax(s/T)) from the student's logits s and the teacher's probabilities p at T."""

    @staticmethod
    def forward(ctx, s, p, neg_entropy):
        log_q = torch.log_softmax(s * (1 / T), 1)
        ctx.save_for_backward(log_q, p)
        return (neg_entropy.sum() - (p * log_q).sum()) * (T * T / s.shape[0])

    @staticmethod
    def backward(ctx, grad):
        log_q, p = ctx.saved_tensors
        return (log_q.exp() - p) * (grad * T / log_q.shape[0]), None, None


def student() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))


def hard_loss(s, targets):
    return F.cross_entropy(s, targets, ignore_index=-1, reduction="sum") / (targets >= 0).sum().clamp(min=1)


def kd_plus_hard(s, targets, t):
    soft = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True) * T * T
    return ALPHA * soft + (1 - ALPHA) * hard_loss(s, targets)


COMPILED: dict = {}  # "ce_c", "kd_c": the two losses through torch.compile (with --compile)


def epoch(kind: str, x, y, t, t_log_p, t_p, t_neg_entropy) -> None:
    model = student()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.randperm(N)
    for start in range(0, N - B + 1, B):
        idx = order[start:start + B]
        s = model(x.index_select(0, idx))
        targets = y.index_select(0, idx)
        if kind == "ce_c":
            loss = COMPILED[kind](s, targets)
        elif kind == "kd_c":
            loss = COMPILED[kind](s, targets, t.index_select(0, idx))
        elif kind == "ce":
            loss = hard_loss(s, targets)
        else:
            if kind == "kd":
                soft = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t.index_select(0, idx) / T, 1),
                                reduction="batchmean", log_target=True) * T * T
            elif kind == "pre":
                soft = F.kl_div(F.log_softmax(s / T, 1), t_log_p.index_select(0, idx), reduction="batchmean",
                                log_target=True) * T * T
            elif kind == "softce":
                soft = (F.cross_entropy(s / T, t_p.index_select(0, idx))
                        + t_neg_entropy.index_select(0, idx).mean()) * (T * T)
            else:
                soft = FusedKD.apply(s, t_p.index_select(0, idx), t_neg_entropy.index_select(0, idx))
            loss = ALPHA * soft + (1 - ALPHA) * hard_loss(s, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add the ce and kd losses through torch.compile")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y, t = torch.randn(N, 1, 40), torch.randint(0, 10, (N,)), torch.randn(N, 10) * 3
    y[LABELLED:] = -1  # as in the demo: 3,601 labelled samples, the 50,000 of the transfer set unlabeled
    t_log_p = F.log_softmax(t / T, 1)
    t_p = t_log_p.exp()
    data = (x, y, t, t_log_p, t_p, (t_p * t_log_p).sum(1))
    kinds = ["ce", "kd", "pre", "softce", "fused"]
    if args.compile:
        COMPILED.update(ce_c=torch.compile(hard_loss, dynamic=False), kd_c=torch.compile(kd_plus_hard, dynamic=False))
        kinds += list(COMPILED)
    for kind in kinds:  # warm-up (and compilation)
        epoch(kind, *data)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            start = time.perf_counter()
            epoch(kind, *data)
            times[kind].append(time.perf_counter() - start)
    median = {kind: statistics.median(values) for kind, values in times.items()}
    print(f"one epoch of {N:,} samples, batch {B}, {torch.get_num_threads()} threads; median of {args.rounds} rounds")
    for kind in kinds:
        print(f"  {kind:<8} {median[kind]:.3f} s   /ce {median[kind] / median['ce']:.2f}")


if __name__ == "__main__":
    main()
