"""FedSA-VeRA (Guo et al., ICLR 2025, §"other LoRA variants"): FedSA's share-A rule applied to VeRA.

VeRA (Kopiczko et al., ICLR 2024; layer in `fedslip.model.vera`) adapts each projection by
ΔW x = Λ_b B Λ_d A x: A (r × d_in) and B (d_out × r) are frozen random matrices shared by all layers, and
only the vectors d (r) and b (d_out) train.

Which vector plays LoRA's A? Group the product as (Λ_b B)(Λ_d A): Λ_d A is the input-side down-projection
(d_in → r), the role of LoRA's A, and Λ_b B the output-side up-projection (r → d_out), the role of B. The
initialisations line up the same way: d starts at a non-zero constant (as A starts random), b at zero (as
B does), so the update starts at zero. FedSA-LoRA's finding — the down-projection learns what all clients
share, the up-projection what is client-specific — therefore makes d the "general knowledge" part, and the
paper's FedSA-VeRA shares the vector analogous to A. So:

- shared: d of every adapted layer; the server takes the example-weighted mean. Payload per client-round,
  each direction: Σ over adapted layers r_v (`method.vera_rank`), plus nothing else.
- local: b of every layer (kept across rounds) and the classification head (FedSA's choice, see `fedsa`).
- never sent: the frozen A and B — every client regenerates them from the root seed (tag "vera").

Defaults: VeRA rank `method.vera_rank` = 256 (VeRA's RoBERTa-large setting, the model FedSA-LoRA uses),
d_init 0.1, b = 0; dropout, optimiser and learning rate are the protocol's (`method.dropout`, AdamW at
`train.lr`) — VeRA's paper tunes a separate, larger learning rate for the vectors, which our shared
protocol does not. Evaluation as in `fedsa`: no global model, each client's own model on its own test set.
"""

from __future__ import annotations

import torch

from fedslip.methods.fedsa import FedSA
from fedslip.model.adapted import AdaptedModel, Tensors
from fedslip.model.backbone import Backbone
from fedslip.model.vera import D_INIT, vera_init, vera_model


class FedSAVeRA(FedSA):
    """FedSA-VeRA (Guo et al., ICLR 2025): VeRA adapters, only the d vectors shared; b and the head local."""

    name = "fedsa-vera"

    def make_model(self, backbone: Backbone) -> AdaptedModel:
        return vera_model(backbone, self.cfg.model.target_modules, self.m.vera_rank, self.t.seed, self.m.dropout,
                          D_INIT)

    def shared_adapter_names(self, model: AdaptedModel) -> list[str]:
        return model.names_ending(".vera_d")

    def local_adapter_names(self, model: AdaptedModel) -> list[str]:
        return model.names_ending(".vera_b")

    def initial_adapters(self, model: AdaptedModel, gen: torch.Generator) -> Tensors:
        return vera_init(model, D_INIT)
