"""Checkpoints: safetensors files written atomically (temp file + rename), loaded safely.

A `.pt`/`.pth` file is read only through `torch.load(weights_only=True)`; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from distil.errors import DistilError, ModelError


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, then rename the temp file onto `path` so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Atomically save tensors (made contiguous, shared storage split) with JSON metadata."""
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    metadata = {"distil": json.dumps(meta or {})}
    atomic_write(Path(path), lambda tmp: save_file(flat, str(tmp), metadata=metadata))


def load_tensors(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (onto `device`, whatever device wrote them) and the JSON metadata written by `save_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise DistilError(f"checkpoint file not found: {path}. Check the path, or rerun the stage that writes it.")
    try:
        tensors = load_file(str(path), device=str(device))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("distil", "{}")
    except (SafetensorError, OSError) as err:
        raise DistilError(f"cannot read checkpoint {path}: {err}. Is it a safetensors file?") from err
    return tensors, json.loads(raw)


def save_model(model: nn.Module, path: Path, meta: dict | None = None) -> None:
    save_tensors(path, model.state_dict(), meta)


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load a `.safetensors` or (weights-only) `.pt` state dict into `model`, strictly.

    A mismatch is reported with the missing and unexpected keys and shapes.
    """
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        if not path.is_file():
            raise DistilError(f"checkpoint file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as err:
            raise ModelError(f"{path} holds more than tensors (a pickled object), and distil loads .pt files only "
                             "with weights_only=True. Save a state dict instead: torch.save(model.state_dict(), "
                             f"path), or use safetensors. ({str(err).splitlines()[0]})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"{path} does not hold a state dict (names to tensors) but a {type(state).__name__}. "
                             "Save one with torch.save(model.state_dict(), path), or use safetensors.")
    else:
        state, _ = load_tensors(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ModelError(
            f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {wrong[:5]}. Does the recipe's model spec match the "
            "one that produced the checkpoint?")
    model.load_state_dict(state)
    return model
