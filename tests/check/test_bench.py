"""Benchmark: every artifact and PyTorch eager timed per batch size, with parity beside the speed."""

import io
import json

from rich.console import Console

from toolkit.check.bench import bench, time_calls
from toolkit.check.verify import verify


def test_time_calls_counts_and_bounds():
    calls = []
    times = time_calls(lambda x: calls.append(x), None, warmup=3, min_iters=7, min_seconds=0.0, max_iters=100)
    assert len(times) == 7 and len(calls) == 10 and all(t >= 0 for t in times)


def test_bench_table(fine4_export, mnist_root):
    verify(fine4_export, data_dir=mnist_root, download=False, console=Console(file=io.StringIO()))
    report = bench(fine4_export, batches=(1, 32), min_seconds=0.05, min_iters=5, console=Console(file=io.StringIO()))
    seen = {(r["artifact"], r["runtime"], r["batch"]) for r in report["results"]}
    assert seen == {(a, rt, b) for a, rt in (("checkpoint", "pytorch-eager"), ("model.fp32.onnx", "ort-cpu"), ("model.int8.onnx", "ort-cpu")) for b in (1, 32)}
    for r in report["results"]:
        assert r["iterations"] >= 5 and 0 < r["p50_us"] <= r["p90_us"] <= r["p99_us"] and r["images_per_s"] > 0
        if r["runtime"] == "ort-cpu":
            assert r["accuracy"] is not None and r["agreement"] is not None  # parity columns filled from the manifest
    assert json.loads((fine4_export / "bench.json").read_text())["results"] == report["results"]
    assert "| model.int8.onnx | ort-cpu | 32 |" in (fine4_export / "bench.md").read_text()


def test_bench_threads_are_recorded_and_torch_threads_restored(fine4_export):
    import torch

    before = torch.get_num_threads()
    report = bench(fine4_export, batches=(1,), min_seconds=0.0, min_iters=3, threads=1, console=Console(file=io.StringIO()))
    assert report["threads"] == 1 and torch.get_num_threads() == before
    assert len(report["results"]) == 3 and all(r["iterations"] >= 3 for r in report["results"])
    assert "intra-op threads: 1;" in (fine4_export / "bench.md").read_text()


def test_threads_reach_pytorch_and_every_onnx_runtime_session(fine4_export, monkeypatch):
    """--threads N (toolkit.core.environment.apply_threads): PyTorch's pool and sessions made afterwards use N;
    without it, $TOOLKIT_THREADS, else the cores this process may run on."""
    import os

    import torch

    from toolkit.core.environment import THREADS_ENV, apply_threads, default_threads
    from toolkit.inference.runtime import ort_runner

    before = torch.get_num_threads()
    monkeypatch.delenv(THREADS_ENV, raising=False)
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1 and os.environ[THREADS_ENV] == "1"
        run = ort_runner(fine4_export / "model.fp32.onnx", "ort-cpu")
        assert run.session.get_session_options().intra_op_num_threads == 1
        monkeypatch.setenv(THREADS_ENV, "2")
        assert apply_threads(None) == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv(THREADS_ENV)
        assert apply_threads(None) == default_threads() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


def test_bench_says_how_each_artifact_compares_with_fp32_and_keeps_other_batches(fine4_export, mnist_root, tmp_path):
    """#30: × fp32 per row (same runtime and batch) and a row slower than fp32 marked "deploy fp32" in
    bench.md and the model card; a quick --batch 1 keeps a full bench's other batch sizes (#33). What the
    timings were is not checked (#46): only that every place says what the one definition says."""
    import shutil

    from toolkit.core import speed

    export_dir = tmp_path / fine4_export.name
    shutil.copytree(fine4_export, export_dir)
    (export_dir / "bench.json").unlink(missing_ok=True)
    verify(export_dir, data_dir=mnist_root, limit=500, download=False, console=Console(file=io.StringIO()))
    full = bench(export_dir, batches=(1, 32), min_seconds=0.0, min_iters=5, include_torch=False, console=Console(file=io.StringIO()))
    quick = bench(export_dir, batches=(1,), min_seconds=0.0, min_iters=5, include_torch=False, console=Console(file=io.StringIO()))
    kept = [r for r in quick["results"] if r["batch"] == 32]
    assert kept == [r for r in full["results"] if r["batch"] == 32] and len(kept) == 2  # batch 32 kept, unchanged
    assert {r["batch"] for r in quick["results"]} == {1, 32}
    fp32 = {(r["runtime"], r["batch"]): r["images_per_s"] for r in quick["results"] if r["artifact"] == "model.fp32.onnx"}
    for r in quick["results"]:
        if r["artifact"] == "model.fp32.onnx":
            assert r["vs_fp32"] is None
        else:
            assert r["vs_fp32"] == round(r["images_per_s"] / fp32[(r["runtime"], r["batch"])], 3)
    # structure only, never which way a timing fell (#46): each row is marked by the one definition, and
    # the notes name exactly the int8 files that definition finds slower somewhere
    md, card = (export_dir / "bench.md").read_text(), (export_dir / "MODEL_CARD.md").read_text()
    assert "× fp32" in md and "× fp32" in card
    for r in quick["results"]:
        line = next(line for line in md.splitlines() if line.startswith(f"| {r['artifact']} | {r['runtime']} | {r['batch']} |"))
        assert ("(slower: deploy fp32)" in line) == speed.does_not_pay(r), line
    slower = speed.slower_than_fp32(quick)
    assert all(file == "model.int8.onnx" and all(v < 1 for v in at.values()) for file, at in slower.items())
    for file in slower:
        assert f"**{speed.slower_line(file, quick)}**" in md and speed.slower_line(file, quick) in card
    assert ("deploy fp32 at" in md or "deploy fp32 here" in md) == bool(slower)


def _measured_rows(int8_per_batch: dict[int, float]) -> list[dict]:
    """bench rows with chosen speeds: fp32 at 1,000 images/s, int8 at the given images/s per batch."""
    from toolkit.core import speed

    rows = []
    for file, precision, per_batch in (("model.fp32.onnx", "fp32", {b: 1000.0 for b in int8_per_batch}), ("model.int8.onnx", "int8", int8_per_batch)):
        for batch, ips in per_batch.items():
            rows.append({"artifact": file, "precision": precision, "runtime": "ort-cpu", "batch": batch, "iterations": 5, "images_per_s": ips,
                         "p50_us": 1e6 * batch / ips, "p90_us": 1e6 * batch / ips, "p99_us": 1e6 * batch / ips,
                         "accuracy": None, "delta_pp": None, "agreement": None, "passed": None, "sha256": None})
    speed.relative(rows)
    return rows


import pytest  # noqa: E402


@pytest.mark.parametrize("case, int8, slower_at", [
    ("faster at every batch", {1: 1500.0, 32: 1200.0}, {}),
    ("slower at every batch", {1: 800.0, 32: 400.0}, {1: 0.8, 32: 0.4}),
    ("mixed: faster at batch 1, slower at batch 32", {1: 1200.0, 32: 770.0}, {32: 0.77}),
    ("mixed: slower at batch 1, faster at batch 32", {1: 900.0, 32: 1100.0}, {1: 0.9}),
])
def test_int8_that_does_not_pay_is_one_definition_per_batch(fine4_export, case, int8, slower_at):
    """#46: "int8 does not pay here" is decided per artifact and batch size (speed.does_not_pay), and bench's
    table, bench.md, the model card and serving's warnings all say the same, on given measurements."""
    from toolkit.check.bench import bench_markdown, bench_table, notes
    from toolkit.core import speed
    from toolkit.core.manifest import Manifest
    from toolkit.core.model_card import model_card

    rows = _measured_rows(int8)
    report = {"machine": "test CPU", "cpu": {}, "date": "2026-12-07", "warmup": 1, "threads": "default", "busy": None, "results": rows}
    assert speed.slower_than_fp32(report) == ({"model.int8.onnx": slower_at} if slower_at else {})
    md = bench_markdown(report)
    for r in rows:
        line = next(line for line in md.splitlines() if line.startswith(f"| {r['artifact']} | ort-cpu | {r['batch']} |"))
        assert ("(slower: deploy fp32)" in line) == (r["artifact"] == "model.int8.onnx" and r["batch"] in slower_at), line
    text = io.StringIO()
    Console(file=text, width=300).print(bench_table(report))
    assert text.getvalue().count("(slower: deploy fp32)") == len(slower_at)
    manifest = Manifest.load(fine4_export)
    card = model_card(fine4_export, manifest, report)
    # the speed table and the table of every target side by side (both batches are 1 and 32)
    assert card.count("(slower: deploy fp32)") == 2 * len(slower_at)
    assert bench_markdown(report, manifest).count("(slower: deploy fp32)") == 2 * len(slower_at)
    if not slower_at:
        assert notes(report) == [] and "deploy fp32" not in md and "slower than fp32 on this machine" not in card
        return
    said = ", ".join(f"batch {b} ({v:.2f}x)" for b, v in slower_at.items())
    (line,) = notes(report)
    assert line.startswith(f"model.int8.onnx is slower than fp32 on this machine at {said} of model.fp32.onnx's images/s: deploy fp32")
    faster = sorted(set(int8) - set(slower_at))
    assert line.endswith(f"it is faster at batch {faster[0]} ({int8[faster[0]] / 1000:.2f}x)" if faster else "deploy fp32 here")
    assert f"**{line}**" in md and line in card


def test_the_busy_machine_caveat():
    from toolkit.core import speed

    quiet_rows = [{"artifact": "a", "batch": 1, "p50_us": 100.0, "p90_us": 120.0}]
    assert speed.busy(0.5, 2, quiet_rows) is None
    assert speed.busy(3.9, 2, quiet_rows) == "load 3.9 on 2 cores"
    spread = [{"artifact": "checkpoint", "batch": 1, "p50_us": 752.0, "p90_us": 476_701.0}, *quiet_rows]
    assert "1 of 2 timings spread wide (checkpoint batch 1: p90 476,701 µs vs p50 752 µs)" in speed.busy(0.1, 2, spread)


def test_serving_defaults_to_the_fastest_artifact_measured_here(fine4_export, mnist_root, tmp_path):
    """#30: with a bench of this machine, the catalog's default (serve, predict) is the fastest artifact
    that passed its gate; an int8 file slower than fp32 is named in a warning; no bench: fp32 first."""
    import shutil

    from toolkit.core.environment import cpu_info, cpu_line
    from toolkit.inference.catalog import Catalog

    export_dir = tmp_path / "exports" / fine4_export.name
    shutil.copytree(fine4_export, export_dir)
    (export_dir / "bench.json").unlink(missing_ok=True)
    verify(export_dir, data_dir=mnist_root, limit=500, download=False, console=Console(file=io.StringIO()))
    assert Catalog.from_dirs([export_dir]).entry(None).artifact.file == "model.fp32.onnx"

    def measured(int8_speed: float, cpu: dict) -> None:
        rows = [{"artifact": f, "precision": p, "runtime": "ort-cpu", "batch": 1, "images_per_s": v, "p50_us": 1.0, "p90_us": 1.0}
                for f, p, v in (("model.fp32.onnx", "fp32", 1000.0), ("model.int8.onnx", "int8", int8_speed))]
        from toolkit.core import speed

        speed.relative(rows)
        (export_dir / "bench.json").write_text(json.dumps({"machine": cpu_line(cpu), "cpu": cpu, "results": rows}))

    here = cpu_info()
    measured(2500.0, here)
    catalog = Catalog.from_dirs([export_dir])
    int8_passed = all(p.passed for p in catalog.entry(f"{export_dir.name}/model.int8.onnx").artifact.parity.values())
    # faster and within its gate: the default; faster but failing its gate: never the default
    assert catalog.entry(None).artifact.file == ("model.int8.onnx" if int8_passed else "model.fp32.onnx")
    assert not any("slower" in w for w in catalog.warnings)
    measured(400.0, here)
    catalog = Catalog.from_dirs([export_dir])
    assert catalog.entry(None).artifact.file == "model.fp32.onnx"
    assert any(f"{export_dir.name}/model.int8.onnx is slower than fp32 on this machine at batch 1 (0.40x)" in w for w in catalog.warnings)
    measured(2500.0, {**here, "model": "Another CPU"})  # another machine's figures choose nothing here
    assert Catalog.from_dirs([export_dir]).entry(None).artifact.file == "model.fp32.onnx"
