"""The byte ledger: every serialized payload, per round, client and direction."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MIB = 1024 * 1024


@dataclass
class Entry:
    method: str
    round: int
    client: int
    direction: str  # "down" (server -> client) or "up" (client -> server)
    bytes: int  # length of the serialized payload
    n_params: int
    n_tensors: int
    dtypes: str
    # Bytes Flower serialized for this payload's ArrayRecord, as the client mod measured them (Flower runs
    # only; None in-process). `bytes` stays the project's encoding on every runtime, so ledgers compare.
    wire_bytes: int | None = None
    kind: str = "train"  # "train", or "eval": an evaluation-only download
    status: str = "ok"  # "ok", "rejected" (failed the server's checks, not aggregated) or "failed" (none came)
    note: str = ""  # why it was rejected or failed


class Ledger:
    def __init__(self, method: str):
        self.method = method
        self.entries: list[Entry] = []

    def record(self, rnd: int, client: int, direction: str, payload: dict[str, torch.Tensor], n_bytes: int,
               wire_bytes: int | None = None, kind: str = "train", status: str = "ok", note: str = "") -> None:
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in payload.values()})
        self.entries.append(Entry(self.method, rnd, client, direction, n_bytes,
                                  sum(t.numel() for t in payload.values()), len(payload), "+".join(dtypes),
                                  wire_bytes, kind, status, note))

    def rows(self, kind: str = "train") -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]

    def mib_round(self, rnd: int, kind: str = "train") -> float:
        return sum(e.bytes for e in self.rows(kind) if e.round == rnd) / MIB

    def total_mib(self, kind: str = "train") -> float:
        return sum(e.bytes for e in self.rows(kind)) / MIB

    def total_wire_mib(self) -> float | None:
        """Flower's serialized bytes of every training payload, when every entry has them (a Flower run)."""
        rows = [e for e in self.rows() if e.status != "failed"]
        if not rows or any(e.wire_bytes is None for e in rows):
            return None
        return sum(e.wire_bytes for e in rows) / MIB

    def up_params(self) -> int:
        """Parameters one client uploads in one round (the largest accepted upload seen)."""
        return max((e.n_params for e in self.entries if e.direction == "up" and e.status == "ok"), default=0)


def write_ledger_csv(ledgers: list[Ledger], path: Path) -> None:
    fields = list(Entry.__dataclass_fields__)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for ledger in ledgers:
            for e in ledger.entries:
                w.writerow(asdict(e))
