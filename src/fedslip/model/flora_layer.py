"""The FLoRA layer: merged federated updates plus one client-rank LoRA (Wang et al., NeurIPS 2024).

Each adapted projection W0 (d_out × d_in) computes

    y = (W0 + Δ) x + s · B_r A_r drop(x)

- Δ (buffer `delta`, d_out × d_in): the federated updates merged so far. FLoRA's clients add every
  aggregated update into their frozen weights; `delta` is that merge, kept as a named tensor next to the
  (shared, never copied) backbone weight so that each client's merged weights — and the server's — can be
  swapped in by name like any other state. W0 itself is never modified: (W0 + Δ) is formed in the
  forward pass, which is exactly "the weight after merging".
- (A_r, B_r): one LoRA pair per rank a client may use (`lora_A{r}` r × d_in, `lora_B{r}` d_out × r).
  Heterogeneous clients differ only in which pair is active: `rank` (0 = no LoRA, the merged model
  alone) and its scale `s` are set per client by `active(...)`; every pair has its exact shape, so a
  client's tensors are read and loaded by name with no slicing.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fedslip.model.adapted import AdaptedModel
from fedslip.model.backbone import Backbone


class FLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, ranks: list[int], dropout: float):
        super().__init__()
        self.base = base
        fan_in, fan_out = base.in_features, base.out_features
        self.ranks = sorted(set(ranks))
        for r in self.ranks:
            self.register_parameter(f"lora_A{r}", nn.Parameter(torch.zeros(r, fan_in)))
            self.register_parameter(f"lora_B{r}", nn.Parameter(torch.zeros(fan_out, r)))
        self.register_buffer("delta", torch.zeros(fan_out, fan_in))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank = 0  # the active LoRA pair (0: none)
        self.scale = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base.weight + self.delta, self.base.bias)
        if self.rank:
            a, b = getattr(self, f"lora_A{self.rank}"), getattr(self, f"lora_B{self.rank}")
            y = y + F.linear(F.linear(self.drop(x), a), b) * self.scale
        return y


def flora_model(backbone: Backbone, targets: list[str] | None, ranks: list[int], dropout: float) -> AdaptedModel:
    """The backbone with every LoRA target wrapped in a `FLoRALinear` holding a pair for each rank."""
    return AdaptedModel(backbone, targets, lambda name, base: FLoRALinear(base, ranks, dropout))


def pair_names(model: AdaptedModel, rank: int) -> list[str]:
    """The names of the rank-`rank` LoRA pair of every adapted layer (A, B, layer by layer)."""
    return [f"{layer}.lora_{m}{rank}" for layer in model.layers for m in ("A", "B")]


def delta_names(model: AdaptedModel) -> list[str]:
    return [f"{layer}.delta" for layer in model.layers]


@contextmanager
def active(model: AdaptedModel, rank: int, scale: float):
    """Every layer computes with its rank-`rank` pair at `scale`; back to the merged model alone after."""
    for layer in model.layers.values():
        layer.rank, layer.scale = rank, scale
    try:
        yield
    finally:
        for layer in model.layers.values():
            layer.rank, layer.scale = 0, 0.0
