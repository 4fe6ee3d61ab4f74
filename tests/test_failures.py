"""Client failures: a failed client sends nothing and keeps its state; the server aggregates exactly the
survivors, and methods with server bookkeeping (FLoRA, Fed-SB, FLoRAL) stay consistent."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fedslip.federation.client_state import state_digest
from fedslip.federation.inprocess import Failures, Simulation
from fedslip.federation.protocol import select_clients
from fedslip.methods import METHODS

from conftest import UNEVEN, tiny_config

# client 1 fails in round 2, clients 0 and 2 in round 3: one client in four per round at most
SCHEDULE = [[2, 1], [3, 0], [3, 2]]


def failing(rnd: int) -> set[int]:
    return {c for r, c in SCHEDULE if r == rnd}


def run_with_spies(prep, name: str, **sections):
    sections["train"] = {"rounds": 3, "failures": SCHEDULE, **sections.get("train", {})}
    sim = Simulation(prep, METHODS[name](tiny_config(name, **sections)))
    seen, digests = [], []
    real = sim.method.aggregate

    def spy(ups, glob, rnd, participants):
        seen.append((rnd, list(participants), [({k: v.clone() for k, v in p.items()}, n) for p, n in ups]))
        return real(ups, glob, rnd, participants)

    sim.method.aggregate = spy
    for rnd in range(1, sim.method.rounds() + 1):
        digests.append([state_digest(c) for c in sim.clients])
        sim.run_round(rnd)
    digests.append([state_digest(c) for c in sim.clients])
    sim.finish()
    return sim, seen, digests


@pytest.mark.parametrize("name", ["fedslip", "flora", "fedsb", "floral"])
def test_only_survivors_are_aggregated_and_failed_clients_keep_their_state(tiny_prep, name):
    sim, seen, digests = run_with_spies(tiny_prep, name)
    assert [rnd for rnd, _, _ in seen] == list(range(1, sim.method.rounds() + 1))
    for rnd, participants, _ in seen:
        expected = [c for c in select_clients(4, 1.0, 0, rnd) if c not in failing(rnd)]
        assert participants == expected, (name, rnd)
    for rnd in range(1, sim.method.rounds() + 1):
        for cid in failing(rnd):
            assert digests[rnd][cid] == digests[rnd - 1][cid], (name, rnd, cid)  # untouched by the round
    failed_rows = [(e.round, e.client) for e in sim.ledger.entries if e.status == "failed"]
    assert sorted(failed_rows) == sorted((r, c) for r, c in SCHEDULE)


def test_fedslip_aggregate_is_the_survivors_weighted_mean(uneven_prep):
    sim, seen, _ = run_with_spies(uneven_prep, "fedslip", partition=UNEVEN)
    rnd, participants, ups = seen[2]
    assert participants == [1, 3]
    assert [n for _, n in ups] == [len(uneven_prep.split.train[c]) for c in participants]
    glob, total, apart = sim.glob, sum(n for _, n in ups), 0.0
    for name in ups[0][0]:
        want = sum(p[name].double() * n / total for p, n in ups)
        torch.testing.assert_close(glob[name].double(), want, rtol=0, atol=1e-6)
        plain = sum(p[name].double() for p, _ in ups) / len(ups)
        apart = max(apart, float((want - plain).abs().max()))
    assert apart > 1e-4  # the plain mean of the two would fail the check above


def test_flora_clients_rebuild_the_server_model_after_missing_rounds(tiny_prep):
    """A client that failed never merged that round's stack: it must be sent it again (replaying the
    sampling would assume it merged, and its model would silently drift from the global one)."""
    sim, _, _ = run_with_spies(tiny_prep, "flora")
    method, model, glob = sim.method, sim.model, sim.glob
    deltas = [n for n in glob if n.endswith(".delta")]
    for k, client in enumerate(sim.clients):
        view = method.global_view(model, method.down_payload(glob, k), client)
        for n in deltas:
            torch.testing.assert_close(view[n], glob[n], rtol=1e-5, atol=1e-6, msg=f"client {k}: {n}")


def test_fedsb_basis_reaches_a_client_that_failed_its_first_training_round(tiny_prep):
    # fedsb's round 1 is the setup round; client 1 fails round 2, its first training round
    sim, seen, _ = run_with_spies(tiny_prep, "fedsb", train={"rounds": 2})
    assert [p for _, p, _ in seen] == [[0, 1, 2, 3], [0, 2, 3], [1, 3]]
    assert any(k.endswith(".sb_A") for k in sim.clients[1].tensors)


def test_a_round_where_nothing_arrives_keeps_the_global_state(tiny_prep):
    cfg = tiny_config("fedavg", train={"failures": [[2, c] for c in range(4)]})
    sim = Simulation(tiny_prep, METHODS["fedavg"](cfg))
    sim.run_round(1)
    before = {k: v.clone() for k, v in sim.glob.items()}
    record = sim.run_round(2)
    assert record.failed == [0, 1, 2, 3] and record.participants == []
    assert all(torch.equal(before[k], sim.glob[k]) for k in before)


def test_failure_rate_is_seeded_per_client_and_round(tiny_prep):
    cfg = tiny_config("fedavg", train={"failure_rate": 0.25, "rounds": 40})
    fails = Failures(cfg.train)
    drawn = [(r, c) for r in range(1, 41) for c in range(4) if fails(c, r)]
    assert 0.15 < len(drawn) / 160 < 0.35
    assert drawn == [(r, c) for r in range(1, 41) for c in range(4) if Failures(cfg.train)(c, r)]
    other = Failures(tiny_config("fedavg", train={"failure_rate": 0.25, "seed": 1}).train)
    assert drawn != [(r, c) for r in range(1, 41) for c in range(4) if other(c, r)]


def test_outputs_say_who_failed(tiny_prep, tmp_path):
    from fedslip.evaluation.outputs import write_outputs

    cfg = tiny_config("fedslip", train={"rounds": 3, "failures": SCHEDULE})
    sim = Simulation(tiny_prep, METHODS["fedslip"](cfg))
    result, ledger = sim.run()
    write_outputs(tmp_path, tiny_prep, [(result, ledger)])
    with open(tmp_path / "rounds.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["failed"] for r in rows] == ["", "1", "0 2"]
    with open(tmp_path / "ledger.csv", encoding="utf-8") as f:
        failed = [(r["round"], r["client"]) for r in csv.DictReader(f) if r["status"] == "failed"]
    assert failed == [("2", "1"), ("3", "0"), ("3", "2")]
    assert result.final["failed_uploads"] == 3
    assert (tmp_path / "figure.png").stat().st_size > 0
    # every client is still evaluated after the last round
    assert all(c.personal_acc is not None for c in result.clients)


def test_rounds_csv_means_leave_out_unevaluated_clients_as_results_json_does(tiny_prep, tmp_path):
    """Half the clients per round: a client not yet selected has no persistent model (NaN); the round's mean
    in rounds.csv is over the clients that have one, not NaN."""
    import math

    from fedslip.evaluation.outputs import write_outputs

    cfg = tiny_config("fedslip", train={"rounds": 2, "client_fraction": 0.5}, method={"warmup_rounds": 0})
    result, ledger = Simulation(tiny_prep, METHODS["fedslip"](cfg)).run()
    write_outputs(tmp_path, tiny_prep, [(result, ledger)])
    with open(tmp_path / "rounds.csv", encoding="utf-8") as f:
        first = next(csv.DictReader(f))
    values = result.rounds[0].persistent_acc
    present = [v for v in values if not math.isnan(v)]
    assert 0 < len(present) < len(values)
    assert float(first["persistent_acc_mean"]) == pytest.approx(sum(present) / len(present))


@pytest.mark.parametrize("name,late", [("fedslip", False), ("flora", False), ("fedsb", False), ("floral", False),
                                       ("fedslip", True), ("flora", True)])
def test_flower_nodes_that_do_not_answer_give_the_same_run(tiny_prep, tmp_path, name, late):
    """The same failures as nodes that never answer their train message, or answer after the server's
    timeout (they trained, but the server counted them as failed: they go back to their state before the
    round): same states, ledger, accuracies."""
    pytest.importorskip("flwr", reason="the Flower runtime needs the `flower` extra: pip install -e '.[flower]'")
    from flower_util import assert_same_state, flower_run, snapshot_rounds

    sections = {"train": {"rounds": 3}, "method": {"kstep": False}}
    cfg = tiny_config(name, train={"rounds": 3, "failures": SCHEDULE}, method={"kstep": False})
    sim = Simulation(tiny_prep, METHODS[name](cfg))
    history = snapshot_rounds(sim)
    result, ledger = sim.run()
    fails = {"late" if late else "drops": lambda pid, rnd: pid in failing(rnd)}
    server, grid, out = flower_run(tmp_path, name, tiny_prep, sections, **fails)
    assert len(server.history) == len(history)
    for a, b in zip(server.history, history):
        assert_same_state(a, b)
    ours = [(e.round, e.client, e.direction, e.kind, e.status, e.bytes) for e in ledger.entries]
    theirs = [(e.round, e.client, e.direction, e.kind, e.status, e.bytes) for e in server.ledger.entries]
    assert theirs == ours
    json_clients = json.loads((out / "results.json").read_text())["methods"][name]["clients"]
    with open(out / "rounds.csv", encoding="utf-8") as f:
        failed = [r["failed"] for r in csv.DictReader(f)]
    assert failed == [" ".join(map(str, sorted(failing(r)))) for r in range(1, sim.method.rounds() + 1)]
    assert len(json_clients) == len(result.clients) == 4
    for c, theirs in zip(result.clients, json_clients):  # the states agree to float tolerance: one example may flip
        assert abs(c.personal_acc - theirs["personal_acc"]) <= 1 / c.n_test + 1e-9
    if late:  # every node's private state as of its last round the server took equals the in-process client's
        from fedslip.federation.client_state import state_digest
        from fedslip.federation.flower.client import load_client_state

        for pid in range(4):
            node = grid.node_of(pid)
            kept = load_client_state(None, grid.contexts[node], pid,
                                     server.transport.run_key, server.transport.state_rounds[pid])
            assert state_digest(kept) == state_digest(sim.clients[pid]), pid


def test_a_mean_over_fewer_clients_says_so(tiny_prep, capsys):
    """Half the clients per round for one round: two clients have no persistent model; its mean covers the
    other two, and the run says so (a warning, and `persistent_acc_clients` in the final metrics)."""
    cfg = tiny_config("fedslip", train={"rounds": 1, "client_fraction": 0.5}, method={"warmup_rounds": 0})
    result, _ = Simulation(tiny_prep, METHODS["fedslip"](cfg)).run()
    assert result.final["persistent_acc_clients"] == 2 and "personal_acc_clients" not in result.final
    assert "persistent acc is over 2 of 4 clients" in capsys.readouterr().err


def test_a_late_reply_in_a_clients_first_round_leaves_it_fresh(tiny_prep, tmp_path):
    """The server took no round of this client yet (state-round 0): the node goes on from a fresh state, as
    a client that failed its first round does in-process, not from the round it trained too late."""
    pytest.importorskip("flwr", reason="the Flower runtime needs the `flower` extra: pip install -e '.[flower]'")
    from flower_util import flower_run

    from fedslip.federation.client_state import state_digest
    from fedslip.federation.flower.client import load_client_state

    cfg = tiny_config("fedslip", train={"rounds": 2, "failures": [[1, 2], [2, 2]]}, method={"kstep": False})
    sim = Simulation(tiny_prep, METHODS["fedslip"](cfg))
    sim.run()
    server, grid, _ = flower_run(tmp_path, "fedslip", tiny_prep, {"train": {"rounds": 2}, "method": {"kstep": False}},
                                 late=lambda pid, rnd: pid == 2)
    assert server.transport.state_rounds.get(2, 0) == 0
    node = grid.node_of(2)
    kept = load_client_state(server_side_for(grid, node), grid.contexts[node], 2, server.transport.run_key, 0)
    assert state_digest(kept) == state_digest(sim.clients[2])


def server_side_for(grid, node):
    from fedslip.federation.flower.app import node_runtime

    return node_runtime(grid.contexts[node]).side
