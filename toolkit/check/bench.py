"""`toolkit bench`: latency p50/p90/p99 and images/s per artifact and runtime, beside parity.

Each (artifact, runtime, batch) runs ``warmup`` untimed calls, then timed calls until both
``min_iters`` calls and ``min_seconds`` have passed (at most ``max_iters``); the count is
reported with the numbers. Inputs are fixed random tensors of the manifest's input shape.
"""

from __future__ import annotations

import functools
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from toolkit.core import side_by_side, speed
from toolkit.core.environment import cpu_info, cpu_line
from toolkit.core.errors import ToolkitError
from toolkit.core.files import atomic_write
from toolkit.inference.catalog import int8_warning
from toolkit.core.manifest import Manifest, latest_export
from toolkit.core.model_card import write_model_card
from toolkit.core.onnx_io import check_artifacts
from toolkit.models.checkpoint import model_from_checkpoint, source_checkpoint, torch_runner
from toolkit.inference.runtime import make_runner, runtimes_for

MAX_BATCH_BYTES = 1 << 30  # one input batch; the runtimes' activations take several times more


def time_calls(run, x: np.ndarray, warmup: int, min_iters: int, min_seconds: float, max_iters: int) -> list[float]:
    for _ in range(warmup):
        run(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter_ns()
        run(x)
        times.append((time.perf_counter_ns() - t0) / 1e3)  # microseconds
    return times


def _check_batch_bytes(batches, shape) -> None:
    """Refuse a batch size whose float input alone is over MAX_BATCH_BYTES, in one line."""
    image_bytes = 4 * math.prod(shape)
    too_big = [b for b in batches if b * image_bytes > MAX_BATCH_BYTES]
    if too_big:
        raise ToolkitError(f"--batch {too_big[0]:,}: a batch of that many {'x'.join(map(str, shape))} images takes "
                           f"{too_big[0] * image_bytes / 2**30:,.1f} GiB; at most {MAX_BATCH_BYTES // image_bytes:,} images fit the "
                           f"{MAX_BATCH_BYTES / 2**30:g} GiB input limit")


def bench(export_dir=None, *, exports="exports", batches=(1, 32, 256), warmup: int = 10, min_iters: int = 20, min_seconds: float = 1.0,
          max_iters: int = 5000, include_torch: bool = True, threads: int | None = None, console: Console | None = None) -> dict:
    """``threads`` caps the intra-op threads of every runtime (PyTorch too, for a fair comparison);
    on a small model at batch 1, or a host shared with other work, fewer threads can be faster."""
    console = console or Console(stderr=True)
    export_dir = Path(export_dir) if export_dir else latest_export(exports, say=lambda line: console.print(f"bench: {line}"))
    manifest = Manifest.load(export_dir)
    check_artifacts(export_dir, manifest)  # a graph from disk is untrusted until parsed and checked
    warning = int8_warning(manifest)
    if warning:
        console.print(warning, soft_wrap=True, markup=False)
    shape = manifest.input.shape[1:]
    _check_batch_bytes(batches, shape)

    load = speed.load_average()  # before timing: other work's load, not the bench's own
    targets = []
    if include_torch:
        targets.append(("checkpoint", "fp32", "pytorch-eager", torch_runner(model_from_checkpoint(source_checkpoint(manifest))), {}, "float32",
                        manifest.source.sha256))
    for art in manifest.artifacts:
        for runtime in runtimes_for(art):
            parity = art.parity.get(runtime)
            targets.append((art.file, art.precision, runtime, make_runner(export_dir, art, runtime, threads, classes=len(manifest.classes)),
                            parity.model_dump() if parity else {}, manifest.input.dtype, art.sha256))

    torch_threads = None
    if threads and include_torch:
        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        rows = _time_targets(targets, batches, shape, warmup, min_iters, min_seconds, max_iters, console)
    finally:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        for target in targets:
            getattr(target[3], "close", lambda: None)()  # a runner holding a browser page lets it go
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for r in rows:
        r["date"] = date
    rows = _merged(speed.load(export_dir, warn=lambda line: console.print(line, markup=False, soft_wrap=True)), rows, targets, cpu_info(), threads)
    speed.relative(rows)
    report = {"export_dir": str(export_dir), "machine": cpu_line(), "cpu": cpu_info(), "date": date,
              "warmup": warmup, "threads": threads or "default", "busy": speed.busy(load, threads, [r for r in rows if r["date"] == date]),
              "results": rows}
    with atomic_write(export_dir / "bench.json", "w") as f:
        json.dump(report, f, indent=2)
    with atomic_write(export_dir / "bench.md", "w") as f:
        f.write(bench_markdown(report, manifest))
    write_model_card(export_dir, manifest)
    console.print(bench_table(report))
    console.print(side_by_side_table(manifest, report))
    for line in notes(report):
        console.print(f"[yellow]{line}[/]")
    console.print(f"bench: wrote {export_dir / 'bench.md'}, bench.json and MODEL_CARD.md")
    return report


def _merged(previous: dict | None, rows: list[dict], targets, here: dict, threads) -> list[dict]:
    """The new rows, and the previous bench's rows of other batch sizes (a quick ``--batch 1`` keeps
    the batch-32 figures of a full bench) where they are of the same machine, thread setting and
    artifact bytes."""
    if previous is None or not speed.same_machine(previous, here) or previous.get("threads") != (threads or "default"):
        return rows
    current = {(t[0], t[2]): t[6] for t in targets}
    new = {(r["artifact"], r["runtime"], r["batch"]) for r in rows}
    kept = [r for r in previous["results"] if speed.timed(r) and (r.get("artifact"), r.get("runtime"), r.get("batch")) not in new
            and r.get("sha256") is not None and current.get((r.get("artifact"), r.get("runtime"))) == r.get("sha256")]
    return sorted(kept + rows, key=lambda r: (r["artifact"] != "checkpoint", r["artifact"], r["runtime"], r["batch"]))


def notes(report: dict) -> list[str]:
    """What the figures mean for deployment: int8 slower than fp32 here, a busy machine."""
    lines = [speed.slower_line(file, report) for file in speed.slower_than_fp32(report)]
    if report.get("busy"):
        lines.append(f"measured while the machine was busy ({report['busy']}): the figures understate what a quiet machine does")
    return lines


def _time_targets(targets, batches, shape, warmup, min_iters, min_seconds, max_iters, console) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for name, precision, runtime, run, parity, dtype, sha in targets:
        for batch in batches:
            # random pixels; a float input takes them as they are (the values do not change the timing)
            x = rng.integers(0, 256, (batch, *shape), dtype=np.uint8).astype(dtype)
            timer = getattr(run, "time_calls", None)  # a runtime that times itself (the web page, inside the browser)
            t = np.array((timer or functools.partial(time_calls, run))(x, warmup, min_iters, min_seconds, max_iters))
            rows.append({
                "artifact": name, "precision": precision, "runtime": runtime, "batch": batch, "iterations": int(len(t)),
                "p50_us": round(float(np.percentile(t, 50)), 1), "p90_us": round(float(np.percentile(t, 90)), 1),
                "p99_us": round(float(np.percentile(t, 99)), 1), "images_per_s": round(batch * 1e6 / float(t.mean()), 1),
                "accuracy": parity.get("accuracy"), "delta_pp": parity.get("delta_pp"), "agreement": parity.get("agreement"),
                "passed": parity.get("passed"), "sha256": sha,
            })
            console.print(f"{name} on {runtime}, batch {batch}: p50 {rows[-1]['p50_us']:.0f} µs, {rows[-1]['images_per_s']:,.0f} img/s ({len(t)} iterations)")
    return rows


def _fmt_parity(r: dict) -> tuple[str, str, str]:
    if r["accuracy"] is None:
        return ("reference" if r["runtime"] == "pytorch-eager" else "not verified", "", "")
    failed = " FAILED its gate" if r.get("passed") is False else ""
    return (f"{r['accuracy']:.2f}%{failed}", f"{r['delta_pp']:+.2f}", f"{r['agreement']:.2f}%")


def bench_markdown(report: dict, manifest: Manifest | None = None) -> str:
    """bench.md: every timing, then (with the manifest) every target side by side with its parity."""
    lines = [
        f"Machine: {report['machine']}; {report['date']}; intra-op threads: {report.get('threads', 'default')}; "
        f"{report['warmup']} warm-up calls, then the stated number of timed calls. × fp32: images/s over model.fp32.onnx's "
        "on the same runtime and batch (on ONNX Runtime's CPU runtime for OpenVINO's files).",
        "",
        "| artifact | runtime | batch | p50 µs | p90 µs | p99 µs | images/s | × fp32 | iterations | accuracy | Δ pp | agreement |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        acc, delta, agree = _fmt_parity(r)
        lines.append(f"| {r['artifact']} | {r['runtime']} | {r['batch']} | {r['p50_us']:.1f} | {r['p90_us']:.1f} | {r['p99_us']:.1f} | "
                     f"{r['images_per_s']:,.0f} | {speed.times_fp32(r)} | {r['iterations']} | {acc} | {delta} | {agree} |")
    dates = sorted({r.get("date") for r in report["results"] if r.get("date") and r.get("date") != report["date"]})
    if dates:
        lines += ["", f"Rows of other batch sizes kept from earlier benches on this machine ({', '.join(dates)})."]
    lines += [""] + [f"**{line}**" for line in notes(report)] if notes(report) else []
    if manifest is not None:
        lines += ["", "## Every target side by side", "", *side_by_side.markdown(manifest, report)]
    return "\n".join(lines) + "\n"


def bench_table(report: dict) -> Table:
    table = Table(title=f"benchmark ({report['machine']})")
    for col in ("artifact", "runtime", "batch", "p50 µs", "p90 µs", "p99 µs", "img/s", "× fp32", "iters", "accuracy", "Δ pp", "agreement"):
        table.add_column(col, justify="left" if col in ("artifact", "runtime") else "right")
    for r in report["results"]:
        table.add_row(r["artifact"], r["runtime"], str(r["batch"]), f"{r['p50_us']:.1f}", f"{r['p90_us']:.1f}", f"{r['p99_us']:.1f}",
                      f"{r['images_per_s']:,.0f}", speed.times_fp32(r), str(r["iterations"]), *_fmt_parity(r))
    return table


def side_by_side_table(manifest: Manifest, report: dict) -> Table:
    """Every target of the export in one table (the model card's and bench.md's), for the console."""
    table = Table(title="every target side by side")
    for col in side_by_side.HEADER:
        table.add_column(col, justify="right" if col.startswith(("img/s", "×")) else "left")
    for cells in side_by_side.rows(manifest, report):
        table.add_row(*cells)
    return table
