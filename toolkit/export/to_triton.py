"""A Triton Inference Server model repository built from an export's artifacts.

For each served artifact: ``triton/<model>/config.pbtxt`` (platform, dynamic batching, the
input and output read from the ONNX graph itself, class labels), ``triton/<model>/1/model.onnx``
(or ``model.plan`` for a TensorRT engine) and ``labels.txt``. The same files the parity check
passed are copied byte for byte, so Triton serves what `toolkit verify` proved.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from toolkit.core.errors import ToolkitError
from toolkit.core.files import atomic_write, confined, sha256_file
from toolkit.core.manifest import Artifact, InputSpec, Manifest, triton_model_name
from toolkit.core.onnx_io import load_onnx

REPOSITORY = "triton"
QUEUE_DELAY_US = 100  # how long Triton may hold a request to batch it with others

# ONNX tensor element types -> Triton's DataType names
_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.BOOL: "TYPE_BOOL",
}


def graph_io(onnx_path: Path) -> tuple[dict, dict]:
    """The single input and output of an ONNX graph: name, Triton type, dims without the batch axis."""
    graph = load_onnx(onnx_path).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ToolkitError(f"{onnx_path.name}: Triton export expects one input and one output, found {len(inputs)} and {len(graph.output)}")

    def spec(value) -> dict:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if not dims or dims[0] != -1:
            raise ToolkitError(f"{onnx_path.name}: {value.name} has no dynamic batch axis, which Triton's dynamic batching needs")
        if tensor.elem_type not in _TRITON_TYPES:
            raise ToolkitError(f"{onnx_path.name}: {value.name} has ONNX element type {tensor.elem_type}, which has no Triton type here")
        return {"name": value.name, "data_type": _TRITON_TYPES[tensor.elem_type], "dims": dims[1:]}

    return spec(inputs[0]), spec(graph.output[0])


# ONNX Runtime's TensorRT accelerator in Triton's ONNX Runtime backend builds an engine for the serving GPU
# when the model loads (the portable way to a datacenter GPU: an engine runs only on the GPU and TensorRT
# it was built with), cached so a restart reuses it. Its precision per artifact:
TRT_PRECISION = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}
TRT_WORKSPACE_BYTES = 1 << 30


def tensorrt_precision(artifact: Artifact) -> str | None:
    """The TensorRT accelerator's precision mode for an ONNX artifact, or None where TensorRT cannot build
    it (the CPU target's int8 file: uint8 activations); that model runs on ONNX Runtime's CUDA kernels."""
    if artifact.format != "onnx" or (artifact.precision == "int8" and artifact.get("activations", "int8") != "int8"):
        return None
    return TRT_PRECISION[artifact.precision]


def _accelerator(name: str, precision: str | None) -> str:
    if precision is None:
        return ""
    params = {"precision_mode": precision, "max_workspace_size_bytes": str(TRT_WORKSPACE_BYTES),
              "trt_engine_cache_enable": "1", "trt_engine_cache_path": f"/tmp/triton-trt-cache/{name}"}
    lines = "".join(f'        parameters {{ key: "{k}" value: "{v}" }}\n' for k, v in params.items())
    return ("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n        name: \"tensorrt\"\n"
            + lines + "      }\n    ]\n  }\n}\n")


def config_pbtxt(name: str, platform: str, max_batch: int, inp: dict, out: dict, gpu_only: bool, trt_precision: str | None = None) -> str:
    """Triton's model configuration in protobuf text format (tests parse it with Triton's own schema);
    ``trt_precision``: ONNX Runtime's TensorRT accelerator on a GPU, in that precision mode."""
    def dims(values: list[int]) -> str:
        return "[ " + ", ".join(str(v) for v in values) + " ]"

    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch}
input [
  {{
    name: "{inp['name']}"
    data_type: {inp['data_type']}
    dims: {dims(inp['dims'])}
  }}
]
output [
  {{
    name: "{out['name']}"
    data_type: {out['data_type']}
    dims: {dims(out['dims'])}
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {QUEUE_DELAY_US}
}}
instance_group [
  {{
    count: 1
    kind: {"KIND_GPU" if gpu_only else "KIND_AUTO"}
  }}
]
""" + _accelerator(name, trt_precision)


def write_triton_model(export_dir: Path, recipe: str, classes: list[str], artifact: Artifact, onnx_source: Path, max_batch: int,
                       inp: InputSpec | None = None) -> dict:
    """Add one artifact to ``export_dir/triton/`` and return its record for the manifest.

    ``onnx_source`` is the ONNX graph whose input/output the model has (for an engine: the ONNX
    it was built from)."""
    name = triton_model_name(recipe, artifact, inp)
    is_plan = artifact.format == "trt"
    why = left_out(artifact)
    if why:
        raise ToolkitError(why)
    platform, file = ("tensorrt_plan", "model.plan") if is_plan else ("onnxruntime_onnx", "model.onnx")
    trt_precision = tensorrt_precision(artifact)
    inp, out = graph_io(onnx_source)
    where = f"{export_dir.name}/{REPOSITORY}: model name"
    repository = confined(export_dir, REPOSITORY, f"{export_dir.name}: Triton repository")
    repository.mkdir(exist_ok=True)
    model_dir = confined(repository, name, where)
    if model_dir.is_symlink() or model_dir.is_file():
        model_dir.unlink()
    elif model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    shutil.copyfile(Manifest.path(export_dir, artifact), model_dir / "1" / file)
    with atomic_write(model_dir / "labels.txt", "w") as f:
        f.write("".join(f"{c}\n" for c in classes))
    with atomic_write(model_dir / "config.pbtxt", "w") as f:
        f.write(config_pbtxt(name, platform, max_batch, inp, out, gpu_only=is_plan, trt_precision=trt_precision))
    return {"name": name, "platform": platform, "source": artifact.file, "sha256": sha256_file(model_dir / "1" / file),
            "max_batch_size": max_batch, "input": inp, "output": out, "runs_on": runs_on(artifact)}


def runs_on(artifact: Artifact) -> str:
    """Where a model of the repository runs, said in the manifest and the model card."""
    if artifact.format == "trt":
        built = artifact.get("built_for") or {}
        return f"the GPU it was built for only ({built.get('gpu') or 'recorded in its sidecar'}, TensorRT {built.get('tensorrt', '?')})"
    precision = tensorrt_precision(artifact)
    if precision is None:
        return "CPU, or any NVIDIA GPU with ONNX Runtime's CUDA kernels (TensorRT cannot build its uint8 activations)"
    return f"CPU, or any NVIDIA GPU: ONNX Runtime's TensorRT accelerator builds a {precision} engine for it at load"


def left_out(artifact: Artifact) -> str | None:
    """Why an artifact cannot go into a Triton repository, or None. Triton's TensorRT backend runs standard
    TensorRT, which cannot load an engine TensorRT-RTX built: such an engine would fail to load on any server."""
    built = artifact.get("built_for") or {}
    if artifact.format in ("openvino", "executorch"):
        return f"{artifact.file} ({artifact.format}) is not put into the Triton repository: the ONNX model of its precision is"
    if artifact.format == "trt" and built.get("builder") == "tensorrt-rtx":
        return (f"{artifact.file} is left out of the Triton repository: TensorRT-RTX built it, and Triton's TensorRT backend "
                "(standard TensorRT) cannot load it; the ONNX model beside it gets ONNX Runtime's TensorRT accelerator, "
                "which builds an engine on the serving GPU")
    return None
