"""Runners: one callable per (artifact, runtime) that maps a float32 NCHW batch to logits.

PyTorch eager (the reference), ONNX Runtime on CPU or CUDA, and TensorRT. Which runtimes an
artifact can run on is decided here, from the manifest entry and what this machine has.
"""

from __future__ import annotations

import importlib.util
import os

import json
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.core.errors import ToolkitError, first_line
from toolkit.core.files import confined, read_text_limited, reading
from toolkit.core.environment import THREADS_ENV, int8_kernels_saturate
from toolkit.core.manifest import Artifact, Manifest

Runner = Callable[[np.ndarray], np.ndarray]

TRT_INSTALL_HINT = "install the `trt` extra (`pip install '.[trt]'`: the `tensorrt` Python package) on a machine with an NVIDIA GPU and driver"


def ort_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def _cudart():
    """CUDA's runtime API from cuda-python (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def cuda_call(result):
    """cuda-python returns (error, *values): raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise ToolkitError(f"CUDA error {int(err)} ({getattr(err, 'name', err)})")
    return values[0] if len(values) == 1 else values


def current_gpu() -> dict:
    cudart = _cudart()
    props = cuda_call(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name, "compute_capability": f"{props.major}.{props.minor}"}


def trt_missing_reason() -> str | None:
    """Why TensorRT cannot run here, or None when it can. Needs no torch: serving is torch-free."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"TensorRT is not installed: {TRT_INSTALL_HINT}"
    try:
        cudart = _cudart()
    except ImportError:
        return f"cuda-python is not installed: {TRT_INSTALL_HINT}"
    try:
        if cuda_call(cudart.cudaGetDeviceCount()) < 1:
            return "TensorRT needs an NVIDIA GPU, and none is visible"
    except ToolkitError:
        return "TensorRT needs an NVIDIA GPU, and none is visible (the CUDA runtime found no device)"
    return None


def not_runnable_reason(artifact: Artifact) -> str:
    """Why ``artifact`` (one ``runtimes_for`` found no runtime for) does not run here, in one clause."""
    built = artifact.get("built_for") or {}
    if artifact.format == "trt" and isinstance(built, dict) and built.get("ahead_of_time"):
        return (f"built ahead of time by TensorRT-RTX {built.get('tensorrt_rtx')} for {built.get('compute_capability')}: "
                "it runs with TensorRT-RTX on such a GPU, not here")
    if artifact.format == "trt":
        return trt_missing_reason() or "TensorRT cannot run it here"
    if artifact.format == "openvino":
        return "OpenVINO Runtime is not installed here (pip install '.[openvino]')"
    if artifact.format == "executorch":
        return "ExecuTorch's runtime is not installed here (pip install executorch; it runs beside torch)"
    if artifact.format == "web":
        from toolkit.inference.web_runner import web_missing

        return web_missing() or "a page for the browser"
    return f"no runtime here runs {artifact.format} artifacts"


def runtimes_for(artifact: Artifact) -> list[str]:
    """The runtimes present on this machine that can run this artifact."""
    if artifact.format == "onnx":
        providers = ort_providers()
        found = ["ort-cpu"]
        if "CUDAExecutionProvider" in providers:
            found.append("ort-cuda")
        return found
    if artifact.format == "trt":
        return [] if trt_missing_reason() else ["tensorrt"]
    if artifact.format == "openvino":
        return ["openvino-cpu"] if importlib.util.find_spec("openvino") is not None else []
    if artifact.format == "executorch":
        present = all(importlib.util.find_spec(m) is not None for m in ("torch", "executorch"))
        return ["executorch-cpu"] if present else []
    if artifact.format == "web":
        from toolkit.inference.web_runner import RUNTIME, web_missing

        return [] if web_missing() else [RUNTIME]
    return []


def ort_runner(path: Path, runtime: str, threads: int | None = None, unfused: bool = False, classes: int | None = None,
               serving: bool = False) -> Runner:
    """``serving``: a server's session, run by many small requests beside other work: its threads do
    not spin waiting for work (spinning keeps a core busy between requests that the server's own
    Python needs). ``unfused``: graph optimizations at the basic level only, so that an int8 QDQ model runs as
    dequantize -> float op -> quantize instead of ONNX Runtime's fused integer kernels (exact to the
    QDQ model's arithmetic; see ``int8_unfused``). ``classes``: the graph must declare one output of
    (batch, classes) scores, else it is refused before it serves anything."""
    import onnxruntime as ort

    provider = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider"}[runtime]
    if provider not in ort.get_available_providers():
        raise ToolkitError(f"{runtime}: ONNX Runtime here has no {provider}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if unfused else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or int(os.environ.get(THREADS_ENV) or 0)  # toolkit.core.environment.apply_threads, or ORT's own default
    if threads:
        opts.intra_op_num_threads = threads
    if serving:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
    except Exception as exc:  # ORT raises its own Fail / InvalidGraph types
        raise ToolkitError(f"{path}: ONNX Runtime cannot load it ({first_line(exc)})") from None
    if classes is not None:
        check_scores_output(path, [list(o.shape) for o in session.get_outputs()], classes)
    name = session.get_inputs()[0].name
    dtype = np.uint8 if session.get_inputs()[0].type == "tensor(uint8)" else np.float32  # `export --input uint8`

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return session.run(None, {name: np.ascontiguousarray(x, dtype=dtype)})[0].astype(np.float32)
        except Exception as exc:  # noqa: BLE001 - a graph that does not take the manifest's input, whatever ORT calls it
            raise ToolkitError(f"{path}: ONNX Runtime failed on a batch of shape {tuple(x.shape)} ({first_line(exc)})") from None

    run.session = session  # for callers that inspect it (its options, inputs)
    run.unfused = unfused
    return run


def check_scores_output(path: Path, shapes: list[list], classes: int) -> None:
    """A classifier's graph declares one output of rank 2 whose last dimension, where the graph
    fixes it, is its manifest's number of classes; else it is refused before it runs anything.
    ``shapes``: the declared output shapes (ints where fixed, names or None where not)."""
    last = shapes[0][-1] if len(shapes) == 1 and len(shapes[0]) == 2 else None
    if len(shapes) != 1 or len(shapes[0]) != 2 or (isinstance(last, int) and last != classes):
        raise ToolkitError(f"{path}: its graph's outputs {shapes} are not one score per class for its manifest's {classes} classes")


def int8_unfused(weight_bits: int | None, runtime: str = "ort-cpu") -> bool:
    """Whether ONNX Runtime runs an int8 artifact with ``weight_bits``-bit weights unfused here: on an
    x86 CPU without VNNI/AMX its fused kernels would saturate 8-bit weights (7-bit weights, the
    ``--int8-weights 7`` export and every int8 export before it recorded weight_bits, fit)."""
    return runtime == "ort-cpu" and weight_bits == 8 and int8_kernels_saturate()


def engine_sidecar(engine_path: Path) -> Path:
    """``model.fp16.engine`` -> ``model.fp16.json``, beside it and never a link out of its folder."""
    return confined(engine_path.parent, engine_path.with_suffix(".json").name, f"sidecar of {engine_path}")


def check_engine_compatible(engine_path: Path) -> None:
    """An engine runs only on the TensorRT version and GPU it was built for: say so instead of crashing."""
    import tensorrt as trt

    sidecar = engine_sidecar(engine_path)
    if not sidecar.is_file():
        raise ToolkitError(f"{engine_path}: no sidecar {sidecar.name} recording the TensorRT version and GPU it was built for")
    with reading(sidecar, "engine sidecar"):
        built = json.loads(read_text_limited(sidecar, "engine sidecar", 1 << 20))
    if not isinstance(built, dict):
        raise ToolkitError(f"{sidecar}: not an engine sidecar (no JSON object)")
    here = {"tensorrt": trt.__version__, "gpu": current_gpu()["name"]}
    if built.get("tensorrt") != here["tensorrt"]:
        raise ToolkitError(f"{engine_path}: built with TensorRT {built.get('tensorrt')}, this machine has "
            f"{here['tensorrt']}; rebuild it with `toolkit export --format trt`")
    if built.get("gpu") != here["gpu"]:
        raise ToolkitError(f"{engine_path}: built for {built.get('gpu')}, this machine has {here['gpu']}; rebuild it with `toolkit export --format trt`")


def trt_runner(engine_path: Path) -> Runner:
    """Run a serialized engine with device buffers from the CUDA runtime (cuda-python), no torch."""
    reason = trt_missing_reason()
    if reason:
        raise ToolkitError(reason)
    import tensorrt as trt

    cudart = _cudart()
    check_engine_compatible(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise ToolkitError(f"{engine_path}: TensorRT could not deserialize the engine")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ToolkitError(f"{engine_path}: expected one input and one output, found {inputs} -> {outputs}")
    stream = cuda_call(cudart.cudaStreamCreate())
    h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes): grown, never shrunk

    def device_buffer(name: str, nbytes: int) -> int:
        ptr, size = buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_call(cudart.cudaFree(ptr))
            ptr, size = int(cuda_call(cudart.cudaMalloc(nbytes))), nbytes
            buffers[name] = (ptr, size)
        return ptr

    in_dtype = trt.nptype(engine.get_tensor_dtype(inputs[0]))  # float32, or uint8 for `export --input uint8`

    def run(x: np.ndarray) -> np.ndarray:
        host_in = np.ascontiguousarray(x, dtype=in_dtype)
        context.set_input_shape(inputs[0], tuple(host_in.shape))
        host_out = np.empty(tuple(context.get_tensor_shape(outputs[0])), dtype=np.float32)
        d_in, d_out = device_buffer(inputs[0], host_in.nbytes), device_buffer(outputs[0], host_out.nbytes)
        context.set_tensor_address(inputs[0], d_in)
        context.set_tensor_address(outputs[0], d_out)
        cuda_call(cudart.cudaMemcpyAsync(d_in, host_in.ctypes.data, host_in.nbytes, h2d, stream))
        if not context.execute_async_v3(int(stream)):
            raise ToolkitError(f"{engine_path}: TensorRT execution failed")
        cuda_call(cudart.cudaMemcpyAsync(host_out.ctypes.data, d_out, host_out.nbytes, d2h, stream))
        cuda_call(cudart.cudaStreamSynchronize(stream))
        return host_out

    return run


def make_runner(export_dir: Path, artifact: Artifact, runtime: str, threads: int | None = None, classes: int | None = None,
                serving: bool = False) -> Runner:
    """``threads``: ONNX Runtime's intra-op threads (default: one per core); ``classes``: the
    manifest's number of classes, which an ONNX graph's declared output must match; ``serving``: a
    server's session (``ort_runner``)."""
    path = Manifest.path(export_dir, artifact)
    if runtime.startswith("ort-"):
        unfused = artifact.precision == "int8" and int8_unfused(artifact.get("weight_bits", 7), runtime)
        return ort_runner(path, runtime, threads, unfused=unfused, classes=classes, serving=serving)
    if runtime == "tensorrt":
        return trt_runner(path)
    if runtime == "openvino-cpu":
        return openvino_runner(path, threads, classes=classes, exact=artifact.precision != "int8")
    if runtime == "executorch-cpu":
        from toolkit.inference.executorch_runner import executorch_runner

        return executorch_runner(path, threads, classes=classes, max_batch=int(artifact.get("max_batch") or 256))
    if runtime == "chromium-ort-web":
        from toolkit.inference.web_runner import web_runner

        return web_runner(path, classes=classes)
    raise ToolkitError(f"unknown runtime {runtime!r}")


def openvino_runner(path: Path, threads: int | None = None, classes: int | None = None, exact: bool = True) -> Runner:
    """OpenVINO Runtime on the CPU. ``exact``: float artifacts compute in fp32 (``INFERENCE_PRECISION_HINT``;
    on CPUs with bf16 or AMX OpenVINO would otherwise choose bf16, another model's answers); int8 IR runs
    OpenVINO's int8 kernels. Any batch size: the IR keeps the graph's dynamic batch axis."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32"} if exact else {}
    threads = threads or int(os.environ.get(THREADS_ENV) or 0)
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own error types
        raise ToolkitError(f"{path}: OpenVINO Runtime cannot load it ({first_line(exc)})") from None
    if classes is not None:
        shapes = [[d.get_length() if d.is_static else None for d in out.get_partial_shape()] for out in compiled.outputs]
        check_scores_output(path, shapes, classes)
    port = compiled.inputs[0]
    dtype = np.uint8 if port.get_element_type() == ov.Type.u8 else np.float32
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return np.array(request.infer({0: np.ascontiguousarray(x, dtype=dtype)})[compiled.outputs[0]], dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - a batch that does not fit the IR's input
            raise ToolkitError(f"{path}: OpenVINO Runtime failed on a batch of shape {tuple(x.shape)} ({first_line(exc)})") from None

    run.compiled = compiled
    return run
