"""int8 vs. fp32 throughput on ONNX Runtime's CPU provider for a registered model.

    python bench/int8_speed.py --model resnet20 --batch 32

Speed does not depend on the weights' values, so the model is built with random weights and
calibrated on random inputs (no dataset needed; accuracy is not measured here, `toolkit verify`
does that on a trained export). Both files go through the same code as `toolkit export`
(ONNX export + onnxslim; static QDQ int8, per-channel; ``--activations uint8``, the CPU target's
format, with its conv channels and the image's channels padded as export pads them). Prints images/s for each,
the ratio, and the CPU's int8 dot-product instruction flags, which decide whether int8 can win.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def export_random_model(name: str, path: Path) -> list[int]:
    """Registered model ``name`` with random weights (seed 0) as fp32 ONNX at ``path``, through
    ``toolkit export``'s own ONNX step; returns the input shape without the batch dimension."""
    import torch

    from toolkit.models.registry import MODELS, create_model

    torch.manual_seed(0)
    shape = [1, 28, 28] if MODELS[name].channels == 1 else [3, 32, 32]
    export_module(create_model(name), name, shape, path)
    return shape


def export_module(model, name: str, shape: list[int], path: Path) -> None:
    """Any ``nn.Module`` taking ``shape`` (without the batch dimension) as fp32 ONNX at ``path``,
    through ``toolkit export``'s own ONNX step."""
    from toolkit.export.to_onnx import export_onnx
    from toolkit.core.manifest import InputSpec, Normalization

    channels = shape[0]
    export_onnx(model.eval(), path, InputSpec(name="input", shape=["batch", *shape], dtype="float32", layout="NCHW"), "logits",
                Normalization(scale=1 / 255, mean=[0.0] * channels, std=[1.0] * channels), {"toolkit.model": name})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--activations", default="int8", choices=("int8", "uint8"),
                        help="int8: symmetric, what toolkit export writes (TensorRT needs it); uint8: ONNX Runtime x86's fast format")
    parser.add_argument("--pad-channels", type=int, default=None,
                        help="pad the int8 file's conv channels to this multiple (default: as export does, 16 for uint8, 0 for int8)")
    parser.add_argument("--pad-inputs", type=int, default=None,
                        help="with channel padding, pad convs' other input channels (the image's) to this multiple (default: as export does, 4; 1: off)")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()

    from toolkit.check.bench import time_calls
    from toolkit.core.environment import cpu_info
    from toolkit.core.environment import cpu_line as machine
    from toolkit.export.quantize import CPU_PAD_CHANNELS, CPU_PAD_CONV_INPUTS, quantize_int8
    from toolkit.inference.runtime import ort_runner

    rng = np.random.default_rng(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        shape = export_random_model(args.model, fp32)
        x = rng.standard_normal((args.batch, *shape), dtype=np.float32)
        pad = args.pad_channels if args.pad_channels is not None else (CPU_PAD_CHANNELS if args.activations == "uint8" else 0)
        quantized = quantize_int8(fp32, int8, rng.standard_normal((128, *shape), dtype=np.float32), activations=args.activations, pad_channels=pad,
                                 pad_inputs=args.pad_inputs or CPU_PAD_CONV_INPUTS)
        for name, path in (("fp32", fp32), ("int8", int8)):
            t = np.array(time_calls(ort_runner(path, "ort-cpu"), x, warmup=10, min_iters=20, min_seconds=args.seconds, max_iters=100_000))
            results[name] = {"p50_us": round(float(np.percentile(t, 50)), 1), "images_per_s": round(args.batch * 1e6 / float(t.mean()), 1),
                             "iterations": int(len(t)), "bytes": path.stat().st_size}
    report = {"model": args.model, "batch": args.batch, "activations": args.activations,
              "int8_padded_convs": quantized.get("padded_convs", 0), "int8_padded_conv_inputs": quantized.get("padded_conv_inputs", 0),
              "int8_pad_channels": quantized.get("pad_channels", 0), "machine": machine(), "cpu_int8_flags": cpu_info()["features"], **results,
              "int8_over_fp32_throughput": round(results["int8"]["images_per_s"] / results["fp32"]["images_per_s"], 3)}
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
