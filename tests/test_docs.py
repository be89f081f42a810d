"""The README's and the guides' command blocks, as a reader copies them: every `toolkit ...` line
names a command that exists and options it takes, with values of the right kind; the cheap ones
(no run, no export needed) are run."""

from __future__ import annotations

import re
import shlex

import pytest
import typer

from tests.helpers import REPO, run_cli

GUIDES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CHEAP = ("recipes", "env")  # commands that need nothing trained or exported


def command_lines(text: str) -> list[list[str]]:
    """Each `toolkit ...` command in the file's fenced blocks, as words (comments, `&&` chains and
    optional `[...]` parts handled as a shell reader would)."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced or not re.match(r"\s*(\$ )?toolkit\s", line):
            continue
        for part in line.lstrip("$ ").split("&&"):
            words = shlex.split(re.sub(r"\[[^\]]*\]", "", part), comments=True)
            if words:
                found.append(words)
    return found


def parse_error(words: list[str]) -> str | None:
    """Why click refuses ``words`` (``toolkit`` first), or None: parsed, nothing run."""
    from toolkit.cli import app

    group = typer.main.get_command(app)
    ctx = group.make_context("toolkit", [], resilient_parsing=True)
    if words[0] != "toolkit":
        return f"not a toolkit command: {words[0]}"
    sub = group.get_command(ctx, words[1]) if len(words) > 1 else None
    if sub is None:
        return f"no such command: {words[1:2]}"
    try:
        sub.make_context(words[1], words[2:], parent=ctx)
    except Exception as exc:  # typer's own click: a usage error has format_message, --help exits
        if type(exc).__name__ == "Exit":
            return None
        if hasattr(exc, "format_message"):
            return exc.format_message()
        raise
    return None


ALL = [(path.name, words) for path in GUIDES for words in command_lines(path.read_text())]


def test_the_guides_have_commands_and_the_check_can_fail():
    assert len(ALL) >= 30 and {name for name, _ in ALL} >= {"README.md", "export.md", "serving.md"}
    assert parse_error(["toolkit", "train", "fine4", "--epochs", "abc"]) is not None  # a value of the wrong kind
    assert parse_error(["toolkit", "export", "--no-such-option"]) is not None
    assert parse_error(["toolkit", "exportt"]) is not None
    assert parse_error(["toolkit", "export", "--precision", "int8"]) is None


@pytest.mark.parametrize("where,words", ALL, ids=[f"{n}:{' '.join(w[1:3])}" for n, w in ALL])
def test_every_command_in_the_guides_parses(where, words):
    assert parse_error(words) is None, f"{where}: {' '.join(words)}: {parse_error(words)}"


@pytest.mark.parametrize("command", CHEAP)
def test_the_cheap_commands_of_the_guides_run_as_written(command):
    written = [w for _, w in ALL if w[1] == command]
    assert written, f"the guides no longer show toolkit {command}"
    for words in written:
        proc = run_cli(*words[1:], cwd=REPO, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


def test_the_walkthrough_script_reads_the_readme_and_the_serving_example():
    """bench/walkthrough.py runs the README's first block in order and docs/serving.md's tritonclient
    example (the closing notes' fresh-clone runs): what it reads is what a reader sees there."""
    from bench.walkthrough import readme_commands, serving_example

    readme = (REPO / "README.md").read_text()
    commands = readme_commands(readme)
    first_block = readme.split("```", 2)[1]
    assert commands and len(commands) == len(re.findall(r"^toolkit ", first_block, re.M))
    assert commands[0].startswith("toolkit train") and "toolkit serve" in commands
    # the list's exports, serve and Triton repository are one run's: the run-making lines after them come last
    assert commands.index("toolkit serve") < commands.index("toolkit prune --method channel")
    example = serving_example((REPO / "docs" / "serving.md").read_text())
    assert "tritonclient.http" in example and 'client.infer("fine4_fp32"' in example
    compile(example, "serving.md", "exec")  # it parses as Python, as printed
