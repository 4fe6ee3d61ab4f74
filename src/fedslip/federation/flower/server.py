"""Transport 2, Flower: the round protocol's requests as Messages to SuperNodes over a `Grid`.

Nodes are mapped to partitions by asking each new node for its `partition-id` (node config). A node that
does not answer before the round timeout, or answers with an error, is a failed client for the protocol;
`min-available` says how many partitions must be online before a round starts. Every message the server
sends or receives is logged (`wire.csv`), failures go to `flower.json`.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedslip.errors import UserError
from fedslip.federation.exchange import TRAIN, Reply, Request
from fedslip.federation.flower.client import INFO, NO_STATE, content_answer, request_message, upload_of
from fedslip.federation.flower.records import (ARRAYS, CONFIG, WIRE, describe_message, flower_bytes, payload_bytes,
                                               payload_to_record)
from fedslip.federation.flower.runtime import RUN_DEFAULTS, runtime_for
from fedslip.federation.payload import encode
from fedslip.federation.protocol import RoundProtocol

log = logging.getLogger("flwr")
REASK = 30.0  # seconds before a node that could not say its partition is asked again


class FlowerTransport:
    def __init__(self, grid: Grid, n_clients: int, min_available: int, timeout: float):
        if not 1 <= min_available <= n_clients:
            raise UserError(f"min-available = {min_available}: must be in [1, {n_clients}]")
        self.grid, self.n_clients, self.min_available, self.timeout = grid, n_clients, min_available, timeout
        self.wire: list[dict] = []  # every message the server sent or received, as `describe_message` rows
        self.partition_node: dict[int, int] = {}
        self.node_partition: dict[int, int] = {}
        self.failures: list[dict] = []
        self.node_info: dict[int, dict] = {}  # partition -> sizes and dominant label, as the node reported
        self.run_key = ""  # names the nodes' state files; kept when a run resumes
        # partition -> the last round whose train reply reached the server: the node's private state is the
        # one it saved then (a node that trained a round it was counted as failed in goes back to it)
        self.state_rounds: dict[int, int] | None = {}  # None: resumed from a checkpoint made before they were kept
        self.superseded: set[int] = set()  # nodes whose partition a newer node took: never asked again
        self.refused: dict[int, tuple[str, float]] = {}  # node -> (why it takes no part, when it said so)
        self.backbone_digest: str | None = None  # the server's model; a node whose model differs takes no part

    def checkpoint_meta(self) -> dict:
        rounds = None if self.state_rounds is None else {str(k): v for k, v in self.state_rounds.items()}
        return {"run_key": self.run_key, "state_rounds": rounds}

    def restore_meta(self, meta: dict) -> None:
        self.run_key = meta.get("run_key", self.run_key)
        rounds = meta.get("state_rounds")
        self.state_rounds = None if rounds is None else {int(k): int(v) for k, v in rounds.items()}

    def exchange(self, requests: list[Request], tick: Callable[[], None] = lambda: None) -> dict[int, Reply]:
        self.refresh_nodes(self.min_available, self.timeout)
        live = [r for r in requests if r.cid in self.partition_node]
        for r in live:
            r.config = {**r.config, "run-key": self.run_key}  # the round's requests share one config dict
            if self.state_rounds is not None:
                r.config["state-round"] = self.state_rounds.get(r.cid, 0)
        messages = [request_message(r, self.partition_node[r.cid]) for r in live]
        got, failed = self._send(messages, [r.cid for r in live])
        for r in live if self.state_rounds is not None else []:
            if r.kind == TRAIN and r.cid in got:
                self.state_rounds[r.cid] = r.round
        out = {}
        for req in requests:
            out[req.cid] = self._reply(req, got.get(req.cid), failed.get(req.cid, "no node for this partition"))
            if req.cid in failed or req.cid not in self.partition_node:
                self.failures.append({"round": req.round, "kind": req.kind, "partition": req.cid,
                                      "reason": out[req.cid].error})
            tick()
        return out

    def _reply(self, req: Request, msg: Message | None, reason: str) -> Reply:
        if req.cid not in self.partition_node:
            return Reply(req.cid, error=reason, delivered=False)
        if msg is None:
            return Reply(req.cid, error=reason, down_wire=flower_bytes(payload_to_record(req.payload)))
        wire = msg.content[WIRE] if WIRE in msg.content.config_records else {}
        down_wire, up_wire = int(wire.get("down-bytes", 0)), int(wire.get("up-bytes", 0))
        answer = content_answer(msg.content)
        try:
            answer.upload = upload_of(msg.content)
        except Exception as e:  # noqa: BLE001 - a malformed upload is the client's fault: rejected, not raised
            return Reply(req.cid, answer, error=f"upload could not be decoded: {type(e).__name__}: {e}",
                         up_bytes=payload_bytes(msg.content.array_records.get(ARRAYS)), down_wire=down_wire,
                         up_wire=up_wire, raw=msg)
        up_bytes = len(encode(answer.upload)) if answer.upload else 0
        return Reply(req.cid, answer, up_bytes=up_bytes, down_wire=down_wire, up_wire=up_wire, raw=msg)

    def _send(self, messages: list[Message], cids: list[int]) -> tuple[dict[int, Message], dict[int, str]]:
        """Send, wait up to the round timeout, log both directions; good replies and failures by partition."""
        for m, cid in zip(messages, cids):
            self.wire.append({**describe_message(m, "down"), "partition": cid, "arrays": None})
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout)) if messages else []
        # by the id of the message replied to: an error reply of the SuperLink (e.g. "node unavailable")
        # comes from the SuperLink's node id, not from the node that was asked
        by_id = {m.metadata.message_id: cid for m, cid in zip(messages, cids)}
        by_node = {m.metadata.dst_node_id: cid for m, cid in zip(messages, cids)}
        got: dict[int, Message] = {}
        failed: dict[int, str] = {}
        for r in replies:
            cid = by_id.get(r.metadata.reply_to_message_id, by_node.get(r.metadata.src_node_id, -1))
            self.wire.append({**describe_message(r, "up"), "partition": cid, "arrays": None})
            if r.has_error():
                failed[cid] = r.error.reason.strip().splitlines()[0] if r.error.reason.strip() else "error reply"
                if NO_STATE in r.error.reason:  # going on would train this partition from a fresh state, silently
                    said = r.error.reason[r.error.reason.index(NO_STATE):].splitlines()[0]
                    raise UserError(f"partition {cid}: {said}")
            else:
                got[cid] = r
        failed.update({cid: "no reply before the round timeout" for cid in cids if cid not in got and cid not in failed})
        return got, failed

    def refresh_nodes(self, need: int, timeout: float) -> None:
        """Map partitions to node ids (asking new nodes); wait until `need` partitions are online."""
        deadline = time.monotonic() + timeout
        while True:
            online = set(self.grid.get_node_ids())
            for node in [n for n in self.node_partition if n not in online]:
                pid = self.node_partition.pop(node)
                if self.partition_node.get(pid) == node:
                    del self.partition_node[pid]
            now = time.monotonic()  # a refused node is asked again now and then: its operator may fix it
            new = sorted(n for n in online if n not in self.node_partition and n not in self.superseded
                         and now - self.refused.get(n, ("", -REASK))[1] >= REASK)
            if new:
                self._ask_partitions(new)
            if len(self.partition_node) >= need:
                return
            if time.monotonic() > deadline:
                why = "".join(f"; node {n}: {reason}" for n, (reason, _) in sorted(self.refused.items()) if n in online)
                raise UserError(f"only {len(self.partition_node)} of the {need} required clients are online "
                                f"after {timeout:.0f} s (partitions {sorted(self.partition_node)}){why}")
            time.sleep(1.0)

    def refuse(self, node: int, reason: str) -> None:
        """The node takes no part (said once per reason); it is asked again after REASK seconds."""
        if self.refused.get(node, ("",))[0] != reason:
            log.warning("node %d cannot take part: %s", node, reason)
        self.refused[node] = (reason, time.monotonic())

    def _ask_partitions(self, nodes: list[int]) -> None:
        ask = [Message(RecordDict({CONFIG: ConfigRecord({"server-round": 0})}), n, MessageType.QUERY) for n in nodes]
        for r in self.grid.send_and_receive(ask, timeout=self.timeout):
            if r.has_error():  # e.g. a SuperNode started without its partition-id: said once, not asked again
                reason = r.error.reason.strip().splitlines()[-1] if r.error.reason.strip() else "error reply"
                if r.metadata.src_node_id in nodes:
                    self.refuse(r.metadata.src_node_id, reason)
                continue
            info = r.content[INFO]
            pid, n_parts = int(info["partition-id"]), int(info["num-partitions"])
            if not 0 <= pid < self.n_clients or n_parts not in (-1, self.n_clients):
                raise UserError(f"node {r.metadata.src_node_id} has partition-id={pid} num-partitions="
                                f"{n_parts}; this run has partition.n_clients={self.n_clients}")
            node = r.metadata.src_node_id
            theirs = info.get("backbone-digest")  # absent from nodes of versions before it was sent
            if theirs is not None and self.backbone_digest is not None and theirs != self.backbone_digest:
                self.refuse(node, f"partition {pid}: its backbone is not the server's (other weights or config); "
                                  "load the same model folder on every node")
                continue
            self.refused.pop(node, None)
            old = self.partition_node.get(pid)
            if old is not None and old != node:  # a restarted node: the newest connection wins
                self.node_partition.pop(old, None)
                self.superseded.add(old)
            self.partition_node[pid], self.node_partition[node] = node, pid
            self.node_info[pid] = {"n_train": int(info["n-train"]), "n_test": int(info["n-test"]),
                                   "dominant_label": int(info["dominant-label"])}


class FlowerServer(RoundProtocol):
    """The round protocol over a Flower Grid (the ServerApp's body)."""

    def __init__(self, grid: Grid, cfg, run_config=None, rt=None):
        rc = {**RUN_DEFAULTS, **dict(run_config or {})}
        rt = rt or runtime_for(cfg, server=bool(rc["node-data"]))
        transport = FlowerTransport(grid, rt.n_clients, int(rc["min-available"]) or rt.n_clients,
                                    float(rc["round-timeout"]))
        transport.backbone_digest = rt.prep.backbone.digest
        super().__init__(rt.prep, rt.method, rt.model, transport)
        self.global_test_everywhere = bool(rc["node-data"])  # whichever nodes hold the global test file

    def test_size(self, cid: int) -> int:
        """What the node reported of its test set (a server that holds no data knows only that)."""
        return int(self.transport.node_info.get(cid, self.prep.clients[cid])["n_test"])

    def client_records(self, last):
        for pid, info in self.transport.node_info.items():  # what each node reported of its own data
            self.prep.clients[pid].update(info)
        return super().client_records(last)

    @property
    def wire(self) -> list[dict]:
        return self.transport.wire

    @property
    def failures(self) -> list[dict]:
        return self.transport.failures

    def write(self, out: Path, result, runtime: str, run_id: int) -> None:
        """The run's outputs, and with them (in the same staged move) wire.csv and flower.json."""
        from fedslip.evaluation.outputs import write_outputs

        strategy = getattr(self.aggregation, "name", "method")
        info = {"runtime": runtime, "run_id": run_id, "strategy": strategy,
                "min_available": self.transport.min_available,
                "partitions": {str(k): v for k, v in sorted(self.transport.partition_node.items())},
                "failures": self.failures}

        def flower_files(folder: Path) -> None:
            write_wire_csv(self.wire, folder / "wire.csv")
            (folder / "flower.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

        write_outputs(out, self.prep, [(result, self.ledger)], flower_files)


WIRE_FIELDS = ["round", "kind", "direction", "partition", "payload_bytes", "flower_bytes", "n_tensors", "error"]


def write_wire_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=WIRE_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow(row)
