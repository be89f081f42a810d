"""The artifacts of one or more exports, ready to classify images: what the demo, its API and
`toolkit predict` all run, so that they give the same answer for the same file.

An image goes through ``toolkit.inference.preprocess`` (decode, prepare, normalize) and then the artifact's
runner; the manifest says which preparation, normalization and class names apply. Torch-free,
except for a checkpoint served in PyTorch (``Catalog.from_checkpoint``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.core.datasets import preparation_for
from toolkit.core.environment import cpu_info, cpu_line
from toolkit.core.errors import ToolkitError, shown
from toolkit.core import speed
from toolkit.core.files import finish_interrupted_swaps
from toolkit.core.manifest import NAME as MANIFEST_NAME
from toolkit.core.manifest import Artifact, Manifest
from toolkit.inference.preprocess import model_pixels, to_input
from toolkit.inference.runtime import Runner, check_engine_compatible, make_runner, not_runnable_reason, runtimes_for

RUNTIME_PREFERENCE = ("tensorrt", "ort-cuda", "ort-cpu", "openvino-cpu", "executorch-cpu")
# the demo's tabs: drawings of digits, and pictures
MNIST_FAMILY, CIFAR_FAMILY = "mnist", "cifar"


def int8_warning(manifest: Manifest, here: dict | None = None) -> str | None:
    """A warning line when the export's int8 artifacts were verified on a CPU whose integer-kernel
    features (VNNI, AVX-512, AMX, ...) differ from this one's: ONNX Runtime picks other int8 kernels
    there, and accuracy can differ (seen: 2 pp between an AMD CPU without VNNI and others)."""
    verified = manifest.parity
    int8 = [a.file for a in manifest.artifacts if a.precision == "int8" and a.parity]
    if not int8 or verified is None or verified.cpu_features is None:
        return None
    here = here or cpu_info()
    if set(verified.cpu_features) == set(here["features"]):
        return None
    return (f"warning: {manifest.name}/{', '.join(int8)} was verified on {verified.machine}; this CPU is {cpu_line(here)}: int8 "
            f"kernels differ between them, run `toolkit verify` here to know its accuracy on this machine")


def family(manifest: Manifest) -> str:
    return MNIST_FAMILY if preparation_for(manifest.dataset, manifest.chw[0]) == "digit" else CIFAR_FAMILY


@dataclass
class Entry:
    key: str  # "<export name>/<artifact file>": what a client passes to choose it
    export_dir: Path
    manifest: Manifest
    artifact: Artifact
    runtime: str

    @property
    def label(self) -> str:
        art = self.artifact
        parity = art.parity.get(self.runtime) or next(iter(art.parity.values()), None)
        checked = f", parity {parity.accuracy:.2f}% (Δ {parity.delta_pp:+.2f})" if parity else ", parity not checked"
        if parity and not parity.passed:
            checked += ", FAILED its parity gate"
        return f"{self.key} [{art.precision}, {self.runtime}{checked}]"  # the file name says the format


@dataclass
class Catalog:
    """Every servable artifact under the given export folders, with a runner loaded on first use."""

    entries: dict[str, Entry] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "<key>: why it is not served here"
    warnings: list[str] = field(default_factory=list)  # about int8 files: verified on another kind of CPU, slower than fp32
    notices: list[str] = field(default_factory=list)  # about the records: one ignored (bench.json), one that contradicts itself
    threads: int | None = None  # ONNX Runtime's intra-op threads (None: one per core)
    serving: bool = False  # a server's sessions: threads that do not spin between requests (runtime.ort_runner)
    _runners: dict[str, Runner] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dirs(cls, dirs: list[Path]) -> "Catalog":
        catalog = cls()
        for export_dir in find_exports(dirs):
            try:
                manifest = Manifest.load(export_dir)  # the schema, confined artifact names, every artifact's sha256
            except ToolkitError as exc:  # one broken or hostile export does not take the others down
                catalog.skipped.append(f"{export_dir}: {exc}")
                continue
            warning = int8_warning(manifest)
            if warning:
                catalog.warnings.append(warning)
            catalog.notices.extend(f"warning: {manifest.name}/{line}" for line in manifest.contradictions)
            for art in manifest.artifacts:
                key = f"{manifest.name}/{art.file}"
                if art.format == "web":  # a page the browser runs: `toolkit serve` serves its files at /web/
                    continue
                runtimes = runtimes_for(art)
                if not runtimes:
                    why = not_runnable_reason(art)
                    catalog.skipped.append(f"{key}: {why}")
                    continue
                if art.format == "trt":  # an engine runs only on the TensorRT version and GPU it was built for
                    try:
                        check_engine_compatible(Manifest.path(export_dir, art))
                    except ToolkitError as exc:
                        catalog.skipped.append(f"{key}: {exc}")
                        continue
                runtime = next(r for r in RUNTIME_PREFERENCE if r in runtimes)
                catalog.entries[key] = Entry(key, export_dir, manifest, art, runtime)
        # serving order, fixed once: main exports (float32 NCHW input) before input variants made after
        # them (`--input uint8`, `--layout NHWC`), newest first; within one, the fastest artifact that
        # passed its parity gate by the export's latest bench on this machine, then fp32 before lower precisions
        rank = {"fp32": 0, "fp16": 1, "int8": 2}
        dirs = {e.export_dir for e in catalog.entries.values()}
        newest = {d: -(d / MANIFEST_NAME).stat().st_mtime for d in dirs}
        fastest = {d: catalog._measured(d) for d in dirs}

        def variant(e: Entry) -> bool:
            return (e.manifest.input.dtype, e.manifest.input.layout) != ("float32", "NCHW")

        ordered = sorted(catalog.entries.values(), key=lambda e: (variant(e), newest[e.export_dir], e.manifest.name,
                                                                  e.artifact.file != fastest[e.export_dir], rank.get(e.artifact.precision, 9), e.artifact.file))
        catalog.entries = {e.key: e for e in ordered}
        if not catalog.entries:
            where = ", ".join(str(d) for d in dirs)
            raise ToolkitError(f"nothing to serve under {where}: run `toolkit train` and `toolkit export` first"
                               + (f" ({'; '.join(catalog.skipped)})" if catalog.skipped else ""))
        return catalog

    def _measured(self, export_dir: Path) -> str | None:
        """The export's fastest artifact that passed its parity gate, by its latest bench if that ran on
        this machine (else None: fp32 first); warns of int8 files that are slower than fp32 here."""
        report = speed.load(export_dir, warn=self.notices.append)
        if report is None or not speed.same_machine(report, cpu_info()):
            return None
        served = [e for e in self.entries.values() if e.export_dir == export_dir]
        name = served[0].manifest.name if served else export_dir.name
        for file in speed.slower_than_fp32(report):
            if any(e.artifact.file == file for e in served):  # of what is served here (not the browser's page)
                self.warnings.append(f"{name}/{speed.slower_line(file, report)} (by the latest toolkit bench)")
        passed = {e.artifact.file for e in served if e.artifact.parity and all(p.passed for p in e.artifact.parity.values())}
        return speed.fastest(report, passed, batch=1)

    def keys(self, family_name: str | None = None) -> list[str]:
        """Keys in serving order (main exports before input variants, newest first; the fastest passing
        artifact, then fp32 before lower precisions), of one family or all."""
        return [k for k, e in self.entries.items() if family_name is None or family(e.manifest) == family_name]

    def entry(self, key: str | None) -> Entry:
        if not key:
            return next(iter(self.entries.values()))
        if "/" not in key:  # a file name alone: the served export's artifact of that name, if only one has it
            known = list(self.entries) + [line.split(": ", 1)[0] for line in self.skipped]
            named = [k for k in known if k.rsplit("/", 1)[-1] == key]
            if len(named) > 1:
                raise ToolkitError(f"{shown(key)} is in several exports; name one: {', '.join(named)}")
            key = named[0] if named else key
        if key not in self.entries:
            why = next((line[len(key) + 2:] for line in self.skipped if line.startswith(f"{key}: ")), None)
            if why is not None:  # it exists, and cannot run here: say why, not "unknown"
                raise ToolkitError(f"{shown(key)} cannot run here: {why}; served here: {', '.join(self.keys())}")
            raise ToolkitError(f"unknown artifact {shown(key)}; served here: {', '.join(self.keys())}")
        return self.entries[key]

    def runner(self, entry: Entry) -> Runner:
        if entry.key not in self._runners:
            self._runners[entry.key] = make_runner(entry.export_dir, entry.artifact, entry.runtime, self.threads,
                                                    classes=len(entry.manifest.classes), serving=self.serving)
        return self._runners[entry.key]

    def add(self, entry: Entry, runner: Runner | None = None) -> None:
        """Serve one more entry (``runner``: one already made, e.g. a checkpoint in PyTorch)."""
        self.entries[entry.key] = entry
        if runner is not None:
            self._runners[entry.key] = runner

    def classify(self, image, key: str | None = None, top_k: int = 3) -> "Prediction":
        (result,) = self.classify_many([image], key, top_k)
        if isinstance(result, ToolkitError):
            raise result
        return result

    def classify_many(self, images: list, key: str | None = None, top_k: int = 3, batch: int = 1,
                      done: Callable[[int], None] | None = None) -> list["Prediction | ToolkitError"]:
        """Each image through the deployed preprocessing, then the artifact, ``batch`` images per run.
        An image that cannot be read or prepared is its ToolkitError in the list; the others are still
        classified. ``done(n)`` is called as images are finished (progress)."""
        entry = self.entry(key)
        run = self.runner(entry)
        classes = entry.manifest.classes
        results: list[Prediction | ToolkitError | None] = [None] * len(images)
        for start in range(0, len(images), batch):
            t0 = time.perf_counter()
            ready = []
            for i in range(start, min(start + batch, len(images))):
                try:
                    pixels = model_pixels(images[i], entry.manifest)
                    ready.append((i, pixels, to_input(pixels, entry.manifest)))
                except ToolkitError as exc:
                    results[i] = exc
            if ready:
                t1 = time.perf_counter()
                out = run(np.concatenate([x for _, _, x in ready]))
                t2 = time.perf_counter()
                if out.shape != (len(ready), len(classes)):
                    raise ToolkitError(f"{entry.key} gives outputs of shape {out.shape}, not one score per class ({len(classes)})")
                n = len(ready)
                for (i, pixels, _), logits in zip(ready, out):
                    results[i] = Prediction(top_classes(logits, classes, top_k), entry, pixels,
                                            model_ms=(t2 - t1) * 1e3 / n, total_ms=(t2 - t0) * 1e3 / n)
            if done is not None:
                done(min(start + batch, len(images)) - start)
        return results


def top_classes(logits: np.ndarray, classes: list[str], top_k: int) -> dict[str, float]:
    """Softmax probabilities of the ``top_k`` best classes, best first."""
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return {str(classes[i]): float(probs[i]) for i in np.argsort(-probs, kind="stable")[:top_k]}


@dataclass
class Prediction:
    top: dict[str, float]  # class name -> probability, best first
    entry: Entry
    pixels: np.ndarray  # what the model was given, before normalization
    model_ms: float
    total_ms: float

    @property
    def best(self) -> str:
        return next(iter(self.top))

    def summary(self) -> str:
        return (f"**{self.best}** ({self.top[self.best]:.1%}) · runtime `{self.entry.runtime}` · "
                f"model {self.model_ms:.2f} ms · with preprocessing {self.total_ms:.2f} ms · `{self.entry.key}`")


def find_exports(dirs: list[Path]) -> list[Path]:
    """Export folders: each given folder that has a manifest, or its sub-folders that do."""
    found: list[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.exists():  # an export whose swap a kill interrupted: its only copy lies aside
            finish_interrupted_swaps(d.parent, d.name)
        if not d.is_dir():
            raise ToolkitError(f"{d}: no such export folder")
        if (d / MANIFEST_NAME).is_file():
            found.append(d)
        else:  # names starting with '.' are an export's staging copies
            finish_interrupted_swaps(d)
            found.extend(sorted(p.parent for p in d.glob(f"*/{MANIFEST_NAME}") if not p.parent.name.startswith(".")))
    return found


