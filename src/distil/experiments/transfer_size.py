"""`distil experiment transfer-size`: how much does a larger unlabelled transfer set help the student?

The MLP student learns from the cnn1d teacher with `0.9 * KD(T=4) + 0.1 * CE` on the labelled split plus the
first 0, 5,000, 20,000 or 50,000 signals of a generated MNIST-1D transfer set (unlabelled: soft targets only).
Every student takes the same number of optimiser steps (3,000 batches of 256), so a larger transfer set means
more distinct signals, not more training. The baseline learns from the hard labels alone with the same steps.
"""

from __future__ import annotations

from pathlib import Path

from distil.data import Split
from distil.distiller import hinton_terms
from distil.evaluate import accuracy, predict_logits
from distil.experiments.common import (
    QUICK_STUDENT_CFG,
    STUDENT_CFG,
    Log,
    Page,
    cell,
    columns,
    figure,
    log_ticks,
    mean_std,
    mnist1d,
    one_thread,
    steps_config,
    train_distilled,
    train_hard,
    train_teacher,
)

SIZES = [0, 5000, 20000, 50000]
QUICK_SIZES = [0, 1000, 2000]
STEPS = 3000


def run_seed(seed: int, quick: bool, log: Log) -> dict:
    sizes = QUICK_SIZES if quick else SIZES
    splits = mnist1d(seed, quick, transfer_size=sizes[-1])
    steps, base_cfg = (100, QUICK_STUDENT_CFG) if quick else (STEPS, STUDENT_CFG)
    teacher = train_teacher(splits, seed, quick)
    everything = splits.with_transfer()  # the labelled split, then the transfer set (label -1)
    logits = predict_logits(teacher, everything.x)  # (N + M, K), computed once, sliced for each size
    labelled = len(splits.train)
    baseline = train_hard(splits, splits.train, seed, steps_config(base_cfg, steps, labelled))
    result = {"teacher": accuracy(teacher, splits.test), "baseline": accuracy(baseline, splits.test)}
    for size in sizes:
        end = labelled + size
        train = Split(everything.x[:end], everything.y[:end])
        cfg = steps_config(base_cfg, steps, end)
        student = train_distilled(splits, train, teacher, hinton_terms(4, 0.9), seed, cfg, teacher_logits=logits[:end])
        result[size] = {"accuracy": accuracy(student, splits.test), "epochs": cfg.epochs}
        log(f"transfer-size seed {seed}: {size} transfer signals, {cfg.epochs} epochs: {result[size]['accuracy']:.3f}")
    return result


def run_transfer_size(seeds: int = 3, quick: bool = False, out: Path = Path("docs/experiments/transfer-size.md"),
                      log: Log = print) -> Path:
    """Run over `seeds` seeds; write the page and its plot."""
    page = Page("transfer-size", "Transfer-set size: more unlabelled signals for the soft targets", seeds, quick)
    with one_thread():
        runs = [run_seed(seed, quick, log) for seed in range(seeds)]
    sizes = QUICK_SIZES if quick else SIZES
    base = [r["baseline"] for r in runs]
    page.add(__doc__.split("\n\n", 1)[1].strip(), "",
             f"Teacher: cnn1d width 32, test accuracy {cell([r['teacher'] for r in runs])}. Student: MLP, one hidden "
             f"layer of 100 units. Hard labels alone: {cell(base)}.", "", "## Student test accuracy", "")
    accs = lambda size: [r[size]["accuracy"] for r in runs]  # noqa: E731
    page.table(["transfer signals", "epochs (same steps)", "test accuracy", "vs hard labels alone"],
               [[f"{size:,}", str(runs[0][size]["epochs"]), cell(accs(size)),
                 f"{(mean_std(accs(size))[0] - mean_std(base)[0]) * 100:+.1f} pt"] for size in sizes])
    page.add("Hinton et al. (2015) report no such curve: their MNIST transfer set was the 60,000 training images "
             "(or the same with the 3s or all but the 7s and 8s removed).", "", "## What it shows", "")
    first, last = mean_std(accs(sizes[0]))[0], mean_std(accs(sizes[-1]))[0]
    page.add(f"- With no transfer set the distilled student reaches {first:.3f} (hard labels alone: "
             f"{mean_std(base)[0]:.3f}); with {sizes[-1]:,} transfer signals, {last:.3f} "
             f"({(last - first) * 100:+.1f} points), at the same number of optimiser steps.",
             "- " + "; ".join(f"{a:,} -> {b:,}: {(mean_std(accs(b))[0] - mean_std(accs(a))[0]) * 100:+.1f} points"
                              for a, b in zip(sizes, sizes[1:])) + ".", "")
    return page.write(out, plot(runs, sizes))


def plot(runs: list[dict], sizes: list[int]):
    fig, (ax,) = figure(1, width=5.5)
    means, stds = columns([[r[size]["accuracy"] for size in sizes] for r in runs])
    where = range(len(sizes))
    ax.errorbar(where, means, yerr=stds, marker="o", capsize=3, label="distilled student")
    ax.axhline(mean_std([r["baseline"] for r in runs])[0], color="grey", ls="--", label="hard labels alone")
    ax.axhline(mean_std([r["teacher"] for r in runs])[0], color="black", ls=":", label="teacher")
    ax.set_xticks(list(where), log_ticks(sizes))
    ax.set(xlabel="generated transfer signals (unlabelled)", ylabel="test accuracy",
           title=f"Same steps, more distinct signals ({len(runs)} seed(s))")
    ax.legend(fontsize=8)
    return fig
