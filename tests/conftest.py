import copy

import pytest
import torch

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "digits"},
    "teacher": {"model": "cnn", "width": 8, "depth": 2, "train": {"epochs": 2, "batch_size": 64, "lr": 0.01}},
    "student": {"model": "mlp", "width": 16, "train": {"epochs": 2, "batch_size": 64, "lr": 0.01}},
    "distill": {"terms": [{"kind": "kd", "T": 4, "weight": 0.9}, {"kind": "ce", "weight": 0.1}],
                "use_transfer": False},
}


@pytest.fixture
def tiny_recipe() -> dict:
    """A digits recipe that runs end to end in a few seconds."""
    return copy.deepcopy(TINY)


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(2)
