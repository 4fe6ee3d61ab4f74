"""Rows of a CSV or JSON Lines file: read whole, each with the line it starts on, every column the config
names checked; a row's text columns joined into one text. Every problem is one `UserError` line naming the
file, the line and what to do; rows with empty text are dropped with one warning."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

from fedslip.config import DataConfig
from fedslip.errors import UserError, warn


CONFIG_HINT = "set data.text_columns / data.label_column"


def file_format(path: str) -> str:
    """csv or jsonl, by the file's suffix (.jsonl and .ndjson are JSON Lines)."""
    return "jsonl" if Path(path).suffix.lower() in (".jsonl", ".ndjson") else "csv"


def existing(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{key} = {path}: file not found")
    return p


def read_text(path: Path) -> str:
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


def csv_records(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
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
    records = csv_records(path, read_text(path))
    _, header = next(records, (0, []))
    if not header:
        raise UserError(f"{path}: empty file; expected a header row naming the columns, then data rows")
    check_columns(path, columns, header, hint)
    rows = []
    for line, fields in records:
        extra = fields[len(header):]
        if len(fields) < len(header) or any(f.strip() for f in extra):
            hint = ("quote fields that contain commas" if extra else
                    "add the missing fields, or close a quote left open")
            raise UserError(f"{path}: line {line}: row has {count(len(fields), 'field')}, expected "
                            f"{len(header)} ({','.join(header)}); {hint}")
        rows.append((line, dict(zip(header, fields))))
    if not rows:
        raise UserError(f"{path}: no data rows")
    return rows


def read_jsonl_rows(path: Path, columns: list[str], hint: str = CONFIG_HINT) -> list[tuple[int, dict]]:
    """(line, object) per non-blank line; every object must have every column (JSON null is allowed)."""
    rows = []
    for n, line in enumerate(io.StringIO(read_text(path), newline=None), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {n} is not a JSON object")
        if not rows:
            check_columns(path, columns, list(row), hint)
        missing = [c for c in columns if c not in row]
        if missing:
            raise UserError(f"{path}: line {n}: missing {missing[0]!r} (keys: {', '.join(row) or 'none'}); "
                            "add it or remove the line")
        rows.append((n, row))
    if not rows:
        raise UserError(f"{path}: no data rows")
    return rows


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_columns(path, wanted: list[str], present: list[str], hint: str = CONFIG_HINT) -> None:
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


def texts_and_labels(rows: list[tuple[int, dict]], cfg: DataConfig, file: str,
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
    warn_empty(file, empty, unit)
    if rows and not texts:
        raise UserError(f"{file}: every row has empty text (data.text_columns = {', '.join(cfg.text_columns)})")
    return texts, labels, lines


def warn_empty(file, empty: list[int], unit: str) -> None:
    if empty:
        warn(f"{file}: {count(len(empty), 'row')} with empty text dropped (first at {unit} {empty[0]})")
