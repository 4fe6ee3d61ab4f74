"""FedSA-rsLoRA: FedSA's share-A federation with the rank-stabilised scale α/√r."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import test_ledger
from fedslip.methods import METHODS

from conftest import tiny_config
from test_method_fedsa import bert_lora_a_shapes, run_capturing


@pytest.fixture(scope="module")
def rslora_run(tiny_prep):
    return run_capturing(tiny_prep, "fedsa-rslora", method={"r_g": 4, "alpha_g": 4.0})


def test_update_is_scaled_by_alpha_over_sqrt_r(rslora_run):
    sim, _, _, _ = rslora_run
    r, alpha = 4, 4.0
    for layer in sim.model.layers.values():
        # the layer's output minus its frozen base equals (α/√r)·B·A·x, not LoRA's (α/r)·B·A·x
        kept, mode = (layer.g_A.detach().clone(), layer.g_B.detach().clone()), layer.training
        layer.eval()
        x = torch.randn(3, layer.base.in_features)
        with torch.no_grad():
            layer.g_A.normal_()
            layer.g_B.normal_()
            delta = (layer(x) - layer.base(x)).numpy()
        ba_x = x.numpy() @ layer.g_A.detach().numpy().T @ layer.g_B.detach().numpy().T
        with torch.no_grad():  # the module's run, as the other tests see it
            layer.g_A.copy_(kept[0])
            layer.g_B.copy_(kept[1])
        layer.train(mode)
        np.testing.assert_allclose(delta, alpha / math.sqrt(r) * ba_x, rtol=1e-4, atol=1e-5)
        assert not np.allclose(delta, alpha / r * ba_x, rtol=1e-2)


def test_only_a_travels_and_payload_is_r_times_d_in(tiny_prep, rslora_run):
    sim, result, sent, _ = rslora_run
    shapes = bert_lora_a_shapes(tiny_prep, 4)
    assert sent and all(set(p) == set(shapes) for p in sent)
    n_params = sum(r * d_in for r, d_in in shapes.values())
    assert len(sim.ledger.rows()) == 2 * len(tiny_prep.split.train) * sim.cfg.train.rounds
    for e in sim.ledger.rows():
        assert e.n_params == n_params and e.bytes == test_ledger.predicted_safetensors_bytes(shapes)
    bs = [t for c in sim.clients for n, t in c.tensors.items() if n.endswith(".g_B")]
    assert bs and all(t.abs().sum() > 0 for t in bs)  # B trained, on the clients only
    assert result.final["global_acc"] is None


def test_aggregated_a_is_the_example_weighted_mean():
    method = METHODS["fedsa-rslora"](tiny_config("fedsa-rslora"))
    a1, a2 = torch.randn(2, 5), torch.randn(2, 5)
    out = method.aggregate([({"l.g_A": a1}, 2), ({"l.g_A": a2}, 6)], {}, 1, [0, 1])
    torch.testing.assert_close(out["l.g_A"], (2 * a1 + 6 * a2) / 8)
