"""ONNX export: opset 18, dynamic batch axis, named input/output, checked, simplified, with metadata."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import onnx
import torch

from toolkit.core.errors import ToolkitError, first_line
from toolkit.core.files import atomic_write
from toolkit.core.manifest import InputSpec, Manifest, Normalization
from toolkit.core.onnx_io import load_onnx

OPSET = 18
MAX_BATCH = 4096


class RawPixels(torch.nn.Module):
    """The model behind its own normalization: takes uint8 pixels (NCHW, or NHWC with ``channels_last``)
    and normalizes them exactly as training did (x / 255, - mean, / std, in float32), so a consumer
    needs no preprocessing code."""

    def __init__(self, model: torch.nn.Module, normalization: Normalization, channels_last: bool = False):
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.divisor = 1.0 / normalization.scale
        self.register_buffer("mean", torch.tensor(normalization.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(normalization.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32)  # first: TensorRT takes a uint8 input only into a Cast (its Transpose refuses uint8)
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.model((x / self.divisor - self.mean) / self.std)


class ChannelsLast(torch.nn.Module):
    """The model taking normalized float NHWC input."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.permute(0, 3, 1, 2))


def export_onnx(model: torch.nn.Module, path: Path, input_spec: InputSpec, output_name: str, normalization: Normalization,
                metadata: dict[str, str], pad_channels: int = 0) -> dict:
    """Write ``model`` to ``path`` as fp32 ONNX taking ``input_spec``'s input; returns the manifest
    fields for this artifact. ``metadata`` goes into the file (``onnx_metadata`` makes it).

    ``pad_channels`` > 0 zero-pads conv channels to that multiple where the outputs stay exactly
    the same (``pad_channels.pad_conv_channels``): faster on ONNX Runtime's CPU kernels at small batches.
    A uint8 input gets a graph that takes raw pixels and normalizes them itself (``RawPixels``)."""
    import onnxslim

    model = model.cpu().eval()
    channels_last = input_spec.layout == "NHWC"
    example = torch.zeros(2, *input_spec.shape[1:])
    if input_spec.dtype == "uint8":
        model, example = RawPixels(model, normalization, channels_last).eval(), example.to(torch.uint8)
    elif channels_last:
        model = ChannelsLast(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                model,
                (example,),
                None,
                input_names=[input_spec.name],
                output_names=[output_name],
                opset_version=OPSET,
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
                verbose=False,
            )
        except Exception as exc:
            raise ToolkitError(f"ONNX export failed: {first_line(exc)}") from None
    proto = onnxslim.slim(program.model_proto)
    padded = {}
    if pad_channels:
        from toolkit.export.pad_channels import pad_conv_channels

        proto, count = pad_conv_channels(proto, pad_channels)
        padded = {"pad_channels": pad_channels, "padded_convs": count}
    onnx.checker.check_model(proto, full_check=True)
    add_metadata(proto, metadata)
    with atomic_write(path) as f:
        f.write(proto.SerializeToString())
    return {"opset": OPSET, "nodes": len(proto.graph.node), **padded}


def onnx_metadata(manifest: Manifest) -> dict[str, str]:
    """What a reader needs to use the file on its own: classes (also as ``names``, the key other
    tools write: {0: 'name', ...}), normalization, the input spec."""
    return {
        "names": str(dict(enumerate(manifest.classes))),
        "toolkit.input": json.dumps(manifest.input.model_dump(mode="json")),
        "toolkit.model": manifest.model,
        "toolkit.recipe": manifest.source.recipe,
        "toolkit.dataset": manifest.dataset,
        "toolkit.classes": json.dumps(manifest.classes),
        "toolkit.normalization": json.dumps(manifest.normalization.model_dump(mode="json")),
        "toolkit.input_shape": json.dumps(manifest.input.shape),
        "toolkit.source_sha256": manifest.source.sha256,
    }


def add_metadata(proto: onnx.ModelProto, fields: dict[str, str]) -> None:
    """``fields`` as the file's metadata (replacing what it had), and the toolkit's version as producer."""
    from toolkit import __version__

    del proto.metadata_props[:]
    for key, value in fields.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "toolkit"
    proto.producer_version = __version__


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
