"""The one loader for the JSON records a reader trusts: bench.json, parity.json, summary.json, a TensorRT
engine's sidecar. Anyone can edit or replace them, so each is read the same way before anything uses it:

- a regular file only (a FIFO, device or folder is never opened: it would block or never end),
- at most ``limit`` bytes, checked before reading,
- nested at most ``MAX_DEPTH`` deep, checked before parsing,
- validated against its schema (a pydantic model).

A malformed *optional* record (bench.json: it only chooses a default and adds figures) is ignored with
one warning line naming it; a malformed *required* one is one ToolkitError line. Torch-free.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ValidationError

from toolkit.core.errors import ToolkitError, first_line

MAX_DEPTH = 32  # the records nest four or five deep
DEFAULT_LIMIT = 16 << 20


def nesting_depth(text: str) -> int:
    """How deep the JSON text's arrays and objects nest (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _read(path: Path, what: str, limit: int) -> object:
    try:
        # O_NONBLOCK: a FIFO swapped in after a check would still not block the open; fstat decides
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ToolkitError(f"{path}: cannot read the {what} ({exc.strerror or first_line(exc)})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ToolkitError(f"{path}: not a regular file (a folder, FIFO or device), so not a {what}")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > limit:
            raise ToolkitError(f"{path}: {info.st_size:,} bytes is too large for a {what} (at most {limit:,})")
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ToolkitError(f"{path}: more than {limit:,} bytes is too large for a {what}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolkitError(f"{path}: not a {what} (not UTF-8 text)") from None
    if nesting_depth(text) > MAX_DEPTH:
        raise ToolkitError(f"{path}: not a valid {what} (nested more than {MAX_DEPTH} deep)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ToolkitError(f"{path}: not a valid {what} ({first_line(exc)})") from None


def _problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "top level"
    return f"{where}: {err['msg']}"


def load_record(path: Path | str, what: str, schema: type[BaseModel] | None = None, *, limit: int = DEFAULT_LIMIT) -> dict:
    """A required record: its parsed JSON object, validated against ``schema``; else one ToolkitError line
    naming the file (FileNotFoundError passes through for a caller that says what to run first)."""
    path = Path(path)
    data = _read(path, what, limit)
    if not isinstance(data, dict):
        raise ToolkitError(f"{path}: not a valid {what} (a JSON object expected, not {type(data).__name__})")
    if schema is not None:
        try:
            schema.model_validate(data)
        except ValidationError as exc:
            raise ToolkitError(f"{path}: not a valid {what} ({_problem(exc)})") from None
    return data


def load_optional(path: Path | str, what: str, schema: type[BaseModel] | None = None, *, limit: int = DEFAULT_LIMIT,
                  warn: Callable[[str], None] | None = None) -> dict | None:
    """An optional record: as ``load_record``, but None when it is missing, and None with one warning line
    (to ``warn``, else standard error, once) when it is malformed: the reader goes on without it."""
    try:
        return load_record(path, what, schema, limit=limit)
    except FileNotFoundError:
        return None
    except ToolkitError as exc:
        line = f"warning: {exc}; ignored"
        if warn is not None:
            warn(line)
        elif line not in _said:  # once per process: several readers may load the same record
            _said.add(line)
            print(line, file=sys.stderr)
        return None


_said: set[str] = set()
