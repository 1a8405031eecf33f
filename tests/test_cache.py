"""The teacher-output cache: built once, reused by key, rebuilt when its file is damaged."""

import json
import logging

import numpy as np
import pytest
import torch

from conftest import mlp
from distil.cache import TeacherCache, cache_key
from distil.distiller import Distiller
from distil.losses import CE, KD


class Counting:
    """A compute function that counts its calls."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values, self.calls = values, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.values


def test_an_entry_is_built_once_then_reused(tmp_path):
    store, compute = TeacherCache(tmp_path), Counting(torch.arange(12.0).reshape(4, 3))
    first = store.get("k", compute)
    assert store.last_event == "built"
    second = store.get("k", compute)
    assert store.last_event == "reused" and compute.calls == 1 and torch.equal(first, second)
    assert json.loads((tmp_path / "index.json").read_text())["k"]["shape"] == [4, 3]


def test_large_entries_are_memory_mapped_with_the_same_values(tmp_path):
    TeacherCache(tmp_path).get("k", Counting(torch.randn(50, 10)))
    mapped = TeacherCache(tmp_path, memory_mb=0).get("k", Counting(torch.zeros(1)))
    held = TeacherCache(tmp_path, memory_mb=1).get("k", Counting(torch.zeros(1)))
    assert torch.equal(mapped, held)


@pytest.mark.parametrize("damage,why", [("truncate", "truncated"), ("flip", "corrupt (checksum mismatch)")])
def test_a_damaged_entry_is_reported_and_rebuilt(tmp_path, caplog, damage, why):
    store, compute = TeacherCache(tmp_path), Counting(torch.randn(20, 5))
    store.get("k", compute)
    path = tmp_path / "k.npy"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[:-16]))
    else:
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="distil.cache"):
        again = store.get("k", compute)
    assert compute.calls == 2 and store.last_event.startswith(f"rebuilt ({why}")
    assert f"teacher cache entry k is {why}" in caplog.text
    assert torch.equal(again, compute.values) and store.get("k", compute) is not None and store.last_event == "reused"


def test_the_key_follows_the_teachers_weights_and_the_inputs():
    teacher, x = mlp(0), torch.randn(8, 4)
    key = cache_key(teacher, x)
    assert cache_key(mlp(0), x.clone()) == key  # the same weights and values: the same entry
    assert cache_key(mlp(1), x) != key
    assert cache_key(teacher, x + 1e-3) != key
    assert cache_key(teacher, x, "top5") != key


def test_a_distiller_reads_cached_logits_that_equal_the_live_ones(tmp_path):
    from distil.data import Split

    teacher, x, y = mlp(1), torch.randn(32, 4), torch.randint(0, 3, (32,))
    distiller = Distiller(mlp(0), teacher, [KD(), CE()])
    first = distiller.with_teacher_logits(Split(x, y), cache=TeacherCache(tmp_path))
    assert distiller.cache_events["teacher"]["status"] == "built"
    second = distiller.with_teacher_logits(Split(x, y), cache=TeacherCache(tmp_path))
    assert distiller.cache_events["teacher"]["status"] == "reused"
    with torch.no_grad():
        live = teacher(x)
    assert torch.allclose(first.teacher_logits["teacher"], live) and torch.equal(
        first.teacher_logits["teacher"], second.teacher_logits["teacher"])


def test_a_second_run_with_another_temperature_reuses_the_cache_and_says_so(tmp_path, tiny_recipe):
    from distil.build import load_recipe
    from distil.pipeline import run_pipeline

    tiny_recipe["distill"]["cache_dir"] = str(tmp_path / "cache")
    run_pipeline(load_recipe(tiny_recipe), tmp_path / "a")
    tiny_recipe["distill"]["terms"][0]["T"] = 2
    run_pipeline(load_recipe(tiny_recipe), tmp_path / "b")
    events = [json.loads(line) for run in "ab" for line in (tmp_path / run / "log.jsonl").read_text().splitlines()
              if '"teacher_cache"' in line]
    assert [e["status"] for e in events] == ["built", "reused"] and events[0]["key"] == events[1]["key"]
    assert "logits reused from the teacher cache" in (tmp_path / "b" / "report.md").read_text()


def test_cache_info_and_clear_from_the_command(tmp_path):
    from typer.testing import CliRunner

    from distil.cli import app

    TeacherCache(tmp_path).get("abc", Counting(torch.zeros(3, 2)))
    info = CliRunner().invoke(app, ["cache", "info", "--dir", str(tmp_path)])
    assert info.exit_code == 0 and "1 entry" in info.output and "abc  float32 [3, 2]" in info.output
    cleared = CliRunner().invoke(app, ["cache", "clear", "--dir", str(tmp_path)])
    assert cleared.exit_code == 0 and "removed 1 entries" in cleared.output
    assert not list(tmp_path.glob("*.npy")) and np.all(TeacherCache(tmp_path).index() == {})
