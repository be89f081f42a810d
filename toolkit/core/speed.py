"""What an export's latest ``toolkit bench`` (its bench.json) says, read without running anything:
each artifact's speed relative to the fp32 ONNX file on the same runtime and batch, the int8 files
that are slower than fp32 there at a batch size ("deploy fp32": ``does_not_pay``), the fastest artifact that passed its parity gate,
and whether the figures came from this machine and from a quiet one.

Serving and ``toolkit predict`` use it to choose their default artifact; the bench table, bench.md,
the model card and ``toolkit serve``'s start-up lines use it to say where int8 does not pay.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from toolkit.core.files import MAX_NAME
from toolkit.core.records import load_optional

BENCH_JSON = "bench.json"
REFERENCE = "model.fp32.onnx"  # what "× fp32" compares with
REFERENCE_RUNTIME = "ort-cpu"  # ... on the same runtime, else on this one
REFERENCES = {"chromium-ort-web": "web"}  # a runtime that runs its own fp32 artifact: the web page's fp32 folder
MAX_BYTES = 4 << 20  # a bench report is a few KB
MAX_ROWS = 10_000
BUSY_SPREAD = 5.0  # a row whose p90 is this many times its p50 was timed beside other work


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


Ratio = Optional[Annotated[float, Field(ge=0)]]


class Row(_Record):
    """What readers use of one bench row (serving's choice, the card's table, the notes)."""
    artifact: str = Field(min_length=1, max_length=MAX_NAME)
    precision: str = Field(max_length=16)
    runtime: str = Field(max_length=64)
    batch: int = Field(ge=1, le=1 << 20)
    images_per_s: float = Field(gt=0)
    vs_fp32: Ratio = None
    vs: Optional[str] = Field(default=None, max_length=MAX_NAME)  # the fp32 file vs_fp32 compares with
    p50_us: Optional[Annotated[float, Field(ge=0)]] = None
    p90_us: Optional[Annotated[float, Field(ge=0)]] = None
    passed: Optional[bool] = None
    sha256: Optional[str] = Field(default=None, max_length=64)
    date: Optional[str] = Field(default=None, max_length=64)


class TimedRow(Row):
    """A row bench itself wrote, with every figure its table prints (rows kept from an earlier bench)."""
    iterations: int = Field(ge=1)
    p50_us: float = Field(ge=0)
    p90_us: float = Field(ge=0)
    p99_us: float = Field(ge=0)
    accuracy: Optional[float] = None
    delta_pp: Optional[float] = None
    agreement: Optional[float] = None


class Cpu(_Record):
    model: Optional[str] = Field(default=None, max_length=256)
    cores: Optional[int] = None
    features: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=256)


class Report(_Record):
    results: list[Row] = Field(max_length=MAX_ROWS)
    cpu: Optional[Cpu] = None
    machine: Optional[str] = Field(default=None, max_length=512)
    date: Optional[str] = Field(default=None, max_length=64)
    busy: Optional[str] = Field(default=None, max_length=2048)
    threads: Union[int, Literal["default"], None] = None
    warmup: Optional[int] = None


def load(export_dir: Path, warn=None) -> dict | None:
    """The export's bench.json, or None: none, or malformed (then one warning line names it; it is
    optional, so readers go on without it). Read through ``records``: regular file, size, depth, schema."""
    return load_optional(Path(export_dir) / BENCH_JSON, "bench report", Report, limit=MAX_BYTES, warn=warn)


def timed(row: dict) -> bool:
    """Whether ``row`` carries every figure bench's table prints (else an earlier bench's row is not kept)."""
    try:
        TimedRow.model_validate(row)
    except ValidationError:
        return False
    return True


def relative(rows: list[dict]) -> None:
    """In place: each row's ``vs_fp32``, its images/s over the fp32 ONNX file's on the same runtime and
    batch, or for a runtime that runs no ONNX file (OpenVINO) over ONNX Runtime's on the CPU (None where
    there is no such row, or for the fp32 file itself)."""
    fp32 = {(r["runtime"], r["batch"]): r["images_per_s"] for r in rows if r.get("artifact") == REFERENCES.get(r.get("runtime"), REFERENCE)}
    for r in rows:
        own = REFERENCES.get(r.get("runtime"), REFERENCE)
        base = fp32.get((r.get("runtime"), r.get("batch")))
        r["vs"] = own if base else REFERENCE
        base = base or fp32.get((REFERENCE_RUNTIME, r.get("batch")))
        r["vs_fp32"] = round(r["images_per_s"] / base, 3) if base and r.get("artifact") != own else None


def does_not_pay(row: dict) -> bool:
    """The one definition of "int8 does not pay here": an int8 row (one artifact, runtime and batch size)
    that ran fewer images/s than the fp32 ONNX file on the same runtime and batch. It is decided per
    batch size, since an int8 file can be faster at batch 1 and slower at batch 32 on the same CPU."""
    ratio = row.get("vs_fp32")
    return row.get("precision") == "int8" and isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio < 1.0


def int8_verdicts(report: dict | None) -> dict[str, dict[int, float]]:
    """Each int8 artifact measured against fp32: batch size -> its × fp32 there (the lowest over runtimes)."""
    found: dict[str, dict[int, float]] = {}
    for r in (report or {}).get("results", []):
        if r.get("precision") == "int8" and isinstance(r.get("vs_fp32"), (int, float)):
            at = found.setdefault(r["artifact"], {})
            at[r["batch"]] = min(at.get(r["batch"], r["vs_fp32"]), r["vs_fp32"])
    return found


def slower_than_fp32(report: dict | None) -> dict[str, dict[int, float]]:
    """int8 artifacts that do not pay at one batch size or more (``does_not_pay``): file -> {batch: × fp32}
    of those batch sizes only."""
    slower = {file: {b: v for b, v in sorted(at.items()) if v < 1.0} for file, at in int8_verdicts(report).items()}
    return {file: at for file, at in slower.items() if at}


def slower_line(file: str, report: dict | None) -> str:
    """What bench's notes, the model card and serving say of an int8 file that does not pay somewhere:
    the batch sizes where it is slower, and those where it is faster."""
    at = sorted(int8_verdicts(report).get(file, {}).items())
    slow = [f"batch {b} ({v:.2f}x)" for b, v in at if v < 1.0]
    fast = [f"batch {b} ({v:.2f}x)" for b, v in at if v >= 1.0]
    ref = next((r.get("vs") for r in (report or {}).get("results", []) if r.get("artifact") == file and isinstance(r.get("vs"), str)), REFERENCE)
    line = f"{file} is slower than fp32 on this machine at {', '.join(slow)} of {ref}'s images/s: deploy fp32"
    return line + (f" at {'that batch size' if len(slow) == 1 else 'those batch sizes'}; it is faster at {', '.join(fast)}" if fast else " here")


def times_fp32(row: dict) -> str:
    """A row's × fp32 as bench's table, bench.md and the model card print it, marked where int8 does not pay."""
    ratio = row.get("vs_fp32")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
        return ""
    return f"{ratio:.2f}×" + (" (slower: deploy fp32)" if does_not_pay(row) else "")


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
