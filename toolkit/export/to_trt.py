"""TensorRT engines built from the exported ONNX, with TensorRT or TensorRT-RTX.

fp32 and fp16 engines come from the fp32 ONNX; the int8 engine comes from the QDQ ONNX
(explicit quantization), so one quantization serves ONNX Runtime and TensorRT alike. Each
engine has an optimization profile for batch 1..max and gets a JSON sidecar saying what built
it and for which GPU (an engine only runs there).

The builder is full TensorRT (the `tensorrt` package) where it can run, that is with an NVIDIA
GPU; else TensorRT-RTX (the `tensorrt_rtx` package, real wheels on PyPI), which builds engines
ahead of time on the CPU with no GPU present, for its default GPU architectures (compute
capability 8.0, 8.6, 8.9, 12.0 and later, its documentation's "CPU-only AOT"). Such an engine is
built, not run: it runs with TensorRT-RTX's runtime on one of those GPUs. Building it proves that
TensorRT's ONNX parser takes the graph and that the builder finds an implementation for every
layer, which is what this module's tests check for every kind of export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
from onnx import numpy_helper

from toolkit.core.onnx_io import load_onnx
from toolkit.core.errors import ToolkitError, first_line, shown
from toolkit.core.files import atomic_write
from toolkit.core.trt_rules import summary, violations
from toolkit.inference.runtime import current_gpu, engine_sidecar, trt_missing_reason

WORKSPACE_BYTES = 1 << 30
RTX_DEFAULT_TARGETS = "compute capability 8.0, 8.6, 8.9, 12.0 and later (TensorRT-RTX's default)"
# --trt-arch: TensorRT-RTX's ComputeCapability names, lower-cased (1.7 knows sm75, sm80, sm86, sm89,
# sm120, sm121; no Hopper sm90: an H100 or H200 runs no TensorRT-RTX engine)
TRT_ARCHS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")


def check_archs(archs: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """``--trt-arch`` checked: TensorRT-RTX architecture names, or None for the builder's default."""
    if archs is None:
        return None
    if not archs or any(not a for a in archs):
        raise ToolkitError(f"--trt-arch {shown(','.join(archs))}: an empty name; give one or more of {', '.join(TRT_ARCHS)}, "
                           "separated by commas (or leave --trt-arch out for the builder's default)")
    wrong = [a for a in archs if a not in TRT_ARCHS]
    if wrong:
        raise ToolkitError(f"--trt-arch {','.join(archs)}: {wrong[0]!r} is not a GPU architecture TensorRT-RTX builds for "
                           f"(one or more of {', '.join(TRT_ARCHS)})")
    return tuple(dict.fromkeys(archs))


def targets_line(archs: tuple[str, ...] | None) -> str:
    return f"{', '.join(archs)} (--trt-arch)" if archs else RTX_DEFAULT_TARGETS


def builder() -> tuple[object, str, bool]:
    """(the TensorRT module to build with, its package name, whether the build is ahead of time
    without a GPU). Full TensorRT where it runs, else TensorRT-RTX; neither: a one-line error."""
    full_reason = trt_missing_reason()
    if full_reason is None:
        import tensorrt

        return tensorrt, "tensorrt", False
    try:
        import tensorrt_rtx
    except ImportError:
        raise ToolkitError(f"cannot build a TensorRT engine here: {full_reason}; or install TensorRT-RTX "
                           "(`pip install tensorrt-rtx`), which builds engines ahead of time without a GPU") from None
    return tensorrt_rtx, "tensorrt-rtx", True


def builder_line(archs: tuple[str, ...] | None = None) -> str:
    """One line for the user: which package builds, for which GPUs, and whether the engine can run here."""
    trt, package, aot = builder()
    if aot:
        return (f"TensorRT-RTX {trt.__version__} builds this engine ahead of time on the CPU, for {targets_line(archs)}; "
                "it is built, not run: no GPU here")
    if archs:
        raise ToolkitError("--trt-arch chooses the GPUs of an engine built ahead of time by TensorRT-RTX; full TensorRT "
                           "builds for this machine's GPU: leave --trt-arch out")
    return f"TensorRT {trt.__version__} builds this engine for this machine's GPU"


def _logger(trt):
    """A TensorRT logger that keeps every message of warning level and above (the build log)."""

    class Kept(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                self.lines.append(f"[{severity.name}] {msg}")

    return Kept()


def refused_arch(lines: list[str]) -> str | None:
    """The GPU architecture a failed ahead-of-time build names in its log, and why: TensorRT-RTX compiles
    every target's kernels, and one target can lack one (Turing, SM75: no FP32 GEMM), or None."""
    for line in lines:
        found = re.search(r"\(SM(\d+)\)\s*:?\s*(.*?)(?: In \w+ at |$)", line) if line.startswith("[ERROR]") else None
        if found:
            return f"sm{found.group(1)} refused by the builder: {found.group(2).strip().rstrip('.')}"
    return None


def _fail(message: str, logger, log_path: Path | None) -> ToolkitError:
    """The one-line error of a failed parse or build (with the target the builder refused, where it names
    one); the builder's log kept at ``log_path``."""
    arch = refused_arch(logger.lines)
    if arch:
        message += f": {arch} (leave it out of --trt-arch)"
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(log_path, "w") as f:
            f.write("\n".join(logger.lines) + "\n")
        message += f" (the builder's log: {log_path})"
    return ToolkitError(message)


def fold_int32_dequantize(proto: onnx.ModelProto) -> int:
    """Replace each DequantizeLinear of a constant int32 tensor (ONNX Runtime's quantized biases)
    by its float value, in place; returns how many. TensorRT's parser takes DequantizeLinear of
    int8/uint8 (and fp8/int4) inputs only, and a dequantized constant is a constant: the graph
    computes the same, and the int8 ONNX file that ONNX Runtime runs is left as it is."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    used = {}
    for node in graph.node:
        for name in node.input:
            used[name] = used.get(name, 0) + 1
    folded, keep = 0, []
    for node in graph.node:
        src = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if src is None or src.data_type != onnx.TensorProto.INT32 or not all(n in inits for n in node.input[1:]):
            keep.append(node)
            continue
        q = numpy_helper.to_array(src).astype("float64")
        scale = numpy_helper.to_array(inits[node.input[1]]).astype("float64")
        zero = numpy_helper.to_array(inits[node.input[2]]).astype("float64") if len(node.input) > 2 and node.input[2] else 0.0
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and q.ndim > 0:  # per-axis: scale and zero point along ``axis``
            shape = [1] * q.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
            zero = zero.reshape(shape) if getattr(zero, "ndim", 0) == 1 else zero
        graph.initializer.append(numpy_helper.from_array(((q - zero) * scale).astype("float32"), node.output[0]))
        folded += 1
        for name in node.input:
            used[name] -= 1
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        unused = [i for i in graph.initializer if used.get(i.name, 1) == 0 and i.data_type == onnx.TensorProto.INT32]
        for init in unused:
            graph.initializer.remove(init)
    return folded


def _config(trt, network_builder, precision: str, aot: bool, archs: tuple[str, ...] | None):
    """The builder configuration: workspace, target GPUs (TensorRT-RTX ahead of time), precision flags."""
    config = network_builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if aot and archs:
        config.num_compute_capabilities = len(archs)
        for i, arch in enumerate(archs):
            config.set_compute_capability(getattr(trt.ComputeCapability, arch.upper()), i)
    if not aot:  # TensorRT-RTX chooses precisions from the graph (strong typing, Q/DQ), and has no such flags
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "int8":
            # the QDQ nodes fix the scales; the flag lets TensorRT pick int8 kernels for them,
            # FP16 lets the layers left in float (auto-fallback) run in half precision
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)
    return config


def _target_record(trt, aot: bool, archs: tuple[str, ...] | None) -> dict:
    """What the sidecar says the engine was built for: GPU architectures (ahead of time) or this GPU."""
    if aot:
        return {"tensorrt_rtx": trt.__version__, "ahead_of_time": True, "gpu": None,
                "compute_capability": list(archs) if archs else RTX_DEFAULT_TARGETS}
    gpu = current_gpu()
    return {"tensorrt": trt.__version__, "gpu": gpu["name"], "compute_capability": gpu["compute_capability"]}


def build_trt_engine(onnx_path: Path, engine_path: Path, precision: str, input_name: str, input_shape: tuple[int, ...], max_batch: int,
                     timing_cache: Path, source_name: str | None = None, archs: tuple[str, ...] | None = None,
                     log_path: Path | None = None) -> dict:
    """``input_shape``: one image's shape in the graph's layout (CHW or HWC); the profile spans batch 1..max_batch.
    ``source_name``: the artifact the engine is made from, as the sidecar records it (default: ``onnx_path``'s name).
    ``archs``: TensorRT-RTX's target GPU architectures (``TRT_ARCHS``; None: its default). A graph that
    breaks TensorRT's rules (``toolkit.core.trt_rules``) is refused before the builder runs; a failed
    parse or build keeps the builder's log at ``log_path``."""
    trt, package, aot = builder()
    proto = load_onnx(onnx_path, check=False)  # parsed at the boundary: a damaged file is one line, not a DecodeError
    fold_int32_dequantize(proto)
    broken = violations(proto)
    if broken:
        raise ToolkitError(f"{source_name or onnx_path.name} breaks TensorRT's rules: {summary(broken)}")
    logger = _logger(trt)
    network_builder = trt.Builder(logger)
    network = network_builder.create_network(0)  # explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(proto.SerializeToString()):
        errors = "; ".join(first_line(Exception(str(parser.get_error(i)))) for i in range(parser.num_errors))
        raise _fail(f"{package} could not parse {onnx_path.name}: {errors}", logger, log_path)

    config = _config(trt, network_builder, precision, aot, archs)
    shape = tuple(input_shape)
    profile = network_builder.create_optimization_profile()
    profile.set_shape(input_name, (1, *shape), (min(32, max_batch), *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)

    cache = None
    if not aot:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, False)  # False: refuse a cache from another TensorRT or GPU

    serialized = network_builder.build_serialized_network(network, config)
    if serialized is None:
        raise _fail(f"{package} failed to build a {precision} engine from {onnx_path.name}", logger, log_path)
    with atomic_write(engine_path) as f:
        f.write(bytes(serialized))
    if cache is not None:
        with atomic_write(timing_cache) as f:
            f.write(bytes(cache.serialize()))
    built_for = {"builder": package, **_target_record(trt, aot, archs), "precision": precision, "max_batch": max_batch,
                 "onnx": source_name or onnx_path.name}
    with atomic_write(engine_sidecar(engine_path), "w") as f:
        json.dump(built_for, f, indent=2)
    return {"built_for": built_for, "max_batch": max_batch}
