"""Progress where there is no terminal: plain lines at every tenth of a task and every 30 s."""

from __future__ import annotations

import io

from rich.console import Console

from toolkit.core import progress as progress_mod
from toolkit.core.progress import Progress


def test_without_a_terminal_a_line_every_tenth_and_every_30_seconds(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    console = Console(file=out, width=80)  # not a terminal: a log file
    assert not console.is_terminal
    with Progress(console, unit="batches") as progress:
        task = progress.add_task("epoch 1/20 of a very long description that must not be wrapped at eighty columns", total=1000)
        for _ in range(50):
            progress.advance(task)  # within its first 5 s a task is quiet
        clock[0] += 6
        for _ in range(200):
            progress.advance(task)
        clock[0] += 31  # half a minute without reaching the next tenth
        progress.advance(task)
        progress.update(task, completed=1000)  # done: the work's own line follows
        progress.remove_task(task)
    lines = out.getvalue().splitlines()
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["100 of 1,000 batches (10%)", "200 of 1,000 batches (20%)", "251 of 1,000 batches (25%)"]
    assert all(line.startswith("epoch 1/20 of a very long description that must not be wrapped at eighty columns: ") for line in lines)


def test_a_short_task_prints_no_plain_lines():
    out = io.StringIO()
    with Progress(Console(file=out, width=80)) as progress:
        task = progress.add_task("test", total=10)
        for _ in range(10):
            progress.advance(task)
    assert out.getvalue() == ""


def test_on_a_terminal_it_is_a_bar_and_prints_no_lines():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80)
    with Progress(console) as progress:
        task = progress.add_task("work", total=10)
        for _ in range(10):
            progress.advance(task)
        progress.remove_task(task)
    assert "of 10" not in out.getvalue()
