"""What crosses the wire in a Flower run, seen by the client mod on every message.

* No outgoing message ever carries a private-track tensor, a mask, optimizer state or a local head: not by
  name, not by value under another name. The audit fails when a method leaks one (checked both ways).
* The mod's sizes are the server's sizes for the same messages, and the train payload bytes are the ledger's.
"""

from __future__ import annotations

import dataclasses

import pytest

from flower_util import flower_run, run_config

from fedslip.federation.flower import mods as flower_mods
from fedslip.federation.flower.app import client_app
from fedslip.federation.flower.runtime import config_from_run, runtime_for
from fedslip.federation.flower.server import FlowerServer
from fedslip.federation.flower.audit import audit, audit_state_dirs, forbidden_names, private_fingerprints
from fedslip.federation.flower.local_grid import LocalGrid
from fedslip.federation.flower.records import describe_message, state_from_context
from fedslip.methods.fedslip import FedSLIP

SECTIONS = {"method": {"warmup_rounds": 0, "head": "local"}}  # private track from round 1, local head


class Tap:
    """Every outgoing message (as the mod saw it) and every private tensor any node held, after each call."""

    def __init__(self):
        self.rows: list[dict] = []
        self.private: dict[str, str] = {}

    def __call__(self, context, msg, reply):
        row = describe_message(reply, "out")
        row["partition"] = flower_mods.partition_of(context)
        self.rows.append(row)
        got = state_from_context(context)
        if got is not None:
            self.private.update(private_fingerprints(got[0]))


@pytest.fixture
def tap():
    t = Tap()
    flower_mods.TAPS.append(t)
    yield t
    flower_mods.TAPS.remove(t)


@pytest.fixture(scope="module")
def run(tiny_prep, tmp_path_factory):
    t = Tap()
    flower_mods.TAPS.append(t)
    tmp = tmp_path_factory.mktemp("wire")
    try:
        server, grid, out = flower_run(tmp, "fedslip", tiny_prep, SECTIONS, run_id=21)
    finally:
        flower_mods.TAPS.remove(t)
    return {"server": server, "grid": grid, "tap": t, "out": out, "nodes": [tmp / f"node{k}" for k in range(4)]}


def test_no_private_tensor_leaves_a_client_by_name_or_value(run):
    server, tap = run["server"], run["tap"]
    forbidden = forbidden_names(server.method, server.model)
    allowed = set(server.method.shared_names(server.model))
    assert audit(tap.rows, tap.private, forbidden, allowed) == []
    # what was checked: every message kind, every upload, against the private track, masks, local head and
    # optimizer state as they changed
    assert {r["kind"] for r in tap.rows} == {"query", "train", "evaluate"}
    train_ups = [r for r in tap.rows if r["kind"] == "train"]
    assert len(train_ups) == 4 * 2 and all(set(r["arrays"]) == allowed for r in train_ups)
    labels = set(tap.private.values())
    assert any(".p_A" in x for x in labels) and any("_mask" in x for x in labels)
    assert any("classifier" in x for x in labels) and any(x.startswith("optim/") for x in labels)
    # the same audit from the nodes' own logs only (what the deployment test reads)
    leaks, n_out, n_private = audit_state_dirs(run["nodes"], forbidden, allowed)
    assert leaks == [] and n_out == len(tap.rows) and n_private >= len(tap.private) > 0


def test_mod_sizes_are_the_server_sizes_and_the_ledger_bytes(run):
    from fedslip.federation.flower.audit import read_jsonl

    server = run["server"]
    node_rows = {}
    for folder in run["nodes"]:
        for r in read_jsonl(folder / "wire.jsonl"):
            node_rows[(r["kind"], r["round"], r["partition"], r["direction"])] = r
    checked = 0
    for r in server.wire:
        if r["kind"] == "query":
            continue
        mine = node_rows[(r["kind"], r["round"], r["partition"], {"down": "in", "up": "out"}[r["direction"]])]
        assert (mine["payload_bytes"], mine["flower_bytes"]) == (r["payload_bytes"], r["flower_bytes"])
        checked += 1
    # train messages both ways, 4 clients, 2 rounds; round 1's evaluation rides on round 2's downloads, so
    # only the final evaluation is a message of its own
    assert checked == 2 * (4 * 2 + 4)
    train = [(r["round"], r["partition"], r["direction"], r["payload_bytes"])
             for r in server.wire if r["kind"] == "train"]
    ledger = [(e.round, e.client, e.direction, e.bytes) for e in server.ledger.rows()]
    assert sorted(train) == sorted(ledger)
    assert all(r["flower_bytes"] > 0 for r in server.wire)


def _one_round_with_leak(tiny_prep, tmp_path, leak):
    sections = {"method": {"warmup_rounds": 0, "r_g": 4, "alpha_g": 8.0, "r_p": 4, "alpha_p": 8.0}}
    rc = run_config("fedslip", **sections)
    cfg = config_from_run(rc)
    runtime_for(cfg, dataclasses.replace(tiny_prep, cfg=cfg))
    grid = LocalGrid(client_app, [{"partition-id": k, "num-partitions": 4} for k in range(4)], rc, run_id=22)
    server = FlowerServer(grid, cfg, rc)
    real = FedSLIP.local_update

    def leaky(self, model, down, client, data, rnd):
        up, client, metrics = real(self, model, down, client, data, rnd)
        name = next(n for n in model.private_names if n.endswith("p_A"))
        leak(up, name, client.tensors[name].clone())
        return up, client, metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FedSLIP, "local_update", leaky)
        server.run_round(1)
    return server


def test_audit_catches_a_private_tensor_sent_under_its_own_name(tiny_prep, tmp_path, tap):
    def leak(up, name, value):
        up[name] = value

    server = _one_round_with_leak(tiny_prep, tmp_path, leak)
    leaks = audit(tap.rows, tap.private, forbidden_names(server.method, server.model),
                  set(server.method.shared_names(server.model)))
    assert len([x for x in leaks if "sent by name" in x]) == 4
    assert len([x for x in leaks if "carries the value" in x]) == 4


def test_audit_catches_a_private_value_sent_under_a_shared_name(tiny_prep, tmp_path, tap):
    def leak(up, name, value):
        up[name.replace(".p_A", ".g_A")] = value  # same shape (r_g = r_p): only the value gives it away

    server = _one_round_with_leak(tiny_prep, tmp_path, leak)
    leaks = audit(tap.rows, tap.private, forbidden_names(server.method, server.model),
                  set(server.method.shared_names(server.model)))
    assert leaks and all("carries the value of private 'tensors/" in x for x in leaks)
    assert len(leaks) == 4


def test_ledger_wire_bytes_are_the_mods_measurement_of_each_payload(run):
    """Every ledger entry of a Flower run carries Flower's bytes for that payload: the tensors' raw bytes
    plus a bounded per-tensor overhead (NumPy header, record and array metadata), never less; results.json
    and ledger.csv report them."""
    import csv
    import json

    from fedslip.evaluation.ledger import MIB

    server, out = run["server"], run["out"]
    assert server.ledger.rows("eval") and all(e.wire_bytes is not None for e in server.ledger.rows("eval"))
    entries = server.ledger.rows()
    assert entries and all(e.wire_bytes is not None for e in entries)
    for e in entries:
        assert e.n_params * 4 < e.wire_bytes < e.n_params * 4 + 1024 * e.n_tensors, e
    total = sum(e.wire_bytes for e in entries) / MIB
    final = json.loads((out / "results.json").read_text())["methods"]["fedslip"]["final"]
    assert final["wire_mib_total"] == pytest.approx(total)
    assert final["wire_mib_per_round"] == pytest.approx(total / 2)
    with open(out / "ledger.csv", encoding="utf-8") as f:
        assert [int(r["wire_bytes"]) for r in csv.DictReader(f)] == [e.wire_bytes for e in server.ledger.entries]
