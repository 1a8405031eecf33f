"""Image folders read lazily: `path/<class>/<image files>` listed up front, each image read (Pillow), resized
and normalised on demand in DataLoader workers, so a folder larger than memory trains.

    files = imagefolder("data/pets", image_size=64)       # FileData: paths and labels, no pixels yet
    ds = ImageFiles(files.files, files.labels, 64)        # a map-style Dataset of ((C, H, W), label)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from distil.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class FileData:
    """What a file source gives before splitting: image paths with labels, and how to read them."""

    files: list[Path]
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    image_size: int
    grayscale: bool
    transfer: list[Path] | None = None


def imagefolder(path: str, image_size: int = 32, grayscale: bool = False, transfer_path: str | None = None) -> FileData:
    """A folder of class folders of images (`path/<class>/*.png`); images are read lazily, resized to
    `image_size` x `image_size`."""
    root = Path(path)
    if image_size < 1:
        raise DataError(f"data.args.image_size must be at least 1 (pixels per side), got {image_size}")
    if not root.is_dir():
        raise DataError(f"image folder not found: {path}. Expected path/<class name>/<image files>.")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{path} holds no class folders. Expected path/<class name>/<image files>.")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _images_in(root / name)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"{path}: the class folders hold no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    transfer = _images_in(Path(transfer_path), recursive=True) if transfer_path else None
    if transfer_path and not Path(transfer_path).is_dir():
        raise DataError(f"transfer folder not found: {transfer_path}. Check data.args.transfer_path.")
    return FileData(files, np.array(labels, dtype=np.int64), classes, image_size, grayscale, transfer or None)


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(file: Path, size: int, grayscale: bool) -> np.ndarray:
    """One image as float32 (C, size, size) in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img = img.convert("L" if grayscale else "RGB").resize((size, size))
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read image {file}: {err}") from err
    return arr[None] if grayscale else arr.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


class ImageFiles(Dataset):
    """Images read from files on demand: item i -> ((C, H, W) float32 normalised tensor, label)."""

    def __init__(self, files: list[Path], labels: np.ndarray, image_size: int, grayscale: bool = False,
                 mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
        self.files, self.labels = list(files), np.asarray(labels, dtype=np.int64)
        self.image_size, self.grayscale = image_size, grayscale
        channels = 1 if grayscale else 3
        self.mean = np.zeros((channels, 1, 1), np.float32) if mean is None else np.asarray(mean, np.float32)
        self.std = np.ones((channels, 1, 1), np.float32) if std is None else np.asarray(std, np.float32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = read_image(self.files[i], self.image_size, self.grayscale)
        return torch.from_numpy((image - self.mean) / self.std), int(self.labels[i])

    def channel_stats(self, samples: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std (C, 1, 1) of raw pixels, estimated on a seeded sample of the images."""
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(self.files), size=min(samples, len(self.files)), replace=False)
        pixels = np.stack([read_image(self.files[i], self.image_size, self.grayscale) for i in pick])
        mean, std = pixels.mean(axis=(0, 2, 3)), pixels.std(axis=(0, 2, 3))
        return mean[:, None, None], np.where(std > 1e-8, std, 1.0)[:, None, None]
