"""Fixtures for every test, and the small helpers several test files share.

Test files import the helpers by name (`from conftest import blobs, mlp`): pytest puts tests/ on sys.path."""

import copy

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from distil import ClassificationTask
from distil.cli import app
from distil.data import Split

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


# Tests run on the CPU, where their reference runs are, also on a machine with a GPU: `device: auto` resolves to
# the CPU (in module-scoped fixtures too) and child processes (--nproc, torchrun) see no GPU. Only the tests marked
# `cuda` see the GPU.
_CUDA_AVAILABLE = torch.cuda.is_available
_GPU_VISIBLE = [False]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped where torch.cuda.is_available() is False)")
    torch.cuda.is_available = lambda: _GPU_VISIBLE[0] and _CUDA_AVAILABLE()
    import distil.device

    distil.device._mps_available = lambda: False


@pytest.fixture(autouse=True)
def _gpu_only_when_marked_cuda(request, monkeypatch):
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield
        return
    _GPU_VISIBLE[0] = True
    yield
    _GPU_VISIBLE[0] = False


def pytest_collection_modifyitems(config, items):
    if _CUDA_AVAILABLE():
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


# --- shared helpers: `from conftest import ...` ------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest, and does not stall waiting for a core that another process holds.

    A file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`; it runs after `_isolate`."""
    torch.set_num_threads(1)


def blobs(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 4-D, learnable in a few epochs: x (n, 4) around 2 * e_y, y[i] = i % 3."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.eye(4)[y] * 2.0 + 0.7 * torch.randn(n, 4, generator=g), y


def blob_split(n: int = 240, seed: int = 0) -> Split:
    """`blobs` as a Split."""
    return Split(*blobs(n, seed))


def mlp(seed: int, hidden: int = 16, classes: int = 3, dropout: float | None = None) -> nn.Module:
    """(B, 4) -> (B, hidden) -> (B, classes), initialised from `seed`; a Dropout after the ReLU when `dropout` is
    given (none otherwise, so the layer indices stay 0 and 2)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(4, hidden), nn.ReLU()] + ([] if dropout is None else [nn.Dropout(dropout)])
    return nn.Sequential(*layers, nn.Linear(hidden, classes))


class Tiny(nn.Module):
    """(B, 1, 4, 4) -> layer1 conv (B, width, 4, 4) -> fc (B, classes)."""

    def __init__(self, width: int, classes: int = 3) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(width * 16, classes)

    def forward(self, x):
        return self.fc(self.layer1(x).flatten(1))


class TinyBN(nn.Module):
    """Like Tiny, with a BatchNorm: its running stats show whether the module ran in train mode, and its state
    dict holds buffers beside the parameters (running stats, an int64 counter)."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width * 16, classes)

    def forward(self, x):
        return self.fc(self.layer1(x).flatten(1))


class NaNAfter:
    """A classification task whose loss turns NaN after `n` forward passes; counts them in `calls`."""

    def __init__(self, model: nn.Module, n: int) -> None:
        self.inner, self.n, self.calls = ClassificationTask(model), n, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch, progress=None):
        out = self.inner.forward(batch, progress)
        self.calls += 1
        if self.calls > self.n:
            out = type(out)(out.loss * float("nan"), {"ce": out.loss * float("nan")}, out.outputs)
        return out


# --- hand-written references (plain exp/log, float64) ------------------------------------------------------


def hand_softmax(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """softmax(z / T) row by row, written out: exp(z_i / T) / sum_j exp(z_j / T)."""
    e = torch.exp(logits.double() / T)
    return e / e.sum(dim=1, keepdim=True)


def hand_kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """sum_k p_t (log p_t - log p_s), mean over the batch: KL of the softened distributions, no T^2."""
    p_s, p_t = hand_softmax(student, T), hand_softmax(teacher, T)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum() / student.shape[0]


def hand_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(z)[y], mean over the batch."""
    p = hand_softmax(logits)
    return -torch.log(p[torch.arange(len(targets)), targets]).mean()


# --- the command line ---------------------------------------------------------------------------

runner = CliRunner()


def write_recipe(tmp_path, recipe: dict) -> str:
    """`recipe` written as YAML to tmp_path/recipe.yaml; its path."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def fails_cleanly(args: list[str], match: str) -> str:
    """Run `distil ARGS`: it must exit 2 with no traceback and a message holding `match`; its output."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert match in " ".join(result.stderr.split()), result.output  # on stderr: `2>err.txt` keeps it
    return result.output
