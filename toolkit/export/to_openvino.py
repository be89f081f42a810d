"""OpenVINO IR (``model.<precision>.xml`` and its weights ``.bin``) converted from the export's ONNX files by
OpenVINO's own converter, for OpenVINO Runtime on Intel and AMD CPUs (and Intel GPUs and NPUs).

- fp32: the fp32 ONNX graph as it is.
- fp16: the same graph with its weights stored in fp16 (``compress_to_fp16``); a CPU computes in fp32.
- int8: the export's int8 QDQ graph (calibrated, gated, auto-fallback and QAT applying as for ONNX Runtime):
  OpenVINO turns its Quantize/Dequantize pairs into its own int8 operations. NNCF's post-training
  quantization is not used: measured against it (bench/openvino_int8.py; docs/benchmarks.md, "OpenVINO's
  int8") it held the parity gate less often, and the QDQ graph is the one int8 model every runtime runs.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.core.errors import ToolkitError, first_line
from toolkit.core.files import sha256_file


def openvino_missing() -> str | None:
    """Why OpenVINO cannot be used here, or None."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed (pip install '.[openvino]', or pip install openvino)"
    return None


def weights_file(xml: Path) -> Path:
    """``model.fp32.xml`` -> ``model.fp32.bin``: the IR's weights, beside it."""
    return xml.with_suffix(".bin")


def convert_to_openvino(onnx_path: Path, xml_path: Path, precision: str) -> dict:
    """Write the IR for ``precision`` from ``onnx_path``; returns the manifest fields (the weights file
    with its sha256, OpenVINO's version, what the int8 IR came from)."""
    why = openvino_missing()
    if why:
        raise ToolkitError(f"cannot write OpenVINO IR: {why}")
    import openvino as ov

    try:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(xml_path), compress_to_fp16=precision == "fp16")
    except Exception as exc:  # noqa: BLE001 - OpenVINO's converter raises its own error types
        for path in (xml_path, weights_file(xml_path)):
            path.unlink(missing_ok=True)
        raise ToolkitError(f"OpenVINO could not convert {onnx_path.name} ({first_line(exc)})") from None
    bin_path = weights_file(xml_path)
    fields = {"companions": {bin_path.name: sha256_file(bin_path)}, "openvino": ov.__version__}
    if precision == "int8":
        fields["int8_from"] = f"{onnx_path.name} (the export's int8 QDQ graph; NNCF not used)"
    return fields
