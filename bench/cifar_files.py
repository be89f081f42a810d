"""CIFAR-10 / CIFAR-100 files in torchvision's real on-disk format, generated (random pixels).

No CIFAR data can be downloaded on the machines this project is built on; the tests and
bench/train_speed.py train on these instead. torchvision checks every file's md5 against a
table on its dataset class: ``write_cifar`` returns the generated files' tables and
``register`` puts them there, so torchvision's own integrity check runs for real.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Callable

import numpy as np

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pickle(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    # N x 3072 uint8, channel-major rows as in the real pickles
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar(root: Path, per_batch: int = 40, test: int = 50, c100_train: int = 300, c100_test: int = 100, seed: int = 0) -> dict:
    """Write cifar-10-batches-py (5 x ``per_batch`` training images, ``test`` test images) and
    cifar-100-python under ``root``; return {class name: {attribute: md5 table}}."""
    rng = np.random.default_rng(seed)
    c10 = Path(root) / "cifar-10-batches-py"
    c10.mkdir(parents=True, exist_ok=True)
    train_list = []
    for i in range(1, 6):
        name = f"data_batch_{i}"
        _pickle({"batch_label": name, "labels": [int(v) for v in rng.integers(0, 10, per_batch)], "data": _images(rng, per_batch), "filenames": []}, c10 / name)
        train_list.append([name, _md5(c10 / name)])
    _pickle({"batch_label": "test", "labels": [int(v) for v in np.arange(test) % 10], "data": _images(rng, test), "filenames": []}, c10 / "test_batch")
    _pickle({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, c10 / "batches.meta")

    c100 = Path(root) / "cifar-100-python"
    c100.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", c100_train), ("test", c100_test)):
        _pickle({"filenames": [], "fine_labels": [int(v) for v in np.arange(n) % 100], "coarse_labels": [0] * n, "data": _images(rng, n)}, c100 / split)
    _pickle({"fine_label_names": [f"class_{i:02d}" for i in range(100)], "coarse_label_names": ["all"]}, c100 / "meta")
    return {
        "CIFAR10": {"train_list": train_list, "test_list": [["test_batch", _md5(c10 / "test_batch")]],
                    "meta": {"filename": "batches.meta", "key": "label_names", "md5": _md5(c10 / "batches.meta")}},
        "CIFAR100": {"train_list": [["train", _md5(c100 / "train")]], "test_list": [["test", _md5(c100 / "test")]],
                     "meta": {"filename": "meta", "key": "fine_label_names", "md5": _md5(c100 / "meta")}},
    }


def register(tables: dict, set_attr: Callable = setattr) -> None:
    """Put the md5 tables on torchvision's classes (``set_attr``: pytest's monkeypatch.setattr in tests)."""
    from torchvision import datasets

    for cls_name, attrs in tables.items():
        for attr, value in attrs.items():
            set_attr(getattr(datasets, cls_name), attr, value)
