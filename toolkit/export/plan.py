"""The export plan: a trained run becomes artifacts in ``exports/<run-name>/`` plus ``manifest.json``.

Each artifact is a step (``PLAN``) with the artifact it is made from and one builder (``BUILDERS``)
of one signature; ``export`` makes the chain a request needs. Every export works in a staging copy
of the export directory and swaps it in only when everything is written: a failed export leaves the
directory as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rich.console import Console

from toolkit.models.checkpoint import latest_run, load_checkpoint, model_from_checkpoint
from toolkit.core.errors import ToolkitError, check_choice
from toolkit.core.files import (SWAP_ASIDE, aside_pattern, confined, exchange, locked, plain_name, recover_swap, remove_stale_dirs,
                                remove_stale_temps, umask_mode, write_error)
from toolkit.core.onnx_io import load_checked
from toolkit.core.parity import settle_report
from toolkit.core.manifest import NAME as MANIFEST_NAME
from toolkit.core.manifest import MAX_BATCH, TARGET_LINES, TARGETS, Artifact, Manifest, TritonModel
from toolkit.core.model_card import write_model_card

FORMATS = ("onnx", "trt", "openvino", "executorch", "web", "triton")
STAGING, OLD = ".staging-", SWAP_ASIDE  # sibling work directories: .<export>.staging-*, .<export>.old-<pid>
PRECISIONS = ("fp32", "fp16", "int8")


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
        if export_dir.exists() and exchange(stage, export_dir):  # one atomic step: no moment without the export
            shutil.rmtree(stage, ignore_errors=True)  # the old copy now (a kill here: the next writer removes it)
            return
        old = None
        if export_dir.exists():  # no atomic exchange here: two renames, and readers finish a swap a kill interrupted
            old = parent / f".{export_dir.name}{OLD}{os.getpid()}"
            os.replace(export_dir, old)
        try:
            os.replace(stage, export_dir)
        except BaseException:
            if old is not None:  # put the only complete copy back (a kill here: recover_swap does it)
                with contextlib.suppress(OSError):
                    os.replace(old, export_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        error = write_error(exc, export_dir) if not isinstance(exc, ToolkitError) else None
        if error is not None:
            raise ToolkitError(f"export into {export_dir} failed: {error}") from None
        raise


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class ExportOptions:
    """What `toolkit export` was asked for beyond the artifact (checked in ``export``)."""

    data_dir: str | Path | None = None
    calib_size: int = 512
    calib_method: str = "minmax"
    auto_fallback: bool = False
    int8_activations: str = "int8"
    target: str = "cpu"  # where the int8 file is meant to run: TARGETS
    int8_weights: int = 8
    qat_epochs: int = 0
    qat_images: int | None = None
    gate_pp: float | None = None
    pad_channels: int | None = None
    download: bool = True
    max_batch: int = MAX_BATCH
    trt_arch: tuple[str, ...] | None = None  # TensorRT-RTX's target GPU architectures (None: its default)
    ort_web: str | Path | None = None  # --format web: a folder with ONNX Runtime Web's files (None: the cache, else npm)


@dataclass(frozen=True)
class Job:
    """One export under way: where it writes (``stage``, swapped in as ``export_dir``), what from."""

    stage: Path
    export_dir: Path
    manifest: Manifest
    ckpt: dict
    options: ExportOptions
    console: Console


@dataclass(frozen=True)
class Step:
    """One artifact an export can hold and the one it derives from (None: the checkpoint)."""

    file: str
    format: str
    precision: str
    source: str | None


# What every artifact is made from. A rewritten artifact whose bytes changed drops everything
# derived from it (transitively, Triton models included): see ``_drop_stale``.
PLAN = {s.file: s for s in (
    Step("model.fp32.onnx", "onnx", "fp32", None),
    Step("model.fp16.onnx", "onnx", "fp16", "model.fp32.onnx"),
    Step("model.int8.onnx", "onnx", "int8", "model.fp32.onnx"),
    Step("model.fp32.engine", "trt", "fp32", "model.fp32.onnx"),
    Step("model.fp16.engine", "trt", "fp16", "model.fp32.onnx"),
    Step("model.int8.engine", "trt", "int8", "model.int8.onnx"),
    Step("model.fp32.xml", "openvino", "fp32", "model.fp32.onnx"),
    Step("model.fp16.xml", "openvino", "fp16", "model.fp32.onnx"),
    Step("model.int8.xml", "openvino", "int8", "model.int8.onnx"),
    Step("model.fp32.pte", "executorch", "fp32", None),  # from the checkpoint, as the fp32 ONNX file
    Step("model.int8.pte", "executorch", "int8", None),
    Step("web", "web", "fp32", "model.fp32.onnx"),  # folders: the browser's page with the model it runs
    Step("web-int8", "web", "int8", "model.int8.onnx"),
)}


def artifact_file(fmt: str, precision: str) -> str:
    return next(s.file for s in PLAN.values() if s.format == fmt and s.precision == precision)


def chain(file: str) -> list[Step]:
    """The steps that make ``file``, its sources first."""
    steps = []
    while file is not None:
        steps.insert(0, PLAN[file])
        file = PLAN[file].source
    return steps


def export_name(ckpt: dict, input_dtype: str = "float32", layout: str = "NCHW") -> str:
    """The export directory's name: the run directory's, which must be a plain name. An export
    whose graphs take another input is a separate export (one input spec per manifest):
    ``<run>-uint8``, ``<run>-nhwc``, ``<run>-uint8-nhwc``."""
    name = plain_name(Path(ckpt["path"]).resolve().parent.name, f"{ckpt['path']}: run directory name")
    suffix = ("-uint8" if input_dtype == "uint8" else "") + ("-nhwc" if layout == "NHWC" else "")
    return plain_name(name + suffix, "export name")


def _manifest_for(stage: Path, ckpt: dict, name: str, console: Console, input_dtype: str, layout: str) -> Manifest:
    fresh = Manifest.new(ckpt, name, input_dtype, layout)
    if not (stage / MANIFEST_NAME).is_file():
        return fresh
    current = Manifest.load(stage)
    if current.source.sha256 != fresh.source.sha256:
        console.print(f"[yellow]the checkpoint changed since the last export of {name}: earlier artifacts are dropped[/]")
        for art in current.artifacts:
            Manifest.path(stage, art).unlink(missing_ok=True)
            for companion in art.companions:
                confined(stage, companion, f"{art.file}'s companion file").unlink(missing_ok=True)
        _remove_triton(stage)
        return fresh
    return current


def _remove_triton(stage: Path, model: str | None = None) -> None:
    """The Triton repository (or one model of it): copies of artifacts. A link is removed, never followed."""
    target = confined(stage, "triton", str(stage)) if model is None else confined(stage / "triton", model, str(stage / "triton"))
    if target.is_symlink() or target.is_file():
        target.unlink()
    else:
        shutil.rmtree(target, ignore_errors=True)


def _drop_stale(stage: Path, manifest: Manifest, console: Console, changed: set[str] = frozenset()) -> None:
    """Drop every artifact whose source (``PLAN``) is gone or has changed since it was made, then
    every Triton model whose artifact is gone or changed; repeated until nothing more goes.
    ``changed``: files just rewritten with other bytes (for entries that predate ``source_sha256``)."""
    while True:
        stale = []
        for art in manifest.artifacts:
            step = PLAN.get(art.file)
            if step is None or step.source is None:
                continue
            source, made_from = manifest.artifact(step.source), art.get("source_sha256")
            if source is None or (made_from != source.sha256 if made_from is not None else step.source in changed):
                stale.append(art)
        if not stale:
            break
        for art in stale:
            console.print(f"[yellow]{art.file} was made from an earlier {PLAN[art.file].source}: dropped (export it again)[/]")
            gone = Manifest.path(stage, art)
            if gone.is_dir() and not gone.is_symlink():  # a folder artifact (the web page)
                shutil.rmtree(gone)
            else:
                gone.unlink(missing_ok=True)
            for name in art.companions:
                confined(stage, name, f"{art.file}'s companion file").unlink(missing_ok=True)
            manifest.artifacts.remove(art)
    if manifest.triton is None:
        return
    for name, model in list(manifest.triton.models.items()):
        art = manifest.artifact(model.source)
        copied = (model.model_extra or {}).get("sha256")  # of the copy, the artifact's bytes
        if art is None or (copied is not None and copied != art.sha256):
            console.print(f"[yellow]Triton model {name} was a copy of an earlier {model.source}: dropped[/]")
            _remove_triton(stage, name)
            del manifest.triton.models[name]
    if not manifest.triton.models:
        manifest.triton = None
        _remove_triton(stage)


def _target(fmt: str, target: str | None, int8_activations: str | None) -> tuple[str, str]:
    """(the deployment target, the int8 activation type): --format trt means TensorRT, else a CPU;
    --int8-activations, where given, must suit the target."""
    target = target or ("tensorrt" if fmt == "trt" else "cpu")
    check_choice("target", target, TARGETS)
    if fmt == "trt" and target != "tensorrt":
        raise ToolkitError("--format trt builds for TensorRT: leave --target out (or give --target tensorrt)")
    if int8_activations is None:
        return target, "int8" if target == "tensorrt" else "uint8"
    check_choice("int8 activation type", int8_activations, ("int8", "uint8"))
    if target == "tensorrt" and int8_activations != "int8":
        raise ToolkitError("TensorRT's explicit quantization needs symmetric int8 activations: leave --int8-activations out (or at int8)")
    return target, int8_activations


def _checked(fmt: str, precision: str, input_dtype: str, layout: str, *, pad_channels, auto_fallback, int8_weights,
             qat_epochs, qat_images) -> str:
    """Refuse a bad combination of export options in one line, before any work; the layout, upper-cased."""
    check_choice("format", fmt, FORMATS)
    check_choice("precision", precision, PRECISIONS)
    offered = [p for p in PRECISIONS if (fmt, p) in BUILDERS]
    if fmt != "triton" and precision not in offered:
        raise ToolkitError(f"--format {fmt} has no {precision}: {' | '.join(offered)}")
    check_choice("int8 weight bits", int8_weights, (8, 7))
    check_choice("input type", input_dtype, ("float32", "uint8"))
    layout = layout.upper()
    check_choice("input layout", layout, ("NCHW", "NHWC"))
    if pad_channels is not None and pad_channels < 0:
        raise ToolkitError(f"--pad-channels must be 0 (off) or a positive multiple, not {pad_channels}")
    if auto_fallback and precision != "int8":
        raise ToolkitError("--auto-fallback applies to --precision int8 only")
    if qat_epochs < 0 or (qat_images is not None and qat_images < 1):
        raise ToolkitError("--qat-epochs must be 0 (off) or more, --qat-images 1 or more")
    if qat_epochs and precision != "int8":
        raise ToolkitError("--qat-epochs applies to --precision int8 only")
    return layout


def _ort_web(fmt: str, ort_web: str | Path | None, console: Console) -> Path | None:
    """For --format web: ONNX Runtime Web's files found and checked (fetched once) before exports/ is touched."""
    if fmt != "web":
        if ort_web is not None:
            raise ToolkitError("--ort-web applies to --format web only")
        return None
    from toolkit.export.to_web import ort_web_files

    return ort_web_files(ort_web, say=console.print)


def _trt_builder(fmt: str, trt_arch: tuple[str, ...] | None, console: Console) -> tuple[str, ...] | None:
    """For --format trt: which builder builds, for which GPUs, said before any work (none: one line,
    and exports/ untouched); the checked --trt-arch."""
    if fmt != "trt":
        if trt_arch is not None:
            raise ToolkitError("--trt-arch applies to --format trt only")
        return None
    from toolkit.export.to_trt import builder_line, check_archs

    trt_arch = check_archs(trt_arch)
    console.print(builder_line(trt_arch))
    return trt_arch


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
    int8_activations: str | None = None,
    target: str | None = None,
    int8_weights: int = 8,
    qat_epochs: int = 0,
    qat_images: int | None = None,
    gate_pp: float | None = None,
    max_batch: int = MAX_BATCH,
    trt_arch: tuple[str, ...] | None = None,
    ort_web: str | Path | None = None,
    pad_channels: int | None = None,
    input_dtype: str = "float32",
    layout: str = "NCHW",
    download: bool = True,
    console: Console | None = None,
) -> dict:
    """Export one artifact (and what it derives from, ``PLAN``), or a Triton model repository of a
    precision's artifacts; returns its manifest entry. One staged transaction per call.

    ``pad_channels``: None keeps the existing fp32 ONNX's padding, 0 turns padding off. One export at a
    time per export directory: a second one waits for the first (``files.locked``), so none is ever lost."""
    console = console or Console(stderr=True)
    target, int8_activations = _target(fmt, target, int8_activations)
    layout = _checked(fmt, precision, input_dtype, layout, pad_channels=pad_channels, auto_fallback=auto_fallback,
                      int8_weights=int8_weights, qat_epochs=qat_epochs, qat_images=qat_images)
    trt_arch, ort_web = _trt_builder(fmt, trt_arch, console), _ort_web(fmt, ort_web, console)
    ckpt = load_checkpoint(ref if ref is not None else latest_run(runs, say=lambda line: console.print(f"export: {line}")))
    export_dir = Path(out) / export_name(ckpt, input_dtype, layout)
    if (export_dir / MANIFEST_NAME).exists() or (export_dir / MANIFEST_NAME).is_symlink():
        Manifest.load(export_dir)  # refuse a broken or hostile export before touching anything
    options = ExportOptions(data_dir=data_dir, calib_size=calib_size, calib_method=calib_method, auto_fallback=auto_fallback,
                            int8_activations=int8_activations, target=target, int8_weights=int8_weights, qat_epochs=qat_epochs, qat_images=qat_images,
                            gate_pp=gate_pp, pad_channels=pad_channels, download=download, max_batch=max_batch,
                            trt_arch=trt_arch, ort_web=ort_web)
    with locked(export_dir, say=console.print):
        _remove_leftovers(export_dir, console)
        with staged(export_dir) as stage:
            manifest = _manifest_for(stage, ckpt, export_dir.name, console, input_dtype, layout)
            job = Job(stage, export_dir, manifest, ckpt, options, console)
            if fmt == "triton":
                result = _triton(job, precision)
            else:
                art = _make(job, artifact_file(fmt, precision), target=True)
                result = {**art.model_dump(mode="json", exclude_none=True), "export_dir": str(export_dir)}
            _drop_stale(stage, manifest, console)
            manifest.save(stage)
            write_model_card(stage, manifest, shown_as=export_dir)
    if fmt != "triton":
        console.print(f"exported {result['file']} ({result['bytes']:,} bytes) -> {export_dir}")
    return result


def _remove_leftovers(export_dir: Path, console: Console) -> None:
    """What an export or verify killed mid-way left behind: a swapped-out old copy (moved back when
    it is the only copy, else removed), staging copies, temporary files, a parity report written
    but not committed (dropped) or committed but not yet in place (finished). Only while holding
    the export's lock (otherwise they may be another writer's)."""
    name = re.escape(export_dir.name)
    restored = recover_swap(export_dir, aside_pattern(export_dir.name))
    if restored:
        console.print(f"[yellow]{restored}[/]")
    remove_stale_dirs(export_dir.parent, re.compile(rf"^\.{name}{re.escape(STAGING)}[A-Za-z0-9_]{{8}}$"))
    stale = remove_stale_temps(export_dir)
    if stale:
        console.print(f"removed {len(stale)} temporary file(s) an interrupted run left in {export_dir}")
    if (export_dir / MANIFEST_NAME).is_file():
        settled = settle_report(export_dir, Manifest.load(export_dir, verify_files=False))
        if settled:
            console.print(f"[yellow]{settled}[/]")


def _make(job: Job, file: str, target: bool) -> Artifact:
    """``file`` in ``stage`` with what it derives from (``chain``): a source is made only when it is
    missing (the fp32 ONNX also when ``pad_channels`` asks for another padding); the ``target`` file
    is always made again. Returns its manifest entry."""
    stage, manifest, ckpt, console = job.stage, job.manifest, job.ckpt, job.console
    for step in chain(file):
        existing = manifest.artifact(step.file)
        is_target = target and step.file == file
        if step.source is None and step.format != "onnx":  # made from the checkpoint: made again when asked for
            if existing is not None and not is_target:
                continue
        elif step.source is None:
            wanted = job.options.pad_channels
            repad = existing is not None and wanted is not None and existing.get("pad_channels", 0) != wanted
            if existing is not None and not repad:
                continue
            if repad:
                derived = [a.file for a in manifest.artifacts if a.file != step.file]
                console.print(f"[yellow]{step.file} had --pad-channels {existing.get('pad_channels', 0)}, exporting it with {wanted}: "
                              + (f"{', '.join(derived)} (made from it) will be dropped; export them again[/]" if derived else "nothing else is affected[/]"))
            if wanted:
                console.print(f"[yellow]--pad-channels {wanted}: zero channels make every file larger (their weights are stored) for a "
                              "lower batch-1 latency on ONNX Runtime's CPU kernels; the outputs stay the same[/]")
        elif existing is not None and not is_target and not _remake_for_tensorrt(job, step, existing):
            continue
        _check_trt_source(manifest, step)
        if step.source is not None:  # a file from disk is untrusted until parsed and checked against the manifest
            load_checked(stage / step.source, manifest.input, len(manifest.classes), shown_as=job.export_dir / step.source)
        console.print(f"export: {step.file} ({step.format} {step.precision}"
                      + (f", from {step.source})" if step.source else f", from {Path(ckpt['path']).name})"))
        path = stage / step.file
        fields = BUILDERS[step.format, step.precision](job, step, path)
        if step.source is not None:
            fields["source_sha256"] = manifest.artifact(step.source).sha256
        made = manifest.upsert(Artifact.of(path, step.format, step.precision, **fields))
        _drop_stale(stage, manifest, console, changed={step.file} if existing is not None and existing.sha256 != made.sha256 else set())
    return manifest.artifact(file)


def _remake_for_tensorrt(job: Job, step: Step, existing: Artifact) -> bool:
    """Whether the int8 ONNX file must be quantized again before a TensorRT engine is built from it:
    it is the CPU target's (uint8 activations), which TensorRT cannot take."""
    if step.precision != "int8" or step.format != "onnx" or job.options.target != "tensorrt" or existing.get("activations", "int8") == "int8":
        return False
    job.console.print(f"[yellow]{step.file} has uint8 activations (the CPU target's format), which TensorRT cannot build from: "
                      "quantizing it again for TensorRT (symmetric int8), in place of the CPU file[/]")
    return True


def _check_trt_source(manifest: Manifest, step: Step) -> None:
    if step.format == "trt" and step.precision == "int8":
        source = manifest.artifact(step.source)
        if source is not None and source.get("activations", "int8") != "int8":
            raise ToolkitError(f"{step.source} has uint8 activations, which TensorRT cannot build from; export --precision int8 again first")


def _fp32_onnx(job: Job, step: Step, path: Path) -> dict:
    from toolkit.export.to_onnx import export_onnx, onnx_metadata

    m = job.manifest
    return export_onnx(model_from_checkpoint(job.ckpt), path, m.input, m.output.name, m.normalization, onnx_metadata(m),
                       pad_channels=job.options.pad_channels or 0)


def _fp16_onnx(job: Job, step: Step, path: Path) -> dict:
    from toolkit.export.to_onnx import convert_fp16

    return convert_fp16(job.stage / step.source, path)


def _int8_onnx(job: Job, step: Step, path: Path) -> dict:
    """Static QDQ int8 calibrated on training images; after QAT when asked; with auto-fallback when asked."""
    from toolkit.core.parity import GATES
    from toolkit.export import quantize

    o, source = job.options, job.stage / step.source
    chosen = o.int8_activations == ("int8" if o.target == "tensorrt" else "uint8")  # the target's own, not --int8-activations
    job.console.print("export: " + (TARGET_LINES[o.target] if chosen else f"int8 for {o.target} with {o.int8_activations} activations (--int8-activations)"))
    calib, held_x, held_y = quantize.training_slices(job.manifest, o.data_dir, o.calib_size, download=o.download)
    qat_fields = {}
    if o.qat_epochs:
        source, qat_fields = _qat_source(job)
    # the CPU target pads its own file's conv channels (quantize.CPU_PAD_CHANNELS) unless --pad-channels 0
    bits = dict(activations=o.int8_activations, weight_bits=o.int8_weights,
                pad_channels=quantize.CPU_PAD_CHANNELS if o.target == "cpu" and o.pad_channels != 0 else 0)
    if o.auto_fallback:
        gate = o.gate_pp if o.gate_pp is not None else GATES["int8"]["delta_pp"]
        fields = quantize.auto_fallback(source, path, calib, held_x, held_y, gate, o.calib_method, job.console, **bits)
    else:
        fields = quantize.quantize_int8(source, path, calib, o.calib_method, **bits)
    if qat_fields:
        source.unlink(missing_ok=True)
    if fields.get("padded_convs") or fields.get("padded_conv_inputs"):
        inputs = fields.get("padded_conv_inputs", 0)
        job.console.print(f"export: {fields['padded_convs']} conv(s) of the int8 file zero-padded to {fields['pad_channels']} channels"
                          + (f" and {inputs} conv input(s) to a multiple of {quantize.CPU_PAD_CONV_INPUTS}" if inputs else "")
                          + ", where ONNX Runtime's CPU integer kernels are fast (the outputs stay the same; --pad-channels 0: not padded)")
    return {**fields, **qat_fields, "target": o.target}


def _engine(job: Job, step: Step, path: Path) -> dict:
    """A TensorRT engine. TensorRT-RTX builds strongly typed networks (no precision flags): its fp16
    engine is built from the fp32 ONNX converted to fp16 as the fp16 artifact is, in a temporary file."""
    from toolkit.export.to_onnx import convert_fp16
    from toolkit.export.to_trt import build_trt_engine, builder

    source = job.stage / step.source
    typed = step.precision == "fp16" and builder()[2]
    if typed:
        converted = job.stage / ".rtx.fp16.onnx"
        convert_fp16(source, converted)
        source = converted
    log = job.export_dir.parent / f"{job.export_dir.name}.{step.precision}.trt-build.log"  # outside the stage: kept on failure
    try:
        built = build_trt_engine(source, path, step.precision, job.manifest.input.name, tuple(job.manifest.input.shape[1:]),
                                 job.options.max_batch, confined(job.stage, "timing.cache", str(job.export_dir)), source_name=step.source,
                                 archs=job.options.trt_arch, log_path=log)
        log.unlink(missing_ok=True)  # an earlier failure's log
        return built
    finally:
        if typed:
            source.unlink(missing_ok=True)


# one builder per (format, precision) of the plan, one signature: the job, the step, the path to write;
# each returns the fields of its manifest entry
def _executorch(job: Job, step: Step, path: Path) -> dict:
    from toolkit.export import quantize
    from toolkit.export.to_executorch import export_executorch

    m = job.manifest
    if (m.input.dtype, m.input.layout) != ("float32", "NCHW"):
        raise ToolkitError("--format executorch takes the main export's input (float32 NCHW): leave --input and --layout out")
    calib = None
    if step.precision == "int8":
        calib, _, _ = quantize.training_slices(m, job.options.data_dir, job.options.calib_size, holdout=0, download=job.options.download)
    return export_executorch(model_from_checkpoint(job.ckpt), path, m.chw, job.options.max_batch, calib=calib)


def _web(job: Job, step: Step, path: Path) -> dict:
    from toolkit.export.to_web import write_web

    if path.exists():  # made again: the stage's copy of the old page goes
        shutil.rmtree(path)
    return write_web(path, job.stage / step.source, job.manifest, step.precision, job.options.ort_web, say=job.console.print)


def _openvino(job: Job, step: Step, path: Path) -> dict:
    from toolkit.export.to_openvino import convert_to_openvino

    return convert_to_openvino(job.stage / step.source, path, step.precision)


BUILDERS = {
    ("onnx", "fp32"): _fp32_onnx,
    ("onnx", "fp16"): _fp16_onnx,
    ("onnx", "int8"): _int8_onnx,
    ("trt", "fp32"): _engine,
    ("trt", "fp16"): _engine,
    ("trt", "int8"): _engine,
    ("openvino", "fp32"): _openvino,
    ("openvino", "fp16"): _openvino,
    ("openvino", "int8"): _openvino,
    ("executorch", "fp32"): _executorch,
    ("executorch", "int8"): _executorch,
    ("web", "fp32"): _web,
    ("web", "int8"): _web,
}


def _qat_source(job: Job) -> tuple[Path, dict]:
    """Quantization-aware fine-tuning (``toolkit.export.qat``) of the checkpoint's model, exported as a float
    ONNX file beside the fp32 artifact (same input, normalization, metadata and channel padding) for
    the int8 export to quantize; returns its path and the manifest's ``qat`` record. Fine-tuning uses
    the activation ranges that this export's own calibration gives the model before tuning."""
    stage, manifest, ckpt, o, console = job.stage, job.manifest, job.ckpt, job.options, job.console
    from toolkit.export import qat, quantize
    from toolkit.export.to_onnx import export_onnx, onnx_metadata

    images = quantize.fine_tuning_images(manifest, o.data_dir, o.calib_size, limit=o.qat_images, download=o.download)
    calib = images[: o.calib_size]
    fp32 = manifest.artifact("model.fp32.onnx")
    path = stage / ".qat.fp32.onnx"  # removed once quantized; a failed export discards the whole stage

    def to_onnx(model) -> None:
        export_onnx(model, path, manifest.input, manifest.output.name, manifest.normalization, onnx_metadata(manifest),
                    pad_channels=fp32.get("pad_channels", 0) if fp32 is not None else 0)

    model = model_from_checkpoint(ckpt)
    to_onnx(qat.fold_batchnorm(model)[0])
    probe = stage / ".qat.ranges.onnx"
    quantize.quantize_int8(path, probe, calib, o.calib_method, activations=o.int8_activations, weight_bits=o.int8_weights)
    ranges = quantize.activation_ranges(probe)
    probe.unlink()
    epochs = o.qat_epochs
    console.print(f"qat: fine-tuning with fake quantization for {epochs} epoch{'' if epochs == 1 else 's'} on {len(images):,} training images")
    tuned, report = qat.fine_tune(model, images, calib, epochs=epochs, activations=o.int8_activations,
                                  weight_bits=o.int8_weights, ranges=ranges, console=console)
    to_onnx(tuned)
    return path, {"qat": report}


def _triton(job: Job, precision: str) -> dict:
    """Add the ONNX artifact of ``precision`` (made first if the export lacks it) and any TensorRT
    engine of that precision to the export's Triton model repository, ``<export>/triton/``."""
    stage, export_dir, manifest, console = job.stage, job.export_dir, job.manifest, job.console
    from toolkit.export.to_triton import REPOSITORY, left_out, write_triton_model
    from toolkit.core.manifest import Triton

    source = artifact_file("onnx", precision)
    _make(job, source, target=manifest.artifact(source) is None)
    graph_source = stage / artifact_file("onnx", "int8" if precision == "int8" else "fp32")
    served = [a for a in manifest.artifacts if a.precision == precision and a.format in ("onnx", "trt")]  # the ONNX model stands for IR and .pte
    if manifest.triton is None:
        manifest.triton = Triton(repository=REPOSITORY, models={})
    names = []
    for art in served:
        why = left_out(art)
        if why:
            console.print(f"[yellow]{why}[/]")
            continue
        onnx_file = stage / source if art.format == "onnx" else graph_source
        load_checked(onnx_file, manifest.input, len(manifest.classes), shown_as=export_dir / onnx_file.name)  # as every derivation
        record = write_triton_model(stage, manifest.source.recipe, manifest.classes, art,
                                    stage / source if art.format == "onnx" else graph_source, job.options.max_batch, manifest.input)
        manifest.triton.models[record["name"]] = TritonModel(**record)
        names.append(record["name"])
    console.print(f"Triton model{'s' if len(names) > 1 else ''} {', '.join(names)} -> {export_dir / REPOSITORY}")
    return {"format": "triton", "precision": precision, "repository": str(export_dir / REPOSITORY), "models": names, "export_dir": str(export_dir)}
