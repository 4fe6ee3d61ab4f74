"""FedSLIP+: FedSLIP with the two changes that made it meet its goal on validation data (docs/fedslip-plus.md).

- No FedProx on the global track (μ = 0): under AdamW the proximal pull is normalised per coordinate and
  all but freezes LoRA's A, costing global accuracy; without it the global track trains as FedAvg's does.
- Private steps on the global track as the client received it (`private_base = "received"`): the private
  track learns the residual on top of the model its personal view will use, not on top of a local copy
  that drifts during the round and is then replaced by the average.
"""

from __future__ import annotations

from fedslip.methods.fedslip import FedSLIP


class FedSLIPPlus(FedSLIP):
    name = "fedslip-plus"
    settings = {"method": {"mu": 0.0, "private_base": "received"}}
