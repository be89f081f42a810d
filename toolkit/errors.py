"""The one exception type for errors a user can cause.

The CLI prints its message on one line, without a traceback, and exits non-zero.
"""


class ToolkitError(Exception):
    """A user-facing error: bad input, missing files, unsupported setup."""


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ToolkitError naming the choices."""
    if value not in choices:
        raise ToolkitError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
    return value
