"""The code passes the linter configured in pyproject.toml ([tool.ruff]): syntax, undefined and unused names,
line length. Run here so that the README's test command, which CI runs, runs it too."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import REPO


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: it is in the dev extra (pip install -e '.[dev]')")
    proc = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_linter_can_fail(tmp_path):
    (tmp_path / "bad.py").write_text("import os\n")
    proc = subprocess.run([shutil.which("ruff") or "ruff", "check", "--no-cache", "--isolated", "--select", "F", str(tmp_path / "bad.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "F401" in proc.stdout
