"""ONNX export: opset 18, dynamic batch axis, named input/output, checked, simplified, with metadata."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import onnx
import torch

from toolkit.errors import ToolkitError, first_line
from toolkit.files import atomic_write
from toolkit.onnx_io import load_onnx

OPSET = 18
MAX_BATCH = 4096


def export_onnx(model: torch.nn.Module, manifest: dict, path: Path, pad_channels: int = 0) -> dict:
    """Write ``model`` to ``path`` as fp32 ONNX; returns the manifest fields for this artifact.

    ``pad_channels`` > 0 zero-pads conv channels to that multiple where the outputs stay exactly
    the same (``pad_channels.pad_conv_channels``): faster on ONNX Runtime's CPU kernels at small batches."""
    import onnxslim

    model = model.cpu().eval()
    shape = manifest["input"]["shape"][1:]
    example = torch.zeros(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                model,
                (example,),
                None,
                input_names=[manifest["input"]["name"]],
                output_names=[manifest["output"]["name"]],
                opset_version=OPSET,
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
                verbose=False,
            )
        except Exception as exc:
            raise ToolkitError(f"ONNX export of {manifest['model']} failed: {first_line(exc)}") from None
    proto = onnxslim.slim(program.model_proto)
    padded = {}
    if pad_channels:
        from toolkit.export.pad_channels import pad_conv_channels

        proto, count = pad_conv_channels(proto, pad_channels)
        padded = {"pad_channels": pad_channels, "padded_convs": count}
    onnx.checker.check_model(proto, full_check=True)
    add_metadata(proto, manifest)
    with atomic_write(path) as f:
        f.write(proto.SerializeToString())
    return {"opset": OPSET, "nodes": len(proto.graph.node), **padded}


def add_metadata(proto: onnx.ModelProto, manifest: dict) -> None:
    """Record what a reader needs to use the file on its own: classes, normalization, input shape."""
    fields = {
        "toolkit.model": manifest["model"],
        "toolkit.recipe": manifest["source"]["recipe"],
        "toolkit.dataset": manifest["dataset"],
        "toolkit.classes": json.dumps(manifest["classes"]),
        "toolkit.normalization": json.dumps(manifest["normalization"]),
        "toolkit.input_shape": json.dumps(manifest["input"]["shape"]),
        "toolkit.source_sha256": manifest["source"]["sha256"],
    }
    del proto.metadata_props[:]
    for key, value in fields.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "toolkit"


def convert_fp16(src: Path, dst: Path) -> dict:
    """fp16 weights and activations, fp32 input/output so callers feed the same tensors."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    import onnxslim

    # the converter leaves the cast nodes it adds out of topological order; slim re-sorts the graph
    proto = onnxslim.slim(convert_float_to_float16(load_onnx(src), keep_io_types=True))
    onnx.checker.check_model(proto)
    with atomic_write(dst) as f:
        f.write(proto.SerializeToString())
    return {"opset": OPSET, "nodes": len(proto.graph.node)}


def read_metadata(path: Path) -> dict:
    return {p.key: p.value for p in load_onnx(path).metadata_props}
