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
