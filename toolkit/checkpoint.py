"""Checkpoints and run directories.

A checkpoint is a plain dict of tensors and JSON-like values, written atomically (temporary
file in the same folder, fsync, rename) and read with ``torch.load(weights_only=True)``, so
loading one never runs code from the file and a run killed mid-write never leaves a torn
``best.pt`` / ``last.pt`` behind.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from toolkit.errors import ToolkitError
from toolkit.files import atomic_write

FORMAT = "toolkit-checkpoint/1"


def save_checkpoint(obj: dict, path: Path) -> None:
    with atomic_write(path) as f:
        torch.save(obj, f)


def resolve_checkpoint(ref: str | Path) -> Path:
    """A checkpoint file, or a run directory (its best.pt)."""
    path = Path(ref)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise ToolkitError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(ref: str | Path) -> dict:
    path = resolve_checkpoint(ref)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ToolkitError(f"{path}: refused to load: it holds objects other than weights and plain values, which could run code") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ToolkitError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ToolkitError(f"{path}: not a toolkit checkpoint (no '{FORMAT}' marker)")
    ckpt["path"] = str(path)
    return ckpt


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    from toolkit.recipes import Recipe

    from toolkit.models import apply_layer_widths

    recipe = Recipe.model_validate(ckpt["recipe"])
    model = recipe.build_model(num_classes=len(ckpt["meta"]["classes"]))
    if "layers" in ckpt:  # structured pruning changed some widths
        apply_layer_widths(model, ckpt["layers"], ckpt["model"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def latest_run(runs_dir: str | Path = "runs") -> Path:
    """The most recently written run directory that has a checkpoint."""
    runs = [p for p in Path(runs_dir).glob("*/") if (p / "best.pt").is_file()]
    if not runs:
        raise ToolkitError(f"no trained run under {runs_dir}/ (run `toolkit train RECIPE` first, or pass a run directory)")
    return max(runs, key=lambda p: (p / "best.pt").stat().st_mtime)
