"""A mixture of K LoRA adaptors per linear layer, mixed by one client-private softmax (FLoRAL's layer).

    y = W x + (α / r) · Σ_c π_c B_c A_c x,    π = softmax(z)    (z: K logits, one vector per model)

Each `MixtureLoRALinear` holds the K adaptors of one projection stacked: `mix_A` (K, r, d_in) and `mix_B`
(K, d_out, r); adaptor c is `mix_A[c]`, `mix_B[c]`. All layers of a model read the same `MixtureWeights`
(FLoRAL's default router: one mixture per model, not per layer). It is registered as a submodule of the
first layer only, so its logits are one addressable tensor (`<first layer>.router.logits`); the other
layers hold a plain reference.

The mixture is computed as one rank-K·r LoRA: A_cat = [A_1; …; A_K], B_cat = [π_1 B_1, …, π_K B_K], so a
single adaptor (K = 1, π = 1) computes exactly what `DualLoRALinear`'s global track computes.

During training the router may add uniform noise (FLoRAL's `noise_std`) to the logits: one draw per forward
pass of the whole network (`sample_noise`, called by a forward pre-hook), shared by every layer, from the
router's own generator so it never shifts the global random stream (dropout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedslip.model.adapters import LoRADropout


class MixtureWeights(nn.Module):
    """The K mixture logits of one client (zeros = the uniform mixture) and their training noise."""

    def __init__(self, k: int, noise: float = 0.0):
        super().__init__()
        self.k = k
        self.logits = nn.Parameter(torch.zeros(k))
        self.noise = noise
        self.noise_gen: torch.Generator | None = None  # set by the method while a client trains
        self._noise: torch.Tensor | None = None

    def sample_noise(self) -> None:
        """Draw this forward pass's noise (training with a generator set), else none."""
        if self.training and self.noise > 0 and self.noise_gen is not None:
            self._noise = self.noise * torch.rand(self.k, generator=self.noise_gen).to(self.logits.device)
        else:
            self._noise = None

    def probs(self) -> torch.Tensor:
        z = self.logits if self._noise is None or not self.training else self.logits + self._noise
        return torch.softmax(z, dim=-1)


class MixtureLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, router: MixtureWeights, owns_router: bool, rank: int, alpha: float,
                 dropout: float):
        super().__init__()
        self.base = base
        self.k, self.r = router.k, rank
        self.scale = alpha / rank
        self.drop = LoRADropout(dropout)
        self.mix_A = nn.Parameter(torch.zeros(self.k, rank, base.in_features))
        self.mix_B = nn.Parameter(torch.zeros(self.k, base.out_features, rank))
        if owns_router:
            self.router = router  # registered: its logits are addressable under this layer's name
        else:
            self.__dict__["router"] = router  # a reference only, not a second copy of the parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        xd, keep = self.drop(x)
        a = self.mix_A.reshape(self.k * self.r, -1)
        b = self.mix_B.permute(1, 0, 2).reshape(-1, self.k * self.r)
        b = b * self.router.probs().repeat_interleave(self.r)
        return y + F.linear(F.linear(xd, a), b) * (self.scale * keep)


def mixture_factory(router: MixtureWeights, rank: int, alpha: float, dropout: float):
    """A `make_layer` for `AdaptedModel`: every target becomes a `MixtureLoRALinear` sharing `router`."""
    made: list[str] = []

    def make_layer(name: str, base: nn.Linear) -> MixtureLoRALinear:
        layer = MixtureLoRALinear(base, router, not made, rank, alpha, dropout)
        made.append(name)
        return layer

    return make_layer
