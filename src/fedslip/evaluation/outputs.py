"""Write a run's files: results.json, rounds.csv, clients.csv, ledger.csv, figure.png (+ comparison table).

Everything is written into a hidden staging folder next to the output folder and moved into place only
once all files exist, so a failure never leaves a half-written output folder.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from fedslip.atomic import replace_durably
from fedslip.evaluation.figures import plot_results
from fedslip.evaluation.goal import goal_rows
from fedslip.evaluation.goal import to_markdown as goal_markdown
from fedslip.evaluation.ledger import Ledger, write_ledger_csv
from fedslip.evaluation.metrics import scored_mean
from fedslip.evaluation.records import MethodResult
from fedslip.evaluation.tables import comparison_rows, to_csv, to_markdown
from fedslip.prepare import Prepared


def without_answers(row: dict) -> dict:
    """A CSV row without the per-example right answers (`*_right`: results.json has them)."""
    return {k: v for k, v in row.items() if not k.endswith("_right")}


def environment() -> dict[str, str | int | None]:
    import datasets
    import torch
    import transformers

    from fedslip import __version__

    return {"fedslip": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield a staging folder; on success move its files into `out` (created if needed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage
        out.mkdir(exist_ok=True)
        for f in stage.iterdir():
            replace_durably(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _rounds_rows(results: list[MethodResult]) -> list[dict]:
    rows = []
    for res in results:
        for r in res.rounds:
            row = {"method": res.method, "round": r.round, "train_loss": r.train_loss, "mib_round": r.mib_round,
                   "mib_cumulative": r.mib_cumulative, "eval_mib": r.eval_mib,
                   "failed": " ".join(map(str, r.failed)), "rejected": " ".join(map(str, r.rejected)),
                   "evaluated": r.evaluated, "global_acc": r.global_acc}
            for key in ("client_acc", "personal_acc", "persistent_acc"):
                values = getattr(r, key)
                row[f"{key}_mean"] = scored_mean(values)  # clients not evaluated left out, as in results.json
                for k in (c.client for c in res.clients if not c.held_out):
                    row[f"{key}_{k}"] = values[k] if values else None
            rows.append(row)
    return rows


def write_dicts(rows: list[dict], path: Path) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else v for k, v in row.items()})


def write_outputs(out: Path, prep: Prepared, runs: list[tuple[MethodResult, Ledger]],
                  more: Callable[[Path], None] | None = None) -> None:
    """Every output file, written whole or not at all, and `more(folder)`'s files with them (a runtime's
    own). The top-level wall time is the methods' summed (a resumed method's counts every process that
    trained it)."""
    results = [r for r, _ in runs]
    with staged(out) as stage:
        doc = {
            "config": prep.cfg.to_dict(),
            "seed": prep.cfg.train.seed,
            "environment": environment(),
            "data": data_description(prep),
            "backbone": {"name": prep.backbone.name, "source": prep.backbone.source},
            "placement": prep.backbone.placement.info,
            "clients": prep.clients,
            "wall_time_s": sum(r.wall_time_s for r in results),
            "methods": {r.method: {"final": r.final, "wall_time_s": r.wall_time_s,
                                   "clients": [asdict(c) for c in r.clients]} for r in results},
        }
        (stage / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
        write_dicts(_rounds_rows(results), stage / "rounds.csv")
        write_dicts([{"method": r.method, **without_answers(asdict(c))} for r in results for c in r.clients], stage / "clients.csv")
        write_ledger_csv([ledger for _, ledger in runs], stage / "ledger.csv")
        rows = comparison_rows(results)
        (stage / "comparison.md").write_text(with_goal(to_markdown(rows), goal_rows(rows)), encoding="utf-8")
        to_csv(rows, stage / "comparison.csv")
        plot_results(results, stage / "figure.png", title=_title(prep))
        if more is not None:
            more(stage)


def with_goal(table: str, goals: list[dict]) -> str:
    """A comparison's Markdown: its table, then the goal's check where the comparison can check it."""
    goal = goal_markdown(goals)
    return table + ("\n" + goal if goal else "") + "\n"


def data_description(prep: Prepared) -> str:
    return prep.data.description if prep.data is not None else "each node's own files (node-data)"


def _title(prep: Prepared) -> str:
    p, t = prep.cfg.partition, prep.cfg.train
    return (f"{data_description(prep)} · {p.n_clients} clients ({p.scheme}) · {prep.backbone.name} · "
            f"{t.rounds} rounds × {_local_budget(t)} · seed {t.seed}")


def _local_budget(t) -> str:
    if t.local_steps:
        return f"{t.local_steps} steps"
    return f"{t.local_epochs} epoch{'' if t.local_epochs == 1 else 's'}"
