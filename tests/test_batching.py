"""Training batches: every example once per epoch; length pools cut padding; a pool of 1 is a plain shuffle."""

from __future__ import annotations

import numpy as np
import pytest

from fedslip.config import PRESETS, load_config
from fedslip.data.batching import Encoded
from fedslip.errors import UserError


class _Tok:  # token ids of a text = one id per character: lengths are exactly the texts' lengths
    def __call__(self, texts, truncation=True, max_length=128):
        return {"input_ids": [[7] * min(len(t), max_length) for t in texts]}


def _encoded(n=640, seed=0):
    lengths = np.random.default_rng(seed).integers(4, 120, size=n)
    return Encoded(["x" * int(k) for k in lengths], np.arange(n) % 4, _Tok(), 128, pad_id=0), lengths


def _padding(batches):
    return sum(int((b.attention_mask == 0).sum()) for b in batches)


@pytest.mark.parametrize("pool", [1, 3, 50])
def test_an_epoch_holds_every_example_once(pool):
    enc, _ = _encoded()
    idx = np.arange(5, 600)
    batches = enc.train_batches(idx, 32, np.random.default_rng(1), pool)
    got = np.concatenate([b.index for b in batches])
    assert sorted(got.tolist()) == idx.tolist()
    assert sorted(len(b) for b in batches) == [len(idx) % 32] + [32] * (len(idx) // 32)  # one short batch


def test_pool_of_one_is_a_uniform_shuffle_in_consecutive_slices():
    enc, _ = _encoded()
    idx = np.arange(640)
    batches = enc.train_batches(idx, 32, np.random.default_rng(3), 1)
    order = np.random.default_rng(3).permutation(idx)  # the same first draw, computed here
    expected = {frozenset(order[i:i + 32].tolist()) for i in range(0, 640, 32)}
    assert {frozenset(b.index.tolist()) for b in batches} == expected


def test_length_pools_cut_padding():
    enc, lengths = _encoded()
    idx = np.arange(640)
    plain = _padding(enc.train_batches(idx, 32, np.random.default_rng(4), 1))
    pooled = _padding(enc.train_batches(idx, 32, np.random.default_rng(4), 20))  # one pool: fully sorted
    floor = sum(int(c.max()) * len(c) - int(c.sum()) for c in np.split(np.sort(lengths), 20))
    assert pooled == floor < plain / 5


def test_config_checks_and_reference_preset():
    assert PRESETS["reference"]["train"]["length_pool"] == 1
    with pytest.raises(UserError, match="length_pool"):
        load_config(sets=["train.length_pool=0"])
