"""A SIGTERM while `toolkit serve` starts (a client may already have had an answer) stops it cleanly.

Each check runs in a fresh interpreter, as `toolkit serve` does: signals sent to the test process itself would
land on whatever native threads earlier tests left running."""

from __future__ import annotations

import subprocess
import sys

HELD = r"""
import os, signal
from toolkit.cli import _interrupt
from toolkit.serve import server
signal.signal(signal.SIGTERM, _interrupt)  # the CLI's handler: raises Interrupted
with server._signals_held() as held:
    os.kill(os.getpid(), signal.SIGTERM)  # delivered here: recorded, nothing raised inside start-up code
    os.kill(os.getpid(), signal.SIGINT)
print(held == [signal.SIGTERM, signal.SIGINT], signal.getsignal(signal.SIGTERM) is _interrupt)
"""

SERVE = r"""
import os, signal
from toolkit.cli import _interrupt
from toolkit.serve import server

class Running:
    url = "http://127.0.0.1:1/"
    closed = False
    def close(self):
        self.closed = True

running, said = Running(), []

def start(*_args):
    os.kill(os.getpid(), signal.SIGTERM)  # as a client that got its first answer does, before start-up ends
    return running, 0, None, []

server._start = start
signal.signal(signal.SIGTERM, _interrupt)
result = server.serve([], block=True, console=type("C", (), {"print": staticmethod(said.append)}))
print(result == (running, running.url), running.closed, said)
"""


def _run(script: str) -> str:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120).stdout.strip()


def test_signals_during_start_up_are_held_then_the_handlers_return():
    assert _run(HELD) == "True True"


def test_serve_stops_cleanly_when_the_signal_came_during_start_up():
    # returned normally (`toolkit serve` exits 0), the servers closed, and never "ready": it stopped before serving
    assert _run(SERVE) == "True True ['SIGTERM: stopping the server', 'stopped']"
