"""INT8: static post-training quantization with ONNX Runtime's tools, QDQ format.

Weights per channel, activations calibrated on images from the training split; both
symmetric, so the same QDQ model also builds a TensorRT int8 engine (explicit quantization).
A CPU-only variant (``activations="uint8"``) quantizes residual Adds and ReLUs as well, so ONNX
Runtime folds each ReLU into its convolution and keeps whole residual blocks in int8.
``auto_fallback`` keeps the most sensitive layers in float until the model meets its gate,
measured on a held-out slice of the training split, never on the test set.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console

from toolkit.data.sources import source_for_export
from toolkit.core.errors import ToolkitError, check_choice
from toolkit.core.files import atomic_write
from toolkit.core.manifest import Manifest
from toolkit.core.onnx_io import batch_reader, load_onnx, tidy
from toolkit.inference.preprocess import model_input

CALIB_METHODS = ("minmax", "entropy", "percentile")
# The CPU target's int8 file has its conv channels zero-padded to this multiple (exact: the padded
# channels only meet zero weights). ONNX Runtime's x86 integer convolutions are slow on channel
# counts like the MNIST nets' 8, 10 and 12, and padded they run faster (measured: docs/benchmarks.md,
# "int8 on the small nets"). 16 is AVX-512's block and a
# multiple of AVX2's 8. The float files keep their own padding (--pad-channels), since padding
# slows fp32 at batch 32.
CPU_PAD_CHANNELS = 16
# ... and a conv's input channels to a multiple of 4 where they cannot come from a padded conv (an
# image's 1 or 3): these kernels take input channels in groups of 4 bytes, and ResNet20's first
# conv ran 2.4x faster with its 3 channels padded to 4 (``pad_channels.pad_conv_inputs``).
CPU_PAD_CONV_INPUTS = 4
WEIGHT_BITS = (8, 7)  # 7: ONNX Runtime's reduce_range, for x86 CPUs without VNNI (see quantize_int8)
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
# uint8 (ONNX Runtime CPU): with asymmetric activations a quantized ReLU is only a zero point, so
# ORT drops it, and quantized Adds keep residual blocks in int8 instead of a dequantize/quantize
# round trip around every shortcut. With symmetric int8 the ReLUs must stay, and this gains nothing.
# Slice and Pad: ResNet20's option-A shortcuts (a strided Slice, then zero channels by Pad) stay
# in uint8 too; see ``integer_pads``.
CPU_QUANTIZED_OPS = (*QUANTIZED_OPS, "Add", "Relu", "Slice", "Pad")
HOLDOUT_SIZE = 2000


def _training_split(manifest: Manifest, data_dir, download: bool):
    """The export's training images and labels (uint8 pixels), decoded as training decoded them."""
    x, y, _ = source_for_export(manifest, data_dir, download=download).tensors(train=True)
    return x, y


def _order(n: int, seed: int):
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def training_slices(manifest: Manifest, data_dir, calib_size: int, holdout: int = HOLDOUT_SIZE, seed: int = 0, download: bool = True):
    """Disjoint random slices of the training split: calibration images, and a held-out set with labels."""
    x, y = _training_split(manifest, data_dir, download)
    order = _order(len(x), seed)
    calib = order[:calib_size]
    held = order[calib_size : calib_size + holdout]
    # what the deployed model is fed (toolkit.inference.preprocess): normalized floats, or pixels for a uint8-input graph
    return model_input(x[calib].numpy(), manifest), model_input(x[held].numpy(), manifest), y[held].numpy()


def fine_tuning_images(manifest: Manifest, data_dir, calib_size: int, limit: int | None = None, holdout: int = HOLDOUT_SIZE, seed: int = 0,
                       download: bool = True) -> np.ndarray:
    """Every training image but ``training_slices``' held-out set (calibration images first), as the
    deployed model is fed them; the first ``limit`` of them. QAT learns from these, so the held-out
    set that ``auto_fallback`` measures on stays unseen."""
    import torch

    x, _ = _training_split(manifest, data_dir, download)
    order = _order(len(x), seed)
    kept = torch.cat([order[:calib_size], order[calib_size + holdout :]])[:limit]
    return model_input(x[kept].numpy(), manifest)


def quantized_op_types(activations: str) -> tuple[str, ...]:
    """The op types ``quantize_int8`` quantizes for this activation type."""
    return QUANTIZED_OPS if activations == "int8" else CPU_QUANTIZED_OPS


def quantizable_nodes(path: Path, activations: str = "int8") -> list[str]:
    """The nodes ``quantize_int8`` would quantize: the candidates ``auto_fallback`` ranks."""
    ops = quantized_op_types(activations)
    return [n.name for n in load_onnx(path).graph.node if n.op_type in ops]


def quantize_int8(fp32: Path, dst: Path, calib: np.ndarray, method: str = "minmax", exclude: list[str] | None = None, only: list[str] | None = None,
                  activations: str = "int8", weight_bits: int = 8, pad_channels: int = 0, pad_inputs: int = CPU_PAD_CONV_INPUTS) -> dict:
    """``activations="int8"`` (default): symmetric int8, which TensorRT needs. ``"uint8"``:
    asymmetric uint8 activations, the format ONNX Runtime's x86 kernels are fastest with, and
    Adds and ReLUs quantized too (``CPU_QUANTIZED_OPS``); such a model does not build a TensorRT engine.
    ``pad_channels`` > 0: conv channels zero-padded to that multiple first (``pad_conv_channels``),
    and convs' other input channels to a multiple of ``pad_inputs`` (``pad_conv_inputs``: a
    Pad node in front); the existing nodes keep their names, so ``exclude``/``only`` name the same
    layers. Recorded when anything was padded."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    check_choice("calibration method", method, CALIB_METHODS)
    if len(calib) == 0:
        raise ToolkitError("no calibration images")
    check_choice("activation type", activations, ("int8", "uint8"))
    check_choice("int8 weight bits", weight_bits, WEIGHT_BITS)
    source = load_onnx(fp32)  # self-contained: quant_pre_process below reads the file itself
    input_name = source.graph.input[0].name
    padded = {}
    with tempfile.TemporaryDirectory() as tmp:
        if pad_channels:
            from toolkit.export.pad_channels import pad_conv_channels, pad_conv_inputs

            proto, count = pad_conv_channels(source, pad_channels)
            proto, inputs = pad_conv_inputs(proto, pad_inputs)
            if count or inputs:
                fp32 = Path(tmp) / "padded.onnx"
                onnx.save(proto, str(fp32))
                padded = {"pad_channels": pad_channels, "padded_convs": count, "padded_conv_inputs": inputs}
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(out),
            batch_reader(calib, input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(quantized_op_types(activations)),
            nodes_to_exclude=exclude or None,
            nodes_to_quantize=only or None,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method],
            # symmetric scales, zero point 0: what TensorRT's explicit quantization accepts
            extra_options={"ActivationSymmetric": activations == "int8", "WeightSymmetric": True},
            # 8-bit weights by default: all of their resolution, as TensorRT, GPUs and CPUs with VNNI or
            # AMX use them. ONNX Runtime's fused integer kernels on x86 CPUs without VNNI (AVX2's
            # vpmaddubsw) add uint8 x int8 products in pairs into int16, which saturates with 8-bit
            # weights; there `runtime.int8_unfused` runs such a file unfused, exactly. 7-bit weights
            # (reduce_range, `--int8-weights 7`) fit those kernels at a cost in accuracy (the figures:
            # docs/benchmarks.md, "Figures behind the code").
            reduce_range=weight_bits == 7,
        )
        proto = onnx.load(str(out))
    float_outputs(proto)
    if activations == "uint8":
        integer_pads(proto)
    tidy(proto)  # loads clean: no unused initializer (the float logits' scale), only the default domain
    onnx.checker.check_model(proto)
    src_meta = {p.key: p.value for p in source.metadata_props}
    del proto.metadata_props[:]
    for key, value in src_meta.items():
        proto.metadata_props.add(key=key, value=value)
    with atomic_write(dst) as f:
        f.write(proto.SerializeToString())
    return {"calibration": {"images": int(len(calib)), "method": method, "split": "train"}, "activations": activations, "weight_bits": weight_bits,
            "float_layers": list(exclude or []), **padded}


def _graph_index(graph) -> tuple[dict, dict, dict]:
    """A graph's initializers by name, each tensor's producing node, and each tensor's consuming nodes."""
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    return inits, producer, users


def activation_ranges(path: Path) -> dict[str, tuple[float, int, float | None, int | None]]:
    """The activation quantization a QDQ file chose around each quantized Conv/Gemm/MatMul: its
    weight's name (without ``.weight``, i.e. the PyTorch module's name) -> input scale, zero point,
    output scale, zero point; the output's are None where the layer's output stays float (the
    model's output, ``float_outputs``). QAT fine-tunes with exactly these (``qat.FakeQuantized.set_ranges``)."""
    from onnx import numpy_helper

    graph = load_onnx(path).graph
    inits, producer, users = _graph_index(graph)

    def params(node) -> tuple[float, int] | None:
        if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
            return None
        scale, zero = numpy_helper.to_array(inits[node.input[1]]), numpy_helper.to_array(inits[node.input[2]])
        return (float(scale), int(zero)) if scale.size == 1 and zero.size == 1 else None

    outputs = {o.name for o in graph.output}
    found = {}
    for node in graph.node:
        if node.op_type not in QUANTIZED_OPS or len(node.input) < 2:
            continue
        weight_dq, input_dq = producer.get(node.input[1]), producer.get(node.input[0])
        after = users.get(node.output[0], [])
        if weight_dq is None or weight_dq.op_type != "DequantizeLinear" or input_dq is None or input_dq.op_type != "DequantizeLinear":
            continue
        given = params(input_dq)
        if node.output[0] in outputs and not after:
            taken = (None, None)  # a float output
        elif len(after) == 1 and after[0].op_type == "QuantizeLinear":
            taken = params(after[0])
        else:
            continue
        if given is None or taken is None:
            continue
        name = weight_dq.input[0].removesuffix("_quantized").removesuffix(".weight")
        found[name] = (*given, *taken)
    return found


def float_outputs(proto: onnx.ModelProto) -> int:
    """Remove the QuantizeLinear -> DequantizeLinear pair that ``quantize_static`` puts on each graph
    output, in place, so the model's outputs (the logits) stay float; returns how many. Quantized
    logits take one of 255 values: near-tied classes become exactly equal, and argmax then answers
    the lower class index, a bias that flips answers one way (measured: docs/benchmarks.md, "Figures
    behind the code"). The last layer still takes int8 inputs and
    weights (ONNX Runtime's QGemm and TensorRT both output float there), so nothing is lost in speed."""
    graph = proto.graph
    _, producer, users = _graph_index(graph)
    outputs = {o.name for o in graph.output}
    removed = 0
    for name in list(outputs):
        dq = producer.get(name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or len(users.get(q.output[0], [])) != 1 or q.input[0] in outputs:
            continue
        if len(users.get(q.input[0], [])) != 1:  # the float tensor feeds others too: they keep it
            continue
        producer[q.input[0]].output[list(producer[q.input[0]].output).index(q.input[0])] = name
        graph.node.remove(dq)
        graph.node.remove(q)
        removed += 1
    if removed:
        del graph.value_info[:]  # shapes are inferred again where needed
    return removed


def integer_pads(proto: onnx.ModelProto) -> int:
    """Fold DequantizeLinear -> Pad(constant 0) -> QuantizeLinear with the same scale and zero
    point into one Pad of the integer tensor whose constant is the zero point (the value 0.0
    quantizes to), in place; returns how many. Exact: Pad only copies values. ONNX Runtime has
    no such fusion, so without it each such Pad runs in float between two conversions."""
    from onnx import numpy_helper

    graph = proto.graph
    inits, producer, users = _graph_index(graph)
    outputs = {o.name for o in graph.output}

    def constant(name: str):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    folded = 0
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        dq, after = producer.get(pad.input[0]), users.get(pad.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        q = after[0]
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        value = constant(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        dq_params = [constant(name) for name in dq.input[1:3]]
        q_params = [constant(name) for name in q.input[1:3]]
        if (mode != "constant" or value is None or value.size != 1 or float(value) != 0.0 or len(dq.input) < 3 or len(q.input) < 3
                or any(v is None or v.size != 1 for v in dq_params + q_params)
                or not all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(dq_params, q_params))
                or len(users[dq.output[0]]) != 1 or dq.output[0] in outputs or pad.output[0] in outputs or len(pad.input) > 3):
            continue
        zero = f"{pad.output[0]}_zero_point"
        graph.initializer.append(numpy_helper.from_array(dq_params[1].reshape(()), zero))
        pads = pad.input[1]
        del pad.input[:]
        pad.input.extend([dq.input[0], pads, zero])
        pad.output[0] = q.output[0]  # the Pad now writes what the QuantizeLinear wrote
        graph.node.remove(dq)
        graph.node.remove(q)
        folded += 1
    if folded:
        del graph.value_info[:]  # the folded tensors' float types are gone
    return folded


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray, weight_bits: int | None = None) -> tuple[float, np.ndarray]:
    """``weight_bits``: an int8 file's, run as the deployed path runs it on this CPU (None: float)."""
    from toolkit.inference.runtime import int8_unfused, ort_runner

    run = ort_runner(path, "ort-cpu", unfused=int8_unfused(weight_bits))
    logits = np.concatenate([run(x[i : i + 500]) for i in range(0, len(x), 500)])
    return 100.0 * float((logits.argmax(1) == y).mean()), logits


def _latency_ms(path: Path, x: np.ndarray, reps: int = 30, weight_bits: int | None = None) -> float:
    from toolkit.inference.runtime import int8_unfused, ort_runner

    run = ort_runner(path, "ort-cpu", unfused=int8_unfused(weight_bits))
    batch = x[:32]
    run(batch)
    t0 = time.perf_counter()
    for _ in range(reps):
        run(batch)
    return 1000 * (time.perf_counter() - t0) / reps


def auto_fallback(fp32: Path, dst: Path, calib: np.ndarray, holdout_x: np.ndarray, holdout_y: np.ndarray, gate_pp: float, method: str, console: Console,
                  activations: str = "int8", weight_bits: int = 8, pad_channels: int = 0) -> dict:
    """Quantize; while the held-out accuracy differs from fp32's by more than the gate, either way (as
    ``toolkit verify``'s gate: an int8 file that scores higher is another model too), keep the next
    most sensitive layer in float. A layer's sensitivity is how far its quantization alone moves the
    held-out accuracy, either way; ``sensitivity`` records the signed drop."""
    fp32_acc, _ = _accuracy(fp32, holdout_x, holdout_y)
    bits = dict(activations=activations, weight_bits=weight_bits, pad_channels=pad_channels)
    fields = quantize_int8(fp32, dst, calib, method, **bits)
    full_acc, _ = _accuracy(dst, holdout_x, holdout_y, weight_bits)
    full_bytes, full_ms = dst.stat().st_size, _latency_ms(dst, holdout_x, weight_bits=weight_bits)
    report = {"gate_pp": gate_pp, "holdout_images": int(len(holdout_y)), "holdout_fp32_acc": round(fp32_acc, 4),
              "holdout_full_int8_acc": round(full_acc, 4), "float_layers": [], "sensitivity": {}}
    if abs(fp32_acc - full_acc) <= gate_pp:
        console.print(f"auto-fallback: full int8 is within the gate on {len(holdout_y):,} held-out training "
            f"images ({full_acc - fp32_acc:+.2f} pp); nothing kept in float")
        report["holdout_int8_acc"] = round(full_acc, 4)
        return {**fields, "auto_fallback": report}

    # sensitivity: quantize one layer at a time and measure what that alone costs
    nodes = quantizable_nodes(fp32, activations)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        for node in nodes:
            quantize_int8(fp32, probe, calib, method, only=[node], **bits)
            acc, _ = _accuracy(probe, holdout_x, holdout_y, weight_bits)
            report["sensitivity"][node] = round(fp32_acc - acc, 4)
    ranked = sorted(nodes, key=lambda n: abs(report["sensitivity"][n]), reverse=True)
    acc = full_acc
    for k in range(1, len(ranked) + 1):
        fields = quantize_int8(fp32, dst, calib, method, exclude=ranked[:k], **bits)
        acc, _ = _accuracy(dst, holdout_x, holdout_y, weight_bits)
        console.print(f"auto-fallback: {k} layer(s) in float ({', '.join(ranked[:k])}): held-out {acc:.2f}% vs fp32 {fp32_acc:.2f}%")
        if abs(fp32_acc - acc) <= gate_pp:
            break
    report.update(
        float_layers=ranked[:k],
        holdout_int8_acc=round(acc, 4),
        bytes_full_int8=full_bytes,
        bytes_with_fallback=dst.stat().st_size,
        ms_batch32_full_int8=round(full_ms, 3),
        ms_batch32_with_fallback=round(_latency_ms(dst, holdout_x, weight_bits=weight_bits), 3),
    )
    return {**fields, "auto_fallback": report}


# ----------------------------------------------------------------------------- diagnosis
