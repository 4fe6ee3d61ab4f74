"""Same config and seed => identical numbers; another seed => different ones."""

from __future__ import annotations

import torch

from fedslip.federation.simulation import Simulation
from fedslip.methods import METHODS
from fedslip.prepare import prepare

from conftest import tiny_config


def run(seed: int, method: str = "fedslip"):
    cfg = tiny_config(method, train={"seed": seed})
    sim = Simulation(prepare(cfg), METHODS[method](cfg))
    result, _ = sim.run()
    return result, sim


def test_same_seed_same_numbers_and_state():
    a, sim_a = run(0)
    b, sim_b = run(0)
    assert a.final == b.final
    assert [r.train_loss for r in a.rounds] == [r.train_loss for r in b.rounds]
    assert [r.personal_acc for r in a.rounds] == [r.personal_acc for r in b.rounds]
    for name, t in sim_a.glob.items():
        assert torch.equal(t, sim_b.glob[name])
    for ca, cb in zip(sim_a.clients, sim_b.clients):
        for name, t in ca.tensors.items():
            assert torch.equal(t, cb.tensors[name])


def test_other_seed_other_numbers():
    a, sim_a = run(0)
    c, sim_c = run(1)
    assert [r.train_loss for r in a.rounds] != [r.train_loss for r in c.rounds]
    assert any(not torch.equal(t, sim_c.glob[n]) for n, t in sim_a.glob.items())
