"""Summary tables of finished runs: one row per method, as Markdown (for people) or CSV (for tools).

Rows keep raw numbers (fractions, MiB, counts, seconds); formatting happens only when writing Markdown,
so the CSV round-trips exactly what the run measured.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from fedslip.atomic import atomic_file
from fedslip.evaluation.records import MethodResult

MISSING = "—"


def percent(x: float, places: int = 1) -> str:
    """A fraction in %, halves rounded up. Accuracies are ratios of counts, so 0.9305 means 93.05 % exactly;
    binary floats would show it as 93.0 beside 93.15 as 93.2 (a 0.2-point gap that is 0.1)."""
    value = Decimal(repr(round(100 * x, 9)))  # the float's noise off, then decimal rounding
    return str(value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def _mib(x: float) -> str:
    return f"{x:.3f}"


def _count(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) else str(x)


def _seconds(x: float) -> str:
    return f"{x:.1f}"


def _plain(x: float) -> str:
    return f"{x:.4g}"


# (row key, Markdown header, formatter) in display order. The row key is also the CSV column name.
COLUMNS: list[tuple[str, str, Callable[[float], str]]] = [
    ("global_acc", "Global acc (%)", percent),
    ("client_acc_mean", "Client acc, global model (%)", percent),
    ("personal_acc_mean", "Personal synced mean (%)", percent),
    ("personal_acc_weighted", "Personal synced weighted (%)", percent),
    ("personal_acc_worst", "Personal synced worst (%)", percent),
    ("persistent_acc_mean", "Personal persistent mean (%)", percent),
    ("kstep_acc_mean", "K-step acc mean (%)", percent),
    ("newcomer_acc_mean", "Newcomer acc after joining (%)", percent),
    ("newcomer_global_acc_mean", "Newcomer acc, global model (%)", percent),
    ("mib_per_round", "MiB/round", _mib),
    ("mib_total", "MiB total", _mib),
    ("eval_mib_per_round", "Eval MiB/round", _mib),
    ("wire_mib_per_round", "Flower MiB/round", _mib),
    ("up_params", "Up params/client-round", _count),
    ("failed_uploads", "Failed uploads", _count),
    ("rejected_uploads", "Rejected uploads", _count),
    ("wall_time_s", "Wall time (s)", _seconds),
]

# Every metric `MethodResult.final` may hold, in the order the single-method table lists them.
FINAL_METRICS: list[tuple[str, str, Callable[[float], str]]] = [
    ("global_acc", "Global accuracy (%)", percent),
    ("client_acc_mean", "Client accuracy, global model, mean (%)", percent),
    ("client_acc_weighted", "Client accuracy, global model, weighted (%)", percent),
    ("client_acc_worst", "Client accuracy, global model, worst (%)", percent),
    ("personal_acc_mean", "Personalized accuracy, synced, mean (%)", percent),
    ("personal_acc_weighted", "Personalized accuracy, synced, weighted (%)", percent),
    ("personal_acc_worst", "Personalized accuracy, synced, worst (%)", percent),
    ("persistent_acc_mean", "Personalized accuracy, persistent, mean (%)", percent),
    ("persistent_acc_weighted", "Personalized accuracy, persistent, weighted (%)", percent),
    ("persistent_acc_worst", "Personalized accuracy, persistent, worst (%)", percent),
    ("kstep_acc_mean", "K-step accuracy, mean (%)", percent),
    ("kstep_acc_weighted", "K-step accuracy, weighted (%)", percent),
    ("kstep_acc_worst", "K-step accuracy, worst (%)", percent),
    ("newcomer_acc_mean", "Held-out newcomers: accuracy after joining, mean (%)", percent),
    ("newcomer_global_acc_mean", "Held-out newcomers: accuracy of the global model, mean (%)", percent),
    ("train_loss", "Training loss (last round)", _plain),
    ("mib_per_round", "MiB per round (training, up + down)", _mib),
    ("mib_total", "MiB total", _mib),
    ("eval_mib_per_round", "MiB per round of evaluation-only downloads", _mib),
    ("wire_mib_per_round", "MiB per round as Flower serialized it", _mib),
    ("wire_mib_total", "MiB total as Flower serialized it", _mib),
    ("up_params", "Uploaded parameters per client-round", _count),
    ("failed_uploads", "Uploads that never arrived (failed clients)", _count),
    ("rejected_uploads", "Uploads rejected by the server's checks", _count),
]

# Columns that only some runtimes (Flower) or runs (with held-out clients) measure: left out of a Markdown
# table where no row has them.
NEWCOMER = {"newcomer_acc_mean", "newcomer_global_acc_mean"}
OPTIONAL = {"wire_mib_per_round"} | NEWCOMER
# Columns left out of a Markdown table where every row has 0 (a run without failures).
ZERO_HIDDEN = {"failed_uploads", "rejected_uploads"}


def comparison_rows(results: Sequence[MethodResult]) -> list[dict]:
    """One row per method: `method` plus every key of `COLUMNS`, raw values, None where not measured; and, for
    the goal check (not a column), `<view>_correct`: the test examples each client view got right, summed over
    the training clients, where every one of them has that view; `<view>_right`: each training client's right
    answers ("0"/"1" per test example), where every one of them reported them (`train.eval_per_example`)."""
    rows = []
    for result in results:
        row: dict = {"method": result.method}
        for key, _, _ in COLUMNS:
            row[key] = result.wall_time_s if key == "wall_time_s" else result.final.get(key)
        trained = [c for c in result.clients if not c.held_out]
        for view in ("personal_acc", "kstep_acc"):
            accs = [getattr(c, view) for c in trained]
            if trained and all(a is not None and math.isfinite(a) for a in accs):
                row[f"{view}_correct"] = (sum(round(a * c.n_test) for a, c in zip(accs, trained)),
                                          sum(c.n_test for c in trained))
            bits = [getattr(c, view.replace("_acc", "_right")) for c in trained]
            if trained and all(bits):
                row[f"{view}_right"] = bits
        rows.append(row)
    return rows


def _cell(value, fmt: Callable[[float], str]) -> str:
    return MISSING if value is None else fmt(float(value))


def _md_text(text: str) -> str:
    """Keep a free-text cell from breaking the table (pipes split cells, newlines end rows)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], body: list[list[str]], align: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def to_markdown(rows: Sequence[dict]) -> str:
    """GitHub table of `comparison_rows`: accuracies as % with one decimal, MiB with three, — for None."""
    columns = [c for c in COLUMNS if (c[0] not in OPTIONAL or any(row.get(c[0]) is not None for row in rows))
               and (c[0] not in ZERO_HIDDEN or any(row.get(c[0]) for row in rows))]
    header = ["Method"] + [title for _, title, _ in columns]
    body = [[_md_text(row["method"])] + [_cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    return _md_table(header, body, [":---"] + ["---:"] * len(columns))


def final_table_markdown(result: MethodResult) -> str:
    """Two-column table (metric, value) of one method's final metrics, for printing after a single run."""
    known = {key for key, _, _ in FINAL_METRICS}
    entries = [(title, _cell(result.final.get(key), fmt)) for key, title, fmt in FINAL_METRICS
               if key not in NEWCOMER or key in result.final]
    entries += [(_md_text(k), _cell(v, _plain)) for k, v in result.final.items() if k not in known]
    entries.append(("Rounds", str(len(result.rounds))))
    entries.append(("Wall time (s)", _seconds(result.wall_time_s)))
    return _md_table([f"Metric ({_md_text(result.method)})", "Value"], [list(e) for e in entries], [":---", "---:"])


def to_csv(rows: Sequence[dict], path: Path | str, columns: Sequence[str] | None = None) -> None:
    """Write rows with raw numbers (None → empty cell), `columns` after "method" (default: COLUMNS' keys).
    Written to a temp file then renamed, so a reader never sees a half-written file."""
    fields = ["method"] + list(columns or [key for key, _, _ in COLUMNS])
    with atomic_file(path, newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})
