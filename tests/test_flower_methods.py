"""Every registered method runs unchanged on Flower: one round over the in-process Flower grid ends with the
in-process engine's global state, every client's private state (in its node's Context.state), the same
byte ledger and the same accuracies."""

from __future__ import annotations

import pytest
import torch

from flower_util import assert_same_state, both_runtimes, ledger_rows

from fedslip.federation.flower.records import state_from_context
from fedslip.methods import METHODS

ONE_ROUND = {"train": {"rounds": 1}}


@pytest.mark.parametrize("name", list(METHODS))
def test_method_runs_the_same_on_flower(name, tiny_prep):
    sim, result, ledger, server, grid, fl_result, fl_ledger = both_runtimes(name, tiny_prep, ONE_ROUND, run_id=41)

    assert server.failures == []
    assert_same_state(server.glob, sim.glob)
    assert ledger_rows(fl_ledger) == ledger_rows(ledger)
    states = {int(c.node_config["partition-id"]): state_from_context(c)[0] for c in grid.contexts.values()}
    for k, client in enumerate(sim.clients):
        assert set(states[k].tensors) == set(client.tensors)
        for n, t in client.tensors.items():
            assert torch.allclose(states[k].tensors[n], t, rtol=1e-5, atol=1e-7), (k, n)
    n_test = min(c.n_test for c in result.clients)
    for key in ("global_acc", "client_acc_mean", "personal_acc_mean", "kstep_acc_mean"):
        a, b = result.final[key], fl_result.final[key]
        assert (a is None) == (b is None), key
        if a is not None:
            assert abs(a - b) <= 1.0 / n_test + 1e-9, key
