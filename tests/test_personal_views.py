"""The two personalized views: "synced" (the client's own state on the final global model) and "persistent"
(the client's model exactly as it left its last local training, never re-synced)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS

from conftest import tiny_config


def run_capturing_trained_models(prep, name: str, **sections):
    """Run, and capture each client's logits on its own test set the moment its local training ends."""
    sim = Simulation(prep, METHODS[name](tiny_config(name, **sections)))
    trained_logits: dict[int, torch.Tensor] = {}
    real = sim.method.local_update

    def spy(model, down, client, data, rnd):
        out = real(model, down, client, data, rnd)
        idx = prep.split.test[data.cid]
        with torch.inference_mode(), model.mode("both"):
            batches = list(prep.test.eval_batches(idx, 1000))
            trained_logits[data.cid] = torch.cat([model.logits(b.input_ids, b.attention_mask) for b in batches])
            labels = torch.cat([b.labels for b in batches])
        trained_logits[data.cid] = (trained_logits[data.cid], labels)
        return out

    sim.method.local_update = spy
    result, _ = sim.run()
    return sim, result, trained_logits


@pytest.mark.parametrize("name", ["fedslip", "fedavg", "fedsa"])
def test_persistent_accuracy_is_the_model_as_it_left_local_training(tiny_prep, name):
    sim, result, trained = run_capturing_trained_models(tiny_prep, name)
    for rec in result.clients:
        logits, labels = trained[rec.client]
        expected = float((logits.argmax(-1) == labels).double().mean())
        assert rec.persistent_acc == pytest.approx(expected, abs=1e-9), (name, rec.client)
    # the view itself gives those logits (not only the same accuracy)
    method, model, state = sim.method, sim.model, sim.clients[0]
    model.load(method.persistent_view(model, method.down_payload(sim.glob, 0), state))
    with torch.inference_mode(), model.mode("both"):
        b = next(iter(tiny_prep.test.eval_batches(tiny_prep.split.test[0], 1000)))
        assert torch.allclose(model.logits(b.input_ids, b.attention_mask), trained[0][0], atol=1e-6)


def test_synced_and_persistent_differ_when_clients_disagree(tiny_prep):
    """With skewed clients the final average is not any client's own model: the two views differ."""
    sim, result, _ = run_capturing_trained_models(tiny_prep, "fedslip")
    down = sim.method.down_payload(sim.glob, 0)
    persistent = sim.method.persistent_view(sim.model, down, sim.clients[0])
    synced = sim.method.personal_view(sim.model, down, sim.clients[0])
    differs = [n for n in synced if not torch.equal(synced[n], persistent[n])]
    assert differs and all(n.endswith((".g_A", ".g_B")) or n.startswith("classifier") for n in differs)
    assert all(np.isfinite(r.persistent_acc) and np.isfinite(r.personal_acc) for r in result.clients)


def test_methods_without_a_persistent_model_report_none(tiny_prep):
    _, result, _ = run_capturing_trained_models(tiny_prep, "flora")
    assert all(r.persistent_acc is None for r in result.clients)
    assert result.final["persistent_acc_mean"] is None
