"""`exports/<run>/manifest.json`: the one description of an export that every reader uses.

It lists each artifact with format, precision, sha256 and size, and once for the whole
export the input spec, normalization, class names and the source checkpoint's sha256.
verify / bench / the demo read shapes, preprocessing and labels from here, never re-derive them.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from toolkit.files import atomic_write, sha256_file
from toolkit.errors import ToolkitError

FORMAT = "toolkit-manifest/1"
NAME = "manifest.json"


def new_manifest(ckpt: dict, name: str) -> dict:
    meta = ckpt["meta"]
    recipe = ckpt["recipe"]
    return {
        "format": FORMAT,
        "name": name,
        "model": recipe["model"]["name"],
        "dataset": meta["dataset"],
        "input": {"name": "input", "shape": ["batch", *meta["input_shape"]], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": ["batch", len(meta["classes"])]},
        # a uint8 image x becomes ((x / 255) - mean) / std, per channel
        "normalization": {"scale": 1 / 255, "mean": meta["mean"], "std": meta["std"]},
        "classes": meta["classes"],
        "source": {
            "checkpoint": str(Path(ckpt["path"]).resolve()),
            "sha256": sha256_file(Path(ckpt["path"])),
            "recipe": recipe["name"],
            "params": meta["params"],
            "test_acc": meta.get("test_acc"),
        },
        "artifacts": [],
    }


def artifact_entry(path: Path, fmt: str, precision: str, **extra) -> dict:
    return {
        "file": path.name,
        "format": fmt,
        "precision": precision,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def upsert_artifact(manifest: dict, entry: dict) -> None:
    """Replace the artifact with the same file name, or add it."""
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["file"] != entry["file"]] + [entry]


def load_manifest(export_dir: str | Path, verify_files: bool = True) -> dict:
    path = Path(export_dir) / NAME
    if not path.is_file():
        raise ToolkitError(f"no {NAME} in {export_dir} (run `toolkit export` first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ToolkitError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ToolkitError(f"{path}: not a toolkit manifest")
    if verify_files:
        for art in manifest["artifacts"]:
            f = Path(export_dir) / art["file"]
            if not f.is_file():
                raise ToolkitError(f"{path}: artifact {art['file']} is missing")
            if f.stat().st_size != art["bytes"] or sha256_file(f) != art["sha256"]:
                raise ToolkitError(f"{f}: sha256 does not match the manifest (file changed or corrupted)")
    manifest["dir"] = str(Path(export_dir))
    return manifest


def save_manifest(manifest: dict, export_dir: Path) -> None:
    data = {k: v for k, v in manifest.items() if k != "dir"}
    with atomic_write(Path(export_dir) / NAME, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def latest_export(exports_dir: str | Path = "exports") -> Path:
    found = [p.parent for p in Path(exports_dir).glob(f"*/{NAME}")]
    if not found:
        raise ToolkitError(f"no export under {exports_dir}/ (run `toolkit export` first, or pass an export directory)")
    return max(found, key=lambda p: (p / NAME).stat().st_mtime)
