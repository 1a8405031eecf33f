"""`distil sweep`: an Optuna search over the KD temperature T, alpha and the weights of the recipe's other terms.

    teacher   : the pipeline's teacher stage, into the sweep folder: trained once, loaded by every later call
    logits    : the teacher's logits on the distillation set, computed once (through the teacher cache) and shared
    reference : the student distilled with the recipe's own terms and the trials' budget, once
    trials    : TPE (seeded) proposes the values; each trial distils a fresh student (same seed, same budget) and
                reports its validation accuracy every epoch to the median pruner, which stops trials below the median
    outputs   : sweep.db (the study: rerunning the command runs only the missing trials), sweep.md, sweep.json,
                plots/history.png, plots/importance.png, best.yaml (a full recipe that `distil run` takes)

Trials are selected by the task's validation metric (top-1 accuracy; bits per byte for a language model, lower
being better); the test split is read only to report the best trial's and the reference's. One process per sweep
folder: a trial still marked running when a call starts was interrupted.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from distil.build import build_terms, resolve_term
from distil.data import Split
from distil.distiller import Distiller
from distil.errors import DistilError, NonFiniteLossError, RecipeError
from distil.evaluate import split_score
from distil.pipeline import open_run
from distil.recipe import Recipe
from distil.run import Run
from distil.stages import STAGES

log = logging.getLogger(__name__)
T_RANGE = (1.0, 20.0)  # log-uniform; Hinton et al. (2015) report temperatures from 1 to 20
ALPHA_RANGE = (0.1, 1.0)  # uniform; the weight of the soft term, 1 - alpha on the hard labels
WEIGHT_SPAN = 10.0  # every other term's weight: log-uniform over [w / 10, 10 w] around the recipe's w


@dataclass(frozen=True)
class Param:
    """One searched value: its range, the recipe's own value, and the term (index) it sets."""

    name: str  # "T", "alpha", or "<kind>_weight"
    low: float
    high: float
    log: bool
    own: float
    term: int
    ce: int | None = None  # alpha only: the ce term that gets 1 - alpha (len(terms): added)


def import_optuna():
    try:
        import optuna
    except ImportError as err:
        raise DistilError("`distil sweep` needs Optuna, an optional dependency: pip install 'distil[sweep]'") from err
    return optuna


def search_space(terms: list[dict]) -> list[Param]:
    """What the sweep searches for a recipe's `distill.terms`: the first kd term's T and weight (alpha; the first ce
    term gets 1 - alpha, and one is added where there is none), and the weight of every other term."""
    kinds = [str(t.get("kind")) for t in terms]
    if "kd" not in kinds:
        raise RecipeError(f"distill.terms: the sweep tunes the temperature T and the weight alpha of a `kd` term, and "
                          f"this recipe has none (its terms: {', '.join(kinds)}). Add one, e.g. "
                          "{kind: kd, T: 4, weight: 0.9} with {kind: ce, weight: 0.1}.")
    k = kinds.index("kd")
    ce = kinds.index("ce") if "ce" in kinds else len(terms)
    T, kd_weight = float(terms[k].get("T", 4.0)), float(terms[k].get("weight", 1.0))
    ce_weight = float(terms[ce].get("weight", 1.0)) if ce < len(terms) else 0.0
    alpha = kd_weight / (kd_weight + ce_weight) if kd_weight + ce_weight > 0 else 1.0
    space = [Param("T", min(T_RANGE[0], T), max(T_RANGE[1], T), True, T, k),
             Param("alpha", min(ALPHA_RANGE[0], alpha), ALPHA_RANGE[1], False, alpha, k, ce)]
    for i, term in enumerate(terms):
        if i in (k, ce):
            continue
        default = inspect.signature(resolve_term(kinds[i], f"distill.terms[{i}].kind")).parameters.get("weight")
        if default is None:
            continue  # a user's term without a weight
        weight = float(term.get("weight", default.default))
        low, high = (weight / WEIGHT_SPAN, weight * WEIGHT_SPAN) if weight > 0 else (1e-3, 1.0)
        name = f"{kinds[i].split(':')[-1].lower()}_weight"
        name = f"{name}_{i}" if kinds.count(kinds[i]) > 1 else name
        space.append(Param(name, low, high, True, max(weight, low), i))
    return space


def terms_for(terms: list[dict], space: list[Param], values: dict[str, float]) -> list[dict]:
    """The recipe's terms with the searched values put in: T and alpha on the kd term, 1 - alpha on the ce term."""
    out = copy.deepcopy(terms)
    for p in space:
        if p.name == "T":
            out[p.term]["T"] = values["T"]
        elif p.name == "alpha":
            out[p.term]["weight"] = values["alpha"]
            if p.ce == len(out):
                out.append({"kind": "ce"})
            out[p.ce]["weight"] = 1.0 - values["alpha"]
        else:
            out[p.term]["weight"] = values[p.name]
    return out


def own_values(space: list[Param]) -> dict[str, float]:
    return {p.name: p.own for p in space}


class Sweep:
    """One sweep folder: the run (teacher, data), the study, and the shared teacher logits (computed when needed)."""

    def __init__(self, recipe: Recipe, run_dir: Path, trials: int, say: Callable[[str], None] = log.info,
                 on_epoch: Callable[[dict], None] | None = None,
                 on_stage: Callable[[str, int], None] | None = None, command: str = "distil sweep") -> None:
        self.optuna = import_optuna()
        if trials < 1:
            raise DistilError(f"--trials {trials}: run at least 1 trial")
        self.recipe, self.run_dir, self.trials, self.say, self.command = recipe, Path(run_dir), trials, say, command
        self.space = search_space(recipe.distill.terms)
        if recipe.data.val_fraction == 0:
            raise RecipeError("data.val_fraction is 0: the sweep ranks trials on the validation split, never on test. "
                              "Hold out a validation split, e.g. data.val_fraction: 0.1.")
        check_same_recipe(recipe, self.run_dir)
        self.run: Run = open_run(recipe, self.run_dir, on_epoch=on_epoch, on_stage=on_stage)
        self.scoring = self.run.scoring  # the task's metric: "acc" (higher is better) or "bpb" (lower)
        self.val_key, self.test_key = f"val_{self.scoring.metric}", f"test_{self.scoring.metric}"
        self._train: Split | None = None
        self.teacher_status = self.train_teacher()
        self.run.on_stage = None  # the trials say one line each
        self.teachers = self.run.teachers()
        self.study = self.open_study()

    def train_teacher(self) -> str:
        """The pipeline's teacher stage(s), unless their files exist: 'trained' or 'reused' (logged)."""
        run, stages = self.run, [STAGES[n] for n in ("teacher", "teachers") if STAGES[n].enabled(self.recipe)]
        done = all(run.path(stage.outputs(self.recipe)[-1]).exists() for stage in stages)
        if done:
            self.say(f"teacher: {run.path('teacher.safetensors')} exists (trained by an earlier call): loaded, "
                     "not trained again")
        else:
            for stage in stages:
                stage.run(run)
            t = self.recipe.teacher
            how = f"loaded from {t.checkpoint}" if t.checkpoint else "kept as loaded (pretrained)" if t.pretrained \
                else f"trained ({t.train.epochs} epoch{'s' if t.train.epochs != 1 else ''})"
            self.say(f"teacher: {how} -> {run.path('teacher.safetensors')}, once for every trial")
        status = "reused" if done else "trained"
        run.log_event({"stage": "sweep", "event": "sweep_teacher", "status": status, "file": "teacher.safetensors"})
        return status

    def train_data(self) -> Split:
        """The distillation set with the teacher's logits (and the features that feature terms read), computed
        once for every trial (through the teacher cache when the recipe keeps it)."""
        if self._train is None:
            run = self.run
            probe = Distiller(run.model("student"), self.teachers, run.terms()).to(run.device)
            data = run.distill_data(self.teachers, "sweep")  # with sequence_kd: the teacher's text
            data = run.with_teacher_outputs(probe, data, "sweep")
            if isinstance(data, Split) and data.teacher_logits and "teacher" in data.teacher_logits:
                cached = f" (teacher cache: {probe.cache_events['teacher']['status']})" \
                    if "teacher" in probe.cache_events else ""
                self.say(f"teacher logits on the {len(data):,} distillation samples computed once{cached}, shared "
                         "by every trial")
            if not (isinstance(data, Split) and data.teacher_logits):
                self.say("the teacher runs at every step of every trial: the data is augmented or not in memory, "
                         "or its outputs are too large to keep (see log.jsonl)")
            self._train = data
        return self._train

    def open_study(self):
        optuna, epochs = self.optuna, self.recipe.student.train.epochs
        sampler = optuna.samplers.TPESampler(seed=self.recipe.seed, n_startup_trials=max(2, min(10, self.trials // 3)))
        # the first trials are never pruned; a trial is judged after a third of its epochs
        pruner = optuna.pruners.MedianPruner(n_startup_trials=max(2, self.trials // 4), n_warmup_steps=epochs // 3)
        self.storage = optuna.storages.RDBStorage(f"sqlite:///{self.run_dir.resolve() / 'sweep.db'}")
        direction = "maximize" if self.scoring.higher_is_better else "minimize"
        study = optuna.create_study(storage=self.storage, study_name="sweep", direction=direction, sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
        if not study.trials:  # the search starts from the recipe's own settings
            study.enqueue_trial(own_values(self.space), user_attrs={"start": "the recipe's own settings"})
        return study

    def distil(self, terms: list[dict], name: str, on_epoch: Callable[[dict], None] | None) -> tuple[float, float]:
        """Distil a fresh student with `terms` and the recipe's student settings; (the validation metric of its best
        epoch, the test metric of those weights)."""
        run = self.run
        train = self.train_data()
        student = run.model("student")
        distiller = Distiller(student, self.teachers, build_terms(terms, num_samples=len(train)),
                              scoring=self.scoring, fold_bn=self.recipe.distill.fold_bn).to(run.device)
        run.on_epoch = on_epoch
        try:
            result = run.fit(distiller, train, self.recipe.student.train, name)
        finally:
            for kind in ("last", "best"):  # a stopped trial is rerun from the start, as a new trial
                run.path(f"checkpoints/{name}-{kind}.safetensors").unlink(missing_ok=True)
        return result.history[result.best_epoch][self.val_key], split_score(student.cpu(), run.test, self.scoring)

    def reference(self) -> dict:
        """The recipe's own terms with the trials' budget, trained once (kept in the study)."""
        if "reference" not in self.study.user_attrs:
            val, test = self.distil(self.recipe.distill.terms, "sweep-recipe", None)
            self.study.set_user_attr("reference", {self.val_key: val, self.test_key: test})
            self.say(f"the recipe's own settings ({_values(own_values(self.space))}): val {val:.3f}")
        return self.study.user_attrs["reference"]

    def objective(self, trial) -> float:
        values = {p.name: trial.suggest_float(p.name, p.low, p.high, log=p.log) for p in self.space}

        def report(record: dict) -> None:
            trial.report(record[self.val_key], record["epoch"])
            if record["epoch"] < self.recipe.student.train.epochs and trial.should_prune():
                raise self.optuna.TrialPruned(f"epoch {record['epoch']}: val {record[self.val_key]:.3f}, worse than "
                                              "the median of the earlier trials")

        try:
            val, test = self.distil(terms_for(self.recipe.distill.terms, self.space, values), f"trial-{trial.number}",
                                    report)
        except self.optuna.TrialPruned as pruned:
            self.say(f"trial {trial.number}: {_values(values)} -> pruned at {pruned}")
            raise
        except NonFiniteLossError as err:  # these values diverge: the trial fails, the sweep goes on
            self.say(f"trial {trial.number}: {_values(values)} -> failed: {err}")
            raise
        except KeyboardInterrupt:  # Optuna records the trial as failed: the next call runs its values again
            trial.set_user_attr("interrupted", True)
            self.study.enqueue_trial(values, user_attrs={"rerun of": trial.number})
            raise
        trial.set_user_attr(self.test_key, test)  # read for the best trial only; selection is by validation
        self.say(f"trial {trial.number}: {_values(values)} -> val {val:.3f}")
        return val

    def finished(self) -> list:
        """Trials that ran to an end (complete, pruned or failed), not those interrupted by a stopped call."""
        states = self.optuna.trial.TrialState
        return [t for t in self.study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.FAIL))
                if not t.user_attrs.get("interrupted")]

    def requeue_interrupted(self) -> None:
        """A trial still marked running was stopped with its call: mark it failed and queue its values again."""
        states = self.optuna.trial.TrialState
        for trial in self.study.get_trials(deepcopy=False, states=(states.RUNNING,)):
            self.storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            self.storage.set_trial_state_values(trial._trial_id, states.FAIL)
            if trial.params:
                self.study.enqueue_trial(trial.params, user_attrs={"rerun of": trial.number})
            self.say(f"trial {trial.number} was interrupted: its values are queued again")

    def run_trials(self) -> dict:
        self.requeue_interrupted()
        reference = self.reference()
        todo = self.trials - len(self.finished())
        if todo <= 0:
            self.say(f"{len(self.finished())} trials exist already in {self.run_dir / 'sweep.db'}: nothing to run "
                     "(a larger --trials adds trials)")
        else:
            self.say(f"running {todo} of {self.trials} trials")
            self.study.optimize(self.objective, n_trials=todo, catch=(NonFiniteLossError,))
        from distil.sweep_report import write_outputs

        return write_outputs(self, reference)


def check_same_recipe(recipe: Recipe, run_dir: Path) -> None:
    """A folder holding another recipe's sweep (or run) is refused: its trials and teacher would not compare."""
    saved = Path(run_dir) / "recipe.yaml"
    if not saved.exists():
        return
    try:
        old = Recipe.model_validate(yaml.safe_load(saved.read_text())).model_dump(mode="json")
    except (ValueError, yaml.YAMLError):
        old = {}
    new = recipe.model_dump(mode="json")
    changed = [key for key in new if old.get(key) != new[key]]
    if changed:
        raise DistilError(f"{run_dir} holds a sweep or run of another recipe (it differs in {', '.join(changed)}; "
                          "--epochs changes student): its teacher and trials would not compare. Pass another "
                          "--run-dir, or remove the folder to start over.")


def _values(values: dict[str, float]) -> str:
    return " ".join(f"{k}={_g(v)}" for k, v in values.items())


def _g(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def run_sweep(recipe: Recipe, run_dir: Path, trials: int, say: Callable[[str], None] = log.info,
              on_epoch: Callable[[dict], None] | None = None,
              on_stage: Callable[[str, int], None] | None = None, command: str = "distil sweep") -> dict:
    """Run (or resume) a sweep into `run_dir`; return the summary written to sweep.json."""
    optuna = import_optuna()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # its matplotlib plots
        return Sweep(recipe, run_dir, trials, say, on_epoch, on_stage, command).run_trials()

