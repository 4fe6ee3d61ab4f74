"""Prove from what crossed the wire that no private tensor left a client: by name and by value.

Inputs are the rows `mods.wire_mod` logs for every message (array names and value digests) and the
fingerprints of every private state a node held (`private_fingerprints`, logged with each save in the
node's `events.jsonl`). A leak is an outgoing array whose name is a private name or is not a shared name,
or whose value equals (same dtype, shape and bytes) any private tensor a node ever held, whatever its name.

Constant tensors (e.g. a LoRA B still at its zero init) carry no information and can equal a shared tensor
of the same shape by construction, so they are not value-checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from fedslip.federation.client_state import pack_state, tensor_digest
from fedslip.methods.base import ClientState


def private_fingerprints(state: ClientState) -> dict[str, str]:
    """digest -> label for every non-constant tensor of a client state (own tensors and optimizer state; not
    `state.sent`, the client's copy of its own last upload)."""
    tensors, _ = pack_state(state)
    out = {}
    for label, t in tensors.items():
        if label.startswith("sent/"):
            continue
        if t.numel() > 1 and not bool((t == t.flatten()[0]).all()):
            out[tensor_digest(t)] = label
    return out


def forbidden_names(method, model) -> set[str]:
    names = set(model.private_names) | set(model.mask_names)
    if method.head == "local":
        names |= set(model.head_names)
    return names


def audit(outgoing: Iterable[dict], private: dict[str, str], forbidden: set[str],
          allowed: set[str] | None = None) -> list[str]:
    """Leaks found in `outgoing` wire rows (empty list: none)."""
    leaks = []
    for row in outgoing:
        where = f"partition {row.get('partition')} {row.get('kind')} round {row.get('round')}"
        for name, digest in (row.get("arrays") or {}).items():
            if name in forbidden:
                leaks.append(f"{where}: private tensor {name!r} sent by name")
            elif allowed is not None and name not in allowed:
                leaks.append(f"{where}: {name!r} is not a shared tensor of this method")
            if digest in private:
                leaks.append(f"{where}: {name!r} carries the value of private {private[digest]!r}")
    return leaks


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def audit_state_dirs(folders: Iterable[Path], forbidden: set[str],
                     allowed: set[str] | None = None) -> tuple[list[str], int, int]:
    """Audit a deployment from its nodes' logs: (leaks, outgoing messages checked, private tensors known)."""
    outgoing, private = [], {}
    for folder in folders:
        outgoing += [r for r in read_jsonl(Path(folder) / "wire.jsonl") if r["direction"] == "out"]
        for event in read_jsonl(Path(folder) / "events.jsonl"):
            private.update(event.get("private", {}))
    return audit(outgoing, private, forbidden, allowed), len(outgoing), len(private)
