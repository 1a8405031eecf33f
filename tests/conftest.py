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


# --- added with tests/test_batches.py, test_device.py, test_teachers.py, test_images.py ---------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped where torch.cuda.is_available() is False)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def write_pngs(root, classes: int = 3, per_class: int = 12, size: int = 12, seed: int = 0):
    """A folder of class folders of distinct random RGB PNGs, `root/c<k>/<i>.png`; returns the folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"c{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels[..., k] = np.clip(pixels[..., k].astype(int) + 80, 0, 255).astype(np.uint8)  # a class cue
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def png_folder(tmp_path):
    """3 classes x 12 images, 12x12 RGB PNGs (see `write_pngs`)."""
    return write_pngs(tmp_path / "images")
