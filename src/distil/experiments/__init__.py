"""Research experiments run by `distil experiment NAME`; each writes a markdown page with its table and the command.

`EXPERIMENTS` maps a name to a function `(seeds, quick, out) -> Path`.
"""

from distil.experiments.methods import run_methods

EXPERIMENTS = {"methods": run_methods}

__all__ = ["EXPERIMENTS", "run_methods"]
