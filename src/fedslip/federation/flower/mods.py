"""Client mod: measure every message a FedSLIP ClientApp receives and sends, as Flower serialized it.

`wire_mod` wraps every ClientApp call (train, evaluate, query). For the incoming message and for the reply
it logs one row (see `records.describe_message`): kind, round, the payload bytes in the project's
encoding, the bytes of Flower's own serialized content, and every array's name and value digest. The
rows go to `<state-dir>/wire.jsonl` when the node has a `state-dir` in its node config, and to any
in-process observers registered in `TAPS` (tests use them to inspect every outgoing message).

The digests let a test prove, from the logs alone, that no private tensor ever left a node: a private
tensor sent under another name still has the same digest.

The mod also reports its measurement to the server: every successful reply gets a `ConfigRecord` "wire"
with the bytes Flower serialized for the payload that came in ("down-bytes") and the one going out
("up-bytes"), measured on the payload's `ArrayRecord` (its record, arrays and chunks, deflated). The
ServerApp writes them into the ledger's `wire_bytes` column.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord

from fedslip.federation.flower.records import ARRAYS, WIRE, describe_message, flower_bytes

log = logging.getLogger("fedslip.flower")

# Observers called as tap(context, incoming_message, reply_message) after every ClientApp call.
TAPS: list[Callable] = []


def partition_of(context) -> int:
    return int(context.node_config.get("partition-id", -1))


def wire_log_path(context) -> Path | None:
    folder = context.node_config.get("state-dir")
    return Path(str(folder)) / "wire.jsonl" if folder else None


def _log_rows(context, rows: list[dict]) -> None:
    pid = partition_of(context)
    for row in rows:
        row.update(partition=pid, run_id=int(context.run_id), node_id=int(context.node_id))
        log.info("partition %s %s %s round %s: %d payload bytes, %d Flower bytes", pid, row["direction"],
                 row["kind"], row["round"], row["payload_bytes"], row["flower_bytes"])
    path = wire_log_path(context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def payload_wire_bytes(msg) -> int:
    """Bytes Flower serializes for the message's payload `ArrayRecord` (0 when it carries none)."""
    if not msg.has_content() or ARRAYS not in msg.content.array_records:
        return 0
    return flower_bytes(msg.content.array_records[ARRAYS])


def wire_mod(msg, context, call_next):
    _log_rows(context, [describe_message(msg, "in")])  # logged before the call: a crash leaves it there
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content[WIRE] = ConfigRecord({"down-bytes": payload_wire_bytes(msg),
                                            "up-bytes": payload_wire_bytes(reply)})
    _log_rows(context, [describe_message(reply, "out")])
    for tap in list(TAPS):
        tap(context, msg, reply)
    return reply
