"""A real deployment on loopback: flower-superlink + 4 flower-supernode processes, `flwr run`, tiny config.

1. TLS + SuperNode authentication: the run matches the in-process engine (same ledger, same private state
   on every node's disk, accuracies within one test example), no private tensor is in any outgoing message,
   and every process started is gone afterwards.
2. `--insecure`, min-available 3, 3 rounds: SuperNode 3 is killed (SIGKILL) once round 2 is under way; round
   2 finishes with 3 clients (node 3's message fails when the SuperLink has missed its heartbeats, about a
   minute); the node, restarted at once and so connected long before round 3, trains in round 3 from the
   private state on its disk.

Minutes, not seconds (every ClientApp call is a fresh process): marked slow.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time

import pytest
import torch

from flower_util import run_config

from fedslip.federation.flower.deploy import collect_node_logs
from fedslip.federation.flower.loopback import Loopback, alive
from fedslip.federation.flower.runtime import config_from_run
from fedslip.federation.flower.audit import audit_state_dirs, forbidden_names, read_jsonl
from fedslip.federation.client_state import load_state_file
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS

pytestmark = pytest.mark.slow
TIMEOUT = 1500.0


def _events(folder, event=None):
    return [e for e in read_jsonl(folder / "events.jsonl") if event is None or e["event"] == event]


def test_tls_deployment_matches_inprocess_and_leaks_nothing(tiny_prep, tmp_path):
    sections = {"train": {"eval_every": 2}, "method": {"warmup_rounds": 0}}  # evaluate once, at the end
    out = tmp_path / "out"
    rc = run_config("fedslip", out=out, **sections)
    with Loopback(tmp_path / "lb", 4) as lb:  # TLS + SuperNode authentication
        assert lb.tls and lb.node_auth and (lb.workdir / "keys" / "node0.pub").is_file()
        run_id = lb.submit(rc)
        info = lb.wait(run_id, TIMEOUT)
        log = lb.logs(run_id)
        collect_node_logs(lb, out)
        started = lb.all_pids()
    assert info["status"] == "finished:completed", log
    assert not alive(lb.stopped_pids) and not alive(started)
    commands = (lb.workdir / "commands.sh").read_text().splitlines()  # the steps, to repeat across machines
    assert [c.split()[0] for c in commands] == ["flower-superlink"] + ["flwr", "flower-supernode"] * 4 + ["flwr"]
    assert "--ssl-certfile" in commands[0] and "--enable-supernode-auth" in commands[0]
    assert all(c.startswith("flwr supernode register") for c in commands[1:-1:2])
    assert commands[-1].startswith("flwr run")

    cfg = config_from_run(rc)
    sim = Simulation(dataclasses.replace(tiny_prep, cfg=cfg), METHODS["fedslip"](cfg))
    result, ledger = sim.run()
    with open(out / "ledger.csv", encoding="utf-8") as f:
        rows = [(int(r["round"]), int(r["client"]), r["direction"], int(r["bytes"]), int(r["n_params"]))
                for r in csv.DictReader(f)]
    assert rows == [(e.round, e.client, e.direction, e.bytes, e.n_params) for e in ledger.entries]
    doc = json.loads((out / "results.json").read_text())["methods"]["fedslip"]
    for c, ref in zip(doc["clients"], result.clients, strict=True):
        assert abs(c["personal_acc"] - ref.personal_acc) <= 1.0 / ref.n_test + 1e-9
        assert abs(c["client_acc"] - ref.client_acc) <= 1.0 / ref.n_test + 1e-9
    assert doc["final"]["train_loss"] == pytest.approx(result.final["train_loss"], rel=1e-5)
    for k in range(4):  # each node's private state on its own disk = the in-process engine's client k
        state, meta = load_state_file(lb.state_dir(k) / f"run-{run_id}-partition-{k}.safetensors")
        assert meta["round"] == 2
        for name, t in sim.clients[k].tensors.items():
            assert torch.allclose(state.tensors[name], t, rtol=1e-5, atol=1e-6), (k, name)

    leaks, n_out, n_private = audit_state_dirs([lb.state_dir(k) for k in range(4)],
                                               forbidden_names(sim.method, sim.model),
                                               set(sim.method.shared_names(sim.model)))
    assert leaks == [] and n_out == 4 * (1 + 2 + 1) and n_private > 0  # query, 2 trains, 1 evaluate per node


def test_insecure_kill_one_node_then_restart_resumes_from_disk(tmp_path):
    sections = {"train": {"rounds": 3, "eval_every": 3}, "method": {"warmup_rounds": 0}}
    out = tmp_path / "out"
    rc = {**run_config("fedslip", out=out, **sections), "min-available": 3, "round-timeout": 900.0}
    with Loopback(tmp_path / "lb", 4, insecure=True) as lb:
        assert not lb.tls and not lb.node_auth
        run_id = lb.submit(rc)
        node3, others = lb.state_dir(3), [lb.state_dir(k) for k in range(3)]

        seen: set[int] = set()

        def wait_for(condition, what):  # the ServerApp process's end is the run's end; no `flwr list` per poll
            deadline = time.monotonic() + TIMEOUT
            while not condition():
                running = lb.serverapps()
                assert not seen - running, f"the run ended before {what}"
                seen.update(running)
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.5)

        # round 2 reaching any node means the server has all of round 1, node 3's upload included (killed
        # mid-upload, the SuperLink would hold round 1 for minutes waiting on the objects of its reply); kill
        # at the first sign, long before node 3 could finish round 2
        wait_for(lambda: any(r["kind"] == "train" and r["round"] == 2 for d in [*others, node3]
                             for r in read_jsonl(d / "wire.jsonl")), "round 2 to reach a node")
        saved = _events(node3, "save")[-1]
        assert saved["round"] == 1
        killed = lb.kill_node(3)
        assert not alive(killed)
        lb.start_node(3)  # a new node id: the server maps it to partition 3 when it next looks (round 3)
        info = lb.wait(run_id, TIMEOUT)
        log = lb.logs(run_id)
        collect_node_logs(lb, out)
    assert info["status"] == "finished:completed", log
    assert not alive(lb.stopped_pids)

    # the restarted node read its round-1 state from disk and trained again in round 3
    resumes = _events(node3, "resume")
    assert len(resumes) == 1 and resumes[0]["round"] == 1 and resumes[0]["digest"] == saved["digest"]
    rounds3 = [e["round"] for e in _events(node3, "save")]
    assert rounds3 == [1, 3]
    with open(out / "ledger.csv", encoding="utf-8") as f:
        ups = [(int(r["round"]), int(r["client"])) for r in csv.DictReader(f)
               if r["direction"] == "up" and r["status"] == "ok"]
    assert sorted(c for r, c in ups if r == 1) == [0, 1, 2, 3]  # node 3 was killed after its round-1 upload
    assert sorted(c for r, c in ups if r == 2) == [0, 1, 2]  # the run went on without it
    assert sorted(c for r, c in ups if r == 3) == [0, 1, 2, 3]
    with open(out / "ledger.csv", encoding="utf-8") as f:
        sent_round2 = [int(r["client"]) for r in csv.DictReader(f)
                       if r["round"] == "2" and r["direction"] == "down" and r["kind"] == "train"]
    failures = json.loads((out / "flower.json").read_text())["failures"]
    # either the server still saw node 3 (until its heartbeat expired) and its message failed, or it was gone
    assert 3 not in sent_round2 or any(f["round"] == 2 and f["partition"] == 3 and f["kind"] == "train"
                                       for f in failures)
    clients = json.loads((out / "results.json").read_text())["methods"]["fedslip"]["clients"]
    assert all(c["personal_acc"] is not None for c in clients)
