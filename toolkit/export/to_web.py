"""The web export: a static page that classifies in the browser, with no server (``exports/<run>/web/``, or
``web-int8/`` for the int8 model).

The folder holds ``index.html`` (a sketchpad, an image drop, the top classes and what the model sees), the
page's modules (``prepare.mjs``: ``toolkit.inference.preprocess`` in JavaScript, ``toolkit.mjs``: loading,
running and ``window.toolkitClassify(url)``), ``model.json`` (what the manifest says of the input, the
classes and the preparation), the ONNX file it runs, and ONNX Runtime Web's own files, copied in so that
the folder works offline from any static file server. Those files come from the npm registry's tarball of
one pinned ONNX Runtime Web version (downloaded once into a cache, its sha512 checked), or from
``--ort-web DIR`` (an ``onnxruntime-web/dist`` folder); each file's sha256 is checked against the pin.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import urllib.request
from pathlib import Path

from toolkit.core.datasets import preparation_for
from toolkit.core.errors import ToolkitError, first_line
from toolkit.core.files import atomic_write
from toolkit.core.manifest import Manifest

ORT_WEB_VERSION = "1.31.1"
ORT_WEB_TARBALL = f"https://registry.npmjs.org/onnxruntime-web/-/onnxruntime-web-{ORT_WEB_VERSION}.tgz"
ORT_WEB_SHA512 = "5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw=="  # npm's dist.integrity
# The WebGPU build: its one WebAssembly binary also runs the plain WebAssembly backend (the fallback)
ORT_WEB_FILES = {
    "ort.webgpu.min.mjs": "329cd956772397a1aedd668e911195d39afefb182f6fc14aafa4f08ac8d8f379",
    "ort-wasm-simd-threaded.asyncify.mjs": "59cf781530e1a16df2a291d78798e3ec1152467edaec402d6f9599d85047c302",
    "ort-wasm-simd-threaded.asyncify.wasm": "ca319e9539cd0f1e291cf56074760121eaf39650f5dbf84b6e52c07f4b2944ec",
}
PAGE = Path(__file__).with_name("web_page")
PAGE_FILES = ("index.html", "prepare.mjs", "toolkit.mjs")
CACHE_ENV = "TOOLKIT_CACHE_DIR"
MAX_TARBALL = 256 << 20


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "toolkit") / f"onnxruntime-web-{ORT_WEB_VERSION}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checked(folder: Path, where: str) -> Path:
    for name, digest in ORT_WEB_FILES.items():
        path = folder / name
        if not path.is_file():
            raise ToolkitError(f"{where}: no {name} (ONNX Runtime Web {ORT_WEB_VERSION}'s dist folder holds it)")
        if _sha256(path) != digest:
            raise ToolkitError(f"{path}: not ONNX Runtime Web {ORT_WEB_VERSION}'s file (sha256 differs): the page is pinned to that version")
    return folder


def _download(into: Path, say) -> None:
    say(f"export: fetching ONNX Runtime Web {ORT_WEB_VERSION} from the npm registry (once; cached in {into})")
    try:
        with urllib.request.urlopen(ORT_WEB_TARBALL, timeout=120) as response:
            data = response.read(MAX_TARBALL + 1)
    except OSError as exc:
        raise ToolkitError(f"cannot fetch ONNX Runtime Web from {ORT_WEB_TARBALL} ({first_line(exc)}): "
                           "pass --ort-web DIR, a folder holding its dist files (npm install onnxruntime-web@"
                           f"{ORT_WEB_VERSION}: node_modules/onnxruntime-web/dist)") from None
    if base64.b64encode(hashlib.sha512(data).digest()).decode() != ORT_WEB_SHA512:
        raise ToolkitError(f"{ORT_WEB_TARBALL}: the download does not match its published sha512; not used")
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for name in ORT_WEB_FILES:
            member = tar.extractfile(f"package/dist/{name}")
            if member is None:
                raise ToolkitError(f"{ORT_WEB_TARBALL}: no dist/{name} in it")
            with atomic_write(into / name, "wb") as f:
                f.write(member.read())


def ort_web_files(ort_web: str | Path | None, say=print) -> Path:
    """A folder holding the pinned ONNX Runtime Web files, checked: ``ort_web`` if given, else the cache
    (filled from the npm registry the first time)."""
    if ort_web is not None:
        return _checked(Path(ort_web).expanduser(), f"--ort-web {ort_web}")
    folder = cache_dir()
    if not all((folder / name).is_file() and _sha256(folder / name) == digest for name, digest in ORT_WEB_FILES.items()):
        _download(folder, say)
    return _checked(folder, str(folder))


def page_spec(manifest: Manifest, model_file: str, precision: str) -> dict:
    """model.json: what the page needs of the manifest."""
    channels, height, width = manifest.chw
    return {
        "name": manifest.name, "model": model_file, "precision": precision, "recipe": manifest.source.recipe,
        "dataset": manifest.dataset, "preparation": preparation_for(manifest.dataset, channels), "classes": list(manifest.classes),
        "input": {"name": manifest.input.name, "dtype": manifest.input.dtype, "layout": manifest.input.layout, "chw": [channels, height, width]},
        "output": {"name": manifest.output.name},
        "normalization": {"scale": manifest.normalization.scale, "mean": list(manifest.normalization.mean), "std": list(manifest.normalization.std)},
        "onnxruntime_web": ORT_WEB_VERSION,
    }


def write_web(folder: Path, onnx_file: Path, manifest: Manifest, precision: str, ort_web: str | Path | None, say=print) -> dict:
    """The page into ``folder`` (made here) running ``onnx_file``; returns the manifest's fields."""
    if manifest.input.layout != "NCHW":
        raise ToolkitError("--format web takes an NCHW export (leave --layout out)")
    runtime = ort_web_files(ort_web, say)
    folder.mkdir(parents=True)
    for name in PAGE_FILES:
        shutil.copyfile(PAGE / name, folder / name)
    for name in ORT_WEB_FILES:
        shutil.copyfile(runtime / name, folder / name)
    shutil.copyfile(onnx_file, folder / onnx_file.name)
    (folder / "model.json").write_text(json.dumps(page_spec(manifest, onnx_file.name, precision), indent=1) + "\n")
    (folder / "NOTICE.txt").write_text(f"ONNX Runtime Web {ORT_WEB_VERSION} (ort.*.mjs, ort-wasm-*): MIT License, Copyright (c) Microsoft "
                                       "Corporation. https://github.com/microsoft/onnxruntime\n")
    runtime_bytes = sum((folder / name).stat().st_size for name in ORT_WEB_FILES)
    return {"onnxruntime_web": ORT_WEB_VERSION, "model_file": onnx_file.name, "runtime_bytes": runtime_bytes,
            "model_bytes": (folder / onnx_file.name).stat().st_size}
