"""`distil sweep`: the search space, the values put into the terms, a tiny sweep that resumes, and bad input."""

import json
import sys

import pytest

from conftest import fails_cleanly, runner, write_recipe
from distil.build import load_recipe
from distil.cli import app
from distil.sweep import own_values, search_space, terms_for

DIGITS_TERMS = [{"kind": "kd", "T": 4, "weight": 0.9}, {"kind": "ce", "weight": 0.1},
                {"kind": "fitnet", "student": "layer2", "teacher": "layer2", "weight": 1.0}]


def test_the_space_of_the_digits_recipe_is_T_alpha_and_the_fitnet_weight():
    space = {p.name: p for p in search_space(DIGITS_TERMS)}
    assert list(space) == ["T", "alpha", "fitnet_weight"]
    assert (space["T"].low, space["T"].high, space["T"].log, space["T"].own) == (1, 20, True, 4)
    assert (space["alpha"].low, space["alpha"].high, space["alpha"].log) == (0.1, 1, False)
    assert space["alpha"].own == pytest.approx(0.9)  # 0.9 / (0.9 + 0.1)
    assert (space["fitnet_weight"].low, space["fitnet_weight"].high) == pytest.approx((0.1, 10))  # 1 / 10, 1 * 10


def test_the_values_go_into_the_terms_with_1_minus_alpha_on_ce():
    space = search_space(DIGITS_TERMS)
    terms = terms_for(DIGITS_TERMS, space, {"T": 2.0, "alpha": 0.7, "fitnet_weight": 3.0})
    assert terms[0] == {"kind": "kd", "T": 2.0, "weight": 0.7}
    assert terms[1]["kind"] == "ce" and terms[1]["weight"] == pytest.approx(0.3)
    assert terms[2] == {"kind": "fitnet", "student": "layer2", "teacher": "layer2", "weight": 3.0}
    assert DIGITS_TERMS[0]["T"] == 4  # the recipe's own terms are not changed
    own = terms_for(DIGITS_TERMS, space, own_values(space))
    assert [t["weight"] for t in own] == pytest.approx([0.9, 0.1, 1.0]) and own[0]["T"] == 4


def test_a_recipe_without_ce_gets_one_weighted_1_minus_alpha_and_its_own_T_widens_the_range():
    terms = [{"kind": "kd", "T": 30, "weight": 1.0}]
    space = search_space(terms)
    assert [p.name for p in space] == ["T", "alpha"] and space[0].high == 30 and space[1].own == 1.0
    assert terms_for(terms, space, {"T": 3.0, "alpha": 0.75}) == [{"kind": "kd", "T": 3.0, "weight": 0.75},
                                                                    {"kind": "ce", "weight": 0.25}]


def test_a_recipe_with_no_kd_term_exits_2_naming_the_field(tmp_path, tiny_recipe):
    tiny_recipe["distill"]["terms"] = [{"kind": "ce", "weight": 1.0}]
    fails_cleanly(["sweep", write_recipe(tmp_path, tiny_recipe), "--trials", "2", "--run-dir", str(tmp_path / "s")],
                  "distill.terms: the sweep tunes the temperature T and the weight alpha of a `kd` term, and this "
                  "recipe has none (its terms: ce)")
    assert not (tmp_path / "s").exists()


def test_zero_trials_exit_2(tmp_path, tiny_recipe):
    fails_cleanly(["sweep", write_recipe(tmp_path, tiny_recipe), "--trials", "0"], "--trials")


def test_without_optuna_the_sweep_exits_2_saying_what_to_install(tmp_path, tiny_recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    fails_cleanly(["sweep", write_recipe(tmp_path, tiny_recipe), "--trials", "2"], "pip install 'distil[sweep]'")


def events(run_dir, kind: str) -> list[str]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["status"] for r in records if r.get("event") == kind]


def epochs_logged(run_dir, stage: str) -> int:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return sum(r.get("stage") == stage and "epoch" in r for r in records)


@pytest.mark.slow
def test_a_tiny_sweep_writes_its_files_trains_the_teacher_once_and_resumes(tmp_path, tiny_recipe):
    import optuna

    recipe, run_dir = write_recipe(tmp_path, tiny_recipe), tmp_path / "sweep"
    args = ["sweep", recipe, "--trials", "3", "--epochs", "2", "--run-dir", str(run_dir)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("sweep.db", "sweep.md", "sweep.json", "best.yaml", "plots/history.png", "plots/importance.png"):
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "sweep.json").read_text())
    assert len(summary["trials"]) == 3 and summary["budget"]["epochs"] == 2
    assert summary["trials"][0]["params"] == summary["reference"]["params"] == {"T": 4, "alpha": 0.9}
    # trial 0 is the recipe's own settings with the same budget, and training is seeded: the same student
    assert summary["trials"][0]["val_acc"] == summary["reference"]["val_acc"]

    best = load_recipe(run_dir / "best.yaml")  # what `distil run best.yaml` reads
    assert best.name == "tiny-best" and best.distill.terms == summary["best"]["terms"]
    assert best.student.train.epochs == 2
    md = (run_dir / "sweep.md").read_text()
    assert f"| {summary['best']['trial']} | complete (best) |" in md and "| recipe's own | reference |" in md

    assert events(run_dir, "sweep_teacher") == ["trained"] and epochs_logged(run_dir, "teacher") == 2
    assert events(run_dir, "teacher_cache") == ["built"]  # the teacher's logits, once for every trial
    assert "teacher: trained (2 epochs)" in result.output

    # the same command again: the teacher is loaded, not trained, and no trial runs twice
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "nothing to run" in again.output and "loaded, not trained again" in again.output
    assert events(run_dir, "sweep_teacher") == ["trained", "reused"] and epochs_logged(run_dir, "teacher") == 2
    storage = f"sqlite:///{run_dir / 'sweep.db'}"
    assert len(optuna.load_study(study_name="sweep", storage=storage).trials) == 3

    # a call stopped in the middle of a trial leaves it running: the next call queues its values again
    study = optuna.load_study(study_name="sweep", storage=storage)
    stopped = study.ask()
    stopped_values = {"T": stopped.suggest_float("T", 1, 20, log=True), "alpha": stopped.suggest_float("alpha", 0.1, 1)}
    more = runner.invoke(app, ["sweep", recipe, "--trials", "4", "--epochs", "2", "--run-dir", str(run_dir)])
    assert more.exit_code == 0, more.output
    assert "trial 3 was interrupted" in more.output and "running 1 of 4 trials" in more.output
    trials = optuna.load_study(study_name="sweep", storage=storage).trials
    assert [t.state.name for t in trials][3] == "FAIL" and trials[3].user_attrs["interrupted"]
    assert len(trials) == 5 and trials[4].params == stopped_values and trials[4].state.name in ("COMPLETE", "PRUNED")
    assert events(run_dir, "sweep_teacher") == ["trained", "reused", "reused"]

    # another budget is another recipe: refused, not mixed into these trials
    fails_cleanly(["sweep", recipe, "--trials", "4", "--epochs", "3", "--run-dir", str(run_dir)],
                  "holds a sweep or run of another recipe (it differs in student")


def test_a_recipe_with_no_validation_split_exits_2_naming_the_field(tmp_path, tiny_recipe):
    tiny_recipe["data"]["val_fraction"] = 0
    fails_cleanly(["sweep", write_recipe(tmp_path, tiny_recipe), "--trials", "2", "--run-dir", str(tmp_path / "s")],
                  "data.val_fraction is 0: the sweep ranks trials on the validation split")
    assert not (tmp_path / "s").exists()


def test_a_language_model_sweep_ranks_its_trials_by_bits_per_byte_lower_first(tmp_path):
    from test_lm import write_corpus

    small = {"train": {"epochs": 1, "batch_size": 16, "lr": 0.003}}
    recipe = {"name": "tinylm", "data": {"source": "textfolder", "args": {"path": str(write_corpus(tmp_path / "t")),
                                                                           "block": 16}, "val_fraction": 0.2},
              "teacher": {"model": "gpt", "width": 16, "depth": 1, "heads": 2, **small},
              "student": {"model": "gpt", "width": 8, "depth": 1, "heads": 2, **small},
              "distill": {"terms": [{"kind": "kd", "T": 1, "weight": 0.5}, {"kind": "ce", "weight": 0.5}],
                          "use_transfer": False}}
    run_dir = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", write_recipe(tmp_path, recipe), "--trials", "3", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "sweep.json").read_text())
    assert summary["metric"] == "bpb" and summary["higher_is_better"] is False
    done = [t["val_bpb"] for t in summary["trials"] if t["state"] == "complete"]
    assert summary["best"]["val_bpb"] == min(done)  # lower is better: the study minimises
    assert 0 < summary["best"]["test_bpb"] < 8.5  # bits per byte of the best trial's student on the test split
    assert summary["trials"][0]["val_bpb"] == summary["reference"]["val_bpb"]  # trial 0: the recipe's own
    md = (run_dir / "sweep.md").read_text()
    assert "selected by validation bits per byte" in md and "| val bpb | test bpb |" in md
    assert "(bpb)" in result.output
