"""Shared fixtures: tiny random backbones on synthetic text, so engine tests run in seconds."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from fedslip.config import apply_overrides, Config, validate

# Tiny models gain nothing from threads, and on a loaded 2-core machine extra threads oversubscribe it.
torch.set_num_threads(1)

AG_NEWS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news"

TINY = {
    "data": {"source": "synthetic", "synthetic_per_class": 60},
    "partition": {"n_clients": 4, "n_train": 40, "n_test": 20, "n_global_test": 10},
    "model": {"backbone": "tiny-random:bert", "max_length": 32},
    # fp32: the same numbers on every machine (bf16 has tests of its own)
    "train": {"rounds": 2, "local_epochs": 1, "local_only_epochs": 1, "batch_size": 8, "lr": 1e-3,
              "precision": "fp32"},
    "method": {"warmup_rounds": 1, "r_p": 4, "alpha_p": 8.0, "r_g": 2, "alpha_g": 4.0},
}


def tiny_config(name: str = "fedslip", /, **sections) -> Config:
    """The tiny config with `section={key: value}` overrides applied."""
    overrides = copy.deepcopy(TINY)
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    cfg = apply_overrides(Config(), overrides, "test")
    cfg.method.name = name
    validate(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_prep():
    from fedslip.prepare import prepare

    return prepare(tiny_config())


UNEVEN = {"scheme": "dirichlet", "alpha": 1.0}  # clients of different sizes: a weighted mean is not a plain one


@pytest.fixture(scope="session")
def uneven_prep():
    from fedslip.prepare import prepare

    prep = prepare(tiny_config(partition=UNEVEN))
    assert len({len(t) for t in prep.split.train}) == len(prep.split.train)  # every client its own size
    return prep


def ag_news_dir() -> Path:
    """$FEDSLIP_DATA_DIR if set, else ../shared/data/ag_news beside the checkout; skip when absent."""
    folder = Path(os.environ.get("FEDSLIP_DATA_DIR") or AG_NEWS_DIR)
    if not (folder / "train.csv").is_file():
        pytest.skip(f"AG News not found at {folder}: set FEDSLIP_DATA_DIR (see README: Data)")
    return folder


def layers(prep) -> list[str]:
    """Names of the adapted projections of the tiny BERT (query and value of every layer)."""
    cfg = prep.backbone.model.config
    return [f"bert.encoder.layer.{i}.attention.self.{proj}" for i in range(cfg.num_hidden_layers)
            for proj in ("query", "value")]


def head_shapes(prep) -> dict[str, tuple[int, ...]]:
    hidden, n_classes = prep.backbone.model.config.hidden_size, prep.data.num_classes
    return {"classifier.weight": (n_classes, hidden), "classifier.bias": (n_classes,)}


class FakeClock:
    """A `time` module stand-in: `sleep` moves `monotonic` on at once, so waits run in no real time and the
    same way on a loaded machine. A wait that never sleeps would spin forever on it: many reads of the time
    with no sleep between them fail the test instead."""

    def __init__(self):
        self.now = 0.0
        self.reads = 0

    def monotonic(self):
        self.reads += 1
        assert self.reads < 10_000, "the code under test waits without sleeping: the fake clock never moves"
        return self.now

    def sleep(self, s):
        self.reads = 0
        self.now += s
