"""The one exception type for errors a user can cause, and how values a user gave are echoed.

The CLI prints a ToolkitError's message on one line, without a traceback, and exits non-zero.
"""

from __future__ import annotations

MAX_MESSAGE = 2000  # characters of one error line
MAX_ECHO = 80  # characters of a user-given value quoted back in a message


def shown(value: object, limit: int = MAX_ECHO) -> str:
    """``repr(value)``, cut to ``limit`` characters: a value a user (or a hostile file) gave may be huge."""
    return cut(repr(value), limit)


def cut(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` as is when short, else its start and its length: for echoing what a user typed."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}… ({len(text):,} characters)"


def first_line(exc: BaseException) -> str:
    """What an exception says, on one line: its first non-empty line, else its type."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    # "Error(s) in loading state_dict for Net:" announces what the next line says
    text = lines[0] if not lines[0].endswith(":") or len(lines) == 1 else f"{lines[0]} {lines[1]}"
    return text if len(text) <= 300 else text[:299] + "…"


class ToolkitError(Exception):
    """A user-facing error: bad input, missing files, unsupported setup. Always one line."""

    def __init__(self, message: str):
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())  # one line, however it was built
        if len(text) > MAX_MESSAGE:
            text = text[: MAX_MESSAGE - 1] + "…"
        super().__init__(text)


class Interrupted(BaseException):
    """SIGINT or SIGTERM: a BaseException, so that only ``finally`` blocks and cleanup handlers
    see it on the way out (the CLI installs the signal handlers and turns it into exit 128+signal)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ToolkitError naming the choices."""
    if value not in choices:
        raise ToolkitError(f"unknown {what} {shown(value)}; choose from {', '.join(map(str, choices))}")
    return value
