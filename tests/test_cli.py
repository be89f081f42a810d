"""CLI conventions: --version, and help that shows a value type only for options that take a value."""

import re

from tests.conftest import run_cli


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
