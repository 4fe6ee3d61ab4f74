"""Loading AG News (both CSV formats, env/dir resolution, hub fallback), CSV/JSONL files and synthetic data."""

from __future__ import annotations

import collections
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedslip.config import DataConfig
from fedslip.data import hub_sources, rows, sources
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
    folder = ag_news_dir()
    data = load_data(DataConfig(source="ag_news", data_dir=str(folder)))
    for split, ds in (("train", data.train), ("test", data.test)):  # the files read with the csv module alone
        with open(folder / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert ds["label"][:] == [int(r["label"]) for r in rows]
        assert ds["text"][:] == [f"{r['title']} {r['description']}" for r in rows]
    assert np.bincount(np.asarray(data.test["label"][:])).tolist() == [1900] * 4  # the data README's balance


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
    monkeypatch.setattr(hub_sources, "hub_reachable", lambda timeout=3.0: True)

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
    with pytest.raises(UserError, match="a.csv: line 3: missing 'label'"):  # the header is line 1
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


def test_a_file_too_small_to_hold_out_a_test_set_says_so(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\na,0\nb,1\n")  # one row a class: 20 % of it rounds to none
    with pytest.raises(UserError, match=r"train.csv: too few rows to hold out a test set; raise "
                                        r"data.test_fraction or pass data.test_file"):
        load_data(DataConfig(source="csv", train_file=str(train)))


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
    with pytest.raises(UserError, match="bad.jsonl: line 2: missing 'label'"):
        load_data(DataConfig(source="jsonl", train_file=str(bad)))
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    for bad_row, says in (({"text": ["x", "y"], "label": 0}, "line 3: 'text' holds a list"),
                          ({"text": "x", "label": {"id": 1}}, "line 3: 'label' holds an object")):
        bad.write_text("".join(json.dumps(r) + "\n" for r in [*rows, bad_row]))
        with pytest.raises(UserError, match=f"bad.jsonl: {says}.*, not a single value"):
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
    monkeypatch.setattr(hub_sources, "hub_reachable", lambda timeout=3.0: True)
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


def test_hf_config_and_test_split(monkeypatch):
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})

    def split(labels):
        return datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in range(len(labels))], "label": labels},
                                          features=features)

    glue = datasets.DatasetDict({"train": split([0, 1] * 5), "validation": split([1, 0, 1]),
                                 "test": split([-1] * 4)})  # GLUE's way: the test split is unlabeled
    asked = []
    fake_hub(monkeypatch, glue)
    monkeypatch.setattr(sources.datasets, "load_dataset", lambda *a, **k: asked.append(a) or glue)
    cfg = DataConfig(source="hf", hf_name="nyu-mll/glue", hf_config="sst2", text_columns=["sentence"])
    with pytest.raises(UserError, match=r"^hub dataset nyu-mll/glue \(sst2\) \(test\): every label is -1.*"
                                        r"data.hf_test_split"):
        load_data(cfg)
    assert asked == [("nyu-mll/glue", "sst2")]
    data = load_data(replace(cfg, hf_test_split="validation"))
    assert data.test["label"][:] == [1, 0, 1] and data.label_names == ["negative", "positive"]
    assert len(data.train) == 10
    held = load_data(replace(cfg, hf_test_split=""))  # held out of train: 20 % of each class
    assert len(held.train) == 8 and sorted(held.test["label"][:]) == [0, 1]
    for bad, says in (("dev", "no such split"), ("train", "cannot test on its training split")):
        with pytest.raises(UserError, match=f"data.hf_test_split = '{bad}': .*{says}"):
            load_data(replace(cfg, hf_test_split=bad))
    assert asked[-1] == ("nyu-mll/glue", "sst2")
    load_data(DataConfig(source="hf", hf_name="x/y", text_columns=["sentence"], hf_test_split="validation"))
    assert asked[-1] == ("x/y",)  # no config: none passed
    plain = datasets.DatasetDict({n: datasets.Dataset.from_dict({"sentence": ["a", "b", "c", "d"][:len(labels)],
                                                                  "label": labels})
                                  for n, labels in (("train", [0, 1, 0, 1]), ("test", [-1, -1]))})
    monkeypatch.setattr(sources.datasets, "load_dataset", lambda *a, **k: plain)  # int labels, no ClassLabel
    with pytest.raises(UserError, match=r"\(test\): every label is -1.*data.hf_test_split"):
        load_data(cfg)
    tiny = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]})})
    monkeypatch.setattr(sources.datasets, "load_dataset", lambda *a, **k: tiny)  # one row a class, no test split
    with pytest.raises(UserError, match=r"\(train\): too few rows to hold out a test set; .*data.hf_test_split"):
        load_data(cfg)


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


# ---------------------------------------------------------------- broken files: one clear line each


def warnings_of(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()


@pytest.mark.parametrize("source", ["csv", "jsonl", "ag_news"])
def test_not_utf8_names_file_and_line(tmp_path, source):
    """A latin-1 file (as spreadsheets save it) is one error at the line of the first bad byte (é, line 4)."""
    rows = [("hello", 0), ("world", 1), ("café au lait", 0), ("bye", 1)]
    if source == "csv":
        body = "text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)
    elif source == "jsonl":
        body = "\n" + "".join(f'{{"text": "{t}", "label": {y}}}\n' for t, y in rows)  # blank line 1
    else:
        body = "label,title,description\n" + "".join(f"{y},{t},d\n" for t, y in rows)
    name = "train.csv" if source == "ag_news" else f"data.{source}"
    (tmp_path / name).write_bytes(body.encode("latin-1"))
    (tmp_path / "test.csv").write_text("label,title,description\n0,a,b\n")
    cfg = (DataConfig(source="ag_news", data_dir=str(tmp_path)) if source == "ag_news"
           else DataConfig(source=source, train_file=str(tmp_path / name)))
    with pytest.raises(UserError) as info:
        load_data(cfg)
    msg = str(info.value)
    assert f"{name}: line 4: byte 0xe9 is not UTF-8" in msg and "re-save the file as UTF-8" in msg
    assert "\n" not in msg


def test_utf16_file_says_so(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("text,label\nhi,0\nyo,1\n", encoding="utf-16")
    with pytest.raises(UserError, match=r"a.csv: line 1: .*looks like UTF-16"):
        load_data(DataConfig(source="csv", train_file=str(f)))


# a quoted text with a comma and two line breaks: rows after it start two physical lines later
MULTILINE = '"Cup final, replayed","The ""big"" match\nends\n2-1.",Sports\n'


@pytest.mark.parametrize("row,fields", [("Sports\n", 1), ("Oil falls,Prices drop.,Business,extra\n", 4),
                                        ("Oil falls,Prices, drop.,Business\n", 4), ('Oil falls,"Prices\ndrop."\n', 2)])
def test_csv_row_with_wrong_field_count(tmp_path, row, fields):
    """Too few fields used to make a class named after the only value; too many silently cut the text."""
    f = tmp_path / "news.csv"
    f.write_text("title,body,topic\nTalks resume,Leaders meet.,World\n" + MULTILINE + row + "a,b,World\n")
    with pytest.raises(UserError) as info:  # header 1, row 2, multi-line row 3-5: the bad row is line 6
        load_data(DataConfig(source="csv", train_file=str(f), text_columns=["title", "body"], label_column="topic"))
    assert f"news.csv: line 6: row has {fields} field{'s' if fields > 1 else ''}, expected 3 (title,body,topic)" \
        in str(info.value)


def test_csv_extra_empty_fields_and_blank_rows_are_fine(tmp_path, capsys):
    """Spreadsheet exports add trailing commas and all-empty rows; nothing is lost by ignoring them."""
    f = tmp_path / "a.csv"
    f.write_text("text,label\na,0,,\n,,\n\nb,1,\nc,0\nd,1\n")
    data = load_data(DataConfig(source="csv", train_file=str(f), test_file=str(f)))
    assert data.train["text"][:] == ["a", "b", "c", "d"] and data.train["label"][:] == [0, 1, 0, 1]
    assert warnings_of(capsys) == []


def test_realistic_csv_loads(tmp_path, capsys):
    """A well-formed third-party CSV: UTF-8 BOM, CRLF, quoted commas and quotes, line breaks inside a text,
    non-ASCII text, string labels. Everything loads as written, with no warning."""
    rows = [["Talks resume", "Leaders meet, again.", "World"],
            ["Cup final", 'The "big" match\r\nends 2-1.', "Sports"],
            ["Café opens", "Crème brûlée, ¥100 — 寿司", "Business"],
            ["New chip", "Faster,\nsmaller.", "Sci/Tech"]]
    f = tmp_path / "news.csv"
    with open(f, "w", newline="", encoding="utf-8-sig") as fh:
        w = csv.writer(fh)  # writes \r\n line ends
        w.writerow(["title", "body", "topic"])
        w.writerows(rows)
    data = load_data(DataConfig(source="csv", train_file=str(f), test_file=str(f),
                                text_columns=["title", "body"], label_column="topic"))
    assert data.train["text"][:] == [f"{a} {b}" for a, b, _ in rows]
    assert data.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    assert data.train["label"][:] == [3, 2, 0, 1]
    assert warnings_of(capsys) == []


def test_class_only_in_test_file_warns(tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", ["text", "label"],
                      [["a", "sports"], ["b", "world"], ["c", "sports"], ["d", "world"]])
    with open(tmp_path / "test.csv", "w", newline="", encoding="utf-8") as fh:
        fh.write('text,label\n"two\nlines",sports\nstorm,weather\nrain,weather\nx,world\n')
    data = load_data(DataConfig(source="csv", train_file=train, test_file=str(tmp_path / "test.csv")))
    assert data.label_names == ["sports", "weather", "world"]  # the run goes on with 3 classes
    assert data.test["label"][:] == [0, 1, 1, 2]
    lines = warnings_of(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("fedslip: warning: ") and "test.csv: line 4: class 'weather' never appears in" in lines[0]
    assert "train.csv" in lines[0] and "capped at 2/3" in lines[0]


def test_integer_class_only_in_test_file_warns(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(4)) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(json.dumps({"text": f"q{i}", "label": y}) for i, y in enumerate([0, 1, 3, 2])) + "\n")
    data = load_data(DataConfig(source="jsonl", train_file=str(train), test_file=str(test)))
    assert data.num_classes == 4
    (line,) = warnings_of(capsys)
    assert "test.jsonl: line 3: classes '3', '2' never appear in" in line and "capped at 2/4" in line


def test_same_classes_no_warning(tmp_path, capsys):
    f = write_csv(tmp_path / "a.csv", ["text", "label"], [["a", "x"], ["b", "y"]])
    g = write_csv(tmp_path / "b.csv", ["text", "label"], [["c", "y"]])  # a class missing from test is fine here
    load_data(DataConfig(source="csv", train_file=f, test_file=g))
    assert warnings_of(capsys) == []


def test_empty_texts_dropped_with_one_warning(tmp_path, capsys):
    f = tmp_path / "data.csv"
    f.write_text('title,body,label\nT1,B1,0\n"multi\nline",x,1\n,,1\n  ," ",0\nT2,,1\n,B3,0\n, \t,1\nT4,B4,0\n')
    data = load_data(DataConfig(source="csv", train_file=str(f), test_file=str(f),
                                text_columns=["title", "body"]))
    assert data.train["text"][:] == ["T1 B1", "multi\nline x", "T2 ", " B3", "T4 B4"]
    assert data.train["label"][:] == [0, 1, 1, 0, 0]
    lines = warnings_of(capsys)  # train and test file: the same line twice, once each
    assert lines == ["fedslip: warning: " + str(f) + ": 3 rows with empty text dropped (first at line 5)"] * 2


def test_empty_texts_jsonl_and_all_empty(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"text": "a", "label": 0}, {"text": None, "label": 1},
                                                    {"text": "b", "label": 1}, {"text": "c", "label": 0}]) + "\n")
    data = load_data(DataConfig(source="jsonl", train_file=str(f), test_file=str(f)))
    assert data.train["text"][:] == ["a", "b", "c"]
    assert warnings_of(capsys)[0].endswith("d.jsonl: 1 row with empty text dropped (first at line 2)")
    g = write_csv(tmp_path / "g.csv", ["text", "label"], [["", 0], [" ", 1]])
    with pytest.raises(UserError, match="g.csv: every row has empty text"):
        load_data(DataConfig(source="csv", train_file=g))


def test_cli_broken_csv_is_one_line(tmp_path, capsys):
    """Through the command line: exit 2, one `fedslip: error:` line, no traceback, nothing written."""
    from fedslip.cli import main

    f = tmp_path.parent / f"{tmp_path.name}-data.csv"
    f.write_bytes("text,label\nhello,a\nworld,b\ncafé,a\n".encode("latin-1"))
    argv = ["run", "--quiet", "--out", str(tmp_path / "out")]
    for s in ["model.backbone=\"tiny-random:bert\"", "data.source=\"csv\"", f"data.train_file=\"{f}\""]:
        argv += ["--set", s]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == f"fedslip: error: {f}: line 4: byte 0xe9 is not UTF-8; re-save the file as UTF-8"
    assert not list(tmp_path.iterdir())


def test_jsonl_line_without_a_column(tmp_path):
    """Only the first line used to be checked for columns: a later line without "text" trained on ""."""
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "a", "label": 0}) + "\n\n" + json.dumps({"label": 1}) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl: line 3: missing 'text' \(keys: label\)"):
        load_data(DataConfig(source="jsonl", train_file=str(f)))


def test_ag_news_empty_text_dropped(tmp_path, capsys):
    write_ag(tmp_path, AG_ROWS[:2] + [(2, " ", "")] + AG_ROWS[2:])
    data = load_data(DataConfig(source="ag_news", data_dir=str(tmp_path)))
    assert data.train["text"][:] == [f"{t} {d}" for _, t, d in AG_ROWS]
    lines = warnings_of(capsys)  # the second row spans lines 3-4, so the empty one is line 5
    assert len(lines) == 2 and lines[0].endswith("train.csv: 1 row with empty text dropped (first at line 5)")


def test_an_empty_csv_file_says_so(tmp_path):
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(UserError, match="empty file"):
        rows.read_csv_rows(tmp_path / "train.csv", ["text", "label"])


def test_one_non_integer_among_integer_labels_is_a_typo_not_a_class(tmp_path):
    rows = [f"text {i},{i % 3}" for i in range(30)] + ["text x,oops"]
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(UserError, match="label 'oops' is not an integer, while 30 of 31"):
        load_data(DataConfig(source="csv", train_file=str(tmp_path / "train.csv")))
    names = [f"text {i},{['sports', 'world', 'tech'][i % 3]}" for i in range(30)]
    (tmp_path / "names.csv").write_text("text,label\n" + "\n".join(names) + "\n")  # names: still fine
    assert load_data(DataConfig(source="csv", train_file=str(tmp_path / "names.csv"))).label_names == ["sports", "tech", "world"]


def test_integer_labels_that_leave_a_class_empty_say_so(tmp_path):
    """Labels 1..3 would make a class 0 nobody has; the run would stop later at the global test set with a
    misleading line. Said at load time, with the way out (label names)."""
    f = write_csv(tmp_path / "a.csv", ["text", "label"], [["a", 1], ["b", 2], ["c", 3], ["d", 1]])
    with pytest.raises(UserError, match=r"a.csv: integer labels run 1..3, so class 0 has no example"):
        load_data(DataConfig(source="csv", train_file=f, test_file=f))
    named = load_data(DataConfig(source="csv", train_file=f, test_file=f, label_names=["1", "2", "3"]))
    assert named.num_classes == 3 and list(named.train["label"]) == [0, 1, 2, 0]


def test_a_csv_field_longer_than_the_csv_modules_default_limit_is_read(tmp_path):
    long = "word " * 40_000  # 200,000 characters: past csv.field_size_limit()'s default of 131,072
    f = write_csv(tmp_path / "a.csv", ["text", "label"], [[long, 0], ["b", 1], ["c", 0], ["d", 1]])
    data = load_data(DataConfig(source="csv", train_file=f, test_file=f))
    assert data.train["text"][0] == long.strip() or data.train["text"][0] == long


def test_a_test_file_is_read_in_its_own_format(tmp_path):
    import json as _json

    f = write_csv(tmp_path / "train.csv", ["text", "label"], [["a", 0], ["b", 1], ["c", 0], ["d", 1]])
    g = tmp_path / "test.jsonl"
    g.write_text("".join(_json.dumps({"text": t, "label": l}) + "\n" for t, l in (("e", 1), ("f", 0))), encoding="utf-8")
    data = load_data(DataConfig(source="csv", train_file=f, test_file=str(g)))
    assert list(data.test["text"]) == ["e", "f"] and list(data.test["label"]) == [1, 0]
