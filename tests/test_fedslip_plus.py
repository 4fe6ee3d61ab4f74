"""FedSLIP+ candidates: a private head per client, masks from trained magnitudes after a dense warmup (with or
without rewinding), a cosine schedule for the private learning rate."""

from __future__ import annotations

import pytest
import torch

from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS
from fedslip.methods.base import ClientState

from conftest import tiny_config


def simulate(prep, rounds: int, **method):
    sim = Simulation(prep, METHODS["fedslip"](tiny_config("fedslip", train={"rounds": rounds}, method=method)))
    return sim


def test_private_head_is_trained_in_the_private_step_used_by_the_personal_model_and_never_sent(tiny_prep):
    sim = simulate(tiny_prep, 3, private_head=True, warmup_rounds=1)
    uploaded = set()
    real = sim.method.aggregate

    def spy(ups, glob, rnd, participants):
        uploaded.update(k for p, _ in ups for k in p)
        return real(ups, glob, rnd, participants)

    sim.method.aggregate = spy
    sim.run_round(1)
    assert not any(k.startswith("own.") for k in sim.clients[0].tensors)  # warmup: no private step, no own head
    sim.run_round(2)
    sim.run_round(3)
    state, model, method = sim.clients[0], sim.model, sim.method
    own = {k[4:]: v for k, v in state.tensors.items() if k.startswith("own.")}
    assert set(own) == set(model.head_names)
    down = method.down_payload(sim.glob, 0)
    assert all(not torch.equal(own[n], sim.glob[n]) for n in model.head_names)
    personal, global_ = method.personal_view(model, down, state), method.global_view(model, down, state)
    assert all(torch.equal(personal[n], own[n]) and torch.equal(global_[n], sim.glob[n]) for n in model.head_names)
    assert uploaded == set(method.shared_names(model))  # the own head never travels


def assert_top_share(weights, masks, share: float) -> None:
    for n, w in weights.items():
        mask = masks[f"{n}_mask"]
        keep = round(share * w.numel())
        assert int(mask.sum()) == keep
        top = torch.topk(w.abs().flatten(), keep).values.min()
        assert torch.all(w.abs()[mask.bool()] >= top) and torch.all(w.abs()[~mask.bool()] <= top)


def test_dense_warmup_trains_unmasked_then_keeps_the_largest_trained_weights(tiny_prep):
    sim = simulate(tiny_prep, 3, private_warmup="dense", warmup_rounds=2, sparsity=0.75)
    name = sim.model.private_names[0]
    init = sim.clients[1].tensors[name].clone()
    assert torch.all(sim.clients[1].tensors[f"{name}_mask"] == 1)
    sim.run_round(1)
    state = sim.clients[1]
    assert not torch.equal(state.tensors[name], init)  # private steps ran during warmup
    sim.run_round(2)
    assert torch.all(state.tensors[f"{name}_mask"] == 1)  # dense through the warmup's last round
    trained = {n: state.tensors[n].clone() for n in sim.model.private_names}
    sim.run_round(3)  # the first round after the warmup prunes, by the magnitudes the warmup left
    assert_top_share(trained, state.tensors, 0.25)


def test_a_client_that_missed_the_warmups_last_round_prunes_at_its_next_one(tiny_prep):
    cfg = tiny_config("fedslip", train={"rounds": 4, "failures": [[2, 1], [3, 1]]},
                      method={"private_warmup": "dense", "warmup_rounds": 2, "sparsity": 0.75})
    sim = Simulation(tiny_prep, METHODS["fedslip"](cfg))
    for rnd in (1, 2, 3):
        sim.run_round(rnd)
    state, names = sim.clients[1], sim.model.private_names
    assert all(torch.all(state.tensors[f"{n}_mask"] == 1) for n in names)  # no round of its own since round 1
    assert all(int(sim.clients[0].tensors[f"{n}_mask"].sum()) < state.tensors[n].numel() for n in names)
    trained = {n: state.tensors[n].clone() for n in names}
    sim.run_round(4)
    assert_top_share(trained, state.tensors, 0.25)


def test_persistent_view_after_the_warmup_is_the_dense_model_as_trained(tiny_prep):
    """The round ending the warmup leaves the client's model as it trained it: pruning (and rewinding) come
    with its next round, so the persistent view evaluated in between is that model."""
    sim = simulate(tiny_prep, 3, private_warmup="dense", warmup_rounds=2, private_rewind=True)
    real = sim.method.local_update
    left = {}

    def spy(model, down, client, data, rnd):
        out = real(model, down, client, data, rnd)
        left[data.cid] = model.read(model.private_names)
        return out

    sim.method.local_update = spy
    sim.run_round(1)
    sim.run_round(2)
    state = sim.clients[1]
    view = sim.method.persistent_view(sim.model, sim.method.down_payload(sim.glob, 1), state)
    assert all(torch.equal(view[n], left[1][n]) for n in sim.model.private_names)
    assert all(torch.all(view[f"{n}_mask"] == 1) for n in sim.model.private_names)


def test_dense_warmup_newcomer_joins_with_sparse_masks(tiny_prep):
    from test_newcomers import HELD, held_out_run

    sim, result, _, views = held_out_run(tiny_prep, "fedslip", train={"rounds": 2},
                                         method={"private_warmup": "dense", "warmup_rounds": 1, "sparsity": 0.75})
    masks = {n: views[HELD][n] for n in sim.model.mask_names}
    assert masks and all(int(m.sum()) == round(0.25 * m.numel()) for m in masks.values())
    assert all(torch.all(sim.clients[HELD].tensors[n] == 1) for n in masks)  # its stored state untouched
    assert result.clients[HELD].newcomer_acc is not None


def test_private_steps_see_the_received_global_track_when_asked(tiny_prep, monkeypatch):
    import fedslip.methods.fedslip as module

    def global_track_in_private_steps(base: str):
        sim = simulate(tiny_prep, 1, private_base=base, warmup_rounds=0)
        received = {n: t.clone() for n, t in sim.glob.items()}
        seen, real = [], module.sgd_step

        def spy(model, batch, names, opt, clip, **kw):
            if names[0] in model.private_names:
                seen.append(all(torch.equal(model.read([n])[n], received[n]) for n in model.global_names))
            out = real(model, batch, names, opt, clip, **kw)
            return out

        monkeypatch.setattr(module, "sgd_step", spy)
        sim.run_round(1)
        monkeypatch.setattr(module, "sgd_step", real)
        return seen

    received = global_track_in_private_steps("received")
    assert received and all(received)
    local = global_track_in_private_steps("local")
    assert local and not any(local)


def test_fedslip_plus_is_fedslip_with_its_settings_and_by_method_still_wins(tiny_prep):
    from fedslip.config import load_config
    from fedslip.methods import method_for

    cfg = load_config(preset="quick", method="fedslip-plus")
    plus = method_for(cfg)
    assert (plus.m.mu, plus.m.private_base, plus.name) == (0.0, "received", "fedslip-plus")
    assert method_for(load_config(preset="quick", method="fedslip")).m.mu == 0.1
    tuned = method_for(load_config(preset="quick", method="fedslip-plus", sets=["by_method.fedslip-plus.method.mu=0.05"]))
    assert tuned.m.mu == 0.05


def test_fedslip_plus_global_model_is_fedavgs_exactly(tiny_prep):
    """fedslip-plus trains its global track as FedAvg does and its private steps never touch it, draw their
    dropout masks from a stream of their own and start from the received global track: after rounds with
    private steps its global model is FedAvg's, bit for bit."""
    def global_after_two_rounds(name: str, **method):
        sim = Simulation(tiny_prep, METHODS[name](tiny_config(name, method={"dropout": 0.3, **method})))
        sim.run_round(1)
        sim.run_round(2)
        return sim.glob, sim

    fedavg, _ = global_after_two_rounds("fedavg")
    plus, sim = global_after_two_rounds("fedslip-plus", warmup_rounds=0)
    assert sim.clients[0].optim["private"]["state"][0]["step"].item() > 0  # private steps did run
    assert fedavg.keys() == plus.keys()
    assert all(torch.equal(fedavg[k], plus[k]) for k in fedavg)


def test_rewind_restarts_the_kept_private_weights_from_their_initial_values(tiny_prep):
    sim = simulate(tiny_prep, 3, private_warmup="dense", warmup_rounds=2, sparsity=0.75, private_rewind=True)
    state = sim.clients[1]
    init = {n: state.tensors[n].clone() for n in sim.model.private_names}
    sim.run_round(1)
    sim.run_round(2)
    assert "private" in state.optim and not torch.equal(state.tensors[sim.model.private_names[0]],
                                                        init[sim.model.private_names[0]])
    trained = {n: state.tensors[n].clone() for n in sim.model.private_names}
    pruned = ClientState(tensors=dict(state.tensors), optim=dict(state.optim))
    sim.method.prune_after_warmup(sim.model, pruned, 1, 3)  # what round 3 does first
    for n in sim.model.private_names:
        assert torch.equal(pruned.tensors[n], init[n])
    assert_top_share(trained, pruned.tensors, 0.25)  # masks from the trained values, not the rewound ones
    assert "private" not in pruned.optim  # the trained values' AdamW moments are gone
    sim.method.prune_after_warmup(sim.model, pruned, 1, 4)  # once only
    assert all(torch.equal(pruned.tensors[n], init[n]) for n in sim.model.private_names)
    sim.run_round(3)
    assert all(torch.equal(state.tensors[f"{n}_mask"], pruned.tensors[f"{n}_mask"]) for n in sim.model.private_names)
    assert not torch.equal(state.tensors[sim.model.private_names[0]], init[sim.model.private_names[0]])


def test_private_cosine_schedule_decays_over_the_private_rounds(tiny_prep, monkeypatch):
    import fedslip.methods.fedslip as module

    lrs, real = [], module.adamw

    def spy(params, lr, weight_decay, state=None):
        lrs.append(lr)
        return real(params, lr, weight_decay, state)

    monkeypatch.setattr(module, "adamw", spy)
    sim = simulate(tiny_prep, 3, warmup_rounds=1, private_lr_schedule="cosine", private_lr_scale=0.5)
    lr = sim.method.t.lr
    sim.run_round(1)  # warmup: no private steps
    for rnd, expected in ((2, 0.5 * lr), (3, 0.5 * lr * 0.5)):  # two private rounds: cos 0, then cos π/2
        lrs.clear()
        sim.run_round(rnd)
        private = lrs[1::2]  # each client builds the global optimizer, then the private one
        assert len(private) == 4 and all(abs(p - expected) < 1e-12 for p in private), (rnd, private)


def test_rewind_without_a_dense_warmup_is_a_config_error():
    import pytest

    from fedslip.config import load_config
    from fedslip.errors import UserError

    with pytest.raises(UserError, match="private_rewind"):
        load_config(None, "quick", "fedslip", ["method.private_rewind=true"])
    with pytest.raises(UserError, match="private_lr_schedule"):
        load_config(None, "quick", "fedslip", ['method.private_lr_schedule="step"'])


@pytest.mark.parametrize("method,extra,says", [
    ("fedslip", {}, "the private track never trains"),
    ("fedslip-plus", {}, "the private track never trains"),
    ("dualtrack-naive", {"private_warmup": "dense"}, "never pruned to method.sparsity"),
    ("fedslip", {"private_warmup": "dense"}, "never pruned to method.sparsity")])
def test_a_warmup_as_long_as_the_run_is_one_warning_before_it_starts(method, extra, says, tmp_path, capsys):
    from fedslip.cli import main
    from fedslip.methods import method_for

    from test_cli import sets

    for warmup, warned in ((2, True), (1, False)):  # 2 rounds (the tiny sets)
        cfg = tiny_config(method, method={"warmup_rounds": warmup, **extra}, train={"rounds": 2})
        assert any(says in w for w in method_for(cfg).setting_warnings()) == warned
    assert method_for(tiny_config("dualtrack-naive", method={"warmup_rounds": 2})).setting_warnings() == []
    dense = [f"method.private_warmup=\"{extra['private_warmup']}\""] if extra else []
    out = tmp_path / "run"
    assert main(["run", "--method", method, "--quiet", "--out", str(out),
                 *sets(["method.warmup_rounds=2", "train.rounds=2", *dense])]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if says in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"fedslip: warning: {method}: method.warmup_rounds = 2")


def test_the_warmup_warning_is_said_once_over_several_seeds(tmp_path, capsys):
    from fedslip.cli import main

    from test_cli import sets

    assert main(["compare", "--methods", "fedavg,fedslip", "--seeds", "0,1", "--quiet", "--out", str(tmp_path / "r"),
                 *sets(["method.warmup_rounds=1", "train.rounds=1"])]) == 0
    assert sum("the private track never trains" in line for line in capsys.readouterr().err.splitlines()) == 1
