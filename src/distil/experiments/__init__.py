"""Research experiments run by `distil experiment NAME`; each writes a markdown page with its table and the command.

`EXPERIMENTS` maps a name to a function `(seeds, quick, out) -> Path`.
"""

from distil.experiments.llm import run_llm
from distil.experiments.methods import run_methods

EXPERIMENTS = {"methods": run_methods, "llm": run_llm}

__all__ = ["EXPERIMENTS", "run_llm", "run_methods"]
