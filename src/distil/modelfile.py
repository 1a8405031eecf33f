"""Model files: safetensors weights plus plain-data metadata that rebuilds the module.

The metadata holds the model spec (zoo name or 'package.module:factory', knobs, input shape,
class count) and, for a channel-pruned model, its `structure` (new layer sizes). Nothing is pickled.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from distil.checkpoint import load_tensors, save_tensors
from distil.compress.prune import apply_structure, structure_of
from distil.errors import DistilError
from distil.models import build_model


def save_model_file(model: nn.Module, path: Path, spec: dict, pruned: bool = False, **extra) -> None:
    """Write `model`'s weights with its `spec` ({model, knobs, input_shape, num_classes, ...});
    a pruned model also records its layer sizes so that `load_model_file` can rebuild it."""
    meta = {**spec, **extra, "structure": structure_of(model) if pruned else None}
    save_tensors(path, model.state_dict(), meta)


def load_model_file(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild the module saved by `save_model_file` and load its weights; returns (model, metadata)."""
    tensors, meta = load_tensors(path)
    if "model" not in meta or "input_shape" not in meta:
        raise DistilError(f"{path} holds weights without a model description (not written by distil). "
                          "Build the model yourself and use distil.checkpoint.load_weights.")
    model = build_model(meta["model"], tuple(meta["input_shape"]), meta["num_classes"], **meta.get("knobs", {}))
    if meta.get("structure"):
        apply_structure(model, meta["structure"], tensors)
    model.load_state_dict(tensors)
    return model.eval(), meta
