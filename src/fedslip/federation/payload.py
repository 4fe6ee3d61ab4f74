"""Payload encoding: safetensors bytes, the same encoding on every runtime.

The ledger measures these bytes, so the reported traffic is what was really serialized, not a count
derived from shapes.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedslip.errors import UserError

Payload = dict[str, torch.Tensor]


def encode(payload: Payload) -> bytes:
    if not payload:
        return b""
    return save({k: v.detach().contiguous() for k, v in payload.items()})


def decode(data: bytes) -> Payload:
    if not data:
        return {}
    try:
        return load(data)
    except (SafetensorError, ValueError, OSError) as e:
        raise UserError(f"payload could not be decoded as safetensors: {e}") from None
