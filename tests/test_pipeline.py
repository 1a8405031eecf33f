"""End-to-end runs of the pipeline on the tiny digits recipe, and the README's example."""

import json
import re
from pathlib import Path

import pytest

from distil.build import load_recipe
from distil.pipeline import run_pipeline

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_pipeline_writes_the_run_folder_and_resumes(tmp_path, tiny_recipe):
    tiny_recipe["student"]["width"] = 12  # (B, 12) -> teacher's pooled (B, 16): a linear connector
    tiny_recipe["distill"]["terms"].append({"kind": "fitnet", "student": "layer1", "teacher": "pool", "weight": 1.0})
    recipe = load_recipe(tiny_recipe)
    run_dir = tmp_path / "run"
    assert run_pipeline(recipe, run_dir) == ["teacher", "baseline", "distill", "report"]

    metrics = json.loads((run_dir / "metrics.json").read_text())["models"]
    assert set(metrics) == {"teacher", "baseline", "student"}
    for m in metrics.values():
        assert {"accuracy", "params", "macs", "bytes", "latency_ms_b1", "throughput_b256"} <= set(m)
        assert 0 <= m["accuracy"] <= 1 and m["params"] > 0 and m["macs"] > 0 and m["latency_ms_b1"] > 0
    assert metrics["teacher"]["accuracy"] > 0.4  # 2 epochs of a tiny CNN: well above chance (0.1)
    assert metrics["student"]["bytes"] == (run_dir / "student.safetensors").stat().st_size
    assert metrics["teacher"]["agreement"] == 1.0

    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="plots/' not in html  # self-contained
    assert (run_dir / "plots" / "training.png").stat().st_size > 1000
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["stage"] == "distill" and "event" not in r]
    assert epochs and all("fitnet:layer1->pool" in r["parts"] for r in epochs)
    cache = [r for r in records if r.get("event") == "teacher_cache"]  # the FitNet teacher's pool features too
    assert [(r["status"], r["features"]) for r in cache] == [("built", ["pool"])]
    # the baseline gets the distillation stage's optimiser steps: same split, same epochs here
    assert sum(r["stage"] == "baseline" for r in records) == 2

    # connectors live in their own file, never in the student's
    from safetensors.torch import load_file

    assert not any("connector" in k for k in load_file(run_dir / "student.safetensors"))
    assert any("connector" in k for k in load_file(run_dir / "student.connectors.safetensors"))

    assert run_pipeline(recipe, run_dir) == []  # everything exists: nothing to do
    (run_dir / "student.safetensors").unlink()
    assert run_pipeline(recipe, run_dir) == ["distill", "report"]


FILES = ["teacher.safetensors", "baseline.safetensors", "student.safetensors", "teacher-pruned.safetensors",
         "teacher-pruned-labels.safetensors", "export.json", "student.onnx", "metrics.json", "report.md",
         "checkpoints/teacher-last.safetensors", "checkpoints/distill-last.safetensors"]


@pytest.mark.parametrize("change,kept", [
    ({"export": {"enabled": True, "calibration_samples": 64}}, FILES[:5] + FILES[9:]),
    ({"student": {"model": "mlp", "width": 20}}, ["teacher.safetensors", "checkpoints/teacher-last.safetensors"]),
    ({"seed": 3}, []),
    ({"name": "renamed"}, FILES),  # the name changes no output
])
def test_a_changed_recipe_redoes_the_stages_it_affects(tmp_path, tiny_recipe, change, kept):
    from distil.pipeline import prepare_run_dir

    tiny_recipe["compress"] = {"enabled": True}
    tiny_recipe["export"] = {"enabled": True}
    prepare_run_dir(load_recipe(tiny_recipe), tmp_path, force=False)
    for file in FILES:
        (tmp_path / file).parent.mkdir(exist_ok=True)
        (tmp_path / file).write_text("x")
    tiny_recipe.update({k: {**tiny_recipe.get(k, {}), **v} if isinstance(v, dict) else v for k, v in change.items()})
    prepare_run_dir(load_recipe(tiny_recipe), tmp_path, force=False)
    assert sorted(f for f in FILES if (tmp_path / f).exists()) == sorted(kept)
    assert load_recipe(tmp_path / "recipe.yaml") == load_recipe(tiny_recipe)


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- example -->\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 30
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README example", "exec"), namespace)
    assert namespace["student_acc"] > 0.85  # digits: a small CNN, distilled for a few epochs


def test_a_teacher_given_as_a_checkpoint_is_loaded_not_trained(tmp_path, tiny_recipe):
    import torch

    from distil.data import load_splits
    from distil.models import build_model
    from distil.stages import Run, stage_teacher

    torch.manual_seed(5)
    given = build_model("cnn", (1, 8, 8), 10, width=8, depth=2)
    torch.save(given.state_dict(), tmp_path / "teacher.pt")  # a plain state dict, read with weights_only
    tiny_recipe["teacher"]["checkpoint"] = str(tmp_path / "teacher.pt")
    recipe = load_recipe(tiny_recipe)
    run = Run(recipe, tmp_path / "run", load_splits("digits", {}, seed=0))
    run.run_dir.mkdir()
    stage_teacher(run)
    assert not (run.run_dir / "log.jsonl").exists()  # no training happened
    loaded = run.load("teacher")
    assert all(torch.equal(a, b) for a, b in zip(given.state_dict().values(), loaded.state_dict().values()))


def test_a_recipe_that_cannot_run_leaves_the_folder_untouched(tmp_path, tiny_recipe):
    from distil.errors import ModelError
    from distil.pipeline import prepare_run_dir

    prepare_run_dir(load_recipe(tiny_recipe), tmp_path, force=False)
    for file in FILES[:3]:
        (tmp_path / file).write_text("x")
    saved = (tmp_path / "recipe.yaml").read_text()
    tiny_recipe["teacher"] = {"model": "nozoo:make"}  # a typo in a user factory's module
    with pytest.raises(ModelError, match="cannot import module 'nozoo'"):
        run_pipeline(load_recipe(tiny_recipe), tmp_path)
    assert all((tmp_path / f).exists() for f in FILES[:3]) and (tmp_path / "recipe.yaml").read_text() == saved


@pytest.mark.parametrize("drop,words", [(0.012, "lost 1.2 points"), (-0.003, "gained 0.3 points"),
                                        (0.0004, "lost nothing")])
def test_an_accuracy_change_after_quantization_reads_as_a_loss_or_a_gain(drop, words):
    from distil.stages import _lost

    assert _lost(drop) == words
