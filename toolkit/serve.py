"""`toolkit serve`: the exported models behind the Gradio demo and its HTTP API, without torch.

Everything here runs on the serving install (ONNX Runtime, NumPy, Pillow, Gradio): what to
serve comes from the exports' ``manifest.json`` (input shape, normalization, class names,
which artifacts passed parity), images are decoded defensively (size, mode and decompression
limits checked before any pixel is read), and hand-drawn digits are turned into what an MNIST
model saw in training. The Gradio layout itself lives in ``demo/app.py`` (``toolkit.demo.app``).
"""

from __future__ import annotations

import errno
import gzip
import os
import re
import shutil
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolkit.errors import Interrupted, ToolkitError, first_line, shown
from toolkit.files import reading, resolve_data_dir
from toolkit.manifest import NAME as MANIFEST_NAME
from toolkit.manifest import load_manifest
from toolkit.runtime import Runner, check_engine_compatible, make_runner, runtimes_for, trt_missing_reason

if TYPE_CHECKING:
    from PIL import Image

MAX_SIDE = 4096  # pixels a side; larger images are refused before decoding
MAX_UPLOAD = "10mb"  # Gradio refuses bigger uploads before they reach Python
# modes with an unambiguous 8-bit reading; 16-bit / float / exotic colour spaces are refused
SUPPORTED_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK"}
RUNTIME_PREFERENCE = ("tensorrt", "ort-cuda", "ort-cpu")
MNIST_FAMILY, CIFAR_FAMILY = "mnist", "cifar"


# ----------------------------------------------------------------------------- images

def open_image(source) -> "Image.Image":
    """A fully decoded Pillow image from a path, a Pillow image or an array; a bad one is a ToolkitError."""
    from PIL import Image

    if source is None or (isinstance(source, str) and not source.strip()):
        raise ToolkitError("no image given: upload an image or draw a digit")
    if isinstance(source, np.ndarray):
        if source.size == 0:
            raise ToolkitError("the image is empty (0 pixels)")
        source = Image.fromarray(np.ascontiguousarray(source))
    if isinstance(source, Image.Image):
        im = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ToolkitError(f"no such image file: {shown(path.name)}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(path)  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ToolkitError(f"the image is too large: at most {MAX_SIDE}x{MAX_SIDE} pixels") from None
        except Exception:  # noqa: BLE001 - whatever a decoder raises on a file it cannot read
            raise ToolkitError(f"{shown(path.name)} is not an image Pillow can read (PNG, JPEG, GIF, BMP, WebP, TIFF ...)") from None
    w, h = im.size
    if w == 0 or h == 0:
        raise ToolkitError(f"the image is empty ({w}x{h} pixels)")
    if w > MAX_SIDE or h > MAX_SIDE:
        raise ToolkitError(f"the image is {w}x{h} pixels: at most {MAX_SIDE}x{MAX_SIDE}")
    if im.mode not in SUPPORTED_MODES:
        raise ToolkitError(f"unsupported image mode {im.mode!r}: use 8-bit grayscale, palette, RGB or RGBA")
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise ToolkitError(f"the image could not be decoded ({type(exc).__name__}: {first_line(exc)})") from None
    return upright(im)


def upright(im) -> "Image.Image":
    """The image as it is meant to be seen: a phone's JPEG stores its pixels sideways and says so in
    the EXIF orientation tag. A tag that cannot be applied is ignored, as viewers do."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a malformed EXIF block leaves the pixels as stored
        return im


def on_white(im) -> "Image.Image":
    """RGB, with any transparency composited onto white (a sketchpad's empty canvas is transparent)."""
    from PIL import Image

    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def mnist_digit(im) -> np.ndarray:
    """A (28, 28) uint8 digit as MNIST has them: white on black, the stroke scaled into a 20x20 box
    and centred by its centre of mass in the 28x28 frame (LeCun et al.'s own recipe).

    A 28x28 image that is already light-on-dark is taken as an MNIST digit and left alone.
    """
    from PIL import Image

    gray = np.asarray(on_white(im).convert("L"), dtype=np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if background > 127:  # dark ink on light paper: MNIST is light on dark
        gray, background = 255.0 - gray, 255.0 - background
    if gray.shape == (28, 28):
        return np.clip(gray, 0, 255).astype(np.uint8)
    ink = np.clip(gray - background, 0, None)
    peak = float(ink.max())
    if peak < 32:
        raise ToolkitError("no digit found: the image is blank (draw or upload a digit)")
    ink = ink * (255.0 / peak)
    rows, cols = np.nonzero(ink > 255 * 0.15)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = ink[top:bottom, left:right]
    h, w = crop.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    small = np.clip(small, 0, 255)
    total = small.sum()
    ys, xs = np.indices(small.shape)
    cy, cx = (ys * small).sum() / total, (xs * small).sum() / total
    # put the centre of mass on the frame's centre, keeping the whole box inside the frame
    y0 = int(np.clip(round(14 - cy), 0, 28 - small.shape[0]))
    x0 = int(np.clip(round(14 - cx), 0, 28 - small.shape[1]))
    frame = np.zeros((28, 28), dtype=np.float32)
    frame[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
    return np.clip(frame, 0, 255).astype(np.uint8)


def cifar_image(im) -> np.ndarray:
    """A (32, 32, 3) uint8 RGB image, any size and mode resized to CIFAR's."""
    from PIL import Image

    return np.asarray(on_white(im).resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=3.0), dtype=np.uint8)


def to_input(pixels: np.ndarray, manifest: dict) -> np.ndarray:
    """uint8 HxW or HxWxC pixels -> the float32 NCHW batch of one the manifest's model takes."""
    norm = manifest["normalization"]
    x = pixels.astype(np.float32)[None, None] if pixels.ndim == 2 else pixels.astype(np.float32).transpose(2, 0, 1)[None]
    mean = np.asarray(norm["mean"], dtype=np.float32)[None, :, None, None]
    std = np.asarray(norm["std"], dtype=np.float32)[None, :, None, None]
    x = (x * np.float32(norm["scale"]) - mean) / std
    expected = tuple(manifest["input"]["shape"][1:])
    if x.shape[1:] != expected:
        raise ToolkitError(f"this model takes {expected} images, the preprocessed image is {x.shape[1:]}")
    return x


def family(dataset: str) -> str:
    return MNIST_FAMILY if dataset == "mnist" else CIFAR_FAMILY


def preprocess(image, manifest: dict) -> np.ndarray:
    """The image as the manifest's model saw its training data: uint8 pixels, before normalization."""
    im = open_image(image)
    return mnist_digit(im) if family(manifest["dataset"]) == MNIST_FAMILY else cifar_image(im)


# ----------------------------------------------------------------------------- artifacts

@dataclass
class Entry:
    key: str  # "<export name>/<artifact file>": what a client passes to choose it
    export_dir: Path
    manifest: dict
    artifact: dict
    runtime: str

    @property
    def label(self) -> str:
        art = self.artifact
        parity = art.get("parity", {}).get(self.runtime) or next(iter(art.get("parity", {}).values()), None)
        checked = f", parity {parity['accuracy']:.2f}% (Δ {parity['delta_pp']:+.2f})" if parity else ", parity not checked"
        return f"{self.key} [{art['format']} {art['precision']} on {self.runtime}{checked}]"


@dataclass
class Catalog:
    """Every servable artifact under the given export folders, with a runner loaded on first use."""

    entries: dict[str, Entry] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "<key>: why it is not served here"
    _runners: dict[str, Runner] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dirs(cls, dirs: list[Path]) -> "Catalog":
        catalog = cls()
        for export_dir in find_exports(dirs):
            try:
                manifest = load_manifest(export_dir)  # the schema, confined artifact names, every artifact's sha256
            except ToolkitError as exc:  # one broken or hostile export does not take the others down
                catalog.skipped.append(f"{export_dir}: {exc}")
                continue
            for art in manifest["artifacts"]:
                key = f"{manifest['name']}/{art['file']}"
                runtimes = runtimes_for(art)
                if not runtimes:
                    why = trt_missing_reason() if art["format"] == "trt" else f"no runtime for format {art['format']!r}"
                    catalog.skipped.append(f"{key}: {why}")
                    continue
                if art["format"] == "trt":  # an engine runs only on the TensorRT version and GPU it was built for
                    try:
                        check_engine_compatible(export_dir / art["file"])
                    except ToolkitError as exc:
                        catalog.skipped.append(f"{key}: {exc}")
                        continue
                runtime = next(r for r in RUNTIME_PREFERENCE if r in runtimes)
                catalog.entries[key] = Entry(key, export_dir, manifest, art, runtime)
        # serving order, fixed once: newest export first, fp32 before lower precisions
        rank = {"fp32": 0, "fp16": 1, "int8": 2}
        newest = {d: -(d / MANIFEST_NAME).stat().st_mtime for d in {e.export_dir for e in catalog.entries.values()}}
        ordered = sorted(catalog.entries.values(), key=lambda e: (newest[e.export_dir], e.manifest["name"],
                                                                  rank.get(e.artifact["precision"], 9), e.artifact["file"]))
        catalog.entries = {e.key: e for e in ordered}
        if not catalog.entries:
            where = ", ".join(str(d) for d in dirs)
            raise ToolkitError(f"nothing to serve under {where}: run `toolkit train` and `toolkit export` first"
                               + (f" ({'; '.join(catalog.skipped)})" if catalog.skipped else ""))
        return catalog

    def keys(self, family_name: str | None = None) -> list[str]:
        """Keys in serving order (newest export first, fp32 before lower precisions), of one family or all."""
        return [k for k, e in self.entries.items() if family_name is None or family(e.manifest["dataset"]) == family_name]

    def entry(self, key: str | None) -> Entry:
        if not key:
            return next(iter(self.entries.values()))
        if key not in self.entries:
            raise ToolkitError(f"unknown artifact {shown(key)}; served here: {', '.join(self.keys())}")
        return self.entries[key]

    def runner(self, entry: Entry) -> Runner:
        if entry.key not in self._runners:
            self._runners[entry.key] = make_runner(entry.export_dir, entry.artifact, entry.runtime)
        return self._runners[entry.key]

    def classify(self, image, key: str | None = None, top_k: int = 3) -> "Prediction":
        entry = self.entry(key)
        t0 = time.perf_counter()
        pixels = preprocess(image, entry.manifest)
        x = to_input(pixels, entry.manifest)
        run = self.runner(entry)
        t1 = time.perf_counter()
        out = run(x)
        t2 = time.perf_counter()
        classes = entry.manifest["classes"]
        if out.shape != (1, len(classes)):
            raise ToolkitError(f"{entry.key} gives outputs of shape {out.shape}, not one score per class ({len(classes)})")
        logits = out[0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)[:top_k]
        top = {str(classes[i]): float(probs[i]) for i in order}
        return Prediction(top, entry, pixels, model_ms=(t2 - t1) * 1e3, total_ms=(t2 - t0) * 1e3)


@dataclass
class Prediction:
    top: dict[str, float]  # class name -> probability, best first
    entry: Entry
    pixels: np.ndarray  # what the model was given, before normalization
    model_ms: float
    total_ms: float

    @property
    def best(self) -> str:
        return next(iter(self.top))

    def summary(self) -> str:
        return (f"**{self.best}** ({self.top[self.best]:.1%}) · runtime `{self.entry.runtime}` · "
                f"model {self.model_ms:.2f} ms · with preprocessing {self.total_ms:.2f} ms · `{self.entry.key}`")


def find_exports(dirs: list[Path]) -> list[Path]:
    """Export folders: each given folder that has a manifest, or its sub-folders that do."""
    found: list[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ToolkitError(f"{d}: no such export folder")
        if (d / MANIFEST_NAME).is_file():
            found.append(d)
        else:  # names starting with '.' are an export's staging copies
            found.extend(sorted(p.parent for p in d.glob(f"*/{MANIFEST_NAME}") if not p.parent.name.startswith(".")))
    return found


# ----------------------------------------------------------------------------- examples

def mnist_test_split(data_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The real MNIST test images (N x 28 x 28 uint8) and labels from torchvision's raw IDX files
    (plain or .gz), read without torch; None when the files are not there."""
    raw = Path(data_dir) / "MNIST" / "raw"

    def read(name: str) -> np.ndarray | None:
        for path, opener in ((raw / name, open), (raw / f"{name}.gz", gzip.open)):
            if path.is_file():
                with reading(path, "MNIST IDX file"):
                    with opener(path, "rb") as f:
                        data = f.read()
                    ndim = data[3]
                    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
                    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
        return None

    images, labels = read("t10k-images-idx3-ubyte"), read("t10k-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ToolkitError(f"{raw}: the MNIST test files do not fit together (images {images.shape}, labels {labels.shape})")
    return images, labels


def mnist_test_digits(data_dir: Path, count: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """``count`` random digits of the real MNIST test set; [] when the files are not there."""
    split = mnist_test_split(data_dir)
    if split is None:
        return []
    images, labels = split
    pick = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
    return [(images[i], int(labels[i])) for i in pick]


def write_examples(digits: list[tuple[np.ndarray, int]], folder: Path) -> list[str]:
    from PIL import Image

    paths = []
    for i, (pixels, label) in enumerate(digits):
        path = folder / f"mnist-test-{i:02d}-label{label}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------- server

def check_listen_address(host: str, port: int) -> None:
    """One line now, instead of a traceback from the web server later: the host must be an address
    of this machine (or a name for one) and the port free."""
    import ipaddress
    import socket

    if re.fullmatch(r"[0-9.]+", host):  # looks like IPv4: never send it to DNS
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ToolkitError(f"--host {shown(host)} is not an IPv4 address") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, ValueError):
        raise ToolkitError(f"--host {shown(host)}: no such address or host name") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ToolkitError(f"port {port} on {host} is in use by another program: choose another with --port") from None
            raise ToolkitError(f"cannot listen on {host}:{port}: {exc.strerror or first_line(exc)}") from None


def parse_size(text: str) -> str:
    """``--max-upload``: a size such as 10mb, 500kb or 1gb (what Gradio takes), else one line."""
    if not re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?\s*(b|kb|mb|gb)?\s*", str(text), re.IGNORECASE) or float(re.sub(r"[^0-9.]", "", text)) <= 0:
        raise ToolkitError(f"--max-upload {shown(text)}: give a size such as 10mb, 500kb or 1gb")
    return text.strip().lower()


def serve(export_dirs: list[Path], host: str = "127.0.0.1", port: int = 7860, data_dir: Path | None = None,
          top_k: int = 3, examples: int = 8, share: bool = False, max_upload: str = MAX_UPLOAD,
          block: bool = True, console=None):
    """Start the demo; returns (demo, url) when ``block`` is False (tests), else serves until SIGINT or
    SIGTERM (``docker stop``), then closes the server and returns."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a closed network
    from toolkit.demo.app import build_demo

    max_upload = parse_size(max_upload)
    catalog = Catalog.from_dirs(export_dirs)
    check_listen_address(host, port)
    say = console.print if console is not None else print
    for line in catalog.skipped:
        say(f"not served: {line}")
    root = resolve_data_dir(data_dir)
    example_paths: list[str] = []
    allowed: list[str] = []
    example_dir = None
    if examples > 0 and catalog.keys(MNIST_FAMILY):
        digits = mnist_test_digits(root, examples)
        if digits:
            example_dir = Path(tempfile.mkdtemp(prefix="toolkit-examples-"))
            example_paths, allowed = write_examples(digits, example_dir), [str(example_dir)]
        else:
            say(f"no MNIST test set under {root}: the MNIST tab has no examples (set --data-dir or TOOLKIT_DATA_DIR)")
    demo = build_demo(catalog, example_paths, top_k=top_k)
    demo.queue(default_concurrency_limit=4)
    try:
        _, url, share_url = demo.launch(
            server_name=host, server_port=port, share=share, max_file_size=max_upload, show_error=True,
            allowed_paths=allowed, ssr_mode=False, quiet=True, prevent_thread_lock=True,
        )
    except OSError as exc:  # the port was taken between the check and the bind
        raise ToolkitError(f"cannot listen on {host}:{port}: {first_line(exc)}") from None
    local = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    if not block:
        return demo, local
    for key in catalog.keys():
        say(f"serving {catalog.entries[key].label}")
    say(f"ready: {local}" + (f" (listening on {host}; other machines use this machine's address)" if host in ("0.0.0.0", "::") else "")
        + (f", public link {share_url}" if share_url else ""))
    try:
        while True:  # the CLI's signal handlers raise Interrupted here on SIGINT / SIGTERM
            time.sleep(0.2)
    except (Interrupted, KeyboardInterrupt) as stop:
        signame = signal.Signals(stop.signum).name if isinstance(stop, Interrupted) else "SIGINT"
        say(f"{signame}: stopping the server")
    finally:
        demo.close()
        if example_dir is not None:
            shutil.rmtree(example_dir, ignore_errors=True)
    say("stopped")
    return demo, local
