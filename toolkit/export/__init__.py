"""`toolkit export`: a trained run becomes artifacts in ``exports/<run-name>/`` plus ``manifest.json``.

Every export works in a staging copy of the export directory and swaps it in only when
everything is written: a failed export leaves the directory as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from rich.console import Console

from toolkit.checkpoint import latest_run, load_checkpoint, model_from_checkpoint
from toolkit.errors import ToolkitError, check_choice
from toolkit.files import confined, locked, plain_name, remove_stale_dirs, remove_stale_temps, umask_mode, write_error
from toolkit.manifest import NAME as MANIFEST_NAME
from toolkit.manifest import artifact_entry, artifact_path, load_manifest, new_manifest, save_manifest, upsert_artifact

FORMATS = ("onnx", "trt", "triton")
STAGING, OLD = ".staging-", ".old-"  # sibling work directories: .<export>.staging-*, .<export>.old-<pid>
PRECISIONS = ("fp32", "fp16", "int8")


def artifact_file(fmt: str, precision: str) -> str:
    return {"onnx": f"model.{precision}.onnx", "trt": f"model.{precision}.engine"}[fmt]


@contextlib.contextmanager
def staged(export_dir: Path) -> Iterator[Path]:
    """A copy of ``export_dir`` to work in; it replaces ``export_dir`` only if the block succeeds.
    Call it holding the directory's lock. Symbolic links are copied as links, never followed."""
    parent = export_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}{STAGING}", dir=parent))
    except OSError as exc:
        raise ToolkitError(f"cannot write into {parent}: {exc.strerror or exc}") from None
    try:
        if export_dir.is_dir():
            shutil.copytree(export_dir, stage, symlinks=True, dirs_exist_ok=True)
        yield stage
        os.chmod(stage, umask_mode(0o777))
        old = None
        if export_dir.exists():
            old = parent / f".{export_dir.name}{OLD}{os.getpid()}"
            os.replace(export_dir, old)
        os.replace(stage, export_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        error = write_error(exc, export_dir) if not isinstance(exc, ToolkitError) else None
        if error is not None:
            raise ToolkitError(f"export into {export_dir} failed: {error}") from None
        raise


def export_name(ckpt: dict, input_dtype: str = "float32") -> str:
    """The export directory's name: the run directory's, which must be a plain name; an export whose
    graphs take uint8 pixels is a separate export, ``<run>-uint8`` (one input spec per manifest)."""
    name = plain_name(Path(ckpt["path"]).resolve().parent.name, f"{ckpt['path']}: run directory name")
    return name if input_dtype == "float32" else plain_name(f"{name}-{input_dtype}", "export name")


def _manifest_for(stage: Path, ckpt: dict, name: str, console: Console, input_dtype: str = "float32") -> dict:
    fresh = new_manifest(ckpt, name, input_dtype)
    if not (stage / MANIFEST_NAME).is_file():
        return fresh
    current = load_manifest(stage)
    if current["source"]["sha256"] != fresh["source"]["sha256"]:
        console.print(f"[yellow]the checkpoint changed since the last export of {name}: earlier artifacts are dropped[/]")
        _drop_artifacts(stage, current)
        return fresh
    return current


def _drop_artifacts(stage: Path, manifest: dict) -> None:
    for art in manifest["artifacts"]:
        artifact_path(stage, art).unlink(missing_ok=True)
    manifest["artifacts"] = []
    manifest.pop("triton", None)
    triton = stage / "triton"  # its models are copies of those artifacts
    if triton.is_symlink():
        triton.unlink()  # a link, never what it points to
    else:
        shutil.rmtree(triton, ignore_errors=True)


def _repads(fp32_entry: dict | None, pad_channels: int | None) -> bool:
    """Whether exporting with ``pad_channels`` must write the existing fp32 ONNX again (None keeps it)."""
    return fp32_entry is not None and pad_channels is not None and fp32_entry.get("pad_channels", 0) != pad_channels


def _ensure_fp32_onnx(stage: Path, manifest: dict, ckpt: dict, pad_channels: int | None, console: Console) -> Path:
    """The fp32 ONNX every other artifact derives from. ``pad_channels`` None keeps the existing
    file's padding; a different value exports it again and drops what was derived from it."""
    from toolkit.export.to_onnx import export_onnx

    path = stage / artifact_file("onnx", "fp32")
    existing = next((a for a in manifest["artifacts"] if a["file"] == path.name), None)
    if _repads(existing, pad_channels):
        console.print(f"[yellow]{path.name} had --pad-channels {existing.get('pad_channels', 0)}; exporting it with {pad_channels} "
                      "drops the artifacts derived from it[/]")
        _drop_artifacts(stage, manifest)
        existing = None
    if existing is None:
        extra = export_onnx(model_from_checkpoint(ckpt), manifest, path, pad_channels=pad_channels or 0)
        upsert_artifact(manifest, artifact_entry(path, "onnx", "fp32", **extra))
    return path


def export(
    ref: str | Path | None = None,
    *,
    fmt: str = "onnx",
    precision: str = "fp32",
    out: str | Path = "exports",
    runs: str | Path = "runs",
    data_dir: str | Path | None = None,
    calib_size: int = 512,
    calib_method: str = "minmax",
    auto_fallback: bool = False,
    int8_activations: str = "int8",
    gate_pp: float | None = None,
    max_batch: int = 256,
    pad_channels: int | None = None,
    input_dtype: str = "float32",
    download: bool = True,
    console: Console | None = None,
) -> dict:
    """Export one artifact (and the fp32 ONNX it derives from); returns its manifest entry.

    ``pad_channels``: see ``_ensure_fp32_onnx``; 0 turns padding off. One export at a time per
    export directory: a second one waits for the first (``files.locked``), so none is ever lost."""
    console = console or Console(stderr=True)
    check_choice("format", fmt, FORMATS)
    check_choice("precision", precision, PRECISIONS)
    check_choice("int8 activation type", int8_activations, ("int8", "uint8"))
    check_choice("input type", input_dtype, ("float32", "uint8"))
    if pad_channels is not None and pad_channels < 0:
        raise ToolkitError(f"--pad-channels must be 0 (off) or a positive multiple, not {pad_channels}")
    if auto_fallback and precision != "int8":
        raise ToolkitError("--auto-fallback applies to --precision int8 only")
    if fmt == "trt" and precision == "int8" and int8_activations != "int8":
        raise ToolkitError("TensorRT's explicit quantization needs symmetric int8 activations: leave --int8-activations at int8")
    if fmt == "trt":
        from toolkit.runtime import trt_missing_reason

        reason = trt_missing_reason()
        if reason:  # say so before any work, and leave exports/ untouched
            raise ToolkitError(f"cannot build a TensorRT engine here: {reason}")
    ckpt = load_checkpoint(ref if ref is not None else latest_run(runs))
    export_dir = Path(out) / export_name(ckpt, input_dtype)
    if (export_dir / MANIFEST_NAME).exists() or (export_dir / MANIFEST_NAME).is_symlink():
        load_manifest(export_dir)  # refuse a broken or hostile export before touching anything
    options = dict(data_dir=data_dir, calib_size=calib_size, calib_method=calib_method, auto_fallback=auto_fallback,
                   int8_activations=int8_activations, gate_pp=gate_pp, pad_channels=pad_channels, download=download, max_batch=max_batch,
                   input_dtype=input_dtype)
    with locked(export_dir, say=console.print):
        _remove_leftovers(export_dir, console)
        if fmt == "triton":
            return _export_triton(ckpt, export_dir, precision, options, console)
        entry = _export_artifact(ckpt, export_dir, fmt, precision, options, console)
    console.print(f"exported {entry['file']} ({entry['bytes']:,} bytes) -> {export_dir}")
    return {**entry, "export_dir": str(export_dir)}


def _remove_leftovers(export_dir: Path, console: Console) -> None:
    """What an export or verify killed mid-way left behind: staging copies, a swapped-out old copy,
    temporary files. Only while holding the export's lock (otherwise they may be another writer's)."""
    name = re.escape(export_dir.name)
    remove_stale_dirs(export_dir.parent, re.compile(rf"^\.{name}{re.escape(STAGING)}[A-Za-z0-9_]{{8}}$|^\.{name}{re.escape(OLD)}[0-9]+$"))
    stale = remove_stale_temps(export_dir)
    if stale:
        console.print(f"removed {len(stale)} temporary file(s) an interrupted run left in {export_dir}")


def _export_artifact(ckpt: dict, export_dir: Path, fmt: str, precision: str, options: dict, console: Console) -> dict:
    """One artifact of ``fmt`` and ``precision`` (and the fp32 ONNX it derives from) into ``export_dir``,
    staged; returns its manifest entry. The caller holds the export's lock."""
    from toolkit.parity import GATES

    with staged(export_dir) as stage:
        manifest = _manifest_for(stage, ckpt, export_dir.name, console, options["input_dtype"])
        fp32_onnx = _ensure_fp32_onnx(stage, manifest, ckpt, options["pad_channels"], console)
        path = stage / artifact_file(fmt, precision)
        extra: dict = {}
        if fmt == "onnx" and precision == "fp16":
            from toolkit.export.to_onnx import convert_fp16

            extra = convert_fp16(fp32_onnx, path)
        elif precision == "int8":
            int8_onnx = stage / artifact_file("onnx", "int8")
            existing = next((a for a in manifest["artifacts"] if a["file"] == int8_onnx.name), None)
            if fmt == "trt" and existing and existing.get("activations", "int8") != "int8":
                raise ToolkitError(f"{int8_onnx.name} has uint8 activations, which TensorRT cannot build from; export --precision int8 again first")
            if fmt == "onnx" or not int8_onnx.is_file():
                from toolkit import quantize

                activations, method = options["int8_activations"], options["calib_method"]
                calib, held_x, held_y = quantize.training_slices(manifest, options["data_dir"], options["calib_size"], download=options["download"])
                if options["auto_fallback"]:
                    gate = options["gate_pp"] if options["gate_pp"] is not None else GATES["int8"]["delta_pp"]
                    fields = quantize.auto_fallback(fp32_onnx, int8_onnx, calib, held_x, held_y, gate, method, console, activations=activations)
                else:
                    fields = quantize.quantize_int8(fp32_onnx, int8_onnx, calib, method, activations=activations)
                upsert_artifact(manifest, artifact_entry(int8_onnx, "onnx", "int8", **fields))
            extra = {}
            if fmt == "trt":
                from toolkit.export.to_trt import build_trt_engine

                extra = build_trt_engine(int8_onnx, path, "int8", manifest, options["max_batch"], confined(stage, "timing.cache", str(export_dir)))
        elif fmt == "trt":
            from toolkit.export.to_trt import build_trt_engine

            extra = build_trt_engine(fp32_onnx, path, precision, manifest, options["max_batch"], confined(stage, "timing.cache", str(export_dir)))
        if not (fmt == "onnx" and precision in ("fp32", "int8")):
            upsert_artifact(manifest, artifact_entry(path, fmt, precision, **extra))
        save_manifest(manifest, stage)
        entry = next(a for a in manifest["artifacts"] if a["file"] == path.name)
    return entry


def _export_triton(ckpt: dict, export_dir: Path, precision: str, options: dict, console: Console) -> dict:
    """Add the ONNX artifact of ``precision`` (exported first if the export lacks it) and any TensorRT
    engine of that precision to the export's Triton model repository, ``<export>/triton/``.
    The caller holds the export's lock."""
    from toolkit.export.to_triton import REPOSITORY, write_triton_model
    from toolkit.files import sha256_file

    source = artifact_file("onnx", precision)
    current = load_manifest(export_dir) if (export_dir / MANIFEST_NAME).is_file() else None
    fresh = current is not None and current["source"]["sha256"] == sha256_file(Path(ckpt["path"]))
    files = {a["file"]: a for a in current["artifacts"]} if fresh else {}
    if source not in files or _repads(files.get(artifact_file("onnx", "fp32")), options["pad_channels"]):
        entry = _export_artifact(ckpt, export_dir, "onnx", precision, options, console)
        console.print(f"exported {entry['file']} ({entry['bytes']:,} bytes) -> {export_dir}")
    with staged(export_dir) as stage:
        manifest = load_manifest(stage)
        graph_source = stage / artifact_file("onnx", "int8" if precision == "int8" else "fp32")
        served = [a for a in manifest["artifacts"] if a["precision"] == precision and a["format"] in ("onnx", "trt")]
        models = manifest.setdefault("triton", {"repository": REPOSITORY, "models": {}})["models"]
        names = []
        for art in served:
            record = write_triton_model(stage, manifest, art, stage / source if art["format"] == "onnx" else graph_source, options["max_batch"])
            models[record["name"]] = record
            names.append(record["name"])
        save_manifest(manifest, stage)
    console.print(f"Triton model{'s' if len(names) > 1 else ''} {', '.join(names)} -> {export_dir / REPOSITORY}")
    return {"format": "triton", "precision": precision, "repository": str(export_dir / REPOSITORY), "models": names, "export_dir": str(export_dir)}
