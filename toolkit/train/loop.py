"""The training loop: set-up (data, model, optimizer, scheduler), the epoch loop, checkpoints — top to bottom.
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
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from toolkit.data.build import build_loaders
from toolkit.data.sources import source_for
from toolkit.train import engine as step_engine
from toolkit.train import logs
from toolkit.train.optim import build_optimizer, build_scheduler
from toolkit.train.state import Resume, RunResult, TrainOptions, TrainState
from toolkit.core import speed
from toolkit.models.checkpoint import SUMMARY, checkpoint_dict, new_run_dir, non_finite, save_checkpoint
from toolkit.core.environment import keep_freed_memory
from toolkit.core.errors import ToolkitError
from toolkit.core.files import locked
from toolkit.models.registry import count_params
from toolkit.core.progress import Progress
from toolkit.models.recipes import Recipe


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


EVAL_CHUNK_BYTES = 4 << 20  # the largest activation of one evaluation chunk on a CPU: about a core's share of cache


@torch.no_grad()
def cache_sized_chunk(model, one: torch.Tensor) -> int:
    """How many images a CPU forward pass takes at a time so that its largest activation stays near
    ``EVAL_CHUNK_BYTES``: fine4's 1,000-image test batches make 38 MB maps that stream from memory,
    and 111-image chunks of them evaluate 2-3x faster (docs/benchmarks.md). Measured on ``one`` image."""
    largest = [one.numel() * one.element_size()]
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]

    def hook(_m, _inputs, out):
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        model(one)
    finally:
        for h in handles:
            h.remove()
    return max(1, EVAL_CHUNK_BYTES // largest[0])


@torch.no_grad()
def evaluate(model, loader, device, *, autocast: bool = False, progress: Progress | None = None,
             label: str = "test") -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Mean loss, accuracy (%), all predictions and all labels."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    preds, labels = [], []
    task = progress.add_task(label, total=len(loader)) if progress else None
    chunk = None
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if device.type == "cpu" and chunk is None:
            chunk = cache_sized_chunk(model, x[:1])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x) if chunk is None or chunk >= len(x) else torch.cat([model(part) for part in x.split(chunk)])
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
    counts: dict | None = None  # images per process: train, validation, test (toolkit.data.build.Loaders)

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
        f"[{s.counts['train']:,} train / "
        + (f"{s.counts['validation']:,} validation (best.pt, early stopping and plateau chosen on it) / " if s.val_loader is not None else "")
        + f"{s.counts['test']:,} test per process, {r.data.pipeline} pipeline], "
        f"{r.epochs} epoch{'s' if r.epochs != 1 else ''}, device {s.dev.type}"
        + (f" x {s.world} processes" if s.world > 1 else "") + (f", torch.compile {opts.compile}" if opts.compile != "none" else "") + f" -> {s.run_dir}"
    )


def _run_meta(recipe: Recipe, opts: TrainOptions, data, params: int, step_settings: dict) -> dict:
    """What the run's checkpoints record besides the weights: the dataset's facts, the step's settings and
    where the data came from (later stages read the same images from it)."""
    spec = data.spec
    return {
        "dataset": recipe.data.dataset,
        "classes": data.classes,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "input_shape": list(spec.input_shape),
        "params": params,
        "engine": step_settings,
        "train_limit": opts.train_limit,
        "test_limit": opts.test_limit,
        "validation": data.validation,  # best.pt chosen on held-out training images (0: on the test split)
        # the data root later stages (export's int8, verify, eval, prune) default to; an image folder's
        # root, split and seed (its size and channels are the input shape)
        **data.record,
        **(opts.extra_meta or {}),
    }


def _set_up(recipe: Recipe | None, opts: TrainOptions, console: Console) -> Session:
    """Recipe (or resumed run) -> device, processes, data, model, optimizer, scheduler, training
    state and run directory. The random generators are seeded and consumed in one fixed order."""
    load_before = speed.load_average()  # other work's load: this process has not started computing yet
    memory_kept = keep_freed_memory()  # before the first large block: no page faults per activation
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
    data = build_loaders(source, dev, loader_rng, workers=opts.workers, train_limit=opts.train_limit, test_limit=opts.test_limit,
                         shard=(rank, world), console=console)
    train_loader, test_loader, val_loader = data.train, data.test, data.val

    model = (opts.model if opts.model is not None else recipe.build_model(data.spec.num_classes)).to(dev)
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
    step_settings = step_engine.settings(dev, engine_name, opts.compile, memory_kept)
    meta = _run_meta(recipe, opts, data, params, step_settings)
    s = Session(recipe, opts, dev, world, rank == 0, console, run_dir, train_loader, test_loader, model, net, optimizer, scheduler,
                sched_when, loader_rng, state, meta, params, val_loader, stepper, resumed=resume is not None,
                busy=speed.busy(load_before, torch.get_num_threads(), []), counts=data.counts)
    _announce(s)
    console.print(f"{engine_line}; {step_engine.settings_line(step_settings)}" if dev.type == "cpu" else engine_line)
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
                     stopped_early=stopped_early, metrics=rows, main_process=s.main_process, recipe=s.recipe, selected_test_acc=selected,
                     engine=s.meta.get("engine"))


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
