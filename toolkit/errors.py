"""The one exception type for errors a user can cause.

The CLI prints its message on one line, without a traceback, and exits non-zero.
"""


class ToolkitError(Exception):
    """A user-facing error: bad input, missing files, unsupported setup."""
