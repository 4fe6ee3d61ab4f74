"""Upload checks at the server: a bad upload is rejected with a reason, never averaged.

The method says what an honest client uploads (`Method.upload_spec`: names, shapes, dtypes); an upload
must match it exactly, hold only finite values, stay under a size bound and, when `train.max_update_norm`
is set, move the global state by at most that L2 norm.
"""

from __future__ import annotations

import math

import torch

from fedslip.federation.exchange import Payload

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]
HEADER_SLACK = 64 * 1024  # safetensors header: names, dtypes, shapes as JSON


def spec_bytes(spec: Spec) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in spec.values())


def size_problem(n_bytes: int, spec: Spec) -> str:
    limit = 2 * spec_bytes(spec) + HEADER_SLACK
    return f"{n_bytes} bytes, more than the {limit} an honest upload can take" if n_bytes > limit else ""


def upload_problem(up: Payload, spec: Spec, down: Payload, max_update_norm: float | None) -> str:
    """Why `up` must be rejected ('' if it is fine)."""
    missing = sorted(set(spec) - set(up))
    extra = sorted(set(up) - set(spec))
    if missing or extra:
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(extra)}"] if extra else [])
        return "; ".join(parts)
    for name, (shape, dtype) in spec.items():
        t = up[name]
        if t.dtype != dtype:
            return f"{name} is {_dtype(t.dtype)}, expected {_dtype(dtype)}"
        if tuple(t.shape) != tuple(shape):
            return f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name} holds NaN or Inf"
    if max_update_norm is not None:
        norm = update_norm(up, down)
        if norm > max_update_norm:
            return f"update norm {norm:.4g} exceeds train.max_update_norm = {max_update_norm:g}"
    return ""


def update_norm(up: Payload, down: Payload) -> float:
    """L2 norm of the change over the floating tensors (a tensor that was not sent counts whole)."""
    total = 0.0
    for name, t in up.items():
        if not t.is_floating_point():
            continue
        ref = down.get(name)
        delta = t.double() - ref.double() if ref is not None and ref.shape == t.shape else t.double()
        total += float((delta ** 2).sum())
    return math.sqrt(total)


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")
