"""Files and folders: confined names, atomic writes, locks, the boundary where user files are read.

- ``plain_name`` / ``confined``: the one place that turns a name read from a file (a manifest's
  artifact, a recipe or checkpoint name, a Triton model name) into a path. Only a plain name
  inside its directory passes: no separator, no ``..``, no absolute path, no hidden name, no
  symbolic link that leads out of the directory.
- ``atomic_write``: a crash, Ctrl-C or a full disk never leaves a torn file behind.
- ``locked``: one writer at a time per run or export directory (``filelock``).
- ``reading``: loading a user-given file turns any failure into one ToolkitError line.

Kept free of torch: the torch-free serving install reads manifests with these.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import shutil
import stat
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterator

from toolkit.core.errors import ToolkitError, first_line, shown

MAX_NAME = 200  # characters in a run, export, artifact or model name
# how long a second writer waits for a run or export directory before it gives up
LOCK_TIMEOUT_S = float(os.environ.get("TOOLKIT_LOCK_TIMEOUT", "600"))
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


# ----------------------------------------------------------------------------- names

def name_problem(value: object) -> str | None:
    """Why ``value`` is not a plain file name, or None when it is one."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "is empty"
    if len(value) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    if "/" in value or "\\" in value:
        return "contains a path separator"
    if value.startswith("."):
        return "starts with '.' (no '..', no hidden names)"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value):
        return "contains a control character"
    return None


def plain_name(value: object, what: str) -> str:
    """``value`` if it is a plain file name (see ``name_problem``), else a ToolkitError naming ``what``."""
    problem = name_problem(value)
    if problem:
        raise ToolkitError(f"{what}: {shown(value)} {problem}; it must be a plain name")
    return value  # type: ignore[return-value]


def confined(directory: Path, name: object, what: str) -> Path:
    """``directory / name`` for a ``name`` read from a file, refused unless it stays inside ``directory``.

    ``what`` names the file and field it came from (``exports/x/manifest.json: artifacts[0].file``)."""
    path = Path(directory) / plain_name(name, what)
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(Path(directory).resolve()):
            raise ToolkitError(f"{what}: {shown(name)} is a symbolic link that leads out of {directory}")
    return path


# ----------------------------------------------------------------------------- reading user files

@contextlib.contextmanager
def reading(path: Path | str, what: str) -> Iterator[None]:
    """The boundary where a user-given file is loaded: any failure inside becomes one ToolkitError
    line naming the file (however deep a parser recursed, whatever it raised)."""
    try:
        yield
    except ToolkitError:
        raise
    except MemoryError:
        raise ToolkitError(f"{path}: too large to load as a {what}") from None
    except RecursionError:
        raise ToolkitError(f"{path}: not a valid {what} (nested too deeply)") from None
    except Exception as exc:  # noqa: BLE001 - every parser failure means the same thing to a user
        if is_no_space(exc):
            raise ToolkitError(f"no space left on the device while loading {path}") from None
        raise ToolkitError(f"{path}: not a valid {what} ({first_line(exc)})") from None


def read_text_limited(path: Path, what: str, limit: int) -> str:
    """A small text file (a recipe, a manifest), refused when larger than ``limit`` bytes."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever, a device never end
            raise ToolkitError(f"{path}: not a regular file (a folder, FIFO or device): give a {what} file")
        size = info.st_size
        if size > limit:
            raise ToolkitError(f"{path}: {size:,} bytes is too large for a {what} (at most {limit:,})")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ToolkitError(f"{path}: cannot read the {what} ({exc.strerror or first_line(exc)})") from None
    except UnicodeDecodeError:
        raise ToolkitError(f"{path}: not a {what} (not UTF-8 text)") from None


# ----------------------------------------------------------------------------- writing

def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it: torch wraps the OSError) is a full disk or quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        if any(os.strerror(code) in str(exc) for code in _NO_SPACE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def umask_mode(mode: int) -> int:
    """``mode`` as the user's umask would leave it (mkstemp / mkdtemp create 0600 / 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def write_error(exc: BaseException, path: Path) -> ToolkitError | None:
    """The one-line error for a failed write of ``path``, or None when ``exc`` is not about the file system."""
    if is_no_space(exc):
        return ToolkitError(f"no space left on the device writing {path}")
    if isinstance(exc, OSError):
        return ToolkitError(f"cannot write {path}: {exc.strerror or first_line(exc)}")
    return None


TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Yield a file in ``path``'s folder; it replaces ``path`` only once fully written and synced.
    On any failure the temporary file is removed; a full disk is a one-line ToolkitError."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise write_error(exc, path) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        error = write_error(exc, path) if not isinstance(exc, ToolkitError) else None
        if error is not None:
            raise error from None
        raise


def remove_stale_temps(directory: Path) -> list[str]:
    """Remove the temporary files a killed ``atomic_write`` left in ``directory``; returns their names.
    Call it only while holding the directory's lock: another writer's temporary file is not stale."""
    pattern = re.compile(r"^\..+\.[A-Za-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")  # mkstemp's 8 random characters
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            if pattern.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed


_RENAME_EXCHANGE = 2  # linux/fs.h


@functools.cache
def _renameat2():
    """glibc's renameat2, or None (another C library or system)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``): there is no
    moment at which either name is missing. False where the system or file system cannot (then the
    caller swaps in two renames and readers finish a swap a kill interrupted: ``recover_swap``)."""
    import ctypes

    fn = _renameat2()
    if fn is None:
        return False
    at_cwd = -100  # AT_FDCWD
    if fn(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def recover_swap(directory: Path, aside: "re.Pattern[str]") -> str | None:
    """Finish or undo a swap of ``directory`` that a killed process left half-done. A writer moves
    the directory aside (a sibling whose name matches ``aside``), moves its new copy in, then
    removes the aside copy. Killed between the two moves, the aside copy is the only copy: it is
    moved back (the newest, if several), never deleted. With ``directory`` in place the aside
    copies are stale and are removed. Returns what was done, or None. Call it holding the lock."""
    directory = Path(directory)
    found = sorted((p for p in directory.parent.iterdir() if aside.match(p.name) and p.is_dir() and not p.is_symlink()),
                   key=lambda p: p.stat().st_mtime, reverse=True) if directory.parent.is_dir() else []
    if not found:
        return None
    done = None
    if not directory.exists() and not directory.is_symlink():
        os.replace(found.pop(0), directory)
        done = f"restored {directory} from the copy an interrupted writer had moved aside"
    for stale in found:
        shutil.rmtree(stale, ignore_errors=True)
    return done


SWAP_ASIDE = ".old-"  # an export swapped in two renames moves its old copy aside as .<name>.old-<pid>


def aside_pattern(name: str) -> "re.Pattern[str]":
    return re.compile(rf"^\.{re.escape(name)}{re.escape(SWAP_ASIDE)}[0-9]+$")


def finish_interrupted_swaps(parent: Path, name: str | None = None, say: Callable[[str], None] | None = None) -> list[str]:
    """Before reading: every directory in ``parent`` (or only ``name``) whose swap a kill interrupted
    between its two renames is moved back from its aside copy, under its lock, so a reader never
    sees an export as missing while its only copy lies aside. Said to ``say`` (else standard error).
    Where the lock cannot be taken (a read-only folder) nothing is done and the reader goes on."""
    import sys

    parent = Path(parent)
    try:
        names = {m.group(1) for e in os.scandir(parent) if (m := re.match(rf"^\.(.+){re.escape(SWAP_ASIDE)}[0-9]+$", e.name))}
    except OSError:
        return []
    done = []
    for missing in sorted(names if name is None else names & {name}):
        directory = parent / missing
        if directory.exists() or directory.is_symlink() or name_problem(missing):
            continue
        try:
            with locked(directory):
                line = recover_swap(directory, aside_pattern(missing))
        except (ToolkitError, OSError):
            continue
        if line:
            done.append(line)
            (say or (lambda text: print(text, file=sys.stderr)))(line)
    return done


def remove_stale_dirs(parent: Path, pattern: "re.Pattern[str]") -> None:
    """Remove the sibling work directories whose whole name matches ``pattern`` (staging copies,
    swapped-out old copies) that a killed process left. Only while holding the lock they belong to."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(parent):
            if pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)


def make_dir(path: Path, what: str = "folder") -> Path:
    """``path`` created with its parents, or one line saying why it cannot be."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, path) or ToolkitError(f"cannot create the {what} {path}") from None
    if not Path(path).is_dir():
        raise ToolkitError(f"cannot create the {what} {path}: a file of that name is in the way")
    return Path(path)


# ----------------------------------------------------------------------------- locks

def lock_path(directory: Path) -> Path:
    """The lock file of a run or export directory: beside it (an export swaps the directory itself)."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}.lock"


def in_use(directory: Path) -> bool:
    """Whether another process holds ``directory``'s lock now (a run still training, an export being written)."""
    from filelock import FileLock, Timeout

    path = lock_path(directory)
    if not path.exists():  # a holder keeps its lock file while it holds it
        return False
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False


@contextlib.contextmanager
def locked(directory: Path, *, wait: bool = True, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock of a run or export directory: one toolkit process writes in it at a time.

    ``wait``: wait up to ``LOCK_TIMEOUT_S`` ($TOOLKIT_LOCK_TIMEOUT) for the other writer, saying so;
    else refuse at once. The lock is the kernel's flock through ``filelock``, so a killed holder
    releases it. Its file is removed again as the last step while it is held, so nothing is left
    behind: a waiter that then wins the flock on the removed file is told so by filelock (its
    st_nlink check, filelock >= 3.21) and starts over on the path."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    path = lock_path(directory)
    make_dir(directory.parent)
    lock = FileLock(str(path))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise ToolkitError(f"{directory} is in use by another toolkit process; try again when it has finished") from None
            if say:
                say(f"waiting for another toolkit process to finish with {directory} ...")
            lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        raise ToolkitError(f"{directory} is still in use by another toolkit process after {LOCK_TIMEOUT_S:g} s; "
                           "try again when it has finished") from None
    except OSError as exc:
        raise ToolkitError(f"cannot write into {directory.parent}: {exc.strerror or first_line(exc)}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        lock.release()


# ----------------------------------------------------------------------------- misc

def tree_digest(folder: Path) -> tuple[str, int]:
    """A folder artifact's (the web page's) sha256 and size: the sha256 of its sorted ``name sha256`` lines,
    and the sum of its files' sizes. Only plain files and folders: a link or anything else is refused."""
    lines, size = [], 0
    for path in sorted(Path(folder).rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise ToolkitError(f"{path}: not a plain file (a folder artifact holds files only)")
        lines.append(f"{path.relative_to(folder).as_posix()} {sha256_file(path)}\n")
        size += path.stat().st_size
    return hashlib.sha256("".join(lines).encode()).hexdigest(), size


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_data_dir(option: str | Path | None = None, recorded: str | Path | None = None) -> Path:
    """--data-dir, else $TOOLKIT_DATA_DIR, else ``recorded`` (the folder the run was trained from, as
    its checkpoint or manifest records it) if it is still there, else ~/.cache/toolkit/data."""
    if option:
        return Path(option).expanduser()
    if os.environ.get("TOOLKIT_DATA_DIR"):
        return Path(os.environ["TOOLKIT_DATA_DIR"]).expanduser()
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "toolkit" / "data"
