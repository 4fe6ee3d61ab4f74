"""Load a text-classification dataset into `TextData`: AG News, CSV/JSONL files, a hub dataset, or synthetic.

Whatever the source, the result has the same shape: `train` and `test` Datasets with exactly the columns
`text` (str) and `label` (int64 in 0..num_classes-1). Every problem the user can fix (missing folder, missing
column, bad label, a file that is not UTF-8, a row with the wrong number of fields) is one `UserError` line that
names the file, the line and the value and says what to do. Where the run can honestly go on (rows with empty
text, a class only the test file has) it prints one `fedslip: warning: ...` line on stderr instead.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np

from fedslip.config import DataConfig
from fedslip.data.synthetic import load_synthetic
from fedslip.data.text import TextData, make_dataset
from fedslip.errors import UserError, warn
from fedslip.hub import hub_reachable

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
DATA_DIR_ENV = "FEDSLIP_DATA_DIR"
HOLDOUT_SEED = 0  # fixed: the train/test hold-out must not move when the run seed changes
_INT_RE = re.compile(r"[+-]?\d+")


def load_data(cfg: DataConfig, whole_federation: bool = True) -> TextData:
    """Load the dataset that `cfg.source` names (ag_news | csv | jsonl | hf | synthetic).

    `whole_federation = False`: one node's own files, where a class its training file lacks may well be
    another node's, so no "no client can learn it" warning."""
    if cfg.source == "ag_news":
        return _load_ag_news(cfg)
    if cfg.source in ("csv", "jsonl"):
        return _load_files(cfg, whole_federation)
    if cfg.source == "hf":
        return _load_hub(cfg)
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
    records = _csv_records(path, _read_text(path))
    first = next(records, None)
    if first is None:
        raise UserError(f"{path}: empty file; expected AG News rows label,title,description")
    head = first[1]
    has_header = not _INT_RE.fullmatch(head[0].strip())
    if has_header and [c.strip().lower() for c in head] != ["label", "title", "description"]:
        raise UserError(f"{path}: header {','.join(head)!r} is not label,title,description "
                        "(or use the original headerless class,title,description format)")
    offset = 0 if has_header else 1  # the original files count classes from 1
    for line, row in (records if has_header else itertools.chain([first], records)):
        if len(row) != 3:
            raise UserError(f"{path}: line {line} has {len(row)} fields; expected 3 "
                            "(label,title,description)")
        raw = row[0].strip()
        if not _INT_RE.fullmatch(raw):
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
    _warn_empty(path, empty, "line")
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
        raise UserError(f"{hint} ({name}: {_first_line(e)})") from None
    for split, lab in labels.items():
        bad = lab[(lab < 0) | (lab >= len(AG_NEWS_LABELS))]
        if len(bad):
            raise UserError(f"hub dataset {name} ({split}): label {int(bad[0])} outside 0..3; is it AG News?")
    return TextData(make_dataset(texts["train"], labels["train"]), make_dataset(texts["test"], labels["test"]),
                    list(AG_NEWS_LABELS), len(AG_NEWS_LABELS),
                    f"AG News from the hub ({name}; train {len(labels['train'])}, test {len(labels['test'])})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


# ---------------------------------------------------------------- CSV / JSONL files


def file_format(path: str) -> str:
    """csv or jsonl, by the file's suffix (.jsonl and .ndjson are JSON Lines)."""
    return "jsonl" if Path(path).suffix.lower() in (".jsonl", ".ndjson") else "csv"


def _load_files(cfg: DataConfig, whole_federation: bool = True) -> TextData:
    if not cfg.train_file:
        raise UserError(f"data.source = {cfg.source}: set data.train_file (and optionally data.test_file)")
    read = read_csv_rows if cfg.source == "csv" else read_jsonl_rows
    cols = [*cfg.text_columns, cfg.label_column]
    train_rows = read(_existing(cfg.train_file, "data.train_file"), cols)
    train_texts, train_raw, _ = _texts_and_labels(train_rows, cfg, cfg.train_file)
    if cfg.test_file:
        read_test = read if Path(cfg.test_file).suffix.lower() not in (".csv", ".jsonl", ".ndjson") else \
            (read_csv_rows if file_format(cfg.test_file) == "csv" else read_jsonl_rows)
        test_rows = read_test(_existing(cfg.test_file, "data.test_file"), cols)
        test_texts, test_raw, test_lines = _texts_and_labels(test_rows, cfg, cfg.test_file)
    else:
        test_texts, test_raw, test_lines = [], [], []
    files = {"train": cfg.train_file, "test": cfg.test_file or cfg.train_file}
    train_ids, test_ids, names = encode_labels(train_raw, test_raw, cfg.num_classes, files, cfg.label_names)
    if cfg.test_file:
        if whole_federation:
            _warn_test_only(train_ids, test_ids, test_lines, names, files, "line")
    else:
        tr, te = stratified_holdout(train_ids, cfg.test_fraction)
        test_texts, test_ids = [train_texts[i] for i in te], train_ids[te]
        train_texts, train_ids = [train_texts[i] for i in tr], train_ids[tr]
        if len(test_ids) == 0:
            raise UserError(f"{cfg.train_file}: too few rows to hold out a test set; raise data.test_fraction "
                            "or pass data.test_file")
    where = cfg.train_file + (f" + {cfg.test_file}" if cfg.test_file else f" (test: {cfg.test_fraction:g} held out)")
    return TextData(make_dataset(train_texts, train_ids), make_dataset(test_texts, test_ids), names, len(names),
                    f"{cfg.source} {where} (train {len(train_ids)}, test {len(test_ids)})")


def _existing(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{key} = {path}: file not found")
    return p



CONFIG_HINT = "set data.text_columns / data.label_column"


def _read_text(path: Path) -> str:
    """The whole file as text. A file that is not UTF-8 (spreadsheets often save cp1252/latin-1) is one error
    naming the line of the first bad byte, not a UnicodeDecodeError traceback."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        utf16 = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise UserError(f"{path}: line {line}: byte 0x{data[e.start]:02x} is not UTF-8{utf16}; "
                        "re-save the file as UTF-8") from None


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(physical line where the record starts, fields) for each CSV record. A quoted field may span lines, so
    the start is one past where the previous record ended; rows with only empty fields are skipped."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # one long text is a field, not a quoting error
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(f"{path}: line {start}: {e}; check the quoting") from None
        if any(field.strip() for field in row):
            yield start, row


def read_csv_rows(path: Path, columns: list[str], hint: str = CONFIG_HINT) -> list[tuple[int, dict]]:
    """(line, {column: value}) per row. A row with fewer or more fields than the header is an error: with
    too few, csv.DictReader's None would shift meaning (a 1-field row `sports` became a class of its own);
    with too many, the tail of an unquoted text would be dropped. Extra fields that are all empty are fine."""
    records = _csv_records(path, _read_text(path))
    _, header = next(records, (0, []))
    if not header:
        raise UserError(f"{path}: empty file; expected a header row naming the columns, then data rows")
    _check_columns(path, columns, header, hint)
    rows = []
    for line, fields in records:
        extra = fields[len(header):]
        if len(fields) < len(header) or any(f.strip() for f in extra):
            hint = ("quote fields that contain commas" if extra else
                    "add the missing fields, or close a quote left open")
            raise UserError(f"{path}: line {line}: row has {_count(len(fields), 'field')}, expected "
                            f"{len(header)} ({','.join(header)}); {hint}")
        rows.append((line, dict(zip(header, fields))))
    if not rows:
        raise UserError(f"{path}: no data rows")
    return rows


def read_jsonl_rows(path: Path, columns: list[str], hint: str = CONFIG_HINT) -> list[tuple[int, dict]]:
    """(line, object) per non-blank line; every object must have every column (JSON null is allowed)."""
    rows = []
    for n, line in enumerate(io.StringIO(_read_text(path), newline=None), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {n} is not a JSON object")
        if not rows:
            _check_columns(path, columns, list(row), hint)
        missing = [c for c in columns if c not in row]
        if missing:
            raise UserError(f"{path}: line {n}: missing {missing[0]!r} (keys: {', '.join(row) or 'none'}); "
                            "add it or remove the line")
        rows.append((n, row))
    if not rows:
        raise UserError(f"{path}: no data rows")
    return rows


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _check_columns(path, wanted: list[str], present: list[str], hint: str = CONFIG_HINT) -> None:
    for col in wanted:
        if col not in present:
            raise UserError(f"{path}: no column {col!r} (columns: {', '.join(present) or 'none'}); {hint}")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def joined_text(row: dict, columns: list[str], where: str = "") -> str:
    """A row's text columns joined by a space, a missing value counting as "" (training and predict alike).
    A JSON array or object is no text (its Python repr would be trained on): one line, `where` first."""
    for c in columns:
        _refuse_nested(row.get(c), c, where)
    return " ".join("" if _missing(row.get(c)) else str(row.get(c)) for c in columns)


def _refuse_nested(value, column: str, where: str) -> None:
    if isinstance(value, (dict, list)):
        kind = "an object (a mapping)" if isinstance(value, dict) else "a list"
        raise UserError(f"{where}{column!r} holds {kind}, not a single value; flatten it into a string "
                        "or number (or name another column)")


def _texts_and_labels(rows: list[tuple[int, dict]], cfg: DataConfig, file: str,
                      unit: str = "line") -> tuple[list[str], list, list[int]]:
    """Join the text columns with " " (a missing one counts as ""); a missing label is an error. Rows whose
    text is empty are dropped with one warning: training on "" only teaches the label's frequency.
    Returns (texts, labels, line of each kept row); `unit` is how `file` counts rows ("line" or "row")."""
    texts, labels, lines, empty = [], [], [], []
    for n, row in rows:
        text = joined_text(row, cfg.text_columns, f"{file}: {unit} {n}: ")
        if not text.strip():
            empty.append(n)
            continue
        label = row.get(cfg.label_column)
        _refuse_nested(label, cfg.label_column, f"{file}: {unit} {n}: ")
        if _missing(label):
            raise UserError(f"{file}: {unit} {n}: missing {cfg.label_column!r}; fill it in or remove the row")
        texts.append(text)
        labels.append(label)
        lines.append(n)
    _warn_empty(file, empty, unit)
    if rows and not texts:
        raise UserError(f"{file}: every row has empty text (data.text_columns = {', '.join(cfg.text_columns)})")
    return texts, labels, lines


def _warn_empty(file, empty: list[int], unit: str) -> None:
    if empty:
        warn(f"{file}: {_count(len(empty), 'row')} with empty text dropped (first at {unit} {empty[0]})")


def _warn_test_only(train_ids: np.ndarray, test_ids: np.ndarray, test_lines: list[int], names: list[str],
                    files: dict[str, str], unit: str) -> None:
    """A class the test file has but training never saw cannot be learned, and the global test set is
    balanced over classes, so its accuracy is capped at (C-k)/C. The run can go on; say so once."""
    unseen = set(np.unique(test_ids).tolist()) - set(np.unique(train_ids).tolist())
    if not unseen:
        return
    firsts = sorted((int(np.flatnonzero(test_ids == c)[0]), c) for c in unseen)  # in file order
    k, n = len(unseen), len(names)
    shown = ", ".join(repr(names[c]) for _, c in firsts[:5]) + (f" and {k - 5} more" if k > 5 else "")
    warn(f"{files['test']}: {unit} {test_lines[firsts[0][0]]}: {'class' if k == 1 else 'classes'} {shown} "
          f"never {'appears' if k == 1 else 'appear'} in {files['train']}; no client can learn "
          f"{'it' if k == 1 else 'them'}, so accuracy on the balanced global test is capped at {n - k}/{n}")


def _as_int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and _INT_RE.fullmatch(v.strip()):
        return int(v.strip())
    return None


def encode_labels(train: list, test: list, num_classes: int | None, files: dict[str, str],
                  label_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer labels are used as they are (range 0..num_classes-1, num_classes = the given one or max+1);
    otherwise the sorted distinct label names become 0..n-1. A given label set (`label_names`, which nodes
    holding only their own files must share) fixes the order instead. Returns (train ids, test ids, names)."""
    if label_names:
        return _by_given_names(train, test, files, label_names)
    everything = list(train) + list(test)
    ints = [_as_int(v) for v in everything]
    if all(i is not None for i in ints):
        n = num_classes if num_classes is not None else max(ints) + 1
        for split, values in (("train", train), ("test", test)):
            for v in values:
                if not 0 <= _as_int(v) < n:
                    raise UserError(f"{files[split]}: label {_as_int(v)} outside 0..{n - 1}; fix the label"
                                    + ("" if num_classes is None else " or raise data.num_classes"))
        empty = sorted(set(range(n)) - set(ints)) if num_classes is None else []
        if empty:  # labels 1..5, or a gap: a class nobody has, and the balanced global test cannot be drawn
            shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
            raise UserError(f"{files['train']}: integer labels run {min(ints)}..{max(ints)}, so class {shown} has "
                            "no example; labels must be 0..C-1: relabel them, or set data.label_names to read "
                            "them as names")
        names = [str(i) for i in range(n)]
        ids = np.asarray(ints, dtype=np.int64)
    else:
        _refuse_stray_names(ints, everything, len(train), files)
        strings = [str(v).strip() for v in everything]
        names = sorted(set(strings))
        if num_classes is not None and num_classes != len(names):
            raise UserError(f"{files['train']}: {len(names)} distinct labels ({', '.join(names[:10])}) but "
                            f"data.num_classes = {num_classes}; remove data.num_classes or fix the labels")
        index = {name: i for i, name in enumerate(names)}
        ids = np.asarray([index[s] for s in strings], dtype=np.int64)
    if len(names) < 2:
        raise UserError(f"{files['train']}: only one class ({names[0]}); need at least 2 labels")
    return ids[:len(train)], ids[len(train):], names


def _refuse_stray_names(ints: list[int | None], values: list, n_train: int, files: dict[str, str]) -> None:
    """Integer labels with a few non-integers among them (≥ 90 % integers) are a typo, not a label set of
    names: taken as names, every integer would become a class name and the typo a class of its own."""
    strays = [k for k, i in enumerate(ints) if i is None]
    if len(strays) <= 0.1 * len(ints):
        k = strays[0]
        raise UserError(f"{files['train' if k < n_train else 'test']}: label {str(values[k]).strip()!r} is not an "
                        f"integer, while {len(ints) - len(strays)} of {len(ints)} labels are; fix it, or set "
                        "data.label_names to read every label as a name")


def _by_given_names(train: list, test: list, files: dict[str, str], names: list[str]):
    index = {name: i for i, name in enumerate(names)}
    out = []
    for split, values in (("train", train), ("test", test)):
        ids = []
        for v in values:
            key = str(v).strip()
            if key not in index:
                as_int = _as_int(v)
                if as_int is None or not 0 <= as_int < len(names):
                    raise UserError(f"{files[split]}: label {key!r} is not in data.label_names "
                                    f"({', '.join(names[:10])}); fix the label or the label set")
                key = names[as_int]
            ids.append(index[key])
        out.append(np.asarray(ids, dtype=np.int64))
    return out[0], out[1], list(names)


def stratified_holdout(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Hold out round(fraction * n_c) examples of each class c (seeded, fixed); returns sorted (train, test)
    indices so both keep the file's order."""
    rng = np.random.default_rng(HOLDOUT_SEED)
    test = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:int(math.floor(fraction * len(idx) + 0.5))])
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx.astype(np.int64), test_idx.astype(np.int64)


# ---------------------------------------------------------------- any hub dataset


def _load_hub(cfg: DataConfig) -> TextData:
    name = cfg.hf_name + (f" ({cfg.hf_config})" if cfg.hf_config else "")
    if not hub_reachable():
        raise UserError(f"data.hf_name = {name}: the Hugging Face hub is not reachable; run with network "
                        "access (or HF_HUB_OFFLINE=1 with the dataset cached), or use data.source = csv/jsonl")
    try:
        dd = datasets.load_dataset(cfg.hf_name, *([cfg.hf_config] if cfg.hf_config else []))
    except Exception as e:  # noqa: BLE001 - network, auth, missing dataset or config: all fixable by the user
        raise UserError(f"data.hf_name = {name}: could not load ({_first_line(e)})") from None
    if "train" not in dd:
        raise UserError(f"data.hf_name = {name}: no 'train' split (splits: {', '.join(dd)})")
    test_split = cfg.hf_test_split
    if test_split == "train":
        raise UserError("data.hf_test_split = 'train': a run cannot test on its training split; name another "
                        "split, or \"\" to hold out data.test_fraction of train")
    if test_split == "" or (test_split == "test" and "test" not in dd):
        test_split = None  # held out from train
    elif test_split not in dd:
        raise UserError(f"data.hf_test_split = {test_split!r}: {name} has no such split (splits: {', '.join(dd)})")
    cols = [*cfg.text_columns, cfg.label_column]
    _check_columns(f"hub dataset {name}", cols, dd["train"].column_names)
    feature = dd["train"].features[cfg.label_column]
    class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def columns(ds: datasets.Dataset, split: str) -> tuple[list[str], list, list[int]]:
        _check_columns(f"hub dataset {name} ({split})", cols, ds.column_names)
        rows = [dict(zip(cols, vals)) for vals in zip(*(list(ds[c]) for c in cols))]
        return _texts_and_labels(list(enumerate(rows, start=1)), cfg, f"hub dataset {name} ({split})", "row")

    train_texts, train_raw, _ = columns(dd["train"], "train")
    test_texts, test_raw, test_rows = columns(dd[test_split], test_split) if test_split else ([], [], [])
    if test_raw and all(_as_int(v) == -1 for v in test_raw):
        raise UserError(f"hub dataset {name} ({test_split}): every label is -1, an unlabeled split (as GLUE's "
                        "test splits are): set data.hf_test_split to a labeled split (\"validation\"), or to "
                        "\"\" to hold out data.test_fraction of train")
    files = {"train": f"hub dataset {name} (train)", "test": f"hub dataset {name} ({test_split or 'test'})"}
    n = cfg.num_classes if cfg.num_classes is not None else (len(class_names) if class_names else None)
    train_ids, test_ids, names = encode_labels(train_raw, test_raw, n, files, cfg.label_names)
    if class_names and len(class_names) == len(names) and not cfg.label_names:
        names = class_names
    if test_split:
        _warn_test_only(train_ids, test_ids, test_rows, names, files, "row")
    else:
        tr, te = stratified_holdout(train_ids, cfg.test_fraction)
        test_texts, test_ids = [train_texts[i] for i in te], train_ids[te]
        train_texts, train_ids = [train_texts[i] for i in tr], train_ids[tr]
    return TextData(make_dataset(train_texts, train_ids), make_dataset(test_texts, test_ids), names, len(names),
                    f"hub dataset {name} (train {len(train_ids)}, test {len(test_ids)})")
