"""What the Flower runtime puts into Flower records, and how big it is on the wire.

* A `Payload` travels as an `ArrayRecord` holding exactly its tensors, one `Array` per name, in the same
  order; the round trip is bit-exact (float32 → NumPy `.npy` → float32).
* A `ClientState` (private tensors, masks, local head, optimizer state) is packed (`client_state.pack_state`)
  into an `ArrayRecord` plus a JSON skeleton for `Context.state`. It is never put into a message.
* `payload_bytes` is the length of the payload in the project's encoding (safetensors, `payload.encode`): the
  ledger's `bytes` on every runtime, so a Flower run and an in-process run have the same ledger. In Flower
  runs the ledger's `wire_bytes` adds what Flower serialized for the payload's ArrayRecord (client mod).
  `flower_bytes` is what Flower itself serializes for a message's content: the deflated bytes of every
  distinct object of the content tree (records, arrays, array chunks; identical chunks are stored once).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from fedslip.errors import UserError
from fedslip.federation.client_state import pack_state, tensor_digest, unpack_state
from fedslip.federation.payload import Payload, encode
from fedslip.methods.base import ClientState

ARRAYS = "arrays"  # the payload's ArrayRecord in a message (Flower strategies' default key)
METRICS = "metrics"
CONFIG = "config"
# The client mod's record in a reply: Flower's bytes of the payload in and out. A ConfigRecord, because
# Flower's strategies require exactly one MetricRecord per reply.
WIRE = "wire"
EVALUATION = "evaluation"  # a ConfigRecord in a reply: the scores of an evaluation the request asked for
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
    """Bytes of the record's tensors in the project's payload encoding (the ledger's measure); for a record
    whose arrays do not decode (a malformed upload), the bytes of their raw data."""
    if record is None or not len(record):
        return 0
    try:
        return len(encode(record_to_payload(record)))
    except ValueError:
        return sum(len(a.data) for a in record.values())


def flower_bytes(obj) -> int:
    """Bytes Flower serializes for `obj` (a RecordDict or record): every distinct object of its tree, deflated."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


def describe_message(msg, direction: str) -> dict[str, Any]:
    """One wire-log row for a message: its kind, round, sizes, and each array's name and value digest."""
    content = msg.content if msg.has_content() else None
    record = content.array_records.get(ARRAYS) if content is not None else None
    config = content.config_records.get(CONFIG) if content is not None else None
    arrays = {}
    for rec in (content.array_records.values() if content is not None else []):
        for name, array in rec.items():
            arrays[name] = array_digest(array)
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


def array_digest(array) -> str:
    """The value digest of an Array (`tensor_digest`), or of its raw bytes when they do not decode."""
    try:
        return tensor_digest(torch.from_numpy(np.array(array.numpy(), copy=True)))
    except ValueError:
        return "raw:" + hashlib.sha256(array.data).hexdigest()[:28]


def _group_round(group_id: str) -> int:
    return int(group_id) if group_id.isdigit() else 0


# --- ClientState <-> Context.state -------------------------------------------------------------------
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
