"""int8 that holds off the tuned path. The root cause of the issue's failures: ONNX Runtime's fused
int8 kernels on x86 CPUs without VNNI/AMX add products in pairs into int16 and saturate with 8-bit
weights; the earlier remedy (7-bit weights everywhere) cost resolution. Now the file keeps 8-bit
weights and such a CPU runs it unfused (exact QDQ arithmetic). A second cause, on every CPU: the
logits were quantized too, so near-tied classes tied exactly and argmax took the lower index; the
file's output now stays float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.helpers import quiet
from toolkit.core.environment import int8_kernels_saturate
from toolkit.core.manifest import Manifest


def _weight_ranges(path) -> list[int]:
    """The largest |q| of each quantized Conv/Gemm weight (int8 initializers feeding a DequantizeLinear)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q = numpy_helper.to_array(inits[node.input[0]])
            if q.dtype == np.int8 and q.ndim >= 2:
                found.append(int(np.abs(q.astype(np.int16)).max()))
    return found


def test_default_int8_weights_use_all_8_bits(fine4_export):
    """Fails if 7-bit weights (reduce_range) come back as the default."""
    manifest = Manifest.load(fine4_export)
    art = manifest.artifact("model.int8.onnx")
    assert art.get("weight_bits") == 8
    ranges = _weight_ranges(fine4_export / "model.int8.onnx")
    assert len(ranges) >= 7 and max(ranges) == 127  # symmetric per-channel minmax: the largest weight maps to 127


def test_7_bit_weights_on_request_and_fused_everywhere(fine4_run, mnist_root, tmp_path, monkeypatch):
    from toolkit.inference import runtime
    from toolkit.export import export

    entry = export(fine4_run.run_dir, fmt="onnx", precision="int8", out=tmp_path, data_dir=mnist_root, download=False,
                   int8_weights=7, calib_size=64, console=quiet())
    export_dir = Path(entry["export_dir"])
    art = Manifest.load(export_dir).artifact("model.int8.onnx")
    assert art.get("weight_bits") == 7 and max(_weight_ranges(export_dir / "model.int8.onnx")) <= 64
    monkeypatch.setattr(runtime, "int8_kernels_saturate", lambda info=None: True)
    assert not runtime.make_runner(export_dir, art, "ort-cpu").unfused


def test_8_bit_int8_runs_unfused_only_where_the_kernels_saturate(fine4_export, monkeypatch):
    from toolkit.inference import runtime

    manifest = Manifest.load(fine4_export)
    int8, fp32 = manifest.artifact("model.int8.onnx"), manifest.artifact("model.fp32.onnx")
    monkeypatch.setattr(runtime, "int8_kernels_saturate", lambda info=None: True)
    assert runtime.make_runner(fine4_export, int8, "ort-cpu").unfused
    assert not runtime.make_runner(fine4_export, fp32, "ort-cpu").unfused
    monkeypatch.setattr(runtime, "int8_kernels_saturate", lambda info=None: False)
    assert not runtime.make_runner(fine4_export, int8, "ort-cpu").unfused


def test_which_cpus_saturate(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert int8_kernels_saturate({"features": ["avx2", "fma", "f16c"]})
    assert not int8_kernels_saturate({"features": ["avx2", "avx512f", "avx512_vnni"]})
    assert not int8_kernels_saturate({"features": ["avx2", "avx_vnni"]})
    assert not int8_kernels_saturate({"features": ["avx512f", "amx_int8"]})
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not int8_kernels_saturate({"features": []})


@pytest.mark.slow
def test_undertrained_fine4_passes_the_default_int8_gate(underfit_export, mnist_root):
    """Was -14.51 pp (8-bit weights through saturating kernels), then -1.30 pp (7-bit weights), on an
    AVX2 CPU without VNNI; measured -0.11 pp with this default."""
    from toolkit.core.parity import GATES
    from toolkit.check.verify import verify

    report = verify(underfit_export, data_dir=mnist_root, download=False, console=quiet())
    int8 = next(r for r in report["results"] if r["artifact"] == "model.int8.onnx")
    assert int8["passed"] and abs(int8["delta_pp"]) <= GATES["int8"]["delta_pp"], int8
    assert (int8.get("kernels") == "unfused") == int8_kernels_saturate()


@pytest.mark.slow
def test_fused_kernels_lose_the_8_bit_model_on_a_cpu_that_saturates(underfit_export, mnist_root):
    """The root cause, shown where it applies: the same 8-bit file through the fused kernels loses
    far more than unfused (measured 62.70% vs 77.57%)."""
    if not int8_kernels_saturate():
        pytest.skip("this CPU has VNNI or AMX (or is not x86): its fused int8 kernels do not saturate")
    from toolkit.inference.preprocess import model_input
    from toolkit.inference.splits import read_test_split
    from toolkit.inference.runtime import ort_runner

    manifest = Manifest.load(underfit_export)
    images, labels, _ = read_test_split("mnist", mnist_root)
    x = model_input(images[:5000], manifest)

    def accuracy(unfused: bool) -> float:
        run = ort_runner(underfit_export / "model.int8.onnx", "ort-cpu", unfused=unfused)
        return float((np.concatenate([run(x[i:i + 1000]) for i in range(0, len(x), 1000)]).argmax(1) == labels[:5000]).mean())

    assert accuracy(unfused=False) < accuracy(unfused=True) - 0.02


def test_int8_logits_stay_float(underfit_export, mnist_root):
    """The second cause found: with the logits quantized too (ONNX Runtime puts a QuantizeLinear ->
    DequantizeLinear pair on the graph output), near-tied classes become exactly equal and argmax
    answers the lower index: on the 77.70% fine4, 125 of 10,000 test images tied, 46 of int8's 88
    changed answers were ties, and they went 23 gained to 34 lost (-0.11 pp); with float logits 41
    to 23 (+0.18 pp). The file's outputs come from the last Gemm itself, and no two of its logits
    tie where the same logits on an int8 grid would."""
    from toolkit.inference.preprocess import model_input
    from toolkit.inference.splits import read_test_split
    from toolkit.export.quantize import float_outputs
    from toolkit.inference.runtime import int8_unfused, ort_runner

    proto = onnx.load(str(underfit_export / "model.int8.onnx"))
    producer = {o: n for n in proto.graph.node for o in n.output}
    assert [producer[o.name].op_type for o in proto.graph.output] == ["Gemm"]
    assert float_outputs(proto) == 0  # nothing left to remove
    manifest = Manifest.load(underfit_export)
    images, _, _ = read_test_split("mnist", mnist_root)
    x = model_input(images[:5000], manifest)
    run = ort_runner(underfit_export / "model.int8.onnx", "ort-cpu", unfused=int8_unfused(8))
    logits = np.concatenate([run(x[i:i + 1000]) for i in range(0, len(x), 1000)])

    def ties(values: np.ndarray) -> int:
        top = np.sort(values, axis=1)
        return int((top[:, -1] == top[:, -2]).sum())

    on_grid = np.round(logits / (np.abs(logits).max() / 127))  # symmetric int8, as the output's QDQ pair had them
    assert ties(logits) == 0 and ties(on_grid) > 10, (ties(logits), ties(on_grid))
