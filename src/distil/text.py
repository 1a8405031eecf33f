"""Text for language models: a corpus of files, split by file, tokenised at byte level, cut into blocks.

    pycorpus()                       the Python standard library's own .py files: real text on every machine
    textfolder("path/to/texts")      a user's folder of text files (*.txt, *.md, *.py, ... by `pattern`)

Byte-level tokens (vocabulary 256) need no tokenizer download, and make the loss in bits per token the
loss in bits per byte. Each split concatenates its files (a blank line between two) and is cut into
blocks of `block` tokens: inputs `x[i] = bytes[s : s + block]`, targets `y[i] = bytes[s + 1 : s + block + 1]`
(the next byte at every position), both (N, block) int64. Files are assigned to train/val/test by a
seeded shuffle, so no file's text is in two splits.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distil.errors import DataError

VOCAB = 256  # byte-level tokens
SEPARATOR = b"\n\n"  # between two files of one split
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}  # stdlib: tests repeat, idlelib is an app


@dataclass(frozen=True)
class TextData:
    """What a text source gives before splitting: the files in a fixed order, the block length, and each
    split's byte budget (files are read until it is reached)."""

    files: list[Path]
    root: Path
    block: int = 128
    max_bytes: tuple[int, int, int] = (2_000_000, 200_000, 200_000)  # train, val, test


def pycorpus(root: str | None = None, block: int = 128, train_bytes: int = 2_000_000,
             eval_bytes: int = 200_000) -> TextData:
    """The `.py` files of the Python standard library (`sysconfig`'s stdlib folder; or `root`), without its
    test suites and site-packages: about 11 MB of source for Python 3.11, of which the splits read their
    budgets (`train_bytes`; `eval_bytes` each for val and test)."""
    folder = Path(root) if root else Path(sysconfig.get_paths()["stdlib"])
    return _collect(folder, "*.py", SKIP_DIRS, "data.args.root", block, (train_bytes, eval_bytes, eval_bytes))


def textfolder(path: str, pattern: str = "*.txt", block: int = 128, train_bytes: int = 2_000_000,
               eval_bytes: int = 200_000) -> TextData:
    """A folder of text files (searched recursively for `pattern`, e.g. '*.md' or '*.py')."""
    return _collect(Path(path), pattern, {"__pycache__", ".git"}, "data.args.path", block,
                    (train_bytes, eval_bytes, eval_bytes))


def _collect(folder: Path, pattern: str, skip: set[str], field: str, block: int,
             max_bytes: tuple[int, int, int]) -> TextData:
    if block < 2:
        raise DataError(f"data.args.block must be at least 2 tokens, got {block}")
    if min(max_bytes) <= block:
        raise DataError(f"data.args: each split's byte budget must exceed one block ({block}), got {max_bytes}")
    if not folder.is_dir():
        raise DataError(f"{field}: '{folder}' is not a folder. Give a folder that holds the text files.")
    files = sorted(p for p in folder.rglob(pattern)
                   if p.is_file() and not skip & set(p.relative_to(folder).parts[:-1]) and p.stat().st_size > 0)
    if len(files) < 3:
        raise DataError(f"{field}: found {len(files)} non-empty file(s) matching '{pattern}' under '{folder}'; "
                        "a language-model corpus needs at least 3 (one each for train, val and test).")
    return TextData(files, folder, block, max_bytes)


@dataclass(frozen=True)
class Corpus:
    """The three splits as byte arrays, and which files went where."""

    train: np.ndarray  # (n,) uint8
    val: np.ndarray
    test: np.ndarray
    files: dict[str, list[str]]  # split -> file paths relative to the root


def split_files(text: TextData, seed: int, val_fraction: float, test_fraction: float) -> Corpus:
    """Shuffle the files with `seed`, give each split its share, and read each split up to its byte budget."""
    order = np.random.default_rng(seed).permutation(len(text.files))
    n_val = max(1, round(len(order) * val_fraction))
    n_test = max(1, round(len(order) * test_fraction))
    chosen = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    arrays, names = {}, {}
    max_bytes = dict(zip(("train", "val", "test"), text.max_bytes))
    for split, index in chosen.items():
        data, used = bytearray(), []
        for i in index:
            if len(data) >= max_bytes[split]:
                break
            data += text.files[i].read_bytes() + SEPARATOR
            used.append(str(text.files[i].relative_to(text.root)))
        arrays[split], names[split] = np.frombuffer(bytes(data[: max_bytes[split]]), dtype=np.uint8), used
    return Corpus(arrays["train"], arrays["val"], arrays["test"], names)


def blocks(data: np.ndarray, block: int, stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, (N, block) int64 each, from consecutive windows `stride` bytes apart
    (`block` by default: every byte is predicted once)."""
    stride = stride or block
    if len(data) < block + 1:
        raise DataError(f"a split holds {len(data)} bytes, fewer than one block of {block} + 1: lower "
                        "data.args.block or give more text")
    tokens = torch.from_numpy(data.astype(np.int64))
    starts = torch.arange(0, len(data) - block, stride)
    window = starts[:, None] + torch.arange(block + 1)  # (N, block + 1)
    chunk = tokens[window]
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def decode(tokens: torch.Tensor | list[int]) -> str:
    """Bytes to text; bytes that are not valid UTF-8 show as U+FFFD."""
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
    return bytes(int(v) for v in values).decode("utf-8", errors="replace")


def encode(text: str) -> torch.Tensor:
    """Text to byte tokens, (n,) int64."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
