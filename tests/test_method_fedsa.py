"""FedSA-LoRA: only the A matrices travel, the server averages them by example count, B and head stay home."""

from __future__ import annotations

import pytest
import torch

import test_ledger
from fedslip.federation import inprocess as simulation
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS

from conftest import tiny_config


def bert_lora_a_shapes(prep, r: int) -> dict[str, tuple[int, int]]:
    """LoRA A (r × d_in) of query and value in every layer of the tiny BERT: FedSA's whole payload."""
    cfg = prep.backbone.model.config
    return {f"bert.encoder.layer.{i}.attention.self.{proj}.g_A": (r, cfg.hidden_size)
            for i in range(cfg.num_hidden_layers) for proj in ("query", "value")}


def run_capturing(prep, method_name: str, **sections):
    """Run a tiny federation to the end; return (sim, result, every payload encoded, every aggregation).

    An aggregation is (uploads with their example counts, the server state the method returned).
    """
    sent, aggregations = [], []
    real_encode = simulation.encode

    def spy(payload):
        sent.append({k: v.clone() for k, v in payload.items()})
        return real_encode(payload)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulation, "encode", spy)
        sim = Simulation(prep, METHODS[method_name](tiny_config(method_name, **sections)))
        real_aggregate = sim.method.aggregate

        def aggregate(ups, glob, rnd, participants):
            out = real_aggregate(ups, glob, rnd, participants)
            aggregations.append(([({k: v.clone() for k, v in p.items()}, n) for p, n in ups],
                                 {k: v.clone() for k, v in out.items()}))
            return out

        sim.method.aggregate = aggregate
        result, _ = sim.run()
    return sim, result, sent, aggregations


@pytest.fixture(scope="module")
def fedsa_run(tiny_prep):
    """The 2-round run, plus the B each client's model was loaded with at the start of each local update."""
    loaded_b = []
    cls = METHODS["fedsa"]
    real = cls.local_update

    def spy(self, model, down, client, data, rnd):
        view = self.client_view(model, down, client)  # exactly what local_update loads
        loaded_b.append({n: t.clone() for n, t in view.items() if n.endswith(".g_B")})
        return real(self, model, down, client, data, rnd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "local_update", spy)
        run = run_capturing(tiny_prep, "fedsa")
    return (*run, loaded_b)


def test_no_b_and_no_head_ever_in_a_payload(fedsa_run):
    sim, _, sent, _, _ = fedsa_run
    model = sim.model
    assert sent and all(sent)
    for payload in sent:
        assert all(n.endswith(".g_A") for n in payload), f"non-A tensors sent: {sorted(payload)}"
        assert not set(payload) & set(model.head_names)
    # by value: every client's B trained (non-zero, personal) and none of them was ever transmitted
    bs = [{n: t for n, t in c.tensors.items() if n.endswith(".g_B")} for c in sim.clients]
    assert all(bs) and all(t.abs().sum() > 0 for b in bs for t in b.values())
    assert not torch.equal(next(iter(bs[0].values())), next(iter(bs[1].values())))
    for payload in sent:
        for t in payload.values():
            for b in bs:
                assert not any(p.shape == t.shape and torch.equal(p, t) for p in b.values())


def test_aggregated_a_is_the_example_weighted_mean_of_uploads(tiny_prep, fedsa_run):
    sim, _, sent, aggregations, _ = fedsa_run
    names = list(bert_lora_a_shapes(tiny_prep, sim.cfg.method.r_g))
    n_clients = len(tiny_prep.split.train)
    assert len(aggregations) == sim.cfg.train.rounds
    for rnd, (ups, glob) in enumerate(aggregations, start=1):
        assert [n for _, n in ups] == [len(idx) for idx in tiny_prep.split.train]
        total = sum(n for _, n in ups)
        assert set(glob) == set(names)
        for name in names:
            expected = sum(p[name].double() * n for p, n in ups) / total
            torch.testing.assert_close(glob[name].double(), expected, rtol=0, atol=1e-6)
            assert not torch.equal(ups[0][0][name], ups[1][0][name])  # clients really differed
        if rnd < len(aggregations):  # what the server sends next round is exactly that mean
            downs = sent[2 * n_clients * rnd::2][:n_clients]
            assert all(torch.equal(d[n], glob[n]) for d in downs for n in names)


def test_each_client_resumes_from_its_own_b(tiny_prep, fedsa_run):
    sim, _, _, _, loaded_b = fedsa_run
    n = len(tiny_prep.split.train)
    assert len(loaded_b) == 2 * n
    for k in range(n):
        assert all(t.abs().sum() == 0 for t in loaded_b[k].values())  # round 1: B = 0
        assert loaded_b[n + k] and all(t.abs().sum() > 0 for t in loaded_b[n + k].values())
        # round 2 starts from the B this client ended round 1 with (not another client's, not zero)
        assert not torch.equal(next(iter(loaded_b[n + k].values())), next(iter(loaded_b[n + (k + 1) % n].values())))
    final = {n_: t for n_, t in sim.clients[0].tensors.items() if n_.endswith(".g_B")}
    assert not all(torch.equal(final[n_], loaded_b[n][n_]) for n_ in final)  # and kept training in round 2


def test_aggregate_weights_by_example_count():
    method = METHODS["fedsa"](tiny_config("fedsa"))
    a1, a2 = torch.randn(2, 5), torch.randn(2, 5)
    out = method.aggregate([({"l.g_A": a1}, 1), ({"l.g_A": a2}, 3)], {}, 1, [0, 1])
    torch.testing.assert_close(out["l.g_A"], (a1 + 3 * a2) / 4)


def test_payload_is_sum_of_r_times_d_in_over_adapted_layers(tiny_prep, fedsa_run):
    sim, result, _, _, _ = fedsa_run
    cfg, ledger = sim.cfg, sim.ledger
    shapes = bert_lora_a_shapes(tiny_prep, cfg.method.r_g)
    n_params = sum(r * d_in for r, d_in in shapes.values())
    hidden = tiny_prep.backbone.model.config.hidden_size
    assert n_params == len(shapes) * cfg.method.r_g * hidden
    assert len(ledger.rows()) == 2 * len(tiny_prep.split.train) * cfg.train.rounds
    for e in ledger.rows():
        assert e.n_params == n_params
        assert e.bytes == test_ledger.predicted_safetensors_bytes(shapes)
    # no global model exists (every B is personal): personalised accuracy only
    assert result.final["global_acc"] is None
    assert all(c.personal_acc is not None for c in result.clients)
