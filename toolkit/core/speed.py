"""What an export's latest ``toolkit bench`` (its bench.json) says, read without running anything:
each artifact's speed relative to the fp32 ONNX file on the same runtime and batch, the int8 files
that are slower than fp32 there ("deploy fp32"), the fastest artifact that passed its parity gate,
and whether the figures came from this machine and from a quiet one.

Serving and ``toolkit predict`` use it to choose their default artifact; the bench table, bench.md,
the model card and ``toolkit serve``'s start-up lines use it to say where int8 does not pay.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BENCH_JSON = "bench.json"
REFERENCE = "model.fp32.onnx"  # what "× fp32" compares with
BUSY_SPREAD = 5.0  # a row whose p90 is this many times its p50 was timed beside other work


def load(export_dir: Path) -> dict | None:
    """The export's bench.json, or None (none, unreadable, or not a bench report)."""
    try:
        report = json.loads((Path(export_dir) / BENCH_JSON).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("results"), list) else None


def relative(rows: list[dict]) -> None:
    """In place: each row's ``vs_fp32``, its images/s over the fp32 ONNX file's on the same runtime and
    batch (None where there is no such row, or for the fp32 file itself)."""
    fp32 = {(r["runtime"], r["batch"]): r["images_per_s"] for r in rows if r.get("artifact") == REFERENCE}
    for r in rows:
        base = fp32.get((r.get("runtime"), r.get("batch")))
        r["vs_fp32"] = round(r["images_per_s"] / base, 3) if base and r.get("artifact") != REFERENCE else None


def slower_than_fp32(report: dict | None) -> dict[str, float]:
    """int8 artifacts slower than the fp32 ONNX file at every batch measured: file -> best ratio."""
    found: dict[str, list[float]] = {}
    for r in (report or {}).get("results", []):
        if r.get("precision") == "int8" and isinstance(r.get("vs_fp32"), (int, float)):
            found.setdefault(r["artifact"], []).append(r["vs_fp32"])
    return {file: max(ratios) for file, ratios in found.items() if max(ratios) < 1.0}


def same_machine(report: dict | None, here: dict) -> bool:
    """Whether the report was measured on a CPU like this one (model, cores and int8-relevant features)."""
    cpu = (report or {}).get("cpu") or {}
    return bool(cpu) and cpu.get("model") == here.get("model") and cpu.get("cores") == here.get("cores") and \
        set(cpu.get("features") or ()) == set(here.get("features") or ())


def fastest(report: dict | None, passed: set[str], batch: int = 1) -> str | None:
    """The artifact (of ``passed``: those that passed their parity gate) with the most images/s at
    ``batch`` (else at the smallest batch measured); None when none of them was measured."""
    rows = [r for r in (report or {}).get("results", []) if r.get("artifact") in passed]
    if not rows:
        return None
    at = batch if any(r["batch"] == batch for r in rows) else min(r["batch"] for r in rows)
    return max((r for r in rows if r["batch"] == at), key=lambda r: r["images_per_s"])["artifact"]


def busy(load: float, threads: int | None, rows: list[dict]) -> str | None:
    """Why the figures were measured on a busy machine, or None: the load average before timing
    (other work: the bench's own load comes after) above the cores the runtimes may use, or timings
    spread far (p90 over ``BUSY_SPREAD`` times p50)."""
    cores = threads or os.cpu_count() or 1
    reasons = []
    if load > cores:
        reasons.append(f"load {load:.1f} on {cores} core{'s' if cores != 1 else ''}")
    spread = [r for r in rows if r.get("p50_us") and r.get("p90_us", 0) > BUSY_SPREAD * r["p50_us"]]
    if spread:
        worst = max(spread, key=lambda r: r["p90_us"] / r["p50_us"])
        reasons.append(f"{len(spread)} of {len(rows)} timings spread wide ({worst['artifact']} batch {worst['batch']}: "
                       f"p90 {worst['p90_us']:,.0f} µs vs p50 {worst['p50_us']:,.0f} µs)")
    return "; ".join(reasons) or None


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0
