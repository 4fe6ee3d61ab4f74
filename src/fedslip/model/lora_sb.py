"""The LoRA-SB layer (Ponkshe, Singhal et al., 2024, "Initialization using Update Approximation is a Silver
Bullet for Extremely Efficient Low-Rank Fine-Tuning"), the adapter of Fed-SB.

Each adapted projection W0 (d_out × d_in) computes

    y = W0 x + B R A drop(x)

with A (r × d_in, buffer `sb_A`) and B (d_out × r, buffer `sb_B`) fixed and only the small R (r × r,
parameter `sb_R`) trained — LoRA-XS's architecture. LoRA-SB's contribution is the initialisation: with
ΔW ≈ the first step of full fine-tuning, estimated as −η·sign(Σ ∇W L) (Adam's first step), and its
truncated SVD ΔW ≈ U_r S_r V_rᵀ,

    B = U_r,   R = S_r,   A = V_rᵀ          so that at the start  B R A = the best rank-r approximation of ΔW;

B and A are orthonormal, which is what lets R's updates simulate full fine-tuning in that subspace and
removes the α/r scale (α = r, scale 1, as in the paper). A layer's rank is min(r, d_in, d_out). A and B
are buffers, so they are addressable by name but never in any optimiser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedslip.model.adapted import AdaptedModel, Tensors
from fedslip.model.backbone import Backbone


class LoRASBLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, dropout: float):
        super().__init__()
        self.base = base
        fan_in, fan_out = base.in_features, base.out_features
        self.rank = min(rank, fan_in, fan_out)
        self.register_buffer("sb_A", torch.zeros(self.rank, fan_in))
        self.register_buffer("sb_B", torch.zeros(fan_out, self.rank))
        self.sb_R = nn.Parameter(torch.zeros(self.rank, self.rank))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(F.linear(self.drop(x), self.sb_A), self.sb_R)  # R A x
        return self.base(x) + F.linear(h, self.sb_B)


def lora_sb_model(backbone: Backbone, targets: list[str] | None, rank: int, dropout: float) -> AdaptedModel:
    """The backbone with every LoRA target wrapped in a `LoRASBLinear` of rank min(rank, d_in, d_out)."""
    return AdaptedModel(backbone, targets, lambda name, base: LoRASBLinear(base, rank, dropout))


def sb_init(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, R, A) from the truncated SVD of `update` (d_out × d_in): B = U_r, R = diag(S_r), A = V_rᵀ."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    r = min(rank, *update.shape)
    return u[:, :r].float().contiguous(), torch.diag(s[:r]).float(), vh[:r].float().contiguous()


def full_weight_grads(model: AdaptedModel, batches) -> tuple[Tensors, float]:
    """Σ over the examples of ∂loss/∂W0 for every adapted layer's frozen weight, and the mean loss.

    The sum (not the mean) so that the server can add clients' sums into the sum over all their examples.
    Computed with dropout off: the estimate is of the expected gradient at the loaded weights. Summed in
    fp32 batch by batch: a bf16-stored weight's own .grad would keep the whole sum to 8 bits.
    """
    weights = {name: layer.base.weight for name, layer in model.layers.items()}
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    model.set_trainable([])
    model.net.eval()
    total, count = 0.0, 0
    try:
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        for batch in batches:
            logits = model.logits(batch.input_ids, batch.attention_mask)
            loss = F.cross_entropy(logits, batch.labels.to(logits.device), reduction="sum")
            loss.backward()
            for name, w in weights.items():
                sums[name] += w.grad
                w.grad = None
            total, count = total + float(loss.detach()), count + len(batch)
        return {name: s.cpu() for name, s in sums.items()}, total / max(count, 1)
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
