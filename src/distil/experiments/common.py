"""What the research experiments share: the MNIST-1D data and model pair, training a teacher or a student through
`fit`, statistics over seeds, and the page (markdown table, exact command, wall time, a PNG plot beside it).

The pair is the demo's, made cheaper: a 1-D CNN teacher (width 32, 11k parameters, ~97% test accuracy) and the
demo's 5k-parameter MLP student (~62% on labels alone). Every experiment runs on one CPU thread: these models are
small, and on a shared machine one thread is many times faster than two (measured: a 10-epoch teacher in 2 s on
one thread, over a minute on two while other jobs ran).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from distil.data import Split, Splits, load_splits  # noqa: E402
from distil.distiller import ClassificationTask, Distiller  # noqa: E402
from distil.models import build_model  # noqa: E402
from distil.recipe import TrainConfig  # noqa: E402
from distil.train import fit  # noqa: E402

TEACHER = {"model": "cnn1d", "width": 32, "depth": 3}
STUDENT = {"model": "mlp", "width": 100, "depth": 1}
TEACHER_CFG = TrainConfig(epochs=15, batch_size=128, lr=3e-3, weight_decay=1e-4)
STUDENT_CFG = TrainConfig(epochs=30, batch_size=256, lr=0.03)
QUICK_TEACHER_CFG = TrainConfig(epochs=4, batch_size=128, lr=3e-3, weight_decay=1e-4)
QUICK_STUDENT_CFG = TrainConfig(epochs=4, batch_size=256, lr=0.03)
PAPER = "Hinton, Vinyals & Dean 2015, *Distilling the Knowledge in a Neural Network*"
Log = Callable[[str], None]
Watch = Callable[[nn.Module], None]  # called with the student after every epoch


def mnist1d(seed: int, quick: bool, transfer_size: int = 0) -> Splits:
    """MNIST-1D's published 4,000/1,000 split (400 of the 4,000 held out for validation; the seed picks them), or
    1,500 samples with `quick`; `transfer_size` generated unlabelled signals (another generator seed)."""
    args = {"num_samples": 1500 if quick else 5000, "seed": 42, "transfer_size": transfer_size, "transfer_seed": 1}
    return load_splits("mnist1d", args, seed=seed)


def build(spec: dict, splits: Splits, seed: int) -> nn.Module:
    """A zoo model from `{"model": name, **knobs}`, initialised from `seed`."""
    torch.manual_seed(seed)
    knobs = {k: v for k, v in spec.items() if k != "model"}
    return build_model(spec["model"], splits.input_shape, splits.num_classes, **knobs)


def train_teacher(splits: Splits, seed: int, quick: bool, spec: dict = TEACHER,
                  watch: Watch | None = None) -> nn.Module:
    """A model trained on the labelled split with cross-entropy (the best epoch on validation is kept)."""
    return train_hard(splits, splits.train, seed, QUICK_TEACHER_CFG if quick else TEACHER_CFG, spec, watch=watch)


def train_hard(splits: Splits, train: Split, seed: int, cfg: TrainConfig, spec: dict = STUDENT,
               label_smoothing: float = 0.0, watch: Watch | None = None) -> nn.Module:
    """A student trained on the hard labels of `train` alone (samples labelled -1 add nothing to the loss);
    `watch(student)` is called after every epoch."""
    student = build(spec, splits, seed)
    fit(ClassificationTask(student, label_smoothing), train, splits.val, cfg, seed=seed, device="cpu",
        on_epoch=None if watch is None else lambda record: watch(student))
    return student


def train_distilled(splits: Splits, train: Split, teacher: nn.Module, terms: list[nn.Module], seed: int,
                    cfg: TrainConfig, spec: dict = STUDENT, watch: Watch | None = None,
                    teacher_logits: torch.Tensor | None = None) -> nn.Module:
    """A student distilled from `teacher` through `terms` on `train`, the teacher's logits computed once up front
    (or `teacher_logits` (N, K) given: targets the experiment built itself); `watch(student)` after every epoch."""
    student = build(spec, splits, seed)
    distiller = Distiller(student, teacher, terms)
    data = (distiller.with_teacher_logits(train) if teacher_logits is None
            else Split(train.x, train.y, {"teacher": teacher_logits}))
    fit(distiller, data, splits.val, cfg, seed=seed, device="cpu",
        on_epoch=None if watch is None else lambda record: watch(student))
    return student


def steps_config(cfg: TrainConfig, steps: int, samples: int) -> TrainConfig:
    """`cfg` with as many epochs as make about `steps` optimiser steps over `samples` samples (last batch dropped)."""
    per_epoch = max(1, samples // cfg.batch_size)
    return cfg.model_copy(update={"epochs": max(1, round(steps / per_epoch))})


def soft_targets(logits: torch.Tensor, T: float) -> torch.Tensor:
    """softmax(logits / T): (N, K) -> (N, K)."""
    return F.softmax(logits / T, dim=-1)


def mean_entropy(logits: torch.Tensor, T: float) -> float:
    """Mean entropy, in nats, of the soft targets softmax(logits / T) over the N rows of (N, K) logits."""
    log_p = F.log_softmax(logits / T, dim=-1)
    return float(-(log_p.exp() * log_p).sum(-1).mean())


# --- statistics over seeds ------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def columns(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    """Per-column means and standard deviations of (seeds, points) values: what a plot's error bars show."""
    pairs = [mean_std(list(column)) for column in zip(*rows)]
    return [m for m, _ in pairs], [s for _, s in pairs]


def cell(values: list[float], digits: int = 3) -> str:
    """'mean +- std' as the tables show it."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def errors(accuracy_values: list[float], test_size: int) -> str:
    """Mean test errors (of `test_size`) for a list of accuracies, as '123 of 1000'."""
    return f"{round((1 - statistics.mean(accuracy_values)) * test_size)} of {test_size}"


# --- the page -----------------------------------------------------------------------------------


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one CPU thread (see the module docstring), restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def command(name: str, seeds: int, quick: bool) -> str:
    return f"distil experiment {name} --seeds {seeds}" + (" --quick" if quick else "")


@dataclass
class Page:
    """One experiment's page: a title, what it asks, then sections of markdown; `write` adds the command, the wall
    time and the plot's link, and saves the plot as `<page>.png` beside the page."""

    name: str
    title: str
    seeds: int
    quick: bool
    lines: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                 *("| " + " | ".join(row) + " |" for row in rows), "")

    def write(self, out: Path, figure: plt.Figure) -> Path:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot = out.with_suffix(".png")
        figure.tight_layout()
        figure.savefig(plot, dpi=110)
        plt.close(figure)
        run = command(self.name, self.seeds, self.quick)
        seconds = time.perf_counter() - self.started
        took = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
        head = [f"# {self.title}", "",
                f"Written by `{run}` in {took} on 1 CPU thread. Numbers are means +- standard deviations over "
                f"{self.seeds} seed(s); the seed sets the validation split, the initialisations and the batch "
                "order. MNIST-1D's test split holds 1,000 signals (300 with `--quick`).", "",
                f"![{self.name}]({plot.name})", ""]
        out.write_text("\n".join(head + self.lines).rstrip() + "\n")
        return out


def figure(panels: int, width: float = 4.6, height: float = 3.6) -> tuple[plt.Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height))
    return fig, list(axes) if panels > 1 else [axes]


def log_ticks(values: list[float]) -> list[str]:
    """Tick labels for a log axis that shows the measured values themselves."""
    return [f"{v:g}" if v < 1000 else f"{v / 1000:.3g}k" for v in values]

