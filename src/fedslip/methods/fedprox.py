"""FedProx + LoRA (Li et al., MLSys 2020): FedAvg with a proximal term on the shared tensors.

Local training adds μ/2‖w − w_global‖² over everything the client sends (μ = method.mu, 0.1 by default).
"""

from __future__ import annotations

from fedslip.methods.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def prox_mu(self) -> float:
        return self.m.mu
