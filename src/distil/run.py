"""`Run`: what every stage needs (the recipe, its run folder, the data, the device), and the steps stages share:
building, training, distilling, saving and loading the run's models."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from distil import distributed
from distil.batches import Batch
from distil.build import build_terms
from distil.cache import TeacherCache
from distil.data import Data, Split, Splits, in_memory, take
from distil.device import resolve_device
from distil.distiller import ClassificationTask, Distiller, Scoring, hinton_terms, scoring_for
from distil.errors import ConfigError, DistilError, ModelError, RecipeError
from distil.losses import Reads
from distil.modelfile import load_model_file, save_model_file
from distil.models import build_model
from distil.recipe import ModelSection, Recipe, TrainConfig
from distil.train import fit


@dataclass
class Run:
    """What every stage needs: the recipe, its run folder, the data, and where to send epoch records."""

    recipe: Recipe
    run_dir: Path
    splits: Splits
    on_epoch: Callable[[dict], None] | None = None
    on_stage: Callable[[str, int], None] | None = None
    augment: Callable | None = field(default=None)
    group: distributed.Group = field(default_factory=distributed.group)  # the training processes (torchrun)
    alone: bool = False  # train in this process only (export's QAT and the report run on rank 0 alone)

    def path(self, name: str) -> Path:
        return self.run_dir / name

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(distributed.device_for(self.recipe.device, self.group))

    @cached_property
    def val(self) -> Split:
        return in_memory(self.splits.val)

    @cached_property
    def test(self) -> Split:
        return in_memory(self.splits.test)

    @property
    def scoring(self) -> Scoring:
        """The validation metric of the data's task: top-1 accuracy, or bits per byte for a language model."""
        return scoring_for(self.splits.task)

    def task(self, model: nn.Module) -> ClassificationTask:
        """Supervised training of `model` on the labels (next tokens for a language model), scored by the run's
        metric."""
        return ClassificationTask(model, scoring=self.scoring)

    def model(self, role: str) -> nn.Module:
        """A freshly initialised teacher or student (seeded, so every build is the same)."""
        return self.build(getattr(self.recipe, role))

    def build(self, section: ModelSection, seed_offset: int = 0) -> nn.Module:
        """A freshly initialised model of `section` (seeded: every build is the same; `seed_offset` gives the
        peers of a scheme their own initialisation)."""
        torch.manual_seed(self.recipe.seed + seed_offset)
        return build_model(section.model, self.splits.input_shape, self.splits.num_classes, **section.knobs())

    def teachers(self) -> nn.Module | dict[str, nn.Module]:
        """The trained teacher, or every teacher by name when the recipe adds some (schemes.teachers)."""
        extra = {name: self.load(f"teacher-{name}") for name in self.recipe.schemes.teachers}
        return {"teacher": self.load("teacher"), **extra} if extra else self.load("teacher")

    def check_batch_sizes(self) -> None:
        check_batch_sizes(self.recipe, self.group.world, f"the {self.group.world} training processes")

    def check_models(self) -> None:
        """Fail before any training if a model's output does not fit the data, or a loss term its models."""
        d = self.recipe.distill
        writes = {"distill.on_policy": (d.on_policy > 0, "makes the student write text", "set it to 0"),
                  "distill.sequence_kd": (d.sequence_kd, "makes the teacher write text", "set it to false")}
        for key, (on, what, fix) in writes.items():
            if on and self.splits.task != "lm":
                raise RecipeError(f"{key} {what}, which needs a language model on a text source (pycorpus, "
                                  f"textfolder); {fix} here.")
            if on and d.prompt_tokens >= self.splits.input_shape[0]:
                raise RecipeError(f"distill.prompt_tokens ({d.prompt_tokens}) must be shorter than the blocks "
                                  f"({self.splits.input_shape[0]} tokens) for {key}: the prompt is continued to "
                                  "the end of the block")
        sample = take(self.splits.train, [0, min(1, len(self.splits.train) - 1)]).x
        if self.augment:
            sample = self.augment(sample, torch.Generator().manual_seed(0))
        s = self.recipe.schemes
        sections = {"teacher": self.recipe.teacher, "student": self.recipe.student,
                    **{f"teacher '{n}' (schemes.teachers)": m for n, m in s.teachers.items()},
                    **{f"assistant {i} (schemes.assistants)": m for i, m in enumerate(s.assistants, start=1)},
                    **{f"peer {i} (schemes.mutual)": m for i, m in enumerate(s.mutual, start=1)}}
        models = {role: self._checked(role, section, sample) for role, section in sections.items()}
        extra = {n: models[f"teacher '{n}' (schemes.teachers)"] for n in s.teachers}
        teachers = {"teacher": models["teacher"], **extra} if extra else models["teacher"]
        try:
            distiller = Distiller(models["student"], teachers, self.terms(), scoring=self.scoring, fold_bn=False)
        except RecipeError:
            raise
        except ConfigError as err:
            raise RecipeError(f"distill.terms: {err}") from err
        batch = Batch(sample, torch.zeros(self._output_shape()[:-1], dtype=torch.long), torch.arange(2))
        distiller.prepare(batch)  # layer names, shapes
        self._check_links(models, batch)

    def _check_links(self, models: dict[str, nn.Module], batch: Batch) -> None:
        """Dry-run the terms on every one-teacher link of the schemes (assistant chain, born-again generations), so
        a term that does not fit a link fails now, naming the link, not after hours of training."""
        s, previous = self.recipe.schemes, ("teacher", models["teacher"])
        links = [(f"assistant {i} (schemes.assistants)", f"ta-{i}") for i in range(1, len(s.assistants) + 1)]
        pairs = []
        for role, name in links:
            pairs.append((f"{previous[0]} -> {name}", models[role], previous[1]))
            previous = (name, models[role])
        if s.assistants:
            pairs.append((f"{previous[0]} -> student-takd", models["student"], previous[1]))
        if s.born_again:
            pairs.append(("teacher -> born-again-1", self.build(self.recipe.teacher).eval(), models["teacher"]))
        for link, student, teacher in pairs:
            try:
                Distiller(student, teacher, self.one_teacher_terms(), fold_bn=False).prepare(batch)
            except DistilError as err:
                raise type(err)(f"the link {link} of the schemes cannot use the recipe's terms: {err}") from err

    def one_teacher_terms(self) -> list[nn.Module]:
        """The recipe's terms for a distillation with one teacher: those reading another teacher by name are left
        out (Hinton's KD + CE if none is left)."""
        return [t for t in self.terms() if _reads_only_the_teacher(t.reads())] or hinton_terms()

    def _checked(self, role: str, section: ModelSection, sample: torch.Tensor) -> nn.Module:
        """The model of `section`, after checking it gives (2, num_classes) logits for a batch of 2."""
        model = self.build(section).eval()
        with torch.no_grad():
            try:
                logits = model(sample)
            except Exception as err:  # a user's model may raise anything
                hint = (" The data are token ids (int64) from a text source: use a language model that takes "
                        "them, such as gpt.") if self.splits.task == "lm" else ""
                raise ModelError(f"the {role} ({section.model}) fails on inputs of shape {list(sample.shape)}: "
                                 f"{type(err).__name__}: {err}.{hint}") from err
        expected = self._output_shape()
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            if self.splits.task == "lm":
                raise ModelError(
                    f"the {role} ({section.model}) gives outputs of shape {shape} for 2 sequences of "
                    f"{expected[1]} tokens; a language model must give (batch, tokens, vocabulary) = "
                    f"{list(expected)} next-token logits. Teacher and student must share the data's vocabulary of "
                    f"{expected[2]} (cross-tokenizer distillation is not supported).")
            raise ModelError(
                f"the {role} ({section.model}) gives outputs of shape {shape} for a batch of 2, but the data has "
                f"{self.splits.num_classes} classes: every model of the run must give (batch, "
                f"{self.splits.num_classes}) logits as one tensor. Build it with num_classes.")
        return model

    def _output_shape(self) -> tuple[int, ...]:
        """The logits a model of this run gives for a dry-run batch of 2: (2, K), or (2, T, V) for tokens."""
        if self.splits.task == "lm":
            return (2, self.splits.input_shape[0], self.splits.num_classes)
        return (2, self.splits.num_classes)

    def fit(self, task, train: Data, section: TrainConfig, name: str, epochs: int | None = None,
            record: bool = True):
        """`fit` with the recipe's seed, device, precision and augmentation; `record`: checkpoints and log."""
        cfg = section if epochs is None else section.model_copy(update={"epochs": epochs})
        if self.on_stage and record:
            self.on_stage(name, cfg.epochs)
        r = self.recipe
        return fit(task, train, self.splits.val, cfg, name=name, seed=r.seed, device=self.device,
                   group=distributed.Group() if self.alone else self.group,
                   precision=r.precision, compile=r.compile, augment=self.augment,
                   checkpoint_dir=self.path("checkpoints") if record else None,
                   log_path=self.path("log.jsonl") if record else None, on_epoch=self.on_epoch if record else None)

    def distill(self, student: nn.Module, teacher: nn.Module | dict[str, nn.Module], section: TrainConfig, name: str,
                record: bool = True) -> Distiller:
        """Distil `student` from `teacher` with the recipe's terms, on the training split plus the transfer set.

        With in-memory data and no augmentation, the teacher's logits are computed once (on the device)
        instead of at every step; with random augmentation the teacher must see each new view, so it runs online.
        With one teacher (an assistant chain's link, a born-again generation, a pruned model's fine-tune), the
        terms that read the recipe's other teachers by name are left out (Hinton's KD + CE if none is left).
        """
        terms = self.one_teacher_terms() if isinstance(teacher, nn.Module) else self.terms()
        distiller = Distiller(student, teacher, terms, scoring=self.scoring,
                              fold_bn=self.recipe.distill.fold_bn).to(self.device)
        train = self.with_teacher_outputs(distiller, self.distill_data(teacher, name), name)
        task = distiller
        if self.recipe.distill.on_policy > 0:
            from distil.onpolicy import OnPolicyDistiller

            d = self.recipe.distill
            task = OnPolicyDistiller(distiller, d.on_policy, d.prompt_tokens, seed=self.recipe.seed)
        self.fit(task, train, section, name, record=record)
        return distiller

    def log_event(self, record: dict) -> None:
        """A line of log.jsonl that is not an epoch (rank 0 writes it)."""
        if self.group.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.path("log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def terms(self) -> list[nn.Module]:
        """The recipe's loss terms; terms that keep a row per sample (CRD) get the distillation set's size."""
        return build_terms(self.recipe.distill.terms, num_samples=len(self.distill_train()))

    def save(self, model: nn.Module, name: str, role: str | ModelSection, **extra) -> None:
        """Write `model` as `<name>.safetensors`, with the spec of its section (a role's, or any ModelSection)."""
        if not self.group.main:
            return  # rank 0 writes the run's files
        section: ModelSection = getattr(self.recipe, role) if isinstance(role, str) else role
        spec = {"model": section.model, "knobs": section.knobs(), "input_shape": list(self.splits.input_shape),
                "num_classes": self.splits.num_classes, "class_names": self.splits.class_names}
        save_model_file(model.cpu(), self.path(f"{name}.safetensors"), spec, **extra)

    def load(self, name: str) -> nn.Module:
        return load_model_file(self.path(f"{name}.safetensors"))[0]

    def sample(self, n: int) -> Split:
        """A seeded random subset of the training split (calibration, importance): never just its first
        rows, which can all be one class when the source lists samples class by class."""
        idx = torch.randperm(len(self.splits.train), generator=torch.Generator().manual_seed(self.recipe.seed))[:n]
        return take(self.splits.train, idx)

    def distill_train(self) -> Data:
        return self._distill_data

    def distill_data(self, teacher: nn.Module | dict[str, nn.Module], name: str) -> Data:
        """What a student is distilled on: the training split (plus the transfer set), or with
        `distill.sequence_kd` the same blocks continued by `teacher` (the recipe's, among several) after their
        prompt (`distil.seqkd`)."""
        d = self.recipe.distill
        if not d.sequence_kd:
            return self.distill_train()
        from distil.seqkd import teacher_text

        teacher = teacher["teacher"] if isinstance(teacher, dict) else teacher

        # every process writes the same (seeded) text: rank 0 stores it, the others read it if it is there and
        # write their own copy if not, rather than wait (generation can take longer than a collective's timeout)
        start, cache = time.perf_counter(), self.teacher_cache(read_only=not self.group.main)
        text = teacher_text(teacher.to(self.device), self.distill_train(), d.prompt_tokens, d.sequence_temperature,
                            seed=self.recipe.seed, cache=cache)
        self.log_event({"stage": name, "event": "sequence_kd", "blocks": len(text), "prompt_tokens": d.prompt_tokens,
                        "temperature": d.sequence_temperature, "seconds": round(time.perf_counter() - start, 2),
                        "cache": cache.last_event if cache is not None else None})
        return text

    def with_teacher_outputs(self, distiller: Distiller, data: Data, name: str) -> Data:
        """`data` with `distiller`'s teacher outputs computed once (through the recipe's teacher cache, rank 0
        first; each cache event logged for stage `name`), when it is in memory and not augmented; else `data`."""
        if not isinstance(data, Split) or self.augment:
            return data
        d, cache = self.recipe.distill, self.teacher_cache()
        with self.cache_turns(cache):  # rank 0 builds the cache entry; the others then read it
            data = distiller.with_teacher_logits(data, cache=cache, top_k=d.top_k, max_feature_mb=d.max_feature_mb)
        for teacher_name, event in distiller.cache_events.items():
            self.log_event({"stage": name, "event": "teacher_cache", "teacher": teacher_name, **event,
                            "folder": str(cache.folder) if cache is not None else None})
        return data

    def teacher_cache(self, read_only: bool = False) -> TeacherCache | None:
        """The recipe's teacher-output cache (`distill.cache`), or None when it is turned off."""
        d = self.recipe.distill
        return TeacherCache(d.cache_dir, d.cache_memory_mb, read_only) if d.cache else None

    @contextlib.contextmanager
    def cache_turns(self, cache: TeacherCache | None) -> Iterator[None]:
        """Within: fill `cache` on rank 0 first; the other processes wait, then read what it wrote."""
        group = distributed.Group() if self.alone else self.group  # export's QAT: rank 0 alone, no barrier
        if cache is not None and not group.main:
            distributed.barrier(group)
        yield
        if cache is not None and group.main:
            distributed.barrier(group)

    @cached_property
    def _distill_data(self) -> Data:
        """The training split plus the transfer set (a concatenation: built once per run)."""
        return self.splits.with_transfer() if self.recipe.distill.use_transfer else self.splits.train


def _reads_only_the_teacher(reads: Reads) -> bool:
    """True for a term that reads no teacher, or the one named "teacher" (the name a single teacher gets)."""
    ensemble_ok = reads.ensemble is None or set(reads.ensemble) <= {"teacher"}
    return reads.teacher in (None, "teacher") and ensemble_ok


def check_batch_sizes(recipe: Recipe, world: int, processes: str) -> None:
    """Under several processes every training batch is shared equally: each batch_size of a stage that trains
    must divide by their number (checked before any training, and by `distil run --nproc` before launching)."""
    trained = lambda section: not (section.checkpoint or section.pretrained)  # noqa: E731 (a teacher may load)
    sections = {**({"teacher.train": recipe.teacher.train} if trained(recipe.teacher) else {}),
                "student.train": recipe.student.train,
                **({"compress.finetune": recipe.compress.finetune} if recipe.compress.enabled else {}),
                **{f"schemes.teachers.{n}.train": m.train for n, m in recipe.schemes.teachers.items() if trained(m)},
                **{f"schemes.assistants[{i}].train": m.train for i, m in enumerate(recipe.schemes.assistants)}}
    for where, section in sections.items():
        if section.batch_size % world:
            raise ConfigError(f"{where}.batch_size {section.batch_size} must be divisible by {processes}: each "
                              f"process takes an equal share of every batch. Use a multiple of {world}.")
