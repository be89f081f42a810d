"""`toolkit predict`: labels for image files, folders (recursively) and globs.

From an export it runs exactly what the demo runs (``toolkit.inference.catalog``: the deployed
preprocessing, then the artifact's runner) and needs no torch. From a run directory or a
checkpoint it runs the checkpoint in PyTorch behind the same preprocessing. A file that
cannot be read is one error row with its reason; the others are still predicted.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from pathlib import Path

from rich.console import Console

from toolkit.inference.catalog import Catalog, Entry
from toolkit.core.errors import ToolkitError
from toolkit.core.files import atomic_write, finish_interrupted_swaps
from toolkit.core.manifest import NAME as MANIFEST_NAME
from toolkit.core.manifest import latest_export
from toolkit.inference.preprocess import IMAGE_SUFFIXES
from toolkit.core.progress import Progress

CHECKPOINT_NAMES = ("best.pt", "last.pt")


def is_model_ref(path: str | Path) -> bool:
    """An export directory, a run directory or a checkpoint file: what predict takes its model from."""
    p = Path(path)
    if not p.exists():  # an export whose swap a kill interrupted: its only copy lies aside
        finish_interrupted_swaps(p.parent, p.name)
    if p.is_dir():
        return (p / MANIFEST_NAME).is_file() or any((p / n).is_file() for n in CHECKPOINT_NAMES)
    return p.suffix == ".pt" and p.is_file()


def collect_inputs(inputs: list[str]) -> list[tuple[str, str | None]]:
    """(path, why it cannot be read or None) for every input: files as given, folders walked
    recursively for image files (hidden ones and symlinked folders skipped), globs expanded."""
    found: list[tuple[str, str | None]] = []

    def walk(folder: str) -> None:
        images = []
        for parent, dirs, files in os.walk(folder):  # does not follow symlinked folders
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            images += [os.path.join(parent, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
        if not images:
            found.append((folder, "no image files in this folder"))
        found.extend((p, None) for p in sorted(images))

    for item in inputs:
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                found.append((item, "no file matches this pattern"))
            for m in matches:
                walk(m) if os.path.isdir(m) else found.append((m, None))
        elif os.path.isdir(item):
            walk(item)
        elif os.path.exists(item):
            found.append((item, None))
        else:
            found.append((item, "no such file"))
    return found


def _checkpoint_catalog(ref: Path) -> Catalog:
    """A catalog of one entry: the checkpoint in PyTorch (torch needed only here)."""
    from toolkit.models.checkpoint import load_checkpoint, model_from_checkpoint
    from toolkit.core.manifest import Artifact, Manifest
    from toolkit.models.checkpoint import torch_runner

    ckpt = load_checkpoint(ref)
    path = Path(ckpt["path"])
    manifest = Manifest.new(ckpt, path.parent.name)
    # not an export's artifact (no schema format for it): the checkpoint itself, described in memory
    artifact = Artifact.model_construct(file=path.name, format="pytorch", precision="fp32", parity={})
    catalog = Catalog()
    catalog.add(Entry(f"{path.parent.name}/{path.name}", path.parent, manifest, artifact, "pytorch-eager"),
                torch_runner(model_from_checkpoint(ckpt)))
    return catalog


def load_catalog(model: Path | None, exports: Path = Path("exports"), threads: int | None = None, say=None) -> Catalog:
    if model is None:
        model = latest_export(exports, say=say)
    model = Path(model)
    if model.is_dir() and (model / MANIFEST_NAME).is_file():
        catalog = Catalog.from_dirs([model])
        catalog.threads = threads
        return catalog
    if is_model_ref(model):
        if threads:
            import torch

            torch.set_num_threads(threads)
        return _checkpoint_catalog(model)
    raise ToolkitError(f"{model}: neither an export directory (with {MANIFEST_NAME}) nor a run directory or checkpoint")


def predict(model: Path | None, inputs: list[str], *, artifact: str | None = None, top_k: int = 1, batch: int = 1,
            exports: Path = Path("exports"), threads: int | None = None, console: Console | None = None) -> list[dict]:
    """One row per input image: file, label, probability, the top-k classes, and the artifact that
    answered; or file and error."""
    console = console or Console(stderr=True)
    if not inputs:
        raise ToolkitError("no images given: pass image files, folders or glob patterns")
    catalog = load_catalog(model, exports, threads, say=lambda line: console.print(f"predict: {line}", soft_wrap=True, markup=False))
    entry = catalog.entry(artifact)
    for line in catalog.notices + (catalog.warnings if entry.artifact.precision == "int8" else []):
        console.print(line, soft_wrap=True, markup=False)
    items = collect_inputs(inputs)
    readable = [path for path, why in items if why is None]
    console.print(f"predict: {len(readable):,} image(s) with {entry.label}", soft_wrap=True, markup=False)
    with Progress(console, unit="images") as progress:
        task = progress.add_task("predict", total=len(readable))
        results = iter(catalog.classify_many(readable, entry.key, top_k=top_k, batch=batch, done=lambda n: progress.advance(task, n)))
    rows = []
    for path, why in items:
        result = ToolkitError(why) if why is not None else next(results)
        if isinstance(result, ToolkitError):
            rows.append({"file": path, "label": None, "probability": None, "top": {}, "artifact": entry.key, "error": str(result)})
        else:
            rows.append({"file": path, "label": result.best, "probability": result.top[result.best], "top": result.top,
                         "artifact": entry.key, "error": None})
    return rows


def write_csv(rows: list[dict], path: Path, top_k: int) -> None:
    """file, label, probability, top-k label/probability pairs, error: one line per image."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["file", "label", "probability", *[c for i in range(1, top_k + 1) for c in (f"top{i}", f"p{i}")], "error"])
    for r in rows:
        pairs = [v for name, p in r["top"].items() for v in (name, repr(p))]
        pairs += [""] * (2 * top_k - len(pairs))
        out.writerow([r["file"], r["label"] or "", "" if r["probability"] is None else repr(r["probability"]), *pairs, r["error"] or ""])
    with atomic_write(Path(path), "w") as f:
        f.write(buf.getvalue())


def rows_table(rows: list[dict]):
    from rich.markup import escape
    from rich.table import Table

    table = Table()
    for col in ("file", "label", "probability", "top classes"):
        table.add_column(col, justify="right" if col == "probability" else "left")
    for r in rows:
        if r["error"]:
            table.add_row(escape(r["file"]), "[red]error[/]", "", escape(r["error"]))
        else:
            top = ", ".join(f"{k} {v:.1%}" for k, v in r["top"].items())
            table.add_row(escape(r["file"]), escape(r["label"]), f"{r['probability']:.1%}", escape(top))
    return table
