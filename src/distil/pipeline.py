"""The pipeline: runs the stages of `distil.stages` in order into a run folder.

Rerunning into a folder resumes at the first stage whose output is missing (and inside a stage,
from its last checkpoint). A changed recipe redoes the first stage the change affects and every
later one; `force=True` starts over.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from distil import distributed
from distil.build import augment_and_normalize
from distil.checkpoint import atomic_write
from distil.data import load_splits
from distil.device import check_precision, resolve_device
from distil.errors import DistilError
from distil.recipe import Recipe, dump_recipe
from distil.stages import STAGES, Run

log = logging.getLogger(__name__)


def stage_outputs(recipe: Recipe) -> dict[str, str]:
    """Each enabled stage and the file whose presence means it is done (the last file it writes)."""
    return {name: stage.outputs(recipe)[-1] for name, stage in STAGES.items() if stage.enabled(recipe)}


def first_changed_stage(recipe: Recipe, run_dir: Path) -> str | None:
    """The first stage whose inputs differ between `recipe` and the folder's recipe.yaml (None: same or none)."""
    saved = Path(run_dir) / "recipe.yaml"
    if not saved.exists():
        return None
    old, new = yaml.safe_load(saved.read_text()) or {}, recipe.model_dump(mode="json")
    try:  # fields added since the folder was written compare at their defaults
        old = Recipe.model_validate(old).model_dump(mode="json")
    except ValueError:
        pass
    changed = [name for name, stage in STAGES.items() if any(_at(old, k) != _at(new, k) for k in stage.depends)]
    return changed[0] if changed else None


def _at(tree: dict, dotted: str):
    """The value at a dotted path of a recipe mapping ("schemes.ema"), None where a part is missing."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def prepare_run_dir(recipe: Recipe, run_dir: Path, force: bool) -> None:
    """Create the folder and write the resolved recipe. If the folder holds a run of a different
    recipe, the outputs of the first stage the change affects and of every later stage are removed
    (a changed `export` section redoes export and report only); `force` removes everything."""
    run_dir = Path(run_dir)
    saved = run_dir / "recipe.yaml"
    stages = list(STAGES)
    first = None
    if force:
        first = "teacher"
    else:
        first = first_changed_stage(recipe, run_dir)
        if first:
            log.info("recipe changed: redoing stages from %s", first)
    if first and run_dir.exists():
        recipes = [recipe]
        try:  # the old recipe names the old compress/export files; one from another distil version may not load
            recipes.append(Recipe.model_validate(yaml.safe_load(saved.read_text())))
        except (OSError, ValueError, yaml.YAMLError):
            pass
        for stage in stages[stages.index(first):]:
            _remove_stage_outputs(run_dir, stage, recipes)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = dump_recipe(recipe)
    atomic_write(saved, lambda tmp: tmp.write_text(resolved))


def _remove_stage_outputs(run_dir: Path, stage: str, recipes: list[Recipe]) -> None:
    """Remove a stage's files and checkpoints, as named by the new and the old recipe."""
    for r in recipes:
        record = STAGES[stage]
        files = record.outputs(r) + [f"checkpoints/{n}-{kind}.safetensors" for n in record.fit_names(r)
                                     for kind in ("last", "best")]
        for file in files:
            if file.endswith("/"):
                shutil.rmtree(run_dir / file, ignore_errors=True)
            for path in run_dir.glob(file.rstrip("/")) if "*" in file else [run_dir / file]:
                if path.is_file():
                    path.unlink()


def open_run(recipe: Recipe, run_dir: Path, force: bool = False, on_epoch=None, on_stage=None,
             only: str | None = None) -> Run:
    """Load the data and check the models first: a recipe that cannot run never touches the folder."""
    check_precision(recipe.precision, resolve_device(recipe.device))  # before any data is read
    augment, normalize = augment_and_normalize(recipe.data.augment)
    splits = load_splits(recipe.data.source, recipe.data.args, recipe.seed, recipe.data.val_fraction,
                         recipe.data.test_fraction, normalize)
    run = Run(recipe, Path(run_dir), splits, on_epoch, on_stage, augment or None)
    run.check_models()
    run.check_batch_sizes()
    if only is not None:
        first = first_changed_stage(recipe, Path(run_dir))
        if first is not None and list(STAGES).index(first) < list(STAGES).index(only):
            raise DistilError(f"the recipe differs from {Path(run_dir) / 'recipe.yaml'} in a section that stage "
                              f"'{first}' depends on: `distil {only}` runs one stage only. Use `distil run` to redo "
                              f"'{first}' and what follows.")
    if run.group.main:
        prepare_run_dir(recipe, run_dir, force)
    distributed.barrier(run.group)
    return run


def run_pipeline(recipe: Recipe, run_dir: Path, force: bool = False,
                 on_epoch: Callable[[dict], None] | None = None,
                 on_stage: Callable[[str, int], None] | None = None, only: str | None = None) -> list[str]:
    """Run every stage from the first whose output is missing (or just `only`); return the stages run."""
    outputs = stage_outputs(recipe)
    if only is not None and only not in outputs:
        raise DistilError(f"stage '{only}' is not enabled by this recipe: set {only}.enabled: true "
                          f"(or pass --set {only}.enabled=true)")
    if only is not None:  # checked before anything is written
        before = list(outputs)[: list(outputs).index(only)]
        absent = [name for name in before if not (Path(run_dir) / outputs[name]).exists()]
        if absent:
            raise DistilError(f"stage '{only}' needs the output of stage '{absent[0]}' ({outputs[absent[0]]}) in "
                              f"{run_dir}: run `distil run` first")
    run = open_run(recipe, run_dir, force, on_epoch, on_stage, only)
    if only is not None:
        todo = [only]
    else:
        missing = [name for name, file in outputs.items() if not run.path(file).exists()]
        todo = list(outputs)[list(outputs).index(missing[0]):] if missing else []
    for name in todo:
        log.info("stage %s", name)
        if name in ALONE:  # no training across processes: rank 0 alone (export's QAT fine-tune included)
            if not run.group.main:
                break  # the other processes are done: nothing they could wait for has a time limit
            run.alone = True
        STAGES[name].run(run)
        if name not in ALONE:
            distributed.barrier(run.group)  # every process sees this stage's files before the next one reads them
    return todo


ALONE = ("export", "report")  # the last stages; rank 0 runs them alone under several processes


def load_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        raise DistilError(f"{path} not found: run `distil run` first")
    return json.loads(path.read_text())
