"""Progress: bars (rich) on a terminal, one plain line per round in a log, silence for tests and libraries."""

from __future__ import annotations

import sys
import time


def scores(evaluated) -> str:
    """'round t: global x% personal y%' of an evaluated round record (NaN: a client that did not answer)."""
    accs = [a for a in (evaluated.personal_acc or []) if a == a]
    glob = f" global {100 * evaluated.global_acc:.1f}%" if evaluated.global_acc is not None else ""
    pers = f" personal {100 * sum(accs) / len(accs):.1f}%" if accs else ""
    return f"round {evaluated.round}:{glob}{pers}"


class NullTask:
    def advance(self, record=None, evaluated=None) -> None:
        pass

    def done(self) -> None:
        pass


class NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def task(self, description: str, total: int, costs=None) -> NullTask:
        return NullTask()


class RichTask:
    def __init__(self, progress, task_id, transient: bool):
        self.progress, self.id, self.transient = progress, task_id, transient

    def advance(self, record=None, evaluated=None) -> None:
        """`record`: the round just trained; `evaluated`: the latest round whose evaluation is complete."""
        extra = ""
        if record is not None:
            extra = f"loss {record.train_loss:.3f}"
        if evaluated is not None:
            extra += f" ({scores(evaluated)})"
        self.progress.update(self.id, advance=1, **({"status": extra} if extra else {}))

    def done(self) -> None:
        if self.transient:
            self.progress.remove_task(self.id)


class RichProgress:
    """Context manager: one persistent bar per method's rounds, a transient bar per round's clients."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[status]}"))

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def task(self, description: str, total: int, costs=None) -> RichTask:
        transient = "clients" in description
        task_id = self.progress.add_task(description, total=total, status="")
        return RichTask(self.progress, task_id, transient)


class PlainTask:
    """`costs`: each step's relative cost (a round's, `Method.round_cost`), so that the time left follows the
    rounds still to come; steps advanced without a record (done before a resume) do not count as timed."""

    def __init__(self, description: str, total: int, out, costs=None):
        self.description, self.total, self.out = description, total, out
        self.costs = list(costs) if costs is not None else [1.0] * total
        self.done_n, self.timed, self.start = 0, 0.0, time.perf_counter()

    def advance(self, record=None, evaluated=None) -> None:
        self.done_n += 1
        if record is None:
            return
        self.timed += self.costs[self.done_n - 1]
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.timed * sum(self.costs[self.done_n:])
        parts = [f"{self.description} {self.done_n}/{self.total}", f"loss {record.train_loss:.4f}"]
        if evaluated is not None:
            parts.append(scores(evaluated))
        parts += [f"{record.mib_round:.3f} MiB", f"elapsed {_clock(elapsed)}", f"left ~{_clock(left)}"]
        if getattr(record, "checkpoint", ""):
            parts.append(f"checkpoint {record.checkpoint}")
        print(" | ".join(parts), file=self.out, flush=True)

    def done(self) -> None:
        pass


class PlainProgress:
    """One plain line per round (for logs: output that is not a terminal); nothing per client."""

    def __init__(self, out=None):
        self.out = out or sys.stderr

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def task(self, description: str, total: int, costs=None):
        return NullTask() if "clients" in description or "evaluation" in description else \
            PlainTask(description.removesuffix(": rounds"), total, self.out, costs)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def for_terminal(quiet: bool):
    """Bars on a terminal, plain lines otherwise (a log file), nothing with --quiet."""
    if quiet:
        return NullProgress()
    return RichProgress() if sys.stderr.isatty() else PlainProgress()
