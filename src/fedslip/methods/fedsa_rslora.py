"""FedSA-rsLoRA (Guo et al., ICLR 2025, §"other LoRA variants"): FedSA-LoRA on rank-stabilised LoRA.

rsLoRA (Kalajdzievski, 2023) scales the low-rank update by α/√r instead of LoRA's α/r, so the update's
magnitude no longer shrinks as the rank grows. Everything federated is FedSA-LoRA's: only the A matrices
are shared and averaged (Σ over adapted layers r·d_in per payload), B and the head stay on the client,
no global model (see `fedsa`).

Implementation: the same `DualLoRALinear` (global track only) built with α' = α·√r, so that its
α'/r equals rsLoRA's α/√r exactly; r and α are `method.r_g` and `method.alpha_g` (8 and 16, the paper's
values for both FedSA-LoRA and FedSA-rsLoRA).
"""

from __future__ import annotations

import math

from fedslip.methods.fedsa import FedSA
from fedslip.model.adapted import AdaptedModel
from fedslip.model.backbone import Backbone


def rslora_alpha(alpha: float, rank: int) -> float:
    """The α to give a α/r-scaled layer so that its scale is rsLoRA's α/√r."""
    return alpha * math.sqrt(rank)


class FedSARsLoRA(FedSA):
    """FedSA-rsLoRA (Guo et al., ICLR 2025): FedSA-LoRA with rsLoRA's α/√r scaling."""

    name = "fedsa-rslora"

    def make_model(self, backbone: Backbone) -> AdaptedModel:
        m = self.m
        return AdaptedModel.dual(backbone, self.cfg.model.target_modules, m.r_g, rslora_alpha(m.alpha_g, m.r_g),
                                 0, m.alpha_p, m.dropout)
