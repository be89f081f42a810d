"""The training loop (layer 2): data, model, optimizer, scheduler, loop, checkpoint — top to bottom.
`toolkit train` (toolkit.train.run) runs it on a recipe; `toolkit prune` fine-tunes with it; `toolkit
eval` uses its evaluation and loaders.

A run directory ``runs/<recipe>-<timestamp>/`` holds ``best.pt`` and ``last.pt`` (weights,
the recipe, metrics, class names, normalization, input shape), ``metrics.csv`` and
``curves.png``. ``last.pt`` also carries optimizer, scheduler and RNG state, so ``--resume``
ends where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import Subset

from toolkit.data import loaders as data_mod
from toolkit.data.sources import Source, source_for
from toolkit.train import engine as step_engine
from toolkit.train import logs
from toolkit.core import speed
from toolkit.models.checkpoint import SUMMARY, checkpoint_dict, load_checkpoint, model_from_checkpoint, new_run_dir, non_finite, save_checkpoint
from toolkit.core.errors import ToolkitError, check_choice
from toolkit.core.files import locked, reading, remove_stale_temps
from toolkit.models.registry import count_params
from toolkit.core.progress import Progress
from toolkit.models.recipes import MAX_SEED, Recipe

# torch.compile modes; "reduce-overhead" also captures the step in CUDA graphs on a GPU
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


class PiecewiseConstantLR(LRScheduler):
    """Learning rate ``values[i]`` from step ``boundaries[i-1]`` on (Keras PiecewiseConstantDecay)."""

    def __init__(self, optimizer, boundaries: list[int], values: list[float], last_epoch: int = -1):
        self.boundaries, self.values = list(boundaries), list(values)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        i = sum(self.last_epoch >= b for b in self.boundaries)
        return [self.values[i] for _ in self.optimizer.param_groups]


def build_optimizer(recipe: Recipe, model: torch.nn.Module, fused: bool = True) -> torch.optim.Optimizer:
    """SGD, fused (one kernel per step for every parameter; the step engine needs it to read its
    learning rate from a device tensor, and the eager loop uses the same so the two agree exactly).
    ``fused=False``: torch's default implementation, for several processes: fused SGD under DDP on
    the CPU (gloo) trained fine4 to 41% where the default reached 86-90% (2 epochs, 10,000 images,
    tests/train/test_train.py; cause not established), and several processes train with the eager loop."""
    o = recipe.optimizer
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov,
                           fused=fused or None)


def build_scheduler(recipe: Recipe, optimizer) -> tuple[object | None, str]:
    """The scheduler and when it steps: 'epoch', 'plateau' (epoch, on test loss) or 'step'."""
    s = recipe.scheduler
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, s.step_size, s.gamma), "epoch"
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=s.mode, factor=s.factor, patience=s.patience), "plateau"
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.t_max, eta_min=s.eta_min), "epoch"
    if s.name == "piecewise":
        for group in optimizer.param_groups:
            group["lr"] = s.values[0]
        return PiecewiseConstantLR(optimizer, s.boundaries, s.values), "step"
    return None, "none"


def _init_distributed(dev: torch.device) -> tuple[int, int]:
    """(rank, world size): joins the process group that torchrun describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ToolkitError("--device cuda: no CUDA GPU is visible to PyTorch (use --device cpu or auto)")
    if choice not in ("cpu", "cuda"):
        raise ToolkitError(f"--device must be auto, cpu or cuda, not {choice!r}")
    return torch.device(choice)


def progress_bar(console: Console) -> Progress:
    """A bar on a terminal, plain lines in a log (``toolkit.core.progress``)."""
    return Progress(console, unit="batches")


@torch.no_grad()
def evaluate(model, loader, device, *, autocast: bool = False, progress: Progress | None = None,
             label: str = "test") -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Mean loss, accuracy (%), all predictions and all labels."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    preds, labels = [], []
    task = progress.add_task(label, total=len(loader)) if progress else None
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        preds.append(out.argmax(1))
        labels.append(y)
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    preds_t, labels_t = torch.cat(preds).cpu(), torch.cat(labels).cpu()
    totals = torch.stack([loss_sum.float().cpu(), (preds_t == labels_t).sum().float(), torch.tensor(float(len(labels_t)))])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)  # each rank scored its own shard of the test set
    loss, correct, n = totals.tolist()
    return loss / n, 100.0 * correct / n, preds_t, labels_t


def build_loaders(source: Source, dev: torch.device, loader_rng: torch.Generator, *, workers: int = 0,
                  train_limit: int | None = None, test_limit: int | None = None, shard: tuple[int, int] = (0, 1),
                  console: Console | None = None):
    """Train, test and validation loaders for the source's recipe and pipeline, the class names and
    the dataset's facts; ``shard=(rank, world)`` splits them across processes. ``console`` hears
    what the source reads first (an image folder's decoding and bad files)."""
    recipe = source.recipe
    source.prepare(console)
    spec = source.facts()
    if source.tensor_pipeline:
        from toolkit.data.fast import TensorLoader

        (x, y, classes), (xt, yt, _) = source.tensors(train=True), source.tensors(train=False)
        x, y, xt, yt = x[:train_limit], y[:train_limit], xt[:test_limit], yt[:test_limit]
        kept, held = validation_split(len(x), recipe)
        norm = {"mean": spec.mean, "std": spec.std}
        val_loader = None
        if held is not None:
            val_loader = TensorLoader(x[held], y[held], recipe.data.test_batch_size, normalization=norm, generator=None, shuffle=False,
                                      device=dev, shard=shard)
            x, y = x[kept], y[kept]
        train_loader = TensorLoader(x, y, recipe.data.batch_size, normalization=norm, generator=loader_rng, shuffle=True,
                                    augment=recipe.data.augment, device=dev, shard=shard)
        test_loader = TensorLoader(xt, yt, recipe.data.test_batch_size, normalization=norm, generator=None, shuffle=False, device=dev, shard=shard)
        return train_loader, test_loader, val_loader, classes, spec
    train_ds, test_ds = source.dataset(train=True), source.dataset(train=False)
    classes = source.class_names(train_ds)
    if train_limit:
        train_ds = Subset(train_ds, range(min(train_limit, len(train_ds))))
    if test_limit:
        test_ds = Subset(test_ds, range(min(test_limit, len(test_ds))))
    kept, held = validation_split(len(train_ds), recipe)
    val_loader = None
    if held is not None:
        # the held-out images get the test transform (normalization only), not the training augmentations
        val_ds = Subset(source.dataset(train=True, augment=False), held.tolist())
        val_loader = make_loader_for_eval(val_ds, recipe.data.test_batch_size, dev, workers=workers)
        train_ds = Subset(train_ds, kept.tolist())
    rank, world = shard
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=recipe.seed, drop_last=True)
        train_loader = torch.utils.data.DataLoader(train_ds, batch_size=recipe.data.batch_size, sampler=sampler, num_workers=workers,
                                                   worker_init_fn=data_mod._seed_worker if workers else None, pin_memory=dev.type == "cuda")
        test_ds = Subset(test_ds, range(rank, len(test_ds), world))
    else:
        train_loader = data_mod.make_loader(train_ds, recipe.data.batch_size, shuffle=True, generator=loader_rng, workers=workers, pin=dev.type == "cuda")
    return train_loader, make_loader_for_eval(test_ds, recipe.data.test_batch_size, dev, workers=workers), val_loader, classes, spec


def validation_split(n: int, recipe: Recipe) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Indices of the training images kept for training and of those held out for validation
    (``data.validation`` of them, drawn with the recipe's seed; sorted); (None, None) without one."""
    fraction = recipe.data.validation_fraction
    if not fraction:
        return None, None
    n_val = round(n * fraction)
    if not 0 < n_val < n:
        raise ToolkitError(f"data.validation = {fraction} holds out {n_val} of {n:,} training images: choose a fraction that leaves both sides some")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def _num_samples(loader) -> int:
    return loader.num_samples() if hasattr(loader, "num_samples") else len(loader.sampler if hasattr(loader.sampler, "num_replicas") else loader.dataset)


def make_loader_for_eval(ds, batch_size: int, dev: torch.device, workers: int = 0):
    return data_mod.make_loader(ds, batch_size, shuffle=False, generator=None, workers=workers, pin=dev.type == "cuda")


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
        }


def _early_stop(recipe: Recipe, rows: list[dict]) -> bool:
    rule = recipe.early_stopping
    if rule is None or len(rows) < rule.patience:
        return False
    watch = "val" if "val_loss" in rows[-1] else "test"  # a validation split, when the run holds one out
    if rule.monitor == "gap":
        return all(r["train_acc"] - r[f"{watch}_acc"] > rule.max_gap for r in rows[-rule.patience :])
    best_before = min(r[f"{watch}_loss"] for r in rows[: -rule.patience]) if len(rows) > rule.patience else float("inf")
    return min(r[f"{watch}_loss"] for r in rows[-rule.patience :]) >= best_before


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


@dataclass
class Session:
    """Everything set-up gives the epoch loop."""

    recipe: Recipe
    opts: TrainOptions
    dev: torch.device
    world: int
    main_process: bool
    console: Console
    run_dir: Path
    train_loader: object
    test_loader: object
    model: torch.nn.Module
    net: torch.nn.Module  # the module that trains: the model, wrapped for several processes or compiled
    optimizer: torch.optim.Optimizer
    scheduler: object
    sched_when: str
    loader_rng: torch.Generator
    state: TrainState
    meta: dict
    params: int
    val_loader: object = None  # the held-out part of the training split (data.validation), or None
    engine: object = None  # the step engine (toolkit.train.engine.StepEngine), or None for the eager loop
    resumed: bool = False
    busy: str | None = None  # why the machine was busy when training began (the load of other work), or None

    @property
    def on_gpu(self) -> bool:
        return self.dev.type == "cuda"


def _processes(device: str, console: Console) -> tuple[torch.device, int, int, Console]:
    """The device, this process's rank, the number of processes, and a console that only rank 0 prints to."""
    dev = pick_device(device)
    rank, world = _init_distributed(dev)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return dev, rank, world, (console if rank == 0 else Console(file=io.StringIO()))


def _new_run_dir(recipe: Recipe, opts: TrainOptions, main_process: bool, world: int) -> Path:
    """``out/<name>-<time>/`` with the resolved recipe.toml, made by rank 0 and shared with every rank."""
    run_dir = new_run_dir(Path(opts.out), opts.run_name or recipe.name) if main_process else None
    if main_process:
        logs.write_recipe_toml(recipe, run_dir / logs.RECIPE_TOML, train_limit=opts.train_limit, test_limit=opts.test_limit)
    if world > 1:  # every rank needs the path rank 0 made
        holder = [str(run_dir) if main_process else None]
        torch.distributed.broadcast_object_list(holder, src=0)
        run_dir = Path(holder[0])
    return run_dir


def _trained_module(model: torch.nn.Module, opts: TrainOptions, dev: torch.device, world: int) -> torch.nn.Module:
    """The module the steps run: the model, wrapped for several processes (DDP) and/or compiled."""
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)  # averages gradients
    if opts.compile != "none":
        # the first steps pay the compilation (tens of seconds); worth it only for long runs, so opt-in
        net = torch.compile(net, mode=None if opts.compile == "default" else opts.compile)
    return net


def _announce(s: Session) -> None:
    r, opts = s.recipe, s.opts
    s.console.print(
        f"[bold]{r.name}[/]: {r.model.name} ({s.params:,} params) on {r.data.dataset} "
        f"[{_num_samples(s.train_loader):,} train / "
        + (f"{_num_samples(s.val_loader):,} validation (best.pt, early stopping and plateau chosen on it) / " if s.val_loader is not None else "")
        + f"{_num_samples(s.test_loader):,} test per process, {r.data.pipeline} pipeline], "
        f"{r.epochs} epoch{'s' if r.epochs != 1 else ''}, device {s.dev.type}"
        + (f" x {s.world} processes" if s.world > 1 else "") + (f", torch.compile {opts.compile}" if opts.compile != "none" else "") + f" -> {s.run_dir}"
    )


def _set_up(recipe: Recipe | None, opts: TrainOptions, console: Console) -> Session:
    """Recipe (or resumed run) -> device, processes, data, model, optimizer, scheduler, training
    state and run directory. The random generators are seeded and consumed in one fixed order."""
    load_before = speed.load_average()  # other work's load: this process has not started computing yet
    resume = Resume.load(opts.resume) if opts.resume is not None else None
    if resume is not None:
        recipe, opts = resume.options(opts)
    inferred = getattr(recipe, "_inferred", None)  # an image folder's size and channels, read from its images
    recipe = opts.checked(recipe)
    dev, rank, world, console = _processes(opts.device, console)
    if inferred:
        console.print(f"{inferred}; recorded in the run's recipe.toml")

    source = source_for(recipe, opts.data_dir, download=opts.download)
    recipe = source.recipe
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed + rank)  # dropout differs per rank; the shared shuffle comes from loader_rng
    loader_rng = torch.Generator().manual_seed(recipe.seed)
    train_loader, test_loader, val_loader, classes, spec = build_loaders(source, dev, loader_rng, workers=opts.workers, train_limit=opts.train_limit,
                                                                         test_limit=opts.test_limit, shard=(rank, world), console=console)

    model = (opts.model if opts.model is not None else recipe.build_model(spec.num_classes)).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = build_optimizer(recipe, model, fused=world == 1)
    scheduler, sched_when = build_scheduler(recipe, optimizer)
    if resume is not None:
        state, run_dir = resume.state(optimizer, scheduler, loader_rng, dev.type == "cuda", world), resume.run_dir
    else:
        state, run_dir = TrainState(), _new_run_dir(recipe, opts, rank == 0, world)
    net = _trained_module(model, opts, dev, world)
    engine_name, engine_line = step_engine.choose(opts.engine, loader=train_loader, world=world, compile=opts.compile, dev=dev)
    stepper = None
    if engine_name == "graph":
        stepper = step_engine.StepEngine(net, model, optimizer, train_loader, dev, autocast=dev.type == "cuda", channels_last=dev.type == "cuda",
                                         after_step=opts.after_step)
    params = count_params(model)
    meta = {
        "dataset": recipe.data.dataset,
        "classes": classes,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "input_shape": list(spec.input_shape),
        "params": params,
        "train_limit": opts.train_limit,
        "test_limit": opts.test_limit,
        "validation": recipe.data.validation_fraction,  # best.pt chosen on held-out training images (0: on the test split)
        # the data root later stages (export's int8, verify, eval, prune) default to; an image folder's
        # root, split and seed (its size and channels are the input shape)
        **source.record(),
        **(opts.extra_meta or {}),
    }
    s = Session(recipe, opts, dev, world, rank == 0, console, run_dir, train_loader, test_loader, model, net, optimizer, scheduler,
                sched_when, loader_rng, state, meta, params, val_loader, stepper, resumed=resume is not None,
                busy=speed.busy(load_before, torch.get_num_threads(), []))
    _announce(s)
    console.print(engine_line)
    return s


def queue_epoch(s: Session, epoch: int, progress) -> tuple:
    """The step engine's epoch, queued on the device (nothing waits for it here)."""
    task = progress.add_task(f"epoch {epoch + 1}/{s.recipe.epochs}", total=len(s.train_loader))
    lrs = step_engine.lr_per_step(s.optimizer, s.scheduler, s.sched_when, len(s.train_loader))
    queued = s.engine.train_epoch(lrs, progress, task)
    progress.remove_task(task)
    news = s.engine.news()
    if news:
        s.console.print(f"[yellow]warning:[/] {news}")
    return queued


def finish_epoch(s: Session, queued: tuple) -> tuple[float, float]:
    """The queued epoch's mean training loss and accuracy (%): waits for the device."""
    loss_sum, correct, seen = queued
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


def train_one_epoch(s: Session, epoch: int, progress) -> tuple[float, float]:
    """One pass over the training split; the mean training loss and accuracy (%) over every process."""
    train_ds = getattr(s.train_loader, "dataset", None)
    train_ds = getattr(train_ds, "dataset", train_ds)  # the albumentations dataset keeps its own RNG; reach it through a Subset
    if hasattr(train_ds, "reseed") and not getattr(s.train_loader, "num_workers", 0):
        train_ds.reseed(int(torch.randint(2**31 - 1, (1,), generator=s.loader_rng)))
    sampler = getattr(s.train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new shuffle each epoch
        sampler.set_epoch(epoch)
    s.model.train()
    loss_sum = torch.zeros((), device=s.dev)
    correct = torch.zeros((), device=s.dev, dtype=torch.long)
    seen = 0
    task = progress.add_task(f"epoch {epoch + 1}/{s.recipe.epochs}", total=len(s.train_loader))
    for x, y in s.train_loader:
        x, y = x.to(s.dev, non_blocking=True), y.to(s.dev, non_blocking=True)
        if s.on_gpu:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(s.dev.type, dtype=torch.bfloat16, enabled=s.on_gpu):
            out = s.net(x)
            loss = F.cross_entropy(out, y)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
        if s.opts.after_step is not None:
            s.opts.after_step(s.model)
        if s.sched_when == "step":
            s.scheduler.step()
        # accumulate on the device: no host synchronisation per step
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
        progress.advance(task)
    progress.remove_task(task)
    if s.world > 1:  # one synchronisation per epoch: sum the ranks' training metrics
        totals = torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=s.dev)])
        torch.distributed.all_reduce(totals)
        loss_sum, correct, seen = totals[0], totals[1], int(totals[2].item())
    return loss_sum.item() / seen, 100.0 * correct.item() / seen


def _score_epoch(s: Session, epoch: int, train_loss: float, train_acc: float, lr: float, t0: float, progress) -> dict:
    """The epoch's metrics row (test, and validation where held out); steps the epoch's scheduler;
    refuses a diverged run."""
    test_loss, test_acc, _, _ = evaluate(s.model, s.test_loader, s.dev, autocast=s.on_gpu, progress=progress)
    # what chooses best.pt and drives early stopping and the plateau scheduler
    watch_loss, watch_acc = test_loss, test_acc
    if s.val_loader is not None:
        watch_loss, watch_acc, _, _ = evaluate(s.model, s.val_loader, s.dev, autocast=s.on_gpu, progress=progress, label="validation")
    if not (math.isfinite(train_loss) and math.isfinite(watch_loss)) or non_finite(s.model.state_dict()):
        kept = f"the last good checkpoint is {s.run_dir / 'last.pt'}" if s.state.rows else "no checkpoint was written"
        raise ToolkitError(f"training diverged in epoch {epoch + 1}: the loss or the weights became NaN or infinite; "
                           f"{kept} (try a lower learning rate or weight decay)")
    if s.sched_when == "epoch":
        s.scheduler.step()
    elif s.sched_when == "plateau":
        s.scheduler.step(watch_loss)
    row = {"epoch": epoch + 1, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 4), "test_loss": round(test_loss, 6),
           "test_acc": round(test_acc, 4), "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}
    if s.val_loader is not None:
        row.update(val_loss=round(watch_loss, 6), val_acc=round(watch_acc, 4))
    busy, s.busy = s.busy, None  # said once, on this process's first epoch line
    s.console.print(
        f"epoch {row['epoch']:>3}/{s.recipe.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%  "
        + (f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}%  " if "val_acc" in row else "")
        + f"test loss {row['test_loss']:.4f} acc {row['test_acc']:6.2f}%  lr {lr:.3g}  {row['seconds']:.1f}s"
        + (f"  (a busy machine: {busy} before training began; epochs take longer)" if busy else "")
    )
    return row


def _end_epoch(s: Session, epoch: int, row: dict, board):
    """The epoch's checkpoints (best.pt when the watched accuracy, on the validation split or
    without one on the test split, is the best so far; last.pt with the training state),
    metrics.csv and TensorBoard scalars; returns the TensorBoard writer."""
    s.state.rows.append(row)
    watch_acc = row.get("val_acc", row["test_acc"])
    ckpt = checkpoint_dict(s.recipe, s.model, {**s.meta, "epoch": epoch + 1, "test_acc": row["test_acc"]}, s.state.rows)
    if watch_acc > s.state.best_acc:
        s.state.best_acc = watch_acc
        if s.main_process:
            save_checkpoint(ckpt, s.run_dir / "best.pt")
    s.state.epoch = epoch + 1
    ckpt["train_state"] = s.state.save(s.optimizer, s.scheduler, s.loader_rng, s.on_gpu)
    if s.main_process:
        save_checkpoint(ckpt, s.run_dir / "last.pt")
        logs.write_metrics_csv(s.state.rows, s.run_dir / "metrics.csv")
        # after the checkpoints: a run that cannot save them (a full disk) starts no event file either
        if board is None:
            board = logs.tensorboard_writer(s.run_dir, epoch)
        if board is not None:
            logs.board_epoch(board, row)
    return board


def _result(s: Session, seconds: float, stopped_early: bool) -> RunResult:
    rows = s.state.rows
    selected = None
    if rows and "val_acc" in rows[0]:  # best.pt is the first epoch with the highest validation accuracy
        selected = max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))["test_acc"]
    return RunResult(run_dir=s.run_dir, checkpoint=s.run_dir / "best.pt", best_test_acc=max((r["test_acc"] for r in rows), default=0.0),
                     final_test_acc=rows[-1]["test_acc"] if rows else 0.0, epochs=len(rows), seconds=seconds, params=s.params,
                     stopped_early=stopped_early, metrics=rows, main_process=s.main_process, recipe=s.recipe, selected_test_acc=selected)


def fit(recipe: Recipe | None = None, options: TrainOptions | None = None, **kw) -> RunResult:
    """Train ``recipe`` (or continue ``options.resume``) to its end: ``fit_epochs``, driven through."""
    return run_to_end(fit_epochs(recipe, options, **kw))


def run_to_end(epochs):
    """Drive a ``fit_epochs`` generator to its end; its RunResult."""
    while True:
        try:
            next(epochs)
        except StopIteration as stop:
            return stop.value


def fit_epochs(recipe: Recipe | None = None, options: TrainOptions | None = None, *, console: Console | None = None, **kw):
    """Train ``recipe`` (or continue ``options.resume``) as a generator: with the step engine it
    yields once per epoch, when the epoch's training is queued on the device and before anything
    waits for it (so several runs can share a GPU, ``toolkit.train.run.train_seeds``); it returns
    the RunResult. ``kw``: ``TrainOptions`` fields, over ``options``."""
    opts = replace(options or TrainOptions(), **kw)
    s = _set_up(recipe, opts, console or Console(stderr=True))
    recipe, console, start_epoch = s.recipe, s.console, s.state.epoch
    if start_epoch >= recipe.epochs:
        console.print(f"nothing to do: the run already has {start_epoch} epoch{'s' if start_epoch != 1 else ''}")
    started = time.perf_counter()
    stopped_early = False
    board = None
    # one writer per run directory: a second `train --resume` of a running run is refused at once
    with locked(s.run_dir, wait=False) if s.main_process else contextlib.nullcontext(), progress_bar(console) as progress:
        if s.resumed and s.main_process:
            Resume.tidy(s.run_dir, s.state.rows, console)
        for epoch in range(start_epoch, recipe.epochs):
            t0 = time.perf_counter()
            lr = s.optimizer.param_groups[0]["lr"]
            if s.engine is not None:
                queued = queue_epoch(s, epoch, progress)
                yield epoch  # the epoch is queued on the device: another run may queue its own (train_seeds)
                train_loss, train_acc = finish_epoch(s, queued)
            else:
                train_loss, train_acc = train_one_epoch(s, epoch, progress)
            row = _score_epoch(s, epoch, train_loss, train_acc, lr, t0, progress)
            board = _end_epoch(s, epoch, row, board)
            if _early_stop(recipe, s.state.rows):
                console.print(f"early stopping after epoch {epoch + 1} ({recipe.early_stopping.monitor} rule)")
                stopped_early = True
                break
    seconds = time.perf_counter() - started
    if board is not None:
        board.close()
    if s.state.rows and s.main_process:
        logs.plot_curves(s.state.rows, s.run_dir / "curves.png")
    result = _result(s, seconds, stopped_early)
    if s.main_process:  # the run has ended: later verbs' "latest run" may pick it (checkpoint.unfinished)
        logs.write_summary(result.as_json(), s.run_dir / SUMMARY)
    if s.world > 1:
        torch.distributed.barrier()  # rank 0's files are complete before anyone returns
    return result
