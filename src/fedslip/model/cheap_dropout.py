"""The frozen backbone's own dropout, with masks from 15-bit random integers instead of Bernoulli draws.

On CPU, `nn.Dropout`'s Bernoulli draws cost MiniLM's bf16 training step about 40 % of its throughput
(`benchmarks/throughput.py`-style measurement: 145 samples/s with the backbone's dropout off, 89 with its
own 0.1). The same dropout (rate quantised to 1/32768), drawn from the same seeded generator, costs a
fraction of that. Hidden-state dropouts are `CheapDropout` modules; attention-probability dropout goes
through an attention function registered with transformers (`ATTENTION`), plain matmuls as "eager".
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION = "fedslip_eager"
LEVELS = 2**15


def kept_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A keep-mask for `x` at drop rate ≈ p, and the 1/(1-p) that keeps the expectation."""
    cut = round(p * LEVELS)
    kept = torch.empty(x.shape, dtype=torch.int16, device=x.device).random_(0, LEVELS) >= cut
    return kept, 1.0 / (1.0 - cut / LEVELS)


def cheap_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p <= 0:
        return x
    kept, scale = kept_mask(x, p)
    return x.mul(kept).mul_(scale)


class CheapDropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p  # read by attention modules as their attention-probability dropout rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cheap_dropout(x, self.p, self.training)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (softmax(QKᵀ)V as plain matmuls) with the cheap dropout on the probabilities."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = cheap_dropout(nn.functional.softmax(weights, dim=-1), dropout, module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def use_cheap_dropout(net: nn.Module) -> None:
    """Swap every nn.Dropout of `net` for CheapDropout and route attention through `attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)  # the additive mask `attention` expects
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, child_name, CheapDropout(child.p).train(child.training))
    net.set_attn_implementation(ATTENTION)
