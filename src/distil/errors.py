"""Errors that tell the user what is wrong, where, and how to fix it.

Every error raised on user input is a `DistilError`; the CLI prints its message and exits 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DistilError(Exception):
    """Base class for errors caused by user input (recipe, data, model, files)."""


class ConfigError(DistilError, ValueError):
    """An argument of a distil class or function is invalid (a bad temperature, a negative weight, ...).

    Also a `ValueError`, so code that catches those keeps working."""


class RecipeError(ConfigError):
    """A recipe field is unknown, of the wrong type, or out of range."""


class DataError(DistilError):
    """A data source is missing, empty or malformed."""


class ModelError(DistilError):
    """A model cannot be built, loaded, or paired with another model."""


class TapError(DistilError):
    """A feature tap names a module that does not exist."""


class ShapeError(DistilError):
    """Two features (or outputs) cannot be connected because of their shapes."""


class NonFiniteLossError(DistilError):
    """The training loss became NaN or infinite."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates nearest to `name` (difflib ratio), best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.4)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' Did you mean 'x'?' when a close candidate exists, else the list of valid names."""
    candidates = sorted(set(candidates))
    if not candidates:
        return " It takes none."
    near = closest(name, candidates, n=3)
    if near:
        return " Did you mean " + " or ".join(repr(c) for c in near) + "?"
    shown = ", ".join(candidates[:20]) + (", ..." if len(candidates) > 20 else "")
    return f" Valid names: {shown}."
