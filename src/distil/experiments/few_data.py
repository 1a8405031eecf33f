"""`distil experiment few-data`: do soft targets keep a model trained on 3% of the data from overfitting?

As in Hinton et al.'s speech experiment, every model here has the same architecture (the cnn1d teacher's), and the
soft targets come from the model trained on all the data. Trained on all of the labelled split (3,600 signals):
the teacher. Trained on a random 3% of it (108 signals) for 150 epochs: a model on its hard labels alone (CE),
and a model on the teacher's soft targets alone for the same 108 signals (KD, T = 4, alpha = 1). Training
accuracy (on each model's own training signals, against their labels) and test accuracy are recorded after every
epoch; as in the paper, the model kept at the end is the one best on validation (early stopping on the 400
validation signals, whose labels the 3% models never train on).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distil.data import Split
from distil.evaluate import accuracy
from distil.experiments.common import (
    PAPER,
    TEACHER,
    Log,
    Page,
    cell,
    columns,
    figure,
    mean_std,
    mnist1d,
    one_thread,
    train_distilled,
    train_hard,
    train_teacher,
)
from distil.losses import KD
from distil.recipe import TrainConfig

FRACTION = 0.03
FEW_CFG = TrainConfig(epochs=150, batch_size=32, lr=0.01)
QUICK_FEW_CFG = TrainConfig(epochs=20, batch_size=32, lr=0.01)
ARMS = {"hard, 3%": "CE on the 3% labels", "soft, 3%": "KD (T = 4) on the teacher's soft targets for the same 3%",
        "hard, all data": "CE on every label: the teacher"}


def subset(split: Split, fraction: float, seed: int) -> Split:
    """A random `fraction` of `split` (at least one sample), drawn from `seed`."""
    count = max(1, round(fraction * len(split)))
    index = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:count]
    return Split(split.x[index], split.y[index])


class Curves:
    """Training and test accuracy of a student after every epoch: pass `watch` to the training."""

    def __init__(self, train: Split, test: Split) -> None:
        self.data, self.train, self.test = (train, test), [], []

    def watch(self, student: nn.Module) -> None:
        self.train.append(accuracy(student, self.data[0]))
        self.test.append(accuracy(student, self.data[1]))


def run_seed(seed: int, quick: bool, log: Log) -> dict:
    splits = mnist1d(seed, quick)
    few = subset(splits.train, FRACTION, seed)
    cfg = QUICK_FEW_CFG if quick else FEW_CFG
    curves = {arm: Curves(splits.train if arm == "hard, all data" else few, splits.test) for arm in ARMS}
    teacher = train_teacher(splits, seed, quick, watch=curves["hard, all data"].watch)
    students = {"hard, 3%": train_hard(splits, few, seed, cfg, TEACHER, watch=curves["hard, 3%"].watch),
                "soft, 3%": train_distilled(splits, few, teacher, [KD(T=4, weight=1.0)], seed, cfg, TEACHER,
                                            watch=curves["soft, 3%"].watch),
                "hard, all data": teacher}
    result = {"few": len(few), "all": len(splits.train),
              "curves": {arm: (c.train, c.test) for arm, c in curves.items()}}
    for arm, student in students.items():
        own = splits.train if arm == "hard, all data" else few
        result[arm] = {"train": accuracy(student, own), "test": accuracy(student, splits.test),
                       "last train": curves[arm].train[-1], "last test": curves[arm].test[-1]}
    log(f"few-data seed {seed}: " + ", ".join(f"{arm} test {result[arm]['test']:.3f}" for arm in ARMS))
    return result


def run_few_data(seeds: int = 3, quick: bool = False, out: Path = Path("docs/experiments/few-data.md"),
                 log: Log = print) -> Path:
    """Run over `seeds` seeds; write the page and its plot."""
    page = Page("few-data", "Few data: soft targets as a regulariser", seeds, quick)
    with one_thread():
        runs = [run_seed(seed, quick, log) for seed in range(seeds)]
    page.add(__doc__.split("\n\n", 1)[1].strip(), "",
             f"Model: cnn1d width 32, depth 3. The 3% subset holds {runs[0]['few']} signals; all data, "
             f"{runs[0]['all']}.", "", "## Accuracy", "")
    vals = lambda arm, key: [r[arm][key] for r in runs]  # noqa: E731
    page.table(["student", "train accuracy (kept model)", "test accuracy (kept model)", "train, last epoch",
                "test, last epoch", "what"],
               [[arm, cell(vals(arm, "train")), cell(vals(arm, "test")), cell(vals(arm, "last train")),
                 cell(vals(arm, "last test")), what] for arm, what in ARMS.items()])
    page.add("## Beside the paper", "",
             f"{PAPER}, speech (frame accuracy; a baseline acoustic model, its soft targets from the model trained on "
             "all the data):", "")
    mean = lambda arm, key: f"{mean_std(vals(arm, key))[0]:.1%}"  # noqa: E731
    page.table(["", "paper: train", "paper: test", "ours: train", "ours: test"],
               [["hard targets, 3%", "67.3%", "44.5%", mean("hard, 3%", "train"), mean("hard, 3%", "test")],
                ["soft targets, 3%", "65.4%", "57.0%", mean("soft, 3%", "train"), mean("soft, 3%", "test")],
                ["hard targets, all data", "63.4%", "58.9%", mean("hard, all data", "train"),
                 mean("hard, all data", "test")]])
    page.add("## What it shows", "", *findings(runs), "")
    return page.write(out, plot(runs))


def findings(runs: list[dict]) -> list[str]:
    mean = lambda arm, key: mean_std([r[arm][key] for r in runs])[0]  # noqa: E731
    gap = lambda arm: mean(arm, "last train") - mean(arm, "last test")  # noqa: E731
    hard, soft, full = (mean(a, "test") for a in ARMS)
    closed = (soft - hard) / (full - hard) if full > hard else float("nan")
    stopped = hard - mean("hard, 3%", "last test")
    return [f"- Test accuracy of the kept models: hard 3% {hard:.3f}, soft 3% {soft:.3f}, all data {full:.3f}; soft "
            f"targets close {closed:.0%} of the gap between the 3% and the all-data students (paper: 87%, from "
            "44.5% to 57.0% against 58.9% with all the data).",
            f"- At the last epoch the hard 3% model fits its training signals to "
            f"{mean('hard, 3%', 'last train'):.3f} and tests at {mean('hard, 3%', 'last test'):.3f} (a gap of "
            f"{gap('hard, 3%') * 100:.0f} points); the "
            f"soft one {mean('soft, 3%', 'last train'):.3f} and {mean('soft, 3%', 'last test'):.3f} (a gap of "
            f"{gap('soft, 3%') * 100:.0f} points).",
            f"- The kept (best on validation) model against the last epoch, on test: "
            f"{stopped * 100:+.1f} points for hard 3%, {(soft - mean('soft, 3%', 'last test')) * 100:+.1f} for soft "
            "3%. " + ("Early stopping changes little: the hard model's test curve levels off rather than falling, "
                      "so soft targets help here by what they teach about each signal, not by preventing a late "
                      "collapse" if abs(stopped) < 0.02 else "Early stopping matters for the hard model")
            + " (the paper's hard-target model needed early stopping; its soft one did not)."]


def plot(runs: list[dict]):
    fig, (few, bars) = figure(2)
    for arm, color in (("hard, 3%", "#d62728"), ("soft, 3%", "#1f77b4")):
        train = columns([r["curves"][arm][0] for r in runs])[0]
        test = columns([r["curves"][arm][1] for r in runs])[0]
        epochs = range(1, len(train) + 1)
        few.plot(epochs, train, color=color, ls="--", label=f"{arm}: train")
        few.plot(epochs, test, color=color, label=f"{arm}: test")
    full = mean_std([r["hard, all data"]["test"] for r in runs])[0]
    few.axhline(full, color="grey", ls=":", label="hard, all data: test (kept)")
    few.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title="3% of the labels: train and test curves")
    few.legend(fontsize=7)
    names = list(ARMS)
    for shift, key, hatch in ((-0.2, "train", "//"), (0.2, "test", "")):
        values = [mean_std([r[a][key] for r in runs])[0] for a in names]
        bars.bar([i + shift for i in range(len(names))], values, width=0.4, hatch=hatch, label=key,
                 color=["#d62728", "#1f77b4", "#7f7f7f"], edgecolor="black")
    bars.set_xticks(range(len(names)), names)
    bars.set(ylabel="accuracy of the kept model", ylim=(0, 1.02), title="Train (hatched) and test")
    return fig
