"""FedSLIP as a Flower app: a ServerApp and a ClientApp around the `Method` objects of the in-process engine.

    [tool.flwr.app.components]
    serverapp = "fedslip.federation.flower.app:server_app"
    clientapp = "fedslip.federation.flower.app:client_app"

Run configuration (`[tool.flwr.app.config]`, overridable with `flwr run . --run-config 'key=value ...'`):

    preset        "quick" | "paper" | ""           the fedslip preset to start from
    method        a method name                    (`fedslip methods`)
    config-file   path to a fedslip TOML config    ("" = none)
    overrides     "section.key=value; ..."          like `fedslip run --set`, separated by ';'
    out           output folder of the ServerApp    results.json, rounds.csv, ... as `fedslip run`
    min-available partitions that must be online   0 = all of partition.n_clients
    round-timeout seconds to wait for the replies of one round

Protocol (Message API; every message carries one `ConfigRecord` "config" with `server-round`):

* `query`: the server asks each new node for its `partition-id` (node config), so that the seeded client
  selection of the in-process engine (`select_clients`) picks the same clients on Flower.
* `train`: "arrays" = `ArrayRecord` of exactly `method.down_payload(glob, cid)`; the reply carries
  "arrays" = exactly the uploaded Payload and "metrics" = `MetricRecord` (num-examples, loss, ...).
* `evaluate`: "arrays" = the down payload of the current global state; the reply is metrics only
  (accuracy of the global view and of the personal view on the client's own test set; on request the
  balanced global test set and, after the last round, K-step accuracy).

Client-private state (`ClientState`: private track, masks, local head, optimizer state) lives in the node's
`Context.state` and, when the node config has `state-dir`, in `<state-dir>/run-<run_id>-partition-<k>
.safetensors` after every round, so a restarted SuperNode resumes with its private track. It is never put in
a message. `<state-dir>/events.jsonl` (saves, resumes, with value digests of the private tensors) and
`<state-dir>/wire.jsonl` (the client mod's log of every message) stay on the node too; the audit in
`audit` reads them. Seeds are those of the in-process engine, so the same config gives the same
numbers. Server-side aggregation: the method's own, or a Flower strategy (`method.strategy`).

Data: every node (and the server, for the client table and the backbone) runs `prepare(cfg)` itself, which
is deterministic from the config and the seed; a node trains and evaluates only its own partition.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedslip.config import Config, load_config
from fedslip.errors import UserError
from fedslip.evaluation.metrics import group_accuracy, summarize
from fedslip.evaluation.records import ClientRecord, MethodResult, RoundRecord
from fedslip.federation.flower.audit import private_fingerprints
from fedslip.federation.flower.mods import partition_of, wire_mod
from fedslip.federation.flower.records import (ARRAYS, CONFIG, METRICS, WIRE, describe_message, flower_bytes,
                                               load_state_file, payload_to_record, record_to_payload,
                                               save_state_file, state_digest, state_from_context,
                                               state_to_context)
from fedslip.federation.flower.strategies import StrategyAggregation, parse_spec, prox_override
from fedslip.federation.ledger import Ledger
from fedslip.federation.payload import encode
from fedslip.federation.simulation import select_clients
from fedslip.methods import METHODS
from fedslip.methods.base import ClientData, ClientState, mean
from fedslip.seeding import derive, numpy_gen, torch_gen

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

log = logging.getLogger("flwr")

RUN_DEFAULTS: dict[str, Any] = {"preset": "", "method": "fedslip", "config-file": "", "overrides": "",
                                "out": "runs/flower", "min-available": 0, "round-timeout": 600.0}
INFO = "info"  # the ConfigRecord of a query reply


# --- configuration and per-process caches ------------------------------------------------------------------
def split_overrides(text: str) -> list[str]:
    return [s.strip() for s in text.replace("\n", ";").split(";") if s.strip()]


def config_from_run(run_config) -> Config:
    rc = {**RUN_DEFAULTS, **dict(run_config)}
    return load_config(str(rc["config-file"]) or None, str(rc["preset"]) or None, str(rc["method"]) or None,
                       split_overrides(str(rc["overrides"])))


class Runtime:
    """What one process needs for a config: data and backbone (`prepare`), the method, and its model."""

    def __init__(self, cfg: Config, prep=None):
        from fedslip.prepare import prepare

        self.cfg = cfg
        self.seed = cfg.train.seed
        self.prep = prep if prep is not None else prepare(cfg)
        self.method = METHODS[cfg.method.name](cfg)
        self.model = self.method.build(self.prep.backbone)
        self.n_clients = len(self.prep.split.train)

    def client_data(self, cid: int, rnd: int) -> ClientData:
        return ClientData(cid, self.prep.train, self.prep.split.train[cid], self.cfg.train.batch_size,
                          numpy_gen(self.seed, "batches", cid, rnd))


_RUNTIMES: dict[str, Runtime] = {}


def runtime_for(cfg: Config, prep=None) -> Runtime:
    """The process's Runtime for `cfg` (built once; `prep` reuses an already prepared run of the same data)."""
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one config per process at a time: a new run frees the previous one
        _RUNTIMES[key] = Runtime(cfg, prep)
    return _RUNTIMES[key]


# ============================================================================================================
# ClientApp
# ============================================================================================================
client_app = ClientApp(mods=[wire_mod])


def _partition(context: Context, n_clients: int | None = None) -> int:
    pid = partition_of(context)
    if pid < 0:
        raise UserError("this SuperNode has no partition: start it with "
                        "--node-config 'partition-id=K num-partitions=N'")
    n = context.node_config.get("num-partitions")
    if n_clients is not None and (pid >= n_clients or (n is not None and int(n) != n_clients)):
        raise UserError(f"node partition-id={pid} num-partitions={n} does not fit partition.n_clients={n_clients}")
    return pid


def state_file(context: Context, pid: int) -> Path | None:
    folder = context.node_config.get("state-dir")
    return Path(str(folder)) / f"run-{context.run_id}-partition-{pid}.safetensors" if folder else None


def _event(context: Context, **row) -> None:
    folder = context.node_config.get("state-dir")
    if folder:
        Path(str(folder)).mkdir(parents=True, exist_ok=True)
        with open(Path(str(folder)) / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "run_id": int(context.run_id), **row}) + "\n")


def load_client_state(rt: Runtime, context: Context, pid: int) -> tuple[ClientState, int]:
    """The node's private state: from Context.state, else from its disk (a restarted node), else fresh."""
    got = state_from_context(context)
    if got is None and (path := state_file(context, pid)) is not None:
        got = load_state_file(path)
        if got is not None:
            state, meta = got
            _event(context, event="resume", partition=pid, round=int(meta["round"]), digest=state_digest(state))
            log.info("partition %d: resumed private state of round %s from %s", pid, meta["round"], path)
    if got is not None:
        state, meta = got
        return state, int(meta["round"])
    state = rt.method.init_client(rt.model, pid, torch_gen(rt.seed, "client", pid))
    return state, 0


def store_client_state(context: Context, pid: int, state: ClientState, rnd: int) -> None:
    meta = {"round": rnd, "partition-id": pid}
    state_to_context(context, state, meta)
    if (path := state_file(context, pid)) is not None:
        save_state_file(path, state, meta)
        _event(context, event="save", partition=pid, round=rnd, digest=state_digest(state),
               private=private_fingerprints(state))


@client_app.query()
def client_query(msg: Message, context: Context) -> Message:
    pid = _partition(context)
    info = {"partition-id": pid, "num-partitions": int(context.node_config.get("num-partitions", -1))}
    return Message(RecordDict({INFO: ConfigRecord(info)}), reply_to=msg)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    rt = runtime_for(config_from_run(context.run_config))
    pid = _partition(context, rt.n_clients)
    config = msg.content[CONFIG]
    rnd = int(config["server-round"])
    if int(config.get("partition-id", pid)) != pid:
        raise UserError(f"train message for partition {config['partition-id']} reached partition {pid}")
    if "proximal-mu" in config:  # Flower's FedProx strategy: its μ is the global step's proximal coefficient
        prox_override(rt.method, float(config["proximal-mu"]))
    state, _ = load_client_state(rt, context, pid)
    down = record_to_payload(msg.content[ARRAYS])
    torch.manual_seed(derive(rt.seed, "dropout", pid, rnd))
    data = rt.client_data(pid, rnd)
    up, state, metrics = rt.method.local_update(rt.model, down, state, data, rnd)
    store_client_state(context, pid, state, rnd)
    numbers = {"num-examples": len(data), **{k: float(v) for k, v in metrics.items()}}
    reply = RecordDict({ARRAYS: payload_to_record(up), METRICS: MetricRecord(numbers)})
    return Message(reply, reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    rt = runtime_for(config_from_run(context.run_config))
    pid = _partition(context, rt.n_clients)
    config = msg.content[CONFIG]
    state, _ = load_client_state(rt, context, pid)
    method, model, prep = rt.method, rt.model, rt.prep
    bs = rt.cfg.train.eval_batch_size
    glob = record_to_payload(msg.content[ARRAYS])
    own = prep.split.test[pid]
    metrics: dict[str, float] = {"num-examples": len(own)}
    view = method.global_view(model, glob, state)
    if view is not None:
        if bool(config.get("global-test", False)):
            metrics["global-acc"], metrics["client-acc"] = group_accuracy(
                model, view, "global", prep.test, [prep.split.global_test, own], bs)
        else:
            metrics["client-acc"] = group_accuracy(model, view, "global", prep.test, [own], bs)[0]
    if method.personalizes:
        metrics["personal-acc"] = group_accuracy(model, method.personal_view(model, glob, state), "both",
                                                 prep.test, [own], bs)[0]
    if bool(config.get("kstep", False)) and hasattr(method, "kstep_view") and rt.cfg.method.kstep:
        torch.manual_seed(derive(rt.seed, "kstep-dropout", pid))
        kview = method.kstep_view(model, glob, state, rt.client_data(pid, 0))
        metrics["kstep-acc"] = group_accuracy(model, kview, "global", prep.test, [own], bs)[0]
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)


# ============================================================================================================
# ServerApp
# ============================================================================================================
server_app = ServerApp()


class FlowerServer:
    """The server side of a FedSLIP run over a Flower `Grid`: the in-process engine's loop, on messages."""

    def __init__(self, grid: Grid, cfg: Config, run_config=None, rt: Runtime | None = None):
        rc = {**RUN_DEFAULTS, **dict(run_config or {})}
        self.grid, self.cfg = grid, cfg
        self.rt = rt or runtime_for(cfg)
        self.method, self.model, self.prep = self.rt.method, self.rt.model, self.rt.prep
        self.seed, self.n_clients = cfg.train.seed, self.rt.n_clients
        self.min_available = int(rc["min-available"]) or self.n_clients
        if not 1 <= self.min_available <= self.n_clients:
            raise UserError(f"min-available = {self.min_available}: must be in [1, {self.n_clients}]")
        self.timeout = float(rc["round-timeout"])
        spec = getattr(cfg.method, "strategy", "method") or "method"
        self.aggregation = StrategyAggregation(spec) if parse_spec(spec)[0] != "method" else None
        self.glob = self.method.init_global(self.model, torch_gen(self.seed, "global"))
        self.ledger = Ledger(self.method.name)
        self.wire: list[dict] = []  # every message the server sent or received, as `describe_message` rows
        self.partition_node: dict[int, int] = {}
        self.node_partition: dict[int, int] = {}
        self.failures: list[dict] = []

    # --- nodes --------------------------------------------------------------------------------------
    def _exchange(self, messages: list[Message], kind: str, rnd: int, cids: list[int]) -> dict[int, Message]:
        """Send, wait up to the round timeout, log both directions; return the good replies by partition."""
        for m, cid in zip(messages, cids):
            self.wire.append({**describe_message(m, "down"), "partition": cid, "arrays": None})
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout)) if messages else []
        # by the id of the message replied to: an error reply of the SuperLink (e.g. "node unavailable")
        # comes from the SuperLink's node id, not from the node that was asked
        by_id = {m.metadata.message_id: cid for m, cid in zip(messages, cids)}
        by_node = {m.metadata.dst_node_id: cid for m, cid in zip(messages, cids)}
        out: dict[int, Message] = {}
        failed: dict[int, str] = {}
        for r in replies:
            cid = by_id.get(r.metadata.reply_to_message_id, by_node.get(r.metadata.src_node_id, -1))
            self.wire.append({**describe_message(r, "up"), "partition": cid, "arrays": None})
            if r.has_error():
                failed[cid] = r.error.reason
            else:
                out[cid] = r
        failed.update({cid: "no reply before the round timeout" for cid in cids
                       if cid not in out and cid not in failed})
        for cid, reason in failed.items():
            self.failures.append({"round": rnd, "kind": kind, "partition": cid, "reason": reason})
            log.warning("%s round %d: partition %d failed: %s", kind, rnd, cid, reason)
        return out

    def refresh_nodes(self, need: int, timeout: float) -> None:
        """Map partitions to node ids (asking new nodes); wait until `need` partitions are online."""
        deadline = time.monotonic() + timeout
        while True:
            online = set(self.grid.get_node_ids())
            for node in [n for n in self.node_partition if n not in online]:
                pid = self.node_partition.pop(node)
                if self.partition_node.get(pid) == node:
                    del self.partition_node[pid]
            new = sorted(n for n in online if n not in self.node_partition)
            if new:
                ask = [Message(RecordDict({CONFIG: ConfigRecord({"server-round": 0})}), n, MessageType.QUERY)
                       for n in new]
                replies = self.grid.send_and_receive(ask, timeout=self.timeout)
                for r in replies:
                    if r.has_error():
                        continue
                    info = r.content[INFO]
                    pid, n_parts = int(info["partition-id"]), int(info["num-partitions"])
                    if not 0 <= pid < self.n_clients or n_parts not in (-1, self.n_clients):
                        raise UserError(f"node {r.metadata.src_node_id} has partition-id={pid} num-partitions="
                                        f"{n_parts}; this run has partition.n_clients={self.n_clients}")
                    node = r.metadata.src_node_id
                    old = self.partition_node.get(pid)
                    if old is not None and old != node:  # a restarted node: the newest connection wins
                        self.node_partition.pop(old, None)
                    self.partition_node[pid], self.node_partition[node] = node, pid
            if len(self.partition_node) >= need:
                return
            if time.monotonic() > deadline:
                raise UserError(f"only {len(self.partition_node)} of the {need} required clients are online "
                                f"after {timeout:.0f} s (partitions {sorted(self.partition_node)})")
            time.sleep(1.0)

    # --- rounds -------------------------------------------------------------------------------------
    def _message(self, cid: int, payload, kind: str, rnd: int, **config) -> Message:
        content = RecordDict({ARRAYS: payload_to_record(payload),
                              CONFIG: ConfigRecord({"server-round": rnd, "partition-id": cid, **config})})
        return Message(content, self.partition_node[cid], kind, group_id=str(rnd))

    def run_round(self, rnd: int) -> RoundRecord:
        method = self.method
        self.refresh_nodes(self.min_available, self.timeout)
        selected = select_clients(self.n_clients, self.cfg.train.client_fraction, self.seed, rnd)
        live = [c for c in selected if c in self.partition_node]
        downs = {cid: method.down_payload(self.glob, cid) for cid in live}
        extra = self.aggregation.configure(rnd, downs[live[0]], len(live)) if self.aggregation and live else {}
        messages = [self._message(cid, downs[cid], MessageType.TRAIN, rnd, **extra) for cid in live]
        replies = self._exchange(messages, "train", rnd, live)
        ups, losses = [], []
        for cid in live:  # the ledger in the in-process engine's order: down, up per client
            # wire bytes: the client mod's measurement; for a client that never replied, the same
            # measurement made here on the message that was sent
            wire = replies[cid].content[WIRE] if cid in replies else None
            down_wire = int(wire["down-bytes"]) if wire else flower_bytes(payload_to_record(downs[cid]))
            self.ledger.record(rnd, cid, "down", downs[cid], len(encode(downs[cid])), down_wire)
            if cid in replies:
                up = record_to_payload(replies[cid].content[ARRAYS])
                self.ledger.record(rnd, cid, "up", up, len(encode(up)), int(wire["up-bytes"]))
                metrics = replies[cid].content[METRICS]
                ups.append((up, int(metrics["num-examples"])))
                losses.append(float(metrics["loss"]))
        if method.communicates and ups:
            if self.aggregation is not None:
                self.glob = self.aggregation.aggregate_messages(rnd, [replies[c] for c in live if c in replies],
                                                                self.glob)
            else:
                self.glob = method.aggregate(ups, self.glob, rnd)
        previous = sum(self.ledger.mib_round(r) for r in range(1, rnd))
        mib = self.ledger.mib_round(rnd)
        log.info("round %d: %d/%d clients trained, loss %.4f, %.3f MiB", rnd, len(ups), len(selected),
                 mean(losses), mib)
        return RoundRecord(round=rnd, train_loss=mean(losses), mib_round=mib, mib_cumulative=previous + mib)

    def evaluate(self, record: RoundRecord, final: bool) -> dict[int, dict[str, float]]:
        rnd = record.round
        cids = sorted(self.partition_node)
        local_head = self.method.head == "local"
        messages = [self._message(cid, self.method.down_payload(self.glob, cid), MessageType.EVALUATE, rnd,
                                  **{"global-test": local_head or k == 0, "kstep": final})
                    for k, cid in enumerate(cids)]
        replies = self._exchange(messages, "evaluate", rnd, cids)
        got = {cid: dict(r.content[METRICS]) for cid, r in replies.items()}
        nan = float("nan")

        def per_client(key: str) -> list[float]:
            return [float(got[k][key]) if k in got and key in got[k] else nan for k in range(self.n_clients)]

        if not any("client-acc" in m for m in got.values()):
            record.global_acc, record.client_acc = None, None
        else:
            globals_ = [float(got[k]["global-acc"]) for k in sorted(got) if "global-acc" in got[k]]
            record.global_acc = (float(np.mean(globals_)) if local_head else globals_[0]) if globals_ else None
            record.client_acc = per_client("client-acc")
        record.personal_acc = per_client("personal-acc") if self.method.personalizes else record.client_acc
        record.evaluated = True
        log.info("round %d: evaluated %d clients, global acc %s", rnd, len(got), record.global_acc)
        return got

    def run(self) -> tuple[MethodResult, Ledger]:
        start = time.perf_counter()
        result = MethodResult(method=self.method.name)
        rounds = self.method.rounds()
        last_eval: dict[int, dict[str, float]] = {}
        for rnd in range(1, rounds + 1):
            record = self.run_round(rnd)
            if rnd % self.cfg.train.eval_every == 0 or rnd == rounds:
                last_eval = self.evaluate(record, final=rnd == rounds)
            result.rounds.append(record)
        last = result.rounds[-1]
        for k in range(self.n_clients):
            info = self.prep.clients[k]
            kstep = last_eval.get(k, {}).get("kstep-acc")
            result.clients.append(ClientRecord(
                client=k, n_train=len(self.prep.split.train[k]), n_test=len(self.prep.split.test[k]),
                dominant_label=info["dominant_label"],
                client_acc=_finite(last.client_acc[k]) if last.client_acc else None,
                personal_acc=_finite(last.personal_acc[k]) if last.personal_acc else None,
                kstep_acc=float(kstep) if kstep is not None else None))
        result.wall_time_s = time.perf_counter() - start
        result.final = summarize(result, self.ledger.total_mib(), self.ledger.up_params(),
                                 self.ledger.total_wire_mib())
        return result, self.ledger

    # --- outputs ------------------------------------------------------------------------------------
    def write(self, out: Path, result: MethodResult, wall_time_s: float, runtime: str, run_id: int) -> None:
        from fedslip.evaluation.outputs import write_outputs

        write_outputs(out, self.prep, [(result, self.ledger)], wall_time_s)
        write_wire_csv(self.wire, out / "wire.csv")
        info = {"runtime": runtime, "run_id": run_id, "strategy": self.aggregation.name if self.aggregation else
                "method", "min_available": self.min_available, "partitions": {str(k): v for k, v in
                                                                              sorted(self.partition_node.items())},
                "failures": self.failures}
        (out / "flower.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


WIRE_FIELDS = ["round", "kind", "direction", "partition", "payload_bytes", "flower_bytes", "n_tensors", "error"]


def write_wire_csv(rows: list[dict], path: Path) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=WIRE_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow(row)


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    start = time.perf_counter()
    cfg = config_from_run(context.run_config)
    out = Path(str({**RUN_DEFAULTS, **dict(context.run_config)}["out"])).expanduser().resolve()
    server = FlowerServer(grid, cfg, context.run_config)
    log.info("fedslip %s on Flower: %d partitions (min available %d), %d rounds, strategy %s; output %s",
             cfg.method.name, server.n_clients, server.min_available, server.method.rounds(),
             server.aggregation.name if server.aggregation else "method", out)
    result, _ = server.run()
    server.write(out, result, time.perf_counter() - start, type(grid).__name__, int(context.run_id))
    log.info("fedslip: wrote %s (global acc %s, %.3f MiB in total)", out, result.final.get("global_acc"),
             result.final.get("mib_total"))
