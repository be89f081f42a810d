"""Shared fixtures: the real MNIST root, and CIFAR-10/100 files generated in torchvision's on-disk format."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from torchvision import datasets

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"

def quiet():
    """A rich Console that prints nowhere: tests read results, not progress bars."""
    import io

    from rich.console import Console

    return Console(file=io.StringIO())


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """Real MNIST: $TOOLKIT_DATA_DIR (CI sets it to ../shared/data), else ../shared/data."""
    root = Path(os.environ.get("TOOLKIT_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
        if os.environ.get("TOOLKIT_DATA_DIR"):
            pytest.fail(f"TOOLKIT_DATA_DIR={root} has no MNIST/raw files")
        pytest.skip(f"real MNIST not found under {root}")
    return root


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pickle(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    # N x 3072 uint8, channel-major rows as in the real pickles
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch) -> Path:
    """Small CIFAR-10 and CIFAR-100 trees in the real format, loadable by torchvision's own classes.

    torchvision checks each file's md5 against a table on the class; the generated files'
    checksums are registered there, so its integrity check runs for real.
    """
    rng = np.random.default_rng(0)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    train_list = []
    for i in range(1, 6):
        name = f"data_batch_{i}"
        _pickle({"batch_label": name, "labels": [int(v) for v in rng.integers(0, 10, 40)], "data": _images(rng, 40), "filenames": []}, c10 / name)
        train_list.append([name, _md5(c10 / name)])
    _pickle({"batch_label": "test", "labels": [int(v) for v in np.arange(50) % 10], "data": _images(rng, 50), "filenames": []}, c10 / "test_batch")
    _pickle({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 40, "num_vis": 3072}, c10 / "batches.meta")
    monkeypatch.setattr(datasets.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", _md5(c10 / "test_batch")]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": _md5(c10 / "batches.meta")})

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    for split, n in (("train", 300), ("test", 100)):
        _pickle({"filenames": [], "fine_labels": [int(v) for v in np.arange(n) % 100], "coarse_labels": [0] * n, "data": _images(rng, n)}, c100 / split)
    _pickle({"fine_label_names": [f"class_{i:02d}" for i in range(100)], "coarse_label_names": ["all"]}, c100 / "meta")
    monkeypatch.setattr(datasets.CIFAR100, "train_list", [["train", _md5(c100 / "train")]])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [["test", _md5(c100 / "test")]])
    monkeypatch.setattr(datasets.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": _md5(c100 / "meta")})
    return tmp_path


@pytest.fixture(scope="session")
def fine4_run(mnist_root, tmp_path_factory):
    """fine4 trained 2 epochs on the first 10,000 real MNIST training images (about 95% test accuracy)."""
    import io

    from rich.console import Console

    from toolkit.recipes import load_recipe
    from toolkit.train import train

    out = tmp_path_factory.mktemp("runs")
    return train(load_recipe(RECIPES / "fine4.toml"), device="cpu", data_dir=mnist_root, out=out, epochs=2,
                 train_limit=10_000, download=False, console=Console(file=io.StringIO()))


@pytest.fixture(scope="session")
def fine4_export(fine4_run, mnist_root, tmp_path_factory):
    """fp32 and int8 ONNX exports of ``fine4_run``."""
    import io

    from rich.console import Console

    from toolkit.export import export

    out = tmp_path_factory.mktemp("exports")
    quiet = Console(file=io.StringIO())
    export(fine4_run.run_dir, fmt="onnx", precision="fp32", out=out, console=quiet)
    entry = export(fine4_run.run_dir, fmt="onnx", precision="int8", out=out, data_dir=mnist_root, download=False, console=quiet)
    return Path(entry["export_dir"])


@pytest.fixture(scope="session")
def serving_export(mnist_root, tmp_path_factory):
    """A fine4 export good enough to serve: 3 epochs on all 60,000 training images with the LR
    dropped after epoch 2 (fine4's own recipe, shortened), fp32 and int8 ONNX."""
    from toolkit.export import export
    from toolkit.recipes import load_recipe
    from toolkit.train import train
    from toolkit.verify import verify

    text = (RECIPES / "fine4.toml").read_text()
    short = text.replace("epochs = 20", "epochs = 3").replace("step_size = 10", "step_size = 2")
    assert "epochs = 3" in short and "step_size = 2" in short  # fine4.toml still has the lines this edits
    recipe_path = tmp_path_factory.mktemp("recipe") / "fine4.toml"
    recipe_path.write_text(short)
    run = train(load_recipe(recipe_path), device="cpu", data_dir=mnist_root, out=tmp_path_factory.mktemp("serve-runs"),
                pipeline="fast", test_limit=2000, download=False, console=quiet())
    out = tmp_path_factory.mktemp("serve-exports")
    export(run.run_dir, fmt="onnx", precision="fp32", out=out, console=quiet())
    entry = export(run.run_dir, fmt="onnx", precision="int8", out=out, data_dir=mnist_root, download=False, console=quiet())
    verify(entry["export_dir"], data_dir=mnist_root, download=False, console=quiet())  # records parity in the manifest, as a user would
    return Path(entry["export_dir"])


def mnist_test_set(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The real MNIST test images (10000x28x28 uint8) and labels, read from the raw IDX files."""
    raw = root / "MNIST" / "raw"
    images = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    return images, labels


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
