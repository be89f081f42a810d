"""A SIGTERM while `toolkit serve` starts (a client may already have had an answer) stops it cleanly."""

from __future__ import annotations

import os
import signal

from toolkit.cli import _interrupt
from toolkit.serve import server


def test_signals_during_start_up_are_held_then_the_handlers_return():
    before = signal.signal(signal.SIGTERM, _interrupt)  # the CLI's handler: raises Interrupted
    try:
        with server._signals_held() as held:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered here: recorded, nothing raised inside start-up code
            os.kill(os.getpid(), signal.SIGINT)
        assert held == [signal.SIGTERM, signal.SIGINT]
        assert signal.getsignal(signal.SIGTERM) is _interrupt
    finally:
        signal.signal(signal.SIGTERM, before)


class _Running:
    url = "http://127.0.0.1:1/"
    closed = False

    def close(self):
        self.closed = True


def test_serve_stops_cleanly_when_the_signal_came_during_start_up(monkeypatch):
    running, said = _Running(), []

    def start(*_args):
        os.kill(os.getpid(), signal.SIGTERM)  # as a client that got its first answer does, before start-up ends
        return running, 0, None, []

    monkeypatch.setattr(server, "_start", start)
    before = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = server.serve([], block=True, console=type("C", (), {"print": staticmethod(said.append)}))
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result == (running, running.url) and running.closed  # returned normally: `toolkit serve` exits 0
    assert said == ["SIGTERM: stopping the server", "stopped"]  # never "ready": it stopped before serving
