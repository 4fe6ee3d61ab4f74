"""The frozen backbone's own dropout, and LoRA's, drawn as the gaps between dropped elements.

On CPU, `nn.Dropout` draws one Bernoulli variable per element on one thread, which cost MiniLM's bf16
training step about 40 % of its throughput. At drop rate p the dropped positions of an i.i.d. Bernoulli(p)
sequence are the partial sums of geometric gaps, so drawing those gaps takes p·n random numbers instead of n,
and the dropout itself is one scaled copy with zeros written at those positions (forward and backward),
keeping the positions (not a mask) for the backward pass. Hidden-state dropouts are `CheapDropout` modules;
attention-probability dropout goes through an attention function registered with transformers
(`ATTENTION`), plain matmuls as "eager"; both are swapped in on CPU only. Off the CPU, LoRA's dropout uses
a plain mask (one uniform draw per element, cheap there).
"""

from __future__ import annotations

import math

import torch
from torch import nn

ATTENTION = "fedslip_eager"
SPARE_SIGMAS = 6  # gaps drawn beyond the expected number, in standard deviations; more are drawn if short


def drop_positions(n: int, p: float, device: torch.device, first: int | None = None) -> torch.Tensor:
    """The sorted positions in [0, n) that an i.i.d. Bernoulli(p) draw per position drops (0 ≤ p < 1), from
    torch's seeded generator: geometric gaps floor(log(1 − U) / log(1 − p)) + 1, summed. U is a float32 in [0, 1),
    so gaps rarer than 2^-24 are cut short. `first`: how many gaps to draw at first (tests; by default the
    expected number plus SPARE_SIGMAS standard deviations)."""
    if p <= 0 or n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    rate = -math.log1p(-p)
    mean = n * p
    want = first or int(mean + SPARE_SIGMAS * math.sqrt(mean * (1 - p))) + 16
    parts, last = [], -1  # `last`: the position of the last drop so far
    while True:
        gaps = torch.rand(want, dtype=torch.float32, device=device).neg_().log1p_().div_(-rate).to(torch.int64).add_(1)
        ends = gaps.cumsum_(0).add_(last)
        inside = int(torch.searchsorted(ends, n))
        parts.append(ends[:inside])
        if inside < want:
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        last = int(ends[-1])
        want = int((n - last) * p + SPARE_SIGMAS * math.sqrt(max(n - last, 1) * p)) + 16


class _ZeroAt(torch.autograd.Function):
    """x · scale with zeros at flat positions `at` (x's elements in row-major order); the gradient the same."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, at: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(at)
        ctx.scale = scale
        return _scaled_zeroed(x, at, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (at,) = ctx.saved_tensors
        return _scaled_zeroed(grad, at, ctx.scale), None, None


def _scaled_zeroed(x: torch.Tensor, at: torch.Tensor, scale: float) -> torch.Tensor:
    if not x.is_contiguous():
        y = x.contiguous()  # a fresh copy: scaled in place
        y = y.mul_(scale) if scale != 1.0 else y
    else:
        y = x.mul(scale) if scale != 1.0 else x.clone()
    return y.view(-1).index_fill_(0, at, 0).view(x.shape)


def dropped(x: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    """x with each element zeroed with probability p (0 ≤ p < 1), the rest multiplied by `scale`."""
    if x.device.type == "cpu":
        return _ZeroAt.apply(x, drop_positions(x.numel(), p, x.device), scale)
    return dropped_by_mask(x, p, scale)


def dropped_by_mask(x: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    """The same with a mask from one uniform draw per element: off the CPU, where those draws are cheap."""
    kept = (torch.rand_like(x, dtype=torch.float32) >= p).to(x.dtype)
    return x * kept if scale == 1.0 else x * kept * scale


def cheap_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """nn.Dropout's function; the one place p ≥ 1 can arrive (a backbone's own config; ours reject it)."""
    if not training or p <= 0:
        return x
    return x * 0 if p >= 1 else dropped(x, p, 1.0 / (1.0 - p))


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
