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

from distil.checkpoint import atomic_write
from distil.data import load_splits
from distil.errors import DistilError
from distil.recipe import Recipe, dump_recipe
from distil.stages import STAGES, Run

log = logging.getLogger(__name__)


def stage_outputs(recipe: Recipe) -> dict[str, str]:
    """Each enabled stage and the file whose presence means it is done."""
    outputs = {"teacher": "teacher.safetensors", "baseline": "baseline.safetensors", "distill": "student.safetensors"}
    if recipe.compress.enabled:
        outputs["compress"] = f"{recipe.compress.source}-pruned" + (
            "-labels.safetensors" if recipe.compress.compare_labels_only else ".safetensors")
    if recipe.export.enabled:
        outputs["export"] = "export.json"
    outputs["report"] = "metrics.json"
    return outputs


# which stage a change in each recipe section invalidates first
SECTION_STAGE = {"seed": "teacher", "data": "teacher", "teacher": "teacher", "student": "baseline",
                 "distill": "baseline", "compress": "compress", "export": "export", "report": "report"}


def fit_names(recipe: Recipe, stage: str) -> list[str]:
    """The `fit` run names (checkpoint prefixes) of a stage."""
    if stage == "compress":
        return [f"{recipe.compress.source}-pruned", f"{recipe.compress.source}-pruned-labels"]
    if stage == "export":
        return [f"{name}-qat" for name in recipe.export.quantize]
    return [stage] if stage in ("teacher", "baseline", "distill") else []


def first_changed_stage(recipe: Recipe, run_dir: Path) -> str | None:
    """The first stage whose inputs differ between `recipe` and the folder's recipe.yaml (None: same or none)."""
    saved = Path(run_dir) / "recipe.yaml"
    if not saved.exists():
        return None
    old, new = yaml.safe_load(saved.read_text()) or {}, recipe.model_dump(mode="json")
    changed = [SECTION_STAGE[k] for k in SECTION_STAGE if old.get(k) != new.get(k)]
    return min(changed, key=list(STAGES).index) if changed else None


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
    files = {"distill": ["student.safetensors", "student.connectors.safetensors"], "export": ["export.json"],
             "report": ["metrics.json", "report.md", "report.html"]}.get(stage, [f"{stage}.safetensors"])
    for r in recipes:
        names = fit_names(r, stage)
        files += [f"checkpoints/{n}-{kind}.safetensors" for n in names for kind in ("last", "best")]
        if stage == "compress":
            files += [f"{n}.safetensors" for n in names]
    if stage == "export":
        files += [p.name for p in run_dir.glob("*.onnx")]
    for file in files:
        (run_dir / file).unlink(missing_ok=True)
    if stage == "report":
        shutil.rmtree(run_dir / "plots", ignore_errors=True)
    if stage == "teacher":
        (run_dir / "log.jsonl").unlink(missing_ok=True)


def open_run(recipe: Recipe, run_dir: Path, force: bool = False, on_epoch=None, on_stage=None,
             only: str | None = None) -> Run:
    """Load the data and check the models first: a recipe that cannot run never touches the folder."""
    splits = load_splits(recipe.data.source, recipe.data.args, recipe.seed, recipe.data.val_fraction,
                         recipe.data.test_fraction)
    run = Run(recipe, Path(run_dir), splits, on_epoch, on_stage)
    run.check_models()
    if only is not None:
        first = first_changed_stage(recipe, Path(run_dir))
        if first is not None and list(STAGES).index(first) < list(STAGES).index(only):
            raise DistilError(f"the recipe differs from {Path(run_dir) / 'recipe.yaml'} in a section that stage "
                              f"'{first}' depends on: `distil {only}` runs one stage only. Use `distil run` to redo "
                              f"'{first}' and what follows.")
    prepare_run_dir(recipe, run_dir, force)
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
        STAGES[name](run)
    return todo


def load_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        raise DistilError(f"{path} not found: run `distil run` first")
    return json.loads(path.read_text())
