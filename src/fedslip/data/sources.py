"""Load a text-classification dataset into `TextData`: AG News, CSV/JSONL files, a hub dataset, or synthetic.

Whatever the source, the result has the same shape: `train` and `test` Datasets with exactly the columns
`text` (str) and `label` (int64 in 0..num_classes-1). Every problem the user can fix (missing folder, missing
column, bad label, a file that is not UTF-8, a row with the wrong number of fields) is one `UserError` line that
names the file, the line and the value and says what to do. Where the run can honestly go on (rows with empty
text, a class only the test file has) it prints one `fedslip: warning: ...` line on stderr instead. Reading
rows is `rows.py`, labels to class ids `labels.py`, any hub dataset `hub_sources.py`.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import datasets
import numpy as np

from fedslip.config import DataConfig
from fedslip.data.hub_sources import first_line, load_hub
from fedslip.data.labels import INT_RE, encode_labels, hold_out, warn_test_only
from fedslip.data.rows import (csv_records, existing, file_format, read_csv_rows, read_jsonl_rows, read_text,
                               texts_and_labels, warn_empty)
from fedslip.data.synthetic import load_synthetic
from fedslip.data.text import TextData, make_dataset
from fedslip.errors import UserError
from fedslip.hub import hub_reachable

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
DATA_DIR_ENV = "FEDSLIP_DATA_DIR"


def load_data(cfg: DataConfig, whole_federation: bool = True) -> TextData:
    """Load the dataset that `cfg.source` names (ag_news | csv | jsonl | hf | synthetic).

    `whole_federation = False`: one node's own files, where a class its training file lacks may well be
    another node's, so no "no client can learn it" warning."""
    if cfg.source == "ag_news":
        return _load_ag_news(cfg)
    if cfg.source in ("csv", "jsonl"):
        return _load_files(cfg, whole_federation)
    if cfg.source == "hf":
        return load_hub(cfg)
    if cfg.source == "synthetic":
        return load_synthetic(cfg)
    raise UserError(f"data.source = {cfg.source!r}: expected ag_news, csv, jsonl, hf or synthetic")


# ---------------------------------------------------------------- AG News


def _load_ag_news(cfg: DataConfig) -> TextData:
    if cfg.data_dir:
        folder, origin = cfg.data_dir, "data.data_dir"
    elif os.environ.get(DATA_DIR_ENV):
        folder, origin = os.environ[DATA_DIR_ENV], DATA_DIR_ENV
    else:
        return _ag_news_from_hub(cfg.hf_name)
    root = Path(folder).expanduser()
    need = "a folder with train.csv and test.csv (AG News, label,title,description)"
    if not root.is_dir():
        raise UserError(f"{origin} = {folder}: folder not found; pass --data-dir DIR ({need})")
    for name in ("train.csv", "test.csv"):
        if not (root / name).is_file():
            raise UserError(f"{origin} = {folder}: {root / name} not found; pass --data-dir DIR ({need})")
    train_texts, train_labels = read_ag_news_csv(root / "train.csv")
    test_texts, test_labels = read_ag_news_csv(root / "test.csv")
    return TextData(make_dataset(train_texts, train_labels), make_dataset(test_texts, test_labels),
                    list(AG_NEWS_LABELS), len(AG_NEWS_LABELS),
                    f"AG News from {root} (train {len(train_labels)}, test {len(test_labels)})")


def read_ag_news_csv(path: Path) -> tuple[list[str], list[int]]:
    """Read one AG News CSV: ours (header `label,title,description`, labels 0..3) or the original
    (no header, `class,title,description`, labels 1..4). The first row's first field tells them apart.
    text = title + " " + description, as in the hub's `ag_news`."""
    texts: list[str] = []
    labels: list[int] = []
    empty: list[int] = []
    records = csv_records(path, read_text(path))
    first = next(records, None)
    if first is None:
        raise UserError(f"{path}: empty file; expected AG News rows label,title,description")
    head = first[1]
    has_header = not INT_RE.fullmatch(head[0].strip())
    if has_header and [c.strip().lower() for c in head] != ["label", "title", "description"]:
        raise UserError(f"{path}: header {','.join(head)!r} is not label,title,description "
                        "(or use the original headerless class,title,description format)")
    offset = 0 if has_header else 1  # the original files count classes from 1
    for line, row in (records if has_header else itertools.chain([first], records)):
        if len(row) != 3:
            raise UserError(f"{path}: line {line} has {len(row)} fields; expected 3 "
                            "(label,title,description)")
        raw = row[0].strip()
        if not INT_RE.fullmatch(raw):
            raise UserError(f"{path}: line {line}: label {raw!r} is not an integer")
        label = int(raw) - offset
        if not 0 <= label < len(AG_NEWS_LABELS):
            allowed = "1..4 (headerless original format)" if offset else "0..3"
            raise UserError(f"{path}: line {line}: label {raw} outside {allowed}; "
                            "fix the file or use the other AG News format consistently")
        if not (row[1].strip() or row[2].strip()):
            empty.append(line)
            continue
        texts.append(f"{row[1]} {row[2]}")
        labels.append(label)
    warn_empty(path, empty, "line")
    if not labels:
        raise UserError(f"{path}: no data rows")
    return texts, labels


def _ag_news_from_hub(name: str) -> TextData:
    hint = (f"no AG News data: pass --data-dir DIR (a folder with train.csv and test.csv) or set "
            f"{DATA_DIR_ENV}, or run with network access to the Hugging Face hub")
    if not hub_reachable():
        raise UserError(hint)
    try:
        dd = datasets.load_dataset(name)
        train, test = dd["train"], dd["test"]
        texts = {s: list(d["text"]) for s, d in (("train", train), ("test", test))}
        labels = {s: np.asarray(d["label"], dtype=np.int64) for s, d in (("train", train), ("test", test))}
    except Exception as e:  # noqa: BLE001 - any hub/cache failure means "no data here"
        raise UserError(f"{hint} ({name}: {first_line(e)})") from None
    for split, lab in labels.items():
        bad = lab[(lab < 0) | (lab >= len(AG_NEWS_LABELS))]
        if len(bad):
            raise UserError(f"hub dataset {name} ({split}): label {int(bad[0])} outside 0..3; is it AG News?")
    return TextData(make_dataset(texts["train"], labels["train"]), make_dataset(texts["test"], labels["test"]),
                    list(AG_NEWS_LABELS), len(AG_NEWS_LABELS),
                    f"AG News from the hub ({name}; train {len(labels['train'])}, test {len(labels['test'])})")


# ---------------------------------------------------------------- CSV / JSONL files


def _load_files(cfg: DataConfig, whole_federation: bool = True) -> TextData:
    if not cfg.train_file:
        raise UserError(f"data.source = {cfg.source}: set data.train_file (and optionally data.test_file)")
    read = read_csv_rows if cfg.source == "csv" else read_jsonl_rows
    cols = [*cfg.text_columns, cfg.label_column]
    train_rows = read(existing(cfg.train_file, "data.train_file"), cols)
    train_texts, train_raw, _ = texts_and_labels(train_rows, cfg, cfg.train_file)
    if cfg.test_file:
        read_test = read if Path(cfg.test_file).suffix.lower() not in (".csv", ".jsonl", ".ndjson") else \
            (read_csv_rows if file_format(cfg.test_file) == "csv" else read_jsonl_rows)
        test_rows = read_test(existing(cfg.test_file, "data.test_file"), cols)
        test_texts, test_raw, test_lines = texts_and_labels(test_rows, cfg, cfg.test_file)
    else:
        test_texts, test_raw, test_lines = [], [], []
    files = {"train": cfg.train_file, "test": cfg.test_file or cfg.train_file}
    train_ids, test_ids, names = encode_labels(train_raw, test_raw, cfg.num_classes, files, cfg.label_names)
    if cfg.test_file:
        if whole_federation:
            warn_test_only(train_ids, test_ids, test_lines, names, files, "line")
    else:
        train_texts, train_ids, test_texts, test_ids = hold_out(train_texts, train_ids, cfg.test_fraction,
                                                                cfg.train_file, "pass data.test_file")
    where = cfg.train_file + (f" + {cfg.test_file}" if cfg.test_file else f" (test: {cfg.test_fraction:g} held out)")
    return TextData(make_dataset(train_texts, train_ids), make_dataset(test_texts, test_ids), names, len(names),
                    f"{cfg.source} {where} (train {len(train_ids)}, test {len(test_ids)})")
