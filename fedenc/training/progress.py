"""A rich progress display for long training and evaluation passes (pairs/s, loss, ETA)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainingProgress:
    """One bar per pass; ``enabled=False`` makes every call a no-op (library and test use).

    Without a terminal (CI logs, background runs) a live bar would print nothing useful, so
    ``lines=True`` prints a plain line every ``every`` fraction of a pass instead.
    """

    def __init__(
        self,
        enabled: bool = True,
        console: Console | None = None,
        lines: bool = False,
        every: float = 0.1,
    ) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._lines = enabled and lines
        self._every = every
        self._tasks: dict[int, list[float | str]] = {}
        enabled = enabled and not lines
        self._progress = (
            Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>8.0f} pairs/s"),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            if enabled
            else None
        )

    def __enter__(self) -> TrainingProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, description: str, total: int) -> TaskID | None:
        if self._lines:
            task = TaskID(len(self._tasks))
            self._tasks[task] = [description, float(total), 0.0, 0.0]  # name, total, done, next
            return task
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=total, rate=0.0, loss=float("nan"))

    def advance(self, task: TaskID | None, pairs: int, rate: float, loss: float) -> None:
        if self._lines and task is not None:
            name, total, done, mark = self._tasks[task]
            done = float(done) + pairs
            if done >= float(mark) or done >= float(total):
                text = f"{name}: {int(done):,}/{int(float(total)):,} pairs, {rate:,.0f} pairs/s"
                if loss == loss:  # evaluation passes report no loss (NaN)
                    text += f", loss {loss:.4f}"
                self.console.print(text, highlight=False)
                mark = float(mark) + self._every * float(total)
            self._tasks[task] = [name, total, done, mark]
        elif self._progress is not None and task is not None:
            self._progress.update(task, advance=pairs, rate=rate, loss=loss)

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)
