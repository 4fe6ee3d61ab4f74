"""FLoRA: heterogeneous-rank LoRAs stacked so that the merged update is exactly Σ p_k s_k B_k A_k."""

from __future__ import annotations

import json

import torch

import test_ledger
from fedslip.cli import main
from fedslip.federation import inprocess as simulation
from fedslip.federation.inprocess import Simulation
from fedslip.federation.protocol import select_clients
from fedslip.methods import METHODS

from test_cli import sets as tiny_sets
from conftest import head_shapes, layers, tiny_config

RANKS = [16, 8, 8, 4]  # the documented default, cycled over client ids


def spy_aggregate(sim) -> list:
    captured = []
    real = sim.method.aggregate

    def spy(ups, glob, rnd, participants):
        captured.append(([({k: v.clone() for k, v in p.items()}, n) for p, n in ups],
                         {k: v.clone() for k, v in glob.items()}))
        return real(ups, glob, rnd, participants)

    sim.method.aggregate = spy
    return captured


def expected_update(ups, layer: str, scale_of_rank) -> torch.Tensor:
    """Σ_k p_k s_k B_k A_k in float64, p_k = n_k / Σ n, computed from the uploads alone."""
    total = sum(n for _, n in ups)
    a, b = f"{layer}.A", f"{layer}.B"
    return sum((n / total) * scale_of_rank(p[a].shape[0]) * (p[b].double() @ p[a].double()) for p, n in ups)


def test_stacked_product_equals_weighted_sum_of_client_products(tiny_prep, monkeypatch):
    cfg = tiny_config("flora")
    sim = Simulation(tiny_prep, METHODS["flora"](cfg))
    captured = spy_aggregate(sim)
    sent = []
    real_encode = simulation.encode
    monkeypatch.setattr(simulation, "encode", lambda p: (sent.append({k: v.clone() for k, v in p.items()}),
                                                         real_encode(p))[1])
    sim.run_round(1)
    ups, _ = captured[0]
    n_clients = len(tiny_prep.split.train)
    assert [n for _, n in ups] == [len(idx) for idx in tiny_prep.split.train]
    # heterogeneous ranks, cycled over clients
    first = layers(tiny_prep)[0]
    assert [p[f"{first}.A"].shape[0] for p, _ in ups] == [RANKS[k % 4] for k in range(n_clients)]
    assert [p[f"{first}.B"].shape[1] for p, _ in ups] == [RANKS[k % 4] for k in range(n_clients)]
    # each client's own scaling α_k / r_k with α_k = (α_g / r_g)·r_k (the FLoRA code's α = 2r)
    m = cfg.method

    def scale(r):
        return (m.alpha_g / m.r_g * r) / r

    sim.run_round(2)
    round2_down = sent[2 * n_clients]  # the first payload of round 2: client 0's download
    ups2, glob_before_2 = captured[1]
    for layer in layers(tiny_prep):
        want = expected_update(ups, layer, scale)
        assert want.abs().max() > 0  # the clients really trained their B's
        # the server's merged weights after round 1 (from Δ = 0)
        torch.testing.assert_close(glob_before_2[f"{layer}.delta"].double(), want, rtol=1e-5, atol=1e-7)
        # what it sent in round 2: the stack, Σ r_k rows/columns, whose product is that update
        a, b = round2_down[f"{layer}.A"], round2_down[f"{layer}.B"]
        assert a.shape[0] == b.shape[1] == sum(RANKS[k % 4] for k in range(n_clients))
        torch.testing.assert_close(b.double() @ a.double(), want, rtol=1e-5, atol=1e-7)
        # the stack is the uploads themselves: A's verbatim, B's scaled by p_k s_k
        torch.testing.assert_close(a, torch.cat([p[f"{layer}.A"] for p, _ in ups]))
        # round 2 accumulates on top: Δ_2 = Δ_1 + Σ p_k s_k B_k A_k of round 2
        torch.testing.assert_close(sim.glob[f"{layer}.delta"].double(),
                                   want + expected_update(ups2, layer, scale), rtol=1e-5, atol=1e-7)


def test_stack_weights_by_example_count_across_ranks():
    """Unequal counts and ranks (the tiny federation's clients are all the same size)."""
    cfg = tiny_config("flora")
    method = METHODS["flora"](cfg)
    gen = torch.Generator().manual_seed(0)
    ups = [({"l.A": torch.randn(r, 5, generator=gen), "l.B": torch.randn(6, r, generator=gen)}, n)
           for r, n in ((3, 1), (1, 3), (2, 4))]
    glob = {"l.delta": torch.randn(6, 5, generator=gen)}
    out = method.aggregate(ups, glob, 1, [0, 1, 2])
    s = cfg.method.alpha_g / cfg.method.r_g  # α_k / r_k with α_k = (α_g / r_g)·r_k
    want = sum(n / 8 * s * (p["l.B"].double() @ p["l.A"].double()) for p, n in ups)
    torch.testing.assert_close(out["l.delta"].double(), glob["l.delta"].double() + want, rtol=1e-6, atol=1e-6)
    down = method.down_payload(out, 0)
    assert down["l.A"].shape == (6, 5) and down["l.B"].shape == (6, 6)
    torch.testing.assert_close(down["l.B"].double() @ down["l.A"].double(), want, rtol=1e-6, atol=1e-6)


def test_each_client_uses_its_own_scaling_in_the_merged_update(tiny_prep):
    """With α fixed (s_k = α / r_k differs per client), the merge must still use each client's s_k."""
    cfg = tiny_config("flora")
    method = METHODS["flora"](cfg)
    method.alpha = lambda rank: 4.0  # α_k = 4 for every rank: scales 0.25, 0.5, 0.5, 1
    sim = Simulation(tiny_prep, method)
    captured = spy_aggregate(sim)
    sim.run_round(1)
    ups, _ = captured[0]
    # independently: each client's function is W0 + (4 / r_k) B_k A_k (run its layer as trained) ...
    layer_name = layers(tiny_prep)[0]
    layer = sim.model.layers[layer_name]
    x = torch.randn(5, layer.base.in_features, generator=torch.Generator().manual_seed(0))
    total = sum(n for _, n in ups)
    from fedslip.model.flora_layer import active
    mixed = torch.zeros(5, layer.base.out_features, dtype=torch.float64)
    with torch.no_grad():
        for p, n in ups:
            r = p[f"{layer_name}.A"].shape[0]
            sim.model.load({f"{layer_name}.lora_A{r}": p[f"{layer_name}.A"],
                            f"{layer_name}.lora_B{r}": p[f"{layer_name}.B"],
                            f"{layer_name}.delta": torch.zeros_like(layer.delta)})
            with active(sim.model, r, 4.0 / r):
                mixed += (n / total) * (layer(x) - layer.base(x)).double()
        # ... and the global model's merged layer is their weighted mean
        sim.model.load({f"{layer_name}.delta": sim.glob[f"{layer_name}.delta"]})
        merged = (layer(x) - layer.base(x)).double()
    assert mixed.abs().max() > 0
    torch.testing.assert_close(merged, mixed, rtol=1e-4, atol=1e-6)


def test_clients_merge_the_downlink_into_the_servers_weights_and_restart_lora(tiny_prep, monkeypatch):
    """Partial participation: a client that missed rounds gets every stack it missed, and after merging
    holds exactly the server's weights of the previous round; its LoRA starts from B = 0 every round."""
    cfg = tiny_config("flora", train={"rounds": 3, "client_fraction": 0.5})
    sim = Simulation(tiny_prep, METHODS["flora"](cfg))
    model = sim.model
    loaded_b = []
    real_load = model.load

    def spy_load(tensors):
        loaded_b.extend(t.clone() for n, t in tensors.items() if ".lora_B" in n)
        return real_load(tensors)

    monkeypatch.setattr(model, "load", spy_load)
    history = [{n: t.clone() for n, t in sim.glob.items() if n.endswith(".delta")}]
    missed_a_round = False
    for rnd in range(1, 4):  # seed 0 selects [1, 2], [1, 3], [1, 2]: client 2 gets the stacks of rounds 1-2
        selected = select_clients(4, 0.5, cfg.train.seed, rnd)
        loaded_b.clear()
        sim.run_round(rnd)
        assert loaded_b and all(not b.any() for b in loaded_b), "a client's LoRA B did not restart at 0"
        for k in selected:
            last_seen = max([r for r in range(1, rnd) if k in select_clients(4, 0.5, cfg.train.seed, r)], default=0)
            missed_a_round |= rnd - 1 > last_seen
            for n, t in history[rnd - 1].items():
                torch.testing.assert_close(sim.clients[k].tensors[n], t, rtol=1e-5, atol=1e-7)
        # a client rebuilds the server's global model from what it holds plus a down payload (client-side
        # evaluation, e.g. under Flower): its merged weights + the stacks it has not merged yet
        for k, client in enumerate(sim.clients):
            server = sim.method.global_view(model, sim.glob, client)
            on_client = sim.method.global_view(model, sim.method.down_payload(sim.glob, k), client)
            assert server.keys() == on_client.keys()
            for n in server:
                torch.testing.assert_close(on_client[n], server[n], rtol=1e-5, atol=1e-7)
        history.append({n: t.clone() for n, t in sim.glob.items() if n.endswith(".delta")})
    assert missed_a_round, "the selection never made a client skip a round: pick another seed"
    assert any(t.abs().max() > 0 for t in history[-1].values())


def payload_shapes(prep, ranks: list[int]) -> dict[str, tuple[int, ...]]:
    """A stack (or one client's pair) of total rank Σ ranks on every adapted layer, plus the head."""
    hidden, r = prep.backbone.model.config.hidden_size, sum(ranks)
    shapes = {}
    for layer in layers(prep):
        shapes[f"{layer}.A"], shapes[f"{layer}.B"] = (r, hidden), (hidden, r)
    return {**shapes, **head_shapes(prep)}


def n_params(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes.values())


def test_ledger_matches_payload_formula(tiny_prep):
    cfg = tiny_config("flora")
    result, ledger = Simulation(tiny_prep, METHODS["flora"](cfg)).run()
    hidden, n_layers = tiny_prep.backbone.model.config.hidden_size, len(layers(tiny_prep))
    head = n_params(head_shapes(tiny_prep))
    n_clients = len(tiny_prep.split.train)
    assert len(ledger.rows()) == 2 * n_clients * cfg.train.rounds
    for e in ledger.rows():
        r_k = RANKS[e.client % 4]
        if e.direction == "up":  # r_k·(d_in + d_out) per layer + head
            shapes = payload_shapes(tiny_prep, [r_k])
            assert e.n_params == n_layers * r_k * 2 * hidden + head
        elif e.round == 1:  # nothing merged yet: the head only
            shapes = head_shapes(tiny_prep)
            assert e.n_params == head
        else:  # the stack of every client of last round: (Σ r_k)·(d_in + d_out) per layer + head
            shapes = payload_shapes(tiny_prep, [RANKS[k % 4] for k in range(n_clients)])
            assert e.n_params == n_layers * sum(RANKS) * 2 * hidden + head
        assert e.n_params == n_params(shapes)
        assert e.bytes == test_ledger.predicted_safetensors_bytes(shapes)
        assert e.dtypes == "float32"


def test_downlink_grows_with_the_number_of_clients_aggregated(tiny_prep):
    """Half the clients per round: round 2's download stacks 2 clients' LoRAs, not 4 (the full run above)."""
    hidden, n_layers = tiny_prep.backbone.model.config.hidden_size, len(layers(tiny_prep))
    head = n_params(head_shapes(tiny_prep))
    cfg = tiny_config("flora", train={"client_fraction": 0.5})
    _, ledger = Simulation(tiny_prep, METHODS["flora"](cfg)).run()
    first_round = select_clients(4, 0.5, cfg.train.seed, 1)
    assert len(first_round) == 2
    stacked_rank = sum(RANKS[k % 4] for k in first_round)
    sizes = {e.n_params for e in ledger.rows() if e.direction == "down" and e.round == 2}
    assert sizes == {n_layers * stacked_rank * 2 * hidden + head}
    assert sizes.pop() < n_layers * sum(RANKS) * 2 * hidden + head  # the 4-client stack


def test_cli_tiny_run_uploads_each_clients_own_rank(tmp_path, tiny_prep):
    import csv

    out = tmp_path / "flora"
    rc = main(["run", "--method", "flora", "--quiet", "--out", str(out), *tiny_sets(["method.client_ranks=[4, 2]"])])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert "flora" in doc["methods"] and doc["config"]["method"]["client_ranks"] == [4, 2]
    with open(out / "ledger.csv") as f:
        up = {int(r["client"]): int(r["n_params"]) for r in csv.DictReader(f)
              if r["round"] == "1" and r["direction"] == "up" and r["status"] == "ok"}
    per_rank = sum(m.in_features + m.out_features for m in  # one rank of A (r × in) and B (out × r), every layer
                   (tiny_prep.backbone.model.get_submodule(name) for name in layers(tiny_prep)))
    assert sorted(up) == [0, 1, 2, 3] and up[0] == up[2] and up[1] == up[3]  # ranks 4, 2, 4, 2
    assert up[0] - up[1] == (4 - 2) * per_rank
