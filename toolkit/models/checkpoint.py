"""Checkpoints and run directories.

A checkpoint is a plain dict of tensors and JSON-like values, written atomically (temporary
file in the same folder, fsync, rename) and read with ``torch.load(weights_only=True)``, so
loading one never runs code from the file and a run killed mid-write never leaves a torn
``best.pt`` / ``last.pt`` behind.

Reading one is the boundary where a user-given file becomes a model: ``load_checkpoint`` checks
its structure, its recipe and that every weight is finite, and ``model_from_checkpoint`` builds
the model; whatever is wrong with the file is one ToolkitError line that names it.
"""

from __future__ import annotations

import pickle
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from toolkit.core.errors import ToolkitError
from toolkit.core.files import atomic_write, make_dir, plain_name, reading, write_error

FORMAT = "toolkit-checkpoint/1"


class Meta(BaseModel):
    """The fields of ``meta`` that readers rely on (more are kept as they are)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    dataset: str = Field(min_length=1, max_length=200)
    classes: list[str] = Field(min_length=1, max_length=100_000)
    mean: list[float] = Field(min_length=1, max_length=4)
    std: list[float] = Field(min_length=1, max_length=4)
    input_shape: list[int] = Field(min_length=3, max_length=3)
    params: int = Field(ge=0)


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


def non_finite(state: dict) -> list[str]:
    """The names of the floating-point tensors in ``state`` that hold NaN or infinity."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_checkpoint(ref: str | Path) -> dict:
    path = resolve_checkpoint(ref)
    with reading(path, "readable checkpoint"):
        if not zipfile.is_zipfile(path):
            raise ToolkitError(f"{path}: not a readable checkpoint (not a complete PyTorch zip archive)")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" in str(exc).lower():  # torch's safe unpickler met a class or function
                raise ToolkitError(f"{path}: refused to load: it holds objects other than weights and plain values, which could run code") from None
            raise
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise ToolkitError(f"{path}: not a toolkit checkpoint (no '{FORMAT}' marker)")
        _check_contents(ckpt, path)
    ckpt["path"] = str(path)
    return ckpt


def _check_contents(ckpt: dict, path: Path) -> None:
    from toolkit.models.recipes import Recipe, format_validation_error

    for key in ("recipe", "model", "meta"):
        if not isinstance(ckpt.get(key), dict):
            raise ToolkitError(f"{path}: not a valid checkpoint ({key!r} is missing)")
    try:
        Recipe.model_validate(ckpt["recipe"])
    except ValidationError as exc:
        raise ToolkitError(format_validation_error(f"{path}: recipe", exc)) from None
    try:
        Meta.model_validate(ckpt["meta"])
    except ValidationError as exc:
        raise ToolkitError(format_validation_error(f"{path}: meta", exc)) from None
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise ToolkitError(f"{path}: not a valid checkpoint (its model state holds values other than tensors)")
    bad = non_finite(ckpt["model"])
    if bad:
        raise ToolkitError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinity ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
                           "this model diverged and cannot be used")


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    from toolkit.models.widths import apply_layer_widths
    from toolkit.models.recipes import Recipe

    with reading(ckpt.get("path", "checkpoint"), "checkpoint for this model"):
        recipe = Recipe.model_validate(ckpt["recipe"])
        model = recipe.build_model(num_classes=len(ckpt["meta"]["classes"]))
        if "layers" in ckpt:  # structured pruning changed some widths
            apply_layer_widths(model, ckpt["layers"], ckpt["model"])
        model.load_state_dict(ckpt["model"])
    return model.eval()


def source_checkpoint(manifest) -> dict:
    """The checkpoint an export was made from, as the manifest pins it (path and sha256): the
    reference that verify and bench hold every artifact against."""
    from toolkit.core.files import sha256_file

    src = manifest.source
    path = Path(src.checkpoint)
    if not path.is_file():
        raise ToolkitError(f"the source checkpoint {path} is gone; parity needs it as the reference")
    if sha256_file(path) != src.sha256:
        raise ToolkitError(f"{path} changed since the export (sha256 differs); export again")
    return load_checkpoint(path)


SUMMARY = "summary.json"  # written when a run has ended (its RunResult): a run without it is training, or stopped


def unfinished(run_dir: Path) -> str | None:
    """Why a run directory is not a finished run (None: finished): still training (its lock is held),
    or stopped before its end (no summary.json; runs from before it: no curves.png either)."""
    from toolkit.core.files import in_use

    if in_use(run_dir):
        return "still training"
    if not (run_dir / SUMMARY).is_file() and not (run_dir / "curves.png").is_file():
        return f"stopped before its last epoch (continue it: toolkit train --resume {run_dir})"
    return None


def latest_run(runs_dir: str | Path = "runs", say=None) -> Path:
    """The most recently written *finished* run directory (``unfinished``): newer runs still training
    or stopped are passed over, each with one line to ``say``; ``say`` also hears which run it is."""
    runs = sorted((p for p in Path(runs_dir).glob("*/") if not p.name.startswith(".") and (p / "best.pt").is_file()),
                  key=lambda p: (p / "best.pt").stat().st_mtime, reverse=True)
    if not runs:
        raise ToolkitError(f"no trained run under {runs_dir}/ (run `toolkit train RECIPE` first, or pass a run directory)")
    for run in runs:
        why = unfinished(run)
        if why is None:
            if say:
                say(f"the latest finished run: {run}")
            return run
        if say:
            say(f"passed over {run}: {why}")
    raise ToolkitError(f"no finished run under {runs_dir}/: the newest, {runs[0]}, is {unfinished(runs[0]).split(' (')[0]}; "
                       "pass a run directory to use its best.pt as it is")


# ----------------------------------------------------------------------------- run directories


def new_run_dir(out: Path, name: str) -> Path:
    """A new, empty ``out/<name>-<timestamp>[-n]``: ``name`` must be a plain name, and two runs
    started in the same second get different directories (mkdir is the arbiter, not a check before it)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = plain_name(f"{name}-{stamp}", "run name")
    make_dir(Path(out), "runs folder")
    for n in range(1, 10_000):
        run_dir = Path(out) / (base if n == 1 else f"{base}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
        except OSError as exc:
            raise write_error(exc, run_dir) from None
    raise ToolkitError(f"cannot find a free run directory name {base}-N under {out}")


def checkpoint_dict(recipe, model: torch.nn.Module, meta: dict, rows: list[dict]) -> dict:
    """What best.pt / last.pt hold: weights, layer widths, the recipe (a ``recipes.Recipe``),
    metadata and metrics (plain values only)."""
    from toolkit.models.widths import layer_widths

    return {
        "format": FORMAT,
        "recipe": recipe.model_dump(mode="json"),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "layers": layer_widths(model),
        "meta": meta,
        "metrics": rows,
    }


def torch_runner(model, device: str = "cpu"):
    """A runner (inference.runtime.Runner: a batch of inputs -> logits) for a model in PyTorch."""

    model = model.to(device).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return run
