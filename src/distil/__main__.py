"""`python -m distil ...` (what `torchrun -m distil run RECIPE` starts in every process) = the `distil` command."""

from distil.cli import entry

entry()
