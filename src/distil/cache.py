"""The teacher-output cache: a frozen teacher's logits on fixed inputs, computed once and kept on disk.

An entry is keyed by a hash of the teacher's weights, the inputs (the data after its preprocessing) and what was
computed, so a temperature sweep, a second student or a rerun after `--force` reuses it, and a changed teacher or
data set never gets stale targets. Entries are `.npy` files read memory-mapped (held in memory below
`memory_mb`), with a JSON index holding each file's checksum: a truncated or altered file is reported and rebuilt.
No pickles. `distil cache info|clear` manages the folder ($DISTIL_CACHE/teachers by default).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distil.checkpoint import atomic_write

log = logging.getLogger(__name__)


def default_folder() -> Path:
    return Path(os.environ.get("DISTIL_CACHE", Path.home() / ".cache" / "distil")) / "teachers"


def cache_keys(teacher: nn.Module, inputs: torch.Tensor, whats: list[str]) -> list[str]:
    """For each of `whats`, a hash of the teacher (its modules as printed, which shows settings that hold no
    weight, such as attention heads; its weights' names, shapes and values), the inputs and what is computed from
    them ("logits", "top5", "features:layer3"); the weights and inputs are read once."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(repr(teacher).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{tuple(inputs.shape)}:{inputs.dtype}".encode())
    digest.update(inputs.detach().cpu().contiguous().numpy().tobytes())
    keys = []
    for what in whats:
        one = digest.copy()
        one.update(what.encode())
        keys.append(one.hexdigest())
    return keys


def cache_key(teacher: nn.Module, inputs: torch.Tensor, what: str = "logits") -> str:
    """A hash of the teacher's weights (names, shapes, values), the inputs and `what` is computed from them."""
    return cache_keys(teacher, inputs, [what])[0]


def _checksum(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class TeacherCache:
    """A folder of cached teacher outputs: `get(key, compute)` returns the stored tensor or computes and stores it.

    `last_event` says what the latest `get` did: "reused", "built" or "rebuilt (<why>)". A `read_only` cache
    reads entries but never writes one ("computed" when it had to compute): under several processes, rank 0
    writes and the others compute for themselves what is not there yet, instead of waiting for it.
    """

    def __init__(self, folder: str | Path | None = None, memory_mb: float = 256.0, read_only: bool = False) -> None:
        self.folder = Path(folder) if folder else default_folder()
        self.memory_mb, self.read_only = memory_mb, read_only
        self.last_event = ""

    @property
    def index_path(self) -> Path:
        return self.folder / "index.json"

    def index(self) -> dict[str, dict]:
        try:
            return json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        entry, path = self.index().get(key), self.folder / f"{key}.npy"
        problem = self._problem(entry, path)
        if problem is None:
            self.last_event = "reused"
            return self._read(path, entry)
        if self.read_only:
            self.last_event = "computed"
            return compute().detach().cpu().contiguous()
        if problem != "absent":
            log.warning("teacher cache entry %s is %s: rebuilding it", key, problem)
        values = compute().detach().cpu().contiguous()
        self._write(key, path, values)
        self.last_event = "built" if problem == "absent" else f"rebuilt ({problem})"
        return values

    def _problem(self, entry: dict | None, path: Path) -> str | None:
        if entry is None or not path.is_file():
            return "absent"
        if path.stat().st_size != entry["bytes"]:
            return f"truncated ({path.stat().st_size} of {entry['bytes']} bytes)"
        if _checksum(path) != entry["checksum"]:
            return "corrupt (checksum mismatch)"
        return None

    def _read(self, path: Path, entry: dict) -> torch.Tensor:
        in_memory = entry["bytes"] <= self.memory_mb * 2**20
        array = np.load(path, mmap_mode=None if in_memory else "c", allow_pickle=False)  # c: copy on write
        return torch.from_numpy(array)

    def _write(self, key: str, path: Path, values: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, values.numpy(), allow_pickle=False)

        atomic_write(path, save)
        index = self.index()
        index[key] = {"bytes": path.stat().st_size, "checksum": _checksum(path), "shape": list(values.shape),
                      "dtype": str(values.dtype).removeprefix("torch."), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        payload = json.dumps(index, indent=1)
        atomic_write(self.index_path, lambda tmp: tmp.write_text(payload))

    def clear(self) -> int:
        """Remove every entry; return how many files were removed."""
        removed = 0
        for path in self.folder.glob("*.npy"):
            path.unlink()
            removed += 1
        self.index_path.unlink(missing_ok=True)
        return removed


def top_k_pack(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest logits, their classes, and the log of the other classes' total mass (at T=1).

    (N, K) -> (N, 2k + 1): [values (k) | class indices as floats (k) | log sum exp of the rest (1)]. The rest is
    -inf when k == K. As in DistillKit's sparse targets, the classes outside the top k are later given equal shares
    of that mass.
    """
    values, indices = logits.topk(k, dim=-1)  # (N, k)
    rest = logits.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True)  # (N, 1)
    return torch.cat([values, indices.float(), rest], dim=-1)


def top_k_unpack(packed: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dense (N, K) (or (N, T, K) per token) logits from `top_k_pack`: the top k as stored, every other class
    at log(rest mass / (K - k)),
    so softmax at T=1 keeps the stored probabilities and the rest's total; exact when k == K."""
    k = (packed.shape[-1] - 1) // 2
    values, indices, rest = packed[..., :k], packed[..., k:2 * k].long(), packed[..., -1:]  # (..., k/k/1)
    others = num_classes - k
    fill = rest - math.log(max(others, 1))  # (..., 1): each remaining class's logit
    dense = fill.expand(*fill.shape[:-1], num_classes).clone()  # (..., K); per token for (N, T, 2k+1)
    return dense.scatter(-1, indices, values)
