"""Research experiments run by `distil experiment NAME`; each writes a markdown page with its table and the command.

`EXPERIMENTS` maps a name to a function `(seeds, quick, out, log) -> Path`; `out` defaults to the experiment's
page: docs/methods.md for `methods`, docs/llm.md for `llm`, docs/experiments/NAME.md (and NAME.png beside it)
for the others, which test the claims of Hinton et al. (2015) and after (see docs/experiments/).
"""

from distil.experiments.capacity_gap import run_capacity_gap
from distil.experiments.few_data import run_few_data
from distil.experiments.llm import run_llm
from distil.experiments.methods import run_methods
from distil.experiments.omitted_class import run_omitted_class
from distil.experiments.soft_vs_smoothing import run_soft_vs_smoothing
from distil.experiments.temperature import run_temperature
from distil.experiments.transfer_size import run_transfer_size

EXPERIMENTS = {"methods": run_methods, "temperature": run_temperature, "omitted-class": run_omitted_class,
               "few-data": run_few_data, "soft-vs-smoothing": run_soft_vs_smoothing,
               "transfer-size": run_transfer_size, "capacity-gap": run_capacity_gap, "llm": run_llm}

__all__ = ["EXPERIMENTS", "run_capacity_gap", "run_few_data", "run_llm", "run_methods", "run_omitted_class",
           "run_soft_vs_smoothing", "run_temperature", "run_transfer_size"]
