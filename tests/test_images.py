"""Image data at scale: a folder of PNGs read lazily as stratified, normalised Datasets; batch augmentation that
gives the student and the teacher the same new view each epoch; the pipeline on an image folder and on CIFAR."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from distil import CE, KD, Distiller, TrainConfig, fit
from distil.build import augment_and_normalize, load_recipe
from distil.data import load_splits
from distil.errors import DataError
from distil.images import ImageFiles
from distil.losses import Reads
from distil.pipeline import run_pipeline

ROOT = Path(__file__).parent.parent
AUGMENT = [{"kind": "random_crop", "size": 12, "padding": 2}, {"kind": "hflip"}]


pytestmark = pytest.mark.usefixtures("one_thread")


def raw_pixels(files: list[Path]) -> np.ndarray:
    """The images as (N, 3, H, W) floats in [0, 1], read here with Pillow alone."""
    return np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255.0
                     for f in files])


# --- an image folder as lazy Datasets ---------------------------------------------------------


def test_an_image_folder_splits_into_stratified_image_datasets(png_folder):
    splits = load_splits("imagefolder", {"path": str(png_folder), "image_size": 12}, seed=0)
    assert all(isinstance(part, ImageFiles) for part in (splits.train, splits.val, splits.test))
    # per class of 12: round(12 * 0.2) = 2 test, then round(10 * 0.1) = 1 val, 9 train
    assert (len(splits.train), len(splits.val), len(splits.test)) == (27, 3, 6)
    for part, per_class in ((splits.train, 9), (splits.val, 1), (splits.test, 2)):
        assert np.bincount(part.labels).tolist() == [per_class] * 3
        assert all(f.parent.name == f"c{label}" for f, label in zip(part.files, part.labels))
    files = [f for part in (splits.train, splits.val, splits.test) for f in part.files]
    assert sorted(files) == sorted(png_folder.glob("c*/*.png"))  # every image once
    assert (splits.num_classes, splits.input_shape, splits.class_names) == (3, (3, 12, 12), ["c0", "c1", "c2"])
    other = load_splits("imagefolder", {"path": str(png_folder), "image_size": 12}, seed=0)
    assert other.train.files == splits.train.files  # the same seed, the same split


def test_items_are_normalised_with_the_training_images_statistics(png_folder):
    splits = load_splits("imagefolder", {"path": str(png_folder), "image_size": 12}, seed=0)
    pixels = raw_pixels(splits.train.files)  # (27, 3, 12, 12)
    mean = pixels.mean(axis=(0, 2, 3))[:, None, None]  # per channel, over every training pixel
    std = pixels.std(axis=(0, 2, 3))[:, None, None]
    for part in (splits.train, splits.test):
        for i in (0, len(part) - 1):
            x, label = part[i]
            assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and label == part.labels[i]
            expected = (raw_pixels([part.files[i]])[0] - mean) / std
            assert np.allclose(x.numpy(), expected, atol=1e-5)
    train = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert torch.allclose(train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(train.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-4)


def test_images_are_read_when_indexed_not_when_loaded(png_folder):
    splits = load_splits("imagefolder", {"path": str(png_folder), "image_size": 12}, seed=0)
    before = splits.train[0][0]
    Image.fromarray(np.full((12, 12, 3), 255, dtype=np.uint8)).save(splits.train.files[0])  # all white now
    after = splits.train[0][0]
    white = (1.0 - splits.train.mean) / splits.train.std  # (3, 1, 1): 1.0 normalised per channel
    assert not torch.allclose(before, after)
    assert torch.allclose(after, torch.from_numpy(white).expand(3, 12, 12), atol=1e-6)
    splits.train.files[1].unlink()
    with pytest.raises(DataError, match=f"cannot read image .*{splits.train.files[1].name}"):
        splits.train[1]


def test_a_folder_without_class_folders_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="holds no class folders. Expected path/<class name>/<image files>"):
        load_splits("imagefolder", {"path": str(tmp_path)}, seed=0)


# --- augmentation: a new view each epoch, the same for student and teacher --------------------


class Recorder(nn.Module):
    """Passes inputs to `inner`, keeping a copy of each batch it saw."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.inner(x)


class Indices(nn.Module):
    """A loss term adding 0 that records the sample indices of each step."""

    def __init__(self) -> None:
        super().__init__()
        self.name, self.weight, self.seen = "indices", 1.0, []

    def reads(self) -> Reads:
        return Reads()

    def build(self, views) -> None:
        pass

    def forward(self, views) -> torch.Tensor:
        self.seen.append(views.index.clone())
        return views.student.logits.sum() * 0.0


def crops_and_flips(image: torch.Tensor, padding: int = 2) -> list[torch.Tensor]:
    """Every view random_crop(size=H, padding) + hflip can give of one (C, H, W) image: 5 x 5 x 2 = 50."""
    _, h, w = image.shape
    padded = F.pad(image, (padding,) * 4)  # zeros around: (C, H + 4, W + 4)
    crops = [padded[:, top:top + h, left:left + w] for top in range(2 * padding + 1) for left in range(2 * padding + 1)]
    return crops + [c.flip(-1) for c in crops]


def test_augmented_views_change_between_epochs_and_student_and_teacher_see_the_same(png_folder):
    splits = load_splits("imagefolder", {"path": str(png_folder), "image_size": 12}, seed=0)
    augment, stats = augment_and_normalize(AUGMENT)
    assert stats is None and len(augment) == 2
    torch.manual_seed(0)
    student = Recorder(nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 3)))  # (B, 3, 12, 12) -> (B, 432) -> (B, 3)
    teacher = Recorder(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(4, 3)))
    indices = Indices()
    fit(Distiller(student, teacher, [KD(T=2, weight=0.5), CE(weight=0.5), indices]), splits.train, None,
        TrainConfig(epochs=2, batch_size=9), augment=augment)  # 27 images: 3 steps per epoch, every image each epoch
    steps = list(zip(student.inputs[1:], teacher.inputs[1:], indices.seen))  # [0]: the dry run of prepare
    assert len(steps) == 6 and len(student.inputs) == len(teacher.inputs) == 7
    views: list[dict[int, torch.Tensor]] = [{}, {}]
    for step, (seen_by_student, seen_by_teacher, index) in enumerate(steps):
        assert torch.equal(seen_by_student, seen_by_teacher), step
        for row, i in enumerate(index.tolist()):
            views[step // 3][i] = seen_by_student[row]
    assert sorted(views[0]) == sorted(views[1]) == list(range(27))
    for i in range(27):
        clean = splits.train[i][0]
        for epoch in (0, 1):  # each view is a crop (and maybe a flip) of its own sample
            assert any(torch.equal(views[epoch][i], v) for v in crops_and_flips(clean)), (i, epoch)
    changed = sum(not torch.equal(views[0][i], views[1][i]) for i in range(27))
    assert changed >= 24  # 50 possible views: a repeat is rare (1 in 50 per image)
    assert sum(not torch.equal(views[0][i], splits.train[i][0]) for i in range(27)) >= 24  # augmented at all


# --- the pipeline on images -------------------------------------------------------------------


def image_recipe(folder: Path) -> dict:
    train = {"epochs": 2, "batch_size": 8, "lr": 0.01}  # images read in 2 DataLoader workers (the default)
    return {
        "name": "images", "seed": 0, "device": "cpu",
        "data": {"source": "imagefolder", "args": {"path": str(folder), "image_size": 12}, "augment": AUGMENT},
        "teacher": {"model": "cnn", "width": 4, "depth": 2, "train": train},
        "student": {"model": "mlp", "width": 8, "train": train},
        "distill": {"terms": [{"kind": "kd", "T": 4, "weight": 0.9}, {"kind": "ce", "weight": 0.1}],
                    "use_transfer": False},
        "report": {"throughput_batch": 16},
    }


def test_the_pipeline_runs_on_an_augmented_image_folder(png_folder, tmp_path):
    run_dir = tmp_path / "run"
    assert run_pipeline(load_recipe(image_recipe(png_folder)), run_dir) == ["teacher", "baseline", "distill", "report"]
    assert (run_dir / "report.md").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())["models"]
    assert set(metrics) == {"teacher", "baseline", "student"}
    assert all(0 <= m["accuracy"] <= 1 for m in metrics.values())
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["stage"] == "distill"] == [1, 2]
    assert all(set(r["parts"]) == {"kd", "ce"} for r in records if r["stage"] == "distill")


def test_the_cifar100_recipe_runs_on_a_tiny_cifar_folder(tmp_path):
    path = ROOT / "recipes" / "cifar100.yaml"
    if not path.is_file():
        pytest.skip("recipes/cifar100.yaml not yet written")
    from distil.cifar import write_cifar
    from distil.recipe import apply_overrides, read_recipe

    load_recipe(path)  # the shipped recipe validates as it is
    rng = np.random.default_rng(0)
    y, y_test = np.arange(60) % 6, np.arange(20) % 6  # 6 of the 100 classes: 10 training images each
    write_cifar(tmp_path / "cifar", rng.integers(0, 256, (60, 3, 32, 32), dtype=np.uint8), y,
                rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8), y_test, num_classes=100)
    raw = apply_overrides(read_recipe(path), [
        f"data.args.path={tmp_path / 'cifar'}", "device=cpu", "precision=fp32", "compile=false",
        "compress.enabled=false", "export.enabled=false", "report.throughput_batch=16",
        "distill.use_transfer=false",
    ])
    small = {"teacher": {"model": "cnn", "width": 4, "depth": 2}, "student": {"model": "mlp", "width": 8}}
    for role, model in small.items():
        raw[role] = {**model, "train": {**raw.get(role, {}).get("train", {}), "epochs": 1, "batch_size": 16,
                                        "workers": 0}}
    terms = raw.get("distill", {}).get("terms", [])
    if not terms or any(t.get("kind") not in ("kd", "ce") for t in terms):  # feature terms name the recipe's layers
        raw.setdefault("distill", {})["terms"] = [{"kind": "kd", "T": 4, "weight": 0.9}, {"kind": "ce", "weight": 0.1}]
    run_dir = tmp_path / "run"
    run_pipeline(load_recipe(raw), run_dir)
    assert (run_dir / "report.md").is_file()
    assert set(json.loads((run_dir / "metrics.json").read_text())["models"]) >= {"teacher", "baseline", "student"}
