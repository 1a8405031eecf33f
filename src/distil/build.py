"""Builders: a validated recipe -> the objects it names (loss terms, augmentation), and the checks of the
names a recipe refers to (sources, models, losses, run models) that the schema alone cannot make.

    recipe = load_recipe("recipes/digits.yaml")      # schema + references
    terms = build_terms(recipe.distill.terms)         # -> [KD(T=4.0, weight=0.9), CE(weight=0.1), FitNet(...)]
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distil.binding import bind_kwargs, import_object
from distil.data import resolve_source as resolve_data_source
from distil.errors import ConfigError, DataError, RecipeError, did_you_mean
from distil.losses import LOSSES
from distil.models import MODELS, resolve_factory
from distil.recipe import Recipe, parse_recipe


def load_recipe(source: str | Path | dict, where: str = "recipe") -> Recipe:
    """Read a YAML file (or a dict from `where`), validate every section, and check the names it refers to."""
    recipe = parse_recipe(source, where)
    check_references(recipe)
    return recipe


def check_references(recipe: Recipe) -> None:
    """Check what the schema cannot: source, model, loss and augmentation names and their options."""
    bind_kwargs(resolve_source(recipe.data.source), recipe.data.args, "data.args")
    s = recipe.schemes
    sections = {"teacher": recipe.teacher, "student": recipe.student,
                **{f"schemes.teachers.{n}": m for n, m in s.teachers.items()},
                **{f"schemes.assistants[{i}]": m for i, m in enumerate(s.assistants)},
                **{f"schemes.mutual[{i}]": m for i, m in enumerate(s.mutual)}}
    for where, section in sections.items():
        if section.model in MODELS:
            bind_kwargs(resolve_factory(section.model), section.knobs(), f"{where} (model '{section.model}')")
        check_pretrained(section, where)
        check_read_fields(section, where)
    for name in s.teachers:
        if name in ("student", "teacher") or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise RecipeError(f"schemes.teachers: '{name}' cannot name a teacher: use letters, digits, '_' and '-', "
                              "and neither 'student' (the model being trained) nor 'teacher' (the recipe's teacher)")
    from distil.scheme_stages import scheme_models  # the run's models (a lazy import: stages build on this module)

    names = ["teacher", "baseline", "student", *scheme_models(recipe)]
    if recipe.compress.enabled:
        names += [f"{recipe.compress.source}-pruned", f"{recipe.compress.source}-pruned-labels"]
    for name in recipe.export.quantize if recipe.export.enabled else []:
        if name not in names:
            raise RecipeError(f"export.quantize: this run has no model '{name}' (it has {names})."
                              + did_you_mean(name, names))
    if recipe.export.enabled and recipe.export.quantize and recipe.export.quantization != "dynamic" \
            and recipe.export.calibration_samples == 0:
        raise RecipeError("export.calibration_samples is 0: static quantization needs a calibration set. "
                          "Set it to e.g. 512, or export.quantization: dynamic.")
    build_terms(recipe.distill.terms)
    augment_and_normalize(recipe.data.augment)


def check_read_fields(section, where: str) -> None:
    """Fields that only some models' sections read, refused where they would be ignored: `checkpoint` replaces a
    teacher's training (a student, assistant or peer is trained by the run), and a mutual peer trains in the
    student's loop, under `student.train`."""
    if section.checkpoint and not _is_teacher(where):
        raise RecipeError(f"{where}.checkpoint: only a teacher loads weights instead of training; {where} is "
                          "trained by this run, and the weights would be ignored. Remove checkpoint (a model built "
                          "by an hf: or your own factory starts from the weights that factory loads).")
    # a written-out recipe holds every default: only a peer's own settings would be ignored
    if where.startswith("schemes.mutual[") and section.train != type(section.train)():
        raise RecipeError(f"{where}.train: the peers learn together with a fresh student, in one loop under "
                          "student.train; remove this section and set the schedule in student.train.")


def _is_teacher(where: str) -> bool:
    return where == "teacher" or where.startswith("schemes.teachers.")


def check_pretrained(section, where: str) -> None:
    """`pretrained: true` keeps a teacher as its factory builds it: only for teachers, only for models whose
    factory loads weights (not distil's zoo, whose models start random), and not with a checkpoint as well."""
    if not section.pretrained:
        return
    if not _is_teacher(where):
        raise RecipeError(f"{where}.pretrained: only a teacher can skip training. A student or peer built by an "
                          "hf: (or your own) factory already starts from the weights it loads; remove pretrained.")
    if section.checkpoint:
        raise RecipeError(f"{where}: give pretrained: true or a checkpoint, not both (the checkpoint's weights would "
                          "replace the pretrained ones).")
    if section.model in MODELS:
        raise RecipeError(f"{where}.pretrained: '{section.model}' is a distil zoo model, built with random weights; "
                          "train it (remove pretrained), load a checkpoint, or name a model whose factory loads "
                          "weights (hf:/path/to/model, or package.module:factory).")


def build_terms(specs: list[dict[str, Any]], num_samples: int | None = None) -> list:
    """Recipe terms -> loss modules, e.g. {kind: kd, weight: 0.9, T: 4} -> KD(T=4.0, weight=0.9).

    A term whose constructor takes `num_samples` (CRD's memory bank) gets the training set's size when the recipe
    does not set it; before the data is loaded (`num_samples=None`) such a term's options are checked but the term
    is not built (its bank would need the size).
    """
    terms = []
    for i, spec in enumerate(specs):
        kind = spec.get("kind")
        cls, where = resolve_term(str(kind), f"distill.terms[{i}].kind"), f"distill.terms[{i}] ({kind})"
        options = {k: v for k, v in spec.items() if k != "kind"}
        if "num_samples" in inspect.signature(cls).parameters and "num_samples" not in options:
            if num_samples is None:
                bind_kwargs(cls, {**options, "num_samples": 1}, where)
                continue
            options["num_samples"] = num_samples
        try:
            terms.append(cls(**bind_kwargs(cls, options, where)))
        except RecipeError:
            raise
        except ConfigError as err:
            raise RecipeError(f"{where}: {err}") from None
    names = [t.name for t in terms]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RecipeError(f"distill.terms[{i}] ({specs[i]['kind']}) repeats the term '{name}' of "
                              f"distill.terms[{names.index(name)}]: each term is logged and summed by its name. "
                              "Merge them (add the weights) or make them read different teachers or layers.")
    return terms


def resolve_term(kind: str, where: str) -> type:
    """A loss term class: a name of `LOSSES`, or the user's own as 'package.module:Class'."""
    if kind in LOSSES:
        return LOSSES[kind]
    if ":" in kind:
        cls = import_object(kind, where)
        if not callable(cls):
            raise RecipeError(f"{where}: '{kind}' is not a class (a loss term is an nn.Module class)")
        return cls
    raise RecipeError(f"{where}: unknown loss '{kind}'." + did_you_mean(kind, LOSSES)
                      + " Or give your own as 'package.module:Class'.")


def resolve_source(source: str) -> Callable:
    """A data source function: a name of `SOURCES`, or the user's own as 'package.module:function'."""
    try:
        return resolve_data_source(source)
    except DataError as err:
        raise RecipeError(f"data.source: {err}") from None


def augment_and_normalize(specs: list[dict[str, Any]]):
    """`data.augment` -> (train-time `Augment` of the random ops, normalisation (mean, std) or None)."""
    from distil.augment import build_augment as build

    random_ops = [s for s in specs if s.get("kind") != "normalize"]
    normalize = [s for s in specs if s.get("kind") == "normalize"]
    if len(normalize) > 1:
        raise RecipeError("data.augment: give at most one normalize entry")
    augment = build(random_ops)
    stats = None
    if normalize:
        op = build(normalize).ops[0]
        stats = ([float(v) for v in op.mean], [float(v) for v in op.std])
    return augment, stats
