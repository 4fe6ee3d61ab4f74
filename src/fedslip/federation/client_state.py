"""A client's private state (`ClientState`) as tensors + a JSON skeleton: for disk, Context.state and digests.

Runtime-neutral: the Flower nodes keep it in `Context.state` and on their disk, checkpoints keep every
client's. Tensors go to safetensors, the structure (optimizer state dicts) to JSON: never pickle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from fedslip.atomic import replace_durably
from fedslip.methods.base import ClientState


def tensor_digest(t: torch.Tensor) -> str:
    """A value fingerprint: dtype, shape and raw bytes (equal digests <=> equal tensors)."""
    a = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{a.dtype}|{tuple(a.shape)}|".encode())
    h.update(a.numpy().tobytes() if a.dtype != torch.bfloat16 else a.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"optim/{len(tensors)}"
        tensors[name] = obj.detach().clone().contiguous()
        return {"T": name}
    if isinstance(obj, dict):
        return {"D": [[_pack(k, tensors), _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"L" if isinstance(obj, list) else "U": [_pack(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"V": obj}
    raise TypeError(f"cannot persist a {type(obj).__name__} in a client state")


def _unpack(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    (kind, value), = node.items()
    if kind == "T":
        return tensors[value]
    if kind == "D":
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in value}
    if kind == "L":
        return [_unpack(v, tensors) for v in value]
    if kind == "U":
        return tuple(_unpack(v, tensors) for v in value)
    return value


def pack_state(state: ClientState) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a client state (own tensors under `tensors/`, the copy of its last upload under `sent/`,
    optimizer ones under `optim/`) + skeleton."""
    optim_tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_pack(state.optim, optim_tensors))
    tensors = {f"tensors/{n}": t.detach().clone().contiguous() for n, t in state.tensors.items()}
    sent = {f"sent/{n}": t.detach().clone().contiguous() for n, t in state.sent.items()}
    return {**tensors, **sent, **optim_tensors}, skeleton


def unpack_state(tensors: dict[str, torch.Tensor], skeleton: str) -> ClientState:
    own = {n.removeprefix("tensors/"): t for n, t in tensors.items() if n.startswith("tensors/")}
    sent = {n.removeprefix("sent/"): t for n, t in tensors.items() if n.startswith("sent/")}
    optim = _unpack(json.loads(skeleton), {n: t for n, t in tensors.items() if n.startswith("optim/")})
    return ClientState(tensors=own, optim=optim, sent=sent)


def state_digest(state: ClientState) -> str:
    tensors, skeleton = pack_state(state)
    h = hashlib.sha256(skeleton.encode())
    for name in sorted(tensors):
        h.update(name.encode() + tensor_digest(tensors[name]).encode())
    return h.hexdigest()[:32]


def save_state_file(path: Path, state: ClientState, meta: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    from safetensors.torch import save_file

    tensors, skeleton = pack_state(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"skeleton": skeleton, "meta": json.dumps(meta)})
    replace_durably(tmp, path)


def load_state_file(path: Path) -> tuple[ClientState, dict[str, Any]] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        info = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return unpack_state(tensors, info["skeleton"]), json.loads(info["meta"])
