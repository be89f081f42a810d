"""Files and folders: writing so that a crash never leaves a torn file behind, hashing, the data root.

Kept free of torch: the torch-free serving install reads manifests with these.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def umask_mode(mode: int) -> int:
    """``mode`` as the user's umask would leave it (mkstemp / mkdtemp create 0600 / 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Yield a file in ``path``'s folder; it replaces ``path`` only once fully written and synced."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_data_dir(option: str | Path | None = None) -> Path:
    """--data-dir, else $TOOLKIT_DATA_DIR, else ~/.cache/toolkit/data."""
    if option:
        return Path(option).expanduser()
    if os.environ.get("TOOLKIT_DATA_DIR"):
        return Path(os.environ["TOOLKIT_DATA_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "toolkit" / "data"
