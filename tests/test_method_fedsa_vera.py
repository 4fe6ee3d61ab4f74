"""FedSA-VeRA: only VeRA's d vectors travel (weighted mean on the server); b, the head and the frozen
random matrices never do, and those matrices are the same wherever the root seed is the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import test_ledger
from fedslip.methods import METHODS
from fedslip.model.vera import VeRALinear, shared_pair

from conftest import tiny_config
from test_method_fedsa import run_capturing

RANK = 16


@pytest.fixture(scope="module")
def vera_run(tiny_prep):
    return run_capturing(tiny_prep, "fedsa-vera", method={"vera_rank": RANK})


def layer_names(prep) -> list[str]:
    cfg = prep.backbone.model.config
    return [f"bert.encoder.layer.{i}.attention.self.{proj}"
            for i in range(cfg.num_hidden_layers) for proj in ("query", "value")]


def test_vera_layer_computes_its_formula_and_starts_as_identity():
    a, b = shared_pair(8, max_in=6, max_out=7, seed=3)
    small, tall = VeRALinear(nn.Linear(6, 5), a, b), VeRALinear(nn.Linear(4, 7), a, b)
    x = torch.randn(3, 6)
    assert torch.equal(small(x), small.base(x))  # b = 0 at init
    assert torch.equal(small.vera_d, torch.full((8,), 0.1)) and torch.equal(small.vera_b, torch.zeros(5))
    # one shared pair, each layer using its top-left slice
    assert torch.equal(small.vera_A, a[:, :6]) and torch.equal(small.vera_B, b[:5])
    assert torch.equal(tall.vera_A, a[:, :4]) and torch.equal(tall.vera_B, b[:7])
    assert [n for n, _ in small.named_parameters() if not n.startswith("base.")] == ["vera_d", "vera_b"]
    with torch.no_grad():
        small.vera_d.normal_()
        small.vera_b.normal_()
    xa = x.numpy()
    expected = small.base(x).detach().numpy() + (
        ((xa @ a[:, :6].numpy().T) * small.vera_d.detach().numpy()) @ b[:5].numpy().T) * small.vera_b.detach().numpy()
    np.testing.assert_allclose(small(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_the_layer_stays_in_bf16_and_its_vectors_still_train():
    """As a LoRA layer does: an fp32 output would carry every op after it, up to the next matmul, in fp32."""
    a, b = shared_pair(8, max_in=6, max_out=5, seed=3)
    layer = VeRALinear(nn.Linear(6, 5).to(torch.bfloat16), a, b)
    with torch.no_grad():
        layer.vera_b.fill_(0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 6))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.vera_d.dtype == layer.vera_b.dtype == torch.float32
    assert layer.vera_d.grad.abs().sum() > 0 and layer.vera_b.grad.abs().sum() > 0


def test_frozen_matrices_come_from_the_root_seed_and_never_train(tiny_prep, vera_run):
    sim, _, _, _ = vera_run
    names = layer_names(tiny_prep)
    trained = sim.model.read([f"{n}.vera_{m}" for n in names for m in "AB"])
    # a fresh build with the same root seed (what any other client does) gives bit-identical matrices
    again = METHODS["fedsa-vera"](tiny_config("fedsa-vera", method={"vera_rank": RANK})).build(tiny_prep.backbone)
    assert all(torch.equal(t, again.read([n])[n]) for n, t in trained.items())
    other = METHODS["fedsa-vera"](tiny_config("fedsa-vera", method={"vera_rank": RANK}, train={"seed": 1}))
    assert not torch.equal(other.build(tiny_prep.backbone).read([f"{names[0]}.vera_A"])[f"{names[0]}.vera_A"],
                           trained[f"{names[0]}.vera_A"])
    # one pair for all layers, of the configured rank
    hidden = tiny_prep.backbone.model.config.hidden_size
    for n in names:
        assert trained[f"{n}.vera_A"].shape == (RANK, hidden) and trained[f"{n}.vera_B"].shape == (hidden, RANK)
        assert torch.equal(trained[f"{n}.vera_A"], trained[f"{names[0]}.vera_A"])
    assert not any(isinstance(sim.model.params([n])[0], nn.Parameter) for n in trained)


def test_only_d_is_sent_and_payload_is_rank_per_layer(tiny_prep, vera_run):
    sim, result, sent, _ = vera_run
    names = layer_names(tiny_prep)
    shapes = {f"{n}.vera_d": (RANK,) for n in names}
    assert sent and all(set(p) == set(shapes) for p in sent)
    for e in sim.ledger.rows():
        assert e.n_params == len(names) * RANK
        assert e.bytes == test_ledger.predicted_safetensors_bytes(shapes)
    assert len(sim.ledger.rows()) == 2 * len(tiny_prep.split.train) * sim.cfg.train.rounds
    # b trained on every client, differs between clients, and its values never appear in a payload
    bs = [{n: t for n, t in c.tensors.items() if n.endswith(".vera_b")} for c in sim.clients]
    assert all(len(b) == len(names) and all(t.abs().sum() > 0 for t in b.values()) for b in bs)
    assert not torch.equal(bs[0][f"{names[0]}.vera_b"], bs[1][f"{names[0]}.vera_b"])
    frozen = sim.model.read([f"{names[0]}.vera_A", f"{names[0]}.vera_B"]).values()
    for payload in sent:
        for t in payload.values():
            assert not any(p.shape == t.shape and torch.equal(p, t) for b in bs for p in b.values())
            assert not any(p.shape == t.shape for p in frozen)
    assert result.final["global_acc"] is None


def test_aggregated_d_is_the_example_weighted_mean_of_uploads(tiny_prep, vera_run):
    _, _, _, aggregations = vera_run
    for ups, glob in aggregations:
        assert [n for _, n in ups] == [len(idx) for idx in tiny_prep.split.train]
        total = sum(n for _, n in ups)
        for name in (f"{n}.vera_d" for n in layer_names(tiny_prep)):
            expected = sum(p[name].double() * n for p, n in ups) / total
            torch.testing.assert_close(glob[name].double(), expected, rtol=0, atol=1e-6)
            assert not torch.equal(ups[0][0][name], ups[1][0][name])
    method = METHODS["fedsa-vera"](tiny_config("fedsa-vera"))
    d1, d2 = torch.randn(RANK), torch.randn(RANK)
    out = method.aggregate([({"l.vera_d": d1}, 1), ({"l.vera_d": d2}, 3)], {}, 2, [0, 1])
    torch.testing.assert_close(out["l.vera_d"], (d1 + 3 * d2) / 4)
