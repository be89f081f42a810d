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
    from toolkit.inference.preprocess import model_input
    from toolkit.inference.splits import read_test_split

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
    # asked for by name (predict --artifact, the demo's API): it exists, so not "unknown", and why it cannot run here (#41)
    from toolkit.core.errors import ToolkitError

    key = f"{Path(entry['export_dir']).name}/model.fp16.engine"
    with pytest.raises(ToolkitError, match="cannot run here: .*built ahead of time by TensorRT-RTX") as err:
        catalog.entry(key)
    assert "unknown artifact" not in str(err.value) and "\n" not in str(err.value)


# ---- TensorRT's rules, checked without TensorRT (toolkit.core.trt_rules), held against TensorRT-RTX's own parser

def _graph(nodes, inits, input_type=onnx.TensorProto.FLOAT, domains=()):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", input_type, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), *[helper.make_opsetid(d, 1) for d in domains]])
    model.ir_version = 8
    return model


def _rule_cases() -> dict:
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w")

    def qdq(zero_type, zero):
        scale, z = numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(zero, zero_type), "z")
        return _graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_in"),
                       helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq_in"),
                       helper.make_node("Conv", ["d", "w"], ["y"], name="conv")], [scale, z, weight])

    # name: (graph, the node and rule words the check must name; None: TensorRT takes it)
    return {
        "plain conv": (_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [weight]), None),
        "symmetric int8 Q/DQ": (qdq(np.int8, 0), None),
        "ONNX Runtime kernel": (_graph([helper.make_node("FusedConv", ["x", "w"], ["y"], name="fused", domain="com.microsoft", activation="Relu")],
                                       [weight], domains=["com.microsoft"]), ("FusedConv 'fused'", "domain 'com.microsoft'")),
        "integer conv": (_graph([helper.make_node("Cast", ["x"], ["xi"], to=onnx.TensorProto.INT8),
                                 helper.make_node("ConvInteger", ["xi", "wi"], ["yi"], name="convint"),
                                 helper.make_node("Cast", ["yi"], ["y"], to=onnx.TensorProto.FLOAT)],
                                [numpy_helper.from_array(np.ones((4, 4, 3, 3), np.int8), "wi")]), ("ConvInteger 'convint'", "not supported")),
        "uint8 activations (ONNX Runtime's asymmetric)": (qdq(np.uint8, 128), ("QuantizeLinear 'q_in'", "non-zero uint8 zero point")),
        "int8 with a zero point": (qdq(np.int8, 3), ("QuantizeLinear 'q_in'", "non-zero int8 zero point")),
        "uint8 transposed": (_graph([helper.make_node("Transpose", ["x"], ["t"], name="nhwc", perm=[0, 2, 3, 1]),
                                     helper.make_node("Cast", ["t"], ["y"], to=onnx.TensorProto.FLOAT)], [], input_type=onnx.TensorProto.UINT8),
                             ("Transpose 'nhwc'", "uint8")),
    }


def _tensorrt_takes(proto, builder_package) -> bool:
    """Whether the installed TensorRT (or TensorRT-RTX) parses ``proto`` and builds an engine of it."""
    import importlib

    trt = importlib.import_module("tensorrt" if builder_package == "tensorrt" else "tensorrt_rtx")
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    if not trt.OnnxParser(network, logger).parse(proto.SerializeToString()):
        return False
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8))
    config.add_optimization_profile(profile)
    return builder.build_serialized_network(network, config) is not None


@pytest.mark.parametrize("case", list(_rule_cases()))
def test_the_static_rules_name_the_node_and_agree_with_tensorrt(case, builder_package):
    from toolkit.core.trt_rules import summary, violations

    proto, expected = _rule_cases()[case]
    found = violations(proto)
    if expected is None:
        assert found == [] and summary(found) == "ok"
    else:
        assert found and all(word in str(found[0]) for word in expected), summary(found)
    assert _tensorrt_takes(proto, builder_package) == (expected is None)  # TensorRT's own verdict is the same


def test_the_cpu_int8_file_is_named_as_not_for_tensorrt_and_tensorrt_refuses_it(builder_package, fine4_run, mnist_root, tmp_path):
    """The uint8-activation int8 file (ONNX Runtime's fast CPU format) breaks TensorRT's symmetric rule:
    verify says so per file, and TensorRT's parser refuses the same graph."""
    from toolkit.check.verify import verify
    from toolkit.core.trt_rules import check_file

    export(fine4_run.run_dir, fmt="onnx", precision="fp32", out=tmp_path, console=quiet())
    entry = export(fine4_run.run_dir, fmt="onnx", precision="int8", int8_activations="uint8", out=tmp_path, data_dir=mnist_root,
                   download=False, console=quiet())
    export_dir = Path(entry["export_dir"])
    found = check_file(export_dir / "model.int8.onnx")
    assert found and "zero point" in found[0].rule
    proto = onnx.load(str(export_dir / "model.int8.onnx"))
    fold_int32_dequantize(proto)
    assert not _tensorrt_takes(proto, builder_package)
    report = verify(export_dir, data_dir=mnist_root, limit=500, download=False, console=quiet())
    assert report["tensorrt_rules"]["model.fp32.onnx"] == "ok"
    assert "zero point" in report["tensorrt_rules"]["model.int8.onnx"]
    assert "model.int8.onnx: QuantizeLinear" in (export_dir / "parity.md").read_text()


def test_a_pruned_run_builds_engines(builder_package, fine4_run, mnist_root, tmp_path):
    from toolkit.train.prune import prune

    pruned = prune(fine4_run.checkpoint, method="channel", amount=0.3, finetune_epochs=1, out=tmp_path / "runs", data_dir=mnist_root,
                   device="cpu", train_limit=2000, test_limit=500, download=False, console=quiet())
    run_dir = Path(pruned["run_dir"]) if "run_dir" in pruned else Path(pruned["checkpoint"]).parent
    for precision in ("fp32", "int8"):
        entry = export(run_dir, fmt="trt", precision=precision, out=tmp_path / "exports", data_dir=mnist_root, download=False, console=quiet())
        source = "model.int8.onnx" if precision == "int8" else "model.fp32.onnx"
        _check_engine(Path(entry["export_dir"]) / entry["file"], precision, builder_package, source)


def test_trt_arch_chooses_the_gpus_of_an_ahead_of_time_engine(builder_package, fine4_run, tmp_path):
    from toolkit.core.errors import ToolkitError

    if builder_package != "tensorrt-rtx":
        with pytest.raises(ToolkitError, match="--trt-arch"):
            export(fine4_run.run_dir, fmt="trt", precision="fp32", out=tmp_path, trt_arch=("sm89",), console=quiet())
        return
    entry = export(fine4_run.run_dir, fmt="trt", precision="fp32", out=tmp_path, trt_arch=("sm89", "sm120"), console=quiet())
    built = json.loads((Path(entry["export_dir"]) / "model.fp32.json").read_text())
    assert built["compute_capability"] == ["sm89", "sm120"] and built["ahead_of_time"] is True
    card = (Path(entry["export_dir"]) / "MODEL_CARD.md").read_text()
    assert "model.fp32.engine: built ahead of time on a CPU by TensorRT-RTX" in card and "sm89, sm120" in card
    with pytest.raises(ToolkitError, match="'sm90' is not a GPU architecture TensorRT-RTX builds for"):
        export(fine4_run.run_dir, fmt="trt", precision="fp32", out=tmp_path, trt_arch=("sm90",), console=quiet())
    with pytest.raises(ToolkitError, match="--trt-arch applies to --format trt only"):
        export(fine4_run.run_dir, fmt="onnx", precision="fp32", out=tmp_path, trt_arch=("sm89",), console=quiet())


def test_a_tensorrt_rtx_engine_never_goes_into_a_triton_repository(builder_package, fine4_run, tmp_path):
    """#42: the TensorRT-RTX engine went into the Triton repository as tensorrt_plan, which Triton's TensorRT
    backend (standard TensorRT) cannot load. It is left out with one line saying why; the ONNX model of the
    same precision goes in with ONNX Runtime's TensorRT accelerator, which builds an engine on the serving GPU.
    Every config.pbtxt parses with Triton's schema, and its platform is what built the file."""
    import io

    from google.protobuf import text_format
    from rich.console import Console
    from tritonclient.grpc import model_config_pb2

    if builder_package != "tensorrt-rtx":
        pytest.skip("full TensorRT builds engines Triton can load: they may go in")
    out = tmp_path / "exports"
    export(fine4_run.run_dir, fmt="trt", precision="fp16", out=out, console=quiet())
    said = io.StringIO()
    entry = export(fine4_run.run_dir, fmt="triton", precision="fp16", out=out, console=Console(file=said, width=400))
    assert "model.fp16.engine is left out of the Triton repository: TensorRT-RTX built it" in said.getvalue()
    assert entry["models"] == ["fine4_fp16"]
    repo = Path(entry["repository"])
    manifest = Manifest.load(entry["export_dir"])
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
        config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        source = manifest.artifact(manifest.triton.models[config.name].source)
        assert config.platform == {"onnx": "onnxruntime_onnx", "trt": "tensorrt_plan"}[source.format]
        assert source.format != "trt" or (source.get("built_for") or {}).get("builder") != "tensorrt-rtx"
        assert not list(model_dir.glob("*/model.plan")) or source.format == "trt"
    config = text_format.Parse((repo / "fine4_fp16" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    card = (Path(entry["export_dir"]) / "MODEL_CARD.md").read_text()
    assert "`fine4_fp16` (model.fp16.onnx): runs on CPU, or any NVIDIA GPU: ONNX Runtime's TensorRT accelerator builds a FP16" in card


@pytest.mark.parametrize("archs", [("",), ("sm89", ""), ()])
def test_an_empty_trt_arch_name_is_refused(fine4_run, tmp_path, archs):
    """#40: `--trt-arch ,` silently meant the builder's default. An empty name is refused in one line,
    before anything is built, for every format."""
    from toolkit.core.errors import ToolkitError

    for fmt in ("trt", "onnx"):
        with pytest.raises(ToolkitError, match="--trt-arch") as err:
            export(fine4_run.run_dir, fmt=fmt, precision="fp32", out=tmp_path / "out", trt_arch=archs, console=quiet())
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_every_allowed_arch_builds_or_the_error_names_the_one_refused(builder_package, fine4_run, tmp_path):
    """#40: `--trt-arch sm75,sm120` failed to build although each name is allowed, with no word of which.
    Each allowed name alone and beside another: it builds, or the one line names the target the builder
    refused and why (TensorRT-RTX compiles every target's kernels; Turing has no FP32 GEMM)."""
    from toolkit.core.errors import ToolkitError
    from toolkit.export.to_trt import TRT_ARCHS

    if builder_package != "tensorrt-rtx":
        pytest.skip("--trt-arch is TensorRT-RTX's (ahead of time); full TensorRT builds for its own GPU")
    refused = {}
    for arch in TRT_ARCHS:
        try:
            export(fine4_run.run_dir, fmt="trt", precision="fp32", out=tmp_path / arch, trt_arch=(arch,), console=quiet())
        except ToolkitError as exc:
            assert "\n" not in str(exc) and f"{arch} refused by the builder: " in str(exc), str(exc)
            refused[arch] = str(exc)
    assert len(refused) < len(TRT_ARCHS)  # most targets build this model
    for arch in refused:  # beside one that builds, the error still names the one refused
        other = next(a for a in TRT_ARCHS if a not in refused)
        with pytest.raises(ToolkitError, match=f"{arch} refused by the builder: .*leave it out of --trt-arch"):
            export(fine4_run.run_dir, fmt="trt", precision="fp32", out=tmp_path / f"{arch}-{other}", trt_arch=(arch, other), console=quiet())
    print("refused:", refused)


def test_a_failed_build_keeps_the_builders_log(builder_package, tmp_path):
    """A graph within the static rules that TensorRT's parser still refuses (Det): one line naming the
    node, and the builder's log kept where the line says."""
    from onnx import helper, numpy_helper

    from toolkit.core.errors import ToolkitError

    graph = helper.make_graph([helper.make_node("Det", ["x"], ["d"], name="det"), helper.make_node("Unsqueeze", ["d", "axes"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "det.onnx"))
    log = tmp_path / "out" / "det.fp32.trt-build.log"
    with pytest.raises(ToolkitError) as caught:
        build_trt_engine(tmp_path / "det.onnx", tmp_path / "det.engine", "fp32", "x", (4, 4), 4, tmp_path / "cache", log_path=log)
    message = str(caught.value)
    assert "\n" not in message and "Det" in message and str(log) in message
    assert "Det" in log.read_text() and not (tmp_path / "det.engine").exists()


def test_the_default_int8_is_for_cpus_and_an_engine_requantizes_it_for_tensorrt(builder_package, fine4_run, mnist_root, tmp_path):
    """#30: a plain ONNX int8 export targets the CPU (uint8 activations: ONNX Runtime's fast x86 format),
    says so in one line and in the model card; --format trt on the same export quantizes it again for
    TensorRT (symmetric), says so, and builds."""
    from rich.console import Console

    from toolkit.core.errors import ToolkitError

    console = Console(record=True, width=400)
    entry = export(fine4_run.run_dir, precision="int8", out=tmp_path, data_dir=mnist_root, download=False, console=console)
    assert entry["target"] == "cpu" and entry["activations"] == "uint8"
    assert "int8 for CPUs: uint8 activations and int8 weights" in console.export_text()
    export_dir = Path(entry["export_dir"])
    assert "- model.int8.onnx: int8 for CPUs" in (export_dir / "MODEL_CARD.md").read_text()
    console = Console(record=True, width=400)
    built = export(fine4_run.run_dir, fmt="trt", precision="int8", out=tmp_path, data_dir=mnist_root, download=False, console=console)
    assert "has uint8 activations (the CPU target's format)" in console.export_text()
    source = Manifest.load(export_dir).artifact("model.int8.onnx")
    assert source.get("target") == "tensorrt" and source.get("activations") == "int8"
    _check_engine(export_dir / built["file"], "int8", builder_package, "model.int8.onnx")
    with pytest.raises(ToolkitError, match="--format trt builds for TensorRT"):
        export(fine4_run.run_dir, fmt="trt", precision="int8", target="cpu", out=tmp_path, console=quiet())
    with pytest.raises(ToolkitError, match="unknown target 'gpu'"):
        export(fine4_run.run_dir, precision="int8", target="gpu", out=tmp_path, console=quiet())
