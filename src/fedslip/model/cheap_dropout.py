"""The frozen backbone's own dropout, with masks from 15-bit random integers instead of Bernoulli draws.

On CPU, `nn.Dropout`'s Bernoulli draws cost MiniLM's bf16 training step about 40 % of its throughput
(`benchmarks/throughput.py`-style measurement: 145 samples/s with the backbone's dropout off, 89 with its
own 0.1). The same dropout (rate quantised to 1/32768), drawn from the same seeded generator as 15-bit
slices of 63-bit integers, costs a fraction of that. Hidden-state dropouts are `CheapDropout` modules; attention-probability dropout goes
through an attention function registered with transformers (`ATTENTION`), plain matmuls as "eager".
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION = "fedslip_eager"
LEVELS = 2**15


def kept_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A keep-mask for `x` at drop rate ≈ p (1.0 kept, 0.0 dropped, in x's dtype), and the 1/(1-p) that keeps
    the expectation."""
    cut = round(p * LEVELS)
    if cut >= LEVELS:
        return torch.zeros_like(x), 0.0
    levels = random_levels(x.numel(), x.device).view(x.shape)
    # 1 where level ≥ cut, else 0, by int16 arithmetic (an arithmetic shift of level − cut), made in x's
    # dtype: on CPU, multiplying by a bool mask or converting one costs several times more
    kept = levels.sub_(cut).bitwise_right_shift_(15).add_(1).to(x.dtype)
    return kept, 1.0 / (1.0 - cut / LEVELS)


def random_levels(n: int, device: torch.device) -> torch.Tensor:
    """n uniform integers in [0, LEVELS): four from each 63-bit draw, about 3× cheaper than n 15-bit draws."""
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    return words.view(torch.int16)[:n] & (LEVELS - 1)


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
    """Eager attention (softmax(QKᵀ)V as plain matmuls, the softmax in fp32) with the cheap dropout on the
    probabilities."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    # scale, mask and softmax in fp32: on CPU a bf16 softmax over a row that is not a multiple of the vector
    # width (most sequence lengths) takes a slow path, 3× the fp32 one (MiniLM, 32 × 56 tokens)
    weights = torch.matmul(query, key.transpose(2, 3)).float().mul_(scaling)
    if attention_mask is not None:
        weights = weights.add_(attention_mask)
    weights = nn.functional.softmax(weights, dim=-1).to(query.dtype)
    weights = cheap_dropout(weights, dropout, module.training)
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
