"""Held-out clients (`partition.holdout_clients`): never in a round, they join once after the last round.

Their join numbers are checked against an independent computation: a fresh model and method, the final
global state, the join's own seeds (`join-batches`, `join-dropout` per client).
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from fedslip.cli import main
from fedslip.evaluation.metrics import group_accuracy
from fedslip.evaluation.tables import comparison_rows, to_markdown
from fedslip.federation.inprocess import Simulation
from fedslip.federation.protocol import RoundProtocol
from fedslip.methods import METHODS
from fedslip.methods.base import ClientData
from fedslip.seeding import derive, numpy_gen, torch_gen

from conftest import tiny_config
from test_cli import bad, sets

HELD = 3  # tiny configs have 4 clients; holdout_clients = 1 keeps out the last one


def held_out_run(prep, name: str, **sections):
    """A run with the last client held out; the views its join produced, by client, kept for inspection, and
    (under "model/<name>") the model's global track and head as the join's training left them."""
    cfg = tiny_config(name, partition={"holdout_clients": 1}, **sections)
    sim = Simulation(prep, METHODS[name](cfg))
    views = {}
    join = sim.method.join_view

    def spy(model, down, client, data):
        view = join(model, down, client, data)
        if view is not None:
            views[data.cid] = {n: t.clone() for n, t in view.items()}
            left = model.read(model.global_names + model.head_names)
            views[data.cid].update({f"model/{n}": t for n, t in left.items()})
        return view

    sim.method.join_view = spy
    result, ledger = sim.run()
    return sim, result, ledger, views


def independent_join(prep, cfg, glob, cid: int = HELD):
    """What a newcomer's join must give, from scratch: (method, model, its fresh state, joined view)."""
    method = METHODS[cfg.method.name](cfg)
    model = method.build(prep.backbone)
    state = method.init_client(model, cid, torch_gen(cfg.train.seed, "client", cid))
    data = ClientData(cid, prep.train, prep.split.train[cid], cfg.train.batch_size,
                      numpy_gen(cfg.train.seed, "join-batches", cid), cfg.train.length_pool)
    with torch.random.fork_rng():  # the join's dropout draws, as the run seeded them; the generator as it was, after
        torch.manual_seed(derive(cfg.train.seed, "join-dropout", cid))
        return method, model, state, method.join_view(model, glob, state, data)


def accuracy(prep, model, view, mode: str, cid: int = HELD) -> float:
    return group_accuracy(model, view, mode, prep.test, [prep.split.test[cid]], prep.cfg.train.eval_batch_size)[0]


def assert_never_trained(result, ledger) -> None:
    for r in result.rounds:
        assert HELD not in r.participants and HELD not in r.failed + r.rejected
        for key in ("client_acc", "personal_acc", "persistent_acc"):
            assert getattr(r, key) is None or len(getattr(r, key)) == HELD
    assert all(e.client != HELD for e in ledger.rows("train"))
    joins = [e for e in ledger.rows("eval") if e.client == HELD]
    assert [(e.round, e.direction, e.note) for e in joins] == [(len(result.rounds), "down", "join")]
    assert all(e.note == "" for e in ledger.rows("eval") if e.client != HELD)
    trained = [c for c in result.clients if not c.held_out]
    assert [c.client for c in trained] == [0, 1, 2] and [c.client for c in result.clients] == [0, 1, 2, 3]
    held = result.clients[HELD]
    assert held.held_out and held.client_acc is None and held.personal_acc is None and held.kstep_acc is None
    means = [c.client_acc for c in trained if c.client_acc is not None]
    assert result.final["client_acc_mean"] == pytest.approx(sum(means) / len(means))


def test_fedavg_newcomer_is_kstep_from_the_final_global_model(tiny_prep, monkeypatch):
    sim, result, ledger, views = held_out_run(tiny_prep, "fedavg")
    assert_never_trained(result, ledger)
    held = result.clients[HELD]
    assert not math.isnan(held.newcomer_acc) and result.final["newcomer_acc_mean"] == held.newcomer_acc
    assert result.final["newcomer_global_acc_mean"] == held.newcomer_global_acc
    # the training clients' K-step is there as before, the newcomer's is not among them
    assert all(c.kstep_acc is not None for c in result.clients if not c.held_out)

    from fedslip.methods import fedavg as fedavg_module

    steps, real = [], fedavg_module.sgd_step

    def counted(model, batch, names, opt, clip, **kw):  # the values each step starts from
        steps.append(model.read(names))
        return real(model, batch, names, opt, clip, **kw)

    monkeypatch.setattr(fedavg_module, "sgd_step", counted)
    method, model, state, view = independent_join(tiny_prep, sim.method.cfg, sim.glob)
    k = len(tiny_prep.split.train[HELD]) // sim.method.cfg.train.batch_size
    assert len(steps) == k >= 1  # K = n_train // batch size steps, as every client's K-step
    assert all(torch.equal(steps[0][n], sim.glob[n]) for n in steps[0])  # from the final global model
    assert views.keys() == {HELD}
    assert all(torch.equal(view[n], views[HELD][n]) for n in view)
    assert held.newcomer_acc == accuracy(tiny_prep, model, view, "global")
    assert held.newcomer_global_acc == accuracy(tiny_prep, model, method.global_view(model, sim.glob, state), "global")
    assert any(not torch.equal(view[n], sim.glob[n]) for n in model.global_names)  # it did train


@pytest.mark.parametrize("name", ["fedslip", "dualtrack-naive"])
def test_dual_track_newcomer_trains_only_its_private_track(tiny_prep, name):
    sim, result, ledger, views = held_out_run(tiny_prep, name)
    assert_never_trained(result, ledger)
    held = result.clients[HELD]
    assert held.newcomer_acc is not None and held.newcomer_global_acc is not None

    method, model, state, view = independent_join(tiny_prep, sim.method.cfg, sim.glob)
    got = views[HELD]
    assert all(torch.equal(view[n], got[n]) for n in view)
    assert held.newcomer_acc == accuracy(tiny_prep, model, view, "both")
    assert held.newcomer_global_acc == accuracy(tiny_prep, model, method.global_view(model, sim.glob, state), "global")
    # the global track and the shared head are the final global model's, untouched (in the view and in the
    # model the join trained); masks are its init's
    for n in model.global_names + model.head_names:
        assert torch.equal(got[n], sim.glob[n]) and torch.equal(got[f"model/{n}"], sim.glob[n]), n
    assert all(torch.equal(got[n], state.tensors[n]) for n in model.mask_names)
    # its private track trained away from its seeded init, inside its masks
    assert all(not torch.equal(got[n], state.tensors[n]) for n in model.private_names if n.endswith("p_A"))
    assert any(not torch.equal(got[n], state.tensors[n]) for n in model.private_names if n.endswith("p_B"))
    # the client's stored state is its untouched init: joining is a one-off evaluation
    stored = sim.clients[HELD]
    assert stored.tensors.keys() == state.tensors.keys()
    assert all(torch.equal(stored.tensors[n], state.tensors[n]) for n in state.tensors) and not stored.optim


def test_fedslip_newcomer_with_a_private_head_trains_its_own_head(tiny_prep):
    sim, _, _, _ = held_out_run(tiny_prep, "fedslip", train={"rounds": 1})
    cfg = tiny_config("fedslip", partition={"holdout_clients": 1}, method={"private_head": True})
    method, model, state, view = independent_join(tiny_prep, cfg, sim.glob)
    for n in model.global_names:
        assert torch.equal(view[n], sim.glob[n])
    assert all(not torch.equal(view[n], sim.glob[n]) for n in model.head_names)  # its own head, trained
    after = model.read(model.global_names + model.head_names)  # the model's shared tensors: never trained
    assert all(torch.equal(after[n], sim.glob[n]) for n in model.global_names)


def test_methods_without_a_join(tiny_prep):
    # ffa has a global model but no join: only the global model's score
    _, result, ledger, _ = held_out_run(tiny_prep, "ffa")
    assert_never_trained(result, ledger)
    held = result.clients[HELD]
    assert held.newcomer_acc is None and held.newcomer_global_acc is not None
    assert result.final["newcomer_acc_mean"] is None
    # local has neither (and nothing to download)
    _, result, ledger, _ = held_out_run(tiny_prep, "local")
    assert result.clients[HELD].held_out and result.clients[HELD].newcomer_global_acc is None
    assert result.final["newcomer_acc_mean"] is None and result.final["newcomer_global_acc_mean"] is None
    assert not [e for e in ledger.entries if e.client == HELD]


def test_no_holdout_no_newcomer_metrics(tiny_prep):
    result, _ = Simulation(tiny_prep, METHODS["fedavg"](tiny_config("fedavg", train={"rounds": 1}))).run()
    assert "newcomer_acc_mean" not in result.final and not any(c.held_out for c in result.clients)
    assert "Newcomer" not in to_markdown(comparison_rows([result]))


def test_resume_joins_once(tiny_prep, tmp_path, monkeypatch):
    cfg = tiny_config("fedslip", partition={"holdout_clients": 1})
    whole, whole_ledger = Simulation(tiny_prep, METHODS["fedslip"](cfg)).run()

    # killed after the last round's checkpoint, before the newcomers joined: the resumed run joins them
    path = tmp_path / "fedslip.safetensors"

    def crash(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(RoundProtocol, "_join", crash)
        with pytest.raises(KeyboardInterrupt):
            Simulation(tiny_prep, METHODS["fedslip"](cfg)).run(path)
    resumed, ledger = Simulation(tiny_prep, METHODS["fedslip"](cfg)).run(path, resume=True)
    assert resumed.clients == whole.clients
    assert {k: v for k, v in resumed.final.items()} == whole.final
    assert ledger.entries == whole_ledger.entries

    # a finished checkpoint returns its result: nobody joins again
    with monkeypatch.context() as m:
        m.setattr(RoundProtocol, "_join", crash)
        again, _ = Simulation(tiny_prep, METHODS["fedslip"](cfg)).run(path, resume=True)
    assert again.clients == whole.clients and again.final == whole.final


def test_cli_outputs_flag_newcomers(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "fedavg,fedslip", "--quiet", "--out", str(out),
                 *sets(["partition.holdout_clients=1", "train.rounds=1"])]) == 0
    with open(out / "clients.csv") as f:
        clients = list(csv.DictReader(f))
    assert [(c["client"], c["held_out"]) for c in clients] == [(str(k), str(k == HELD)) for k in range(4)] * 2
    for c in clients:
        assert (c["newcomer_acc"] != "") == (c["held_out"] == "True") == (c["newcomer_global_acc"] != "")
        assert (c["client_acc"] == "") == (c["held_out"] == "True")
    with open(out / "rounds.csv") as f:
        header = next(csv.reader(f))
    assert "client_acc_2" in header and "client_acc_3" not in header
    doc = json.loads((out / "results.json").read_text())
    for name in ("fedavg", "fedslip"):
        assert doc["methods"][name]["final"]["newcomer_acc_mean"] is not None
    table = (out / "comparison.md").read_text()
    assert "Newcomer acc after joining (%)" in table and "Newcomer acc, global model (%)" in table
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["newcomer_acc_mean"] != "" and r["newcomer_global_acc_mean"] != "" for r in rows)


@pytest.mark.parametrize("count", ["4", "-1", "9"])
def test_bad_holdout_is_one_line_exit_2(tmp_path, capsys, count):
    err = bad(tmp_path, capsys, ["run", *sets([f"partition.holdout_clients={count}"])])
    assert "partition.holdout_clients" in err and "at least one client must train" in err


@pytest.mark.parametrize("name", ["fedavg", "fedslip"])
def test_flower_newcomers_join_like_in_process(name, tiny_prep):
    pytest.importorskip("flwr", reason="the Flower runtime needs the `flower` extra")
    from flower_util import both_runtimes, ledger_rows

    from fedslip.federation.flower.records import state_from_context

    sections = {"partition": {"holdout_clients": 1}, "train": {"rounds": 1}, "method": {"warmup_rounds": 0}}
    _, result, ledger, server, grid, fl_result, fl_ledger = both_runtimes(name, tiny_prep, sections, run_id=43)
    assert server.failures == []
    assert ledger_rows(fl_ledger) == ledger_rows(ledger) and [e.note for e in fl_ledger.entries][-1] == "join"
    states = {int(c.node_config["partition-id"]): state_from_context(c) for c in grid.contexts.values()}
    assert states[HELD] is None and all(states[k] is not None for k in range(HELD))  # it never trained
    held, fl_held = result.clients[HELD], fl_result.clients[HELD]
    assert fl_held.held_out and fl_held.newcomer_acc is not None
    step = 1.0 / held.n_test + 1e-9  # float sums may differ across runtimes: at most one example apart
    assert abs(fl_held.newcomer_acc - held.newcomer_acc) <= step
    assert abs(fl_held.newcomer_global_acc - held.newcomer_global_acc) <= step


def test_flora_keeps_no_stack_for_a_newcomer_and_sends_it_the_merged_weights(tiny_prep):
    """FLoRA keeps a round's stack while a training client lacks it; a held-out client never trains, so it
    must not keep every stack alive: it gets the server's merged Δ, and its global model is the server's."""
    from fedslip.methods.flora import STACK

    sim, result, ledger, _ = held_out_run(tiny_prep, "flora", train={"rounds": 3})
    assert_never_trained(result, ledger)
    assert {k.split(".")[2] for k in sim.glob if k.startswith(STACK)} == {"3"}  # rounds 1, 2 dropped
    down = sim.method.down_payload(sim.glob, HELD)
    deltas = [k for k in sim.glob if k.endswith(".delta")]
    assert deltas and all(torch.equal(down[k], sim.glob[k]) for k in deltas)
    assert not any(k.endswith((".A", ".B")) for k in down)
    method, model, state, _ = independent_join(tiny_prep, sim.method.cfg, sim.glob)
    server = method.global_view(model, sim.glob, state)
    on_client = method.global_view(model, down, state)
    assert server.keys() == on_client.keys() and all(torch.equal(server[n], on_client[n]) for n in server)
    assert result.clients[HELD].newcomer_global_acc == accuracy(tiny_prep, model, server, "global")
    # a training client that missed rounds still gets stacks, not the merged weights
    assert all(not any(k.endswith(".delta") for k in sim.method.down_payload(sim.glob, c)) for c in range(HELD))


def test_a_held_out_client_is_not_exported(tmp_path, capsys):
    """Its joined model is evaluated once and not kept: exporting its stored (never trained) state as its
    personal model would be a model nobody evaluated."""
    out = tmp_path / "run"
    assert main(["run", "--method", "fedslip", "--quiet", "--out", str(out),
                 *sets(["partition.holdout_clients=1", "train.rounds=1"])]) == 0
    capsys.readouterr()
    rc = main(["export", str(out), "--client", str(HELD), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "was held out" in err and not (tmp_path / "x").exists()
    assert main(["export", str(out), "--client", "0", "--out", str(tmp_path / "y")]) == 0


def test_rounds_csv_eval_traffic_adds_up_to_the_summary_with_newcomers(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--method", "fedavg", "--quiet", "--out", str(out),
                 *sets(["partition.holdout_clients=1", "train.rounds=2"])]) == 0
    with open(out / "rounds.csv") as f:
        per_round = [float(r["eval_mib"]) for r in csv.DictReader(f)]
    final = json.loads((out / "results.json").read_text())["methods"]["fedavg"]["final"]
    assert sum(per_round) == pytest.approx(final["eval_mib_per_round"] * len(per_round))
