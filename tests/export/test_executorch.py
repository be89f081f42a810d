"""ExecuTorch as a target (#42): `toolkit export --format executorch` lowers the checkpoint's model to XNNPACK
(fp32, and int8 by PT2E with XNNPACK's quantizer), and verify, bench and predict run the program with
ExecuTorch's own runtime on this CPU. TOOLKIT_REQUIRE_TARGETS=1 (as .ci/run sets it) turns a missing
executorch into a failure."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import quiet
from toolkit.core.errors import ToolkitError
from toolkit.core.manifest import Manifest
from toolkit.export import export


@pytest.fixture(scope="module")
def executorch_export(fine4_run, mnist_root, tmp_path_factory):
    from toolkit.export.to_executorch import executorch_missing

    why = executorch_missing()
    if why:
        if os.environ.get("TOOLKIT_REQUIRE_TARGETS") == "1":
            pytest.fail(f"TOOLKIT_REQUIRE_TARGETS=1 but {why}")
        pytest.skip(why)
    from toolkit.check.verify import verify

    out = tmp_path_factory.mktemp("executorch-exports")
    export(fine4_run.run_dir, fmt="onnx", precision="fp32", out=out, console=quiet())
    for precision in ("fp32", "int8"):
        entry = export(fine4_run.run_dir, fmt="executorch", precision=precision, out=out, data_dir=mnist_root, download=False, console=quiet())
    export_dir = Path(entry["export_dir"])
    return export_dir, verify(export_dir, data_dir=mnist_root, download=False, console=quiet())


def test_executorchs_runtime_is_gated_on_the_full_test_set(executorch_export):
    """fp32 gives the trained model's answers (Δ 0.00 pp, agreement ≥ 99.9%), int8 within its gate, on all 10,000
    test images, tensor and image-file paths, in batches larger than the program's planned one (run in slices)."""
    export_dir, report = executorch_export
    rows = {r["artifact"]: r for r in report["results"] if r["runtime"] == "executorch-cpu"}
    assert set(rows) == {"model.fp32.pte", "model.int8.pte"} and report["images"] == 10_000
    assert rows["model.fp32.pte"]["delta_pp"] == 0.0 and rows["model.fp32.pte"]["agreement"] >= 99.9 and rows["model.fp32.pte"]["passed"]
    assert abs(rows["model.int8.pte"]["delta_pp"]) <= 0.5 and rows["model.int8.pte"]["passed"]
    assert all(r.get("pipeline_agreement") is not None for r in rows.values())
    manifest = Manifest.load(export_dir)
    int8 = manifest.artifact("model.int8.pte")
    assert int8.get("executorch_backend") == "xnnpack" and int8.get("calibration")["images"] == 512


def test_bench_and_predict_run_the_programs(executorch_export, tmp_path):
    from PIL import Image

    from tests.helpers import mnist_test_set
    from toolkit.check.bench import bench
    from toolkit.inference.catalog import Catalog
    from toolkit.serve.predict import predict

    export_dir = tmp_path / executorch_export[0].name
    shutil.copytree(executorch_export[0], export_dir)
    report = bench(export_dir, batches=(1, 8), min_seconds=0.0, min_iters=3, include_torch=False, console=quiet())
    fp32 = {r["batch"]: r["images_per_s"] for r in report["results"] if r["artifact"] == "model.fp32.onnx"}
    rows = [r for r in report["results"] if r["runtime"] == "executorch-cpu"]
    assert {(r["artifact"], r["batch"]) for r in rows} == {(f, b) for f in ("model.fp32.pte", "model.int8.pte") for b in (1, 8)}
    assert all(r["vs_fp32"] == round(r["images_per_s"] / fp32[r["batch"]], 3) for r in rows)
    key = f"{export_dir.name}/model.fp32.pte"
    assert Catalog.from_dirs([export_dir]).entry(key).runtime == "executorch-cpu"
    images, labels = mnist_test_set(Path(os.environ.get("TOOLKIT_DATA_DIR", "../shared/data")))
    Image.fromarray(images[0]).save(tmp_path / "digit.png")
    (row,) = predict(export_dir, [str(tmp_path / "digit.png")], artifact=key, console=quiet())
    onnx_row, = predict(export_dir, [str(tmp_path / "digit.png")], artifact=f"{export_dir.name}/model.fp32.onnx", console=quiet())
    assert row["label"] == onnx_row["label"]


def test_the_cards_executorch_example_runs_as_written(executorch_export, mnist_root, tmp_path):
    """The model card's ExecuTorch lines, taken from the written card and run in a fresh interpreter beside a real
    test digit, give the label ExecuTorch's runner gives through the deployed preparation."""
    import json
    import re
    import subprocess
    import sys

    from PIL import Image

    from tests.helpers import mnist_test_set
    from toolkit.inference.preprocess import model_pixels, to_input
    from toolkit.inference.runtime import make_runner

    export_dir, _ = executorch_export
    manifest = Manifest.load(export_dir)
    card = (export_dir / "MODEL_CARD.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", card, re.S) if "from executorch.runtime import Runtime" in b]
    images, _ = mnist_test_set(mnist_root)
    Image.fromarray(images[0]).save(tmp_path / "image.png")
    proc = subprocess.run([sys.executable, "-c", snippet + "\nprint(__import__('json').dumps(label))"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = make_runner(export_dir, manifest.artifact("model.int8.pte"), "executorch-cpu", classes=len(manifest.classes))
    want = int(run(to_input(model_pixels(tmp_path / "image.png", manifest), manifest)).argmax())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == want


def test_an_input_variant_is_refused_in_one_line(fine4_run, tmp_path):
    from toolkit.export.to_executorch import executorch_missing

    if executorch_missing():
        pytest.skip(executorch_missing())
    with pytest.raises(ToolkitError, match="--format executorch takes the main export's input") as err:
        export(fine4_run.run_dir, fmt="executorch", precision="fp32", out=tmp_path, input_dtype="uint8", console=quiet())
    assert "\n" not in str(err.value)
