"""#42: one table of every target (runtime, precision, file, parity with its interval, images/s and × fp32 at
batch 1 and 32, "deploy fp32" where int8 does not pay), on a given manifest and given measurements."""

from __future__ import annotations

from toolkit.core import side_by_side, speed
from toolkit.core.manifest import Artifact, Manifest, Parity

SHA = "0" * 64


def _artifact(file: str, fmt: str, precision: str, parity: dict | None = None, **extra) -> Artifact:
    return Artifact(file=file, format=fmt, precision=precision, sha256=SHA, bytes=1, parity=parity or {}, **extra)


def _parity(delta: float, agreement: float, passed: bool = True) -> Parity:
    return Parity(accuracy=90.0 + delta, delta_pp=delta, delta_ci_pp=[delta - 0.1, delta + 0.1], agreement=agreement,
                  max_abs_logit_diff=0.1, passed=passed)


def _row(file: str, precision: str, runtime: str, batch: int, ips: float) -> dict:
    return {"artifact": file, "precision": precision, "runtime": runtime, "batch": batch, "images_per_s": ips}


def _given(fine4_export) -> tuple[Manifest, dict]:
    artifacts = [
        _artifact("model.fp32.onnx", "onnx", "fp32", {"ort-cpu": _parity(0.0, 100.0)}),
        _artifact("model.int8.onnx", "onnx", "int8", {"ort-cpu": _parity(-0.2, 99.5)}),
        _artifact("model.int8.xml", "openvino", "int8", {"openvino-cpu": _parity(-0.7, 98.0, passed=False)}),
        _artifact("model.fp32.pte", "executorch", "fp32", {"executorch-cpu": _parity(0.0, 100.0)}),
        _artifact("model.fp32.engine", "trt", "fp32",
                  built_for={"ahead_of_time": True, "tensorrt_rtx": "1.7", "compute_capability": ["8.6", "8.9"]}),
    ]
    manifest = Manifest.load(fine4_export).model_copy(update={"artifacts": artifacts})
    results = [_row("model.fp32.onnx", "fp32", "ort-cpu", 1, 1000.0), _row("model.fp32.onnx", "fp32", "ort-cpu", 32, 2000.0),
               _row("model.int8.onnx", "int8", "ort-cpu", 1, 900.0), _row("model.int8.onnx", "int8", "ort-cpu", 32, 3000.0),
               _row("model.int8.xml", "int8", "openvino-cpu", 1, 1500.0), _row("model.int8.xml", "int8", "openvino-cpu", 32, 1000.0),
               _row("model.fp32.pte", "fp32", "executorch-cpu", 1, 1200.0), _row("model.fp32.onnx", "fp32", "ort-cpu", 256, 2500.0)]
    speed.relative(results)
    return manifest, {"results": results}


def test_every_target_is_one_row_with_its_parity_and_speed(fine4_export):
    manifest, bench = _given(fine4_export)
    rows = {cells[2]: dict(zip(side_by_side.HEADER, cells)) for cells in side_by_side.rows(manifest, bench)}
    assert list(rows) == [a.file for a in manifest.artifacts]
    assert rows["model.int8.onnx"] == {
        "runtime": "ONNX Runtime (CPU)", "precision": "int8", "file": "model.int8.onnx", "Δ pp (95% interval)": "-0.20 (-0.30 to -0.10)",
        "agreement": "99.50%", "gate": "passed", "img/s b1": "900", "× fp32 b1": "0.90× (slower: deploy fp32)",
        "img/s b32": "3,000", "× fp32 b32": "1.50×"}
    # OpenVINO's file against ONNX Runtime's fp32 file (no fp32 ONNX on its runtime); a failed gate says so
    xml = rows["model.int8.xml"]
    assert (xml["runtime"], xml["gate"], xml["× fp32 b1"], xml["× fp32 b32"]) == (
        "OpenVINO Runtime (CPU)", "**FAILED**", "1.50×", "0.50× (slower: deploy fp32)")
    # not benched at batch 32: a dash, never a figure from another batch (the 256 row is not shown)
    pte = rows["model.fp32.pte"]
    assert (pte["img/s b1"], pte["× fp32 b1"], pte["img/s b32"], pte["× fp32 b32"]) == ("1,200", "1.20×", "—", "")
    engine = rows["model.fp32.engine"]
    assert engine["runtime"] == "TensorRT-RTX" and "built ahead of time" in engine["Δ pp (95% interval)"] and "not run here" in engine["Δ pp (95% interval)"]
    assert engine["img/s b1"] == ""


def test_the_card_bench_md_and_the_console_print_the_same_table(fine4_export):
    import io

    from rich.console import Console

    from toolkit.check.bench import bench_markdown, side_by_side_table
    from toolkit.core.model_card import model_card

    manifest, bench = _given(fine4_export)
    table = "\n".join(side_by_side.markdown(manifest, bench))
    report = {"machine": "test CPU", "date": "2026-12-07", "warmup": 1, "results": [
        {**r, "iterations": 1, "p50_us": 1.0, "p90_us": 1.0, "p99_us": 1.0, "accuracy": None, "delta_pp": None, "agreement": None}
        for r in bench["results"]]}
    assert table in model_card(fine4_export, manifest, report)
    assert table in bench_markdown(report, manifest)
    shown = io.StringIO()
    Console(file=shown, width=400).print(side_by_side_table(manifest, report))
    assert shown.getvalue().count("deploy fp32") == 2 and "TensorRT-RTX" in shown.getvalue() and "-0.20 (-0.30 to -0.10)" in shown.getvalue()
    assert table.count("deploy fp32") == 2


def test_no_interval_from_an_older_manifest(fine4_export):
    manifest, bench = _given(fine4_export)
    old = manifest.artifacts[1].parity["ort-cpu"].model_copy(update={"delta_ci_pp": None})
    manifest.artifacts[1].parity["ort-cpu"] = old
    cells = side_by_side.rows(manifest, bench)[1]
    assert cells[3] == "-0.20"
