"""Every target of an export in one table: for each artifact and the runtime that ran it, its parity with
the trained model (Δ with its 95% interval, agreement, gate) from the manifest (``toolkit verify``) and
its speed at batch 1 and 32 from bench.json (``toolkit bench``), × the fp32 ONNX file's with "deploy
fp32" where int8 does not pay (``speed.does_not_pay``). Artifacts that no runtime here ran (an engine
built ahead of time, a runtime not installed) get a row saying so.

The model card, bench.md and docs/benchmarks.md (``bench/report.py``, from committed records) print it.
"""

from __future__ import annotations

from toolkit.core import speed
from toolkit.core.manifest import Artifact, Manifest

BATCHES = (1, 32)
RUNTIMES = {"ort-cpu": "ONNX Runtime (CPU)", "ort-cuda": "ONNX Runtime (CUDA)", "openvino-cpu": "OpenVINO Runtime (CPU)",
            "executorch-cpu": "ExecuTorch (XNNPACK, CPU)", "tensorrt": "TensorRT", "chromium-ort-web": "ONNX Runtime Web (Chromium)"}
HEADER = ["runtime", "precision", "file", "Δ pp (95% interval)", "agreement", "gate",
          *(f"{label} b{b}" for b in BATCHES for label in ("img/s", "× fp32"))]


def _interval(found) -> str:
    return f" ({found[0]:+.2f} to {found[1]:+.2f})" if found else ""


def _ahead_of_time(art: Artifact) -> dict | None:
    built = art.get("built_for")
    return built if art.format == "trt" and isinstance(built, dict) and built.get("ahead_of_time") else None


def _not_run(art: Artifact) -> str:
    built = _ahead_of_time(art)
    if built:
        caps = built.get("compute_capability")
        caps = ", ".join(caps) if isinstance(caps, list) else caps
        return f"built ahead of time on the CPU by TensorRT-RTX {built.get('tensorrt_rtx')} for {caps}: not run here (an RTX GPU runs it)"
    return "not verified here: no runtime on the verifying machine ran it"


def rows(manifest: Manifest, bench: dict | None) -> list[list[str]]:
    """The table's cells, one row per artifact and runtime (verified or benched), or per artifact not run."""
    speeds = {}
    for r in (bench or {}).get("results", []):
        if isinstance(r, dict) and r.get("batch") in BATCHES:
            speeds[(r.get("artifact"), r.get("runtime"), r["batch"])] = r
    table = []
    for art in manifest.artifacts:
        runtimes = list(art.parity) + sorted({rt for (file, rt, _) in speeds if file == art.file and rt not in art.parity})
        if not runtimes:
            table.append(["TensorRT-RTX" if _ahead_of_time(art) else art.format, art.precision, art.file, _not_run(art), *[""] * (len(HEADER) - 4)])
            continue
        for runtime in runtimes:
            p = art.parity.get(runtime)
            cells = [RUNTIMES.get(runtime, runtime), art.precision, art.file]
            if p is None:
                cells += ["not verified", "", ""]
            else:
                cells += [f"{p.delta_pp:+.2f}{_interval(p.delta_ci_pp)}", f"{p.agreement:.2f}%", "passed" if p.passed else "**FAILED**"]
            for batch in BATCHES:
                r = speeds.get((art.file, runtime, batch))
                cells += [f"{r['images_per_s']:,.0f}", speed.times_fp32(r)] if r else ["—", ""]
            table.append(cells)
    return table


def markdown(manifest: Manifest, bench: dict | None) -> list[str]:
    """The table as markdown lines (header, rule, rows)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---:" if h.startswith(("img/s", "×")) else "---" for h in HEADER) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows(manifest, bench)]
