"""`distil experiment methods`: every loss term and training scheme on fixed pairs, over several seeds.

- MNIST-1D (generated offline, with a generated transfer set): the demo's 1-D CNN teacher and 5k-parameter MLP
  student, for the response and relation terms and the schemes;
- digits: a CNN teacher and a small CNN student, for the feature terms (which need matching layers).

Each method is trained with the same optimiser, epochs and data as the baseline student; the table reports test
accuracy (mean and standard deviation over the seeds) and the time per epoch relative to `kd` on the same data.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distil.build import build_terms
from distil.data import Splits, load_splits
from distil.distiller import ClassificationTask, Distiller
from distil.evaluate import accuracy
from distil.experiments.common import mean_std
from distil.models import build_model
from distil.recipe import TrainConfig
from distil.schemes import EMASelfDistiller, MutualLearning
from distil.train import fit

KD = [{"kind": "kd", "T": 4, "weight": 0.9}, {"kind": "ce", "weight": 0.1}]
CE1 = {"kind": "ce", "weight": 1.0}
RELATION = {"student": "layer1", "teacher": "pool"}  # MLP hidden layer (B, 100) and the CNN's pooled features (B, 200)
FEATURE = {"student": "layer2", "teacher": "layer2"}  # the digits CNNs' second blocks


@dataclass
class Setting:
    """One data set and model pair, with its training settings."""

    name: str
    source: str
    args: dict
    teacher: dict
    student: dict
    teacher_cfg: TrainConfig
    student_cfg: TrainConfig
    use_transfer: bool
    methods: dict[str, list[dict]] = field(default_factory=dict)  # method -> recipe terms


def settings(quick: bool) -> list[Setting]:
    epochs = 4 if quick else 12
    mnist = Setting(
        "MNIST-1D", "mnist1d", {"num_samples": 5000, "transfer_size": 5000 if quick else 10000},
        {"model": "cnn1d", "width": 100, "depth": 3}, {"model": "mlp", "width": 100, "depth": 1},
        TrainConfig(epochs=epochs, batch_size=128, lr=3e-3, weight_decay=1e-4),
        # batch 128: RKD's angle term builds (B, B, B) tensors, 8x smaller than at the demo's 256
        TrainConfig(epochs=epochs, batch_size=128, lr=0.03), use_transfer=True,
        methods={"kd": KD,
                 "dkd": [{"kind": "dkd", "alpha": 1.0, "beta": 8.0, "T": 4, "warmup": max(1, epochs // 4)}, CE1],
                 "dist": [{"kind": "dist", "T": 4, "weight": 2.0}, CE1],
                 "rkd": [{"kind": "rkd", **RELATION}, CE1],
                 "sp": [{"kind": "sp", **RELATION, "weight": 3000.0}, CE1],
                 "cc": [{"kind": "cc", **RELATION, "weight": 0.02}, CE1],
                 "crd": [{"kind": "crd", **RELATION, "num_samples": 0, "negatives": 1024, "weight": 0.8}, CE1]})
    digits = Setting(
        "digits", "digits", {}, {"model": "cnn", "width": 32, "depth": 3}, {"model": "cnn", "width": 8, "depth": 3},
        TrainConfig(epochs=15 if not quick else 4, batch_size=64, lr=3e-3),
        TrainConfig(epochs=15 if not quick else 4, batch_size=64, lr=3e-3), use_transfer=False,
        methods={"kd": KD,
                 "fitnet": [{"kind": "fitnet", **FEATURE}, CE1],
                 "at": [{"kind": "at", **FEATURE}, CE1],
                 "pkt": [{"kind": "pkt", **FEATURE, "weight": 30000.0}, CE1],
                 "nst": [{"kind": "nst", **FEATURE, "weight": 50.0}, CE1],
                 "vid": [{"kind": "vid", **FEATURE}, CE1]})
    return [mnist, digits]


def build(spec: dict, splits: Splits, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    knobs = {k: v for k, v in spec.items() if k != "model"}
    return build_model(spec["model"], splits.input_shape, splits.num_classes, **knobs)


def timed_fit(task, train, splits: Splits, cfg: TrainConfig, seed: int) -> float:
    """Train; return the mean seconds per epoch."""
    result = fit(task, train, splits.val, cfg, seed=seed, device="cpu")
    return statistics.mean(r["seconds"] for r in result.history)


def run_setting(setting: Setting, seed: int, quick: bool, log: Callable[[str], None]) -> dict[str, tuple[float, float]]:
    """(test accuracy, seconds per epoch) of the teacher, the baseline, every method and the schemes, for one seed."""
    splits = load_splits(setting.source, setting.args, seed=seed)
    train = splits.with_transfer() if setting.use_transfer else splits.train
    rows: dict[str, tuple[float, float]] = {}
    teacher = build(setting.teacher, splits, seed)
    rows["teacher"] = (0.0, timed_fit(ClassificationTask(teacher), splits.train, splits, setting.teacher_cfg, seed))
    rows["teacher"] = (accuracy(teacher, splits.test), rows["teacher"][1])
    baseline_steps = setting.student_cfg.epochs * (len(train) // setting.student_cfg.batch_size)
    epochs = max(1, round(baseline_steps / max(1, len(splits.train) // setting.student_cfg.batch_size)))
    baseline_cfg = setting.student_cfg.model_copy(update={"epochs": epochs})  # as many steps as distillation
    student = build(setting.student, splits, seed)
    rows["baseline"] = (0.0, timed_fit(ClassificationTask(student), splits.train, splits, baseline_cfg, seed))
    rows["baseline"] = (accuracy(student, splits.test), rows["baseline"][1])
    log(f"{setting.name} seed {seed}: teacher {rows['teacher'][0]:.3f}, baseline {rows['baseline'][0]:.3f}")
    for method, specs in setting.methods.items():
        specs = [{**s, "num_samples": len(train)} if s.get("num_samples") == 0 else s for s in specs]
        student = build(setting.student, splits, seed)
        distiller = Distiller(student, teacher, build_terms(specs))
        data = distiller.with_teacher_logits(train)
        rows[method] = (0.0, timed_fit(distiller, data, splits, setting.student_cfg, seed))
        rows[method] = (accuracy(student, splits.test), rows[method][1])
        log(f"{setting.name} seed {seed}: {method} {rows[method][0]:.3f}")
    if setting.use_transfer:
        rows.update(run_schemes(setting, splits, train, teacher, baseline_cfg, seed, log))
    return rows


def run_schemes(setting: Setting, splits: Splits, train, teacher: nn.Module, baseline_cfg: TrainConfig, seed: int,
                log: Callable[[str], None]) -> dict[str, tuple[float, float]]:
    """Several teachers, an assistant chain, born-again, mutual learning and EMA self-distillation. Mutual learning
    and EMA train on the same data and steps as the distilled students (labels plus the unlabeled transfer set,
    where their KL terms need no labels); each DML peer compares with the same network trained alone on labels
    (the baseline row for the first, `peer alone` for the second, same initialisation)."""
    rows = {}
    cfg = setting.student_cfg
    second = build({**setting.teacher, "width": 50}, splits, seed + 1)  # another teacher, of half the width
    timed_fit(ClassificationTask(second), splits.train, splits, setting.teacher_cfg, seed)
    student = build(setting.student, splits, seed)
    terms = build_terms([{"kind": "multi_kd", "T": 4, "weight": 0.9, "combine": "confidence"}, KD[1]])
    distiller = Distiller(student, {"teacher": teacher, "half": second}, terms)
    rows["multi-teacher"] = (0.0, timed_fit(distiller, distiller.with_teacher_logits(train), splits, cfg, seed))
    rows["multi-teacher"] = (accuracy(student, splits.test), rows["multi-teacher"][1])
    assistant = build({**setting.teacher, "width": 20, "depth": 2}, splits, seed + 2)
    chain = Distiller(assistant, teacher, build_terms(KD))
    seconds = timed_fit(chain, chain.with_teacher_logits(train), splits, setting.teacher_cfg, seed)
    student = build(setting.student, splits, seed)
    link = Distiller(student, assistant, build_terms(KD))
    seconds += timed_fit(link, link.with_teacher_logits(train), splits, cfg, seed)
    rows["takd"] = (accuracy(student, splits.test), seconds)
    alone = build(setting.student, splits, seed + 3)
    seconds = timed_fit(ClassificationTask(alone), splits.train, splits, baseline_cfg, seed)
    rows["peer alone"] = (accuracy(alone, splits.test), seconds)
    peers = {"student": build(setting.student, splits, seed), "peer": build(setting.student, splits, seed + 3)}
    seconds = timed_fit(MutualLearning(peers), train, splits, cfg, seed)
    rows["dml (student)"] = (accuracy(peers["student"], splits.test), seconds)
    rows["dml (peer)"] = (accuracy(peers["peer"], splits.test), seconds)
    student = build(setting.student, splits, seed)
    ema = EMASelfDistiller(student, decay=0.99, warmup=2)
    rows["ema"] = (0.0, timed_fit(ema, train, splits, cfg, seed))
    rows["ema"] = (accuracy(student, splits.test), rows["ema"][1])
    born = build(setting.teacher, splits, seed + 4)
    again = Distiller(born, copy.deepcopy(teacher), build_terms(KD))
    seconds = timed_fit(again, again.with_teacher_logits(train), splits, setting.teacher_cfg, seed)
    rows["born-again (teacher's architecture)"] = (accuracy(born, splits.test), seconds)
    log(f"{setting.name} seed {seed}: schemes " + ", ".join(f"{k} {v[0]:.3f}" for k, v in rows.items()))
    return rows


NOTES = {
    "teacher": "trained on the labelled split",
    "baseline": "the student on labels alone, as many optimiser steps as distillation",
    "kd": "Hinton: KD T=4 (alpha 0.9) + CE 0.1",
    "dkd": "DKD alpha 1, beta 8, T 4, warm-up a quarter of the epochs, + CE",
    "dist": "DIST T=4, weight 2, + CE",
    "rkd": "RKD distance 25 + angle 50 on (MLP hidden, CNN pooled) features, + CE",
    "sp": "similarity-preserving, weight 3000, + CE",
    "cc": "correlation congruence, weight 0.02, + CE",
    "crd": "CRD, 128-d embeddings, memory bank of the training set, 1,024 negatives, weight 0.8, + CE",
    "multi-teacher": "multi_kd over the teacher and a half-width teacher, confidence-weighted, + CE",
    "takd": "teacher -> assistant (cnn1d width 20, depth 2) -> student, KD + CE at each link",
    "peer alone": "the second DML peer's network and initialisation, trained alone on labels (as the baseline)",
    "dml (student)": "two students from scratch teaching each other, T=1: CE on labels, KL on every sample of the "
                     "transfer set too; compare with the baseline",
    "dml (peer)": "the other student of that pair; compare with `peer alone`",
    "ema": "the student taught by an EMA of itself (decay 0.99), on labels plus the transfer set",
    "born-again (teacher's architecture)": "a second teacher-sized network distilled from the teacher (compare "
                                           "with the teacher row)",
    "fitnet": "FitNet layer2 -> layer2, learned 1x1 connector, + CE",
    "at": "attention transfer layer2 -> layer2, + CE",
    "pkt": "probabilistic knowledge transfer layer2 -> layer2, + CE",
    "nst": "neuron selectivity transfer layer2 -> layer2, + CE",
    "vid": "variational information distillation layer2 -> layer2, + CE",
}


def run_methods(seeds: int = 3, quick: bool = False, out: Path = Path("docs/methods.md"),
                log: Callable[[str], None] = print) -> Path:
    """Run every method over `seeds` seeds and write the markdown table to `out`."""
    start = time.perf_counter()
    tables = []
    for setting in settings(quick):
        runs = [run_setting(setting, seed, quick, log) for seed in range(seeds)]
        tables.append(_table(setting, runs))
    command = f"distil experiment methods --seeds {seeds}" + (" --quick" if quick else "")
    minutes, threads = (time.perf_counter() - start) / 60, torch.get_num_threads()
    page = [f"# Methods compared: `{command}`", "",
            f"Written by `{command}` ({minutes:.0f} min on {threads} CPU thread{'s' if threads > 1 else ''}). Test "
            f"accuracy, mean +- standard deviation over {seeds} seed(s) (the seed sets the split, the initialisation "
            "and the batch order); time per epoch relative to `kd` on the same data (the teacher's logits, and the "
            "features that feature and relation terms read, are computed once and cached).", "", *tables]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(page) + "\n")
    return out


def _table(setting: Setting, runs: list[dict[str, tuple[float, float]]]) -> str:
    names = list(runs[0])
    kd_seconds = statistics.mean(r["kd"][1] for r in runs)
    base = statistics.mean(r["baseline"][0] for r in runs)
    lines = [f"## {setting.name}: {setting.teacher['model']} teacher, {setting.student['model']} student", "",
             "| method | test accuracy | vs baseline | epoch time vs kd | what |", "|---|---|---|---|---|"]
    for name in names:
        mean, std = mean_std([r[name][0] for r in runs])
        rel = statistics.mean(r[name][1] for r in runs) / kd_seconds
        lines.append(f"| {name} | {mean:.3f} +- {std:.3f} | {(mean - base) * 100:+.1f} pt | {rel:.1f}x | "
                     f"{NOTES.get(name, '')} |")
    return "\n".join(lines) + "\n"
