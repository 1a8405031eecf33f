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


def test_the_peers_benchmark_without_its_venv_exits_2_with_the_setup_commands(capsys):
    """benchmarks/peers runs in a venv of its own; in this one it must say how to build that, not crash."""
    if importlib.util.find_spec("torchdistill") is not None:
        pytest.skip("torchdistill is importable here: this is the peers venv")
    path = SCRIPTS[0].parent / "peers" / "kd_epoch.py"
    spec = importlib.util.spec_from_file_location("bench_peers_kd_epoch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports torch and distil only: torchdistill is imported when it runs
    with pytest.raises(SystemExit) as exit_info:
        module.require_peers()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot import torch" in err and "benchmarks/peers/setup.sh" in err and "pip install torchdistill" in err
