"""Feature taps: forward hooks on submodules chosen by name, collecting their outputs for one pass.

    with FeatureTaps(model, ["layer2"]) as taps:
        logits = model(x)
    feat = taps.outputs["layer2"]   # (B, C, ...)

No model surgery: the hooks are removed on exit, so the model stays exportable; a compiled `fit` holds them
for its graphs (`FeatureTaps.hold`, recording nothing outside a tapped pass) and removes them when it ends.
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
    """Collects the outputs of named submodules during a forward pass (a context manager, or `start`/`stop`).

    By default the hooks are registered on entry and removed on exit. `hold()` registers them once and keeps
    them (until `release()`), recording only between `start` and `stop`: torch.compile cannot register a hook
    inside a graph, but traces the hooks a module already has, so a compiled step taps its layers without a
    graph break. Held hooks outside a pass record nothing (`fold_batchnorm` and exports pass them by).
    """

    def __init__(self, model: nn.Module, names: list[str], role: str = "model") -> None:
        self.modules = {name: get_module(model, name, role) for name in names}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._held = False
        self._recording = False

    def start(self) -> None:
        """Record the next forward pass (registering the hooks unless they are held)."""
        self.outputs = {}
        self._recording = True
        if not self._held:
            self._register()

    def stop(self) -> None:
        self._recording = False
        if not self._held:
            self._remove()

    def __enter__(self) -> FeatureTaps:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def hold(self) -> None:
        """Keep the hooks registered from now on, recording only between `start` and `stop`."""
        if not self._held:
            self._remove()
            self._register()
            self._held = True

    def release(self) -> None:
        """Remove held hooks: back to registering them for each pass."""
        if self._held:
            self._remove()
            self._held = False

    def _register(self) -> None:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            if self._recording:
                self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output

        hook.distil_tap = True  # a tap of distil's: records nothing outside a pass (see `fold_batchnorm`)
        return hook


def is_tap(hook) -> bool:
    """Whether a module hook is one of distil's feature taps (which record nothing outside a tapped pass)."""
    return getattr(hook, "distil_tap", False)
