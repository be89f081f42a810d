"""The types a training run is described by: the options it runs with (``TrainOptions``), where it stands
between epochs (``TrainState``, saved in last.pt), continuing it (``Resume``) and what it gave (``RunResult``)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from toolkit.core.errors import ToolkitError, check_choice
from toolkit.core.files import reading, remove_stale_temps
from toolkit.models.checkpoint import load_checkpoint, model_from_checkpoint
from toolkit.models.recipes import MAX_SEED, Recipe
from toolkit.train import logs

# torch.compile modes; "reduce-overhead" also captures the step in CUDA graphs on a GPU
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    best_test_acc: float
    final_test_acc: float
    epochs: int
    seconds: float
    params: int
    stopped_early: bool = False
    metrics: list[dict] = field(default_factory=list)
    main_process: bool = True
    recipe: Recipe | None = None  # as the run ran it (overrides applied)
    selected_test_acc: float | None = None  # the test accuracy of best.pt's epoch, when a validation split chose it
    engine: dict | None = None  # the step's settings (toolkit.train.engine.settings)

    def as_json(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.checkpoint),
            "best_test_acc": round(self.best_test_acc, 4),
            "final_test_acc": round(self.final_test_acc, 4),
            "epochs": self.epochs,
            "seconds": round(self.seconds, 2),
            "params": self.params,
            "stopped_early": self.stopped_early,
            **({"selected_test_acc": round(self.selected_test_acc, 4)} if self.selected_test_acc is not None else {}),
            **({"engine": self.engine} if self.engine else {}),
        }


@dataclass(frozen=True)
class TrainOptions:
    """How ``fit_epochs`` runs a recipe: the ``toolkit train`` options, and three in-process ones.

    ``model`` starts from given weights instead of the recipe's fresh model (pruning fine-tunes
    this way), ``after_step(model)`` runs after every optimizer step, ``extra_meta`` is stored in
    the checkpoints. ``compile`` runs the training forward/backward through ``torch.compile`` in
    that mode (``COMPILE_MODES``; checkpoints keep the plain module). ``engine``:
    ``toolkit.train.engine.ENGINES`` (auto: the step engine where the run allows it)."""

    device: str = "auto"
    data_dir: str | Path | None = None
    out: str | Path = "runs"
    epochs: int | None = None
    seed: int | None = None
    resume: str | Path | None = None
    workers: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    download: bool = True
    pipeline: str | None = None
    run_name: str | None = None
    compile: str = "none"
    engine: str = "auto"
    model: torch.nn.Module | None = None
    after_step: Callable[[torch.nn.Module], None] | None = None
    extra_meta: dict | None = None

    def checked(self, recipe: Recipe | None) -> Recipe:
        """The recipe as this run runs it (--epochs, --seed and --pipeline applied); refuses bad options."""
        if recipe is None:
            raise ToolkitError("give a recipe, or --resume RUN_DIR")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ToolkitError(f"--seed must be between 0 and {MAX_SEED:,}, not {self.seed}")
        check_choice("compile mode", self.compile, COMPILE_MODES)
        updates = {k: v for k, v in (("epochs", self.epochs), ("seed", self.seed)) if v is not None}
        if self.pipeline is not None:
            updates["data"] = recipe.data.model_copy(update={"pipeline": check_choice("pipeline", self.pipeline, ("fast", "dataloader"))})
        return recipe.model_copy(update=updates).resolved()


@dataclass
class TrainState:
    """Where a run stands between epochs: saved into ``last.pt`` and restored from it symmetrically
    (the epoch, the best test accuracy, the metric rows, the optimizer, the scheduler and every
    random generator), so a resumed run continues bit for bit."""

    epoch: int = 0
    best_acc: float = -1.0
    rows: list[dict] = field(default_factory=list)

    def save(self, optimizer, scheduler, loader_rng: torch.Generator, on_gpu: bool) -> dict:
        return {
            "epoch": self.epoch,
            "best_acc": self.best_acc,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if on_gpu else None,
            "loader_rng": loader_rng.get_state(),
            "python_rng": random.getstate(),
        }

    @classmethod
    def restore(cls, ckpt: dict, optimizer, scheduler, loader_rng: torch.Generator, on_gpu: bool) -> "TrainState":
        with reading(ckpt["path"], "checkpoint to resume from"):
            ts = ckpt["train_state"]
            optimizer.load_state_dict(ts["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(ts["scheduler"])
            torch.set_rng_state(ts["torch_rng"])
            loader_rng.set_state(ts["loader_rng"])
            random.setstate(ts["python_rng"])
            if on_gpu and ts.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ts["cuda_rng"])
            return cls(epoch=int(ts["epoch"]), best_acc=float(ts["best_acc"]), rows=list(ckpt["metrics"]))


@dataclass
class Resume:
    """Continuing a run from its ``last.pt``: everything resuming changes, in one place. The run keeps
    its recipe, its data limits, its weights and checkpoint extras, its training state and its
    folder; what an interrupted run left behind (temporary files, a metrics.csv one row short) is
    put right before the first new epoch."""

    ckpt: dict

    @classmethod
    def load(cls, where: str | Path) -> "Resume":
        where = Path(where)
        ckpt = load_checkpoint(where / "last.pt" if where.is_dir() else where)
        if not isinstance(ckpt.get("train_state"), dict):
            raise ToolkitError(f"{ckpt['path']}: holds no training state to resume from (resume from a run directory or its last.pt)")
        return cls(ckpt)

    @property
    def run_dir(self) -> Path:
        return Path(self.ckpt["path"]).parent

    def options(self, opts: TrainOptions) -> tuple[Recipe, TrainOptions]:
        """The run's own recipe, and the options with its data limits, weights and checkpoint extras."""
        meta = self.ckpt["meta"]
        recipe = Recipe.model_validate(self.ckpt["recipe"])
        return recipe, replace(opts, train_limit=meta.get("train_limit"), test_limit=meta.get("test_limit"), model=model_from_checkpoint(self.ckpt),
                               extra_meta={k: v for k, v in meta.items() if k in ("pruned",)})

    def state(self, optimizer, scheduler, loader_rng: torch.Generator, on_gpu: bool, world: int) -> TrainState:
        state = TrainState.restore(self.ckpt, optimizer, scheduler, loader_rng, on_gpu)
        for group in optimizer.param_groups:  # as build_optimizer chose for this run, whatever the checkpoint's run used
            group["fused"] = True if world == 1 else None
        return state

    @staticmethod
    def tidy(run_dir: Path, rows: list[dict], console: Console) -> None:
        """Put right what a kill left in the run directory (called under the run's lock)."""
        stale = remove_stale_temps(run_dir)
        if stale:
            console.print(f"removed {len(stale)} temporary file(s) an interrupted run left in {run_dir}")
        # last.pt is written before metrics.csv: a kill between them lost the last row, which the checkpoint holds
        if logs.csv_rows(run_dir / "metrics.csv") != len(rows):
            logs.write_metrics_csv(rows, run_dir / "metrics.csv")
            console.print(f"metrics.csv rebuilt from last.pt ({len(rows)} epochs)")
