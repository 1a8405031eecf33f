"""One KD epoch on the demo pair: distil's `fit` against torchdistill's `DistillationBox`, in one process.

Same data (MNIST-1D, 3,601 labelled + 50,000 transfer samples labelled -1), same models (distil's
`build_model`: cnn1d teacher width 100 depth 3, trained here for a few epochs; mlp student width 100
depth 1, the same initial weights in every row), the same batches (distil's `EpochSampler` order, 256
per step, last ragged batch dropped), AdamW lr 3e-3 without weight decay (fused in both: distil's
default on CPUs and CUDA GPUs), a per-step cosine schedule,
and the same loss: 0.9 * T^2 * KL(teacher_T || student_T) + 0.1 * CE on the labelled samples, T = 4.

  torchdistill, online       `get_distillation_box` from a config dict (WeightedSumLoss of one KDLoss
                             with alpha=0.1 on CE, beta=0.9 on KL, CrossEntropyLoss(ignore_index=-1)),
                             driven by the `train_one_epoch` pattern of its examples. Two data paths, both
                             built by torchdistill's `build_data_loader` from the config:
                               per-sample: a sampler and batch_size 256 (what its example configs do)
                               batched:    a BatchSampler as sampler, batch_size None (one indexing per batch)
  torchdistill, logits from supp_dict
                             torchdistill 1.x has no teacher cache (removed in its PR #539): the same box
                             with the teacher's forward_proc replaced by one that returns precomputed logits
                             served by the dataset in `supp_dict` (its extension points; built here, not
                             shipped by torchdistill)
  distil, online             `fit(Distiller(student, teacher, [KD(T=4, weight=0.9), CE(weight=0.1)]), ...)`
  distil, cached             the same on `Distiller.with_teacher_logits(train)`

Needs torch, torchvision, torchdistill and distil in one venv (see benchmarks/peers/setup.sh):

    ../peers-venv/bin/python benchmarks/peers/kd_epoch.py [--rounds 5] [--device cpu] [--threads N]

The last line reads `ratios: distil/torchdistill online X.XX, cached Y.YY`; both are against
torchdistill's online epoch with the batched data path (the faster of its two).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.data import BatchSampler, Dataset, TensorDataset

from distil import CE, KD, ClassificationTask, Distiller, EpochSampler, Split, TrainConfig, accuracy, fit, load_splits
from distil.device import resolve_device
from distil.models import build_model

SETUP = """benchmarks/peers needs torchvision and torchdistill next to distil, in a venv of their own
(never the project's .venv: PyPI's torchvision does not import beside its CPU torch). Build it with

    bash benchmarks/peers/setup.sh            # makes ../peers-venv (about 6 GB, a few minutes)

or by hand:

    python3 -m venv ../peers-venv
    ../peers-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    ../peers-venv/bin/pip install torchdistill==1.1.5
    ../peers-venv/bin/pip install -e .

then run  ../peers-venv/bin/python benchmarks/peers/kd_epoch.py"""

BATCH, LR, T, ALPHA = 256, 3e-3, 4.0, 0.9  # alpha weights the soft (KL) term, 1 - alpha the hard (CE) term
Row = Callable[[], tuple[torch.nn.Module, float]]  # one epoch -> (trained student, mean training loss)


def require_peers() -> None:
    """Exit 2 with the setup commands when torchvision or torchdistill cannot be imported."""
    for name in ("torchvision", "torchdistill"):
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError, or torchvision's operators missing for this torch build
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            print(f"error: cannot import {name} ({reason}).\n\n{SETUP}", file=sys.stderr)
            sys.exit(2)


# --- torchdistill -------------------------------------------------------------------------------


class WithTeacherLogits(Dataset):
    """(x, y) plus the teacher's precomputed logits in the supplementary dict, for a whole batch of indices."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        self.x, self.y, self.teacher_logits = x, y, teacher_logits

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: list[int]):
        return self.x[index], self.y[index], {"teacher_logits": self.teacher_logits[index]}  # (B, L), (B,), (B, K)


def logits_from_supp(model, sample_batch, targets=None, supp_dict=None, **kwargs) -> torch.Tensor:
    """A torchdistill forward_proc that skips the teacher: its logits come with the batch."""
    return supp_dict["teacher_logits"].to(sample_batch.device)


def box_config(loader: dict, steps: int, cached: bool) -> dict:
    """The `train` section of a torchdistill config (as its YAML would load), for one KD epoch."""
    kd = {"key": "KDLoss", "kwargs": {
        "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
        "teacher_module_io": "output", "temperature": T, "alpha": 1 - ALPHA, "beta": ALPHA,  # its alpha is CE's
        "reduction": "batchmean", "ignore_index": -1}}  # -1: transfer samples, no hard label
    return {
        "num_epochs": 1,
        "train_data_loader": loader,
        "teacher": {"forward_proc": "logits_from_supp" if cached else "forward_batch_only", "sequential": [],
                    "requires_grad": False, "frozen_modules": []},
        "student": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": True,
                    "frozen_modules": []},
        "optimizer": {"key": "AdamW", "kwargs": {"lr": LR, "weight_decay": 0.0, "fused": True}},  # as distil's
        "scheduler": {"key": "CosineAnnealingLR", "kwargs": {"T_max": steps}, "scheduling_step": 1},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}}},
    }


def loader_config(batched: bool, cached: bool) -> dict:
    """torchdistill's `train_data_loader` section; the sampler draws distil's epoch-0 order."""
    if batched:
        sampler = lambda dataset: BatchSampler(EpochSampler(len(dataset), seed=0), BATCH, drop_last=True)
        return {"dataset_id": "train", "requires_supp": not cached, "sampler": {"class_or_func": sampler},
                "kwargs": {"batch_size": None}}  # the dataset gets a list of indices and returns the batch
    sampler = lambda dataset: EpochSampler(len(dataset), seed=0)
    return {"dataset_id": "train", "sampler": {"class_or_func": sampler},
            "kwargs": {"batch_size": BATCH, "drop_last": True, "num_workers": 0}}


def torchdistill_epoch(teacher, student, dataset: Dataset, loader: dict, steps: int, cached: bool,
                       device: torch.device) -> float:
    """One epoch as torchdistill's examples/torchvision/image_classification.py runs it; the mean loss."""
    from torchdistill.core.distillation import get_distillation_box

    box = get_distillation_box(teacher, student, {"train": dataset}, box_config(loader, steps, cached), device,
                               device_ids=None, distributed=False, lr_factor=1)
    box.pre_epoch_process(epoch=0)
    losses = []
    for sample_batch, targets, supp_dict in box.train_data_loader:
        sample_batch, targets = sample_batch.to(device), targets.to(device)
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)
        losses.append(loss.item())  # its example logs loss.item() at every step
    box.post_epoch_process()
    box.clean_modules()  # also sets requires_grad back on the teacher
    teacher.requires_grad_(False)
    return statistics.fmean(losses)


# --- the benchmark ------------------------------------------------------------------------------


def trained_teacher(splits, epochs: int, device: torch.device) -> torch.nn.Module:
    """The demo teacher, trained briefly on the labelled split so that the students learn something real."""
    torch.manual_seed(0)
    teacher = build_model("cnn1d", (1, 40), 10, width=100, depth=3)
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=3e-3, weight_decay=1e-4)
    fit(ClassificationTask(teacher), splits.train, None, cfg, device=device, precision="fp32")
    return teacher.to(device).eval().requires_grad_(False)


def make_rows(train: Split, cached_split: Split, teacher, device: torch.device) -> dict[str, Row]:
    from torchdistill.core.interfaces.registry import FORWARD_PROC_FUNC_DICT, register_forward_proc_func

    if "logits_from_supp" not in FORWARD_PROC_FUNC_DICT:
        register_forward_proc_func(logits_from_supp)
    steps = len(train) // BATCH
    online_data = TensorDataset(train.x, train.y)
    cached_data = WithTeacherLogits(train.x, train.y, cached_split.teacher_logits["teacher"])
    cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=LR)

    def student() -> torch.nn.Module:
        torch.manual_seed(1)
        return build_model("mlp", (1, 40), 10, width=100, depth=1).to(device)

    def torchdistill_row(batched: bool, cached: bool) -> Row:
        def row():
            model = student()
            data = cached_data if cached else online_data
            return model, torchdistill_epoch(teacher, model, data, loader_config(batched, cached), steps, cached,
                                             device)
        return row

    def distil_row(split: Split) -> Row:
        def row():
            distiller = Distiller(student(), teacher, [KD(T=T, weight=ALPHA), CE(weight=1 - ALPHA)])
            result = fit(distiller, split, None, cfg, device=device, precision="fp32")
            return distiller.student, result.history[-1]["loss"]
        return row

    @torch.no_grad()
    def teacher_alone():  # the floor of both online rows: the teacher's forward passes over the same batches
        for index in BatchSampler(EpochSampler(len(train), seed=0), BATCH, drop_last=True):
            teacher(train.x[index].to(device))
        return None, float("nan")

    return {"teacher": teacher_alone, "td_sample": torchdistill_row(batched=False, cached=False),
            "td_batched": torchdistill_row(batched=True, cached=False),
            "td_supp": torchdistill_row(batched=True, cached=True),
            "distil_online": distil_row(train), "distil_cached": distil_row(cached_split)}


LABELS = {"teacher": "the teacher's forward passes alone (floor)",
          "td_sample": "torchdistill, online, per-sample loader",
          "td_batched": "torchdistill, online, batched loader",
          "td_supp": "torchdistill, logits from supp_dict (*)",
          "distil_online": "distil, teacher online",
          "distil_cached": "distil, cached teacher logits"}


def timed(row: Row, device: torch.device) -> tuple[float, tuple[torch.nn.Module, float]]:
    start = time.perf_counter()
    out = row()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


@torch.no_grad()
def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def report(args, device, splits, train, teacher, cache_seconds, times, outputs) -> None:
    import torchdistill

    import distil

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    median = {name: statistics.median(values) for name, values in times.items()}
    steps = len(train) // BATCH
    print(f"one KD epoch of {len(train):,} samples ({len(splits.train):,} labelled + {len(splits.transfer):,} "
          f"transfer), {steps} steps of {BATCH}, fp32, {where}; median of {args.rounds} rounds")
    print(f"torch {torch.__version__}, torchdistill {torchdistill.__version__}, distil {distil.__version__}; "
          f"teacher val acc {accuracy(teacher, splits.val):.3f}")
    print(f"  {'':<42} {'median':>7}   {'min-max':>13} {'samples/s':>10}   {'train loss':>10}   val acc")
    for key, label in LABELS.items():
        student, loss = outputs[key]
        trained = "" if student is None else f"   {loss:10.4f}   {accuracy(student, splits.val):.3f}"
        print(f"  {label:<42} {median[key]:7.3f} s {min(times[key]):6.3f}-{max(times[key]):6.3f} s "
              f"{steps * BATCH / median[key]:>10,.0f}{trained}")
    torch.manual_seed(1)
    untrained = build_model("mlp", (1, 40), 10, width=100, depth=1).to(device)
    print(f"  (the student before training: val acc {accuracy(untrained, splits.val):.3f})")
    print(f"  building distil's teacher-logit cache      {cache_seconds:7.3f} s (once per run)")
    print("  (*) torchdistill 1.x has no teacher cache; this row feeds it precomputed logits through its own "
          "forward_proc hook")
    print(f"same batches, same start: max |student weight difference| after the epoch, torchdistill batched vs "
          f"distil online {max_difference(outputs['td_batched'][0], outputs['distil_online'][0]):.1e}, "
          f"per-sample vs batched {max_difference(outputs['td_sample'][0], outputs['td_batched'][0]):.1e}")
    paired = [a / b for a, b in zip(times["distil_online"], times["td_batched"])]  # same round, same load
    print(f"round by round, distil online / torchdistill batched: median {statistics.median(paired):.2f}, "
          f"min-max {min(paired):.2f}-{max(paired):.2f} over {len(paired)} rounds")
    base = median["td_batched"]
    print(f"against torchdistill's per-sample loader: online {median['distil_online'] / median['td_sample']:.2f}, "
          f"cached {median['distil_cached'] / median['td_sample']:.2f}; distil cached / torchdistill logits from "
          f"supp_dict {median['distil_cached'] / median['td_supp']:.2f}")
    print(f"ratios: distil/torchdistill online {median['distil_online'] / base:.2f}, "
          f"cached {median['distil_cached'] / base:.2f} (torchdistill has no cache: cached is against its online "
          f"epoch, batched loader)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 on a busy shared machine, where OpenMP threads "
                             "that wait for each other on an oversubscribed CPU slow every step many times over")
    args = parser.parse_args()
    require_peers()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    splits = load_splits("mnist1d", {"num_samples": 5000, "transfer_size": 50000}, seed=0)
    train = splits.with_transfer()
    teacher = trained_teacher(splits, args.teacher_epochs, device)
    start = time.perf_counter()
    terms = [KD(T=T, weight=ALPHA), CE(weight=1 - ALPHA)]
    cached_split = Distiller(build_model("mlp", (1, 40), 10, width=100, depth=1), teacher, terms).to(
        device).with_teacher_logits(train)
    cache_seconds = time.perf_counter() - start
    rows = make_rows(train, cached_split, teacher, device)
    outputs = {name: row() for name, row in rows.items()}  # warm-up: allocator, kernels, thread pools
    times: dict[str, list[float]] = {name: [] for name in rows}
    for round_ in range(args.rounds):  # alternate the rows (forward, then backward) so all see the same noise
        for name in list(rows)[::1 if round_ % 2 == 0 else -1]:
            seconds, outputs[name] = timed(rows[name], device)
            times[name].append(seconds)
    report(args, device, splits, train, teacher, cache_seconds, times, outputs)


if __name__ == "__main__":
    main()
