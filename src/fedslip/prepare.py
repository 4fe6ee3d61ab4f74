"""Everything a run needs before training, built once and shared by every method of a comparison:
data, the client split, the frozen backbone, and token ids of exactly the examples the split uses.

`prepare` splits one dataset across the clients (simulation, loopback deployments). In a real federation
each node holds only its own files (`prepare_node`) and the server holds no data at all (`prepare_server`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import datasets
import numpy as np

from fedslip.config import Config
from fedslip.errors import UserError
from fedslip.data.batching import Encoded
from fedslip.data.rows import file_format
from fedslip.data.sources import load_data
from fedslip.data.split import Split, describe_split
from fedslip.data.text import TextData
from fedslip.model.backbone import Backbone, load_backbone
from fedslip.model.placement import resolve


@dataclass
class Prepared:
    cfg: Config
    data: TextData | None  # None on a server that holds no data
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


def _backbone(cfg: Config, num_classes: int) -> Backbone:
    backbone = load_backbone(cfg.model.backbone, num_classes, cfg.train.seed, cfg.model.backbone_dropout)
    limits = [getattr(backbone.model.config, "max_position_embeddings", None),  # RoBERTa's 514 read 512 tokens:
              getattr(backbone.tokenizer, "model_max_length", None)]  # its tokenizer says so (others: 1e30)
    limit = min((n for n in limits if n and n < 1_000_000), default=None)
    if limit and cfg.model.max_length > limit:
        raise UserError(f"model.max_length = {cfg.model.max_length}: {backbone.name} reads at most {limit} tokens")
    backbone.placement = resolve(cfg.train.device, cfg.train.precision)
    return backbone


def prepare(cfg: Config) -> Prepared:
    from fedslip.data.partition import make_split  # here, not above: nodes with their own files never split

    data = load_data(cfg.data)
    split = make_split(data, cfg.partition, cfg.train.seed)
    if cfg.partition.validation_fraction > 0:
        data, split = validation_split(data, split, cfg.partition.validation_fraction, cfg.train.seed)
    return _finish(cfg, data, split)


def validation_split(data: TextData, split: Split, fraction: float, seed: int) -> tuple[TextData, Split]:
    """Tuning without the test split: each client keeps 1 − `fraction` of its training examples to train on
    and is evaluated on the rest; the "global" set is every client's held-out examples together."""
    rng = np.random.default_rng([int(seed) % 2**32, 7_001])
    train, val = [], []
    for idx in split.train:
        shuffled = rng.permutation(idx)
        n_val = int(round(fraction * len(idx)))
        if n_val == 0 or n_val == len(idx):
            raise UserError(f"partition.validation_fraction = {fraction}: a client with {len(idx)} training "
                            "examples gets an empty training or validation set")
        val.append(np.sort(shuffled[:n_val]))
        train.append(np.sort(shuffled[n_val:]))
    held_out = replace(data, test=data.train,
                       description=f"{data.description}; validation: {fraction:.0%} of each client's training "
                                   "data (the test split is not used)")
    return held_out, Split(train=train, test=val, global_test=np.concatenate(val))


def _finish(cfg: Config, data: TextData, split: Split) -> Prepared:
    clients = describe_split(data, split)
    backbone = _backbone(cfg, data.num_classes)
    n = len(split.train)
    train, train_groups = _encode_used(data.train, split.train, backbone, cfg.model.max_length)
    test, test_groups = _encode_used(data.test, [split.global_test, *split.test], backbone, cfg.model.max_length)
    local = Split(train=train_groups, test=test_groups[1:1 + n], global_test=test_groups[0])
    return Prepared(cfg, data, local, clients, backbone, train, test)


def prepare_node(cfg: Config, pid: int, train_file: str, test_file: str | None = None,
                 global_test_file: str | None = None) -> Prepared:
    """Client `pid`'s own files (csv or jsonl, the run's data.text_columns / label_column) and nothing else.

    Labels map through `data.label_names`, the label set every node is told, so class ids agree across
    nodes. Without a test file, `data.test_fraction` of the training file is held out. A node given the
    balanced global test file scores it too."""
    if not cfg.data.label_names:
        raise UserError("nodes that read their own files need data.label_names: the label set, in class order, "
                        "that every node shares")
    if cfg.partition.validation_fraction:
        raise UserError("partition.validation_fraction carves validation data from the whole training pool; "
                        "nodes that read their own files cannot: carve it before `fedslip split`, or leave it at 0")
    data = load_data(replace(cfg.data, source=file_format(train_file), train_file=train_file,
                             test_file=test_file or None), whole_federation=False)
    n_global = 0
    if global_test_file:  # read as its own training and test file: its rows are the test set, nothing else
        extra = load_data(replace(cfg.data, source=file_format(global_test_file), train_file=global_test_file,
                                  test_file=global_test_file), whole_federation=False)
        n_global = len(extra.test)
        data = replace(data, test=datasets.concatenate_datasets([data.test, extra.test]))
    n_own = len(data.test) - n_global
    empty = np.zeros(0, dtype=np.int64)
    n = cfg.partition.n_clients
    split = Split(train=[np.arange(len(data.train)) if k == pid else empty for k in range(n)],
                  test=[np.arange(n_own) if k == pid else empty for k in range(n)],
                  global_test=np.arange(n_own, n_own + n_global))
    return _finish(cfg, data, split)


def prepare_server(cfg: Config) -> Prepared:
    """A server that holds no data: the backbone (data.label_names gives the classes) and an empty split;
    the clients' sizes come from the nodes."""
    if not cfg.data.label_names:
        raise UserError("a server whose nodes hold the data needs data.label_names (the label set, in class order)")
    n, empty = cfg.partition.n_clients, np.zeros(0, dtype=np.int64)
    backbone = _backbone(cfg, len(cfg.data.label_names))
    clients = [{"client": k, "n_train": 0, "n_test": 0, "dominant_label": None} for k in range(n)]
    return Prepared(cfg, None, Split([empty] * n, [empty] * n, empty), clients, backbone, None, None)
