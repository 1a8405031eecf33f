"""The pipeline: plain stages that read and write a run folder.

    teacher  : fit(teacher, CE)             -> teacher.safetensors (or load recipe.teacher.checkpoint)
    baseline : fit(student copy, CE)        -> baseline.safetensors (same student, no teacher, same steps)
    distill  : fit(Distiller(...))          -> student.safetensors (+ student.connectors.safetensors)
    report   : evaluate every model on test -> metrics.json, report.md, report.html, plots/

Rerunning into a folder resumes at the first stage whose output is missing (and inside a stage,
from its last checkpoint); `force=True` starts over.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distil.checkpoint import atomic_write, load_weights, save_model
from distil.data import Splits, load_splits
from distil.distiller import ClassificationTask, Distiller
from distil.errors import DistilError, ModelError
from distil.evaluate import evaluate_model, predict_logits
from distil.models import build_model
from distil.recipe import ModelSection, Recipe, TrainSection, build_terms, dump_recipe
from distil.report import with_ratios, write_report
from distil.train import TrainConfig, fit

log = logging.getLogger(__name__)

OUTPUTS = {"teacher": "teacher.safetensors", "baseline": "baseline.safetensors",
           "distill": "student.safetensors", "report": "metrics.json"}
MODEL_FILES = {"teacher": "teacher.safetensors", "baseline": "baseline.safetensors", "student": "student.safetensors"}


@dataclass
class Run:
    """What every stage needs: the recipe, its run folder, the data, and where to send epoch records."""

    recipe: Recipe
    run_dir: Path
    splits: Splits
    on_epoch: Callable[[dict], None] | None = None
    on_stage: Callable[[str, int], None] | None = None

    def path(self, name: str) -> Path:
        return self.run_dir / name

    def model(self, role: str) -> nn.Module:
        """A freshly initialised teacher or student (seeded, so every build is the same)."""
        section: ModelSection = getattr(self.recipe, "teacher" if role == "teacher" else "student")
        torch.manual_seed(self.recipe.seed)
        return build_model(section.model, self.splits.input_shape, self.splits.num_classes, **section.knobs())

    def check_models(self) -> None:
        """Fail before any training if a model's output does not fit the data (or the other model)."""
        sample = self.splits.train.x[:2]
        for role in ("teacher", "student"):
            model = self.model(role).eval()
            with torch.no_grad():
                try:
                    logits = model(sample)
                except RuntimeError as err:
                    raise ModelError(f"the {role} ({getattr(self.recipe, role).model}) fails on inputs of shape "
                                     f"{list(sample.shape)}: {err}") from err
            if tuple(logits.shape) != (2, self.splits.num_classes):
                raise ModelError(
                    f"the {role} ({getattr(self.recipe, role).model}) gives outputs of shape {list(logits.shape)} "
                    f"for a batch of 2, but the data has {self.splits.num_classes} classes: teacher and student "
                    f"must both give (batch, {self.splits.num_classes}) logits. Build it with num_classes.")

    def load(self, role: str, file: str) -> nn.Module:
        return load_weights(self.model(role), self.path(file))

    def fit(self, task, train, section: TrainSection, name: str, epochs: int | None = None):
        cfg = TrainConfig(**section.model_dump(), seed=self.recipe.seed)
        if epochs is not None:
            cfg = TrainConfig(**{**cfg.__dict__, "epochs": epochs})
        if self.on_stage:
            self.on_stage(name, cfg.epochs)
        return fit(task, train, self.splits.val, cfg, name=name, checkpoint_dir=self.path("checkpoints"),
                   log_path=self.path("log.jsonl"), on_epoch=self.on_epoch)

    def save(self, model: nn.Module, file: str, role: str) -> None:
        section: ModelSection = getattr(self.recipe, "teacher" if role == "teacher" else "student")
        meta = {"model": section.model, "knobs": section.knobs(), "input_shape": list(self.splits.input_shape),
                "num_classes": self.splits.num_classes, "class_names": self.splits.class_names}
        save_model(model, self.path(file), meta)


def stage_teacher(run: Run) -> None:
    section = run.recipe.teacher
    teacher = run.model("teacher")
    if section.checkpoint:
        load_weights(teacher, Path(section.checkpoint))
    else:
        run.fit(ClassificationTask(teacher), run.splits.train, section.train, "teacher")
    run.save(teacher, OUTPUTS["teacher"], "teacher")


def stage_baseline(run: Run) -> None:
    """The student trained on labels alone, with the student's settings and as many optimiser
    steps as the distillation stage takes (its training set may be larger)."""
    section = run.recipe.student.train
    steps = section.epochs * max(1, len(distill_train(run)) // section.batch_size)
    epochs = math.ceil(steps / max(1, len(run.splits.train) // section.batch_size))
    student = run.model("student")
    run.fit(ClassificationTask(student), run.splits.train, section, "baseline", epochs=epochs)
    run.save(student, OUTPUTS["baseline"], "student")


def distill_train(run: Run):
    return run.splits.with_transfer() if run.recipe.distill.use_transfer else run.splits.train


def stage_distill(run: Run) -> None:
    teacher = run.load("teacher", OUTPUTS["teacher"])
    student = run.model("student")
    distiller = Distiller(student, teacher, build_terms(run.recipe.distill.terms))
    run.fit(distiller, distill_train(run), run.recipe.student.train, "distill")
    run.save(student, OUTPUTS["distill"], "student")
    distiller.save_connectors(run.path("student.connectors.safetensors"))


def stage_report(run: Run) -> None:
    models = {}
    teacher_pred = None
    for name, file in MODEL_FILES.items():
        model = run.load("teacher" if name == "teacher" else "student", file)
        if name == "teacher":
            teacher_pred = predict_logits(model, run.splits.test.x).argmax(1)
        metrics = evaluate_model(model, run.splits.test, run.path(file), teacher_pred,
                                 run.recipe.report.latency_runs, run.recipe.report.throughput_batch)
        models[name] = metrics.as_dict()
    write_report(run.run_dir, with_ratios(models), read_history(run.path("log.jsonl")), report_notes(run),
                 f"distil report: {run.recipe.name}")


def report_notes(run: Run) -> list[str]:
    r, s = run.recipe, run.splits
    transfer = len(s.transfer) if s.transfer is not None and r.distill.use_transfer else 0
    terms = ", ".join(json.dumps(t) for t in r.distill.terms)
    return [f"data: {r.data.source}, {len(s.train)} train / {len(s.val)} val / {len(s.test)} test samples, "
            f"{transfer} unlabeled transfer samples for distillation",
            f"teacher: {r.teacher.model} {r.teacher.knobs()}; student: {r.student.model} {r.student.knobs()}",
            f"distillation terms: {terms}",
            "baseline: the student architecture trained on labels alone, with the same optimiser "
            "steps as the distilled student",
            f"latency: median of {r.report.latency_runs} batch-1 runs after warm-up; throughput at batch "
            f"{r.report.throughput_batch}; PyTorch on {torch.get_num_threads()} threads"]


def read_history(path: Path) -> list[dict]:
    """Epoch records of log.jsonl; a stage that resumed keeps only its latest record per epoch."""
    if not path.exists():
        return []
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[(record["stage"], record["epoch"])] = record
    return sorted(records.values(), key=lambda r: (list(OUTPUTS).index(r["stage"]) if r["stage"] in OUTPUTS else 99,
                                                    r["epoch"]))


STAGES: dict[str, Callable[[Run], None]] = {
    "teacher": stage_teacher, "baseline": stage_baseline, "distill": stage_distill, "report": stage_report}


def prepare_run_dir(recipe: Recipe, run_dir: Path, force: bool) -> None:
    """Create the folder; refuse to mix two different recipes in one folder unless `force`."""
    run_dir = Path(run_dir)
    resolved = dump_recipe(recipe)
    saved = run_dir / "recipe.yaml"
    if force and run_dir.exists():
        for name in [*OUTPUTS.values(), "recipe.yaml", "log.jsonl", "report.md", "report.html",
                     "student.connectors.safetensors"]:
            (run_dir / name).unlink(missing_ok=True)
        for sub in ("checkpoints", "plots"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    elif saved.exists() and saved.read_text() != resolved:
        raise DistilError(f"{run_dir} holds a run of a different recipe. Use --force to start it over, "
                          "or --run-dir to write somewhere else.")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(saved, lambda tmp: tmp.write_text(resolved))


def run_pipeline(recipe: Recipe, run_dir: Path, force: bool = False,
                 on_epoch: Callable[[dict], None] | None = None,
                 on_stage: Callable[[str, int], None] | None = None) -> list[str]:
    """Run every stage from the first whose output is missing; return the names of the stages run."""
    run_dir = Path(run_dir)
    prepare_run_dir(recipe, run_dir, force)
    splits = load_splits(recipe.data.source, recipe.data.args, recipe.seed, recipe.data.val_fraction,
                         recipe.data.test_fraction)
    run = Run(recipe, run_dir, splits, on_epoch, on_stage)
    run.check_models()
    missing = [name for name, file in OUTPUTS.items() if not run.path(file).exists()]
    todo = list(STAGES)[list(STAGES).index(missing[0]):] if missing else []
    for name in todo:
        log.info("stage %s", name)
        STAGES[name](run)
    return todo


def load_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        raise DistilError(f"{path} not found: run `distil run` first")
    return json.loads(path.read_text())

