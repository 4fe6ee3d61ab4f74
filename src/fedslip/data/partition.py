"""Split a `TextData` over clients: per-client train/test index arrays plus a balanced global test set.

Every scheme draws the global test set first (`n_global_test` per class from `data.test`); clients' test
sets come from what is left, so the global test set never overlaps a client's test set, and clients'
sets never overlap each other. All draws are seeded permutations: the same seed gives identical arrays.

Schemes:
- `dominant` (the reference protocol): `DominantLabelPartitioner`, exact per-class counts, for train and test.
- `dirichlet` / `pathological` / `iid`: flwr-datasets partitioners on `data.train`; each client's test set
  (`n_test`) follows the label proportions of its train partition.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import datasets
import numpy as np
from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner, Partitioner,
                                       PathologicalPartitioner)

from fedslip.config import PartitionConfig
from fedslip.data.split import Split, column_array, labels_of
from fedslip.data.text import TextData
from fedslip.errors import UserError

DIRICHLET_MIN_PARTITION_SIZE = 10  # flwr resamples (up to 10 times) until every client has this many
_GLOBAL, _TRAIN, _TEST = 0, 1, 2  # seed streams (numpy SeedSequence entropy [seed, stream])


class PoolTooSmall(ValueError):
    """Raised when a class has fewer available examples than the requested counts need."""

    def __init__(self, label: int, needed: int, available: int):
        super().__init__(f"class {label}: needs {needed} examples but only {available} are available")
        self.label, self.needed, self.available = label, needed, available


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def dominant_counts(n: int, rho: float, num_classes: int, client: int) -> np.ndarray:
    """Per-class counts for `client`: round(rho*n) of class client mod C; the rest split evenly over the
    other classes, the remainder going to the lowest-numbered ones."""
    counts = np.zeros(num_classes, dtype=np.int64)
    dom = client % num_classes
    if num_classes == 1:
        counts[dom] = n
        return counts
    own = _round_half_up(rho * n)
    others = [c for c in range(num_classes) if c != dom]
    base, extra = divmod(n - own, num_classes - 1)
    counts[dom] = own
    for i, c in enumerate(others):
        counts[c] = base + (1 if i < extra else 0)
    return counts


def draw_by_counts(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                   exclude: np.ndarray | None = None) -> list[np.ndarray]:
    """Give client k `counts[k, c]` examples of class c, disjoint across clients, without replacement.

    Per class: one seeded permutation of the pool (minus `exclude`), cut into consecutive slices. Each
    client's indices are then shuffled so classes are interleaved."""
    counts = np.asarray(counts, dtype=np.int64)
    available = np.ones(len(labels), dtype=bool)
    if exclude is not None and len(exclude):
        available[exclude] = False
    parts: list[list[np.ndarray]] = [[] for _ in range(counts.shape[0])]
    for c in range(counts.shape[1]):
        pool = rng.permutation(np.flatnonzero((labels == c) & available))
        needed = int(counts[:, c].sum())
        if needed > len(pool):
            raise PoolTooSmall(c, needed, len(pool))
        start = 0
        for k in range(counts.shape[0]):
            parts[k].append(pool[start:start + counts[k, c]])
            start += counts[k, c]
    return [rng.permutation(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64) for p in parts]


class DominantLabelPartitioner(Partitioner):
    """The reference non-IID protocol as a Flower partitioner: partition k holds `dominant_counts(...)`
    examples per class (class k mod C dominant), partitions disjoint, sampled by seeded permutation.

    `exclude` removes indices from the pool (used to keep client test sets off the global test set).
    Raises `PoolTooSmall` (a ValueError, as flwr partitioners do) when a class cannot supply its demand.
    """

    def __init__(self, num_partitions: int, n_per_partition: int, rho: float, num_classes: int | None = None,
                 seed: int | Sequence[int] = 0, partition_by: str = "label",
                 exclude: np.ndarray | None = None) -> None:
        super().__init__()
        if num_partitions <= 0:
            raise ValueError("The number of partitions must be greater than zero.")
        self._num_partitions = num_partitions
        self._n = n_per_partition
        self._rho = rho
        self._num_classes = num_classes
        self._seed = seed
        self._partition_by = partition_by
        self._exclude = exclude
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        return self.dataset.select(self.partition_indices(partition_id))

    def partition_indices(self, partition_id: int) -> np.ndarray:
        if not 0 <= partition_id < self._num_partitions:
            raise KeyError(f"partition_id {partition_id} outside 0..{self._num_partitions - 1}")
        if self._indices is None:
            labels = column_array(self.dataset, self._partition_by)
            n_classes = self._num_classes or int(labels.max()) + 1
            counts = np.stack([dominant_counts(self._n, self._rho, n_classes, k)
                               for k in range(self._num_partitions)])
            self._indices = draw_by_counts(labels, counts, np.random.default_rng(self._seed), self._exclude)
        return self._indices[partition_id].copy()


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to `weights` summing to `total` (ties: lower index first)."""
    w = np.asarray(weights, dtype=float)
    quotas = total * w / w.sum()
    out = np.floor(quotas).astype(np.int64)
    order = np.argsort(-(quotas - out), kind="stable")
    out[order[:total - int(out.sum())]] += 1
    return out


def _pool_error(split: str, e: PoolTooSmall, data: TextData, hint: str, after_global: int = 0) -> UserError:
    name = data.label_names[e.label] if e.label < len(data.label_names) else str(e.label)
    after = f" after the {after_global}-per-class global test set" if after_global else ""
    return UserError(f"partition: {split} needs {e.needed} examples of class {e.label} ({name}) but the pool "
                     f"has {e.available}{after}; {hint}")


def _global_test(test_labels: np.ndarray, data: TextData, cfg: PartitionConfig, seed: int) -> np.ndarray:
    counts = np.full((1, data.num_classes), cfg.n_global_test, dtype=np.int64)
    try:
        (idx,) = draw_by_counts(test_labels, counts, np.random.default_rng([seed, _GLOBAL]))
    except PoolTooSmall as e:
        raise _pool_error("global test", e, data, "lower partition.n_global_test") from None
    return np.sort(idx)


def _flower_train(data: TextData, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Client train indices from a flwr-datasets partitioner over all of `data.train` (used as flwr gives
    them; only `iid` is capped at `n_train` per client). The rows are shuffled (seeded) first because
    flwr's iid shards are contiguous and unseeded, and its pathological/dirichlet splits take each class's
    rows in order: without the shuffle the seed would not choose which examples a client gets."""
    n_rows, k = len(data.train), cfg.n_clients
    if k > n_rows:
        raise UserError(f"partition.n_clients = {k}: more clients than the {n_rows} training examples")
    if cfg.scheme == "pathological" and cfg.classes_per_client > data.num_classes:
        raise UserError(f"partition.classes_per_client = {cfg.classes_per_client}: the data has only "
                        f"{data.num_classes} classes; lower it")
    if cfg.scheme == "dirichlet":
        part = DirichletPartitioner(num_partitions=k, partition_by="label", alpha=float(cfg.alpha),
                                    min_partition_size=min(DIRICHLET_MIN_PARTITION_SIZE, n_rows // k), seed=seed)
        hint = "raise partition.alpha or lower partition.n_clients"
    elif cfg.scheme == "pathological":
        # "first-deterministic" (as in the paper the partitioner follows): client k always gets class
        # k mod C, the other classes are drawn at random, so every class is used when n_clients >= C.
        part = PathologicalPartitioner(num_partitions=k, partition_by="label",
                                       num_classes_per_partition=cfg.classes_per_client,
                                       class_assignment_mode="first-deterministic", seed=seed)
        hint = "lower partition.classes_per_client or partition.n_clients"
    else:
        part = IidPartitioner(num_partitions=k)
        hint = "lower partition.n_clients"
    table = (data.train.select_columns(["label"]).add_column("_idx", np.arange(n_rows, dtype=np.int64))
             .shuffle(seed=seed))
    part.dataset = table
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dirichlet resampling / unused-class chatter
            out = [column_array(part.load_partition(i), "_idx") for i in range(k)]
    except ValueError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"partition: {cfg.scheme} partitioning failed ({msg}); {hint}") from None
    if cfg.scheme == "iid":
        out = [idx[:cfg.n_train] for idx in out]
    for i, idx in enumerate(out):
        if len(idx) == 0:
            raise UserError(f"partition: {cfg.scheme} gave client {i} no training examples; {hint}")
    return out


def _dominant(data: TextData, ds: datasets.Dataset, n_clients: int, n: int, rho: float, seed: list[int],
              exclude: np.ndarray | None, split: str, hint: str, after_global: int = 0) -> list[np.ndarray]:
    part = DominantLabelPartitioner(n_clients, n, rho, data.num_classes, seed=seed, exclude=exclude)
    part.dataset = ds
    try:
        return [part.partition_indices(k) for k in range(n_clients)]
    except PoolTooSmall as e:
        raise _pool_error(split, e, data, hint, after_global) from None


def make_split(data: TextData, cfg: PartitionConfig, seed: int) -> Split:
    """Client train/test index arrays and the global test set; the same seed gives identical arrays."""
    seed = int(seed) % 2**32  # numpy seed sequences and datasets.shuffle want a non-negative 32-bit seed
    test_labels = labels_of(data.test)
    global_test = _global_test(test_labels, data, cfg, seed)
    test_hint = "lower partition.n_test or partition.n_global_test"
    if cfg.scheme == "dominant":
        train = _dominant(data, data.train, cfg.n_clients, cfg.n_train, cfg.rho, [seed, _TRAIN], None,
                          "train", "lower partition.n_train or partition.rho")
        test = _dominant(data, data.test, cfg.n_clients, cfg.n_test, cfg.rho, [seed, _TEST], global_test,
                         "test", test_hint, cfg.n_global_test)
    elif cfg.scheme in ("dirichlet", "pathological", "iid"):
        train_labels = labels_of(data.train)
        train = [capped(idx, train_labels, cfg.max_train_per_client) for idx in _flower_train(data, cfg, seed)]
        counts = np.stack([largest_remainder(np.bincount(train_labels[idx], minlength=data.num_classes),
                                             cfg.n_test) for idx in train])
        try:
            test = draw_by_counts(test_labels, counts, np.random.default_rng([seed, _TEST]), exclude=global_test)
        except PoolTooSmall as e:
            raise _pool_error("test", e, data, test_hint, cfg.n_global_test) from None
    else:
        raise UserError(f"partition.scheme = {cfg.scheme!r}: expected dominant, dirichlet, pathological or iid")
    return Split(train=train, test=test, global_test=global_test)


def capped(idx: np.ndarray, labels: np.ndarray, cap: int | None) -> np.ndarray:
    """At most `cap` of a client's examples, its label proportions kept (largest remainder); `idx` is
    already in seeded random order, so the first ones of each class are a random sample of it."""
    if cap is None or len(idx) <= cap:
        return idx
    want = largest_remainder(np.bincount(labels[idx], minlength=int(labels.max()) + 1), cap)
    taken = np.zeros_like(want)
    keep = []
    for i in idx:
        c = labels[i]
        if taken[c] < want[c]:
            taken[c] += 1
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)
