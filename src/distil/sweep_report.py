"""What a sweep writes: best.yaml (the recipe with the best trial's values), sweep.md (the table of trials, the best
trial against the recipe's own settings, the plots), sweep.json (the same as data) and Optuna's plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from distil.checkpoint import atomic_write
from distil.errors import DistilError
from distil.recipe import dump_recipe
from distil.report import _save
from distil.sweep import Param, Sweep, own_values, terms_for

WORDS = {"acc": "accuracy", "bpb": "bits per byte"}  # how the text names each task's metric


def write_outputs(sweep: Sweep, reference: dict) -> dict:
    """Write best.yaml, plots/, sweep.md and sweep.json into the sweep folder; return sweep.json's content.
    Values are the task's metric (`metric`): keys `val_acc`/`test_acc`, or `val_bpb`/`test_bpb` for a language
    model."""
    optuna, study, run_dir = sweep.optuna, sweep.study, sweep.run_dir
    m, val, test = sweep.scoring.metric, sweep.val_key, sweep.test_key
    states = optuna.trial.TrialState
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    if not any(t.state == states.COMPLETE for t in trials):
        counts = ", ".join(f"{s.name.lower()} {sum(t.state == s for t in trials)}" for s in states)
        raise DistilError(f"no trial of {run_dir / 'sweep.db'} completed ({counts}): nothing to choose from. Run more "
                          "trials (a larger --trials), or look at log.jsonl for why they stopped.")
    best = study.best_trial
    best_terms = terms_for(sweep.recipe.distill.terms, sweep.space, best.params)
    summary = {
        "command": sweep.command, "teacher": sweep.teacher_status, "metric": m,
        "higher_is_better": sweep.scoring.higher_is_better,
        "budget": {"epochs": sweep.recipe.student.train.epochs, "batch_size": sweep.recipe.student.train.batch_size,
                   "distillation_samples": len(sweep.run.distill_train())},
        "space": [asdict(p) for p in sweep.space],
        "best": {"trial": best.number, "params": best.params, val: best.value,
                 test: best.user_attrs.get(test), "terms": best_terms},
        "reference": {"params": own_values(sweep.space), **reference, "terms": sweep.recipe.distill.terms},
        "trials": [{"number": t.number, "state": "interrupted" if t.user_attrs.get("interrupted") else
                    t.state.name.lower(), "params": t.params, val: t.value,
                    f"last_{val}": _last(t), "epochs": max(t.intermediate_values, default=None),
                    "seconds": t.duration.total_seconds() if t.duration else None} for t in trials],
    }
    plots, summary["importance"] = write_plots(sweep, run_dir / "plots")
    best_recipe = sweep.recipe.model_copy(update={
        "name": f"{sweep.recipe.name}-best", "distill": sweep.recipe.distill.model_copy(update={"terms": best_terms})})
    header = (f"# The best trial ({best.number}) of `{sweep.command}` (selected by validation {WORDS.get(m, m)}): "
              f"validation {best.value:.3f}, test {summary['best'][test]:.3f};\n# the recipe's own settings: "
              f"validation {reference[val]:.3f}, test {reference[test]:.3f}. Run it with `distil run best.yaml`.\n")
    text = header + dump_recipe(best_recipe)
    atomic_write(run_dir / "best.yaml", lambda tmp: tmp.write_text(text))
    md = markdown(sweep, summary, trials, plots)
    atomic_write(run_dir / "sweep.md", lambda tmp: tmp.write_text(md))
    payload = json.dumps(summary, indent=2)
    atomic_write(run_dir / "sweep.json", lambda tmp: tmp.write_text(payload))
    return summary


def _last(trial) -> float | None:
    """The last validation metric a trial reported (where a pruned trial stopped)."""
    return trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None


def write_plots(sweep: Sweep, folder: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """Optuna's optimisation history and parameter importance (fANOVA, seeded) as PNG; the importances."""
    from optuna.visualization import matplotlib as vis

    optuna, study = sweep.optuna, sweep.study
    target = f"validation {WORDS.get(sweep.scoring.metric, sweep.scoring.metric)}"
    plots = {"history": _save(vis.plot_optimization_history(study, target_name=target).figure,
                              folder / "history.png")}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return plots, {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=sweep.recipe.seed)
    importance = optuna.importance.get_param_importances(study, evaluator=evaluator)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=sweep.recipe.seed)
    axes = vis.plot_param_importances(study, evaluator=evaluator, target_name=target)
    plots["importance"] = _save(axes.figure, folder / "importance.png")
    return plots, dict(importance)


def markdown(sweep: Sweep, summary: dict, trials: list, plots: dict[str, Path]) -> str:
    best, ref, budget = summary["best"], summary["reference"], summary["budget"]
    m = summary["metric"]
    val, test, words = f"val_{m}", f"test_{m}", WORDS.get(m, m)
    counts = {s: sum(t["state"] == s for t in summary["trials"]) for s in ("complete", "pruned", "fail", "interrupted")}
    better = "higher" if summary["higher_is_better"] else "lower"
    diff = (f"{(best[test] - ref[test]) * 100:+.1f} points" if m == "acc" else f"{best[test] - ref[test]:+.3f}") \
        + f" against the recipe's own ({better} is better)"
    stopped = f", {counts['interrupted']} interrupted and run again" if counts["interrupted"] else ""
    lines = [f"# distil sweep: {sweep.recipe.name}", "",
             f"`{summary['command']}`: {len(trials)} trials ({counts['complete']} complete, {counts['pruned']} "
             f"pruned by the median pruner, {counts['fail']} failed{stopped}), selected by validation {words}.", "",
             f"**Best: trial {best['trial']}** ({_params(best['params'])}): validation {best[val]:.3f}, test "
             f"{best[test]:.3f}. **The recipe's own settings** ({_params(ref['params'])}), distilled once with "
             f"the same budget: validation {ref[val]:.3f}, test {ref[test]:.3f}. On test the best trial "
             f"is {diff}. `best.yaml` is the recipe with the best values: `distil run best.yaml` takes it.", "",
             f"Search space: {space_text(sweep.space)}. TPE sampler (seed {sweep.recipe.seed}; trial 0 is the "
             f"recipe's own settings), median pruner on the validation {words} of each epoch. Budget per trial: "
             f"{budget['epochs']} epochs at batch {budget['batch_size']} on {budget['distillation_samples']:,} "
             f"distillation samples. The teacher was {sweep.teacher_status} by this call "
             "(trained once per sweep folder), and " + ("its logits computed once for every trial."
                                                         if sweep.train_data().teacher_logits else
                                                         "it ran at every step of every trial (see log.jsonl)."), ""]
    names = [p.name for p in sweep.space]
    lines += ["| trial | state | " + " | ".join(names) + f" | val {m} | test {m} | seconds |",
              "|---|---|" + "---|" * len(names) + "---|---|---|",
              f"| recipe's own | reference | {' | '.join(_g(ref['params'][n]) for n in names)} | "
              f"{ref[val]:.3f} | {ref[test]:.3f} | - |"]
    for t in summary["trials"]:
        state = t["state"] + (" (best)" if t["number"] == best["trial"] else "")
        if t["state"] == "pruned" and t[f"last_{val}"] is not None:
            shown = f"({t[f'last_{val}']:.3f} at epoch {t['epochs']})"
        else:
            shown = "-" if t[val] is None else f"{t[val]:.3f}"
        tested = f"{best[test]:.3f}" if t["number"] == best["trial"] else "-"
        values = " | ".join(_g(t["params"][n]) if n in t["params"] else "-" for n in names)
        seconds = "-" if t["seconds"] is None else f"{t['seconds']:.1f}"
        lines.append(f"| {t['number']} | {state} | {values} | {shown} | {tested} | {seconds} |")
    lines += ["", f"Test {words} is shown for the best trial and the recipe's own settings only: the selection reads "
              "the validation split alone.", ""]
    if summary["importance"]:
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in summary["importance"].items())
        lines += [f"Parameter importance (fANOVA): {ranked}.", ""]
    lines += [f"![{key}](plots/{path.name})" for key, path in plots.items()] + [""]
    return "\n".join(lines)


def space_text(space: list[Param]) -> str:
    parts = []
    for p in space:
        kind = "log-uniform" if p.log else "uniform"
        what = {"T": "the kd temperature", "alpha": "the kd weight, 1 - alpha on ce"}.get(p.name, "the term's weight")
        parts.append(f"{p.name} ({what}) {kind} [{_g(p.low)}, {_g(p.high)}]")
    return "; ".join(parts)


def _params(params: dict[str, float]) -> str:
    return ", ".join(f"{k}={_g(v)}" for k, v in params.items())


def _g(value: float) -> str:
    return f"{value:.3g}"
