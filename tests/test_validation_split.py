"""Tuning on validation data carved from the clients' training data: the test split is never touched."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedslip.data.partition import make_split
from fedslip.data.sources import load_data
from fedslip.errors import UserError
from fedslip.prepare import prepare

from conftest import tiny_config


def test_validation_comes_from_each_clients_training_data_and_never_from_test():
    cfg = tiny_config("fedavg", partition={"validation_fraction": 0.25})
    prep = prepare(cfg)
    data = load_data(cfg.data)
    full = make_split(data, cfg.partition, cfg.train.seed)
    tok = prep.backbone.tokenizer

    def encoded(texts):
        return Counter(tuple(x) for x in tok(list(texts), truncation=True, max_length=cfg.model.max_length)["input_ids"])

    for k, original in enumerate(full.train):
        fit = Counter(tuple(prep.train.ids[i]) for i in prep.split.train[k])
        val = Counter(tuple(prep.test.ids[i]) for i in prep.split.test[k])
        assert sum(val.values()) == round(0.25 * len(original))
        assert fit + val == encoded(data.train.select(original.tolist())["text"])  # exactly its training data
    assert sorted(prep.split.global_test.tolist()) == sorted(np.concatenate(prep.split.test).tolist())
    assert "validation" in prep.data.description


def test_a_fraction_that_empties_a_client_is_one_clear_error():
    with pytest.raises(UserError, match="validation_fraction"):
        prepare(tiny_config("fedavg", partition={"validation_fraction": 0.999}))
