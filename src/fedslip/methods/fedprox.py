"""FedProx + LoRA (Li et al., MLSys 2020): FedAvg with the proximal term μ/2‖w − w_global‖² on the
shared LoRA tensors during local training (μ = method.mu, 0.1 by default)."""

from __future__ import annotations

from fedslip.methods.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def prox_mu(self) -> float:
        return self.m.mu
