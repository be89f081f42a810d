"""The one loader for the records a reader trusts (toolkit.core.records), and bench.json read through it
by everything that reads it (#40): a seeded fuzz over the file's shapes, wrong types, deep nesting and
special files. Never an internal error, never a hang; a malformed optional record is one warning line."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.helpers import quiet
from toolkit.core import records, speed
from toolkit.core.errors import ToolkitError


def test_depth_size_and_kind_are_checked_before_parsing(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}')  # brackets inside a string do not nest
    assert records.load_record(path, "record") == {"a": "[" * 48}
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ToolkitError, match=f"nested more than {records.MAX_DEPTH} deep"):
        records.load_record(path, "record")
    path.write_text(json.dumps({"x": "y" * 2000}))
    with pytest.raises(ToolkitError, match="too large for a record"):
        records.load_record(path, "record", limit=1000)
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(ToolkitError, match="not a regular file"):
        records.load_record(tmp_path / "fifo.json", "record")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    with pytest.raises(ToolkitError, match="not a regular file"):
        records.load_record(tmp_path / "zero.json", "record")
    with pytest.raises(FileNotFoundError):
        records.load_record(tmp_path / "missing.json", "record")
    said = []
    assert records.load_optional(tmp_path / "zero.json", "record", warn=said.append) is None
    assert said == [f"warning: {tmp_path / 'zero.json'}: not a regular file (a folder, FIFO or device), so not a record; ignored"]
    assert records.load_optional(tmp_path / "missing.json", "record", warn=said.append) is None and len(said) == 1


KEYS = ["artifact", "batch", "images_per_s", "precision", "runtime", "vs_fp32", "cpu", "features", "results", "model", "cores"]


def _random_value(rng: np.random.Generator, depth: int = 0):
    """A random JSON value: scalars of every type, non-finite numbers, and (above depth 3: never) lists and objects."""
    kind = int(rng.integers(0, 9 if depth < 3 else 6))
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.random() < 0.5)
    if kind == 2:
        return int(rng.integers(-10**6, 10**6))
    if kind == 3:
        return float(rng.normal() * 1e3)
    if kind == 4:
        return "x" * int(rng.integers(0, 20))
    if kind == 5:
        return float("nan") if rng.random() < 0.5 else 1e308 * 10
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    if kind == 7:
        return {str(k): _random_value(rng, depth + 1) for k in rng.choice(KEYS, int(rng.integers(0, 5)))}
    return {"results": [_random_value(rng, depth + 1)]}


def _bench_case(rng: np.random.Generator, good: dict) -> object:
    """bench.json mutated one way: a field of a row or of the report given a random value, removed, or the whole
    file replaced by a random JSON value."""
    report = json.loads(json.dumps(good))
    choice = rng.integers(0, 4)
    if choice == 0:
        return _random_value(rng)
    target = report if choice == 1 else report["results"][int(rng.integers(0, len(report["results"])))]
    key = str(rng.choice(sorted(target)))
    if choice == 3:
        del target[key]
    else:
        target[key] = _random_value(rng)
    return report


def _special(kind: str, path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "sparse-1.5GB":
        with open(path, "wb") as f:
            f.truncate(1536 << 20)
    elif kind == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "not-utf8":
        path.write_bytes(b"\xff\xfe{}")


def test_a_fuzzed_bench_json_never_breaks_a_reader(fine4_export, tmp_path):
    """#40: rows that are not objects, rows without a batch, images_per_s null, artifact a list, cpu a list,
    100,000 '[', a FIFO, /dev/zero, a 1.5 GB sparse file: each gave predict an internal error, a hang or
    memory growth. Now every reader (serving's catalog and its default, predict, the model card, bench's
    merge) reads it through one loader: a malformed one is ignored with one warning line naming it."""
    from toolkit.check.bench import _merged
    from toolkit.core.environment import cpu_info
    from toolkit.core.manifest import Manifest
    from toolkit.core.model_card import write_model_card
    from toolkit.inference.catalog import Catalog
    from toolkit.serve.predict import predict

    export_dir = tmp_path / fine4_export.name
    shutil.copytree(fine4_export, export_dir)
    here = cpu_info()
    rows = [{"artifact": f, "precision": p, "runtime": "ort-cpu", "batch": b, "iterations": 5, "images_per_s": v, "p50_us": 10.0,
             "p90_us": 11.0, "p99_us": 12.0, "accuracy": None, "delta_pp": None, "agreement": None, "passed": None, "sha256": None, "date": "d"}
            for f, p, v in (("model.fp32.onnx", "fp32", 1000.0), ("model.int8.onnx", "int8", 900.0)) for b in (1, 32)]
    speed.relative(rows)
    good = {"machine": "m", "cpu": here, "date": "d", "warmup": 1, "threads": "default", "busy": None, "results": rows}
    png = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    path = export_dir / speed.BENCH_JSON
    manifest = Manifest.load(export_dir)
    rng = np.random.default_rng(2026)
    cases = [("special", k) for k in ("fifo", "dev-zero", "folder", "sparse-1.5GB", "deep", "not-utf8")] + [("json", i) for i in range(250)]
    ignored = 0
    for kind, case in cases:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
        if kind == "special":
            _special(case, path)
        else:
            path.write_text(json.dumps(_bench_case(rng, good)))
        said: list[str] = []
        report = speed.load(export_dir, warn=said.append)
        assert (report is None) == bool(said) or not path.exists(), (case, said)
        ignored += report is None
        assert all(line.startswith(f"warning: {path}: ") and line.endswith("; ignored") and "\n" not in line for line in said), said
        catalog = Catalog.from_dirs([export_dir])  # the default artifact, its warnings
        assert catalog.entry(None).artifact.file in ("model.fp32.onnx", "model.int8.onnx")
        write_model_card(export_dir, manifest)
        _merged(report, [], [], here, None)
        if kind == "special" or case % 25 == 0:
            assert len(predict(export_dir, [str(png)], console=quiet())) == 1, case
    assert 0 < ignored < len(cases)  # both kinds were tried: malformed and well-formed
