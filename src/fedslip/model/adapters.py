"""The dual-track LoRA layer and magnitude masks.

`DualLoRALinear` wraps a frozen `nn.Linear` W and adds two low-rank tracks:

    y = W x + (α_g / r_g) · B_g A_g x + (α_p / r_p) · (B_p ⊙ M_B)(A_p ⊙ M_A) x

The global track (A_g, B_g) is what a federation shares. The private track (A_p, B_p) never leaves the
client and is sparsified by magnitude masks M. `mode` selects what the forward pass computes:

- "global": global track only (global evaluation, the global step of FedSLIP);
- "both": both tracks (personalized inference, the naive dual-track design);
- "private": both tracks, the global output detached (FedSLIP's private step: gradients reach only the
  private track, and the global track costs no backward work). Gradients still flow through the frozen
  weight to the layers below.

A rank of 0 disables a track (single-LoRA methods such as fedavg use r_p = 0).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from fedslip.errors import UserError
from fedslip.model.cheap_dropout import dropped

MODES = ("global", "both", "private")


def lora_pair(rank: int, fan_in: int, fan_out: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's standard init: A ~ kaiming-uniform(a=√5) (as nn.Linear), B = 0, so the update starts at 0."""
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5) on a (rank, fan_in) matrix
    a = (torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound
    return a, torch.zeros(fan_out, rank)


def magnitude_mask(weight: torch.Tensor, sparsity: float, generator: torch.Generator,
                   ties: str = "random") -> torch.Tensor:
    """Keep the round((1 − sparsity)·n) largest |w| of one tensor (1.0), zero the rest (0.0).

    Ties (e.g. a freshly initialised, all-zero LoRA B) are broken by a seeded random order, so the kept
    set of a constant tensor is a random subset rather than its first rows. `ties="keep"` keeps every |w|
    at least the threshold instead, as the reference did (which keeps all of a zero B).
    """
    n = weight.numel()
    keep = round((1.0 - sparsity) * n)
    if ties == "keep":
        if keep == 0:
            return torch.zeros_like(weight)
        threshold = weight.detach().abs().flatten().kthvalue(n - keep + 1).values
        return (weight.detach().abs() >= threshold).to(torch.float32)
    order = torch.randperm(n, generator=generator)
    magnitudes = weight.detach().abs().flatten()[order]
    ranked = torch.argsort(magnitudes, descending=True, stable=True)
    mask = torch.zeros(n)
    mask[order[ranked[:keep]]] = 1.0
    return mask.view_as(weight)


class LoRADropout(nn.Module):
    """LoRA's dropout on a layer's input, as PEFT, drawn as `cheap_dropout` draws. Returns the input with
    its dropped elements zeroed and the 1/(1-p) to fold into the LoRA output's scale, so the input is not
    rescaled. p < 1: the config rejects more."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        if not (self.training and self.p > 0):
            return x, 1.0
        return dropped(x, self.p, 1.0), 1.0 / (1.0 - self.p)


class DualLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r_g: int, alpha_g: float, r_p: int, alpha_p: float, dropout: float):
        super().__init__()
        self.base = base
        self.r_g, self.r_p = r_g, r_p
        self.scale_g = alpha_g / r_g if r_g else 0.0
        self.scale_p = alpha_p / r_p if r_p else 0.0
        self.drop = LoRADropout(dropout)
        fan_in, fan_out = base.in_features, base.out_features
        if r_g:
            self.g_A = nn.Parameter(torch.zeros(r_g, fan_in))
            self.g_B = nn.Parameter(torch.zeros(fan_out, r_g))
        if r_p:
            self.p_A = nn.Parameter(torch.zeros(r_p, fan_in))
            self.p_B = nn.Parameter(torch.zeros(fan_out, r_p))
            self.register_buffer("p_A_mask", torch.ones(r_p, fan_in))
            self.register_buffer("p_B_mask", torch.ones(fan_out, r_p))
        self.mode = "both"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not (self.r_g or self.r_p):
            return y
        xd, keep = self.drop(x)
        if self.r_g:
            y = add_low_rank(y, xd, self.g_A, self.g_B, self.scale_g * keep, constant=self.mode == "private")
        if self.r_p and self.mode != "global":
            y = add_low_rank(y, xd, self.p_A * self.p_A_mask, self.p_B * self.p_B_mask, self.scale_p * keep)
        return y


def add_low_rank(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                 constant: bool = False) -> torch.Tensor:
    """y + scale · B A x, the second product, the scaling and the sum in one addmm (no full-size temporaries).

    `constant`: the track's output is a constant of the graph (no gradient to A, B or through x), while
    gradients still flow through y, i.e. the frozen weight's path to the layers below.
    """
    with torch.no_grad() if constant else contextlib.nullcontext():
        low = F.linear(x, a)
    out = torch.addmm(y.reshape(-1, y.shape[-1]), low.reshape(-1, low.shape[-1]), (b.detach() if constant else b).t(),
                      alpha=scale)
    return out.view(y.shape)


def inject(model: nn.Module, targets: list[str], make_layer) -> dict[str, nn.Module]:
    """Replace every nn.Linear whose name ends with a target by `make_layer(name, linear)`; return them."""
    found: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if not name or name.split(".")[-1] not in targets:
            continue
        if not isinstance(module, nn.Linear):
            raise UserError(f"LoRA target {name} is a {type(module).__name__}, not nn.Linear: "
                            "set model.target_modules to linear projections")
        parent_name, _, child = name.rpartition(".")
        layer = make_layer(name, module)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        found[name] = layer
    if not found:
        raise UserError(f"no module matches LoRA targets {targets}: set model.target_modules")
    return found
