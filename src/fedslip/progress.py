"""Progress bars (rich) for rounds and clients; a silent stand-in for tests and library use."""

from __future__ import annotations


class NullTask:
    def advance(self, record=None, evaluated=None) -> None:
        pass

    def done(self) -> None:
        pass


class NullProgress:
    def task(self, description: str, total: int) -> NullTask:
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
            accs = [a for a in (evaluated.personal_acc or []) if a == a]  # NaN: a client that did not answer
            pers = f" personal {100 * sum(accs) / len(accs):.1f}%" if accs else ""
            glob = f" global {100 * evaluated.global_acc:.1f}%" if evaluated.global_acc is not None else ""
            extra += f" (round {evaluated.round}:{glob}{pers})"
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

    def task(self, description: str, total: int) -> RichTask:
        transient = "clients" in description
        task_id = self.progress.add_task(description, total=total, status="")
        return RichTask(self.progress, task_id, transient)
