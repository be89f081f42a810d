"""TensorRT engines built from the exported ONNX with the `tensorrt` Python API.

fp32 and fp16 engines come from the fp32 ONNX; the int8 engine comes from the QDQ ONNX
(explicit quantization), so one quantization serves ONNX Runtime and TensorRT alike. Each
engine has an optimization profile for batch 1..max, shares a timing cache with the other
engines of the export, and gets a JSON sidecar with the TensorRT version and GPU it was built
for (an engine only runs there).
"""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.core.errors import ToolkitError
from toolkit.core.files import atomic_write
from toolkit.inference.runtime import current_gpu, engine_sidecar, trt_missing_reason

WORKSPACE_BYTES = 1 << 30


def build_trt_engine(onnx_path: Path, engine_path: Path, precision: str, input_name: str, input_shape: tuple[int, ...], max_batch: int,
                     timing_cache: Path) -> dict:
    """``input_shape``: one image's shape in the graph's layout (CHW or HWC); the profile spans batch 1..max_batch."""
    reason = trt_missing_reason()
    if reason:
        raise ToolkitError(reason)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ToolkitError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        # the QDQ nodes fix the scales; the flag lets TensorRT pick int8 kernels for them,
        # FP16 lets the layers left in float (auto-fallback) run in half precision
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)

    shape = tuple(input_shape)
    opt_batch = min(32, max_batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (1, *shape), (opt_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)

    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)  # False: refuse a cache from another TensorRT or GPU

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ToolkitError(f"TensorRT failed to build a {precision} engine from {onnx_path.name} (see the log above)")
    with atomic_write(engine_path) as f:
        f.write(bytes(serialized))
    with atomic_write(timing_cache) as f:
        f.write(bytes(cache.serialize()))
    built_for = {"tensorrt": trt.__version__, "gpu": current_gpu()["name"], "compute_capability": current_gpu()["compute_capability"],
                 "precision": precision, "max_batch": max_batch, "onnx": onnx_path.name}
    with atomic_write(engine_sidecar(engine_path), "w") as f:
        json.dump(built_for, f, indent=2)
    return {"built_for": built_for, "max_batch": max_batch}
