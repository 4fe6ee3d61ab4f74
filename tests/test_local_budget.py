"""A round's local work as a step budget (`train.local_steps`) and a learning rate decayed over the rounds."""

from __future__ import annotations

import math

import pytest

import fedslip.methods.base as base
import fedslip.methods.fedslip as fedslip_module
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS

from conftest import tiny_config


def count_steps(monkeypatch, module, prep, name, **sections):
    steps = []
    real = module.sgd_step

    def spy(model, batch, names, opt, clip, **kw):
        steps.append((len(batch.labels), opt.param_groups[0]["lr"]))
        return real(model, batch, names, opt, clip, **kw)

    monkeypatch.setattr(module, "sgd_step", spy)
    sim = Simulation(prep, METHODS[name](tiny_config(name, **sections)))
    per_round = []
    for rnd in range(1, sim.method.rounds() + 1):
        before = len(steps)
        sim.run_round(rnd)
        per_round.append(steps[before:])
    return per_round


def test_step_budget_crosses_epochs_and_ignores_epochs(monkeypatch, tiny_prep):
    # 40 examples per client, batch 8: 5 batches an epoch; 7 steps take one epoch and 2 batches of the next
    rounds = count_steps(monkeypatch, base, tiny_prep, "fedavg", train={"local_steps": 7, "local_epochs": 3})
    assert [len(r) for r in rounds] == [4 * 7, 4 * 7]
    rounds = count_steps(monkeypatch, base, tiny_prep, "fedavg", train={"local_epochs": 2})
    assert [len(r) for r in rounds] == [4 * 10, 4 * 10]


def test_fedslip_takes_a_global_and_a_private_step_per_budgeted_batch(monkeypatch, tiny_prep):
    rounds = count_steps(monkeypatch, fedslip_module, tiny_prep, "fedslip", train={"local_steps": 3},
                         method={"warmup_rounds": 1})
    assert [len(r) for r in rounds] == [4 * 3, 4 * 3 * 2]


def test_cosine_schedule_decays_each_round(monkeypatch, tiny_prep):
    lr, rounds = 1e-3, 3
    seen = count_steps(monkeypatch, fedslip_module, tiny_prep, "fedslip",
                       train={"lr": lr, "lr_schedule": "cosine", "rounds": rounds}, method={"warmup_rounds": 1})
    for r, steps in enumerate(seen, start=1):
        want = lr * (1 + math.cos(math.pi * (r - 1) / rounds)) / 2
        assert {round(x, 12) for _, x in steps} <= {round(want, 12), round(want / 2, 12)}, r
        assert any(x == pytest.approx(want) for _, x in steps), r
    constant = count_steps(monkeypatch, base, tiny_prep, "fedavg", train={"lr": lr})
    assert {x for r in constant for _, x in r} == {lr}
