"""The progress bar of long computations: points done, points per second, time left.

Owns :class:`ProgressBar`, a callable ``(done, total)`` that the derivative functions'
``progress=`` accepts. It draws a Rich bar on stderr (never stdout, where results and
JSON go), and only once the work has run for :data:`DELAY` seconds unless forced, so
that quick commands print nothing extra. Torch-free; the engine knows nothing of it.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

#: seconds of work before the bar appears (unless forced)
DELAY = 1.0


class _Rate(ProgressColumn):
    """Points per second, as Rich measures the task's speed."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} points/s", style="progress.data.speed")


class ProgressBar:
    """``progress(done, total)`` drawn as a bar on stderr; use as a context manager."""

    def __init__(self, label: str, *, force: bool = False, console: Console | None = None) -> None:
        self.label = label
        self.console = console or Console(stderr=True)
        self.delay = 0.0 if force else DELAY
        self.started = time.monotonic()
        self.bar: Progress | None = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if time.monotonic() - self.started < self.delay or done >= total:
                return
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("points"), _Rate(), TimeRemainingColumn(),
                console=self.console, transient=self.console.is_terminal,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total, completed=done)
            return
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
