"""`distil experiment soft-vs-smoothing`: do soft targets carry more than label smoothing of the same entropy?

Label smoothing also softens the targets, but spreads the extra mass evenly over the wrong classes; a teacher's
soft targets say which wrong classes look like the right one. For each T in {1, 2, 4, 8}, on the labelled split
alone (no transfer set: label smoothing needs labels), the MLP student learns from:
- soft targets: the teacher's softmax(z / T), with KD at temperature T alone (alpha = 1);
- label smoothing: CE with the smoothing epsilon whose target distribution has the same entropy as the teacher's
  soft targets at T, averaged over the training signals;
- shuffled soft targets: the teacher's targets with each signal's wrong-class probabilities permuted at random
  (the same top class and the same entropy per signal, but no longer which classes resemble which);
and a baseline on the hard labels. Every student takes the same number of optimiser steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from distil.errors import ConfigError
from distil.evaluate import accuracy, predict_logits
from distil.experiments.common import (
    QUICK_STUDENT_CFG,
    STUDENT_CFG,
    Log,
    Page,
    cell,
    columns,
    figure,
    mean_entropy,
    mean_std,
    mnist1d,
    one_thread,
    soft_targets,
    steps_config,
    train_distilled,
    train_hard,
    train_teacher,
)
from distil.losses import KD

TEMPERATURES = [1, 2, 4, 8]
STEPS = 1500
ARMS = ["label smoothing", "shuffled soft targets", "soft targets"]


def smoothed_entropy(epsilon: float, num_classes: int) -> float:
    """Entropy (nats) of the label-smoothed target `(1 - eps) * onehot + eps / K` (as torch's cross_entropy)."""
    low = epsilon / num_classes
    high = 1 - epsilon + low
    return -(high * math.log(high) + (num_classes - 1) * (low * math.log(low) if low > 0 else 0.0))


def smoothing_for_entropy(entropy: float, num_classes: int, tolerance: float = 1e-6) -> float:
    """The smoothing epsilon in [0, 1) whose target distribution has `entropy` nats (bisection: the entropy grows
    with epsilon, from 0 at eps = 0 to ln K at eps = 1)."""
    if not 0 <= entropy < math.log(num_classes):
        raise ConfigError(f"an entropy of {entropy} nats cannot be reached by label smoothing over {num_classes} "
                         f"classes: it must lie in [0, ln {num_classes} = {math.log(num_classes):.4f}).")
    low, high = 0.0, 1.0
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if smoothed_entropy(middle, num_classes) < entropy else (low, middle)
    return low


def shuffle_wrong_classes(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each row's logits with its top class kept in place and the others permuted at random: (N, K) -> (N, K).
    Softmax at any T then gives the same entropy and top class, with the wrong classes' probabilities moved."""
    rows, top = torch.arange(len(logits)), logits.argmax(1)
    orders = []
    for _ in range(2):  # two random orders of the classes, each starting with the row's top class
        keys = torch.rand(logits.shape, generator=generator)
        keys[rows, top] = -1.0
        orders.append(keys.argsort(1))
    source, target = orders
    return torch.empty_like(logits).scatter_(1, target, logits.gather(1, source))


def run_seed(seed: int, quick: bool, log: Log) -> dict:
    splits = mnist1d(seed, quick)
    train = splits.train
    cfg = steps_config(QUICK_STUDENT_CFG if quick else STUDENT_CFG, 60 if quick else STEPS, len(train))
    teacher = train_teacher(splits, seed, quick)
    logits = predict_logits(teacher, train.x)  # (N, K) on the training signals
    shuffled = shuffle_wrong_classes(logits, torch.Generator().manual_seed(seed))
    result = {"teacher": accuracy(teacher, splits.test), "baseline": accuracy(train_hard(splits, train, seed, cfg),
                                                                              splits.test)}
    for T in TEMPERATURES[2:3] if quick else TEMPERATURES:
        entropy = mean_entropy(logits, T)
        epsilon = smoothing_for_entropy(entropy, splits.num_classes)
        students = {
            "soft targets": train_distilled(splits, train, teacher, [KD(T=T, weight=1.0)], seed, cfg),
            "shuffled soft targets": train_distilled(splits, train, teacher, [KD(T=T, weight=1.0)], seed, cfg,
                                                     teacher_logits=shuffled),
            "label smoothing": train_hard(splits, train, seed, cfg, label_smoothing=epsilon)}
        result[T] = {"entropy": entropy, "epsilon": epsilon, "profile": sorted_profile(logits, T),
                     **{arm: accuracy(student, splits.test) for arm, student in students.items()}}
        log(f"soft-vs-smoothing seed {seed}: T={T} entropy {entropy:.2f} eps {epsilon:.3f} "
            + ", ".join(f"{arm} {result[T][arm]:.3f}" for arm in ARMS))
    return result


def sorted_profile(logits: torch.Tensor, T: float) -> list[float]:
    """The soft targets' probabilities sorted from largest to smallest, averaged over the rows: (K,)."""
    return soft_targets(logits, T).sort(1, descending=True).values.mean(0).tolist()


def run_soft_vs_smoothing(seeds: int = 3, quick: bool = False,
                          out: Path = Path("docs/experiments/soft-vs-smoothing.md"), log: Log = print) -> Path:
    """Run over `seeds` seeds; write the page and its plot."""
    page = Page("soft-vs-smoothing", "Soft targets against label smoothing of the same entropy", seeds, quick)
    with one_thread():
        runs = [run_seed(seed, quick, log) for seed in range(seeds)]
    temperatures = [T for T in TEMPERATURES if T in runs[0]]
    page.add(__doc__.split("\n\n", 1)[1].strip(), "",
             f"Teacher: cnn1d width 32, test accuracy {cell([r['teacher'] for r in runs])}. Student: MLP, one hidden "
             f"layer of 100 units, about {STEPS if not quick else 60} optimiser steps each. Hard labels alone: "
             f"{cell([r['baseline'] for r in runs])}.", "", "## Student test accuracy", "")
    mean = lambda T, key: mean_std([r[T][key] for r in runs])[0]  # noqa: E731
    page.table(["T", "target entropy (nats)", "matching epsilon", *ARMS],
               [[str(T), f"{mean(T, 'entropy'):.2f}", f"{mean(T, 'epsilon'):.3f}",
                 *(cell([r[T][arm] for r in runs]) for arm in ARMS)] for T in temperatures]
               + [["hard labels", "0", "0", cell([r["baseline"] for r in runs]), "", ""]])
    page.add("Hinton et al. (2015) have no label-smoothing comparison. Müller, Kornblith & Hinton (2019, *When does "
             "label smoothing help?*) find that a teacher trained with label smoothing distils worse, as smoothing "
             "erases the resemblances between classes that soft targets carry.", "", "## What it shows", "")
    base = mean_std([r["baseline"] for r in runs])[0]
    for T in temperatures:
        soft, smooth, shuffled = (mean(T, arm) for arm in ("soft targets", "label smoothing", "shuffled soft targets"))
        page.add(f"- T = {T}: soft targets {soft:.3f}, label smoothing {smooth:.3f} ({(soft - smooth) * 100:+.1f} "
                 f"points for soft targets), shuffled soft targets {shuffled:.3f}; hard labels {base:.3f}.")
    page.add(summary(runs, temperatures), "")
    return page.write(out, plot(runs, temperatures))


def summary(runs: list[dict], temperatures: list[int]) -> str:
    """One line over every T: soft targets against label smoothing, against shuffled targets, against hard labels."""
    mean = lambda key, T=None: mean_std([r[key] if T is None else r[T][key] for r in runs])[0]  # noqa: E731
    over_smoothing = [mean("soft targets", T) - mean("label smoothing", T) for T in temperatures]
    over_shuffled = [mean("soft targets", T) - mean("shuffled soft targets", T) for T in temperatures]
    over_hard = [mean("soft targets", T) - mean("baseline") for T in temperatures]
    stds = [mean_std([r[T][arm] for r in runs])[1] for T in temperatures for arm in ARMS]
    span = lambda gains: f"{min(gains) * 100:+.1f} to {max(gains) * 100:+.1f} points"  # noqa: E731
    return (f"- Over every T, soft targets against label smoothing of the same entropy: {span(over_smoothing)}; "
            f"against the same targets with their wrong-class mass shuffled: {span(over_shuffled)}; against hard "
            f"labels alone: {span(over_hard)}. The seeds' standard deviations in the table reach "
            f"{max(stds) * 100:.1f} points: read smaller differences as noise.")


def plot(runs: list[dict], temperatures: list[int]):
    fig, (bars, shape) = figure(2)
    width = 0.8 / len(ARMS)
    for i, (arm, color) in enumerate(zip(ARMS, ("#ff7f0e", "#9467bd", "#1f77b4"))):
        means, stds = columns([[r[T][arm] for T in temperatures] for r in runs])
        where = [j + (i - 1) * width for j in range(len(temperatures))]
        bars.bar(where, means, width=width, yerr=stds, capsize=2, label=arm, color=color)
    bars.axhline(mean_std([r["baseline"] for r in runs])[0], color="grey", ls="--", label="hard labels")
    bars.set_xticks(range(len(temperatures)), [f"T = {T}" for T in temperatures])
    bars.set(ylabel="student test accuracy", title="Same entropy, different targets")
    low = min(min(r[T][a] for T in temperatures for a in ARMS) for r in runs)
    high = max(max(r[T][a] for T in temperatures for a in ARMS) for r in runs)
    bars.set_ylim(max(0.0, low - 0.05), high + 0.05)  # room for the legend above the bars
    bars.legend(fontsize=7, loc="upper center", ncol=2)
    T = 4 if 4 in temperatures else temperatures[0]
    profile = columns([r[T]["profile"] for r in runs])[0]
    epsilon = mean_std([r[T]["epsilon"] for r in runs])[0]
    classes = len(profile)
    smoothed = [1 - epsilon + epsilon / classes] + [epsilon / classes] * (classes - 1)
    ranks = list(range(1, classes + 1))
    shape.bar([k - 0.2 for k in ranks], profile, width=0.4, label=f"teacher at T = {T} (mean, sorted)", color="#1f77b4")
    shape.bar([k + 0.2 for k in ranks], smoothed, width=0.4, label=f"label smoothing, eps {epsilon:.2f}",
              color="#ff7f0e")
    shape.set(xlabel="class rank in the target", ylabel="probability",
              title="Target distributions of equal mean entropy")
    shape.set_xticks(ranks)
    shape.legend(fontsize=7)
    return fig
