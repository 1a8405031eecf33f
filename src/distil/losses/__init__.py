"""Distillation loss terms: one small `nn.Module` per method, with a pure function beside it.

`core` holds what a term sees (`Views`) and is (`Term`), and `CE`/`KD`; `feature` the terms between named
layers. `LOSSES` maps a recipe's `kind` to its class; `distil list methods` prints it.
"""

from torch import nn

from distil.losses.core import CE, KD, STUDENT, UNLABELED, Outputs, Reads, Term, Views, ce_loss, check_weight, kd_loss
from distil.losses.ensemble import MultiKD, ensemble_target, soft_kd_loss
from distil.losses.feature import AT, FeaturePairs, FitNet, at_loss, attention_map, fitnet_loss
from distil.losses.response import DIST, DKD, dist_loss, dkd_loss

LOSSES: dict[str, type[nn.Module]] = {
    "ce": CE, "kd": KD, "dkd": DKD, "dist": DIST, "multi_kd": MultiKD,  # response
    "fitnet": FitNet, "at": AT,  # feature
}

__all__ = ["AT", "CE", "DIST", "DKD", "KD", "LOSSES", "STUDENT", "UNLABELED", "FeaturePairs", "FitNet", "MultiKD",
           "Outputs", "Reads", "Term", "Views", "at_loss", "attention_map", "ce_loss", "check_weight", "dist_loss",
           "dkd_loss", "ensemble_target", "fitnet_loss", "kd_loss", "soft_kd_loss"]
