"""The Flower app runs the same methods as the in-process engine: same global state, same ledger, same results.

The ServerApp and ClientApp run in one process over `LocalGrid` (every message deflated to Flower's wire
objects and inflated again, one `Context` per node); the real SuperLink/SuperNode deployment is in
test_flower_deploy.py.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

from flower_util import assert_same_state, flower_run, ledger_rows, run_config, snapshot_rounds

from fedslip.errors import UserError
from fedslip.federation.flower import runtime as flower_runtime
from fedslip.federation.flower.runtime import config_from_run
from fedslip.federation.flower.local_grid import over_the_wire
from fedslip.federation.client_state import load_state_file, pack_state, save_state_file, state_digest, unpack_state
from fedslip.federation.flower.records import payload_to_record, record_to_payload
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS
from fedslip.methods.base import ClientState
from fedslip.seeding import torch_gen

from conftest import FakeClock, tiny_config

# fedslip with warmup 0: the private track trains (and its optimizer state persists) from round 1.
SECTIONS = {"fedavg": {}, "fedslip": {"method": {"warmup_rounds": 0}}}


@pytest.fixture(scope="module", params=["fedavg", "fedslip"])
def pair(request, tiny_prep, tmp_path_factory):
    method = request.param
    cfg = tiny_config(method, **SECTIONS[method])
    sim = Simulation(tiny_prep, METHODS[method](cfg))
    sim_history = snapshot_rounds(sim)
    result, ledger = sim.run()
    server, grid, out = flower_run(tmp_path_factory.mktemp(f"flower-{method}"), method, tiny_prep, SECTIONS[method])
    return {"method": method, "sim": sim, "sim_history": sim_history, "result": result, "ledger": ledger,
            "server": server, "grid": grid, "out": out}


def test_global_state_after_round_1_and_last_round_match_inprocess(pair):
    fl, sim = pair["server"].history, pair["sim_history"]
    assert len(fl) == len(sim) == 2
    assert_same_state(fl[0], sim[0])
    assert_same_state(fl[-1], sim[-1])
    # the state did move: round 1 is not the initial state
    init = pair["sim"].method.init_global(pair["sim"].model, torch_gen(0, "global"))
    assert any(not torch.equal(init[k], fl[0][k]) for k in init)


def test_same_byte_ledger_as_inprocess(pair):
    assert ledger_rows(pair["server"].ledger) == ledger_rows(pair["ledger"])
    with open(pair["out"] / "ledger.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["round"], r["client"], r["direction"], r["bytes"]) for r in rows] == \
        [(str(e.round), str(e.client), e.direction, str(e.bytes)) for e in pair["ledger"].entries]


def test_same_results_files_as_inprocess(pair):
    for name in ("results.json", "rounds.csv", "clients.csv", "ledger.csv", "comparison.md", "figure.png",
                 "wire.csv", "flower.json"):
        assert (pair["out"] / name).is_file(), name
    doc = json.loads((pair["out"] / "results.json").read_text())
    final = doc["methods"][pair["method"]]["final"]
    expected = pair["result"].final
    n_test = min(c.n_test for c in pair["result"].clients)
    for key, value in expected.items():
        if value is None:
            assert final[key] is None, key
        elif key.endswith(("acc", "_mean", "_weighted", "_worst")):  # an example may flip on a float tie
            assert abs(final[key] - value) <= 1.0 / n_test + 1e-9, key
        else:
            assert final[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    for a, b in zip(pair["server"].ledger.entries, pair["ledger"].entries, strict=True):  # + Flower's own size
        assert dataclasses.replace(a, wire_bytes=None) == b and b.wire_bytes is None and a.wire_bytes > a.bytes // 2


@pytest.mark.parametrize("pair", ["fedslip"], indirect=True)  # fedavg keeps no private state
def test_restarted_node_resumes_private_state_from_disk(pair, tiny_prep, tmp_path):
    """Partition 2's process is replaced before round 2 (new node id, empty Context.state): it reads its
    state folder and the run ends exactly where the uninterrupted in-process run ends."""
    server, grid, out = flower_run(tmp_path, "fedslip", tiny_prep, SECTIONS["fedslip"],
                                   before_round={2: lambda g: g.restart(2)}, run_id=12)
    assert len(grid.contexts) == 5  # the restarted node is a new node
    events = [json.loads(line) for line in (tmp_path / "node2" / "events.jsonl").read_text().splitlines()]
    saves = [e for e in events if e["event"] == "save"]
    resumes = [e for e in events if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["round"] == 1 and resumes[0]["digest"] == saves[0]["digest"]
    assert_same_state(server.history[-1], pair["sim_history"][-1])
    fl_clients = json.loads((out / "results.json").read_text())["methods"]["fedslip"]["clients"]
    for c, ref in zip(fl_clients, pair["result"].clients, strict=True):
        assert abs(c["personal_acc"] - ref.personal_acc) <= 1.0 / ref.n_test + 1e-9
        # the right answers crossed the Flower messages too, one per test example, as many as the accuracy says
        right = c["personal_right"]
        assert len(right) == c["n_test"] and right.count("1") == round(c["personal_acc"] * c["n_test"])
    # the private track on disk is the in-process engine's private track of that client
    state, meta = load_state_file(tmp_path / "node2" / "run-12-partition-2.safetensors")
    assert meta["round"] == 2
    for name, t in pair["sim"].clients[2].tensors.items():
        assert torch.allclose(state.tensors[name], t, rtol=1e-5, atol=1e-7), name


def test_payload_travels_as_exactly_its_tensors():
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedslip.federation.flower.local_grid import ensure_task_identity

    ensure_task_identity()
    g = torch.Generator().manual_seed(3)
    payload = {"b.weight": torch.randn(3, 5, generator=g), "a.scalar": torch.tensor(2.5),
               "c.bias": torch.randn(7, generator=g).double(), "d.int": torch.arange(4)}
    msg = Message(RecordDict({"arrays": payload_to_record(payload), "config": ConfigRecord({"server-round": 1})}),
                  5, MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "x"
    got = record_to_payload(over_the_wire(msg).content["arrays"])
    assert list(got) == list(payload)  # same names, same order
    for name, t in payload.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_client_state_round_trips_through_records_and_disk(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = ClientState(tensors={"x.p_A": torch.randn(2, 4), "x.p_A_mask": torch.ones(2, 4)},
                        optim={"private": opt.state_dict()})
    tensors, skeleton = pack_state(state)
    back = unpack_state(tensors, skeleton)
    assert state_digest(back) == state_digest(state)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back.optim["private"])  # loads as an optimizer state
    save_state_file(tmp_path / "s.safetensors", state, {"round": 3})
    loaded, meta = load_state_file(tmp_path / "s.safetensors")
    assert meta == {"round": 3} and state_digest(loaded) == state_digest(state)
    state.tensors["x.p_A"] += 1  # a different state has a different digest
    assert state_digest(state) != state_digest(loaded)


def test_run_config_builds_the_fedslip_config():
    cfg = config_from_run(run_config("fedavg", train={"rounds": 3, "lr": 0.01}))
    assert cfg.method.name == "fedavg" and cfg.train.rounds == 3 and cfg.train.lr == 0.01
    assert cfg.model.backbone == "tiny-random:bert"
    from fedslip.config import PRESETS

    quick = config_from_run({"preset": "quick", "method": "fedslip", "overrides": ""})
    assert quick.train.rounds == PRESETS["quick"]["train"]["rounds"] and quick.model.max_length == 64
    with pytest.raises(UserError, match="unknown key train.nope"):
        config_from_run({"preset": "", "method": "fedslip", "overrides": "train.nope=1"})
    with pytest.raises(UserError, match="unknown method 'no-such-method'"):
        config_from_run({"preset": "", "method": "no-such-method", "overrides": ""})
    assert flower_runtime.split_overrides("a.b=1; c.d='x'\ne.f=2") == ["a.b=1", "c.d='x'", "e.f=2"]


def test_client_side_runs_with_the_methods_own_settings(tiny_prep):
    """`by_method` settings reach a Flower node as they reach the in-process clients: the node batches its
    data at the method's batch size and asks K-step as the method says."""
    from fedslip.federation.flower.runtime import runtime_for

    cfg = tiny_config("fedavg", by_method={"fedavg": {"train": {"batch_size": 3}, "method": {"kstep": False}}})
    rt = runtime_for(cfg, dataclasses.replace(tiny_prep, cfg=cfg))
    assert cfg.train.batch_size != 3 and cfg.method.kstep
    assert rt.side.cfg.train.batch_size == 3 and not rt.side.cfg.method.kstep
    assert rt.side.data(0, 1).batch_size == 3
    assert rt.side.cfg == Simulation(tiny_prep, METHODS["fedavg"](cfg)).side.cfg


def test_nodes_that_cannot_take_part_are_named_once_and_superseded_ones_not_asked_again(tiny_prep, monkeypatch):
    """A SuperNode started without its partition-id answers the server's query with an error: the server
    says which node and why (in the line it stops with), and does not ask it every second; a restarted node
    takes its partition, and the node it replaced is not asked again."""
    from flower_util import run_config

    from fedslip.federation.flower import server as server_module
    from fedslip.federation.flower.app import client_app
    from fedslip.federation.flower.local_grid import LocalGrid
    from fedslip.federation.flower.runtime import runtime_for
    from fedslip.federation.flower.server import FlowerTransport

    rc = run_config("fedavg")
    runtime_for(config_from_run(rc), dataclasses.replace(tiny_prep, cfg=config_from_run(rc)))
    nodes = [{"partition-id": k, "num-partitions": 4} for k in range(3)] + [{"num-partitions": 4}]
    grid = LocalGrid(client_app, nodes, rc)
    asked = []
    real = grid.send_and_receive
    grid.send_and_receive = lambda msgs, timeout=None: (asked.extend(m.metadata.dst_node_id for m in msgs)
                                                        or real(msgs, timeout=timeout))
    monkeypatch.setattr(server_module, "time", FakeClock())  # its 1-s polls in no real time
    transport = FlowerTransport(grid, 4, 4, 1.5)
    with pytest.raises(UserError, match="only 3 of the 4 required clients.*has no partition: start it with"):
        transport.refresh_nodes(4, 1.5)
    bad = next(n for n, c in grid.contexts.items() if "partition-id" not in c.node_config)
    assert asked.count(bad) == 1
    old = grid.node_of(1)
    grid.restart(1)
    grid.offline.discard(old)  # the old process is still listed (its heartbeat has not expired yet)
    asked.clear()
    transport.refresh_nodes(3, 1.5)
    assert transport.partition_node[1] != old and old in transport.superseded
    asked.clear()
    transport.refresh_nodes(3, 1.5)
    assert old not in asked and transport.partition_node[1] != old


def test_a_node_whose_backbone_is_not_the_servers_takes_no_part(tiny_prep, monkeypatch):
    """Every node loads the model by its own path (a multi-machine deployment): one that holds other weights
    or another config would train adapters for another model. The server names it and leaves it out."""
    from fedslip.federation.flower import server as server_module
    from fedslip.federation.flower.app import client_app
    from fedslip.federation.flower.client import INFO
    from fedslip.federation.flower.local_grid import LocalGrid
    from fedslip.federation.flower.runtime import runtime_for
    from fedslip.federation.flower.server import FlowerTransport

    rc = run_config("fedavg")
    rt = runtime_for(config_from_run(rc), dataclasses.replace(tiny_prep, cfg=config_from_run(rc)))

    def alter(partition, msg, reply):
        if partition == 2 and msg.metadata.message_type == "query":
            reply.content[INFO]["backbone-digest"] = "0" * 32
        return reply

    grid = LocalGrid(client_app, [{"partition-id": k, "num-partitions": 4} for k in range(4)], rc, alter=alter)
    monkeypatch.setattr(server_module, "time", FakeClock())
    transport = FlowerTransport(grid, 4, 4, 1.5)
    transport.backbone_digest = rt.prep.backbone.digest
    with pytest.raises(UserError, match=r"only 3 of the 4 required clients.*partitions \[0, 1, 3\]\); node \d+: "
                                        r"partition 2: its backbone is not the server's \(other weights or config\)"):
        transport.refresh_nodes(4, 1.5)
    transport.refresh_nodes(3, 1.5)  # the others take part
    assert sorted(transport.partition_node) == [0, 1, 3]
    fine = FlowerTransport(grid, 4, 4, 1.5)
    fine.backbone_digest = "0" * 32  # a server holding that model: partition 2 is the one that fits
    fine.refresh_nodes(1, 1.5)
    assert list(fine.partition_node) == [2]


def test_a_refused_node_is_asked_again_after_a_while(tiny_prep, monkeypatch):
    """Its operator may fix it (load the right model, restart it with its partition) without a new node id;
    it is not asked every second meanwhile."""
    from fedslip.federation.flower import server as server_module
    from fedslip.federation.flower.app import client_app
    from fedslip.federation.flower.client import INFO
    from fedslip.federation.flower.local_grid import LocalGrid
    from fedslip.federation.flower.runtime import runtime_for
    from fedslip.federation.flower.server import FlowerTransport

    rc = run_config("fedavg")
    rt = runtime_for(config_from_run(rc), dataclasses.replace(tiny_prep, cfg=config_from_run(rc)))
    fixed = []

    def alter(partition, msg, reply):
        if partition == 1 and msg.metadata.message_type == "query" and not fixed:
            reply.content[INFO]["backbone-digest"] = "0" * 32
        return reply

    grid = LocalGrid(client_app, [{"partition-id": k, "num-partitions": 4} for k in range(4)], rc, alter=alter)
    asked = []
    real = grid.send_and_receive
    grid.send_and_receive = lambda msgs, timeout=None: (asked.extend(m.metadata.dst_node_id for m in msgs)
                                                        or real(msgs, timeout=timeout))
    monkeypatch.setattr(server_module, "REASK", 2.0)
    monkeypatch.setattr(server_module, "time", FakeClock())  # polls at 0, 1, 2, ... s, in no real time
    transport = FlowerTransport(grid, 4, 4, 1.5)
    transport.backbone_digest = rt.prep.backbone.digest
    with pytest.raises(UserError, match="only 3 of the 4"):
        transport.refresh_nodes(4, 0.5)  # stops before REASK has passed: asked once
    node = grid.node_of(1)
    assert asked.count(node) == 1
    fixed.append(True)
    transport.refresh_nodes(4, 5.0)  # asked again once REASK has passed, and now it fits
    assert transport.partition_node[1] == node and node not in transport.refused and asked.count(node) == 2


def test_overrides_split_only_outside_toml_strings(tmp_path):
    """A label name or a path may hold ';': the run config's overrides are cut at ';' and newlines only
    outside strings, and every value arrives as the fedslip command line gave it."""
    from fedslip.federation.flower.deploy import run_config_for

    sets = ['data.label_names=["a;b", "c\\";d", "e"]', "train.rounds=3", "data.train_file='x;y.csv'"]
    rc = run_config_for("", "fedavg", None, sets, tmp_path / "out", 0)
    cfg = config_from_run(rc)
    assert cfg.data.label_names == ["a;b", 'c";d', "e"] and cfg.train.rounds == 3
    assert cfg.data.train_file == "x;y.csv"
