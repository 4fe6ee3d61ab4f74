"""Only the shared track crosses the client/server boundary; private state never does."""

from __future__ import annotations

import pytest
import torch

from fedslip.federation import inprocess as simulation
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS

from conftest import tiny_config


def run_capturing(monkeypatch, prep, method_name, **sections):
    """Run a tiny federation; return (sim, every payload that was encoded)."""
    sent = []
    real_encode = simulation.encode

    def spy(payload):
        sent.append({k: v.clone() for k, v in payload.items()})
        return real_encode(payload)

    monkeypatch.setattr(simulation, "encode", spy)
    cfg = tiny_config(method_name, **sections)
    sim = Simulation(prep, METHODS[method_name](cfg))
    sim.run()
    return sim, sent


def private_tensors(sim):
    return {f"client{k}:{n}": t for k, c in enumerate(sim.clients) for n, t in c.tensors.items()}


@pytest.mark.parametrize("method,head", [("fedslip", None), ("fedslip", "local"), ("dualtrack-naive", None),
                                         ("fedavg", "local")])
def test_private_track_and_local_head_never_sent(monkeypatch, tiny_prep, method, head):
    sim, sent = run_capturing(monkeypatch, tiny_prep, method, method={"head": head})
    model = sim.model
    forbidden = set(model.private_names) | set(model.mask_names)
    if sim.method.head == "local":
        forbidden |= set(model.head_names)
    assert sent and all(p for p in sent)
    for payload in sent:
        assert not forbidden & set(payload), f"private tensor names in payload: {forbidden & set(payload)}"
        assert set(payload) <= set(sim.method.shared_names(model))
    # by value: no private tensor (which did train) equals any transmitted tensor
    privates = {n: t for n, t in private_tensors(sim).items() if not n.endswith("_mask")}
    assert privates
    for payload in sent:
        for name, t in payload.items():
            for pname, p in privates.items():
                assert not (p.shape == t.shape and torch.equal(p, t)), f"{pname} sent as {name}"


def test_fedslip_private_track_trains_after_warmup_only(tiny_prep):
    cfg = tiny_config("fedslip", train={"rounds": 2}, method={"warmup_rounds": 1})
    sim = Simulation(tiny_prep, METHODS["fedslip"](cfg))
    start = {k: dict(c.tensors) for k, c in enumerate(sim.clients)}
    sim.run_round(1)
    for k, c in enumerate(sim.clients):
        for n in sim.model.private_names:
            assert torch.equal(c.tensors[n], start[k][n]), "private track moved during warmup"
    sim.run_round(2)
    moved = [not torch.equal(c.tensors[n], start[k][n]) for k, c in enumerate(sim.clients)
             for n in sim.model.private_names if n.endswith("p_B")]
    assert all(moved), "private track did not train after warmup"


def test_masks_are_rechosen_during_warmup_then_frozen(tiny_prep):
    from fedslip.methods.fedslip import mask_generator

    cfg = tiny_config("dualtrack-naive", train={"rounds": 3}, method={"warmup_rounds": 1, "sparsity": 0.5})
    sim = Simulation(tiny_prep, METHODS["dualtrack-naive"](cfg))
    sim.run_round(1)
    model = sim.model
    for k, c in enumerate(sim.clients):  # after a warmup round: the magnitude mask of the trained weights
        expected = model.masks_for({n: c.tensors[n] for n in model.private_names}, 0.5, mask_generator(0, k))
        for n, m in expected.items():
            assert torch.equal(c.tensors[n], m)
            assert int(m.sum()) == round(0.5 * m.numel())
    after_warmup = [{n: c.tensors[n].clone() for n in model.mask_names} for c in sim.clients]
    sim.run_round(2)
    sim.run_round(3)
    for k, c in enumerate(sim.clients):
        for n in model.mask_names:
            assert torch.equal(c.tensors[n], after_warmup[k][n]), "mask changed after warmup"
