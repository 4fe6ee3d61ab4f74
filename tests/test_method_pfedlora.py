"""pFedLoRA: clients of different depths share one small adapter, trained alternately with a local model.

Defining properties: heterogeneous clients (here depths 1 and 2 of the tiny 2-layer BERT) run in one
federation, each forward pass running only its client's layers; only the adapter (LoRA on the layers all
clients share) is in payloads and averaged; each round trains the adapter with the local model frozen,
then the local model with the adapter frozen.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedslip.cli import main
from fedslip.errors import UserError
from fedslip.federation import inprocess as simulation
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS
from fedslip.methods import pfedlora as pfedlora_module
from fedslip.model.backbone import load_backbone
from fedslip.model.depth import DEPTH, layer_list_path, truncated

from conftest import tiny_config

LAYERS = [1, 2]  # client k has depth LAYERS[k % 2]: 1, 2, 1, 2


def blocks(model):
    return model.net.get_submodule(model.layer_path)


@pytest.fixture(scope="module")
def run(tiny_prep):
    """A tiny federation; every payload, and which blocks ran for which client in training."""
    mp = pytest.MonkeyPatch()
    sim = Simulation(tiny_prep, METHODS["pfedlora"](tiny_config("pfedlora", method={"client_layers": LAYERS})))
    start = [dict(c.tensors) for c in sim.clients]
    sent, ran, current = [], {}, {}
    real_encode, real_update = simulation.encode, sim.method.local_update

    def spy_encode(payload):
        sent.append({k: v.clone() for k, v in payload.items()})
        return real_encode(payload)

    def spy_update(model, down, client, data, rnd):
        current["cid"] = data.cid
        try:
            return real_update(model, down, client, data, rnd)
        finally:
            current.pop("cid")

    def hook(i):
        def record(module, args, output):
            if "cid" in current:
                ran.setdefault(current["cid"], set()).add(i)
        return record

    for i, block in enumerate(blocks(sim.model)):
        block.register_forward_hook(hook(i))
    mp.setattr(simulation, "encode", spy_encode)
    mp.setattr(sim.method, "local_update", spy_update)
    result, ledger = sim.run()
    mp.undo()
    return sim, start, sent, ran, result, ledger


def test_heterogeneous_depths_run_in_one_federation(run):
    sim, start, _, ran, result, _ = run
    model = sim.model
    assert sim.method.depths() == [1, 2, 1, 2] and sim.method.shared_depth() == 1
    assert ran == {0: {0}, 1: {0, 1}, 2: {0}, 3: {0, 1}}, "a client ran layers it does not have"
    for k, client in enumerate(sim.clients):
        depth = LAYERS[k % 2]
        assert int(client.tensors[DEPTH]) == depth
        private = {n for n in client.tensors if n in model.private_names}
        assert private and all(int(n.split("layer.")[1].split(".")[0]) < depth for n in private)
        assert all(not torch.equal(client.tensors[n], start[k][n]) for n in private if n.endswith("p_B"))
    # evaluation loads the depth with the view: a depth-1 client's model never runs layer 1
    calls = []
    handle = blocks(model)[1].register_forward_hook(lambda *a: calls.append(1))
    batch = next(iter(sim.prep.test.eval_batches(sim.prep.split.test[0], 8)))
    model.load(sim.method.personal_view(model, sim.glob, sim.clients[0]))
    model.logits(batch.input_ids, batch.attention_mask)
    assert not calls
    model.load(sim.method.personal_view(model, sim.glob, sim.clients[1]))
    model.logits(batch.input_ids, batch.attention_mask)
    handle.remove()
    assert calls
    assert all(a is not None for a in result.rounds[-1].personal_acc)
    assert sim.method.global_view(model, sim.glob, sim.clients[0]) is None and result.final["global_acc"] is None


def test_only_the_shared_adapter_is_sent_and_averaged(run, tiny_prep):
    sim, _, sent, _, _, _ = run
    model = sim.model
    adapter = {f"bert.encoder.layer.0.attention.self.{p}.g_{m}" for p in ("query", "value") for m in "AB"}
    assert set(model.global_names) == adapter  # LoRA on layer 0 only: the one layer every client has
    assert sent and all(set(p) == adapter for p in sent)
    privates = [t for c in sim.clients for n, t in c.tensors.items() if n != DEPTH]
    for payload in sent:
        for t in payload.values():
            assert not any(p.shape == t.shape and torch.equal(p, t) for p in privates)
    # the heads stay local: trained, and different on each client
    heads = [sim.clients[k].tensors["classifier.weight"] for k in range(4)]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], model.head_init["classifier.weight"])


def test_server_averages_the_adapters(tiny_prep, monkeypatch):
    sim = Simulation(tiny_prep, METHODS["pfedlora"](tiny_config("pfedlora", method={"client_layers": LAYERS})))
    seen, real = {}, sim.method.aggregate

    def spy(ups, glob, rnd, participants):
        seen["ups"] = ups
        return real(ups, glob, rnd, participants)

    monkeypatch.setattr(sim.method, "aggregate", spy)
    sim.run_round(1)
    ups = seen["ups"]
    total = sum(n for _, n in ups)
    for name in ups[0][0]:
        expected = sum(p[name].double().numpy() * n for p, n in ups) / total
        np.testing.assert_allclose(sim.glob[name].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_each_round_trains_local_model_then_adapter(tiny_prep, monkeypatch):
    """The paper's order: the local model first, against the received global adapter (frozen), then the
    adapter against the trained local model (frozen); the adapter uploaded is the one phase 2 left."""
    sim = Simulation(tiny_prep, METHODS["pfedlora"](tiny_config("pfedlora", method={"client_layers": LAYERS})))
    model, method = sim.model, sim.method
    adapter = model.global_names
    local = method.local_names(model, 2)
    steps = []
    real_step = pfedlora_module.sgd_step

    def spy_step(m, batch, names, opt, clip, **kw):
        steps.append((list(names), m.read(adapter), m.read(local)))
        return real_step(m, batch, names, opt, clip, **kw)

    monkeypatch.setattr(pfedlora_module, "sgd_step", spy_step)
    client, down = sim.clients[1], method.down_payload(sim.glob, 1)
    up, client, _ = method.local_update(model, down, client, sim.client_data(1, 1), 1)
    n = len(sim.client_data(1, 1).epoch())
    assert len(steps) == 2 * n
    states = [(a, loc) for _, a, loc in steps] + [(model.read(adapter), model.read(local))]  # before each step, end
    for a, loc in states[:n + 1]:  # through the local phase the adapter stays the received one
        assert all(torch.equal(a[k], down[k]) for k in adapter)
    for a, loc in states[n:]:  # through the adapter phase the local model does not move
        assert all(torch.equal(loc[k], client.tensors[k]) for k in local)
    assert all(torch.equal(states[-1][0][k], up[k]) for k in adapter)
    assert any(not torch.equal(up[k], down[k]) for k in adapter), "adapter did not train"
    assert any(not torch.equal(states[n][1][k], states[0][1][k]) for k in local), "local model did not train"
    assert [names for names, _, _ in steps] == [local] * n + [adapter] * n


def test_ledger_matches_payload_formula(run, tiny_prep):
    from test_ledger import predicted_safetensors_bytes

    sim, _, _, _, _, ledger = run
    h, r = tiny_prep.backbone.model.config.hidden_size, sim.cfg.method.r_g
    shapes = {}
    for proj in ("query", "value"):  # r·(d_in + d_out) per adapted projection of the L_min = 1 shared layers
        shapes[f"bert.encoder.layer.0.attention.self.{proj}.g_A"] = (r, h)
        shapes[f"bert.encoder.layer.0.attention.self.{proj}.g_B"] = (h, r)
    n_clients = len(tiny_prep.split.train)
    assert len(ledger.rows()) == 2 * n_clients * sim.cfg.train.rounds
    for e in ledger.rows():
        assert (e.bytes, e.n_params, e.dtypes) == (predicted_safetensors_bytes(shapes), 2 * r * (h + h), "float32")


@pytest.mark.parametrize("kind,path", [("bert", "bert.encoder.layer"), ("distilbert", "distilbert.transformer.layer")])
def test_truncation_runs_a_prefix_and_restores(kind, path):
    net = load_backbone(f"tiny-random:{kind}", 3, 0).model
    assert layer_list_path(net) == path
    full = net.get_submodule(path)
    ids, mask = torch.tensor([[101, 2000, 2001, 102]]), torch.ones(1, 4, dtype=torch.long)
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(full)]
    with truncated(net, path, 1):
        assert len(net.get_submodule(path)) == 1
        short = net(input_ids=ids, attention_mask=mask).logits
    assert calls == [0] and net.get_submodule(path) is full
    calls.clear()
    deep = net(input_ids=ids, attention_mask=mask).logits
    assert calls == [0, 1] and not torch.allclose(short, deep)
    for h in hooks:
        h.remove()


def test_default_depths_clamp_to_the_backbone_and_head_must_be_local(tiny_prep):
    method = METHODS["pfedlora"](tiny_config("pfedlora"))
    method.build(tiny_prep.backbone)
    assert method.depths() == [2, 2, 2, 2]  # [3, 4, 6, 6] on a 2-layer backbone
    with pytest.raises(UserError, match="local"):
        METHODS["pfedlora"](tiny_config("pfedlora", method={"head": "shared"}))


def test_cli_tiny_run(tmp_path):
    sets = ['data.source="synthetic"', "data.synthetic_per_class=40", "partition.n_train=24", "partition.n_test=12",
            "partition.n_global_test=6", 'model.backbone="tiny-random:bert"', "model.max_length=24",
            "train.rounds=2", "train.batch_size=8", "method.client_layers=[1, 2]"]
    out = tmp_path / "pfedlora"
    assert main(["run", "--method", "pfedlora", "--quiet", "--out", str(out),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert "pfedlora" in doc["methods"]


def test_personal_model_uses_the_adapter_the_client_trained_with(run):
    """The client's adapter was fitted to its local model (phase 2), so the personalized model is evaluated
    with that adapter, the one it uploaded last, not the new average."""
    sim, _, sent, _, _, _ = run
    last_ups = sent[-3 * 4 + 1:-4:2]  # the last round's payloads: down, up per client, then 4 evaluation downloads
    for k, client in enumerate(sim.clients):
        view = sim.method.personal_view(sim.model, sim.glob, client)
        assert set(last_ups[k]) == set(sim.model.global_names)
        for name, t in last_ups[k].items():
            assert torch.equal(view[name], t), (k, name)
            assert not torch.equal(view[name], sim.glob[name]), (k, name)
