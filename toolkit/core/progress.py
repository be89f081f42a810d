"""Progress for long work, visible wherever the output goes: a bar on a terminal; in a log file,
CI or under ``nohup`` (where a bar would print nothing until the end) a plain line every 10% of
a task or every 30 seconds, whichever comes first, once the task has run 5 seconds (a short
evaluation says nothing until its result).

The interface is the part of ``rich.progress.Progress`` the toolkit uses: ``add_task``,
``advance``, ``update(completed=)``, ``remove_task``, as a context manager.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console

EVERY_S = 30.0  # seconds between plain lines at most
STEPS = 10  # and a line at every tenth of a task
QUIET_S = 5.0  # a task done sooner than this prints no plain lines (its closing line is enough)


@dataclass
class _Task:
    description: str
    total: int
    done: int = 0
    last_step: int = 0
    started: float = field(default_factory=lambda: time.monotonic())
    last_line: float = field(default_factory=lambda: time.monotonic())


class Progress:
    def __init__(self, console: Console, unit: str = ""):
        self.console, self.unit = console, unit
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TimeRemainingColumn(), console=console, transient=True)
        self.tasks: dict[int, _Task] = {}

    def __enter__(self) -> "Progress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def add_task(self, description: str, total: int) -> int:
        if self.bar is not None:
            return self.bar.add_task(description, total=total)
        key = len(self.tasks) + 1
        self.tasks[key] = _Task(description, int(total))
        return key

    def advance(self, task: int, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(task, n)
            return
        self._plain(self.tasks[task], self.tasks[task].done + n)

    def update(self, task: int, completed: int) -> None:
        if self.bar is not None:
            self.bar.update(task, completed=completed)
            return
        self._plain(self.tasks[task], completed)

    def remove_task(self, task: int) -> None:
        if self.bar is not None:
            self.bar.remove_task(task)
        else:
            self.tasks.pop(task, None)

    def _plain(self, t: _Task, done: int) -> None:
        t.done = done
        if t.total <= 1 or done >= t.total:
            return  # the work's own closing line says it is done
        step = STEPS * done // t.total
        now = time.monotonic()
        if now - t.started < QUIET_S:
            return
        if step > t.last_step or now - t.last_line >= EVERY_S:
            unit = f" {self.unit}" if self.unit else ""
            self.console.print(f"{t.description}: {done:,} of {t.total:,}{unit} ({100 * done // t.total}%)", soft_wrap=True, markup=False)
            t.last_step, t.last_line = step, now
