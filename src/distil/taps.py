"""Feature taps: forward hooks on submodules chosen by name, collecting their outputs for one pass.

    with FeatureTaps(model, ["layer2"]) as taps:
        logits = model(x)
    feat = taps.outputs["layer2"]   # (B, C, ...)

No model surgery: the hooks are removed on exit, so the model stays exportable.
"""

from __future__ import annotations

import torch
from torch import nn

from distil.errors import TapError, closest


def get_module(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """`model.get_submodule(name)`, with an error listing the nearest valid names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        near = closest(name, names) or names[:8]
        raise TapError(f"the {role} has no module named '{name}'. Closest valid names: "
                       f"{', '.join(near)}. All names: `distil.taps.module_names(model)`.") from None


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


class FeatureTaps:
    """Collects the outputs of named submodules during a forward pass (a context manager)."""

    def __init__(self, model: nn.Module, names: list[str], role: str = "model") -> None:
        self.modules = {name: get_module(model, name, role) for name in names}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> FeatureTaps:
        self.outputs = {}
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook
