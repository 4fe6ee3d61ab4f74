"""FLoRAL: K federated adaptors mixed by private mixture weights; the server weights adaptor c by n_i·π_ic.

Defining properties: the mixture weights never leave the client (no tensor of them, nor a load from which
they can be read, is sent); the server's adaptor c is the n_i·π_ic-weighted mean of the clients' adaptors;
K = 1 is FedAvg + LoRA to float precision.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedslip.cli import main
from fedslip.federation import inprocess as simulation
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS
from fedslip.methods.floral import COHORT, FRAC_BITS, LOAD, FLoRAL

from conftest import tiny_config

K = 3


def capture(monkeypatch, sim):
    """Record every encoded payload, and after each local update the client's π, n and trained adaptors."""
    sent, updates = [], []
    real_encode, real_update = simulation.encode, sim.method.local_update

    def spy_encode(payload):
        sent.append({k: v.clone() for k, v in payload.items()})
        return real_encode(payload)

    def spy_update(model, down, client, data, rnd):
        up, client, metrics = real_update(model, down, client, data, rnd)
        logits = client.tensors[FLoRAL.router_name(model)]
        updates.append({"cid": data.cid, "rnd": rnd, "n": len(data), "logits": logits.clone(),
                        "pi": torch.softmax(logits, -1), "adaptors": model.read(FLoRAL.adaptor_names(model))})
        return up, client, metrics

    monkeypatch.setattr(simulation, "encode", spy_encode)
    monkeypatch.setattr(sim.method, "local_update", spy_update)
    return sent, updates


@pytest.fixture(scope="module")
def floral_run(tiny_prep):
    mp = pytest.MonkeyPatch()
    sim = Simulation(tiny_prep, METHODS["floral"](tiny_config("floral", method={"n_adaptors": K})))
    sent, updates = capture(mp, sim)
    result, ledger = sim.run()
    mp.undo()
    return sim, sent, updates, result, ledger


def test_k1_is_fedavg_with_lora(tiny_prep):
    fedavg = Simulation(tiny_prep, METHODS["fedavg"](tiny_config("fedavg", method={"kstep": False})))
    floral = Simulation(tiny_prep, METHODS["floral"](tiny_config("floral", method={"n_adaptors": 1})))
    for rnd in (1, 2):
        fedavg.run_round(rnd)
        floral.run_round(rnd)
    assert set(floral.glob) == {n.replace(".g_", ".mix_") for n in fedavg.glob} | {COHORT}
    for name, expected in fedavg.glob.items():
        got = floral.glob[name.replace(".g_", ".mix_")]
        if ".mix_" in name.replace(".g_", ".mix_"):
            assert got.shape == (1, *expected.shape)
            got = got[0]
        assert expected.abs().max() > 0  # it trained (B starts at zero)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_mixture_weights_never_leave_the_client(floral_run):
    sim, sent, updates, _, _ = floral_run
    model = sim.model
    router = FLoRAL.router_name(model)
    allowed = set(FLoRAL.adaptor_names(model)) | set(model.head_names) | {LOAD, COHORT}
    assert sent and all(set(p) <= allowed and router not in p for p in sent)
    secrets = [u[key] * scale for u in updates for key, scale in (("logits", 1), ("pi", 1), ("pi", u["n"]))]
    for payload in sent:
        for name, t in payload.items():
            if t.numel() == K and t.is_floating_point():
                for s in secrets:
                    assert not torch.allclose(t.flatten(), s, atol=1e-3), f"{name} carries a mixture"
    # the loads are masked: alone each reads as noise, yet each round's masked loads sum to Σ_i n_i·π_i
    ups = [p for p in sent if LOAD in p]
    assert len(ups) == len(updates)
    for up, u in zip(ups, updates):
        assert up[LOAD].dtype == torch.int64 and up[LOAD].shape == (K,)
        alone = up[LOAD].numpy().view(np.uint64).astype(np.float64) / 2.0**FRAC_BITS
        assert np.abs(alone - (u["n"] * u["pi"]).double().numpy()).min() > 1.0, "load sent unmasked"
    for rnd in (1, 2):
        masked = [up[LOAD] for up, u in zip(ups, updates) if u["rnd"] == rnd]
        expected = sum(u["n"] * u["pi"].double() for u in updates if u["rnd"] == rnd)
        torch.testing.assert_close(FLoRAL.unmask_sum(masked), expected, rtol=0, atol=1e-6)


def test_server_weights_each_adaptor_by_the_clients_mixtures(tiny_prep, monkeypatch):
    sim = Simulation(tiny_prep, METHODS["floral"](tiny_config("floral", method={"n_adaptors": K})))
    router = FLoRAL.router_name(sim.model)
    for k, client in enumerate(sim.clients):  # clearly different private mixtures
        client.tensors[router] = torch.tensor([3.0 * (k % K == c) for c in range(K)]) + 0.1 * k
    _, updates = capture(monkeypatch, sim)
    sim.run_round(1)
    n = np.array([u["n"] for u in updates], dtype=np.float64)
    pi = np.stack([u["pi"].double().numpy() for u in updates])  # (clients, K)
    w = n[:, None] * pi / (n[:, None] * pi).sum(0)  # w[i, c]
    separated = False
    for name in FLoRAL.adaptor_names(sim.model):
        theta = np.stack([u["adaptors"][name].double().numpy() for u in updates])  # (clients, K, ...)
        expected = np.einsum("ic,ic...->c...", w, theta)
        np.testing.assert_allclose(sim.glob[name].numpy(), expected, rtol=1e-5, atol=1e-7)
        fedavg = np.einsum("i,ic...->c...", n / n.sum(), theta)
        separated |= np.abs(expected - fedavg).max() > 1e-4
    assert separated, "mixtures too similar for this test to tell π-weighting from FedAvg"


def test_mixtures_are_learned_privately_and_used_for_personalization(floral_run):
    sim, _, _, result, _ = floral_run
    model = sim.model
    router = FLoRAL.router_name(model)
    logits = [c.tensors[router] for c in sim.clients]
    assert all(lg.abs().max() > 0 for lg in logits), "mixture logits did not train"
    assert not torch.equal(logits[0], logits[1])
    view_g = sim.method.global_view(model, sim.glob, sim.clients[0])
    view_p = sim.method.personal_view(model, sim.glob, sim.clients[0])
    assert torch.equal(view_g[router], torch.zeros(K)) and torch.equal(view_p[router], logits[0])
    assert result.rounds[-1].personal_acc is not None


def safetensors_bytes(specs: dict[str, tuple[str, int, tuple[int, ...]]]) -> int:
    """8-byte length + compact JSON header padded to 8 + raw data, laid out wider dtypes first, then by name.

    specs: name -> (safetensors dtype, bytes per element, shape)."""
    header, offset = {}, 0
    for name in sorted(specs, key=lambda n: (-specs[n][1], n)):
        dtype, size, shape = specs[name]
        n = size * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-len(text) % 8)
    return 8 + len(text) + offset


def test_ledger_matches_payload_formula(floral_run, tiny_prep):
    sim, _, _, _, ledger = floral_run
    cfg, net = sim.cfg, tiny_prep.backbone.model.config
    h, r, c = net.hidden_size, cfg.method.r_g, tiny_prep.data.num_classes
    down = {"classifier.weight": ("F32", 4, (c, h)), "classifier.bias": ("F32", 4, (c,))}
    for i in range(net.num_hidden_layers):
        for proj in ("query", "value"):
            base = f"bert.encoder.layer.{i}.attention.self.{proj}"
            down[f"{base}.mix_A"] = ("F32", 4, (K, r, h))
            down[f"{base}.mix_B"] = ("F32", 4, (K, h, r))
    up = {**down, LOAD: ("I64", 8, (K,))}
    n_up = net.num_hidden_layers * 2 * K * r * (h + h) + c * h + c  # K·r·(d_in + d_out) per layer + head
    n_clients = len(tiny_prep.split.train)
    down[COHORT] = ("I64", 8, (n_clients,))  # the round's cohort, announced for the secure aggregation
    assert len(ledger.rows()) == 2 * n_clients * cfg.train.rounds
    for e in ledger.rows():
        if e.direction == "down":
            assert (e.bytes, e.n_params, e.dtypes) == (safetensors_bytes(down), n_up + n_clients, "float32+int64")
        else:
            assert (e.bytes, e.n_params, e.dtypes) == (safetensors_bytes(up), n_up + K, "float32+int64")


def test_cli_tiny_run(tmp_path):
    sets = ['data.source="synthetic"', "data.synthetic_per_class=40", "partition.n_train=24", "partition.n_test=12",
            "partition.n_global_test=6", 'model.backbone="tiny-random:bert"', "model.max_length=24",
            "train.rounds=2", "train.batch_size=8"]
    out = tmp_path / "floral"
    assert main(["run", "--method", "floral", "--quiet", "--out", str(out),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert "floral" in doc["methods"]
