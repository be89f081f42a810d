"""TensorRT as far as it can be proven without a GPU: every kind of export, and every model family,
parsed by TensorRT's ONNX parser and built into an engine ahead of time on the CPU by TensorRT-RTX
(the `tensorrt_rtx` package, real wheels on PyPI; `pip install -e '.[dev]'` installs it on Linux
x86-64). Built, not run: running an engine needs an NVIDIA GPU (tests/export/test_export.py does that
with full TensorRT where there is one). With TOOLKIT_REQUIRE_TRT=1 (CI) a missing TensorRT-RTX
fails these tests instead of skipping them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import quiet
from toolkit.core.manifest import InputSpec, Manifest, Normalization
from toolkit.export import export
from toolkit.export.to_trt import build_trt_engine, fold_int32_dequantize
from toolkit.inference.runtime import ort_runner, trt_missing_reason
from toolkit.models.registry import MODELS, create_model


@pytest.fixture(scope="module")
def builder_package():
    """The package that builds engines here: full TensorRT where it runs, else TensorRT-RTX."""
    if trt_missing_reason() is None:
        return "tensorrt"
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        if os.environ.get("TOOLKIT_REQUIRE_TRT") == "1":
            pytest.fail("TOOLKIT_REQUIRE_TRT=1 but TensorRT-RTX is not installed: pip install tensorrt-rtx")
        pytest.skip("TensorRT-RTX is not installed (pip install tensorrt-rtx): no engine can be built here")
    return "tensorrt-rtx"


def _check_engine(engine: Path, precision: str, package: str, source: str) -> dict:
    assert engine.is_file() and engine.stat().st_size > 0
    built = json.loads(engine.with_suffix(".json").read_text())
    assert built["builder"] == package and built["precision"] == precision and built["onnx"] == source, built
    assert built.get("ahead_of_time", False) == (package == "tensorrt-rtx")
    return built


# what `toolkit export --format trt` is asked for: precision, and the export's other options
EXPORTS = {
    "fp32": ("fp32", {}),
    "fp16": ("fp16", {}),
    "int8": ("int8", {}),
    "int8 auto-fallback": ("int8", {"auto_fallback": True}),
    "int8 7-bit weights": ("int8", {"int8_weights": 7}),
    "fp32 padded channels": ("fp32", {"pad_channels": 16}),
    "fp16 uint8 input": ("fp16", {"input_dtype": "uint8"}),
    "int8 uint8 input NHWC": ("int8", {"input_dtype": "uint8", "layout": "NHWC"}),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_every_kind_of_export_builds_an_engine(case, builder_package, fine4_run, mnist_root, tmp_path):
    precision, options = EXPORTS[case]
    entry = export(fine4_run.run_dir, fmt="trt", precision=precision, out=tmp_path, data_dir=mnist_root, download=False,
                   console=quiet(), **options)
    export_dir = Path(entry["export_dir"])
    manifest = Manifest.load(export_dir)  # the engine is an artifact like any other: sha256, size
    art = manifest.artifact(f"model.{precision}.engine")
    assert art is not None and art.format == "trt" and entry["file"] == art.file
    source = "model.int8.onnx" if precision == "int8" else "model.fp32.onnx"
    built = _check_engine(export_dir / art.file, precision, builder_package, source)
    assert art.get("built_for") == built


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_family_builds_fp32_and_int8_engines(name, builder_package, tmp_path):
    """Untrained weights are enough: what is checked is that TensorRT takes every layer of the family."""
    from toolkit.export.quantize import quantize_int8
    from toolkit.export.to_onnx import export_onnx

    chw = (1, 28, 28) if name.startswith("mnist") else (3, 32, 32)
    model = create_model(name, num_classes=100 if name.startswith("resnet44v2") else 10).eval()
    spec = InputSpec(name="input", shape=["batch", *chw], dtype="float32", layout="NCHW")
    fp32 = tmp_path / "model.fp32.onnx"
    export_onnx(model, fp32, spec, "logits", Normalization(scale=1 / 255, mean=[0.5] * chw[0], std=[0.25] * chw[0]), {})
    int8 = tmp_path / "model.int8.onnx"
    quantize_int8(fp32, int8, np.random.default_rng(0).normal(size=(16, *chw)).astype(np.float32))
    for path, precision in ((fp32, "fp32"), (int8, "int8")):
        engine = tmp_path / f"model.{precision}.engine"
        build_trt_engine(path, engine, precision, "input", chw, 256, tmp_path / "timing.cache")
        _check_engine(engine, precision, builder_package, path.name)


def test_folding_the_int32_bias_dequantization_keeps_the_outputs(fine4_export, mnist_root, tmp_path):
    """TensorRT's parser refuses DequantizeLinear of an int32 input (ONNX Runtime's quantized biases:
    "input has type Int32 but must have type FP8, FP4, Int4, Int8, or UInt8", TensorRT-RTX 1.7.1).
    The engine is built from the graph with those constants folded to float: the same outputs."""
    from toolkit.inference.preprocess import model_input, read_test_split

    source = fine4_export / "model.int8.onnx"
    proto = onnx.load(str(source))
    int32_dq = sum(1 for n in proto.graph.node if n.op_type == "DequantizeLinear"
                   and any(i.name == n.input[0] and i.data_type == onnx.TensorProto.INT32 for i in proto.graph.initializer))
    assert int32_dq > 0  # the premise: this int8 file has them
    assert fold_int32_dequantize(proto) == int32_dq
    assert not any(i.data_type == onnx.TensorProto.INT32 for i in proto.graph.initializer)
    onnx.checker.check_model(proto)
    folded = tmp_path / "folded.onnx"
    onnx.save(proto, str(folded))
    manifest = Manifest.load(fine4_export)
    images, _, _ = read_test_split(manifest.dataset, mnist_root)
    x = model_input(images[:256], manifest)
    a = ort_runner(source, "ort-cpu", unfused=True)(x)
    b = ort_runner(folded, "ort-cpu", unfused=True)(x)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), np.abs(a - b).max()
    assert (a.argmax(1) == b.argmax(1)).all()


def test_an_engine_built_ahead_of_time_is_named_as_not_runnable_here(builder_package, fine4_run, mnist_root, tmp_path):
    """verify and serving list it with what built it and where it runs, not as "TensorRT is not installed"."""
    from toolkit.check.verify import verify
    from toolkit.inference.catalog import Catalog

    if builder_package != "tensorrt-rtx":
        pytest.skip("full TensorRT runs its engines here")
    entry = export(fine4_run.run_dir, fmt="trt", precision="fp16", out=tmp_path, console=quiet())
    report = verify(Path(entry["export_dir"]), data_dir=mnist_root, download=False, limit=500, console=quiet())
    skipped = {s["artifact"]: s["reason"] for s in report["skipped"]}
    assert "built ahead of time by TensorRT-RTX" in skipped["model.fp16.engine"] and "not here" in skipped["model.fp16.engine"]
    catalog = Catalog.from_dirs([tmp_path])
    assert any("model.fp16.engine" in why and "built ahead of time by TensorRT-RTX" in why for why in catalog.skipped), catalog.skipped
