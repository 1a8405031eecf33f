"""Data sources and splits; splits are deterministic from a seed.

Sources (`SOURCES`): `mnist1d` (generated offline, with a generated transfer set), `digits`
(scikit-learn, small, for tests), `npz`, `csv`, `cifar` (the official binary files) give arrays
held in memory (`Split`); `imagefolder` gives files read lazily, in DataLoader workers
(`ImageFiles`, a map-style Dataset); `pycorpus` (the Python standard library's source) and `textfolder`
give byte-level language-model blocks (`distil.text`). Normalisation statistics come from the training
split only, unless the recipe sets them. Transfer-set samples carry the label -1 (`UNLABELED`).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from distil.binding import bind_kwargs, import_object
from distil.errors import DataError, did_you_mean
from distil.images import FileData, ImageFiles, imagefolder
from distil.losses import UNLABELED
from distil.text import VOCAB, TextData, blocks, pycorpus, split_files, textfolder


@dataclass(frozen=True)
class Split:
    """In-memory samples: the fast path of the training loop (a batch is one indexing operation)."""

    x: torch.Tensor  # (N, *input_shape) float32
    y: torch.Tensor  # (N,) int64; -1 = unlabeled. Language models: x and y (N, T) tokens, y the next ones
    teacher_logits: dict[str, torch.Tensor] | None = None  # teacher name -> (N, K), see `Distiller.with_teacher_logits`

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"Split: x has {len(self.x)} samples but y has {len(self.y)} labels; give one label "
                            "per sample (x[i] is labelled y[i]).")
        for name, logits in (self.teacher_logits or {}).items():
            if len(logits) != len(self.y):
                raise DataError(f"Split: the cached logits of teacher '{name}' hold {len(logits)} rows for "
                                f"{len(self.y)} samples; recompute them with Distiller.with_teacher_logits.")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> Split:
        """The same samples on `device` (one copy, so that batches are taken there)."""
        logits = {k: v.to(device) for k, v in self.teacher_logits.items()} if self.teacher_logits else None
        return Split(self.x.to(device), self.y.to(device), logits)


Data = Split | Dataset  # what a split can be: in-memory tensors or a map-style Dataset of (input, target)


@dataclass(frozen=True)
class Splits:
    train: Data
    val: Data
    test: Data
    transfer: torch.Tensor | Dataset | None  # (M, *input_shape), unlabeled (a Dataset yields label -1)
    num_classes: int  # classes; for a language model, the vocabulary
    input_shape: tuple[int, ...]
    class_names: list[str]
    task: str = "classify"  # or "lm": inputs and targets are (N, T) tokens, the model gives (B, T, V) logits

    def with_transfer(self) -> Data:
        """The labelled training split followed by the transfer set, labelled -1."""
        if self.transfer is None or len(self.transfer) == 0:
            return self.train
        if isinstance(self.train, Split) and isinstance(self.transfer, torch.Tensor):
            unlabeled = torch.full((len(self.transfer),), UNLABELED, dtype=torch.long)
            return Split(torch.cat([self.train.x, self.transfer]), torch.cat([self.train.y, unlabeled]))
        return ConcatDataset([self.train, self.transfer])


def take(data: Data, index: torch.Tensor | list[int]) -> Split:
    """The samples at `index` as in-memory tensors (a calibration set, a dry-run batch, ...)."""
    if isinstance(data, Split):
        return Split(data.x[index], data.y[index])
    items = [data[int(i)] for i in index]
    if not items:
        return Split(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    return Split(torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([int(y) for _, y in items]))


def in_memory(data: Data) -> Split:
    """All of `data` as tensors: for evaluation and export, which need the whole test or validation split."""
    return data if isinstance(data, Split) else take(data, range(len(data)))


@dataclass(frozen=True)
class RawData:
    """What a source gives before splitting; `x_test` is None when the source has no fixed test split."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    transfer: np.ndarray | None = None
    class_names: list[str] | None = None


# --- sources ----------------------------------------------------------------------------------


def mnist1d(num_samples: int = 5000, seed: int = 42, transfer_size: int = 0, transfer_seed: int = 1,
            cache: bool = True) -> RawData:
    """MNIST-1D (Greydanus 2020) generated with `mnist1d.data.make_dataset`, no download.

    The published split is kept: the first 80% train, the last 20% test. The transfer set is
    generated with `transfer_seed` in chunks on all cores (forked workers: numpy only) and cached under $DISTIL_CACHE
    (default ~/.cache/distil).
    """
    key = json.dumps([num_samples, seed, transfer_size, transfer_seed])
    path = _cache_dir() / f"mnist1d-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
    if cache and path.is_file():
        with np.load(path) as f:
            return RawData(f["x"], f["y"], f["x_test"], f["y_test"], f["transfer"] if transfer_size else None)
    chunks = [(num_samples, seed, 0.8)]
    per_chunk = 12500
    for i in range(0, transfer_size, per_chunk):
        chunks.append((min(per_chunk, transfer_size - i), transfer_seed * 1000 + i // per_chunk, 1.0))
    if len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=min(len(chunks), os.cpu_count() or 1),
                                 mp_context=get_context("fork")) as pool:
            parts = list(pool.map(_mnist1d_chunk, chunks))
    else:
        parts = [_mnist1d_chunk(chunks[0])]
    main = parts[0]  # (N, 40) signals -> (N, 1, 40): one channel
    transfer = np.concatenate([p["x"] for p in parts[1:]])[:, None] if transfer_size else np.zeros((0, 1, 40))
    data = RawData(main["x"][:, None], main["y"], main["x_test"][:, None], main["y_test"],
                   transfer if transfer_size else None)
    if cache:
        _save_cache(path, data, transfer)
    return data


def _mnist1d_chunk(spec: tuple[int, int, float]) -> dict:
    from mnist1d.data import get_dataset_args, make_dataset

    num_samples, seed, train_split = spec
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    state = np.random.get_state()  # make_dataset reseeds numpy's global generator
    data = make_dataset(args)
    np.random.set_state(state)
    return {k: data[k] for k in ("x", "y", "x_test", "y_test")}


def _cache_dir() -> Path:
    return Path(os.environ.get("DISTIL_CACHE", Path.home() / ".cache" / "distil"))


def _save_cache(path: Path, data: RawData, transfer: np.ndarray) -> None:
    from distil.checkpoint import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, x=data.x, y=data.y, x_test=data.x_test, y_test=data.y_test, transfer=transfer)

    try:
        atomic_write(path, write)
    except OSError:
        pass  # a cache we cannot write only costs time


def digits() -> RawData:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), as (1, 8, 8) images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return RawData(data.images[:, None].astype(np.float32), data.target, class_names=[str(c) for c in range(10)])


def npz(path: str, transfer_path: str | None = None, x_key: str = "x", y_key: str = "y") -> RawData:
    """Arrays in a `.npz` file: `x` (N, ...) and `y` (N,); `x_test`/`y_test` used as the test split if present."""
    with _open_npz(path) as f:
        for key in (x_key, y_key):
            if key not in f:
                raise DataError(f"{path} has no array '{key}' (it has {sorted(f.files)}). Set data.args.x_key/y_key.")
        test = (f["x_test"], f["y_test"]) if "x_test" in f and "y_test" in f else (None, None)
        x, y = f[x_key], f[y_key]
    transfer = None
    if transfer_path:
        with _open_npz(transfer_path) as f:
            transfer = f[x_key] if x_key in f else f[f.files[0]]
    return RawData(x, y, *test, transfer=transfer)


def _open_npz(path: str):
    if not Path(path).is_file():
        raise DataError(f"data file not found: {path}. Check data.args.path (relative paths start at the current "
                        "folder).")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"cannot read {path} as .npz: {err}") from err


def cifar(path: str, labels: str = "fine") -> RawData:
    """CIFAR-10 or CIFAR-100 from a local folder in the official binary format (no pickle), as (3, 32, 32) images."""
    from distil.cifar import cifar as read

    return read(path, labels)


def csv(path: str, label: str = "label", transfer_path: str | None = None) -> RawData:
    """A CSV table with a header; `label` names the class column, every other column is a numeric feature."""
    x, y, names = _read_csv(path, label)
    transfer = _read_csv(transfer_path, None)[0] if transfer_path else None
    return RawData(x, y, transfer=transfer, class_names=names)


def _read_csv(path: str, label: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features (N, D) float32, class codes (N,) and class names of a CSV file; every problem names its line."""
    import csv as csvlib

    if not Path(path).is_file():
        raise DataError(f"CSV file not found: {path}. Check data.args.path.")
    with open(path, newline="") as f:
        lines = [(number, row) for number, row in enumerate(csvlib.reader(f), start=1) if any(c.strip() for c in row)]
    if len(lines) < 2:
        raise DataError(f"{path} has no data rows (a header line and at least one row are needed)")
    (_, header), body = lines[0], lines[1:]
    if label is not None and label not in header:
        raise DataError(f"{path} has no column '{label}' (columns: {header}). Set data.args.label.")
    label_col = header.index(label) if label is not None else None
    feature_names = [h for i, h in enumerate(header) if i != label_col]
    for number, row in body:
        if len(row) != len(header):
            raise DataError(f"{path}, line {number}: {len(row)} cells where the header has {len(header)}. "
                            "Every row needs one value per column.")
        if label_col is not None and not row[label_col].strip():
            raise DataError(f"{path}, line {number}: the label column '{label}' is empty. Label every row, or "
                            "move unlabeled rows to a transfer file (data.args.transfer_path).")
        for col, value in enumerate(v for i, v in enumerate(row) if i != label_col):
            if not _is_number(value):
                raise DataError(f"{path}, line {number}, column '{feature_names[col]}': the value {value!r} is not "
                                "a finite number. Every feature cell must be a number: fill or drop missing values.")
    x = np.array([[float(v) for i, v in enumerate(row) if i != label_col] for _, row in body], dtype=np.float32)
    if label_col is None:
        return x, np.zeros(0), []
    class_names = sorted({row[label_col] for _, row in body})
    codes = {name: code for code, name in enumerate(class_names)}
    return x, np.array([codes[row[label_col]] for _, row in body]), class_names


def _is_number(value: str) -> bool:
    try:
        return bool(np.isfinite(float(value)))
    except ValueError:
        return False


SOURCES = {"mnist1d": mnist1d, "digits": digits, "npz": npz, "imagefolder": imagefolder, "csv": csv, "cifar": cifar,
           "pycorpus": pycorpus, "textfolder": textfolder}


# --- splitting --------------------------------------------------------------------------------


def resolve_source(source: str):
    """A source function: a name of `SOURCES`, or the user's own as 'package.module:function' returning RawData."""
    if source in SOURCES:
        return SOURCES[source]
    if ":" in source:
        return import_object(source, "data.source")
    raise DataError(f"unknown data source '{source}'." + did_you_mean(source, SOURCES)
                    + " Or give your own as 'package.module:function' returning distil.data.RawData.")


def load_splits(source: str, args: dict, seed: int = 0, val_fraction: float = 0.1,
                test_fraction: float = 0.2, normalize: tuple[list[float], list[float]] | None = None) -> Splits:
    """Run a source, then split (deterministically from `seed`) and normalise: with `normalize`'s per-channel
    (mean, std) when given, else with statistics of the training split."""
    fn = resolve_source(source)
    raw = fn(**bind_kwargs(fn, args, f"data.args (source '{source}')"))
    if not isinstance(raw, (RawData, FileData, TextData)):
        raise DataError(f"data source '{source}' returned a {type(raw).__name__}; a source returns "
                        "distil.data.RawData(x, y, ...) (arrays), distil.images.FileData (image files) or "
                        "distil.text.TextData (text files).")
    if isinstance(raw, TextData):
        return text_splits(raw, seed, val_fraction, test_fraction)
    if isinstance(raw, FileData):
        return file_splits(raw, seed, val_fraction, test_fraction, normalize)
    return make_splits(raw, seed, val_fraction, test_fraction, normalize)


def make_splits(raw: RawData, seed: int, val_fraction: float, test_fraction: float,
                normalize: tuple[list[float], list[float]] | None = None) -> Splits:
    x = np.asarray(raw.x, dtype=np.float32)
    if len(x) == 0:
        raise DataError("the data set is empty: the source returned no samples")
    if x.ndim < 2:
        raise DataError(f"x must hold one sample per row, (N, features...), got shape {list(x.shape)}")
    labels = [np.asarray(raw.y)] + ([np.asarray(raw.y_test)] if raw.x_test is not None else [])
    if any(lab.ndim != 1 for lab in labels) or len(x) != len(labels[0]):
        raise DataError(f"y must be one class label per sample: x has {len(x)} samples, y has shape "
                        f"{list(labels[0].shape)}. One-hot labels: pass y.argmax(1).")
    # labels of any values (strings, 1..10, -1) become 0..K-1; -1 is reserved for unlabeled transfer samples
    values, codes = np.unique(np.concatenate(labels), return_inverse=True)
    y = codes[: len(labels[0])].astype(np.int64)
    class_names = raw.class_names if raw.class_names and len(raw.class_names) == len(values) else [
        str(v) for v in values]
    rng = np.random.default_rng(seed)
    if raw.x_test is None:
        x, y, x_test, y_test = _hold_out(x, y, test_fraction, rng)
    else:
        x_test, y_test = np.asarray(raw.x_test, dtype=np.float32), codes[len(labels[0]):].astype(np.int64)
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"x_test samples have shape {list(x_test.shape[1:])}, x samples {list(x.shape[1:])}: "
                            "they must match")
    x, y, x_val, y_val = _hold_out(x, y, val_fraction, rng)
    if len(x) == 0 or len(x_test) == 0:
        raise DataError(f"too few samples ({len(raw.x)}) to split into train/val/test; give more data")
    mean, std = _given_stats(normalize, x.shape) if normalize else _stats(x)
    norm = lambda a: torch.from_numpy((a - mean) / std).float()  # noqa: E731
    transfer = norm(np.asarray(raw.transfer, dtype=np.float32)) if raw.transfer is not None else None
    if transfer is not None and transfer.shape[1:] != x.shape[1:]:
        raise DataError(f"the transfer set's samples have shape {list(transfer.shape[1:])}, "
                        f"the labelled data's {list(x.shape[1:])}: they must match")
    return Splits(Split(norm(x), torch.from_numpy(y)), Split(norm(x_val), torch.from_numpy(y_val)),
                  Split(norm(x_test), torch.from_numpy(y_test)), transfer, len(values), tuple(x.shape[1:]),
                  class_names)


def text_splits(raw: TextData, seed: int, val_fraction: float, test_fraction: float) -> Splits:
    """Language-model splits: files shuffled into train/val/test, each cut into (N, block) byte blocks."""
    corpus = split_files(raw, seed, val_fraction, test_fraction)
    train, val, test = (Split(*blocks(data, raw.block)) for data in (corpus.train, corpus.val, corpus.test))
    return Splits(train, val, test, None, VOCAB, (raw.block,), [], task="lm")


def file_splits(raw: FileData, seed: int, val_fraction: float, test_fraction: float,
                normalize: tuple[list[float], list[float]] | None = None) -> Splits:
    """Stratified train/val/test splits of a file source, as lazily read `ImageFiles` datasets."""
    rng = np.random.default_rng(seed)
    index = np.arange(len(raw.files))
    rest, rest_y, test, test_y = _hold_out(index, raw.labels, test_fraction, rng)
    train, train_y, val, val_y = _hold_out(rest, rest_y, val_fraction, rng)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"too few images ({len(raw.files)}) to split into train/val/test; give more data")
    make = lambda idx, y, mean=None, std=None: ImageFiles([raw.files[i] for i in idx], y, raw.image_size,  # noqa: E731
                                                           raw.grayscale, mean, std)
    channels = 1 if raw.grayscale else 3
    mean, std = (_given_stats(normalize, (1, channels, 1, 1)) if normalize
                 else make(train, train_y).channel_stats(seed=seed))
    transfer = None
    if raw.transfer:
        transfer = ImageFiles(raw.transfer, np.full(len(raw.transfer), UNLABELED), raw.image_size, raw.grayscale,
                              mean, std)
    return Splits(make(train, train_y, mean, std), make(val, val_y, mean, std), make(test, test_y, mean, std),
                  transfer, len(raw.class_names), (channels, raw.image_size, raw.image_size), raw.class_names)


def _given_stats(normalize: tuple[list[float], list[float]], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The recipe's per-channel (mean, std), shaped to broadcast over samples (C, 1, ...)."""
    mean, std = (np.asarray(v, dtype=np.float32) for v in normalize)
    if len(shape) < 3 or len(mean) != shape[1]:
        raise DataError(f"data.augment normalize gives {len(mean)} channel means, but samples have shape "
                        f"{list(shape[1:])}: give one mean and std per channel (dimension 1).")
    extra = (1,) * (len(shape) - 2)
    return mean.reshape(-1, *extra), std.reshape(-1, *extra)


def _hold_out(x: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator):
    """Split off `fraction` of the samples, stratified by class. Returns (x_rest, y_rest, x_out, y_out)."""
    out = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        out.extend(idx[: int(round(len(idx) * fraction))])
    mask = np.zeros(len(y), dtype=bool)
    mask[out] = True
    return x[~mask], y[~mask], x[mask], y[mask]


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature statistics for tabular (N, D) data, per-channel for (N, C, ...)."""
    axes = (0,) if x.ndim == 2 else (0, *range(2, x.ndim))
    mean, std = x.mean(axis=axes, keepdims=True), x.std(axis=axes, keepdims=True)
    return mean[0], np.where(std[0] > 1e-8, std[0], 1.0)
