"""A comparison over several seeds: mean ± sample std per method and metric, as Markdown, CSV and a figure.

Each seed is a whole comparison of its own (its own split, the same for every method), written to
`seed-<s>/`; this module only summarizes their `comparison_rows`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from fedslip.evaluation.tables import COLUMNS, MISSING, OPTIONAL, ZERO_HIDDEN, _md_table, _md_text, to_csv

# The accuracies drawn as bars with error bars, in this order.
FIGURE_METRICS = [("global_acc", "global"), ("client_acc_mean", "client, global model"),
                  ("personal_acc_mean", "personal, synced"), ("persistent_acc_mean", "personal, persistent"),
                  ("kstep_acc_mean", "K-step")]


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None for one value) and count of the measured values."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def summary_rows(per_seed: dict[int, list[dict]]) -> list[dict]:
    """One row per method (first-seen order): `<key>` the mean over seeds, `<key>_std`, `n_seeds`, `seeds`."""
    methods: list[str] = []
    for rows in per_seed.values():
        methods += [r["method"] for r in rows if r["method"] not in methods]
    out = []
    for method in methods:
        found = {s: next((r for r in rows if r["method"] == method), None) for s, rows in per_seed.items()}
        seeds = [s for s, r in found.items() if r is not None]
        row: dict = {"method": method, "n_seeds": len(seeds), "seeds": " ".join(map(str, seeds))}
        for key, _, _ in COLUMNS:
            row[key], row[f"{key}_std"], n = mean_std([found[s].get(key) for s in seeds])
            if 0 < n < len(seeds):  # measured in some seeds only: the cell says over how many
                row[f"{key}_n"] = n
        out.append(row)
    return out


def to_markdown(rows: Sequence[dict]) -> str:
    """Cells "mean ± std" (accuracies in %), — where a method lacks the metric."""
    columns = [c for c in COLUMNS if (c[0] not in OPTIONAL or any(row.get(c[0]) is not None for row in rows))
               and (c[0] not in ZERO_HIDDEN or any(row.get(c[0]) for row in rows))]

    def cell(row: dict, key: str, fmt) -> str:
        mean, std, n = row.get(key), row.get(f"{key}_std"), row.get(f"{key}_n")
        if mean is None:
            return MISSING
        return fmt(mean) + ("" if std is None else f" ± {fmt(std)}") + ("" if n is None else f" ({n} of {row['n_seeds']} seeds)")

    header = ["Method", "Seeds"] + [title for _, title, _ in columns]
    body = [[_md_text(r["method"]), str(r["n_seeds"])] + [cell(r, key, fmt) for key, _, fmt in columns] for r in rows]
    return _md_table(header, body, [":---", "---:"] + ["---:"] * len(columns))


def write_csv(rows: Sequence[dict], path: Path) -> None:
    fields = ["n_seeds", "seeds"] + [k for key, _, _ in COLUMNS for k in (key, f"{key}_std", f"{key}_n")]
    to_csv(rows, path, fields)


def build_figure(rows: Sequence[dict], title: str | None = None) -> Figure:
    """Grouped bars: each method's mean accuracies over seeds, the sample std as error bars."""
    fig = Figure(figsize=(max(8.0, 1.6 * len(rows) + 3), 5.5), dpi=110)
    ax = fig.subplots()
    metrics = [(k, label) for k, label in FIGURE_METRICS if any(r.get(k) is not None for r in rows)]
    x = np.arange(len(rows))
    width = 0.85 / max(1, len(metrics))
    for j, (key, label) in enumerate(metrics):
        xs = [x[i] + (j - (len(metrics) - 1) / 2) * width for i, r in enumerate(rows) if r.get(key) is not None]
        ys = [r[key] for r in rows if r.get(key) is not None]
        errs = [r.get(f"{key}_std") or 0.0 for r in rows if r.get(key) is not None]
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, color=f"C{j}", label=label)
    ax.set_xticks(x, [f"{r['method']}\n({r['n_seeds']} seeds)" for r in rows], fontsize=8)
    lows = [r[k] - (r.get(f"{k}_std") or 0) for r in rows for k, _ in metrics if r.get(k) is not None]
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 0.05), 1.0)
    ax.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")
    ax.set_ylabel("Accuracy (mean ± sample std over seeds)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, ncol=min(5, len(metrics)), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    if title:
        fig.suptitle(title, fontsize=11, y=0.995)
    fig.tight_layout()
    return fig
