"""Training throughput on the demo pair: distil's loop against a hand-written PyTorch KD loop.

MNIST-1D with its 50k generated transfer set (as `recipes/mnist1d.yaml`), the 1-D CNN teacher
(cnn1d, width 100, depth 3) and the MLP student (mlp, width 100, depth 1), batch 256, AdamW,
Hinton KD at T=4 with alpha=0.9. Four rows, timed alternately over several rounds (median epoch):

  hand      a plain PyTorch KD loop over a DataLoader (batch sampler over a TensorDataset: the
            fastest DataLoader pattern for in-memory tensors), teacher under no_grad each step; its AdamW
            is fused on CPUs and CUDA GPUs, as distil's is, so the rows differ by their loops only
  online    distil's `fit` with a `Distiller`, the teacher run at every step
  cached    distil's `fit` with the teacher's logits computed once (`Distiller.with_teacher_logits`)
  student   distil's `fit` of the student alone on labels (`ClassificationTask`): the floor for `cached`

and two FitNet rows (the same KD + CE plus a hint: the student's hidden layer `layer1`, through a learned
linear connector, regresses the teacher's pooled features `pool`, weight 1), teacher online and with its
logits and `pool` features cached, with the time to build that cache.

    python benchmarks/throughput.py [--rounds 5] [--device auto] [--precision fp32] [--student-width 100]
                                    [--compile [default|reduce-overhead]]

`--student-width` widens the MLP student's hidden layer (100: the demo's 5k parameters), to show how the
cached/student-only ratio falls as the student's own step grows against the KD loss's fixed cost.

The last line reads `ratios: online/hand X.XX, cached/student-only Y.YY`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from distil import CE, KD, ClassificationTask, Distiller, FitNet, Split, TrainConfig, fit, load_splits
from distil.device import autocast, resolve_device
from distil.models import build_model
from distil.recipe import COMPILE_MODES


def hand_written_epoch(student, teacher, loader, optimizer, device, precision, T: float = 4.0, alpha: float = 0.9):
    """The loop a practitioner writes by hand: batches from a DataLoader, teacher under no_grad, KD + CE, step."""
    student.train()
    for inputs, targets in loader:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, precision):
            with torch.no_grad():
                teacher_logits = teacher(inputs)
            student_logits = student(inputs)
            soft = F.kl_div(F.log_softmax(student_logits / T, 1), F.log_softmax(teacher_logits / T, 1),
                            reduction="batchmean", log_target=True) * T * T
            labelled = targets >= 0  # transfer samples carry -1: no hard label
            hard = (F.cross_entropy(student_logits, targets, ignore_index=-1, reduction="sum")
                    / labelled.sum().clamp(min=1))
            loss = alpha * soft + (1 - alpha) * hard
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def hand_cached_epoch(student, x, y, teacher_logits, optimizer, batch_size: int, kd: bool, T: float = 4.0,
                      alpha: float = 0.9) -> None:
    """The floor of the cached rows, by hand: batches by index_select, KD from stored logits (or CE alone)."""
    student.train()
    order = torch.randperm(len(x), device=x.device)
    for start in range(0, len(x) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        inputs, targets = x.index_select(0, idx), y.index_select(0, idx)
        student_logits = student(inputs)
        labelled = targets >= 0  # transfer samples carry -1: no hard label
        hard = F.cross_entropy(student_logits, targets, ignore_index=-1, reduction="sum") / labelled.sum().clamp(min=1)
        loss = hard
        if kd:
            cached = teacher_logits.index_select(0, idx)  # (B, K): this batch's rows of the stored teacher logits
            soft = F.kl_div(F.log_softmax(student_logits / T, 1), F.log_softmax(cached / T, 1),
                            reduction="batchmean", log_target=True) * T * T
            loss = alpha * soft + (1 - alpha) * hard
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--transfer", type=int, default=50000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--student-width", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1, help="each row trains this many epochs and is timed per "
                        "epoch (more than 1: one-time costs per run, such as recording CUDA graphs, are shared out)")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                        help="distil's rows compiled, in this torch.compile mode (default: 'default'; "
                        "'reduce-overhead' also replays each step as CUDA graphs on a GPU); the hand rows stay "
                        "eager; compiling happens in the warm-up round")
    args = parser.parse_args()
    device = resolve_device(args.device)
    splits = load_splits("mnist1d", {"num_samples": 5000, "transfer_size": args.transfer}, seed=0)
    train = splits.with_transfer()
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=3e-3)
    run = dict(device=device, precision=args.precision, compile=args.compile or False)
    torch.manual_seed(0)
    teacher = build_model("cnn1d", (1, 40), 10, width=100, depth=3).to(device).eval().requires_grad_(False)

    def student():
        torch.manual_seed(1)
        return build_model("mlp", (1, 40), 10, width=args.student_width, depth=1)

    def terms():
        return [KD(T=4, weight=0.9), CE(weight=0.1)]

    def fitnet_terms():
        return [*terms(), FitNet(student="layer1", teacher="pool", weight=1.0)]

    build_start = time.perf_counter()
    cached_split = Distiller(student(), teacher, terms()).to(device).with_teacher_logits(train)
    cache_seconds = time.perf_counter() - build_start
    build_start = time.perf_counter()
    fitnet_split = Distiller(student(), teacher, fitnet_terms()).to(device).with_teacher_logits(train)
    fitnet_cache_seconds = time.perf_counter() - build_start
    on_device = Split(train.x.to(device), train.y.to(device))
    loader = DataLoader(TensorDataset(on_device.x, on_device.y), batch_size=None,
                        sampler=BatchSampler(RandomSampler(on_device.x), args.batch_size, drop_last=True))

    fused = device.type in ("cpu", "cuda")  # the hand-written loops take distil's (fused) optimiser step

    def hand():
        model = student().to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=fused)
        for _ in range(args.epochs):
            hand_written_epoch(model, teacher, loader, optimizer, device, args.precision)

    def hand_cached(kd: bool):
        model = student().to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=fused)
        for _ in range(args.epochs):
            hand_cached_epoch(model, on_device.x, on_device.y, cached_split.teacher_logits["teacher"].to(device),
                              optimizer, args.batch_size, kd)

    rows = {
        "hand": hand,
        "hand_kd": lambda: hand_cached(True),
        "hand_ce": lambda: hand_cached(False),
        "online": lambda: fit(Distiller(student(), teacher, terms()), train, None, cfg, **run),
        "cached": lambda: fit(Distiller(student(), teacher, terms()), cached_split, None, cfg, **run),
        "student": lambda: fit(ClassificationTask(student()), train, None, cfg, **run),
        "fitnet_online": lambda: fit(Distiller(student(), teacher, fitnet_terms()), train, None, cfg, **run),
        "fitnet_cached": lambda: fit(Distiller(student(), teacher, fitnet_terms()), fitnet_split, None, cfg, **run),
    }
    for row in rows.values():  # warm-up: allocator, kernels, thread pools
        row()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, row in rows.items():
            times[name].append(timed(row) / args.epochs)
    median = {name: statistics.median(values) for name, values in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    params = sum(p.numel() for p in student().parameters())
    compiled = f", distil compiled ({args.compile})" if args.compile else ""
    print(f"one epoch of {len(train):,} samples ({len(splits.train):,} labelled + {args.transfer:,} transfer), batch "
          f"{args.batch_size}, {args.precision}{compiled}, {name}; median of "
          f"{args.rounds} rounds{f', {args.epochs} epochs a run' if args.epochs > 1 else ''}; student {params:,} "
          "parameters")
    for key, label in [("hand", "hand-written KD loop (DataLoader)"), ("online", "distil, teacher online"),
                       ("cached", "distil, cached teacher logits"), ("student", "distil, student alone on labels")]:
        print(f"  {label:<36} {median[key]:7.3f} s   {len(train) / median[key]:>10,.0f} samples/s")
    print(f"  building the teacher-logit cache:    {cache_seconds:7.3f} s (once per run)")
    for key, label in [("fitnet_online", "distil, FitNet, teacher online"),
                       ("fitnet_cached", "distil, FitNet, cached (+features)")]:
        print(f"  {label:<36} {median[key]:7.3f} s   {len(train) / median[key]:>10,.0f} samples/s")
    print(f"  building the logit+feature cache:    {fitnet_cache_seconds:7.3f} s (once per run; features "
          f"{tuple(fitnet_split.teacher_logits['teacher/pool'].shape)})")
    print(f"FitNet: cached/online {median['fitnet_cached'] / median['fitnet_online']:.2f}, "
          f"cached/student-only {median['fitnet_cached'] / median['student']:.2f}")
    if args.compile:  # whether the rows ran compiled (graphs, breaks) and, on a GPU, as CUDA graphs
        from torch._dynamo.utils import counters

        print(f"compiled: {counters['stats']['unique_graphs']} graphs, {sum(counters['graph_break'].values())} graph "
              f"breaks, {counters['inductor']['cudagraph_skips']} CUDA-graph skips")
    print(f"floor, by hand: KD from stored logits / CE alone {median['hand_kd'] / median['hand_ce']:.2f} "
          f"({median['hand_kd']:.3f} s / {median['hand_ce']:.3f} s): the cost of the KD loss itself on this student")
    print(f"ratios: online/hand {median['online'] / median['hand']:.2f}, "
          f"cached/student-only {median['cached'] / median['student']:.2f}")


if __name__ == "__main__":
    main()
