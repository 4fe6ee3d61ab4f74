"""Ledger bytes equal an independent prediction from tensor names and shapes (safetensors layout)."""

from __future__ import annotations

import copy
import json

import pytest

from fedslip.federation.inprocess import Simulation
from fedslip.methods import METHODS

from conftest import tiny_config


def predicted_safetensors_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """8-byte length + compact JSON header (names sorted, float32 offsets) padded to 8 + raw data."""
    header, offset = {}, 0
    for name in sorted(shapes):
        n = 4
        for d in shapes[name]:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-len(text) % 8)
    return 8 + len(text) + offset


def expected_shapes(cfg, hidden: int, layers: int, n_classes: int) -> dict[str, tuple[int, ...]]:
    """The shared track of a BERT model: LoRA on query and value of every layer, plus the classifier."""
    r = cfg.method.r_g
    shapes = {}
    for i in range(layers):
        for proj in ("query", "value"):
            base = f"bert.encoder.layer.{i}.attention.self.{proj}"
            shapes[f"{base}.g_A"] = (r, hidden)
            shapes[f"{base}.g_B"] = (hidden, r)
    shapes["classifier.weight"] = (n_classes, hidden)
    shapes["classifier.bias"] = (n_classes,)
    return shapes


def test_ledger_bytes_and_params_match_independent_prediction(tiny_prep):
    cfg = tiny_config("fedslip")
    sim = Simulation(tiny_prep, METHODS["fedslip"](cfg))
    result, ledger = sim.run()
    net_cfg = tiny_prep.backbone.model.config
    shapes = expected_shapes(cfg, net_cfg.hidden_size, net_cfg.num_hidden_layers, tiny_prep.data.num_classes)
    per_payload = predicted_safetensors_bytes(shapes)
    n_params = sum(a * b if len(s) == 2 else a for s in shapes.values() for a, *rest in [s] for b in (rest or [1]))
    n_clients = len(tiny_prep.split.train)
    assert len(ledger.rows()) == 2 * n_clients * cfg.train.rounds
    for e in ledger.rows():
        assert e.bytes == per_payload
        assert e.n_params == n_params
        assert e.dtypes == "float32"
    mib = 2 * n_clients * per_payload / 2**20
    for r in result.rounds:
        assert abs(r.mib_round - mib) < 1e-12
    assert abs(result.rounds[-1].mib_cumulative - cfg.train.rounds * mib) < 1e-9
    assert abs(result.final["mib_per_round"] - mib) < 1e-12


def test_frozen_head_sends_lora_only_and_local_sends_nothing(tiny_prep):
    cfg = tiny_config("fedslip", method={"head": "frozen"})
    _, ledger = Simulation(tiny_prep, METHODS["fedslip"](cfg)).run()
    net_cfg = tiny_prep.backbone.model.config
    shapes = expected_shapes(cfg, net_cfg.hidden_size, net_cfg.num_hidden_layers, tiny_prep.data.num_classes)
    lora_only = {k: v for k, v in shapes.items() if not k.startswith("classifier")}
    assert {e.bytes for e in ledger.rows()} == {predicted_safetensors_bytes(lora_only)}

    cfg = tiny_config("local")
    result, ledger = Simulation(tiny_prep, METHODS["local"](cfg)).run()
    assert all(e.bytes == 0 for e in ledger.entries) and result.final["mib_total"] == 0


def test_evaluation_rides_on_the_next_download_and_final_evaluation_is_counted(tiny_prep):
    from fedslip.evaluation.ledger import MIB

    cfg = tiny_config("fedslip", train={"rounds": 3})
    result, ledger = Simulation(tiny_prep, METHODS["fedslip"](cfg)).run()
    net_cfg = tiny_prep.backbone.model.config
    per_payload = predicted_safetensors_bytes(
        expected_shapes(cfg, net_cfg.hidden_size, net_cfg.num_hidden_layers, tiny_prep.data.num_classes))
    evals = ledger.rows("eval")
    assert [(e.round, e.client, e.direction) for e in evals] == [(3, k, "down") for k in range(4)]
    assert all(e.bytes == per_payload for e in evals)
    assert result.rounds[-1].eval_mib == pytest.approx(4 * per_payload / MIB)
    assert result.final["eval_mib_per_round"] == pytest.approx(4 * per_payload / MIB / 3)
    assert all(r.evaluated for r in result.rounds)


def test_clients_left_out_of_the_next_round_get_an_evaluation_download(tiny_prep):
    from fedslip.federation.protocol import select_clients

    cfg = tiny_config("fedavg", train={"rounds": 2, "client_fraction": 0.5}, method={"kstep": False})
    _, ledger = Simulation(tiny_prep, METHODS["fedavg"](cfg)).run()
    riders = select_clients(4, 0.5, cfg.train.seed, 2)
    assert [(e.round, e.client) for e in ledger.rows("eval")] == \
        [(1, k) for k in range(4) if k not in riders] + [(2, k) for k in range(4)]


def test_riding_evaluation_scores_the_previous_rounds_model(tiny_prep):
    """Round 1's accuracies, measured when round 2's downloads arrive, are those of round 1's global model
    and of each client's state after round 1, computed here directly."""
    from fedslip.evaluation.metrics import group_accuracy

    sim = Simulation(tiny_prep, METHODS["fedslip"](tiny_config("fedslip", method={"warmup_rounds": 0})))
    record = sim.run_round(1)
    glob = {k: v.clone() for k, v in sim.glob.items()}
    states = [copy.deepcopy(c) for c in sim.clients]
    sim.run_round(2)
    tests, bs = tiny_prep.split.test, 128
    want_client = [group_accuracy(sim.model, sim.method.global_view(sim.model, glob, s), "global", tiny_prep.test,
                                  [tests[k]], bs)[0] for k, s in enumerate(states)]
    want_personal = [group_accuracy(sim.model, sim.method.personal_view(sim.model, glob, s), "both",
                                    tiny_prep.test, [tests[k]], bs)[0] for k, s in enumerate(states)]
    want_global = group_accuracy(sim.model, sim.method.global_view(sim.model, glob, states[0]), "global",
                                 tiny_prep.test, [tiny_prep.split.global_test], bs)[0]
    assert record.evaluated
    assert record.client_acc == want_client and record.personal_acc == want_personal
    assert record.global_acc == want_global


def test_in_process_round_encodes_each_payload_once(tiny_prep, monkeypatch):
    """The transport encodes every download and upload once; the ledger takes its byte counts from there."""
    from fedslip.federation import inprocess, payload

    calls = []
    real = payload.encode

    def counting(p):
        calls.append(1)
        return real(p)

    monkeypatch.setattr(inprocess, "encode", counting)
    monkeypatch.setattr("fedslip.federation.protocol.encode", counting)
    sim = Simulation(tiny_prep, METHODS["fedavg"](tiny_config("fedavg")))
    calls.clear()
    sim.run_round(1)
    assert len(calls) == 2 * sim.n_clients
