"""OpenVINO as a target (#42): `toolkit export --format openvino` writes OpenVINO IR through the export plan,
and verify, bench, predict and the model card run it with OpenVINO Runtime on this CPU, as ONNX Runtime's
files are run. TOOLKIT_REQUIRE_TARGETS=1 (as .ci/run sets it) turns a missing openvino into a failure."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import mnist_test_set, quiet
from toolkit.core.errors import ToolkitError
from toolkit.core.manifest import Manifest
from toolkit.export import export


@pytest.fixture(scope="module")
def openvino_export(fine4_run, mnist_root, tmp_path_factory):
    """fine4's fp32 and (CPU) int8 ONNX files and the three OpenVINO IRs made from them, verified on the full test set."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        if os.environ.get("TOOLKIT_REQUIRE_TARGETS") == "1":
            pytest.fail("TOOLKIT_REQUIRE_TARGETS=1 but openvino is not installed (it is in the dev extra)")
        pytest.skip("openvino is not installed (pip install '.[openvino]')")
    from toolkit.check.verify import verify

    out = tmp_path_factory.mktemp("openvino-exports")
    for precision in ("fp32", "fp16", "int8"):
        entry = export(fine4_run.run_dir, fmt="openvino", precision=precision, out=out, data_dir=mnist_root, download=False, console=quiet())
    export_dir = Path(entry["export_dir"])
    report = verify(export_dir, data_dir=mnist_root, download=False, console=quiet())
    return export_dir, report


def test_every_ir_is_written_through_the_plan_and_recorded_with_its_weights(openvino_export):
    export_dir, _ = openvino_export
    manifest = Manifest.load(export_dir)  # every file's sha256, the IRs' weights included
    irs = {a.file: a for a in manifest.artifacts if a.format == "openvino"}
    assert set(irs) == {"model.fp32.xml", "model.fp16.xml", "model.int8.xml"}
    for art in irs.values():
        (weights,) = art.companions
        assert weights == art.file.replace(".xml", ".bin") and (export_dir / weights).is_file()
        assert art.get("source_sha256") == manifest.artifact("model.int8.onnx" if art.precision == "int8" else "model.fp32.onnx").sha256
    assert "int8 QDQ graph" in irs["model.int8.xml"].get("int8_from")
    # fp16 stores its weights in half precision: about half the fp32 weights
    assert (export_dir / "model.fp16.bin").stat().st_size < 0.6 * (export_dir / "model.fp32.bin").stat().st_size


def test_openvino_runtime_is_gated_on_the_full_test_set_like_onnx_runtime(openvino_export):
    """fp32 and fp16 IR give the trained model's answers (Δ 0.00 pp, agreement ≥ 99.9%); int8 within its gate;
    the pipeline path (image files through the deployed preparation) is run for them too."""
    _, report = openvino_export
    rows = {r["artifact"]: r for r in report["results"] if r["runtime"] == "openvino-cpu"}
    assert set(rows) == {"model.fp32.xml", "model.fp16.xml", "model.int8.xml"} and report["images"] == 10_000
    for file in ("model.fp32.xml", "model.fp16.xml"):
        assert rows[file]["delta_pp"] == 0.0 and rows[file]["agreement"] >= 99.9 and rows[file]["passed"], rows[file]
    assert abs(rows["model.int8.xml"]["delta_pp"]) <= 0.5 and rows["model.int8.xml"]["passed"]
    assert all(r.get("pipeline_agreement") is not None for r in rows.values())
    assert report["passed"]


def test_bench_gives_openvino_as_times_onnx_runtimes_fp32(openvino_export, tmp_path):
    """Structure only (no test compares a speed): one row per IR and batch, × fp32 from ONNX Runtime's fp32 row."""
    from toolkit.check.bench import bench

    export_dir = tmp_path / openvino_export[0].name
    shutil.copytree(openvino_export[0], export_dir)
    report = bench(export_dir, batches=(1, 4), min_seconds=0.0, min_iters=3, include_torch=False, console=quiet())
    fp32 = {r["batch"]: r["images_per_s"] for r in report["results"] if r["artifact"] == "model.fp32.onnx"}
    rows = [r for r in report["results"] if r["runtime"] == "openvino-cpu"]
    assert {(r["artifact"], r["batch"]) for r in rows} == {(f, b) for f in ("model.fp32.xml", "model.fp16.xml", "model.int8.xml") for b in (1, 4)}
    for r in rows:
        assert r["vs_fp32"] == round(r["images_per_s"] / fp32[r["batch"]], 3) and r["accuracy"] is not None


def test_predict_runs_an_ir_and_the_cards_openvino_example_runs_as_written(openvino_export, mnist_root, tmp_path):
    from PIL import Image

    from toolkit.inference.catalog import Catalog
    from toolkit.inference.preprocess import model_pixels, to_input
    from toolkit.inference.runtime import ort_runner
    from toolkit.serve.predict import predict

    export_dir, _ = openvino_export
    manifest = Manifest.load(export_dir)
    images, _ = mnist_test_set(mnist_root)
    files = []
    for i in range(10):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(images[i]).save(files[-1])
    key = f"{export_dir.name}/model.fp32.xml"
    assert Catalog.from_dirs([export_dir]).entry(key).runtime == "openvino-cpu"
    onnx = ort_runner(export_dir / "model.fp32.onnx", "ort-cpu")
    rows = predict(export_dir, [str(f) for f in files], artifact=key, console=quiet())
    assert [r["label"] for r in rows] == [manifest.classes[int(onnx(to_input(model_pixels(f, manifest), manifest)).argmax())] for f in files]
    card = (export_dir / "MODEL_CARD.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", card, re.S) if "import openvino" in b]
    shutil.copy(files[0], tmp_path / "image.png")
    proc = subprocess.run([sys.executable, "-c", snippet + "\nprint(__import__('json').dumps(label))"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == int(onnx(to_input(model_pixels(files[0], manifest), manifest)).argmax())


def test_a_changed_weights_file_is_refused_and_a_stale_ir_is_dropped_with_it(openvino_export, fine4_run, tmp_path):
    export_dir = tmp_path / "exports" / openvino_export[0].name
    shutil.copytree(openvino_export[0], export_dir)
    weights = bytearray((export_dir / "model.fp32.bin").read_bytes())
    weights[100] ^= 0xFF
    (export_dir / "model.fp32.bin").write_bytes(bytes(weights))
    with pytest.raises(ToolkitError, match=r"model\.fp32\.bin: sha256 does not match the manifest"):
        Manifest.load(export_dir)
    (export_dir / "model.fp32.bin").write_bytes(bytes(weights[:100]) + bytes([weights[100] ^ 0xFF]) + bytes(weights[101:]))
    Manifest.load(export_dir)
    # the fp32 ONNX made again with other bytes (padded channels): the IRs made from it go, weights and all
    export(fine4_run.run_dir, fmt="onnx", precision="fp32", out=tmp_path / "exports", pad_channels=16, console=quiet())
    manifest = Manifest.load(export_dir)
    assert {a.file for a in manifest.artifacts} == {"model.fp32.onnx"}
    assert not list(export_dir.glob("*.xml")) and not list(export_dir.glob("*.bin"))


def test_the_triton_repository_stands_the_onnx_model_for_the_ir(openvino_export, tmp_path):
    export_dir = tmp_path / "exports" / openvino_export[0].name
    shutil.copytree(openvino_export[0], export_dir)
    run_dir = Path(Manifest.load(export_dir).source.checkpoint).parent
    entry = export(run_dir, fmt="triton", precision="fp32", out=tmp_path / "exports", console=quiet())
    assert entry["models"] == ["fine4_fp32"] and not list(Path(entry["repository"]).rglob("*.xml"))
