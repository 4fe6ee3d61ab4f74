"""What the Flower runtime puts into Flower records, and how big it is on the wire.

* A `Payload` travels as an `ArrayRecord` holding exactly its tensors, one `Array` per name, in the same
  order; the round trip is bit-exact (float32 → NumPy `.npy` → float32).
* A `ClientState` (private tensors, masks, local head, optimizer state) is packed into an `ArrayRecord` plus
  a JSON skeleton for `Context.state`, and into one safetensors file for the node's own disk. Neither is ever
  put into a message.
* `payload_bytes` is the length of the payload in the project's encoding (safetensors, `payload.encode`): the
  ledger's `bytes` on every runtime, so a Flower run and an in-process run have the same ledger. In Flower
  runs the ledger's `wire_bytes` adds what Flower serialized for the payload's ArrayRecord (client mod).
  `flower_bytes` is what Flower itself serializes for a message's content: the deflated bytes of every
  distinct object of the content tree (records, arrays, array chunks; identical chunks are stored once).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedslip.errors import UserError
from fedslip.federation.payload import Payload, encode
from fedslip.methods.base import ClientState

ARRAYS = "arrays"  # the payload's ArrayRecord in a message (Flower strategies' default key)
METRICS = "metrics"
CONFIG = "config"
# The client mod's record in a reply: Flower's bytes of the payload in and out. A ConfigRecord, because
# Flower's strategies require exactly one MetricRecord per reply.
WIRE = "wire"
STATE_TENSORS = "fedslip.state.tensors"  # keys in Context.state
STATE_META = "fedslip.state.meta"


# --- payload <-> ArrayRecord ----------------------------------------------------------------------------
def payload_to_record(payload: Payload):
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord()
    for name, t in payload.items():
        if t.dtype == torch.bfloat16:
            raise UserError(f"tensor {name!r} is bfloat16, which Flower's NumPy arrays cannot carry")
        record[name] = Array(t.detach().cpu().contiguous().numpy())
    return record


def record_to_payload(record) -> Payload:
    return {name: torch.from_numpy(np.array(array.numpy(), copy=True)) for name, array in record.items()}


# --- sizes ----------------------------------------------------------------------------------------------
def payload_bytes(record) -> int:
    """Bytes of the record's tensors in the project's payload encoding (the ledger's measure)."""
    return len(encode(record_to_payload(record))) if record is not None and len(record) else 0


def flower_bytes(obj) -> int:
    """Bytes Flower serializes for `obj` (a RecordDict or record): every distinct object of its tree, deflated."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def tensor_digest(t: torch.Tensor) -> str:
    """A value fingerprint: dtype, shape and raw bytes (equal digests <=> equal tensors)."""
    a = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{a.dtype}|{tuple(a.shape)}|".encode())
    h.update(a.numpy().tobytes() if a.dtype != torch.bfloat16 else a.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def describe_message(msg, direction: str) -> dict[str, Any]:
    """One wire-log row for a message: its kind, round, sizes, and each array's name and value digest."""
    content = msg.content if msg.has_content() else None
    record = content.array_records.get(ARRAYS) if content is not None else None
    config = content.config_records.get(CONFIG) if content is not None else None
    arrays = {}
    for rec in (content.array_records.values() if content is not None else []):
        for name, array in rec.items():
            arrays[name] = tensor_digest(torch.from_numpy(np.array(array.numpy(), copy=True)))
    return {
        "direction": direction,
        "kind": msg.metadata.message_type,
        "round": int(config["server-round"]) if config is not None and "server-round" in config else
        _group_round(msg.metadata.group_id),
        "payload_bytes": payload_bytes(record),
        "flower_bytes": flower_bytes(content) if content is not None else 0,
        "n_tensors": len(arrays),
        "arrays": arrays,
        "error": msg.error.reason if msg.has_error() else "",
    }


def _group_round(group_id: str) -> int:
    return int(group_id) if group_id.isdigit() else 0


# --- ClientState <-> records / disk ---------------------------------------------------------------------
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


def state_to_context(context, state: ClientState, meta: dict[str, Any]) -> None:
    from flwr.app import ConfigRecord

    tensors, skeleton = pack_state(state)
    context.state[STATE_TENSORS] = payload_to_record(tensors)
    context.state[STATE_META] = ConfigRecord({"skeleton": skeleton, **meta})


def state_from_context(context) -> tuple[ClientState, dict[str, Any]] | None:
    if STATE_META not in context.state.config_records:
        return None
    meta = dict(context.state.config_records[STATE_META])
    tensors = record_to_payload(context.state.array_records[STATE_TENSORS])
    return unpack_state(tensors, str(meta.pop("skeleton"))), meta


def save_state_file(path: Path, state: ClientState, meta: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    from safetensors.torch import save_file

    tensors, skeleton = pack_state(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"skeleton": skeleton, "meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_state_file(path: Path) -> tuple[ClientState, dict[str, Any]] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        info = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return unpack_state(tensors, info["skeleton"]), json.loads(info["meta"])
