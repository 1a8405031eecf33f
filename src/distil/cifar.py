"""CIFAR-10 and CIFAR-100 read from the official binary version (no pickle), and a writer for fixtures.

Layouts (https://www.cs.toronto.edu/~kriz/cifar.html, "binary version"):
    cifar-10-batches-bin/  data_batch_1.bin .. data_batch_5.bin, test_batch.bin, batches.meta.txt
        record: 1 label byte + 3072 pixel bytes
    cifar-100-binary/      train.bin, test.bin, fine_label_names.txt, coarse_label_names.txt
        record: 1 coarse label byte + 1 fine label byte + 3072 pixel bytes
The 3072 pixel bytes are 1024 red, 1024 green, 1024 blue, each a row-major 32x32 plane, so a record's
pixels reshape straight to (3, 32, 32).

    raw = cifar("~/data")                  # finds ~/data/cifar-100-binary or ~/data/cifar-10-batches-bin
    raw.x.shape, raw.x.dtype               # (50000, 3, 32, 32) float32 in [0, 1]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distil.data import RawData
from distil.errors import DataError

PIXELS = 3 * 32 * 32
DOWNLOAD = "https://www.cs.toronto.edu/~kriz/cifar.html, the binary version"
CIFAR10_DIR, CIFAR100_DIR = "cifar-10-batches-bin", "cifar-100-binary"
CIFAR10_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_TEST, CIFAR10_NAMES = "test_batch.bin", "batches.meta.txt"
CIFAR100_TRAIN, CIFAR100_TEST = "train.bin", "test.bin"
CIFAR100_NAMES = {"fine": "fine_label_names.txt", "coarse": "coarse_label_names.txt"}
NUM_CLASSES = {"cifar10": 10, "fine": 100, "coarse": 20}


def _locate(path: Path) -> tuple[str, Path]:
    """('cifar10' | 'cifar100', folder holding the .bin files), for the folder itself or its parent."""
    for folder in (path, path / CIFAR100_DIR, path / CIFAR10_DIR):
        if (folder / CIFAR100_TRAIN).is_file():
            return "cifar100", folder
        if (folder / CIFAR10_TRAIN[0]).is_file():
            return "cifar10", folder
    where = "does not exist" if not path.exists() else "holds none of them"
    raise DataError(f"cifar: no CIFAR binary files under '{path}' (it {where}). Looked for {CIFAR100_TRAIN} "
                    f"(CIFAR-100) and {CIFAR10_TRAIN[0]} (CIFAR-10) in it and in its subfolders "
                    f"{CIFAR100_DIR}/ and {CIFAR10_DIR}/. Download them from {DOWNLOAD}, and extract the archive "
                    "there.")


def _records(file: Path, label_bytes: int) -> np.ndarray:
    """The file's records as rows, (N, label_bytes + 3072) uint8; DataError if missing or truncated."""
    if not file.is_file():
        raise DataError(f"cifar: missing '{file}'. Download the full set from {DOWNLOAD}.")
    data = np.fromfile(file, dtype=np.uint8)
    record = label_bytes + PIXELS
    if data.size % record:
        raise DataError(f"cifar: '{file}' holds {data.size} bytes, not a multiple of the {record}-byte record "
                        f"({label_bytes} label byte(s) + {PIXELS} pixels); the file is truncated or not CIFAR. "
                        f"Download it again from {DOWNLOAD}.")
    return data.reshape(-1, record)  # (N * record,) -> (N, record)


def _split(rows: np.ndarray, label_col: int, num_classes: int, file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) float32 in [0, 1], labels (N,) int64) from records read out of `file`."""
    labels = rows[:, label_col].astype(np.int64)
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"cifar: '{file}' has label {labels.max()} at byte {label_col} of a record, but the set "
                        f"has {num_classes} classes; the file is corrupt or from the other CIFAR.")
    pixels = rows[:, -PIXELS:].reshape(-1, 3, 32, 32)  # (N, 3072) -> (N, 3, 32, 32): R, G, B planes
    return pixels.astype(np.float32) / np.float32(255), labels


def _names(file: Path) -> list[str] | None:
    """Class names, one per non-blank line, or None when the file is absent."""
    if not file.is_file():
        return None
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def _read(files: list[Path], label_bytes: int, label_col: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of several record files, concatenated in order."""
    parts = [_split(_records(f, label_bytes), label_col, num_classes, f) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def cifar(path: str, labels: str = "fine") -> RawData:
    """CIFAR-10 or CIFAR-100 (whichever `path` holds) as float32 images (N, 3, 32, 32) in [0, 1], int64 labels.

    `path` is the extracted folder (`cifar-10-batches-bin`, `cifar-100-binary`) or its parent. `labels`
    picks CIFAR-100's "fine" (100 classes) or "coarse" (20) labels; CIFAR-10 ignores it. The official
    test file becomes `x_test`/`y_test`; class names come from the names file when it exists.
    """
    if labels not in ("fine", "coarse"):
        raise DataError(f"cifar: labels must be 'fine' or 'coarse', got {labels!r}.")
    kind, folder = _locate(Path(path).expanduser())
    if kind == "cifar10":
        spec = (1, 0, NUM_CLASSES["cifar10"])
        train, test, names = [folder / f for f in CIFAR10_TRAIN], folder / CIFAR10_TEST, folder / CIFAR10_NAMES
    else:
        spec = (2, 1 if labels == "fine" else 0, NUM_CLASSES[labels])
        train, test, names = [folder / CIFAR100_TRAIN], folder / CIFAR100_TEST, folder / CIFAR100_NAMES[labels]
    x, y = _read(train, *spec)
    if len(x) == 0:
        raise DataError(f"cifar: the training files in '{folder}' hold no images. Download them again from {DOWNLOAD}.")
    x_test, y_test = _read([test], *spec)
    class_names = _names(names)
    if class_names is not None and len(class_names) != spec[2]:
        raise DataError(f"cifar: '{names}' lists {len(class_names)} class names, expected {spec[2]} (one per line).")
    return RawData(x=x, y=y, x_test=x_test, y_test=y_test, class_names=class_names)


# --- writing fixtures -------------------------------------------------------------------------


def _check_split(x: np.ndarray, y: np.ndarray, num_classes: int, name: str) -> None:
    """DataError unless x is uint8 (N, 3, 32, 32) and y holds N labels in [0, num_classes)."""
    if x.dtype != np.uint8 or x.shape[1:] != (3, 32, 32):
        raise DataError(f"write_cifar: {name} must be uint8 of shape (N, 3, 32, 32), got {x.dtype} {x.shape}.")
    if y.shape != (len(x),):
        raise DataError(f"write_cifar: {name} has {len(x)} images but its labels have shape {y.shape}.")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"write_cifar: labels of {name} must be in [0, {num_classes}), got {y.min()}..{y.max()}.")


def _write_records(file: Path, labels: list[np.ndarray], x: np.ndarray) -> None:
    """Write records of the given label bytes (each (N,)) followed by the 3072 pixel bytes."""
    columns = [np.asarray(lab, dtype=np.uint8)[:, None] for lab in labels]
    rows = np.concatenate(columns + [x.reshape(len(x), PIXELS)], axis=1)  # (N, len(labels) + 3072)
    rows.tofile(file)


def write_cifar(path: str | Path, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                num_classes: int = 100, class_names: list[str] | None = None) -> Path:
    """Write uint8 images (N, 3, 32, 32) and labels in the official binary layout; return the folder written.

    num_classes 100 writes `<path>/cifar-100-binary/` (coarse label = fine // 5, names in
    fine_label_names.txt); 10 writes `<path>/cifar-10-batches-bin/` with the training set split over
    data_batch_1..5.bin (names in batches.meta.txt).
    """
    if num_classes not in (10, 100):
        raise DataError(f"write_cifar: num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes}.")
    if class_names is not None and len(class_names) != num_classes:
        raise DataError(f"write_cifar: class_names has {len(class_names)} names, expected {num_classes}.")
    _check_split(x, y, num_classes, "x")
    _check_split(x_test, y_test, num_classes, "x_test")
    folder = Path(path) / (CIFAR100_DIR if num_classes == 100 else CIFAR10_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    if num_classes == 100:
        _write_records(folder / CIFAR100_TRAIN, [y // 5, y], x)
        _write_records(folder / CIFAR100_TEST, [y_test // 5, y_test], x_test)
        names_file = folder / CIFAR100_NAMES["fine"]
    else:
        for name, idx in zip(CIFAR10_TRAIN, np.array_split(np.arange(len(x)), len(CIFAR10_TRAIN))):
            _write_records(folder / name, [y[idx]], x[idx])
        _write_records(folder / CIFAR10_TEST, [y_test], x_test)
        names_file = folder / CIFAR10_NAMES
    if class_names is not None:
        names_file.write_text("".join(f"{n}\n" for n in class_names))
    return folder
