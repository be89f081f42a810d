"""CLI conventions: --version, and help that shows a value type only for options that take a value."""

import re

from tests.helpers import run_cli


def test_version_prints_the_package_version():
    from toolkit import __version__

    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"toolkit {__version__}"


def test_help_shows_no_value_type_for_flags():
    done = run_cli("export", "--help", env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    lines = {m.group(1): m.group(2) for m in re.finditer(r"(--[a-z-]+)\s+(\S+)", done.stdout)}
    # flags: the help text follows the name directly
    assert lines["--json"] == "Print", lines["--json"]
    assert lines["--auto-fallback"] != "<bool>"
    assert "<bool>" not in done.stdout
    # options that take a value still say which
    assert lines["--calib-size"].startswith("<int"), lines["--calib-size"]


def test_once_a_command_has_ended_a_signal_cannot_turn_it_into_a_traceback(monkeypatch, capsys):
    """SIGTERM arriving while the process exits (after the command's work and status) used to raise
    Interrupted inside threading's shutdown: 'Exception ignored in: <module 'threading'>', exit 0.
    When main() is done, SIGINT and SIGTERM are ignored, so the finished command's status stands."""
    import signal
    import sys

    from toolkit.cli import main

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        monkeypatch.setattr(sys, "argv", ["toolkit", "recipes", "--json"])
        try:
            main()
        except SystemExit as stop:
            assert stop.code in (None, 0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGTERM)  # nothing happens: no exception, the process goes on
        assert '"fine4"' in capsys.readouterr().out
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
