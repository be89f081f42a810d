"""A built-in dataset's test split read straight from its files in torchvision's layout, without torch:
MNIST's and Fashion-MNIST's IDX files (gzipped or not) and CIFAR's pickles, read by an unpickler that
builds arrays only. Used by verify, the demo's examples and the tests."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from toolkit.core.datasets import facts
from toolkit.core.errors import ToolkitError
from toolkit.core.files import reading

class _ArraysOnly(pickle.Unpickler):
    """CIFAR's files are pickles, and a pickle can run any code: this one builds NumPy arrays,
    lists, dicts and strings, and refuses everything else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR file holds arrays and lists only")
        return super().find_class(module, name)


def _read_idx(path: Path) -> np.ndarray:
    with reading(path, "IDX file"):
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
            raise ToolkitError(f"{path}: not an IDX file of unsigned bytes")
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _read_cifar_pickle(path: Path) -> dict:
    with reading(path, "CIFAR file"):
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="latin1").load()
        if not isinstance(obj, dict):
            raise ToolkitError(f"{path}: not a CIFAR batch (no dictionary)")
        return obj


def _find(folder: Path, name: str) -> Path | None:
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def read_test_split(dataset: str, root: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """A built-in dataset's test split straight from its files in torchvision's layout, without
    torch: uint8 NCHW images, int64 labels and the class names; None when the files are not there."""
    spec = facts(dataset)
    folder = Path(root) / spec.folder
    paths = [_find(folder, name) for name in spec.test_files]
    if any(p is None for p in paths):
        return None
    if spec.test_files[0].endswith("-idx3-ubyte"):  # MNIST's IDX format (MNIST, Fashion-MNIST)
        images, labels = (_read_idx(p) for p in paths)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ToolkitError(f"{folder}: the test files do not fit together (images {images.shape}, labels {labels.shape})")
        return images[:, None].copy(), labels.astype(np.int64), list(spec.classes)
    batch = _read_cifar_pickle(paths[0])
    data, labels = batch.get("data"), batch.get("labels", batch.get("fine_labels"))
    if not isinstance(data, np.ndarray) or not isinstance(labels, list):
        raise ToolkitError(f"{paths[0]}: not a {dataset} test batch (no 'data' array and label list)")
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * spec.size * spec.size or labels.shape != data.shape[:1]:
        raise ToolkitError(f"{paths[0]}: not a {dataset} test batch (data {data.shape} {data.dtype}, labels {labels.shape})")
    classes = spec.classes
    if classes is None:
        meta = _read_cifar_pickle(folder / "meta")
        classes = tuple(meta.get("fine_label_names", ()))
        if len(classes) != spec.num_classes:
            raise ToolkitError(f"{folder / 'meta'}: {len(classes)} class names, {dataset} has {spec.num_classes}")
    return data.reshape(-1, 3, spec.size, spec.size), labels, list(classes)
