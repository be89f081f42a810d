"""`toolkit verify`: prove that every exported artifact gives the trained model's answers, and that
what is deployed (image file -> preprocessing -> artifact) does too.

The reference is the source checkpoint (whose sha256 the manifest pins) in PyTorch, fed the
test set through the training recipe's own pipeline and test transform. Every artifact on
every runtime present is fed the test set twice (see toolkit.core.parity): as tensors normalized by
the deployed preprocessing from the manifest's normalization, and as image files (each test
image a PNG in memory) through the whole deployed preprocessing. Per artifact and runtime:
accuracy, delta to the reference, top-1 agreement, largest |logit difference|, the pipeline
path's agreement, and pass/fail against the precision's gates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from toolkit.data.sources import source_for
from toolkit.inference import folder, preprocess, splits
from toolkit.check.diagnosis import diagnosis_line, layer_errors
from toolkit.models.checkpoint import model_from_checkpoint, source_checkpoint, torch_runner
from toolkit.core.errors import ToolkitError
from toolkit.core.files import atomic_write, locked, remove_stale_temps, resolve_data_dir, sha256_file
from toolkit.core.environment import cpu_info, cpu_line
from toolkit.core.manifest import Manifest, Parity, Verified, latest_export
from toolkit.core.model_card import write_model_card
from toolkit.core.onnx_io import check_artifacts
from toolkit.core.trt_rules import check_file, summary
from toolkit.core.parity import GATES, PARITY_FIELDS, REPORT, REPORT_MD, accuracy, compare, pending, settle_report
from toolkit.models.recipes import Recipe
from toolkit.inference.runtime import make_runner, not_runnable_reason, runtimes_for

BATCH = 500


def batched(run, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])


def deployed_inputs(manifest: Manifest, root: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The test split read by the deployed code, without torch: (its pixels normalized by the
    manifest's normalization, the tensor-path inputs, the pipeline-path inputs, labels). The model
    inputs are normalized floats, or the pixels themselves for a uint8-input export. The pipeline
    path writes each image as a PNG file in memory and reads it back as `toolkit predict` and the
    demo read a user's file."""
    if manifest.source.folder is not None:  # an image folder: its own test files, read as a user's files are
        spec = folder.from_manifest(manifest)
        found = folder.load(spec)
        images, labels = found.x_test[:limit], found.y_test[:limit]
        sources = [spec.root / name for name in found.test_files[:limit]]
    else:
        split = splits.read_test_split(manifest.dataset, root)
        if split is None:
            raise ToolkitError(f"no {manifest.dataset} test split under {root} that the deployed preprocessing can read")
        images, labels, _ = split
        images, labels = images[:limit], labels[:limit]
        sources = [preprocess.png_bytes(img) for img in images]
    normalized = preprocess.normalize(images, manifest.normalization)
    tensors = preprocess.model_input(images, manifest)
    files = np.concatenate([preprocess.to_input(preprocess.model_pixels(src, manifest), manifest) for src in sources])
    return normalized, tensors, files, labels, sources


def _verified_on(images: int, reference_acc: float) -> dict:
    """The machine the results hold on: int8 kernels differ between CPUs (VNNI or not, AVX-512, AMX)."""
    import onnxruntime

    info = cpu_info()
    return {"images": int(images), "reference_acc": reference_acc, "machine": cpu_line(info), "cpu_features": info["features"],
            "onnxruntime": onnxruntime.__version__}


def pipeline_logits(run, x_files: np.ndarray, sources: list) -> np.ndarray:
    """The image-file path's logits: the Python preparation's inputs through ``run``, or, for a runner with its
    own preparation (the web page's ``files``), the image files themselves through it."""
    if hasattr(run, "files"):
        return run.files([s if isinstance(s, bytes) else Path(s).read_bytes() for s in sources])[0]
    return batched(run, x_files)


def _check_artifacts(export_dir: Path, manifest: Manifest, ref_logits, labels, ref_acc: float, gates: dict, x_tensor, x_files,
                     sources: list, console: Console) -> tuple[list[dict], list[dict], dict[str, dict]]:
    """Every artifact on every runtime that can run it here, against the reference: the parity
    rows, the artifacts skipped (and why), and where a failing int8 artifact loses the float signal."""
    results, skipped = [], []
    diagnosis: dict[str, dict] = {}  # per failing int8 artifact: where it loses the float signal (check.diagnosis.layer_errors)
    for art in manifest.artifacts:
        found = runtimes_for(art)
        if not found:
            why = not_runnable_reason(art)
            skipped.append({"artifact": art.file, "reason": why})
            continue
        for runtime in found:
            run = make_runner(export_dir, art, runtime, classes=len(manifest.classes))
            unfused = getattr(run, "unfused", False)
            console.print(f"verify: {art.file} on {runtime}" + (" (unfused: 8-bit weights would saturate this x86 CPU's int8 kernels, "
                                                                 "which have no VNNI; exact, without int8's speed)" if unfused else ""))
            logits = batched(run, x_tensor)
            if logits.shape != ref_logits.shape:
                raise ToolkitError(f"{export_dir / art.file}: gives outputs of shape {logits.shape}, the trained model "
                                   f"{ref_logits.shape}: it is not an export of this model")
            row = compare(logits, ref_logits, labels, ref_acc, art.precision, gates, pipeline_logits=pipeline_logits(run, x_files, sources))
            getattr(run, "close", lambda: None)()  # a runner holding a browser page lets it go
            results.append({"artifact": art.file, "format": art.format, "precision": art.precision, "runtime": runtime,
                            "sha256": art.sha256, **({"kernels": "unfused"} if unfused else {}), **row})
            if art.precision == "int8" and art.format == "onnx" and not row["tensor_passed"] and art.file not in diagnosis:
                float_twin = export_dir / "model.fp32.onnx"
                if float_twin.is_file():
                    console.print(f"verify: {art.file} missed its gate; comparing it with model.fp32.onnx layer by layer")
                    diagnosis[art.file] = layer_errors(float_twin, export_dir / art.file, x_tensor, manifest.input.name)
    return results, skipped, diagnosis


def _record(export_dir: Path, report: dict, console: Console) -> None:
    """parity.json, parity.md, the manifest's parity and the model card, committed together."""
    results = report["results"]
    # the results go into the manifest as it is now: an export may have run meanwhile (it waited for
    # nobody, verify held no lock while it computed), so only artifacts with the sha256 verified get them
    with locked(export_dir, say=console.print):
        stale = remove_stale_temps(export_dir)  # a verify or export killed mid-write left these: under the lock, nobody's
        if stale:
            console.print(f"verify: removed {len(stale)} temporary file(s) a killed run left in {export_dir}")
        current = Manifest.load(export_dir, verify_files=False)
        settled = settle_report(export_dir, current)
        if settled:
            console.print(f"verify: {settled}")
        for art in current.artifacts:
            rows = [r for r in results if r["artifact"] == art.file and r["sha256"] == art.sha256]
            if rows:
                art.parity = {r["runtime"]: Parity(**{k: r[k] for k in PARITY_FIELDS}) for r in rows}
        with atomic_write(pending(export_dir, REPORT), "w") as f:
            json.dump(report, f, indent=2)
        with atomic_write(pending(export_dir, REPORT_MD), "w") as f:
            f.write(parity_markdown(report))
        current.parity = Verified(**report["verified_on"], report_sha256=sha256_file(pending(export_dir, REPORT)))
        current.save(export_dir)  # the commit point: killed before it, the pending files are dropped; after it, finished
        settle_report(export_dir, current)
        write_model_card(export_dir, current)


def verify(export_dir=None, *, data_dir=None, exports="exports", gates=None, limit: int | None = None, download: bool = True,
           console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    gates = {**GATES, **(gates or {})}
    export_dir = Path(export_dir) if export_dir else latest_export(exports, say=lambda line: console.print(f"verify: {line}"))
    manifest = Manifest.load(export_dir)
    check_artifacts(export_dir, manifest)  # a graph from disk is untrusted until parsed and checked
    if not manifest.artifacts:
        raise ToolkitError(f"{export_dir}: the manifest lists no artifacts")
    root = resolve_data_dir(data_dir, manifest.source.data_dir)
    ckpt = source_checkpoint(manifest)
    recipe = Recipe.model_validate(ckpt["recipe"])
    console.print(f"verify: reading the {manifest.dataset} test split through the training pipeline and through the deployed preprocessing")
    x_train, labels = source_for(recipe, root, download=download).test_inputs(limit)
    x_normalized, x_tensor, x_files, deployed_labels, sources = deployed_inputs(manifest, root, limit)
    if not np.array_equal(labels, deployed_labels):
        raise ToolkitError(f"{root}: the {manifest.dataset} test split reads differently through torchvision and through the deployed readers")
    console.print(f"verify: the reference, {recipe.name} in PyTorch, on {len(labels):,} test images")
    ref_logits = batched(torch_runner(model_from_checkpoint(ckpt)), x_train)
    ref_acc = accuracy(ref_logits, labels)

    results, skipped, diagnosis = _check_artifacts(export_dir, manifest, ref_logits, labels, ref_acc, gates, x_tensor, x_files, sources, console)
    report = {
        "export_dir": str(export_dir),
        "dataset": manifest.dataset,
        "images": int(len(labels)),
        "reference": f"pytorch-eager (cpu), {recipe.data.pipeline} pipeline's test transform",
        "reference_acc": ref_acc,
        "verified_on": _verified_on(len(labels), ref_acc),
        # the deployed normalization against the training transform, on the same pixels: 0 means bit for bit
        "input_max_abs_diff": float(np.abs(x_normalized - x_train).max()),
        # the image-file path's model inputs against the tensor path's (pixels, for a uint8-input export)
        "pipeline_input_max_abs_diff": float(np.abs(x_files.astype(np.float64) - x_tensor.astype(np.float64)).max()),
        "pipeline": "each test image as a PNG file in memory -> toolkit.inference.preprocess (decode, prepare, normalize)",
        "results": results,
        "skipped": skipped,
        "passed": bool(results) and all(r["passed"] for r in results),
        # TensorRT's rules, read from each ONNX file (toolkit.core.trt_rules): "ok" or the broken rule; not a gate
        "tensorrt_rules": {art.file: summary(check_file(export_dir / art.file)) for art in manifest.artifacts if art.format == "onnx"},
        **({"diagnosis": diagnosis} if diagnosis else {}),
    }
    _record(export_dir, report, console)
    console.print(parity_table(report))
    for s in skipped:
        console.print(f"[yellow]skipped {s['artifact']}: {s['reason']}[/]")
    for file, found in report["tensorrt_rules"].items():
        console.print(f"verify: {file} for TensorRT: " + ("takes it (operators, Q/DQ, input)" if found == "ok" else f"would refuse it: {found}"))
    console.print(f"verify: wrote {export_dir / 'parity.md'}, parity.json and MODEL_CARD.md; parity recorded in the manifest")
    if not report["passed"] and results:
        console.print(f"[red]error:[/] {failure_line(report)}")
    return report


def _percent(value) -> str:
    return "—" if value is None else f"{value:.2f}%"


def _interval(row: dict) -> str:
    """Delta's confidence interval, e.g. "-0.57 to -0.11" (reports from before it: "—")."""
    found = row.get("delta_ci_pp")
    return "—" if found is None else f"{found[0]:+.2f} to {found[1]:+.2f}"


def parity_markdown(report: dict) -> str:
    lines = [
        f"Reference: {report['reference']}, {report['reference_acc']:.2f}% on {report['images']:,} {report['dataset']} test images.",
        f"Tensor path: the test pixels normalized by the deployed preprocessing (largest difference to the training "
        f"transform's inputs: {report['input_max_abs_diff']:.3g}). Pipeline path: {report['pipeline']} "
        f"(largest difference to the tensor path's inputs: {report['pipeline_input_max_abs_diff']:.3g}).",
        "",
        "| artifact | runtime | accuracy | Δ pp | Δ 95% interval (pp) | agreement | max abs logit diff | pipeline agreement | gate | result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["results"]:
        gate = f"abs Δ ≤ {r['gate']['delta_pp']} pp" + (f", agreement ≥ {r['gate']['agreement']}%" if r["gate"]["agreement"] else "")
        lines.append(
            f"| {r['artifact']} | {r['runtime']} | {r['accuracy']:.2f}% | {r['delta_pp']:+.2f} | {_interval(r)} | {r['agreement']:.2f}% | "
            f"{r['max_abs_logit_diff']:.2e} | {_percent(r.get('pipeline_agreement'))} | {gate} | {'pass' if r['passed'] else 'FAIL'} |"
        )
    for s in report["skipped"]:
        lines.append(f"| {s['artifact']} | — | — | — | — | — | — | — | — | not run: {s['reason']} |")
    rules = report.get("tensorrt_rules") or {}
    if rules:
        lines += ["", "TensorRT's rules, checked on each ONNX file without TensorRT (operators, symmetric Q/DQ, uint8 only cast): "
                  + "; ".join(f"{file}: {found}" for file, found in rules.items()) + "."]
    lines += ["", "Δ 95% interval: the difference the test images can resolve. Only images that one model gets right and the other "
              "wrong carry Δ; the exact McNemar test on them (`parity.json`: `gained`, `lost`, `mcnemar_p`) gives the interval. "
              "An interval that holds 0 means the two are not told apart on these images; the gate itself is on Δ."]
    for file, found in report.get("diagnosis", {}).items():
        lines += ["", f"## Why {file} missed its gate: layer by layer",
                  "", f"{file} against model.fp32.onnx on {found['images']} test images, with ONNX Runtime's QDQ debugging tools "
                  "(signal-to-quantization-noise ratio, dB: higher is better; 20 dB is about 10% noise). "
                  f"Output: {found['output_sqnr_db']:.1f} dB. Where the most is lost (the tensor's own quantization step):",
                  "", "| tensor | op | SQNR here (dB) | SQNR so far (dB) |", "|---|---|---:|---:|"]
        lines += [f"| {r['tensor']} | {r['op']} | {r['local_sqnr_db']:.1f} | {r['sqnr_db']:.1f} |" for r in found["worst"]]
        lines += ["", "| weight | SQNR (dB) |", "|---|---:|"] + [f"| {w['weight']} | {w['sqnr_db']:.1f} |" for w in found["weights"]]
        lines += ["", "What to try: `toolkit export --precision int8 --auto-fallback` keeps the layers that cost the most in float; "
                  "`--calib-method entropy` or `percentile` clips outliers that minmax keeps; `--qat-epochs 1` (or more) fine-tunes the model "
                  "with fake quantization first, at no cost in speed; more training often narrows value ranges."]
    return "\n".join(lines) + "\n"


def parity_table(report: dict) -> Table:
    table = Table(title=f"parity vs. PyTorch ({report['reference_acc']:.2f}% on {report['images']:,} test images)")
    for col in ("artifact", "runtime", "accuracy", "Δ pp", "Δ 95% interval", "agreement", "max |Δlogit|", "pipeline agr.", "result"):
        table.add_column(col, justify="left" if col in ("artifact", "runtime", "result") else "right")
    for r in report["results"]:
        table.add_row(r["artifact"], r["runtime"], f"{r['accuracy']:.2f}%", f"{r['delta_pp']:+.2f}", _interval(r), f"{r['agreement']:.2f}%",
                      f"{r['max_abs_logit_diff']:.2e}", _percent(r.get("pipeline_agreement")), "[green]pass[/]" if r["passed"] else "[red]FAIL[/]")
    return table


def failure_line(report: dict) -> str:
    """One line for a failed verify: which artifacts missed which gate, and what to try."""
    parts, hints = [], set()
    for r in report["results"]:
        if r["passed"]:
            continue
        missed = [] if r["tensor_passed"] else [f"Δ {r['delta_pp']:+.2f} pp, agreement {r['agreement']:.2f}%"]
        if not r.get("pipeline_passed", True):
            missed.append(f"pipeline agreement {r['pipeline_agreement']:.2f}%")
            hints.add("the deployed preprocessing disagrees with training: check the manifest's normalization and input")
        if r["precision"] == "int8" and not r["tensor_passed"]:
            found = report.get("diagnosis", {}).get(r["artifact"])
            if found:
                hints.add(f"{r['artifact']}: {diagnosis_line(found)}")
            hints.add("for int8 try `toolkit export --precision int8 --auto-fallback`, `--qat-epochs 1` or another --calib-method")
        parts.append(f"{r['artifact']} on {r['runtime']} ({'; '.join(missed)})")
    where = Path(report["export_dir"]) / "parity.md"
    return f"parity FAILED for {', '.join(parts)}; see {where}" + (f"; {'; '.join(sorted(hints))}" if hints else "")
