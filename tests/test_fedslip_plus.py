"""FedSLIP+ candidates: a private head per client, and masks from trained magnitudes after a dense warmup."""

from __future__ import annotations

import torch

from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS

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


def test_dense_warmup_trains_unmasked_then_keeps_the_largest_trained_weights(tiny_prep):
    sim = simulate(tiny_prep, 2, private_warmup="dense", warmup_rounds=2, sparsity=0.75)
    name = sim.model.private_names[0]
    init = sim.clients[1].tensors[name].clone()
    assert torch.all(sim.clients[1].tensors[f"{name}_mask"] == 1)
    sim.run_round(1)
    state = sim.clients[1]
    assert not torch.equal(state.tensors[name], init)  # private steps ran during warmup
    assert torch.all(state.tensors[f"{name}_mask"] == 1)  # still dense before the warmup ends
    sim.run_round(2)
    for n in sim.model.private_names:
        w, mask = state.tensors[n], state.tensors[f"{n}_mask"]
        keep = round(0.25 * w.numel())
        assert int(mask.sum()) == keep
        top = torch.topk(w.abs().flatten(), keep).values.min()
        assert torch.all(w.abs()[mask.bool()] >= top) and torch.all(w.abs()[~mask.bool()] <= top)


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
