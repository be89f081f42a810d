"""Quantization-aware fine-tuning (toolkit/export/qat.py) and `toolkit export --qat-epochs`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.helpers import quiet, run_cli, one_line_error
from toolkit.core.manifest import Manifest
from toolkit.models.registry import MODELS, create_model


def _random_batchnorm_stats(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 2 - 1)


def _example(model: torch.nn.Module) -> torch.Tensor:
    for shape in ((4, 1, 28, 28), (4, 3, 32, 32)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        try:
            model(x)
            return x
        except RuntimeError:
            continue
    raise AssertionError("no input shape fits")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folding_batchnorm_keeps_outputs_and_module_names(name):
    from toolkit.export.qat import fold_batchnorm

    model = create_model(name, num_classes=10).eval()
    _random_batchnorm_stats(model)
    x = _example(model)
    folded, pairs = fold_batchnorm(model)
    assert pairs >= 7  # every registered model has conv -> BatchNorm pairs
    assert [n for n, _ in folded.named_modules()] == [n for n, _ in model.named_modules()]
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    # the folded BatchNorms are identities now: their scale is fixed at 1/sqrt(1 + eps)'s inverse
    fixed = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.requires_grad]
    assert len(fixed) == pairs and all(float(m.running_var.min()) == 1.0 for m in fixed)


def test_fake_quantized_weights_are_the_exported_int8_weights(underfit_export, mnist_root, tmp_path):
    """What fine-tuning saw is what the file holds: each Conv/Gemm weight of the exported int8 model,
    dequantized, equals PyTorch's fake quantization of the tuned weight, for 8 and 7 bits."""
    from toolkit.export import qat, quantize
    from toolkit.models.checkpoint import load_checkpoint, model_from_checkpoint
    from toolkit.export.to_onnx import export_onnx, onnx_metadata

    manifest = Manifest.load(underfit_export)
    model = model_from_checkpoint(load_checkpoint(manifest.source.checkpoint))
    calib, _, _ = quantize.training_slices(manifest, mnist_root, 128, holdout=10, download=False)
    for bits in (8, 7):
        tuned, report = qat.fine_tune(model, calib, calib, epochs=1, weight_bits=bits, console=quiet())
        assert report["epochs"] == 1 and report["images"] == 128 and report["batchnorms_folded"] >= 7
        fp32, int8 = tmp_path / f"tuned{bits}.onnx", tmp_path / f"tuned{bits}.int8.onnx"
        export_onnx(tuned, fp32, manifest.input, manifest.output.name, manifest.normalization, onnx_metadata(manifest))
        quantize.quantize_int8(fp32, int8, calib, weight_bits=bits)
        graph = onnx.load(str(int8)).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        exported = []
        for node in graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].ndim >= 2:
                q, scale = inits[node.input[0]].astype(np.float32), inits[node.input[1]]
                exported.append(q * scale.reshape(-1, *([1] * (q.ndim - 1))))
        layers = [m for m in tuned.modules() if isinstance(m, qat.QUANTIZED_MODULES)]
        assert len(exported) == len(layers) >= 7
        for layer in layers:  # each layer's fake-quantized weight is one of the file's weights, to float rounding
            expected = qat._weight_fake_quant(bits)(layer.weight.detach()).numpy()
            gaps = [float(np.abs(d - expected).max()) for d in exported if d.shape == expected.shape]
            assert gaps and min(gaps) <= 1e-6 * float(np.abs(expected).max()), (layer, gaps)
        # and the float weights themselves are not: quantization did change them
        assert all(float(np.abs(qat._weight_fake_quant(bits)(m.weight.detach()).numpy() - m.weight.detach().numpy()).max()) > 0 for m in layers)


def test_pruned_weights_stay_zero(underfit_export, mnist_root):
    from toolkit.export import qat, quantize
    from toolkit.models.checkpoint import load_checkpoint, model_from_checkpoint

    manifest = Manifest.load(underfit_export)
    model = model_from_checkpoint(load_checkpoint(manifest.source.checkpoint))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        convs[1].weight[:, ::2] = 0.0  # half of the second conv's input channels pruned
    calib, _, _ = quantize.training_slices(manifest, mnist_root, 256, holdout=10, download=False)
    folded, _ = qat.fold_batchnorm(model)
    before = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)][1].weight.detach().clone()
    tuned, _ = qat.fine_tune(model, calib, calib[:64], epochs=2, console=quiet())
    after = [m for m in tuned.modules() if isinstance(m, torch.nn.Conv2d)][1].weight.detach()
    assert bool((before[:, ::2] == 0).all()) and bool((after[:, ::2] == 0).all())
    assert float((after[:, 1::2] - before[:, 1::2]).abs().max()) > 1e-5  # the others were tuned


@pytest.mark.slow
def test_qat_recovers_where_post_training_int8_loses(underfit_export, mnist_root, tmp_path):
    """The issue's under-trained fine4 with 7-bit weights (fused int8 kernels on every x86 CPU): one
    epoch of QAT on 10,000 training images passes the gate and agrees with fp32 at least 98% of the
    time; where post-training int8 loses accuracy by more than the test set's resolution (Δ's 95%
    interval below 0), QAT loses less and agrees more often. Measured (float logits): the fixture's
    77.70% model (before the epoch plan of #29): -0.81 pp (interval -0.92 to -0.65, 98.64%
    agreement) -> QAT -0.06 pp, 99.01%. Since the epoch plan the fixture's model is no longer the
    same on every x86 CPU (89.1% int8 on CI's machine, interval to +0.15; 92.08% fp32 on an AVX-512
    Intel Xeon, -0.02 pp, interval -0.17 to +0.13, and -0.09 to -0.12 pp with 8 or 32 calibration
    images): post-training int8 did not lose there, so the comparison is made only where it does."""
    from toolkit.export import export
    from toolkit.core.parity import GATES
    from toolkit.check.verify import verify

    run = Path(Manifest.load(underfit_export).source.checkpoint).parent
    rows = {}
    for name, extra in (("ptq", {}), ("qat", {"qat_epochs": 1, "qat_images": 10_000})):
        out = tmp_path / name
        export(run, fmt="onnx", precision="fp32", out=out, console=quiet())
        entry = export(run, fmt="onnx", precision="int8", out=out, data_dir=mnist_root, download=False, int8_weights=7, console=quiet(), **extra)
        report = verify(Path(entry["export_dir"]), data_dir=mnist_root, download=False, console=quiet())
        rows[name] = next(r for r in report["results"] if r["artifact"] == "model.int8.onnx")
        art = Manifest.load(Path(entry["export_dir"])).artifact("model.int8.onnx")
        assert (art.get("qat") is not None) == (name == "qat")
    gate = GATES["int8"]["delta_pp"]
    assert abs(rows["qat"]["delta_pp"]) <= gate and rows["qat"]["passed"] and rows["qat"]["agreement"] >= 98.0, rows["qat"]
    if rows["ptq"]["delta_ci_pp"][1] < 0:  # post-training int8 loses, not by chance: QAT must recover some of it
        assert rows["qat"]["delta_pp"] > rows["ptq"]["delta_pp"] and rows["qat"]["agreement"] > rows["ptq"]["agreement"], (rows["ptq"], rows["qat"])
    assert Manifest.load(tmp_path / "qat" / run.name).artifact("model.int8.onnx").get("qat")["images"] == 10_000
    # the same graph as post-training int8 (so the same speed): the same operators in the same order
    graphs = [onnx.load(str(tmp_path / name / run.name / "model.int8.onnx")).graph for name in ("ptq", "qat")]
    assert [n.op_type for n in graphs[0].node] == [n.op_type for n in graphs[1].node]


def test_qat_options_are_checked_before_any_work(fine4_run, tmp_path):
    proc = run_cli("export", str(fine4_run.run_dir), "--out", str(tmp_path), "--qat-epochs", "2")
    assert proc.returncode != 0 and "--qat-epochs applies to --precision int8 only" in one_line_error(proc)
    proc = run_cli("export", str(fine4_run.run_dir), "--out", str(tmp_path), "--precision", "int8", "--qat-images", "0")
    assert proc.returncode != 0 and "Invalid value for '--qat-images'" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_fine_tuning_sees_the_arithmetic_the_int8_file_runs(underfit_export, mnist_root, tmp_path):
    """The fake-quantized model that QAT trains, given the export's activation ranges, computes what
    ONNX Runtime computes with the int8 file made from the same weights (unfused: exact QDQ
    arithmetic), up to rounding steps here and there (int32 biases, ties): nearly every logit within
    one and a half steps, nearly every answer the same."""
    from toolkit.export import qat, quantize
    from toolkit.models.checkpoint import load_checkpoint, model_from_checkpoint
    from toolkit.export.to_onnx import export_onnx, onnx_metadata
    from toolkit.inference.preprocess import model_input
    from toolkit.inference.splits import read_test_split
    from toolkit.inference.runtime import ort_runner

    manifest = Manifest.load(underfit_export)
    folded, _ = qat.fold_batchnorm(model_from_checkpoint(load_checkpoint(manifest.source.checkpoint)))
    calib, _, _ = quantize.training_slices(manifest, mnist_root, 512, holdout=10, download=False)
    fp32, int8 = tmp_path / "folded.onnx", tmp_path / "folded.int8.onnx"
    export_onnx(folded, fp32, manifest.input, manifest.output.name, manifest.normalization, onnx_metadata(manifest))
    quantize.quantize_int8(fp32, int8, calib)
    ranges = quantize.activation_ranges(int8)
    fake = qat.FakeQuantized(folded, "int8", 8)
    fake.calibrating(False)
    assert fake.set_ranges(ranges) == len(fake.layers) == len(ranges) >= 7
    assert isinstance(fake.layers[-1].output_fake_quant, torch.nn.Identity)
    images, _, _ = read_test_split("mnist", mnist_root)
    x = model_input(images[:2000], manifest)
    with torch.no_grad():
        torch_logits = folded(torch.from_numpy(x)).numpy()
    ort_logits = ort_runner(int8, "ort-cpu", unfused=True)(x)
    last = ranges[next(reversed(ranges))]
    assert last[2:] == (None, None)  # the model's output stays float in the file, and so in QAT
    step = float(np.abs(torch_logits).max()) / 127  # what one int8 step of the logits' range would be
    steps = np.abs(torch_logits - ort_logits) / step
    agree = float((torch_logits.argmax(1) == ort_logits.argmax(1)).mean())
    # measured: 98.99% of logits within 1.5 steps, 99.90% of answers the same; with the bias quantized
    # apart from its convolution 83.77% and 98.30%
    assert (steps <= 1.5).mean() >= 0.95 and agree >= 0.995, ((steps <= 1.5).mean(), agree)
