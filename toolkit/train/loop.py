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
import csv
import io
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import Subset

from toolkit.data import loaders as data_mod
from toolkit.train import engine as step_engine
from toolkit.core.datasets import facts
from toolkit.models.checkpoint import checkpoint_dict, load_checkpoint, model_from_checkpoint, new_run_dir, non_finite, save_checkpoint
from toolkit.core.errors import ToolkitError, check_choice
from toolkit.core.files import atomic_write, locked, reading, remove_stale_temps, resolve_data_dir
from toolkit.models.registry import count_params
from toolkit.core.progress import Progress
from toolkit.models.recipes import MAX_SEED, Recipe

# torch.compile modes; "reduce-overhead" also captures the step in CUDA graphs on a GPU
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")
VAL_FIELDS = ("val_loss", "val_acc")  # with a validation split (data.validation)


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
    tests/test_train.py; cause not established), and several processes train with the eager loop."""
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
def evaluate(model, loader, device, *, autocast: bool = False, progress: Progress | None = None, label: str = "test") -> tuple[float, float, torch.Tensor, torch.Tensor]:
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


def build_loaders(recipe: Recipe, root: Path, dev: torch.device, loader_rng: torch.Generator, *, workers: int = 0,
                  train_limit: int | None = None, test_limit: int | None = None, download: bool = True, shard: tuple[int, int] = (0, 1),
                  console: Console | None = None):
    """Train and test loaders for the recipe's pipeline, the class names and the dataset's facts
    (an image folder's are its own: class folders, size, channels, mean/std); ``shard=(rank, world)``
    splits both across processes. ``console`` hears about an image folder's decoding and bad files."""
    if recipe.data.dataset == "folder":
        with (progress_bar(console) if console is not None else contextlib.nullcontext()) as progress:
            found, spec = data_mod.load_folder(recipe, progress=progress)
        if console is not None:
            console.print(f"image folder {spec.folder}: {len(found.classes)} classes, {len(found.x_train):,} training / "
                          f"{len(found.x_test):,} test images{' (cached)' if found.cached else ''}; mean {_floats(spec.mean)}, std {_floats(spec.std)}")
            if found.bad:
                console.print(f"[yellow]warning:[/] {found.bad_summary()}")
        x, y, classes = torch.from_numpy(found.x_train), torch.from_numpy(found.y_train), list(found.classes)
        xt, yt = torch.from_numpy(found.x_test), torch.from_numpy(found.y_test)
    elif recipe.data.pipeline == "fast":
        spec = facts(recipe.data.dataset)
        x, y, classes = data_mod.split_arrays(spec.name, root, train=True, download=download)
        xt, yt, _ = data_mod.split_arrays(spec.name, root, train=False, download=download)
    if recipe.data.dataset == "folder" or recipe.data.pipeline == "fast":
        from toolkit.data.fast import TensorLoader

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
    spec = facts(recipe.data.dataset)
    train_ds = data_mod.build_dataset(recipe, root, train=True, download=download)
    test_ds = data_mod.build_dataset(recipe, root, train=False, download=download)
    classes = data_mod.class_names(recipe.data.dataset, train_ds)
    if train_limit:
        train_ds = Subset(train_ds, range(min(train_limit, len(train_ds))))
    if test_limit:
        test_ds = Subset(test_ds, range(min(test_limit, len(test_ds))))
    kept, held = validation_split(len(train_ds), recipe)
    val_loader = None
    if held is not None:
        # the held-out images get the test transform (normalization only), not the training augmentations
        val_ds = Subset(_test_view(recipe, root, download), held.tolist())
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


def _test_view(recipe: Recipe, root: Path, download: bool):
    """The training split with the test transform (normalization only): what validation images look like."""
    plain = recipe.model_copy(update={"data": recipe.data.model_copy(update={"augment": type(recipe.data.augment)(library=recipe.data.augment.library)})})
    return data_mod.build_dataset(plain, root, train=True, download=download)


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


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


RECIPE_TOML = "recipe.toml"
TENSORBOARD = "tensorboard"  # the run's TensorBoard event files: tensorboard --logdir runs/


def tensorboard_writer(run_dir: Path, first_epoch: int):
    """A TensorBoard writer into ``run_dir/tensorboard/``, or None when the ``tensorboard`` package is
    not installed (the ``toolkit[tensorboard]`` extra). A resumed run continues the same curves."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / TENSORBOARD), purge_step=first_epoch + 1 if first_epoch else None)


def _board_epoch(board, row: dict) -> None:
    step = row["epoch"]
    for key, tag in (("train_loss", "loss/train"), ("test_loss", "loss/test"), ("train_acc", "accuracy/train"),
                     ("test_acc", "accuracy/test"), ("val_loss", "loss/validation"), ("val_acc", "accuracy/validation"),
                     ("lr", "lr"), ("seconds", "seconds_per_epoch")):
        if key in row:
            board.add_scalar(tag, row[key], step)
    board.flush()


def write_recipe_toml(recipe: Recipe, path: Path, **cli) -> None:
    """The run's recipe as it ran, every value spelled out (overrides applied, model options resolved):
    ``toolkit train RUN/recipe.toml`` trains the same run again. Options that are not recipe keys
    (``--train-limit`` ...) are written as a comment, to be given again."""
    import tomli_w

    given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cli.items() if v is not None)
    header = "# the resolved recipe of this run (toolkit train RUN_DIR/recipe.toml trains it again)\n"
    if given:
        header += f"# it also ran with: {given}\n"
    with atomic_write(path, "w") as f:
        f.write(header + tomli_w.dumps(recipe.model_dump(mode="json", exclude_none=True)))


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS + (VAL_FIELDS if rows and "val_loss" in rows[0] else ()))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


def _csv_rows(path: Path) -> int:
    """The data rows of a metrics.csv (-1 when it is missing or unreadable)."""
    try:
        with open(path, newline="") as f:
            return sum(1 for _ in csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return -1


def plot_curves(rows: list[dict], path: Path) -> None:
    from toolkit.train.report import pyplot, save_png

    plt = pyplot()
    epochs = [r["epoch"] for r in rows]
    marker = "o" if len(rows) < 20 else None  # a one-epoch run is a point, not an empty plot
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, kind in ((0, "loss"), (1, "acc")):
        for split in ("train", "val", "test"):
            if f"{split}_{kind}" in rows[0]:
                axes[axis].plot(epochs, [r[f"{split}_{kind}"] for r in rows], label={"val": "validation"}.get(split, split), marker=marker)
    axes[2].plot(epochs, [r["lr"] for r in rows], marker=marker)
    axes[2].set_yscale("log")
    for ax, title in zip(axes, ("loss", "accuracy (%)", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title != "learning rate":
            ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def _early_stop(recipe: Recipe, rows: list[dict]) -> bool:
    rule = recipe.early_stopping
    if rule is None or len(rows) < rule.patience:
        return False
    watch = "val" if "val_loss" in rows[-1] else "test"  # a validation split, when the run holds one out
    if rule.monitor == "gap":
        return all(r["train_acc"] - r[f"{watch}_acc"] > rule.max_gap for r in rows[-rule.patience :])
    best_before = min(r[f"{watch}_loss"] for r in rows[: -rule.patience]) if len(rows) > rule.patience else float("inf")
    return min(r[f"{watch}_loss"] for r in rows[-rule.patience :]) >= best_before


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
class Session:
    """Everything set-up gives the epoch loop."""

    recipe: Recipe
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

    @property
    def on_gpu(self) -> bool:
        return self.dev.type == "cuda"


def _set_up(recipe, *, device, data_dir, out, epochs, seed, resume, workers, train_limit, test_limit, download, console, pipeline,
            model, run_name, extra_meta, compile, engine="auto", after_step=None) -> Session:
    """Recipe (or resumed run) -> device, processes, data, model, optimizer, scheduler, training
    state and run directory. The random generators are seeded and consumed in one fixed order."""
    ckpt = None
    if resume is not None:
        run_dir = Path(resume)
        ckpt = load_checkpoint(run_dir / "last.pt" if run_dir.is_dir() else run_dir)
        if not isinstance(ckpt.get("train_state"), dict):
            raise ToolkitError(f"{ckpt['path']}: holds no training state to resume from (resume from a run directory or its last.pt)")
        recipe = Recipe.model_validate(ckpt["recipe"])
        train_limit, test_limit = ckpt["meta"].get("train_limit"), ckpt["meta"].get("test_limit")
    if recipe is None:
        raise ToolkitError("give a recipe, or --resume RUN_DIR")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ToolkitError(f"--seed must be between 0 and {MAX_SEED:,}, not {seed}")
    updates = {k: v for k, v in (("epochs", epochs), ("seed", seed)) if v is not None}
    if pipeline is not None:
        updates["data"] = recipe.data.model_copy(update={"pipeline": check_choice("pipeline", pipeline, ("fast", "dataloader"))})
    recipe = recipe.model_copy(update=updates).resolved()
    check_choice("compile mode", compile, COMPILE_MODES)
    dev = pick_device(device)
    rank, world = _init_distributed(dev)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    main_process = rank == 0
    if not main_process:
        console = Console(file=io.StringIO())  # only rank 0 talks
    on_gpu = dev.type == "cuda"

    # ---- data
    if recipe.data.dataset == "folder":  # the run records where its folder is, wherever it is reproduced from
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"root": str(Path(recipe.data.root).expanduser().resolve())})})
        root = Path(recipe.data.root)
    else:
        root = resolve_data_dir(data_dir)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed + rank)  # dropout differs per rank; the shared shuffle comes from loader_rng
    loader_rng = torch.Generator().manual_seed(recipe.seed)
    train_loader, test_loader, val_loader, classes, spec = build_loaders(recipe, root, dev, loader_rng, workers=workers, train_limit=train_limit,
                                                             test_limit=test_limit, download=download, shard=(rank, world), console=console)

    # ---- model, optimizer, scheduler, state
    if ckpt is not None:
        model = model_from_checkpoint(ckpt)
        extra_meta = {k: v for k, v in ckpt["meta"].items() if k in ("pruned",)}
    elif model is None:
        model = recipe.build_model(spec.num_classes)
    model = model.to(dev)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = build_optimizer(recipe, model, fused=world == 1)
    scheduler, sched_when = build_scheduler(recipe, optimizer)
    if ckpt is not None:
        state = TrainState.restore(ckpt, optimizer, scheduler, loader_rng, on_gpu)
        for group in optimizer.param_groups:  # as build_optimizer chose for this run, whatever the checkpoint's run used
            group["fused"] = True if world == 1 else None
        run_dir = Path(ckpt["path"]).parent
    else:
        state = TrainState()
        run_dir = new_run_dir(Path(out), run_name or recipe.name) if main_process else None
        if main_process:
            write_recipe_toml(recipe, run_dir / RECIPE_TOML, train_limit=train_limit, test_limit=test_limit)
        if world > 1:  # every rank needs the path rank 0 made
            holder = [str(run_dir) if main_process else None]
            torch.distributed.broadcast_object_list(holder, src=0)
            run_dir = Path(holder[0])
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if on_gpu else None)  # averages gradients
    if compile != "none":
        # the first steps pay the compilation (tens of seconds); worth it only for long runs, so opt-in
        net = torch.compile(net, mode=None if compile == "default" else compile)
    engine_name, engine_line = step_engine.choose(engine, loader=train_loader, world=world, compile=compile, dev=dev)
    stepper = None
    if engine_name == "graph":
        stepper = step_engine.StepEngine(net, model, optimizer, train_loader, dev, autocast=on_gpu, channels_last=on_gpu, after_step=after_step)
    params = count_params(model)
    meta = {
        "dataset": recipe.data.dataset,
        "classes": classes,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "input_shape": list(spec.input_shape),
        "params": params,
        "train_limit": train_limit,
        "test_limit": test_limit,
        "validation": recipe.data.validation_fraction,  # best.pt chosen on held-out training images (0: on the test split)
        "data_dir": str(root.resolve()),  # later stages (export's int8, verify, eval, prune) default to it
        # an image folder: where it is and how it was split (the size and channels are the input shape)
        **({"folder": {"root": recipe.data.root, "split": recipe.data.split, "seed": recipe.seed}} if recipe.data.dataset == "folder" else {}),
        **(extra_meta or {}),
    }
    console.print(
        f"[bold]{recipe.name}[/]: {recipe.model.name} ({params:,} params) on {recipe.data.dataset} "
        f"[{_num_samples(train_loader):,} train / "
        + (f"{_num_samples(val_loader):,} validation (best.pt, early stopping and plateau chosen on it) / " if val_loader is not None else "")
        + f"{_num_samples(test_loader):,} test per process, {recipe.data.pipeline} pipeline], "
        f"{recipe.epochs} epoch{'s' if recipe.epochs != 1 else ''}, device {dev.type}"
        + (f" x {world} processes" if world > 1 else "") + (f", torch.compile {compile}" if compile != "none" else "") + f" -> {run_dir}"
    )
    console.print(engine_line)
    return Session(recipe, dev, world, main_process, console, run_dir, train_loader, test_loader, model, net, optimizer, scheduler,
                   sched_when, loader_rng, state, meta, params, val_loader, stepper)


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


def train_one_epoch(s: Session, epoch: int, progress, after_step=None) -> tuple[float, float]:
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
        if after_step is not None:
            after_step(s.model)
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


def _end_epoch(s: Session, epoch: int, row: dict, test_acc: float, watch_acc: float, board):
    """The epoch's checkpoints (best.pt when ``watch_acc``, the validation accuracy or without a
    validation split the test accuracy, is the best so far; last.pt with the training state),
    metrics.csv and TensorBoard scalars; returns the TensorBoard writer."""
    s.state.rows.append(row)
    ckpt = checkpoint_dict(s.recipe, s.model, {**s.meta, "epoch": epoch + 1, "test_acc": test_acc}, s.state.rows)
    if watch_acc > s.state.best_acc:
        s.state.best_acc = watch_acc
        if s.main_process:
            save_checkpoint(ckpt, s.run_dir / "best.pt")
    s.state.epoch = epoch + 1
    ckpt["train_state"] = s.state.save(s.optimizer, s.scheduler, s.loader_rng, s.on_gpu)
    if s.main_process:
        save_checkpoint(ckpt, s.run_dir / "last.pt")
        write_metrics_csv(s.state.rows, s.run_dir / "metrics.csv")
        # after the checkpoints: a run that cannot save them (a full disk) starts no event file either
        if board is None:
            board = tensorboard_writer(s.run_dir, epoch)
        if board is not None:
            _board_epoch(board, row)
    return board


def fit(recipe: Recipe | None = None, **options) -> RunResult:
    """Train ``recipe`` (or continue ``resume``): ``fit_epochs`` run to its end (its options)."""
    return run_to_end(fit_epochs(recipe, **options))


def run_to_end(epochs):
    """Drive a ``fit_epochs`` generator to its end; its RunResult."""
    while True:
        try:
            next(epochs)
        except StopIteration as stop:
            return stop.value


def fit_epochs(
    recipe: Recipe | None = None,
    *,
    device: str = "auto",
    data_dir: str | Path | None = None,
    out: str | Path = "runs",
    epochs: int | None = None,
    seed: int | None = None,
    resume: str | Path | None = None,
    workers: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    download: bool = True,
    console: Console | None = None,
    pipeline: str | None = None,
    model: torch.nn.Module | None = None,
    run_name: str | None = None,
    after_step=None,
    extra_meta: dict | None = None,
    compile: str = "none",
    engine: str = "auto",
) -> RunResult:
    """Train ``recipe`` (or continue ``resume``) as a generator: with the step engine it yields once
    per epoch, when the epoch's training is queued on the device and before anything waits for it
    (so several runs can share a GPU, ``toolkit.train.run.train_seeds``); it returns the RunResult.
    ``model`` starts from given weights instead of the
    recipe's fresh model (pruning fine-tunes this way), ``after_step(model)`` runs after every
    optimizer step, and ``extra_meta`` is stored in the checkpoints. ``compile`` runs the training
    forward/backward through ``torch.compile`` in that mode (one of ``COMPILE_MODES``); checkpoints
    and evaluation keep the plain module, so the saved weights are the same either way. ``engine``:
    ``toolkit.train.engine.ENGINES`` (auto: the step engine where the run allows it, else the eager loop)."""
    s = _set_up(recipe, device=device, data_dir=data_dir, out=out, epochs=epochs, seed=seed, resume=resume, workers=workers,
                train_limit=train_limit, test_limit=test_limit, download=download, console=console or Console(stderr=True),
                pipeline=pipeline, model=model, run_name=run_name, extra_meta=extra_meta, compile=compile,
                engine=engine, after_step=after_step)
    recipe, console, start_epoch = s.recipe, s.console, s.state.epoch
    if start_epoch >= recipe.epochs:
        console.print(f"nothing to do: the run already has {start_epoch} epoch{'s' if start_epoch != 1 else ''}")
    started = time.perf_counter()
    stopped_early = False
    board = None
    # one writer per run directory: a second `train --resume` of a running run is refused at once
    with locked(s.run_dir, wait=False) if s.main_process else contextlib.nullcontext(), progress_bar(console) as progress:
        if start_epoch and s.main_process:
            stale = remove_stale_temps(s.run_dir)
            if stale:
                console.print(f"removed {len(stale)} temporary file(s) an interrupted run left in {s.run_dir}")
            # last.pt is written before metrics.csv: a kill between them lost the last row, which the checkpoint holds
            if _csv_rows(s.run_dir / "metrics.csv") != len(s.state.rows):
                write_metrics_csv(s.state.rows, s.run_dir / "metrics.csv")
                console.print(f"metrics.csv rebuilt from last.pt ({len(s.state.rows)} epochs)")
        for epoch in range(start_epoch, recipe.epochs):
            t0 = time.perf_counter()
            lr = s.optimizer.param_groups[0]["lr"]
            if s.engine is not None:
                queued = queue_epoch(s, epoch, progress)
                yield epoch  # the epoch is queued on the device: another run may queue its own (train_seeds)
                train_loss, train_acc = finish_epoch(s, queued)
            else:
                train_loss, train_acc = train_one_epoch(s, epoch, progress, after_step)
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
            console.print(
                f"epoch {row['epoch']:>3}/{recipe.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%  "
                + (f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}%  " if "val_acc" in row else "")
                + f"test loss {row['test_loss']:.4f} acc {row['test_acc']:6.2f}%  lr {lr:.3g}  {row['seconds']:.1f}s"
            )
            board = _end_epoch(s, epoch, row, test_acc, watch_acc, board)
            if _early_stop(recipe, s.state.rows):
                console.print(f"early stopping after epoch {epoch + 1} ({recipe.early_stopping.monitor} rule)")
                stopped_early = True
                break
    seconds = time.perf_counter() - started
    if board is not None:
        board.close()
    rows = s.state.rows
    if rows and s.main_process:
        plot_curves(rows, s.run_dir / "curves.png")
    if s.world > 1:
        torch.distributed.barrier()  # rank 0's files are complete before anyone returns
    selected = None
    if rows and "val_acc" in rows[0]:  # best.pt is the first epoch with the highest validation accuracy
        selected = max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))["test_acc"]
    return RunResult(
        selected_test_acc=selected,
        run_dir=s.run_dir,
        checkpoint=s.run_dir / "best.pt",
        best_test_acc=max((r["test_acc"] for r in rows), default=0.0),
        final_test_acc=rows[-1]["test_acc"] if rows else 0.0,
        epochs=len(rows),
        seconds=seconds,
        params=s.params,
        stopped_early=stopped_early,
        metrics=rows,
        main_process=s.main_process,
        recipe=recipe,
    )
