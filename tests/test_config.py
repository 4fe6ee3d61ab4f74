"""Config: presets, TOML, --set precedence and validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedslip.config import Config, load_config, parse_set
from fedslip.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_is_the_reference_protocol():
    cfg = load_config(str(ROOT / "configs" / "example.toml"))
    assert cfg.to_dict() == load_config(preset="paper").to_dict()
    ref = Config()
    assert (ref.partition.n_clients, ref.partition.rho, ref.partition.n_train, ref.partition.n_test) == (4, 0.8, 2000, 500)
    assert (ref.train.rounds, ref.train.local_epochs, ref.train.batch_size, ref.train.lr) == (30, 2, 32, 1e-4)
    assert (ref.method.r_g, ref.method.alpha_g, ref.method.r_p, ref.method.alpha_p) == (8, 16.0, 32, 64.0)
    assert (ref.method.sparsity, ref.method.warmup_rounds, ref.method.lambda_p, ref.method.mu) == (0.75, 10, 0.6, 0.1)


def test_precedence_preset_file_method_set(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\nrounds = 7\nlr = 0.01\n[method]\nname = "fedavg"\n')
    cfg = load_config(str(f), preset="quick", method="fedslip", sets=["train.lr=0.02"])
    assert cfg.train.rounds == 7  # file over preset
    assert cfg.partition.n_train == load_config(preset="quick").partition.n_train  # preset kept
    assert cfg.method.name == "fedslip"  # --method over file
    assert cfg.train.lr == 0.02  # --set over everything


def test_set_values_are_toml_literals_or_strings():
    parsed = parse_set(["train.rounds=3", "model.backbone=tiny-random:bert", "data.text_columns=[\"a\", \"b\"]"])
    assert parsed == {"train": {"rounds": 3}, "model": {"backbone": "tiny-random:bert"},
                      "data": {"text_columns": ["a", "b"]}}


@pytest.mark.parametrize("sets", [["train.client_fraction=0"], ["partition.scheme=\"ring\""], ["method.head=\"x\""],
                                  ["train.batch_size=0"], ["method.lambda_p=0"], ["data.test_fraction=1.5"]])
def test_invalid_values(sets):
    key = sets[0].split("=")[0]
    with pytest.raises(UserError, match=f"^{re.escape(key)} = .*(must be|expected)"):  # the key named, and why
        load_config(sets=sets)


def test_bad_toml(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[train\nrounds=")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(str(f))


def test_set_none_unsets_an_optional_key_and_is_refused_for_others():
    cfg = load_config(preset="quick", sets=["train.local_steps=none"])
    assert cfg.train.local_steps is None and load_config(preset="quick").train.local_steps == 16
    with pytest.raises(UserError, match="train.lr"):
        load_config(sets=["train.lr=null"])
