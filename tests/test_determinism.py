"""Same config and seed => identical numbers; another seed => different ones."""

from __future__ import annotations

import torch

from fedslip.federation.inprocess import Simulation
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


def test_a_method_gives_the_same_numbers_whatever_else_is_compared(tmp_path):
    """`compare` runs methods one after another on one backbone: none may leak state into the next."""
    import json

    from fedslip.cli import main

    from test_cli import sets

    finals = []
    for methods in ("fedslip", "local,fedavg,fedslip"):
        out = tmp_path / methods.replace(",", "-")
        assert main(["compare", "--methods", methods, "--quiet", "--out", str(out), *sets()]) == 0
        finals.append(json.loads((out / "results.json").read_text())["methods"]["fedslip"]["final"])
    assert finals[0] == finals[1]
