"""`fedslip status RUN_DIR`: where a run stands, read from its checkpoints alone.

A paper-protocol run takes hours and goes on across restarts (`--resume`); its log may be a file nobody
watches. The checkpoints already hold every round's records and the wall time, so this loads no data and
no model: it answers in seconds while the run goes on.
"""

from __future__ import annotations

from pathlib import Path

from fedslip.errors import UserError
from fedslip.evaluation.metrics import scored_mean
from fedslip.evaluation.tables import percent
from fedslip.federation import checkpoint


def run_folders(folder: Path) -> list[Path]:
    """A run's or comparison's folder, and a multi-seed run's `seed-<s>/` folders."""
    return [folder, *sorted(p for p in folder.glob("seed-*") if p.is_dir())]


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoints of a run, a comparison or a multi-seed folder."""
    return [p for f in run_folders(folder) for p in checkpoint.existing(f)]


def queued(folder: Path) -> list[tuple[str, str]]:
    """(method, seed) of each method a comparison will train that has no checkpoint yet: still to come, or
    running its first round."""
    rows = []
    for f in run_folders(folder):
        started = {p.stem for p in checkpoint.existing(f)}
        seed = f.name.removeprefix("seed-") if f.name.startswith("seed-") else None
        if seed is None and started:
            seed = str(describe(checkpoint.path_for(f, next(iter(started))))["seed"])
        rows += [(m, seed or "—") for m in checkpoint.read_plan(f) if m not in started]
    return rows


RECENT = 5  # rounds whose pace predicts the rest


def time_left(wall: float, done: int, costs: list[float], round_seconds: dict[str, float] | None = None) -> float:
    """The rounds to go, each weighted by its cost (`Method.round_cost`: FedSLIP's rounds with private steps
    cost twice its warmup rounds), at the median pace of the last RECENT timed rounds: a round that ran
    beside other work, or through a pause, does not move it. A round's time is its own work (training, the
    previous round's evaluation), not the checkpoint saves. Checkpoints without per-round times (older
    versions) use the pace of the whole run so far."""
    timed = sorted((int(r), t) for r, t in (round_seconds or {}).items() if int(r) <= done)[-RECENT:]
    if timed:
        paces = sorted(t / costs[r - 1] for r, t in timed)
        half = len(paces) // 2
        pace = paces[half] if len(paces) % 2 else (paces[half - 1] + paces[half]) / 2
    else:
        pace = wall / sum(costs[:done])
    return pace * sum(costs[done:])


def describe(path: Path) -> dict:
    meta = checkpoint.read_meta(path)
    cfg = meta["fingerprint"]["config"]
    rounds = meta["rounds"]
    costs = meta.get("round_costs")  # one per round the method runs (local: 1; fedsb: a setup round more)
    done, total = len(rounds), len(costs) if costs else cfg["train"]["rounds"]
    evaluated = [r for r in rounds if r.get("evaluated")]
    last = evaluated[-1] if evaluated else {}
    wall = float(meta.get("wall_time_s", 0.0))
    return {
        "method": cfg["method"]["name"], "seed": cfg["train"]["seed"], "done": done, "total": total,
        "finished": bool(meta.get("finished")), "wall_s": wall,
        "left_s": None if meta.get("finished") or done == 0 else time_left(
            wall, done, costs or [1.0] * total, meta.get("round_seconds")),
        "precision": f"{meta['fingerprint']['device']}, {meta['fingerprint']['precision']}",
        "eval_round": last.get("round"), "global": last.get("global_acc"),
        "client": scored_mean(last.get("client_acc")), "synced": scored_mean(last.get("personal_acc")),
        "persistent": scored_mean(last.get("persistent_acc")),
    }


def _pct(x: float | None) -> str:
    return "—" if x is None else percent(x)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def report(folder: Path) -> str:
    paths = checkpoints(folder)
    waiting = queued(folder)
    if not paths and not waiting:
        raise UserError(f"{folder}: no checkpoint here (state/<method>.safetensors); it is not a run's --out "
                        "folder, or its first round has not finished")
    rows = [describe(p) for p in paths]
    header = ("| method | seed | rounds | state | wall | left, at the recent rounds' pace | device | evaluated round "
              "| global | client, global model | personal, synced | personal, persistent |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        state = "finished" if r["finished"] else "unfinished"
        left = "—" if r["left_s"] is None else "≈ " + _hours(r["left_s"])
        lines.append(f"| {r['method']} | {r['seed']} | {r['done']}/{r['total']} | {state} | {_hours(r['wall_s'])} "
                     f"| {left} | {r['precision']} | {r['eval_round'] or '—'} | {_pct(r['global'])} "
                     f"| {_pct(r['client'])} | {_pct(r['synced'])} | {_pct(r['persistent'])} |")
    for method, seed in waiting:
        lines.append(f"| {method} | {seed} | 0 | no checkpoint yet |" + " — |" * 8)
    return "\n".join(lines)
