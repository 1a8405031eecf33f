"""Pruning: unstructured magnitude pruning (torch.nn.utils.prune, made permanent) and structured
channel pruning with torch-pruning, whose dependency graph keeps the network consistent.

A channel-pruned model is a smaller dense model. It is saved as safetensors weights plus a
plain-data `structure` (the new sizes of every resized layer) that rebuilds it from the original
architecture; nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from distil.errors import DistilError, ModelError
from distil.taps import get_module

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
# module types whose parameters torch-pruning knows how to slice
SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm1d,
             nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
             nn.PReLU, nn.Embedding, nn.LSTM, nn.MultiheadAttention)
# the attributes that describe a resized layer, per type
SHAPE_ATTRS = {
    nn.Conv1d: ("in_channels", "out_channels", "groups"), nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: ("num_features",), nn.BatchNorm2d: ("num_features",),
    nn.LayerNorm: ("normalized_shape",), nn.GroupNorm: ("num_channels",), nn.PReLU: ("num_parameters",),
}


def check_ratio(value: float, field: str) -> float:
    if not 0 < value < 1:
        raise DistilError(f"{field} must be between 0 and 1 (exclusive), got {value}. "
                          "For example 0.5 removes half of the channels or weights.")
    return value


def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "global", exclude: tuple[str, ...] = (),
                    permanent: bool = True) -> dict:
    """Zero the `sparsity` fraction of smallest-magnitude weights of every Conv/Linear layer, either
    ranked across the whole model (`scope="global"`) or within each layer (`"layer"`).

    With `permanent=False` the masks stay (weight = weight_orig * weight_mask), so a fine-tune keeps
    the zeros; call `make_permanent` afterwards. Returns {"sparsity": achieved fraction of zeros
    among the pruned weights, "layers": n}. Dense kernels do not run faster on zeros: the gain is
    in compressed size.
    """
    check_ratio(sparsity, "compress.ratio")
    targets = [(m, "weight") for name, m in model.named_modules() if isinstance(m, PRUNABLE) and name not in exclude]
    if not targets:
        raise DistilError("the model has no Conv or Linear layers to prune")
    if scope == "global":
        torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    elif scope == "layer":
        for module, name in targets:
            torch_prune.l1_unstructured(module, name, amount=sparsity)
    else:
        raise DistilError(f"compress.scope must be 'global' or 'layer', got {scope!r}")
    if permanent:
        make_permanent(model)
    return {"method": "magnitude", "scope": scope, "ratio": sparsity, "sparsity": sparsity_of(model, exclude),
            "layers": len(targets)}


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight (weight_orig * mask -> weight) and drop the mask."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
    return model


def sparsity_of(model: nn.Module, exclude: tuple[str, ...] = ()) -> float:
    """Fraction of exact zeros among the weights of Conv/Linear layers."""
    weights = [m.weight for name, m in model.named_modules() if isinstance(m, PRUNABLE) and name not in exclude]
    return sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))


def check_prunable(model: nn.Module, exclude: tuple[str, ...]) -> None:
    """Refuse layers whose own parameters torch-pruning cannot slice, naming them."""
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False)]
        if own and not isinstance(module, SUPPORTED) and name not in exclude:
            raise ModelError(
                f"structured pruning cannot handle module '{name}' ({type(module).__name__}): it holds parameters "
                f"of its own that torch-pruning does not know how to slice. Exclude it with "
                f"compress.exclude: ['{name}'] (its neighbours then keep their channels too), or use "
                "compress.method: magnitude.")


def channel_prune(model: nn.Module, example_inputs: torch.Tensor, ratio: float, importance: str = "l2",
                  target: str = "channels", steps: int = 1, exclude: tuple[str, ...] = (),
                  between_steps: Callable[[int], None] | None = None,
                  taylor_loss: Callable[[nn.Module], torch.Tensor] | None = None) -> dict:
    """Remove channels with torch-pruning, in place. The classifier (the last Linear) is never pruned.

    `target="channels"`: remove `ratio` of the channels of every prunable layer group, in `steps`
    equal steps. `target="macs"`: keep pruning (up to 90% of channels, in up to 20 steps) until the
    MACs are at most `ratio` of the original. `between_steps(step)` runs after each step (a short
    fine-tune). Returns a plain-data history: MACs and parameters before and after each step.
    """
    import torch_pruning as tp

    check_ratio(ratio, "compress.ratio")
    check_prunable(model, exclude)
    ignored = [get_module(model, name, "model to prune") for name in exclude]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ignored += linears[-1:]  # the classifier's outputs are the classes
    scores = {"l1": tp.importance.GroupMagnitudeImportance(p=1), "l2": tp.importance.GroupMagnitudeImportance(p=2),
              "taylor": tp.importance.GroupTaylorImportance()}
    if importance not in scores:
        raise DistilError(f"compress.importance must be one of {sorted(scores)}, got {importance!r}")
    by_macs = target == "macs"
    if target not in ("channels", "macs"):
        raise DistilError(f"compress.target must be 'channels' or 'macs', got {target!r}")
    total_steps = 20 if by_macs else steps
    model.eval()
    pruner = tp.pruner.BasePruner(model, example_inputs, importance=scores[importance],
                                  pruning_ratio=0.9 if by_macs else ratio, iterative_steps=total_steps,
                                  ignored_layers=ignored)
    base_macs, base_params = tp.utils.count_ops_and_params(model, example_inputs)
    history = [{"step": 0, "macs": int(base_macs), "params": int(base_params)}]
    for step in range(1, total_steps + 1):
        if importance == "taylor":
            model.zero_grad()
            taylor_loss(model).backward()
        pruner.step()
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
        history.append({"step": step, "macs": int(macs), "params": int(params)})
        if by_macs and macs <= ratio * base_macs or step == total_steps:
            break  # no fine-tune after the last step: the caller's fine-tune follows
        if between_steps is not None:
            between_steps(step)
    _check_forward(model, example_inputs)
    return {"method": "channels", "importance": importance, "target": target, "ratio": ratio, "history": history}


def _check_forward(model: nn.Module, example_inputs: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            model(example_inputs)
    except RuntimeError as err:
        raise ModelError(f"the pruned model no longer runs ({err}). A layer whose channels are tied to its "
                         "neighbours in a way torch-pruning cannot see was pruned: add it to compress.exclude."
                         ) from err


def structure_of(model: nn.Module) -> dict[str, dict]:
    """Plain data: for every layer with shape attributes, their current values."""
    out = {}
    for name, module in model.named_modules():
        attrs = SHAPE_ATTRS.get(type(module))
        if attrs:
            out[name] = {a: (list(v) if isinstance(v := getattr(module, a), tuple) else v) for a in attrs}
    return out


def apply_structure(model: nn.Module, structure: dict[str, dict], state: dict[str, torch.Tensor]) -> nn.Module:
    """Resize the layers of a freshly built `model` to `structure`, with parameters and buffers
    shaped as in `state`, so that `model.load_state_dict(state)` fits."""
    for name, attrs in structure.items():
        module = get_module(model, name, "model to rebuild")
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        for pname, param in list(module.named_parameters(recurse=False)):
            key = f"{name}.{pname}"
            if key in state:
                setattr(module, pname, nn.Parameter(torch.empty_like(state[key]), requires_grad=param.requires_grad))
        for bname, buf in list(module.named_buffers(recurse=False)):
            key = f"{name}.{bname}"
            if key in state and buf is not None:
                module.register_buffer(bname, torch.empty_like(state[key]))
    return model
