"""Where an int8 artifact loses its float twin's signal, layer by layer (verify's diagnosis of a
failed int8 gate), with ONNX Runtime's QDQ debugging tools."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from toolkit.core.onnx_io import batch_reader, load_onnx

DIAGNOSIS_IMAGES = 256  # test images the per-layer comparison runs on
DIAGNOSIS_ROWS = 8  # tensors listed, worst first


def layer_errors(fp32: Path, quantized: Path, images: np.ndarray, input_name: str, batch: int = 64) -> dict:
    """Where a quantized model loses its float twin's signal, tensor by tensor, with ONNX Runtime's
    own QDQ debugging tools (``onnxruntime.quantization.qdq_loss_debug``): both models expose every
    intermediate tensor, run on the same ``images``, and each quantized tensor is compared with the
    float one as a signal-to-quantization-noise ratio (SQNR, dB; higher is better, ~20 dB is about
    10% noise). ``sqnr_db``: the quantized model's dequantized tensor against the float model's at
    that point (error accumulated so far); ``local_sqnr_db``: that tensor's own quantize/dequantize
    step (the error added there; None for a float output). ``weights``: each quantized weight against its float value.
    Tensors come in graph order; ``worst`` lists the lowest local SQNR first, which is where to look."""
    from onnxruntime.quantization import qdq_loss_debug as debug

    images = np.ascontiguousarray(images[:DIAGNOSIS_IMAGES])
    with tempfile.TemporaryDirectory(prefix="toolkit-qdq-debug-") as tmp:
        exposed = {}
        for name, src in (("float", fp32), ("quantized", quantized)):
            exposed[name] = Path(tmp) / f"{name}.onnx"
            debug.modify_model_output_intermediate_tensors(str(src), str(exposed[name]))
        float_acts = debug.collect_activations(str(exposed["float"]), batch_reader(images, input_name, batch))
        quant_acts = debug.collect_activations(str(exposed["quantized"]), batch_reader(images, input_name, batch))
    # only tensors both graphs have: a QAT file comes from a re-exported model whose inner tensors have other names
    matched = {name: pair for name, pair in debug.create_activation_matching(quant_acts, float_acts).items() if "float" in pair}
    errors = debug.compute_activation_error(matched)
    order = {}
    graph = load_onnx(fp32).graph
    for i, name in enumerate([graph.input[0].name] + [o for node in graph.node for o in node.output]):
        order.setdefault(name, i)
    op_of = {o: node.op_type for node in graph.node for o in node.output}
    rows = [{"tensor": name, "op": op_of.get(name, "input"), "sqnr_db": float(e["xmodel_err"]), "local_sqnr_db": float(e["qdq_err"])}
            for name, e in errors.items() if "xmodel_err" in e and "qdq_err" in e]
    output = graph.output[0].name
    if output not in errors and output in float_acts and output in quant_acts:
        # a float output (``float_outputs``): compared as it is, with no quantization step of its own
        rows.append({"tensor": output, "op": op_of.get(output, "output"), "local_sqnr_db": None,
                     "sqnr_db": float(debug.compute_signal_to_quantization_noice_ratio(float_acts[output], quant_acts[output]))})
    rows.sort(key=lambda r: order.get(r["tensor"], len(order)))
    weights = debug.compute_weight_error(debug.create_weight_matching(str(fp32), str(quantized)))
    weight_rows = sorted(({"weight": k, "sqnr_db": float(v)} for k, v in weights.items()), key=lambda r: r["sqnr_db"])
    final = next((r["sqnr_db"] for r in rows if r["tensor"] == output), rows[-1]["sqnr_db"] if rows else None)
    return {
        "images": int(len(images)),
        "output_sqnr_db": final,
        "worst": sorted((r for r in rows if r["local_sqnr_db"] is not None), key=lambda r: r["local_sqnr_db"])[:DIAGNOSIS_ROWS],
        "tensors": rows,
        "weights": weight_rows[:DIAGNOSIS_ROWS],
    }


def diagnosis_line(found: dict) -> str:
    """The diagnosis in one clause, for a failure message."""
    worst = found["worst"][0] if found["worst"] else None
    parts = [f"output SQNR {found['output_sqnr_db']:.1f} dB"] if found.get("output_sqnr_db") is not None else []
    if worst is not None:
        parts.append(f"largest loss where {worst['tensor']} ({worst['op']}) is quantized: {worst['local_sqnr_db']:.1f} dB")
    if found["weights"]:
        parts.append(f"weakest weight {found['weights'][0]['weight']} {found['weights'][0]['sqnr_db']:.1f} dB")
    return ", ".join(parts)
