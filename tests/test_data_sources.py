"""Loading AG News (both CSV formats, env/dir resolution, hub fallback), CSV/JSONL files and synthetic data."""

from __future__ import annotations

import collections
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedslip.config import DataConfig
from fedslip.data import sources
from fedslip.data.sources import load_data
from fedslip.errors import UserError

from conftest import ag_news_dir


# (label 0..3, title, description); titles/descriptions include a comma, a quote and a newline on purpose
AG_ROWS = [
    (0, "Talks resume", "Leaders meet, again."),
    (1, "Cup final", 'The "big" match\nends 2-1.'),
    (2, "Stocks up", "Markets rally."),
    (3, "New chip", "Faster, smaller."),
    (2, "Oil falls", "Prices drop."),
]


def write_ag(folder: Path, rows, original: bool = False) -> None:
    """Write rows to train.csv and test.csv, in our format or the original headerless 1..4 one."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.csv", "test.csv"):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if not original:
                w.writerow(["label", "title", "description"])
            for label, title, desc in rows:
                w.writerow([label + 1 if original else label, title, desc])


def columns_ok(ds) -> None:
    assert ds.column_names == ["text", "label"]
    assert ds.features["label"].dtype == "int64"
    assert ds.features["text"].dtype == "string"


@pytest.mark.parametrize("original", [False, True])
def test_ag_news_both_formats(tmp_path, original):
    write_ag(tmp_path, AG_ROWS, original=original)
    data = load_data(DataConfig(source="ag_news", data_dir=str(tmp_path)))
    for ds in (data.train, data.test):
        columns_ok(ds)
        assert ds["label"][:] == [r[0] for r in AG_ROWS]
        assert ds["text"][:] == [f"{t} {d}" for _, t, d in AG_ROWS]
    assert data.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert data.num_classes == 4


def test_ag_news_real_folder():
    data = load_data(DataConfig(source="ag_news", data_dir=str(ag_news_dir())))
    assert (len(data.train), len(data.test)) == (10429, 7600)
    train_labels, test_labels = np.asarray(data.train["label"][:]), np.asarray(data.test["label"][:])
    assert np.bincount(test_labels).tolist() == [1900] * 4
    assert np.bincount(train_labels).tolist() == [2630, 2452, 2594, 2753]  # from the data README
    assert train_labels.min() == 0 and train_labels.max() == 3
    assert data.train[0]["text"].startswith("Wall St. Bears Claw Back Into the Black (Reuters) Reuters - ")


def test_data_dir_from_env(tmp_path, monkeypatch):
    write_ag(tmp_path / "env", AG_ROWS[:2])
    write_ag(tmp_path / "cfg", AG_ROWS)
    monkeypatch.setenv("FEDSLIP_DATA_DIR", str(tmp_path / "env"))
    assert len(load_data(DataConfig(source="ag_news")).train) == 2
    # an explicit data_dir wins over the environment
    assert len(load_data(DataConfig(source="ag_news", data_dir=str(tmp_path / "cfg"))).train) == len(AG_ROWS)


def test_missing_dir_and_missing_file(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="nope: folder not found"):
        load_data(DataConfig(source="ag_news", data_dir=str(missing)))
    monkeypatch.setenv("FEDSLIP_DATA_DIR", str(missing))
    with pytest.raises(UserError, match="FEDSLIP_DATA_DIR"):
        load_data(DataConfig(source="ag_news"))
    write_ag(tmp_path / "half", AG_ROWS)
    (tmp_path / "half" / "test.csv").unlink()
    with pytest.raises(UserError, match="test.csv not found"):
        load_data(DataConfig(source="ag_news", data_dir=str(tmp_path / "half")))


def test_no_data_and_no_hub(monkeypatch):
    monkeypatch.delenv("FEDSLIP_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UserError, match="no AG News data: pass --data-dir DIR .*FEDSLIP_DATA_DIR"):
        load_data(DataConfig(source="ag_news"))


def test_hub_failure_is_user_error(monkeypatch):
    monkeypatch.delenv("FEDSLIP_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: True)

    def boom(*args, **kwargs):
        raise ConnectionError("offline\nsecond line")

    monkeypatch.setattr(sources.datasets, "load_dataset", boom)
    with pytest.raises(UserError, match="no AG News data") as info:
        load_data(DataConfig(source="ag_news"))
    assert "\n" not in str(info.value) and "offline" in str(info.value)
    with pytest.raises(UserError, match="data.hf_name"):
        load_data(DataConfig(source="hf", hf_name="someone/thing"))


@pytest.mark.parametrize("original,bad", [(False, 4), (False, 5), (True, 0), (True, 5)])
def test_ag_news_label_out_of_range(tmp_path, original, bad):
    write_ag(tmp_path, AG_ROWS, original=original)
    with open(tmp_path / "train.csv", "a", newline="") as f:
        csv.writer(f).writerow([bad, "x", "y"])
    with pytest.raises(UserError, match=rf"train.csv: line \d+: label {bad} outside"):
        load_data(DataConfig(source="ag_news", data_dir=str(tmp_path)))


def write_csv(path: Path, header, rows) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_csv_without_label_column(tmp_path):
    f = write_csv(tmp_path / "a.csv", ["text", "category"], [["hi", 0], ["yo", 1]])
    with pytest.raises(UserError, match=r"no column 'label' \(columns: text, category\)"):
        load_data(DataConfig(source="csv", train_file=f))


def test_csv_needs_train_file():
    with pytest.raises(UserError, match="data.train_file"):
        load_data(DataConfig(source="csv"))


def test_csv_label_out_of_range(tmp_path):
    f = write_csv(tmp_path / "a.csv", ["text", "label"], [["a", 0], ["b", 1], ["c", 3]])
    with pytest.raises(UserError, match=r"a.csv: label 3 outside 0..2"):
        load_data(DataConfig(source="csv", train_file=f, num_classes=3))
    g = write_csv(tmp_path / "b.csv", ["text", "label"], [["a", 0], ["b", -1]])
    with pytest.raises(UserError, match=r"b.csv: label -1 outside"):
        load_data(DataConfig(source="csv", train_file=g))


def test_csv_missing_label_names_row(tmp_path):
    f = write_csv(tmp_path / "a.csv", ["text", "label"], [["a", 0], ["b", ""], ["c", 1]])
    with pytest.raises(UserError, match="row 2: missing 'label'"):
        load_data(DataConfig(source="csv", train_file=f))


def test_csv_string_labels_and_text_columns(tmp_path):
    rows = [["good", "film", "pos"], ["bad", "", "neg"], ["meh", "ok", "neutral"], ["great", "fun", "pos"]]
    train = write_csv(tmp_path / "train.csv", ["title", "body", "sentiment"], rows)
    test = write_csv(tmp_path / "test.csv", ["title", "body", "sentiment"], [["awful", "x", "neg"]])
    data = load_data(DataConfig(source="csv", train_file=train, test_file=test,
                                text_columns=["title", "body"], label_column="sentiment"))
    assert data.label_names == ["neg", "neutral", "pos"]  # sorted names -> 0, 1, 2
    assert data.num_classes == 3
    assert data.train["label"][:] == [2, 0, 1, 2]
    assert data.train["text"][:] == ["good film", "bad ", "meh ok", "great fun"]
    assert data.test["label"][:] == [0]
    columns_ok(data.train)


def test_csv_holdout_is_stratified_and_fixed(tmp_path):
    rows = [[f"a{i}", 0] for i in range(20)] + [[f"b{i}", 1] for i in range(12)]
    f = write_csv(tmp_path / "a.csv", ["text", "label"], rows)
    cfg = DataConfig(source="csv", train_file=f, test_fraction=0.25)
    data = load_data(cfg)
    # round(0.25 * 20) = 5 and round(0.25 * 12) = 3 held out
    assert collections.Counter(data.test["label"][:]) == {0: 5, 1: 3}
    assert collections.Counter(data.train["label"][:]) == {0: 15, 1: 9}
    assert sorted(data.train["text"][:] + data.test["text"][:]) == sorted(r[0] for r in rows)
    assert load_data(cfg).test["text"][:] == data.test["text"][:]


def test_jsonl(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 3}) for i in range(9)) + "\n\n")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"text": "q", "label": 2}) + "\n")
    data = load_data(DataConfig(source="jsonl", train_file=str(train), test_file=str(test)))
    assert data.num_classes == 3 and data.label_names == ["0", "1", "2"]
    assert data.train["label"][:] == [i % 3 for i in range(9)]
    assert data.test["text"][:] == ["q"]
    columns_ok(data.test)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a", "label": 0}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(UserError, match="row 2: missing 'label'"):
        load_data(DataConfig(source="jsonl", train_file=str(bad)))


def test_synthetic_deterministic_and_balanced():
    cfg = DataConfig(source="synthetic", synthetic_per_class=40, num_classes=5)
    a, b = load_data(cfg), load_data(cfg)
    assert a.train["text"][:] == b.train["text"][:] and a.test["label"][:] == b.test["label"][:]
    assert a.num_classes == 5 and len(a.label_names) == 5
    for ds in (a.train, a.test):
        columns_ok(ds)
        assert np.bincount(ds["label"][:]).tolist() == [40] * 5
        lengths = [len(t.split()) for t in ds["text"][:]]
        assert min(lengths) >= 5 and max(lengths) <= 30 and len(set(lengths)) > 10
    assert a.train["text"][:] != a.test["text"][:]
    assert load_data(DataConfig(source="synthetic", synthetic_per_class=3)).num_classes == 4


def test_synthetic_learnable_but_not_trivial():
    """A bag-of-words naive Bayes learns it well above chance, yet not perfectly."""
    data = load_data(DataConfig(source="synthetic", synthetic_per_class=300))
    counts = [collections.Counter() for _ in range(data.num_classes)]
    for text, label in zip(data.train["text"][:], data.train["label"][:]):
        counts[label].update(text.split())
    vocab = set().union(*counts)
    totals = [sum(c.values()) for c in counts]

    def predict(text):
        return int(np.argmax([sum(np.log((c[w] + 1) / (t + len(vocab))) for w in text.split())
                              for c, t in zip(counts, totals)]))

    acc = np.mean([predict(t) == y for t, y in zip(data.test["text"][:], data.test["label"][:])])
    assert 0.6 < acc < 0.99


def fake_hub(monkeypatch, dd) -> None:
    monkeypatch.delenv("FEDSLIP_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(sources.datasets, "load_dataset", lambda name, *a, **k: dd)


def test_hf_source_class_label_names_and_holdout(monkeypatch):
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                                  "y": datasets.ClassLabel(names=["neg", "pos"])})
    train = datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in range(10)], "idx": list(range(10)),
                                        "y": [i % 2 for i in range(10)]}, features=features)
    fake_hub(monkeypatch, datasets.DatasetDict({"train": train}))
    data = load_data(DataConfig(source="hf", hf_name="x/y", text_columns=["sentence"], label_column="y",
                                test_fraction=0.2))
    assert data.label_names == ["neg", "pos"]
    columns_ok(data.train)
    assert collections.Counter(data.test["label"][:]) == {0: 1, 1: 1}  # round(0.2 * 5) per class
    assert len(data.train) == 8


def test_ag_news_from_fake_hub(monkeypatch):
    import datasets

    split = datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": [0, 3]})
    fake_hub(monkeypatch, datasets.DatasetDict({"train": split, "test": split}))
    data = load_data(DataConfig(source="ag_news"))
    assert data.train["text"][:] == ["a b", "c d"] and data.test["label"][:] == [0, 3]
    bad = datasets.Dataset.from_dict({"text": ["a"], "label": [7]})
    fake_hub(monkeypatch, datasets.DatasetDict({"train": bad, "test": bad}))
    with pytest.raises(UserError, match="label 7 outside 0..3"):
        load_data(DataConfig(source="ag_news"))
