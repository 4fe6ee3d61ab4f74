"""Everything a run needs before training, built once and shared by every method of a comparison:
data, the client split, the frozen backbone, and token ids of exactly the examples the split uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedslip.config import Config
from fedslip.data.batching import Encoded
from fedslip.data.partition import Split, describe_split, make_split
from fedslip.data.sources import TextData, load_data
from fedslip.model.backbone import Backbone, load_backbone


@dataclass
class Prepared:
    cfg: Config
    data: TextData
    split: Split  # indices into `train` / `test` below (not into data.train / data.test)
    clients: list[dict]  # describe_split: sizes, label counts, dominant label per client
    backbone: Backbone
    train: Encoded
    test: Encoded


def _encode_used(dataset, groups: list[np.ndarray], backbone: Backbone, max_length: int):
    """Tokenize only the examples some group uses; return the pool and the groups re-indexed into it."""
    used = np.unique(np.concatenate(groups))
    position = {int(i): p for p, i in enumerate(used)}
    sub = dataset.select(used.tolist())
    enc = Encoded(list(sub["text"]), np.asarray(sub["label"]), backbone.tokenizer, max_length,
                  backbone.tokenizer.pad_token_id or 0)
    return enc, [np.array([position[int(i)] for i in g], dtype=np.int64) for g in groups]


def prepare(cfg: Config) -> Prepared:
    data = load_data(cfg.data)
    split = make_split(data, cfg.partition, cfg.train.seed)
    clients = describe_split(data, split)
    backbone = load_backbone(cfg.model.backbone, data.num_classes, cfg.train.seed, cfg.model.backbone_dropout)
    n = len(split.train)
    train, train_groups = _encode_used(data.train, split.train, backbone, cfg.model.max_length)
    test, test_groups = _encode_used(data.test, [split.global_test, *split.test], backbone, cfg.model.max_length)
    local = Split(train=train_groups, test=test_groups[1:1 + n], global_test=test_groups[0])
    return Prepared(cfg, data, local, clients, backbone, train, test)
