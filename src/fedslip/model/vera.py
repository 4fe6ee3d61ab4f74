"""VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort & Asano, ICLR 2024).

Each adapted projection W (d_out × d_in) gets

    y = W x + Λ_b B Λ_d A x        (Λ = diag)

with A (r × d_in) and B (d_out × r) frozen random matrices and two trainable vectors d (r) and b (d_out).
As in the paper, ONE pair (A, B) serves every adapted layer: it is drawn once at the largest d_in/d_out
among the targets and each layer uses its top-left slice (A[:, :d_in], B[:d_out, :]). The pair is drawn
from the root seed (tag "vera"), so every client regenerates the identical matrices and they never need
to be sent; they are registered as non-persistent buffers `vera_A` / `vera_B` (views of the one pair),
which keeps them readable by name but outside every parameter list.

Initialisation, following the paper: A and B Kaiming-uniform (the nn.Linear rule, bound 1/√fan_in, as the
reference implementation in PEFT does); b = 0, so the adapter starts as the identity map, like LoRA's
B = 0; d = a constant `d_init` (0.1 here: the paper initialises d to one small non-zero constant and
reports small values working best; 0.1 is also PEFT's `d_initial` default). VeRA has no α/r scaling:
the vectors themselves carry the scale. Dropout acts on the adapter's input, as in LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedslip.model.adapted import AdaptedModel
from fedslip.model.backbone import Backbone, target_modules
from fedslip.seeding import torch_gen

D_INIT = 0.1


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init (kaiming_uniform_, a=√5) of a (rows, cols) weight: U(±1/√cols)."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


def shared_pair(rank: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen random (A, B) every layer and every client uses, drawn from the root seed alone."""
    gen = torch_gen(seed, "vera")
    a = kaiming_uniform(rank, max_in, gen)
    b = kaiming_uniform(max_out, rank, gen)
    return a, b


class VeRALinear(nn.Module):
    def __init__(self, base: nn.Linear, shared_a: torch.Tensor, shared_b: torch.Tensor, d_init: float = D_INIT,
                 dropout: float = 0.0):
        super().__init__()
        self.base = base
        fan_in, fan_out = base.in_features, base.out_features
        self.rank = shared_a.shape[0]
        self.register_buffer("vera_A", shared_a[:, :fan_in], persistent=False)
        self.register_buffer("vera_B", shared_b[:fan_out, :], persistent=False)
        self.vera_d = nn.Parameter(torch.full((self.rank,), float(d_init)))
        self.vera_b = nn.Parameter(torch.zeros(fan_out))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The trainable vectors (fp32) scale in the products' dtype: under bf16 autocast an fp32 factor would
        make the layer's output, and every op after it up to the next matmul, fp32."""
        h = F.linear(self.drop(x), self.vera_A)
        h = h * self.vera_d.to(h.dtype)
        y = F.linear(h, self.vera_B)
        return self.base(x) + y * self.vera_b.to(y.dtype)


def vera_model(backbone: Backbone, targets: list[str] | None, rank: int, seed: int, dropout: float,
               d_init: float = D_INIT) -> AdaptedModel:
    """The backbone with every LoRA target wrapped in a `VeRALinear` sharing one seeded (A, B) pair."""
    suffixes = target_modules(backbone.model, targets)
    linears = [m for name, m in backbone.model.named_modules()
               if name and name.split(".")[-1] in suffixes and isinstance(m, nn.Linear)]
    max_in = max((m.in_features for m in linears), default=1)
    max_out = max((m.out_features for m in linears), default=1)
    a, b = shared_pair(rank, max_in, max_out, seed)
    return AdaptedModel(backbone, targets, lambda name, base: VeRALinear(base, a, b, d_init, dropout))


def vera_init(model: AdaptedModel, d_init: float = D_INIT) -> dict[str, torch.Tensor]:
    """VeRA's initial trainable vectors for every layer: d = d_init, b = 0."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in model.layers.items():
        out[f"{name}.vera_d"] = torch.full((layer.rank,), float(d_init))
        out[f"{name}.vera_b"] = torch.zeros(layer.base.out_features)
    return out
