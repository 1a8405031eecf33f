"""End-to-end runs of the pipeline on the tiny digits recipe, and the README's example."""

import json
import re
from pathlib import Path

import pytest

from distil.errors import DistilError
from distil.pipeline import run_pipeline
from distil.recipe import load_recipe

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
    assert any("fitnet:layer1->pool" in r["parts"] for r in records if r["stage"] == "distill")
    # the baseline gets the distillation stage's optimiser steps: same split, same epochs here
    assert sum(r["stage"] == "baseline" for r in records) == 2

    # connectors live in their own file, never in the student's
    from safetensors.torch import load_file

    assert not any("connector" in k for k in load_file(run_dir / "student.safetensors"))
    assert any("connector" in k for k in load_file(run_dir / "student.connectors.safetensors"))

    assert run_pipeline(recipe, run_dir) == []  # everything exists: nothing to do
    (run_dir / "student.safetensors").unlink()
    assert run_pipeline(recipe, run_dir) == ["distill", "report"]


def test_a_different_recipe_in_the_same_folder_is_refused(tmp_path, tiny_recipe):
    from distil.pipeline import prepare_run_dir

    prepare_run_dir(load_recipe(tiny_recipe), tmp_path, force=False)
    tiny_recipe["seed"] = 1
    with pytest.raises(DistilError, match="holds a run of a different recipe.*--force"):
        prepare_run_dir(load_recipe(tiny_recipe), tmp_path, force=False)
    prepare_run_dir(load_recipe(tiny_recipe), tmp_path, force=True)


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- example -->\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 30
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README example", "exec"), namespace)
    assert namespace["student_acc"] > 0.85  # digits: a small CNN, distilled for a few epochs
