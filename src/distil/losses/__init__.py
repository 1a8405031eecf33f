"""Distillation loss terms: one small `nn.Module` per method, with a pure function beside it.

`core` holds what a term sees (`Views`) and is (`Term`), and `CE`/`KD`; `response` more terms on logits (DKD,
DIST); `ensemble` several teachers' soft targets; `feature` and `feature_more` terms between named layers
(FitNet, AT, PKT, NST, VID); `relation` terms on how samples relate (RKD, SP, CC, CRD); `token` language-model
divergences per token (reverse KL, generalized JSD, skew KL and skew reverse KL, total variation; forward KL
is `kd`). `LOSSES` maps a
recipe's `kind` to its class; `distil list methods` prints it.
"""

from torch import nn

from distil.losses.core import CE, KD, STUDENT, UNLABELED, Outputs, Reads, Term, Views, ce_loss, check_weight, kd_loss
from distil.losses.ensemble import MultiKD, ensemble_target, soft_kd_loss
from distil.losses.feature import AT, FeaturePairs, FitNet, at_loss, attention_map, fitnet_loss
from distil.losses.feature_more import NST, PKT, VID
from distil.losses.relation import CC, CRD, RKD, SP
from distil.losses.response import DIST, DKD, dist_loss, dkd_loss
from distil.losses.token import (
    JSD,
    RKL,
    TVD,
    SkewKL,
    SkewRKL,
    jsd_loss,
    reverse_kl_loss,
    skew_kl_loss,
    skew_rkl_loss,
    token_kl,
    tvd_loss,
)

LOSSES: dict[str, type[nn.Module]] = {
    "ce": CE, "kd": KD, "dkd": DKD, "dist": DIST, "multi_kd": MultiKD,  # response
    "fitnet": FitNet, "at": AT, "pkt": PKT, "nst": NST, "vid": VID,  # feature
    "rkd": RKD, "sp": SP, "cc": CC, "crd": CRD,  # relation
    # language models, per token (forward KL: kd)
    "rkl": RKL, "jsd": JSD, "skew_kl": SkewKL, "skew_rkl": SkewRKL, "tvd": TVD,
}

__all__ = ["AT", "CC", "CE", "CRD", "DIST", "DKD", "JSD", "RKL", "TVD", "FeaturePairs", "FitNet", "KD", "LOSSES",
           "MultiKD", "NST", "Outputs", "PKT", "RKD", "Reads", "SP", "STUDENT", "SkewKL", "SkewRKL", "Term",
           "UNLABELED", "VID", "Views", "at_loss", "attention_map", "ce_loss", "check_weight", "dist_loss",
           "dkd_loss", "ensemble_target", "fitnet_loss", "jsd_loss", "kd_loss", "reverse_kl_loss", "skew_kl_loss",
           "skew_rkl_loss", "soft_kd_loss", "token_kl", "tvd_loss"]
