"""Building models from names: our zoo, the user's `package.module:factory`, timm/torchvision when installed, or a
local Hugging Face causal language model (`hf:/path/to/model`, with transformers installed)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from distil.binding import import_object
from distil.errors import ModelError, did_you_mean
from distil.models.hf import hf_factory
from distil.models.zoo import MODELS

__all__ = ["MODELS", "build_model", "count_params", "resolve_factory"]


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """A zoo name, `package.module:factory`, `timm:NAME`, `torchvision:NAME` or `hf:PATH` -> a callable."""
    if name in MODELS:
        return MODELS[name]
    if name.startswith("hf:"):
        return hf_factory(name[len("hf:"):])
    if name.startswith(("timm:", "torchvision:")):
        return _hub_factory(*name.split(":", 1))
    if ":" in name:
        return import_object(name, f"model '{name}'", ModelError)
    raise ModelError(f"unknown model '{name}'." + did_you_mean(name, MODELS)
                     + " Or give your own as 'package.module:factory'.")


def _hub_factory(hub: str, arch: str) -> Callable[..., nn.Module]:
    try:
        lib = importlib.import_module(hub)
    except ImportError as err:
        raise ModelError(f"model '{hub}:{arch}' needs the optional package '{hub}': pip install {hub}") from err

    def factory(input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
        if hub == "timm":
            return lib.create_model(arch, num_classes=num_classes, in_chans=input_shape[0], **kwargs)
        return getattr(lib.models, arch)(num_classes=num_classes, **kwargs)

    return factory


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **knobs) -> nn.Module:
    """Build a model; zoo factories get `(input_shape, num_classes, **knobs)`.

    A user factory gets `input_shape` and `num_classes` only if its signature names them.
    Unknown knobs are an error naming the allowed ones.
    """
    factory = resolve_factory(name)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    allowed = [p for p in params if p not in ("input_shape", "num_classes")]
    unknown = [k for k in knobs if k not in params and not takes_any]
    if unknown:
        raise ModelError(f"model '{name}' has no option {unknown[0]!r}; allowed: {allowed}."
                         + did_you_mean(unknown[0], allowed))
    given = {"input_shape": tuple(input_shape), "num_classes": num_classes}
    kwargs = {k: v for k, v in given.items() if k in params}
    try:
        model = factory(**kwargs, **knobs)
    except ModelError:
        raise
    except Exception as err:  # a user's factory may raise anything
        raise ModelError(f"cannot build model '{name}' with {knobs}: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory '{name}' returned {type(model).__name__}, not a torch nn.Module")
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
