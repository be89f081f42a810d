"""Parity: every artifact against the PyTorch reference, on the full real MNIST test set and on CIFAR-format data."""

import io
import json
import subprocess
import sys

import pytest
from rich.console import Console

from tests.helpers import RECIPES, quiet
from toolkit.export import export
from toolkit.core.manifest import Manifest
from toolkit.models.recipes import load_recipe
from toolkit.train.run import train
from toolkit.core.parity import GATES, compare, delta_interval
from toolkit.check.verify import verify

import numpy as np



def test_fine4_parity_on_full_mnist_test_set(fine4_export, mnist_root):
    report = verify(fine4_export, data_dir=mnist_root, download=False, console=quiet())
    assert report["images"] == 10_000 and report["reference_acc"] > 93
    rows = {(r["artifact"], r["runtime"]): r for r in report["results"]}
    fp32 = rows[("model.fp32.onnx", "ort-cpu")]
    assert fp32["delta_pp"] == 0.0 and fp32["agreement"] >= 99.9 and fp32["max_abs_logit_diff"] < 1e-3 and fp32["passed"]
    int8 = rows[("model.int8.onnx", "ort-cpu")]
    assert abs(int8["delta_pp"]) <= GATES["int8"]["delta_pp"] and int8["passed"]
    assert int8["delta_ci_pp"][0] <= int8["delta_pp"] <= int8["delta_ci_pp"][1]
    assert int8["delta_pp"] == pytest.approx(100 * (int8["gained"] - int8["lost"]) / 10_000)
    assert int8["max_abs_logit_diff"] > fp32["max_abs_logit_diff"]  # int8 is a different model numerically
    # results land in parity.json, parity.md and the manifest
    saved = json.loads((fine4_export / "parity.json").read_text())
    assert saved["reference_acc"] == report["reference_acc"]
    assert "| model.fp32.onnx | ort-cpu |" in (fine4_export / "parity.md").read_text()
    assert "Δ 95% interval" in (fine4_export / "parity.md").read_text()
    manifest = Manifest.load(fine4_export)
    assert {a.file: a.parity["ort-cpu"].passed for a in manifest.artifacts} == {"model.fp32.onnx": True, "model.int8.onnx": True}
    # where it holds: the CPU (with the features that change integer kernels) and the runtime version
    assert manifest.parity.machine == report["verified_on"]["machine"] and "cores" in manifest.parity.machine
    assert manifest.parity.onnxruntime and isinstance(manifest.parity.cpu_features, list)
    assert "Verified on:" in (fine4_export / "MODEL_CARD.md").read_text()


def test_verify_cli_json(fine4_export, mnist_root):
    proc = subprocess.run([sys.executable, "-m", "toolkit", "verify", str(fine4_export), "--data-dir", str(mnist_root), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"reference_acc", "results"} <= set(out)
    for row in out["results"]:
        assert {"artifact", "format", "precision", "runtime", "accuracy", "delta_pp", "agreement", "max_abs_logit_diff", "passed"} <= set(row)


def test_gate_failure_exits_nonzero(fine4_export, mnist_root):
    # an impossible int8 gate (0 points, 100% agreement can't both be required of int8 here) must fail the command
    proc = subprocess.run([sys.executable, "-m", "toolkit", "verify", str(fine4_export), "--data-dir", str(mnist_root), "--int8-delta", "0",
                           "--fp32-agreement", "100"], capture_output=True, text=True, timeout=300)
    report = json.loads((fine4_export / "parity.json").read_text())
    int8 = next(r for r in report["results"] if r["precision"] == "int8")
    assert (proc.returncode == 1) == (int8["delta_pp"] != 0)
    # restore the default-gate results for the other tests
    verify(fine4_export, data_dir=mnist_root, download=False, console=quiet())


def test_compare_gates():
    labels = np.array([0, 1, 2, 3])
    ref = np.eye(4, dtype=np.float32)
    ok = compare(ref + 1e-6, ref, labels, 100.0, "fp32")
    assert ok["passed"] and ok["agreement"] == 100.0
    one_wrong = ref.copy()
    one_wrong[3] = [0, 0, 1, 0]
    bad = compare(one_wrong, ref, labels, 100.0, "fp32")
    assert not bad["passed"] and bad["delta_pp"] == -25.0 and bad["agreement"] == 75.0
    assert not compare(one_wrong, ref, labels, 100.0, "int8")["passed"]  # -25 points is outside 0.5 too


def _answers(right: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logits that answer the label where ``right`` holds and the next class elsewhere."""
    return np.eye(10, dtype=np.float32)[np.where(right, labels, (labels + 1) % 10)]


def test_delta_interval_counts_only_the_images_that_changed():
    """1,000 images: the reference right on 800; the artifact loses 12 of those and gains 2 of the
    others: delta -1.0 pp, carried by 14 images. Under no difference 2 or fewer of 14 fair coins land
    heads with probability sum(C(14, k), k <= 2) / 2**14 = 106 / 16384: the two-sided p is twice that.
    The interval is the exact (Clopper-Pearson) one for 2 of 14, from the beta distribution, scaled."""
    from scipy.stats import beta

    labels = np.arange(1000) % 10
    ref_right = np.arange(1000) < 800
    art_right = ref_right.copy()
    art_right[:12] = False
    art_right[800:802] = True
    row = compare(_answers(art_right, labels), _answers(ref_right, labels), labels, 80.0, "int8")
    assert (row["gained"], row["lost"]) == (2, 12) and row["delta_pp"] == pytest.approx(-1.0)
    assert row["mcnemar_p"] == pytest.approx(2 * 106 / 16384)
    low, high = beta.ppf(0.025, 2, 13), beta.ppf(0.975, 3, 12)
    assert row["delta_ci_pp"] == pytest.approx([1.4 * (2 * low - 1), 1.4 * (2 * high - 1)])
    assert row["delta_ci_pp"][0] < row["delta_pp"] < row["delta_ci_pp"][1] < 0  # told apart from no difference
    # the same count of changes, balanced: delta 0, p 1, an interval around 0; no change at all: [0, 0]
    art_right[802:812] = True
    even = delta_interval(_answers(art_right, labels), _answers(ref_right, labels), labels)
    assert (even["gained"], even["lost"], even["mcnemar_p"]) == (12, 12, 1.0)
    assert even["delta_ci_pp"][0] == pytest.approx(-even["delta_ci_pp"][1]) and even["delta_ci_pp"][1] > 0
    same = delta_interval(_answers(ref_right, labels), _answers(ref_right, labels), labels)
    assert same["delta_ci_pp"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0


@pytest.mark.parametrize("recipe_name", ["resnet20_baseline", "ft6"])
def test_cifar_models_export_with_fp32_parity(cifar_root, tmp_path, recipe_name):
    """ResNet20 (zero-pad shortcuts) and an FT model (dilated + depthwise) on generated CIFAR-format data."""
    run = train(load_recipe(RECIPES / f"{recipe_name}.toml"), device="cpu", data_dir=cifar_root, out=tmp_path / "runs", epochs=1,
                download=False, console=quiet())
    entry = export(run.run_dir, out=tmp_path / "exports", console=quiet())
    report = verify(entry["export_dir"], data_dir=cifar_root, download=False, console=quiet())
    (row,) = report["results"]
    assert report["images"] == 50
    assert row["agreement"] == 100.0 and row["max_abs_logit_diff"] < 1e-3 and row["delta_pp"] == 0.0 and row["passed"]


def test_verify_proves_the_deployed_pipeline(fine4_export, mnist_root):
    """fine4 trains with the fast pipeline: the deployed normalization gives its test inputs bit for
    bit, the PNG-file path too, and every artifact answers the same on both paths."""
    report = verify(fine4_export, data_dir=mnist_root, download=False, console=quiet())
    assert report["input_max_abs_diff"] == 0.0 and report["pipeline_input_max_abs_diff"] == 0.0
    for row in report["results"]:
        assert row["pipeline_agreement"] == row["agreement"] and row["pipeline_accuracy"] == row["accuracy"] and row["pipeline_passed"]
    assert "| pipeline agreement |" in (fine4_export / "parity.md").read_text()


def test_a_wrong_normalization_in_the_manifest_fails_verify(fine4_export, mnist_root, tmp_path):
    """The manifest is what deployments read: a wrong mean there (artifacts untouched, so every sha256
    still matches) must fail verify, with an error line naming the artifacts and the report."""
    import shutil

    from tests.helpers import run_cli

    bad = tmp_path / fine4_export.name
    shutil.copytree(fine4_export, bad)
    manifest = Manifest.load(bad)
    manifest.normalization.mean = [0.5]
    manifest.save(bad)
    proc = run_cli("verify", bad, "--data-dir", mnist_root)
    assert proc.returncode == 1, proc.stderr
    report = json.loads((bad / "parity.json").read_text())
    fp32 = next(r for r in report["results"] if r["artifact"] == "model.fp32.onnx")
    assert not fp32["passed"] and fp32["agreement"] < 99.9 and report["input_max_abs_diff"] > 1
    error = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "model.fp32.onnx on ort-cpu" in error[0] and str(bad / "parity.md") in error[0]


def test_a_failing_int8_artifact_is_diagnosed_layer_by_layer(fine4_export, mnist_root, tmp_path):
    """A gate the int8 file cannot meet (agreement 100%): verify compares it with its fp32 twin
    tensor by tensor (ONNX Runtime's qdq_loss_debug) and says where the signal is lost."""
    import shutil

    from toolkit.check import diagnosis
    from toolkit.check.verify import verify

    export_dir = tmp_path / fine4_export.name
    shutil.copytree(fine4_export, export_dir)
    report = verify(export_dir, data_dir=mnist_root, gates={"int8": {"delta_pp": 0.0, "agreement": 100.0}}, limit=500, console=quiet())
    int8 = next(r for r in report["results"] if r["artifact"] == "model.int8.onnx")
    assert not int8["passed"]
    found = report["diagnosis"]["model.int8.onnx"]
    assert found["images"] == 256 and found["tensors"] and found["weights"]
    # every quantized conv and linear layer of the net is compared, in graph order, ending at the logits
    ops = [r["op"] for r in found["tensors"]]
    assert ops.count("Conv") == 7 and ops.count("Gemm") == 2
    assert found["tensors"][-1]["tensor"] == "logits" and found["output_sqnr_db"] == found["tensors"][-1]["sqnr_db"]
    # an int8 model of a trained net keeps most of the signal: tens of dB, finite
    assert all(10 < r["sqnr_db"] < 200 for r in found["tensors"] if r["op"] != "Relu")
    worst = found["worst"][0]
    assert worst["local_sqnr_db"] == min(r["local_sqnr_db"] for r in found["tensors"] if r["local_sqnr_db"] is not None)
    assert found["tensors"][-1]["local_sqnr_db"] is None  # the logits stay float: no quantization step of their own
    md = (export_dir / "parity.md").read_text()
    assert "## Why model.int8.onnx missed its gate" in md and f"| {worst['tensor']} | {worst['op']} |" in md
    from toolkit.check.verify import failure_line

    assert diagnosis.diagnosis_line(found) in failure_line(report)
    # the fp32 file passes and is not diagnosed
    assert set(report["diagnosis"]) == {"model.int8.onnx"}


def test_verify_removes_the_temporary_files_a_killed_run_left(fine4_export, mnist_root, tmp_path):
    """kill -9 during verify leaves '.parity.md.<8 random>.tmp'; the next verify removes it under the
    export's lock (before, only export did), and leaves every other file alone."""
    import shutil

    from toolkit.check.verify import verify

    export_dir = tmp_path / fine4_export.name
    shutil.copytree(fine4_export, export_dir)
    stale = [export_dir / ".parity.md.k3x_9QzA.tmp", export_dir / ".parity.json.Ab12cd34.tmp"]
    for path in stale:
        path.write_text("half a file")
    kept = export_dir / ".notes.tmp"  # not the shape of a temporary file toolkit writes
    kept.write_text("mine")
    verify(export_dir, data_dir=mnist_root, limit=300, console=quiet())
    assert not any(p.exists() for p in stale) and kept.read_text() == "mine"
    assert json.loads((export_dir / "parity.json").read_text())["images"] == 300


_VERIFY_KILL = r"""
import os, signal, sys
from pathlib import Path
import toolkit.check.verify as v
from toolkit.core.manifest import Manifest

export_dir, data, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "before-commit":
    Manifest.save = die
else:  # after the manifest is saved, before the report is moved into place
    calls = []
    real = v.settle_report
    def settle(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            die()
        return real(*args, **kwargs)
    v.settle_report = settle
v.verify(export_dir, data_dir=data, limit=int(sys.argv[4]))
"""


@pytest.mark.parametrize("point", ["before-commit", "after-commit"])
def test_a_verify_killed_around_its_commit_leaves_report_and_manifest_agreeing(fine4_export, mnist_root, tmp_path, point):
    """parity.json, parity.md and the manifest change together: verify writes the report as hidden
    pending files, then saves the manifest with the report's sha256 (the commit point), then moves
    the report into place. Killed before the commit, the next export or verify drops the pending
    files and the earlier report and manifest still agree; killed after it, they are finished."""
    import shutil
    import subprocess
    import sys

    from toolkit.core.files import sha256_file
    from toolkit.core.manifest import Manifest
    from toolkit.check.verify import verify

    export_dir = tmp_path / fine4_export.name
    shutil.copytree(fine4_export, export_dir)
    verify(export_dir, data_dir=mnist_root, limit=200, console=quiet())  # the earlier, agreeing pair
    assert Manifest.load(export_dir).parity.report_sha256 == sha256_file(export_dir / "parity.json")
    proc = subprocess.run([sys.executable, "-c", _VERIFY_KILL, str(export_dir), str(mnist_root), point, "300"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list(export_dir.glob(".parity.json.pending")), "the kill came after the pending report was written"
    from toolkit.export import export

    buf = io.StringIO()
    export(Manifest.load(export_dir).source.checkpoint, fmt="onnx", precision="fp32", out=export_dir.parent,
           console=Console(file=buf, width=300))  # any writer settles what the killed verify left, under the lock
    report = json.loads((export_dir / "parity.json").read_text())
    assert report["images"] == (200 if point == "before-commit" else 300)
    assert ("dropped" if point == "before-commit" else "finished") in buf.getvalue()
    assert not list(export_dir.glob(".parity.*.pending"))
    assert f"% on {report['images']} mnist test images" in (export_dir / "parity.md").read_text()
