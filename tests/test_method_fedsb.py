"""Fed-SB: A and B fixed and common, only R (r × r) trains and is averaged — which averages the updates exactly."""

from __future__ import annotations

import copy
import json

import numpy as np
import torch
import torch.nn.functional as F

import test_ledger
from fedslip.cli import main
from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS

from test_cli import sets as tiny_sets
from conftest import head_shapes, layers, tiny_config


def spy_aggregate(sim) -> list:
    captured = []
    real = sim.method.aggregate

    def spy(ups, glob, rnd, participants):
        captured.append([({k: v.clone() for k, v in p.items()}, n) for p, n in ups])
        return real(ups, glob, rnd, participants)

    sim.method.aggregate = spy
    return captured


def test_rank_is_eight_times_r_g_capped_at_the_layer(tiny_prep):
    hidden = tiny_prep.backbone.model.config.hidden_size  # 32
    for r_g, want in ((2, 16), (8, min(64, hidden))):
        model = METHODS["fedsb"](tiny_config("fedsb", method={"r_g": r_g})).build(tiny_prep.backbone)
        assert {layer.rank for layer in model.layers.values()} == {want}
        assert all(model.read([f"{n}.sb_R"])[f"{n}.sb_R"].shape == (want, want) for n in model.layers)


def test_averaging_r_averages_the_updates_exactly_and_a_b_stay_common_and_fixed(tiny_prep):
    cfg = tiny_config("fedsb", train={"rounds": 2})
    sim = Simulation(tiny_prep, METHODS["fedsb"](cfg))
    captured = spy_aggregate(sim)
    for rnd in (1, 2, 3):  # setup, then two training rounds
        sim.run_round(rnd)
    for rnd_ups in captured[1:]:
        total = sum(n for _, n in rnd_ups)
        assert [n for _, n in rnd_ups] == [len(idx) for idx in tiny_prep.split.train]
        for p, _ in rnd_ups:  # only R (and the shared head) is uploaded
            assert {k for k in p if not k.startswith("classifier")} == {f"{l}.sb_R" for l in layers(tiny_prep)}
    ups = captured[2]
    for layer in layers(tiny_prep):
        # every client's update with the A, B it holds; their example-weighted mean ...
        updates = []
        for k, (p, n) in enumerate(ups):
            a, b = sim.clients[k].tensors[f"{layer}.sb_A"], sim.clients[k].tensors[f"{layer}.sb_B"]
            updates.append((n / total) * (b.double() @ p[f"{layer}.sb_R"].double() @ a.double()))
        mean_update = sum(updates)
        # ... is the global model's update B R̄ A, R̄ being the averaged R
        glob = sim.glob
        global_update = glob[f"{layer}.sb_B"].double() @ glob[f"{layer}.sb_R"].double() @ glob[f"{layer}.sb_A"].double()
        torch.testing.assert_close(global_update, mean_update, rtol=1e-5, atol=1e-9)
        assert not torch.equal(ups[0][0][f"{layer}.sb_R"], ups[1][0][f"{layer}.sb_R"])  # clients differed
        # A and B: identical on every client and the server, never trained
        for c in sim.clients:
            assert torch.equal(c.tensors[f"{layer}.sb_A"], glob[f"{layer}.sb_A"])
            assert torch.equal(c.tensors[f"{layer}.sb_B"], glob[f"{layer}.sb_B"])
    layer = sim.model.layers[layers(tiny_prep)[0]]  # A and B are buffers (nothing trains them), R a parameter
    buffers, params = dict(layer.named_buffers()), dict(layer.named_parameters())
    assert {"sb_A", "sb_B"} <= set(buffers) and not {"sb_A", "sb_B"} & set(params)
    assert "sb_R" in params


def test_aggregate_weights_r_by_example_count():
    """Unequal counts (the tiny federation's clients are all the same size): B R̄ A = Σ p_k B R_k A."""
    method = METHODS["fedsb"](tiny_config("fedsb", method={"head": "frozen"}))
    gen = torch.Generator().manual_seed(0)
    a, b = torch.linalg.qr(torch.randn(5, 3, generator=gen))[0].T, torch.linalg.qr(torch.randn(6, 3, generator=gen))[0]
    glob = {"l.sb_A": a, "l.sb_B": b, "l.sb_R": torch.zeros(3, 3), "fedsb.round": torch.tensor(1)}
    ups = [({"l.sb_R": torch.randn(3, 3, generator=gen)}, n) for n in (1, 3, 4)]
    out = method.aggregate(ups, glob, 2, [0, 1, 2])
    want = sum(n / 8 * (b.double() @ p["l.sb_R"].double() @ a.double()) for p, n in ups)
    torch.testing.assert_close(out["l.sb_B"].double() @ out["l.sb_R"].double() @ out["l.sb_A"].double(), want,
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(out["l.sb_A"], a) and torch.equal(out["l.sb_B"], b)


def independent_gradient_sum(prep, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """Σ over the examples of ∂CE/∂W0 of query/value, all in one batch, on a fresh copy of the backbone."""
    net = copy.deepcopy(prep.backbone.model).eval()
    weights = {n.removesuffix(".weight"): p for n, p in net.named_parameters()
               if n.endswith(("query.weight", "value.weight"))}
    for p in weights.values():
        p.requires_grad_(True)
    batch = prep.train.batch(idx)
    logits = net(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    F.cross_entropy(logits, batch.labels, reduction="sum").backward()
    return {n: p.grad.detach().clone() for n, p in weights.items()}


def test_setup_round_is_lora_sb_init_from_the_pooled_client_gradients(tiny_prep):
    cfg = tiny_config("fedsb")
    sim = Simulation(tiny_prep, METHODS["fedsb"](cfg))
    captured = spy_aggregate(sim)
    sim.run_round(1)
    ups = captured[0]
    r = 8 * cfg.method.r_g
    for k, (p, _) in enumerate(ups):  # each client sent the sum of its examples' full-weight gradients
        want = independent_gradient_sum(tiny_prep, tiny_prep.split.train[k])
        assert set(p) == {f"{l}.grad" for l in layers(tiny_prep)}
        for layer in layers(tiny_prep):
            torch.testing.assert_close(p[f"{layer}.grad"], want[layer], rtol=1e-4, atol=1e-5)
    for layer in layers(tiny_prep):
        pooled = sum(p[f"{layer}.grad"].double().numpy() for p, _ in ups)
        delta = -cfg.train.lr * np.sign(pooled)  # Adam's first step, the paper's ΔW estimate
        u, s, vt = np.linalg.svd(delta)
        best = (u[:, :r] * s[:r]) @ vt[:r]  # its best rank-r approximation
        a, b, rr = (sim.glob[f"{layer}.{n}"].double().numpy() for n in ("sb_A", "sb_B", "sb_R"))
        np.testing.assert_allclose(b @ rr @ a, best, rtol=0, atol=1e-6 * np.abs(best).max())
        np.testing.assert_allclose(b.T @ b, np.eye(r), atol=1e-5)  # orthonormal bases
        np.testing.assert_allclose(a @ a.T, np.eye(r), atol=1e-5)
        np.testing.assert_allclose(rr, np.diag(s[:r]), rtol=1e-5, atol=1e-9)  # R = S_r
        assert np.abs(best).max() > 0


def test_ledger_matches_payload_formula(tiny_prep):
    cfg = tiny_config("fedsb")
    result, ledger = Simulation(tiny_prep, METHODS["fedsb"](cfg)).run()
    hidden, r = tiny_prep.backbone.model.config.hidden_size, 8 * cfg.method.r_g
    n_layers, n_clients = len(layers(tiny_prep)), len(tiny_prep.split.train)
    head = head_shapes(tiny_prep)
    r_only = {f"{l}.sb_R": (r, r) for l in layers(tiny_prep)}
    basis = {**{f"{l}.sb_A": (r, hidden) for l in layers(tiny_prep)},
             **{f"{l}.sb_B": (hidden, r) for l in layers(tiny_prep)}}
    grads = {f"{l}.grad": (hidden, hidden) for l in layers(tiny_prep)}
    assert len(result.rounds) == cfg.train.rounds + 1  # the setup round, then train.rounds
    assert len(ledger.rows()) == 2 * n_clients * (cfg.train.rounds + 1)
    head_n = sum(torch.Size(s).numel() for s in head.values())
    for e in ledger.rows():
        if e.round == 1 and e.direction == "down":  # setup: nothing to send
            assert e.bytes == 0 and e.n_params == 0
            continue
        if e.round == 1:  # setup: the gradient sum, d_out·d_in per layer
            shapes, n = grads, n_layers * hidden * hidden
        elif e.round == 2 and e.direction == "down":  # first training round: A, B once, with R and the head
            shapes, n = {**r_only, **basis, **head}, n_layers * (r * r + 2 * r * hidden) + head_n
        else:  # every other transfer: r² per adapted layer + the shared head
            shapes, n = {**r_only, **head}, n_layers * r * r + head_n
        assert e.n_params == n
        assert e.bytes == test_ledger.predicted_safetensors_bytes(shapes)
        assert e.dtypes == "float32"


def test_partial_participation_a_b_sent_once_per_client_and_client_side_view(tiny_prep, monkeypatch):
    """A client gets A, B in its first training round, never again; from what it holds plus a down payload
    a client rebuilds exactly the server's global model (what a client-side evaluation, e.g. Flower, sees)."""
    from fedslip.federation.protocol import select_clients

    cfg = tiny_config("fedsb", train={"rounds": 2, "client_fraction": 0.5})
    sim = Simulation(tiny_prep, METHODS["fedsb"](cfg))
    sent = []
    real = sim.method.down_payload
    monkeypatch.setattr(sim.method, "down_payload",
                        lambda glob, cid: sent.append((cid, real(glob, cid))) or sent[-1][1])
    got_basis = set()
    for rnd in (1, 2, 3):  # seed 0 selects [1, 2], [1, 3], [1, 2]: client 2 first trains in round 3
        sent.clear()
        sim.run_round(rnd)
        selected = select_clients(4, 0.5, cfg.train.seed, rnd)
        train_downs = sent[:len(selected)]  # then the previous round's evaluation-only downloads
        assert [cid for cid, _ in train_downs] == selected
        for cid, down in train_downs:
            has_basis = any(k.endswith(".sb_A") for k in down)
            assert has_basis == (rnd > 1 and cid not in got_basis), (rnd, cid)
            if has_basis:
                got_basis.add(cid)
        for k, client in enumerate(sim.clients):
            server = sim.method.global_view(sim.model, sim.glob, client)
            on_client = sim.method.global_view(sim.model, real(sim.glob, k), client)
            assert server.keys() == on_client.keys()
            assert all(torch.equal(server[n], on_client[n]) for n in server)
    assert got_basis == {1, 2, 3}


def test_cli_tiny_run(tmp_path):
    out = tmp_path / "fedsb"
    rc = main(["run", "--method", "fedsb", "--quiet", "--out", str(out), *tiny_sets([])])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert "fedsb" in doc["methods"]


def test_setup_uploads_are_not_norm_checked_but_later_uploads_are(tiny_prep):
    """A setup upload is a gradient sum over a client's examples, not a change of the global state: a bound
    meant for R's change must not reject it (nor pass it silently later)."""
    sums = Simulation(tiny_prep, METHODS["fedsb"](tiny_config("fedsb")))
    captured = spy_aggregate(sums)
    sums.run_round(1)
    grad_norm = min(float(torch.cat([t.flatten() for t in p.values()]).norm()) for p, _ in captured[0])
    cfg = tiny_config("fedsb", train={"rounds": 2, "max_update_norm": grad_norm / 10})
    sim = Simulation(tiny_prep, METHODS["fedsb"](cfg))
    first = sim.run_round(1)
    assert first.participants == [0, 1, 2, 3] and first.rejected == []
    assert any(k.endswith(".sb_A") for k in sim.glob)
    tight = tiny_config("fedsb", train={"rounds": 2, "max_update_norm": 1e-12})
    sim = Simulation(tiny_prep, METHODS["fedsb"](tight))
    sim.run_round(1)
    assert sim.run_round(2).rejected == [0, 1, 2, 3]  # R's change is checked: every upload exceeds 1e-12


def test_no_setup_upload_means_another_setup_round(tiny_prep, capsys):
    """Every client failing the setup round must not leave R training between A = B = 0 for the rest of the
    run (a zero gradient, silently): the next round is a setup round, with a warning."""
    cfg = tiny_config("fedsb", train={"rounds": 2, "failures": [[1, c] for c in range(4)]})
    sim = Simulation(tiny_prep, METHODS["fedsb"](cfg))
    captured = spy_aggregate(sim)
    sim.run_round(1)
    assert captured == [] and not any(k.endswith(".sb_A") for k in sim.glob)
    sim.run_round(2)
    assert set(captured[0][0][0]) == {f"{l}.grad" for l in layers(tiny_prep)}  # round 2 sent gradients
    assert "a setup round again" in capsys.readouterr().err
    sim.run_round(3)
    r_up = captured[1][0][0]
    assert any(k.endswith(".sb_R") for k in r_up)
    assert all(not torch.equal(sim.glob[k], torch.zeros_like(sim.glob[k])) for k in r_up if k.endswith(".sb_R"))


def test_gradient_sum_in_fp32_for_a_bf16_backbone(tiny_prep):
    """Where the frozen weights are bf16, the setup's sum over a client's batches is still taken in fp32:
    exactly the fp32 sum of the per-batch bf16 gradients (a bf16 .grad would round the running sum)."""
    from fedslip.model.lora_sb import full_weight_grads
    from test_placement import placed

    model = METHODS["fedsb"](tiny_config("fedsb")).build(placed(tiny_prep).backbone)
    assert next(iter(model.layers.values())).base.weight.dtype == torch.bfloat16
    batches = list(tiny_prep.train.eval_batches(tiny_prep.split.train[0], 2))
    assert len(batches) > 2
    got, _ = full_weight_grads(model, batches)
    want = {}
    for batch in batches:
        one, _ = full_weight_grads(model, [batch])
        want = {n: want.get(n, torch.zeros_like(g)) + g for n, g in one.items()}
    for name, g in got.items():
        assert g.dtype == torch.float32
        assert torch.equal(g, want[name]), name
