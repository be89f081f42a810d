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
    """#30: × fp32 per row (same runtime and batch), int8 slower than fp32 marked "deploy fp32" in the
    table, bench.md and the model card; a quick --batch 1 keeps a full bench's other batch sizes (#33)."""
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
    int8 = [r["vs_fp32"] for r in quick["results"] if r["artifact"] == "model.int8.onnx"]
    slower = max(int8) < 1.0
    assert speed.slower_than_fp32(quick) == ({"model.int8.onnx": max(int8)} if slower else {})
    md, card = (export_dir / "bench.md").read_text(), (export_dir / "MODEL_CARD.md").read_text()
    assert "× fp32" in md and "× fp32" in card
    assert ("deploy fp32" in md) == slower and ("slower than fp32 on this machine" in card) == slower


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
    assert any(f"{export_dir.name}/model.int8.onnx is slower than fp32 on this machine (0.40x" in w for w in catalog.warnings)
    measured(2500.0, {**here, "model": "Another CPU"})  # another machine's figures choose nothing here
    assert Catalog.from_dirs([export_dir]).entry(None).artifact.file == "model.fp32.onnx"
