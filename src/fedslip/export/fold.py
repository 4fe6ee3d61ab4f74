"""Fold every adapter layer of a fedslip model into ONE plain LoRA pair per projection, exactly.

PEFT's LoRA computes W x + (α/r)·B A x. Each of our adapter layers computes W x + Σ_t (B_t A_t) x for some
tracks t (with their own scales, masks or mixture weights), and a sum of low-rank products is one low-rank
product of the stacked factors: A = [A_1; A_2; …] (rows), B = [B_1, B_2, …] (columns). Every scale is
folded into B, so the folder is saved with lora_alpha = r (PEFT's scale 1). Layers that come out with
fewer ranks than the largest are padded with zero rows/columns, which add nothing.

Not folded, with a UserError saying why: FLoRA's layers (their change is the merged full-rank Δ, not a
low-rank product) and pFedLoRA clients whose model runs only the first layers of the backbone (a PEFT model
runs them all; pFedLoRA clients of full depth fold like any dual-track model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedslip.errors import UserError
from fedslip.model.adapted import AdaptedModel
from fedslip.model.adapters import DualLoRALinear
from fedslip.model.depth import DepthAdaptedModel
from fedslip.model.flora_layer import FLoRALinear
from fedslip.model.lora_sb import LoRASBLinear
from fedslip.model.mixture import MixtureLoRALinear
from fedslip.model.vera import VeRALinear

Pair = tuple[torch.Tensor, torch.Tensor]  # (A: rank × d_in, B: d_out × rank), scale 1


def dual_lora(layer: DualLoRALinear, mode: str) -> list[Pair]:
    """Global track, plus (mode "both") the masked private track, as the layer's forward pass adds them."""
    pairs = [(layer.g_A, layer.g_B * layer.scale_g)] if layer.r_g else []
    if layer.r_p and mode != "global":
        pairs.append((layer.p_A * layer.p_A_mask, layer.p_B * layer.p_B_mask * layer.scale_p))
    return pairs


def mixture(layer: MixtureLoRALinear, mode: str) -> list[Pair]:
    """K adaptors weighted by the mixture: the rank-K·r LoRA the layer's forward pass computes."""
    a = layer.mix_A.reshape(layer.k * layer.r, -1)
    b = layer.mix_B.permute(1, 0, 2).reshape(-1, layer.k * layer.r)
    return [(a, b * layer.router.probs().repeat_interleave(layer.r) * layer.scale)]


def lora_sb(layer: LoRASBLinear, mode: str) -> list[Pair]:
    """B R A with fixed A, B: A stays, B R becomes the B."""
    return [(layer.sb_A, layer.sb_B @ layer.sb_R)]


def vera(layer: VeRALinear, mode: str) -> list[Pair]:
    """Λ_b B Λ_d A: the vectors scale B's rows and A's rows."""
    return [(layer.vera_A * layer.vera_d[:, None], layer.vera_B * layer.vera_b[:, None])]


FOLDS = {DualLoRALinear: dual_lora, MixtureLoRALinear: mixture, LoRASBLinear: lora_sb, VeRALinear: vera}
NO_FOLD = {FLoRALinear: "merges its adapters into the frozen weights (a full-rank change per projection)"}


@torch.no_grad()
def fold(model: AdaptedModel, mode: str, method: str) -> tuple[dict[str, Pair], int]:
    """{layer name: (A, B)} with one common rank (the largest; the others zero-padded), and that rank."""
    if isinstance(model, DepthAdaptedModel) and int(model.depth) < model.n_layers:
        raise UserError(f"{method}: this model runs only the first {int(model.depth)} of the backbone's "
                        f"{model.n_layers} layers, which a PEFT model of the whole backbone cannot do: export "
                        "not supported (clients of full depth export)")
    pairs: dict[str, Pair] = {}
    for name, layer in model.layers.items():
        rule = FOLDS.get(type(layer))
        if rule is None:
            why = NO_FOLD.get(type(layer), f"uses {type(layer).__name__} layers, which are not low-rank products")
            raise UserError(f"{method} {why}, which no LoRA folder holds exactly: export not supported")
        parts = rule(layer, mode)
        pairs[name] = (torch.cat([a for a, _ in parts]).float(), torch.cat([b for _, b in parts], dim=1).float())
    rank = max(a.shape[0] for a, _ in pairs.values())
    padded = {n: (F.pad(a, (0, 0, 0, rank - a.shape[0])), F.pad(b, (0, rank - b.shape[1])))
              for n, (a, b) in pairs.items()}
    return {n: (a.cpu().contiguous(), b.cpu().contiguous()) for n, (a, b) in padded.items()}, rank
