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
    """One bar per pass; ``enabled=False`` makes every call a no-op (library and test use)."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
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
                console=console,
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
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=total, rate=0.0, loss=float("nan"))

    def advance(self, task: TaskID | None, pairs: int, rate: float, loss: float) -> None:
        if self._progress is not None and task is not None:
            self._progress.update(task, advance=pairs, rate=rate, loss=loss)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
