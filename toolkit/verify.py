"""`toolkit verify`: prove that every exported artifact gives the trained model's answers.

The full test set goes through the PyTorch reference (the source checkpoint, whose sha256
the manifest pins) and through every artifact on every runtime present. Per artifact and
runtime: accuracy, its delta to the reference in percentage points, top-1 agreement with the
reference, the largest |logit difference|, and pass/fail against the precision's gate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from toolkit import data as data_mod
from toolkit.checkpoint import load_checkpoint, model_from_checkpoint
from toolkit.errors import ToolkitError
from toolkit.files import atomic_write, locked, resolve_data_dir, sha256_file
from toolkit.manifest import latest_export, load_manifest, save_manifest
from toolkit.runtime import make_runner, runtimes_for, torch_runner, trt_missing_reason

# |delta| in percentage points, and the least top-1 agreement with the reference (percent)
GATES: dict[str, dict[str, float]] = {
    "fp32": {"delta_pp": 0.02, "agreement": 99.9},
    "fp16": {"delta_pp": 0.1, "agreement": 0.0},
    "int8": {"delta_pp": 0.5, "agreement": 0.0},
}
BATCH = 500
PARITY_FIELDS = ("accuracy", "delta_pp", "agreement", "max_abs_logit_diff", "passed")  # recorded per artifact and runtime


def batched(run, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])


def reference_model(manifest: dict):
    src = manifest["source"]
    path = Path(src["checkpoint"])
    if not path.is_file():
        raise ToolkitError(f"the source checkpoint {path} is gone; parity needs it as the reference")
    if sha256_file(path) != src["sha256"]:
        raise ToolkitError(f"{path} changed since the export (sha256 differs); export again")
    return model_from_checkpoint(load_checkpoint(path))


def test_set(manifest: dict, data_dir, download: bool = True, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    x, y, _ = data_mod.split_arrays(manifest["dataset"], resolve_data_dir(data_dir), train=False, download=download)
    if limit:
        x, y = x[:limit], y[:limit]
    return data_mod.normalize(x, manifest["normalization"]), y.numpy()


def compare(logits: np.ndarray, ref_logits: np.ndarray, labels: np.ndarray, ref_acc: float, precision: str, gates=GATES) -> dict:
    acc = 100.0 * float((logits.argmax(1) == labels).mean())
    delta = acc - ref_acc
    agreement = 100.0 * float((logits.argmax(1) == ref_logits.argmax(1)).mean())
    gate = gates[precision]
    return {
        "accuracy": round(acc, 4),
        "delta_pp": round(delta, 4),
        "agreement": round(agreement, 4),
        "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
        "gate": gate,
        # a hair of slack for the float rounding of the percentages themselves
        "passed": abs(delta) <= gate["delta_pp"] + 1e-9 and agreement >= gate["agreement"] - 1e-9,
    }


def verify(export_dir=None, *, data_dir=None, exports="exports", gates=None, limit: int | None = None, download: bool = True, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    gates = {**GATES, **(gates or {})}
    export_dir = Path(export_dir) if export_dir else latest_export(exports)
    manifest = load_manifest(export_dir)
    if not manifest["artifacts"]:
        raise ToolkitError(f"{export_dir}: the manifest lists no artifacts")
    x, labels = test_set(manifest, data_dir, download=download, limit=limit)
    ref_logits = batched(torch_runner(reference_model(manifest)), x)
    ref_acc = 100.0 * float((ref_logits.argmax(1) == labels).mean())

    results, skipped = [], []
    for art in manifest["artifacts"]:
        found = runtimes_for(art)
        if not found:
            why = trt_missing_reason() if art["format"] == "trt" else f"no runtime here runs {art['format']} artifacts"
            skipped.append({"artifact": art["file"], "reason": why})
            continue
        for runtime in found:
            logits = batched(make_runner(export_dir, art, runtime), x)
            if logits.shape != ref_logits.shape:
                raise ToolkitError(f"{export_dir / art['file']}: gives outputs of shape {logits.shape}, the trained model "
                                   f"{ref_logits.shape}: it is not an export of this model")
            row = compare(logits, ref_logits, labels, ref_acc, art["precision"], gates)
            results.append({"artifact": art["file"], "format": art["format"], "precision": art["precision"], "runtime": runtime,
                            "sha256": art["sha256"], **row})
    report = {
        "export_dir": str(export_dir),
        "dataset": manifest["dataset"],
        "images": int(len(labels)),
        "reference": "pytorch-eager (cpu)",
        "reference_acc": round(ref_acc, 4),
        "results": results,
        "skipped": skipped,
        "passed": bool(results) and all(r["passed"] for r in results),
    }
    # the results go into the manifest as it is now: an export may have run meanwhile (it waited for
    # nobody, verify held no lock while it computed), so only artifacts with the sha256 verified get them
    with locked(export_dir, say=console.print):
        current = load_manifest(export_dir, verify_files=False)
        for art in current["artifacts"]:
            rows = [r for r in results if r["artifact"] == art["file"] and r["sha256"] == art["sha256"]]
            if rows:
                art["parity"] = {r["runtime"]: {k: r[k] for k in PARITY_FIELDS} for r in rows}
        current["parity"] = {"images": report["images"], "reference_acc": report["reference_acc"]}
        with atomic_write(export_dir / "parity.json", "w") as f:
            json.dump(report, f, indent=2)
        with atomic_write(export_dir / "parity.md", "w") as f:
            f.write(parity_markdown(report))
        save_manifest(current, export_dir)
    console.print(parity_table(report))
    for s in skipped:
        console.print(f"[yellow]skipped {s['artifact']}: {s['reason']}[/]")
    return report


def parity_markdown(report: dict) -> str:
    lines = [
        f"Reference: {report['reference']}, {report['reference_acc']:.2f}% on {report['images']:,} {report['dataset']} test images.",
        "",
        "| artifact | runtime | accuracy | Δ pp | agreement | max abs logit diff | gate | result |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in report["results"]:
        gate = f"abs Δ ≤ {r['gate']['delta_pp']} pp" + (f", agreement ≥ {r['gate']['agreement']}%" if r["gate"]["agreement"] else "")
        lines.append(
            f"| {r['artifact']} | {r['runtime']} | {r['accuracy']:.2f}% | {r['delta_pp']:+.2f} | {r['agreement']:.2f}% | "
            f"{r['max_abs_logit_diff']:.2e} | {gate} | {'pass' if r['passed'] else 'FAIL'} |"
        )
    for s in report["skipped"]:
        lines.append(f"| {s['artifact']} | — | — | — | — | — | — | not run: {s['reason']} |")
    return "\n".join(lines) + "\n"


def parity_table(report: dict) -> Table:
    table = Table(title=f"parity vs. PyTorch ({report['reference_acc']:.2f}% on {report['images']:,} test images)")
    for col in ("artifact", "runtime", "accuracy", "Δ pp", "agreement", "max |Δlogit|", "result"):
        table.add_column(col, justify="left" if col in ("artifact", "runtime", "result") else "right")
    for r in report["results"]:
        table.add_row(r["artifact"], r["runtime"], f"{r['accuracy']:.2f}%", f"{r['delta_pp']:+.2f}", f"{r['agreement']:.2f}%",
                      f"{r['max_abs_logit_diff']:.2e}", "[green]pass[/]" if r["passed"] else "[red]FAIL[/]")
    return table
