"""Client splits: exact dominant-class counts, disjointness, determinism, flwr-datasets schemes, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedslip.config import DataConfig, PartitionConfig
from fedslip.data.partition import DominantLabelPartitioner, make_split
from fedslip.data.split import describe_split
from fedslip.data.sources import load_data
from fedslip.data.text import TextData, make_dataset
from fedslip.errors import UserError

from conftest import ag_news_dir



def blocks(per_class: int, n_classes: int, seed: int) -> TextData:
    """`per_class` rows of each class in a shuffled order; text names the row so indices can be checked."""
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(n_classes), per_class))
    texts = [f"row{i} class{y}" for i, y in enumerate(labels)]
    ds = make_dataset(texts, labels)
    return TextData(ds, make_dataset(texts, labels), [f"c{c}" for c in range(n_classes)], n_classes, "blocks")


def with_test(train_per_class: int, test_per_class: int, n_classes: int = 4) -> TextData:
    tr, te = blocks(train_per_class, n_classes, 1), blocks(test_per_class, n_classes, 2)
    return TextData(tr.train, te.test, tr.label_names, n_classes, "blocks")


def label_counts(ds, idx, n_classes) -> list[int]:
    return np.bincount(np.asarray(ds["label"][:])[idx], minlength=n_classes).tolist()


def assert_disjoint(split) -> None:
    for a, b in itertools.combinations(split.train, 2):
        assert not set(a.tolist()) & set(b.tolist())
    for a, b in itertools.combinations(split.test, 2):
        assert not set(a.tolist()) & set(b.tolist())
    glob = set(split.global_test.tolist())
    for t in split.test:
        assert not glob & set(t.tolist())
    for arr in [*split.train, *split.test, split.global_test]:
        assert arr.dtype == np.int64 and len(set(arr.tolist())) == len(arr)


# Hand-computed protocol counts for C = 4:
#   train n = 53, rho = .7: own = round(37.1) = 37, rest 16 over 3 others -> 6, 5, 5 (lowest-numbered first)
#   test  n = 21, rho = .7: own = round(14.7) = 15, rest 6 -> 2, 2, 2
TRAIN_53 = {0: [37, 6, 5, 5], 1: [6, 37, 5, 5], 2: [6, 5, 37, 5], 3: [6, 5, 5, 37]}
TEST_21 = {0: [15, 2, 2, 2], 1: [2, 15, 2, 2], 2: [2, 2, 15, 2], 3: [2, 2, 2, 15]}


def test_dominant_counts_exact():
    data = with_test(120, 60)
    cfg = PartitionConfig(scheme="dominant", n_clients=6, rho=0.7, n_train=53, n_test=21, n_global_test=10)
    split = make_split(data, cfg, seed=3)
    for k in range(6):  # clients 4 and 5 repeat the dominant classes 0 and 1
        assert label_counts(data.train, split.train[k], 4) == TRAIN_53[k % 4]
        assert label_counts(data.test, split.test[k], 4) == TEST_21[k % 4]
    assert label_counts(data.test, split.global_test, 4) == [10, 10, 10, 10]
    assert_disjoint(split)
    info = describe_split(data, split)
    assert [d["dominant_label"] for d in info] == [0, 1, 2, 3, 0, 1]
    assert all(d["n_train"] == 53 and d["n_test"] == 21 for d in info)
    assert info[1]["train_label_counts"] == TRAIN_53[1]


def test_dominant_deterministic_and_seed_sensitive():
    data = with_test(120, 60)
    cfg = PartitionConfig(scheme="dominant", n_clients=4, rho=0.7, n_train=53, n_test=21, n_global_test=10)
    a, b, c = make_split(data, cfg, 0), make_split(data, cfg, 0), make_split(data, cfg, 1)
    for x, y in zip(a.train + a.test + [a.global_test], b.train + b.test + [b.global_test]):
        assert np.array_equal(x, y)
    assert not np.array_equal(a.train[0], c.train[0])
    assert not np.array_equal(a.global_test, c.global_test)


def test_dominant_partitioner_is_a_flower_partitioner():
    data = with_test(120, 60)
    part = DominantLabelPartitioner(num_partitions=4, n_per_partition=53, rho=0.7, num_classes=4, seed=5)
    part.dataset = data.train
    assert part.num_partitions == 4
    p2 = part.load_partition(2)
    assert len(p2) == 53
    assert np.bincount(np.asarray(p2["label"][:]), minlength=4).tolist() == TRAIN_53[2]
    assert p2["text"][:] == [data.train[int(i)]["text"] for i in part.partition_indices(2)]


def test_pool_too_small_errors():
    data = with_test(120, 60)
    # own = 0.5 * 200 = 100, rest 100 -> 34/33/33; class 0 needs 100 + 3 * 34 = 202 of its 120
    cfg = PartitionConfig(scheme="dominant", n_clients=4, rho=0.5, n_train=200, n_test=10, n_global_test=10)
    with pytest.raises(UserError, match=r"partition: train needs 202 examples of class 0 \(c0\) but the pool "
                                        r"has 120; lower partition.n_train"):
        make_split(data, cfg, 0)
    # test: 4 clients x 21 -> class 0 needs 15 + 3 * 2 = 21 but only 60 - 55 = 5 are left after the global set
    cfg = PartitionConfig(scheme="dominant", n_clients=4, rho=0.7, n_train=53, n_test=21, n_global_test=55)
    with pytest.raises(UserError, match=r"test needs 21 examples of class 0 .* pool has 5 after the "
                                        r"55-per-class global test set"):
        make_split(data, cfg, 0)
    cfg = PartitionConfig(scheme="dominant", n_clients=4, n_train=10, n_test=5, n_global_test=61)
    with pytest.raises(UserError, match="global test needs 61 examples of class 0"):
        make_split(data, cfg, 0)


def test_reference_protocol_on_real_ag_news():
    data = load_data(DataConfig(source="ag_news", data_dir=str(ag_news_dir())))
    cfg = PartitionConfig(scheme="dominant", n_clients=4, rho=0.8, n_train=2000, n_test=500, n_global_test=400)
    split = make_split(data, cfg, 0)
    # 0.8 * 2000 = 1600, 400 over 3 -> 134/133/133; 0.8 * 500 = 400, 100 over 3 -> 34/33/33
    assert label_counts(data.train, split.train[1], 4) == [134, 1600, 133, 133]
    assert label_counts(data.test, split.test[3], 4) == [34, 33, 33, 400]
    assert label_counts(data.test, split.global_test, 4) == [400] * 4
    assert_disjoint(split)


SYN = DataConfig(source="synthetic", synthetic_per_class=120)


@pytest.mark.parametrize("scheme", ["dirichlet", "pathological", "iid"])
def test_flower_schemes(scheme):
    data = load_data(SYN)
    cfg = PartitionConfig(scheme=scheme, n_clients=4, n_train=100, n_test=30, n_global_test=20, alpha=0.5,
                          classes_per_client=2)
    split = make_split(data, cfg, 0)
    assert_disjoint(split)
    assert label_counts(data.test, split.global_test, 4) == [20] * 4
    train_labels, test_labels = np.asarray(data.train["label"][:]), np.asarray(data.test["label"][:])
    for tr, te in zip(split.train, split.test):
        assert len(te) == 30 and len(tr) > 0
        tr_counts = np.bincount(train_labels[tr], minlength=4)
        te_counts = np.bincount(test_labels[te], minlength=4)
        # largest-remainder rounding: each class within 1 of its exact share of the 30 test examples
        assert np.all(np.abs(te_counts - 30 * tr_counts / tr_counts.sum()) < 1)
        if scheme == "pathological":
            assert np.count_nonzero(tr_counts) <= 2
        if scheme == "iid":
            assert len(tr) == 100  # 480 rows / 4 clients = 120 each, capped at n_train
    other = make_split(data, cfg, 1)
    assert any(not np.array_equal(a, b) for a, b in zip(split.train, other.train))
    again = make_split(data, cfg, 0)
    assert all(np.array_equal(a, b) for a, b in zip(split.train + split.test, again.train + again.test))


def test_dirichlet_uses_all_rows():
    data = load_data(SYN)
    split = make_split(data, PartitionConfig(scheme="dirichlet", n_clients=3, n_test=10, n_global_test=10), 0)
    assert sorted(np.concatenate(split.train).tolist()) == list(range(len(data.train)))


def test_flower_scheme_errors():
    data = load_data(SYN)
    with pytest.raises(UserError, match="classes_per_client = 5: the data has only 4 classes"):
        make_split(data, PartitionConfig(scheme="pathological", classes_per_client=5, n_global_test=10,
                                         n_test=10), 0)
    # 12 rows, 6 clients: with alpha this small each class lands on one client, so at most 4 clients get
    # data and flwr gives up after its 10 resampling attempts
    tiny = with_test(3, 40)
    with pytest.raises(UserError, match="partition: dirichlet partitioning failed .*raise partition.alpha"):
        make_split(tiny, PartitionConfig(scheme="dirichlet", n_clients=6, alpha=0.001, n_test=2,
                                         n_global_test=2), 0)
    with pytest.raises(UserError, match="more clients than the 12 training examples"):
        make_split(tiny, PartitionConfig(scheme="iid", n_clients=13, n_test=2, n_global_test=2), 0)
    # test pool: 40 per class - 35 global = 5 left, but 4 iid clients x 30 need ~30 of each class
    data40 = with_test(100, 40)
    with pytest.raises(UserError, match="partition: test needs .* after the 35-per-class global test set"):
        make_split(data40, PartitionConfig(scheme="iid", n_clients=4, n_train=50, n_test=30, n_global_test=35), 0)


def test_cap_keeps_at_most_max_train_per_client_in_proportion():
    data = with_test(200, 40)
    full = make_split(data, PartitionConfig(scheme="dirichlet", n_clients=3, n_test=10, n_global_test=10), 0)
    cap = 30
    split = make_split(data, PartitionConfig(scheme="dirichlet", n_clients=3, n_test=10, n_global_test=10,
                                             max_train_per_client=cap), 0)
    for whole, part in zip(full.train, split.train):
        assert len(part) == min(cap, len(whole)) and set(part) <= set(whole)
        if len(whole) > cap:  # label proportions kept (largest remainder: within one example per class)
            got = np.array(label_counts(data.train, part, 4))
            share = np.array(label_counts(data.train, whole, 4)) * cap / len(whole)
            assert np.all(np.abs(got - share) < 1.0 + 1e-9)
    assert_disjoint(split)
