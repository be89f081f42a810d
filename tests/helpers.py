"""Helpers the tests share (conftest.py holds only fixtures): paths, a silent console, the CLI in a
fresh interpreter, its one-line errors, real MNIST digits sent to the demo and the v2 API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"


def quiet():
    """A rich Console that prints nowhere: tests read results, not progress bars."""
    import io

    from rich.console import Console

    return Console(file=io.StringIO())


def mnist_test_set(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The real MNIST test images (10000x28x28 uint8) and labels, read from the raw IDX files."""
    from toolkit.inference.splits import read_test_split

    split = read_test_split("mnist", root)
    assert split is not None, f"no MNIST test files under {root}"
    images, labels, _ = split
    return images[:, 0], labels


def demo_correct_on_digits(url: str, mnist_root: Path, folder: Path, seed: int, count: int = 100) -> int:
    """How many of ``count`` random real MNIST test digits (PNG files) the demo's /predict at ``url`` gets right."""
    from gradio_client import Client, handle_file
    from PIL import Image

    images, labels = mnist_test_set(mnist_root)
    pick = np.random.default_rng(seed).choice(len(images), size=count, replace=False)
    client = Client(url, verbose=False)
    correct = 0
    for i in pick:
        path = folder / f"{i}.png"
        Image.fromarray(images[i]).save(path)
        correct += client.predict(handle_file(str(path)), api_name="/predict")["label"] == str(labels[i])
    return correct


def v2_correct_on_digits(port: int, mnist_root: Path, export_dir: Path, seed: int, count: int = 100) -> int:
    """Sends ``count`` random real MNIST test digits as PNG bytes to the fp32 model of a v2 API on
    ``port`` with tritonclient; checks the answers equal the export's fp32 model run in this process,
    and returns how many are right."""
    import tritonclient.http as http

    from toolkit.inference.catalog import Catalog
    from toolkit.inference.preprocess import model_input, png_bytes

    client = http.InferenceServerClient(f"127.0.0.1:{port}")
    name = next(m["name"] for m in client.get_model_repository_index() if m["name"].endswith("_fp32"))
    output = client.get_model_metadata(name)["outputs"][0]["name"]
    images, labels = mnist_test_set(mnist_root)
    pick = np.random.default_rng(seed).choice(len(images), size=count, replace=False)
    inp = http.InferInput("image", [count], "BYTES")
    inp.set_data_from_numpy(np.array([png_bytes(images[i][None]) for i in pick], dtype=np.object_))
    logits = client.infer(name, [inp]).as_numpy(output)
    catalog = Catalog.from_dirs([export_dir])
    entry = catalog.entry(f"{export_dir.name}/model.fp32.onnx")
    reference = catalog.runner(entry)(model_input(images[pick][:, None], entry.manifest))
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)
    return int((logits.argmax(1) == labels[pick]).sum())


def write_recipe_variant(folder: Path, edit) -> Path:
    """``recipes/fine4.toml`` with ``edit(data)`` applied to its parsed dict, written to ``folder/bad.toml``."""
    import tomllib

    import tomli_w

    data = tomllib.loads((RECIPES / "fine4.toml").read_text())
    edit(data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bad.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def run_cli(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``toolkit ARGS`` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def one_line_error(proc) -> str:
    """The single 'error: ...' line a failed command printed on stderr (and nothing else, no traceback)."""
    assert proc.returncode != 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest_for(dataset: str = "mnist", chw=(1, 28, 28), dtype: str = "float32", layout: str = "NCHW", mean=None, std=None, classes=None):
    """A valid typed manifest with no artifacts, for tests of what reads a manifest."""
    from toolkit.core.manifest import FORMAT, InputSpec, Manifest, Normalization, OutputSpec, Source

    c, h, w = chw
    classes = classes or [str(i) for i in range(10)]
    return Manifest(
        format=FORMAT, name="t", model="m", dataset=dataset,
        input=InputSpec(name="input", shape=["batch", *((c, h, w) if layout == "NCHW" else (h, w, c))], dtype=dtype, layout=layout),
        output=OutputSpec(name="logits", shape=["batch", len(classes)]),
        normalization=Normalization(scale=1 / 255, mean=list(mean or [0.0] * c), std=list(std or [1.0] * c)),
        classes=classes, source=Source(checkpoint="/nowhere/best.pt", sha256="0" * 64, recipe="r", params=1), artifacts=[],
    )


SEVEN = ((-0.6, -0.8), (0.6, -0.8), (-0.1, 0.9))  # a 7 drawn in one stroke: the bar, then the stem


def draw(page, canvas, reach: float, points=SEVEN) -> None:
    """One mouse stroke through ``points`` (in units of ``reach`` pixels from the canvas's centre), as a person draws."""
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx + points[0][0] * reach, cy + points[0][1] * reach)
    page.mouse.down()
    for u, v in points[1:]:
        page.mouse.move(cx + u * reach, cy + v * reach, steps=15)
    page.mouse.up()

