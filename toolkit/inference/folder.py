"""Image-folder datasets: a user's own images, one sub-folder per class.

Two layouts are read:

- ``root/train/<class>/*`` and ``root/test/<class>/*``: the user's own split;
- ``root/<class>/*``: one folder, split here: in each class, a seeded random ``split`` fraction
  of its files (at least one where a class has two or more) goes to the test split.

Class names are the sub-folder names, in sorted order (the label of a class is its index).
Hidden files and folders (``.name``) and files without an image suffix are not images of the
data set and are passed over; a file with an image suffix that Pillow cannot read is a bad file:
listed (and skipped) or, with ``strict``, refused in one line.

Every image is decoded once, by the deployed preprocessing itself (``preprocess.open_image`` and
``preprocess.resized_image``: EXIF rotation, transparency on white, the model's channels, the
model's square size), into uint8 arrays that are cached under ``~/.cache/toolkit/folders`` (or
``$TOOLKIT_CACHE_DIR/folders``). The cache key covers the folder's listing (every file's path,
size and modification time) and the settings, so adding, removing or changing a file makes a
new cache. Training then runs on the in-memory fast pipeline like MNIST does, and a model
served later prepares a user's picture exactly as its training images were prepared.

Numpy and Pillow only (no torch): ``verify`` reads the test split through here as deployed code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.inference import preprocess
from toolkit.core.errors import ToolkitError, shown
from toolkit.core.files import atomic_write, make_dir, plain_name

CACHE_VERSION = 1
MAX_LISTED = 10  # bad files named in the warning; the rest are counted


@dataclass(frozen=True)
class FolderSpec:
    """What a recipe says about its folder (``[data]`` with ``dataset = "folder"``)."""

    root: Path
    size: int
    channels: int
    split: float = 0.2
    seed: int = 0
    strict: bool = False


@dataclass
class FolderData:
    classes: list[str]
    x_train: np.ndarray  # uint8 NCHW
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    test_files: list[str]  # relative to the root, in the order of x_test
    bad: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)
    cached: bool = False  # read from the cache, not decoded now

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation of the training images, scaled to [0, 1]."""
        x = self.x_train.astype(np.float64) / 255.0
        return [float(v) for v in x.mean(axis=(0, 2, 3))], [float(max(v, 1e-6)) for v in x.std(axis=(0, 2, 3))]

    def bad_summary(self) -> str:
        listed = ", ".join(f"{shown(p)} ({why})" for p, why in self.bad[:MAX_LISTED])
        more = f" and {len(self.bad) - MAX_LISTED} more" if len(self.bad) > MAX_LISTED else ""
        return f"{len(self.bad)} file(s) skipped, not readable as images: {listed}{more}"


def from_manifest(manifest) -> FolderSpec:
    """The folder an export's model was trained on (``Manifest.source.folder``), as deployed code reads it."""
    found = manifest.source.folder
    if found is None:
        raise ToolkitError(f"{manifest.name}: the manifest records no image folder")
    channels, height, _ = manifest.chw
    return FolderSpec(Path(found.root), height, channels, found.split, found.seed)


def cache_dir() -> Path:
    base = os.environ.get("TOOLKIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "toolkit"
    return Path(base) / "folders"


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in preprocess.IMAGE_SUFFIXES


def _visible(path: Path | str) -> bool:
    return not Path(path).name.startswith(".")


def _within(path: Path, root: Path) -> Path:
    """``path``, refused when it is (or lies under) a symbolic link that leads out of the dataset folder:
    a dataset is what its folder holds, never /usr or /etc/passwd because a link said so."""
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError):  # Python names a symbolic link loop a RuntimeError
        raise ToolkitError(f"{path} is a symbolic link that loops (it leads back to itself): remove it or point it at a file") from None
    if not resolved.is_relative_to(root.resolve()):
        raise ToolkitError(f"{path} is a symbolic link that leads out of the dataset folder {root}: copy what it points to into the folder")
    return path


def _class_dirs(folder: Path, root: Path) -> dict[str, Path]:
    """The class folders of ``folder`` by class name, their names checked as any name read from outside
    (no control characters, no newline: a class name becomes a line of Triton's labels file and of every
    table) and in Unicode's composed form (NFC): "café" written composed or decomposed is one name, and
    two folders whose names differ only so are refused (they would print as the same class twice)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if _visible(p) and _within(p, root).is_dir():
            plain_name(p.name, f"{folder}: class folder")
            name = unicodedata.normalize("NFC", p.name)
            if name in found:
                raise ToolkitError(f"{folder}: class folders {shown(found[name].name)} and {shown(p.name)} are the same name "
                                   "written two ways in Unicode (composed and decomposed); keep one")
            found[name] = p
    return dict(sorted(found.items()))


def _files(folder: Path, root: Path) -> list[Path]:
    """Image files under a class folder, sub-folders included, in a stable order. Only regular files
    (a FIFO or a device is never opened); symbolic links to sub-folders are not followed, links to
    files only when they stay inside the dataset folder."""
    found = []
    for where, dirs, names in os.walk(folder):  # followlinks=False
        dirs[:] = [d for d in dirs if _visible(d)]
        for name in names:
            path = Path(where) / name
            if _visible(name) and _is_image(path) and _within(path, root).is_file():
                found.append(path)
    return sorted(found)


def listing(spec: FolderSpec) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Class names, the training items and the test items (path, label)."""
    root = spec.root
    if not root.is_dir():
        raise ToolkitError(f"image folder not found: {root} (data.root in the recipe)")
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        train_dirs, test_dirs = _class_dirs(train_dir, root), _class_dirs(test_dir, root)
        classes = list(train_dirs)
        unknown = sorted(set(test_dirs) - set(classes))
        if unknown:
            raise ToolkitError(f"{test_dir}: class folder {shown(unknown[0])} has no training folder in {train_dir}")
        train = [(f, i) for i, c in enumerate(classes) for f in _files(train_dirs[c], root)]
        test = [(f, classes.index(c)) for c, d in test_dirs.items() for f in _files(d, root)]
    else:
        if not 0 < spec.split < 1:
            raise ToolkitError(f"{root}: no train/ and test/ folders, so data.split must be a fraction between 0 and 1 to hold out a test split")
        class_dirs = _class_dirs(root, root)
        classes = list(class_dirs)
        train, test = [], []
        for i, c in enumerate(classes):
            files = _files(class_dirs[c], root)
            random.Random(f"{spec.seed}:{c}").shuffle(files)  # seeded per class: adding a class moves no other class's files
            n_test = round(len(files) * spec.split)
            if len(files) >= 2:
                n_test = min(max(n_test, 1), len(files) - 1)
            test += [(f, i) for f in sorted(files[:n_test])]
            train += [(f, i) for f in sorted(files[n_test:])]
    if len(classes) < 2:
        raise ToolkitError(f"{root}: found {len(classes)} class folder(s); an image-folder dataset needs one sub-folder per class, two or more")
    empty = [c for i, c in enumerate(classes) if not any(label == i for _, label in train)]
    if empty:
        raise ToolkitError(f"{root}: class {shown(empty[0])} has no training images")
    if not test:
        raise ToolkitError(f"{root}: the test split is empty")
    return classes, train, test


def _key(spec: FolderSpec, classes: list[str], train, test) -> str:
    h = hashlib.sha256()
    settings = {"v": CACHE_VERSION, "root": str(spec.root.resolve()), "size": spec.size, "channels": spec.channels,
                "classes": classes, "split": spec.split, "seed": spec.seed}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for tag, items in (("train", train), ("test", test)):
        for path, label in items:
            st = path.stat()
            h.update(f"{tag}\0{path.relative_to(spec.root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


GREY_MODES = frozenset({"1", "L", "I", "I;16", "F"})  # Pillow's one-channel modes (LA, P, RGB, RGBA ...: colour or alpha)


def infer_shape(root: Path, seed: int = 0) -> tuple[int, int, str]:
    """(size, channels, how it was found) for a folder whose recipe does not state them: every
    training image's header is read (no pixels decoded). One square size and all grey (or all not):
    that size and 1 (or 3) channels; else a one-line error that asks for ``data.size`` / ``data.channels``."""
    from PIL import Image

    _, train, _ = listing(FolderSpec(Path(root), 1, 1, 0.2, seed))
    sizes, modes = {}, {}
    for path, _ in train:
        try:
            with Image.open(path) as im:
                sizes[im.size] = sizes.get(im.size, 0) + 1
                modes[im.mode] = modes.get(im.mode, 0) + 1
        except Exception:  # noqa: BLE001 - Pillow raises several kinds; an unreadable file is skipped (or refused) when decoded
            continue
    if not sizes:
        raise ToolkitError(f"{root}: no readable training image to infer data.size and data.channels from")
    grey = {m in GREY_MODES for m in modes}
    problems = []
    if len(sizes) > 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        common = ", ".join(f"{w}x{h} ({n:,})" for (w, h), n in sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
        problems.append(f"data.size (the images are {common}{' ...' if len(sizes) > 3 else ''})")
    if len(grey) > 1:
        problems.append("data.channels (some images are grey, some colour: " + ", ".join(f"{m} ({n:,})" for m, n in sorted(modes.items())) + ")")
    if problems:
        raise ToolkitError(f"{root}: give {' and '.join(problems)} in the recipe: the images differ, so they cannot be inferred")
    (width, _), channels = next(iter(sizes)), 1 if grey == {True} else 3
    return width, channels, f"every one of {len(train):,} training images is {width}x{width} {'grey' if channels == 1 else 'colour'}"


def decode(path: Path, size: int, channels: int) -> np.ndarray:
    """One file as the model takes it: (channels, size, size) uint8, through the deployed preprocessing."""
    pixels = preprocess.resized_image(preprocess.open_image(path), size, channels)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _decode_all(spec: FolderSpec, items, bad: list[tuple[str, str]], tick: Callable[[], None]):
    images, labels, names = [], [], []
    for path, label in items:
        rel = str(path.relative_to(spec.root))
        try:
            images.append(decode(path, spec.size, spec.channels))
        except ToolkitError as exc:
            if spec.strict:
                raise ToolkitError(f"{path}: {exc} (data.strict = true refuses unreadable files; set it to false to skip them)") from None
            bad.append((rel, str(exc)))
            continue
        finally:
            tick()
        labels.append(label)
        names.append(rel)
    x = np.stack(images) if images else np.zeros((0, spec.channels, spec.size, spec.size), np.uint8)
    return x, np.asarray(labels, dtype=np.int64), names


def load(spec: FolderSpec, *, progress=None) -> FolderData:
    """The folder's train and test splits as uint8 arrays, from the cache when the folder is unchanged."""
    classes, train, test = listing(spec)
    key = _key(spec, classes, train, test)
    cached = cache_dir() / f"{key}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                data = FolderData(meta["classes"], z["x_train"], z["y_train"], z["x_test"], z["y_test"], meta["test_files"],
                                  [tuple(b) for b in meta["bad"]], cached=True)
            if spec.strict and data.bad:
                p, why = data.bad[0]
                raise ToolkitError(f"{spec.root / p}: {why} (data.strict = true refuses unreadable files; set it to false to skip them)")
            return data
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache is decoded again
    bad: list[tuple[str, str]] = []
    task = progress.add_task(f"decoding {len(train) + len(test):,} images of {spec.root}", total=len(train) + len(test)) if progress else None

    def tick() -> None:
        if progress is not None:
            progress.advance(task)

    x_train, y_train, _ = _decode_all(spec, train, bad, tick)
    x_test, y_test, test_files = _decode_all(spec, test, bad, tick)
    if progress is not None:
        progress.remove_task(task)
    if len(x_train) == 0 or len(x_test) == 0:
        raise ToolkitError(f"{spec.root}: no readable images in the {'training' if len(x_train) == 0 else 'test'} split")
    unreadable = [c for i, c in enumerate(classes) if not (y_train == i).any()]
    if unreadable:  # listed files, none of them an image: the same as an empty class folder
        raise ToolkitError(f"{spec.root}: class {shown(unreadable[0])} has no readable training images "
                           f"({sum(1 for _, label in train if label == classes.index(unreadable[0]))} file(s), none an image toolkit can read)")
    data = FolderData(classes, x_train, y_train, x_test, y_test, test_files, bad)
    make_dir(cached.parent, "cache folder")
    meta = json.dumps({"classes": classes, "test_files": test_files, "bad": bad})
    with atomic_write(cached) as f:
        np.savez(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, meta=np.asarray(meta))
    return data
