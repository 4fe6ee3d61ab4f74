"""FFA-LoRA: A fixed at one seeded init everywhere, only B (and the shared head) trained and averaged, so
the aggregated update is exactly the average of the clients' updates."""

from __future__ import annotations

import pytest
import torch

import test_ledger
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS

from conftest import tiny_config
from test_method_fedsa import run_capturing


@pytest.fixture(scope="module")
def ffa_run(tiny_prep):
    """A 2-round run recording, after every client's local update, the A its model holds."""
    seen = []
    real = METHODS["ffa"].local_update

    def spy(self, model, down, client, data, rnd):
        out = real(self, model, down, client, data, rnd)
        kept = {n: t.clone() for n, t in out[1].tensors.items()}
        seen.append((rnd, data.cid, model.read(model.names_ending(".g_A")), kept))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(METHODS["ffa"], "local_update", spy)
        run = run_capturing(tiny_prep, "ffa")
    return (*run, seen)


def seeded_initial_a(prep) -> dict[str, torch.Tensor]:
    """The A a fedavg run with the same root seed starts from (built through fedavg's own code path)."""
    sim = Simulation(prep, METHODS["fedavg"](tiny_config("fedavg")))
    return {n: t for n, t in sim.glob.items() if n.endswith(".g_A")}


def test_a_is_bit_identical_across_rounds_and_clients_and_never_sent(tiny_prep, ffa_run):
    sim, _, sent, _, seen = ffa_run
    expected = seeded_initial_a(tiny_prep)
    n_layers = 2 * tiny_prep.backbone.model.config.num_hidden_layers
    assert len(expected) == n_layers
    assert {(rnd, cid) for rnd, cid, _, _ in seen} == {(r, k) for r in (1, 2) for k in range(len(sim.clients))}
    for rnd, cid, model_a, client_tensors in seen:
        assert set(model_a) == set(expected)
        for n, a in expected.items():
            assert torch.equal(model_a[n], a), f"A moved in client {cid}'s training, round {rnd}"
            assert torch.equal(client_tensors[n], a)
    for n, a in expected.items():  # the server's A (global model) is the same one
        assert torch.equal(sim.method.global_view(sim.model, sim.glob, sim.clients[0])[n], a)
    for payload in sent:
        assert not any(n.endswith(".g_A") for n in payload)
        assert not any(t.shape == a.shape and torch.equal(t, a) for t in payload.values() for a in expected.values())


def test_aggregated_product_equals_average_of_client_products(tiny_prep, ffa_run):
    sim, _, _, aggregations, seen = ffa_run
    client_a = {(rnd, cid): model_a for rnd, cid, model_a, _ in seen}  # the A each client's trained model held
    assert len(aggregations) == 2
    for rnd, (ups, glob) in enumerate(aggregations, start=1):
        total = sum(n for _, n in ups)
        server_a = sim.method.global_view(sim.model, glob, sim.clients[0])
        for b_name in (n for n in glob if n.endswith(".g_B")):
            a_name = b_name[:-len("g_B")] + "g_A"
            average_of_products = sum(p[b_name].double() @ client_a[(rnd, k)][a_name].double() * (n / total)
                                      for k, (p, n) in enumerate(ups))
            product_of_aggregate = glob[b_name].double() @ server_a[a_name].double()
            assert average_of_products.abs().max() > 0
            torch.testing.assert_close(product_of_aggregate, average_of_products, rtol=0, atol=1e-6)


def test_payload_is_b_plus_head(tiny_prep, ffa_run):
    sim, result, sent, _, _ = ffa_run
    net = tiny_prep.backbone.model.config
    r, hidden, n_classes = sim.cfg.method.r_g, net.hidden_size, tiny_prep.data.num_classes
    shapes = {f"bert.encoder.layer.{i}.attention.self.{proj}.g_B": (hidden, r)
              for i in range(net.num_hidden_layers) for proj in ("query", "value")}
    shapes.update({"classifier.weight": (n_classes, hidden), "classifier.bias": (n_classes,)})
    n_params = 2 * net.num_hidden_layers * hidden * r + n_classes * hidden + n_classes
    assert all(set(p) == set(shapes) for p in sent)
    assert len(sim.ledger.rows()) == 2 * len(tiny_prep.split.train) * sim.cfg.train.rounds
    for e in sim.ledger.rows():
        assert e.n_params == n_params and e.bytes == test_ledger.predicted_safetensors_bytes(shapes)
    assert result.final["global_acc"] is not None  # one global model: the seeded A, averaged B and head


def test_scale_is_ten_times_lora_alpha_over_r(ffa_run, tiny_prep):
    sim = ffa_run[0]
    m = sim.cfg.method
    assert m.ffa_alpha_factor == 10  # the paper's 10x learning rate, by default
    assert all(layer.scale_g == pytest.approx(10 * m.alpha_g / m.r_g) for layer in sim.model.layers.values())
    cfg = tiny_config("ffa", method={"ffa_alpha_factor": 1.0})
    model = METHODS["ffa"](cfg).build(tiny_prep.backbone)
    assert all(layer.scale_g == pytest.approx(m.alpha_g / m.r_g) for layer in model.layers.values())
