"""Binding keyword arguments from a recipe to a function's signature (a leaf module: imports no other part of distil
but its errors).

    bind_kwargs(KD, {"T": 4, "weight": 0.9}, "distill.terms[0]")  # -> {"T": 4.0, "weight": 0.9}
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model

from distil.errors import DistilError, RecipeError, did_you_mean


def bind_kwargs(fn, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate `kwargs` against `fn`'s signature (names and annotated types) and return them coerced.

    An unknown name or a wrong type raises `RecipeError` naming `where` and the allowed names.
    """
    sig = inspect.signature(fn, eval_str=True)
    skip = {"self", "input_shape", "num_classes"}
    params = {n: p for n, p in sig.parameters.items() if n not in skip and p.kind not in (p.VAR_POSITIONAL,)}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    fields = {n: (Any if p.annotation is p.empty else p.annotation, ... if p.default is p.empty else p.default)
              for n, p in params.items()}
    config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model = create_model(f"{getattr(fn, '__name__', 'options')}_options", __config__=config, **fields)
    try:
        validated = model.model_validate(kwargs)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            name = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                allowed = f"allowed: {sorted(fields)}" if fields else "it takes no options"
                near = did_you_mean(name, fields) if fields else ""
                problems.append(f"unknown option '{name}' ({allowed})." + near)
            else:
                problems.append(f"'{name}': {e['msg']} (got {e.get('input')!r})")
        raise RecipeError(f"{where}: " + " ".join(problems)) from None
    return {k: getattr(validated, k) for k in kwargs}


def import_object(spec: str, where: str, error: type[DistilError] = RecipeError) -> Any:
    """'package.module:name' -> the object, for a user's own loss term, data source or model factory; `where`
    names the field or the model, `error` is the error raised when that fails."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise error(f"{where}: '{spec}' must look like 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise error(f"{where}: cannot import module '{module_name}' ({err}). Is it on PYTHONPATH (run from its "
                    "folder, or pip install it)?") from err
    if not hasattr(module, attr):
        raise error(f"{where}: module '{module_name}' has no '{attr}'." + did_you_mean(attr, dir(module)))
    return getattr(module, attr)
