"""The benchmark scripts import against the current API (they are run by hand, not by the tests)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_imports_and_has_a_main(path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs its imports, not main()
    assert callable(module.main)


def test_the_benchmarks_are_there():
    assert {p.name for p in SCRIPTS} >= {"throughput.py", "seeds.py", "quantization.py", "top_k.py"}
