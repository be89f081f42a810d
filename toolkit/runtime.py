"""Runners: one callable per (artifact, runtime) that maps a float32 NCHW batch to logits.

PyTorch eager (the reference), ONNX Runtime on CPU or CUDA, and TensorRT. Which runtimes an
artifact can run on is decided here, from the manifest entry and what this machine has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.errors import ToolkitError

Runner = Callable[[np.ndarray], np.ndarray]

TRT_INSTALL_HINT = "install `toolkit[trt]` (the `tensorrt` Python package) on a machine with an NVIDIA GPU and driver"


def ort_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def trt_missing_reason() -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"TensorRT is not installed: {TRT_INSTALL_HINT}"
    try:
        import torch

        if not torch.cuda.is_available():
            return "TensorRT needs an NVIDIA GPU, and none is visible"
    except ImportError:
        return "the TensorRT runner needs torch with CUDA for its device buffers"
    return None


def runtimes_for(artifact: dict) -> list[str]:
    """The runtimes present on this machine that can run this artifact."""
    if artifact["format"] == "onnx":
        providers = ort_providers()
        found = ["ort-cpu"]
        if "CUDAExecutionProvider" in providers:
            found.append("ort-cuda")
        return found
    if artifact["format"] == "trt":
        return [] if trt_missing_reason() else ["tensorrt"]
    return []


def torch_runner(model, device: str = "cpu") -> Runner:
    import torch

    model = model.to(device).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return run


def ort_runner(path: Path, runtime: str, threads: int | None = None) -> Runner:
    import onnxruntime as ort

    provider = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider"}[runtime]
    if provider not in ort.get_available_providers():
        raise ToolkitError(f"{runtime}: ONNX Runtime here has no {provider}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
    except Exception as exc:  # ORT raises its own Fail / InvalidGraph types
        raise ToolkitError(f"{path}: ONNX Runtime cannot load it ({(str(exc).splitlines() or ['?'])[0]})") from None
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0].astype(np.float32)

    return run


def engine_sidecar(engine_path: Path) -> Path:
    return engine_path.with_suffix(".json")


def check_engine_compatible(engine_path: Path) -> None:
    """An engine runs only on the TensorRT version and GPU it was built for: say so instead of crashing."""
    import tensorrt as trt

    from toolkit.export.to_trt import current_gpu

    sidecar = engine_sidecar(engine_path)
    if not sidecar.is_file():
        raise ToolkitError(f"{engine_path}: no sidecar {sidecar.name} recording the TensorRT version and GPU it was built for")
    built = json.loads(sidecar.read_text())
    here = {"tensorrt": trt.__version__, "gpu": current_gpu()["name"]}
    if built.get("tensorrt") != here["tensorrt"]:
        raise ToolkitError(f"{engine_path}: built with TensorRT {built.get('tensorrt')}, this machine has {here['tensorrt']}; rebuild it with `toolkit export --format trt`")
    if built.get("gpu") != here["gpu"]:
        raise ToolkitError(f"{engine_path}: built for {built.get('gpu')}, this machine has {here['gpu']}; rebuild it with `toolkit export --format trt`")


def trt_runner(engine_path: Path) -> Runner:
    reason = trt_missing_reason()
    if reason:
        raise ToolkitError(reason)
    import tensorrt as trt
    import torch

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
    stream = torch.cuda.Stream()

    def run(x: np.ndarray) -> np.ndarray:
        xin = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()
        context.set_input_shape(inputs[0], tuple(xin.shape))
        out = torch.empty(tuple(context.get_tensor_shape(outputs[0])), dtype=torch.float32, device="cuda")
        context.set_tensor_address(inputs[0], xin.data_ptr())
        context.set_tensor_address(outputs[0], out.data_ptr())
        with torch.cuda.stream(stream):
            if not context.execute_async_v3(stream.cuda_stream):
                raise ToolkitError(f"{engine_path}: TensorRT execution failed")
        stream.synchronize()
        return out.cpu().numpy()

    return run


def make_runner(export_dir: Path, artifact: dict, runtime: str) -> Runner:
    path = Path(export_dir) / artifact["file"]
    if runtime.startswith("ort-"):
        return ort_runner(path, runtime)
    if runtime == "tensorrt":
        return trt_runner(path)
    raise ToolkitError(f"unknown runtime {runtime!r}")
