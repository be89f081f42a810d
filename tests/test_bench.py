"""Benchmark: every artifact and PyTorch eager timed per batch size, with parity beside the speed."""

import io
import json

from rich.console import Console

from toolkit.bench import bench, time_calls
from toolkit.verify import verify


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
