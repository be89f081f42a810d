"""ExecuTorch programs (``model.<precision>.pte``) for phones and edge boards: the checkpoint's model, exported
with ``torch.export`` (a batch axis from 1 to the export's max batch), lowered to ExecuTorch's XNNPACK
backend. int8: PyTorch's PT2E quantization with XNNPACK's quantizer (symmetric int8, per-channel
weights), calibrated on the same training images as the ONNX int8 file.

ExecuTorch's wheels are built against PyTorch releases of their own: the toolkit checks that a program
it wrote loads and runs in ExecuTorch's runtime before it records it (verify then gates it on the full
test set).
"""

from __future__ import annotations

from pathlib import Path

from toolkit.core.errors import ToolkitError, first_line


def executorch_missing() -> str | None:
    """Why ExecuTorch cannot be used here, or None."""
    try:
        import executorch.exir  # noqa: F401
        import executorch.runtime  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an ImportError, or a wheel built for another PyTorch failing to load
        return f"ExecuTorch cannot be imported here ({first_line(exc)}; pip install executorch)"
    return None


def export_executorch(model, path: Path, chw: tuple[int, int, int], max_batch: int, calib=None) -> dict:
    """Write ``path`` from ``model`` (float32 NCHW input, normalized); ``calib``: float32 NCHW calibration
    images for int8 (None: fp32). Returns the manifest fields."""
    why = executorch_missing()
    if why:
        raise ToolkitError(f"cannot write an ExecuTorch program: {why}")
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = model.eval()
    # the memory plan is sized by the example's shape: the largest batch the program takes
    example = (torch.zeros(max_batch, *chw),)
    dims = ({0: torch.export.Dim("batch", min=1, max=max_batch)},)
    try:
        with torch.no_grad():
            program = torch.export.export(model, example, dynamic_shapes=dims)
            if calib is not None:
                program = torch.export.export(_quantized(program.module(), calib, example), example, dynamic_shapes=dims)
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except ToolkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.export and the lowering raise many types; the operator is in the message
        raise ToolkitError(f"ExecuTorch could not lower this model ({first_line(exc)})") from None
    path.write_bytes(lowered.buffer)
    fields = {"executorch_backend": "xnnpack", "max_batch": max_batch}
    if calib is not None:
        fields["calibration"] = {"images": int(len(calib)), "method": "minmax", "split": "train", "quantizer": "xnnpack (pt2e)"}
    return fields


def _quantized(module, calib, example):
    """PT2E post-training quantization with XNNPACK's symmetric int8 quantizer, calibrated on ``calib``."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:  # older PyTorch keeps PT2E in torch.ao
        from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(module, quantizer)
    with torch.no_grad():
        for i in range(0, len(calib), 64):
            prepared(torch.from_numpy(calib[i:i + 64]))
    return convert_pt2e(prepared)
