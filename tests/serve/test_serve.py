"""Serving: image decoding limits, MNIST-style preprocessing of drawings, the artifact catalog,
and the running demo answered through gradio_client (good and bad input)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.helpers import free_port, manifest_for, mnist_test_set
from toolkit.core.errors import ToolkitError
from toolkit.inference.catalog import Catalog, find_exports
from toolkit.inference.preprocess import mnist_digit, model_pixels, open_image, resized_image, to_input


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit grayscale) with almost no pixel data:
    what a decompression bomb or an empty image looks like on the wire."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bad_inputs(folder: Path) -> dict[str, tuple[Path | None, str]]:
    """name -> (file, words the error must contain)."""
    text = folder / "notes.png"
    text.write_text("this is not an image")
    empty = folder / "empty.png"
    empty.write_bytes(_png(0, 0))
    huge = folder / "huge.png"
    huge.write_bytes(_png(20_000, 20_000))
    wide = folder / "wide.png"
    Image.new("L", (5000, 10)).save(wide)
    floats = folder / "float.tif"
    Image.fromarray(np.ones((8, 8), np.float32), mode="F").save(floats)
    truncated = folder / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    return {
        "no image": (None, "no image given"),
        "not an image": (text, "not an image"),
        "0x0": (empty, "not an image"),  # Pillow refuses a zero-size header outright
        "20000x20000": (huge, "too large"),
        "too wide": (wide, "5000x10"),
        "float mode": (floats, "unsupported image mode 'F'"),
        "truncated": (truncated, "could not be decoded"),
    }


@pytest.mark.parametrize("case", ["no image", "not an image", "0x0", "20000x20000", "too wide", "float mode", "truncated"])
def test_bad_images_are_refused_in_one_line(case, tmp_path):
    path, words = bad_inputs(tmp_path)[case]
    with pytest.raises(ToolkitError, match=words) as info:
        open_image(str(path) if path else None)
    assert "\n" not in str(info.value) and str(tmp_path) not in str(info.value)  # no server paths leak to clients


def draw_digit(digit: str, canvas=(360, 300), box=(30, 20, 170, 230), width=18) -> Image.Image:
    """A hand-drawn-style digit: thick black strokes on white, off-centre, far larger than 28x28."""
    im = Image.new("RGB", canvas, "white")
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = box

    def p(u, v):
        return (x0 + u * (x1 - x0), y0 + v * (y1 - y0))

    strokes = {
        "0": None,
        "1": [[p(0.3, 0.2), p(0.55, 0.03), p(0.55, 0.97)]],
        "4": [[p(0.7, 0.97), p(0.7, 0.03), p(0.08, 0.68), p(0.95, 0.68)]],
        "7": [[p(0.08, 0.06), p(0.92, 0.06), p(0.38, 0.97)]],
        "2": [[p(0.1, 0.25), p(0.3, 0.05), p(0.7, 0.05), p(0.88, 0.28), p(0.8, 0.5), p(0.08, 0.95), p(0.95, 0.95)]],
    }[digit]
    if strokes is None:
        d.ellipse([p(0.1, 0.03), p(0.9, 0.97)], outline="black", width=width)
    for line in strokes or []:
        d.line(line, fill="black", width=width, joint="curve")
    return im


def test_drawing_becomes_an_mnist_style_digit():
    pixels = mnist_digit(draw_digit("1"))
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    assert pixels[0].max() == 0 and pixels[:, 0].max() == 0  # white on black, black border
    rows, cols = np.nonzero(pixels > 40)
    assert rows.max() - rows.min() + 1 in (19, 20, 21)  # the stroke's long side scaled to 20 px
    ys, xs = np.indices(pixels.shape)
    cy, cx = (ys * pixels).sum() / pixels.sum(), (xs * pixels).sum() / pixels.sum()
    assert abs(cy - 14) < 1 and abs(cx - 14) < 1  # centred by mass, though drawn in the left third


def test_real_mnist_digits_survive_a_round_trip_through_a_drawing(mnist_root):
    """A test digit blown up 10x, inverted to ink on paper and pasted off-centre comes back close
    to the original: the preprocessing inverts what a person's drawing adds."""
    images, _ = mnist_test_set(mnist_root)
    correlations = []
    for digit in images[:20]:
        paper = Image.new("L", (500, 420), 255)
        paper.paste(Image.fromarray(255 - digit).resize((280, 280), Image.Resampling.BICUBIC), (190, 110))
        back = mnist_digit(paper).astype(np.float32)
        correlations.append(np.corrcoef(back.ravel(), digit.astype(np.float32).ravel())[0, 1])
    assert np.median(correlations) > 0.85, correlations


def test_mnist_sized_digit_is_used_as_is(mnist_root):
    images, _ = mnist_test_set(mnist_root)
    assert np.array_equal(mnist_digit(Image.fromarray(images[3])), images[3])
    assert np.array_equal(mnist_digit(Image.fromarray(255 - images[3])), images[3])  # black on white: inverted only


def test_blank_drawing_is_an_error():
    with pytest.raises(ToolkitError, match="blank"):
        mnist_digit(Image.new("RGBA", (400, 400), (0, 0, 0, 0)))  # an untouched sketchpad: fully transparent


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P", "1", "CMYK", "RGB"])
def test_cifar_tab_takes_any_size_and_mode(mode, tmp_path):
    rgb = Image.new("RGB", (301, 177), (200, 30, 40))
    im = rgb.convert(mode) if mode != "P" else rgb.quantize(4)
    path = tmp_path / f"x.{'tif' if mode == 'CMYK' else 'png'}"
    im.save(path)
    pixels = resized_image(open_image(str(path)), 32, 3)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    if mode in ("RGBA", "P", "RGB", "CMYK"):
        assert np.abs(pixels.reshape(-1, 3).mean(0) - (200, 30, 40)).max() < 3  # the colour survives
    transparent = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    assert resized_image(transparent, 32, 3).min() == 255  # transparency is white, not black


def test_normalization_comes_from_the_manifest():
    manifest = manifest_for("cifar10", (3, 32, 32), mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 1.0])
    x = to_input(np.full((32, 32, 3), 255, np.uint8), manifest)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    assert np.allclose(x[0, :, 0, 0], [1.0, 3.0, 1.0])
    # an export whose graph takes uint8 pixels gets them as they are (it normalizes inside)
    pixels = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    raw = to_input(pixels, manifest_for("cifar10", (3, 32, 32), dtype="uint8"))
    assert raw.dtype == np.uint8 and np.array_equal(raw[0], pixels.transpose(2, 0, 1))
    # channels last: the image array as it is
    nhwc = to_input(pixels, manifest_for("cifar10", (3, 32, 32), dtype="uint8", layout="NHWC"))
    assert nhwc.shape == (1, 32, 32, 3) and np.array_equal(nhwc[0], pixels)
    floats = to_input(np.full((32, 32, 3), 255, np.uint8), manifest_for("cifar10", (3, 32, 32), layout="NHWC", mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 1.0]))
    assert floats.shape == (1, 32, 32, 3) and np.array_equal(floats[0, 0, 0], x[0, :, 0, 0])
    with pytest.raises(ToolkitError, match="takes"):
        to_input(np.zeros((28, 28), np.uint8), manifest)


# ----------------------------------------------------------------------------- with a model

@pytest.mark.parametrize("digit", ["0", "1", "2", "4", "7"])
def test_hand_drawn_digits_are_recognized(serving_export, digit):
    catalog = Catalog.from_dirs([serving_export])
    for key in catalog.keys():  # fp32 and int8 alike
        assert catalog.classify(draw_digit(digit), key).best == digit, key


def test_catalog_lists_what_runs_here_and_refuses_unknown_names(serving_export, tmp_path):
    parent = tmp_path / "exports"
    shutil.copytree(serving_export, parent / serving_export.name)
    assert find_exports([parent]) == find_exports([parent / serving_export.name]) == [parent / serving_export.name]
    catalog = Catalog.from_dirs([parent])
    name = serving_export.name
    assert catalog.keys() == [f"{name}/model.fp32.onnx", f"{name}/model.int8.onnx"]  # fp32 first: the default
    assert all(catalog.entries[k].runtime == "ort-cpu" for k in catalog.keys())
    with pytest.raises(ToolkitError, match="unknown artifact 'nope'"):
        catalog.entry("nope")
    # a file name alone names the one export's artifact of that name (docs/deploy.md's --artifact model.int8.onnx)
    assert catalog.entry("model.int8.onnx").key == f"{name}/model.int8.onnx"
    int8 = catalog.entries[f"{name}/model.int8.onnx"]
    catalog.add(dataclasses.replace(int8, key="second/model.int8.onnx"))  # another export with a file of that name
    with pytest.raises(ToolkitError, match="'model.int8.onnx' is in several exports; name one: .*second/model.int8.onnx"):
        catalog.entry("model.int8.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToolkitError, match="nothing to serve"):
        Catalog.from_dirs([tmp_path / "empty"])
    with pytest.raises(ToolkitError, match="no such export folder"):
        Catalog.from_dirs([tmp_path / "missing"])


def test_the_default_is_the_newest_main_export_not_a_variant_made_after_it(serving_export, tmp_path):
    """#33: the README's list makes an `--input uint8` variant after the main export; the demo's default
    (the first key) stays the main export's, the variant's artifacts after it."""
    import os

    parent = tmp_path / "exports"
    name = serving_export.name
    for suffix in ("", "-uint8"):
        shutil.copytree(serving_export, parent / f"{name}{suffix}")
    path = parent / f"{name}-uint8" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["input"]["dtype"], manifest["name"] = "uint8", f"{name}-uint8"
    path.write_text(json.dumps(manifest))
    os.utime(parent / name / "manifest.json", (1e9, 1e9))  # the main export the older
    catalog = Catalog.from_dirs([parent])
    exports = [key.split("/")[0] for key in catalog.keys()]
    assert exports == [name, name, f"{name}-uint8", f"{name}-uint8"], (exports, catalog.skipped)


def test_engine_without_tensorrt_is_listed_as_not_served(serving_export, tmp_path):
    from toolkit.core.files import sha256_file
    from toolkit.inference.runtime import trt_missing_reason

    if trt_missing_reason() is None:
        pytest.skip("TensorRT runs here: the engine would be served")
    export_dir = tmp_path / serving_export.name
    shutil.copytree(serving_export, export_dir)
    engine = export_dir / "model.fp16.engine"
    engine.write_bytes(b"not really an engine")
    manifest = json.loads((export_dir / "manifest.json").read_text())
    manifest["artifacts"].append({"file": engine.name, "format": "trt", "precision": "fp16", "sha256": sha256_file(engine), "bytes": engine.stat().st_size})
    (export_dir / "manifest.json").write_text(json.dumps(manifest))
    catalog = Catalog.from_dirs([export_dir])
    assert f"{export_dir.name}/model.fp16.engine" not in catalog.entries
    assert any("model.fp16.engine" in s and "TensorRT" in s for s in catalog.skipped)


def test_tampered_artifact_is_not_served(serving_export, tmp_path):
    export_dir = tmp_path / serving_export.name
    shutil.copytree(serving_export, export_dir)
    with open(export_dir / "model.int8.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ToolkitError, match="sha256 does not match"):
        Catalog.from_dirs([export_dir])


@pytest.fixture(scope="module")
def server(serving_export, mnist_root):
    """The demo served in this process on a free localhost port, with a 1 MB upload limit."""
    from toolkit.serve.server import serve

    running, url = serve([serving_export], port=free_port(), data_dir=mnist_root, max_upload="1mb", block=False, console=None)
    yield running, url
    running.close()


def test_api_predicts_real_digits_and_names_the_artifact(server, serving_export, mnist_root, tmp_path):
    from gradio_client import Client, handle_file

    _, server = server

    images, labels = mnist_test_set(mnist_root)
    client = Client(server, verbose=False)
    path = tmp_path / "digit.png"
    Image.fromarray(images[0]).save(path)
    result = client.predict(handle_file(str(path)), api_name="/predict")
    assert result["label"] == str(labels[0]) and len(result["confidences"]) == 3
    assert result["confidences"][0]["confidence"] > 0.5
    int8 = client.predict(handle_file(str(path)), f"{serving_export.name}/model.int8.onnx", api_name="/predict")
    assert int8["label"] == str(labels[0])


def test_every_bad_input_is_an_error_and_the_server_keeps_serving(server, mnist_root, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    _, server = server

    images, labels = mnist_test_set(mnist_root)
    good = tmp_path / "good.png"
    Image.fromarray(images[1]).save(good)
    big = tmp_path / "big.png"  # 1.5 MB of noise: over the server's 1 MB upload limit
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (1000, 500, 3), dtype=np.uint8)).save(big)
    client = Client(server, verbose=False)
    cases = {name: (str(path) if path else None, words) for name, (path, words) in bad_inputs(tmp_path).items()}
    cases["unknown artifact"] = (str(good), "unknown artifact")
    for name, (path, words) in cases.items():
        args = (handle_file(path),) if path else (None,)
        if name == "unknown artifact":
            args += ("no-such-export/model.onnx",)
        with pytest.raises(AppError, match=words):
            client.predict(*args, api_name="/predict")
        assert client.predict(handle_file(str(good)), api_name="/predict")["label"] == str(labels[1]), f"after {name}"
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(str(big)), api_name="/predict")
    assert client.predict(handle_file(str(good)), api_name="/predict")["label"] == str(labels[1])


def _outward_address() -> str | None:
    """This machine's address on its first non-loopback interface, if it has one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent for a UDP connect
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_server_binds_localhost_only_and_makes_no_share_link(server):
    import socket
    from urllib.parse import urlparse

    running, url = server
    port = urlparse(url).port
    assert not running.demo.share and running.demo.share_url is None
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    outward = _outward_address()
    if outward is None:
        pytest.skip("this machine has no non-loopback address to try")
    with pytest.raises(OSError):
        socket.create_connection((outward, port), timeout=5).close()


def test_the_preparation_comes_from_the_manifest(serving_export):
    from toolkit.core.manifest import Manifest

    manifest = Manifest.load(serving_export)
    assert model_pixels(draw_digit("7"), manifest).shape == (28, 28)
    cifar = manifest_for("cifar10", (3, 32, 32))
    assert model_pixels(Image.new("RGB", (40, 90), "red"), cifar).shape == (32, 32, 3)


def test_serve_cli_refuses_a_missing_folder_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "toolkit", "serve", str(tmp_path / "nope"), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "no such export folder" in lines[0], proc.stderr


def test_cifar_export_is_served_beside_mnist(cifar_root, cifar_classes, serving_export, tmp_path):
    """A CIFAR-10 model (ft6, one epoch on the generated CIFAR files) in the same server as fine4:
    the CIFAR artifact gets 32x32 RGB preprocessing, CIFAR class names, and the answer the ONNX
    model gives when called directly."""
    from gradio_client import Client, handle_file

    from tests.helpers import RECIPES, quiet
    from toolkit.export import export
    from toolkit.models.recipes import load_recipe
    from toolkit.inference.runtime import ort_runner
    from toolkit.serve.server import serve
    from toolkit.train.run import train

    run = train(load_recipe(RECIPES / "ft6.toml"), device="cpu", data_dir=cifar_root, out=tmp_path / "runs", epochs=1,
                download=False, console=quiet())
    cifar_export = Path(export(run.run_dir, out=tmp_path / "exports", console=quiet())["export_dir"])
    catalog = Catalog.from_dirs([serving_export, cifar_export])
    cifar_key = f"{cifar_export.name}/model.fp32.onnx"
    assert catalog.keys("cifar") == [cifar_key] and cifar_key not in catalog.keys("mnist")
    photo = tmp_path / "photo.png"  # RGBA, odd size: resized to 32x32 RGB on white
    rgba = np.random.default_rng(3).integers(0, 256, (90, 150, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(photo)
    x = to_input(resized_image(open_image(str(photo)), 32, 3), catalog.entries[cifar_key].manifest)
    direct = cifar_classes[int(ort_runner(cifar_export / "model.fp32.onnx", "ort-cpu")(x).argmax())]

    running, url = serve([serving_export, cifar_export], port=free_port(), examples=0, block=False, console=None)
    try:
        result = Client(url, verbose=False).predict(handle_file(str(photo)), cifar_key, api_name="/predict")
    finally:
        running.close()
    assert result["label"] == direct and {c["label"] for c in result["confidences"]} <= set(cifar_classes)
