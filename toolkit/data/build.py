"""A recipe's data source -> the loaders a run trains, validates and tests with: the resident tensor
pipeline (``toolkit.data.fast``) or torchvision's DataLoader, the seeded validation split, the shards of
several processes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console
from torch.utils.data import Subset

from toolkit.core.errors import ToolkitError
from toolkit.data import loaders as data_mod
from toolkit.data.sources import Source


@dataclass
class Loaders:
    """What a run trains, validates and tests with, and what it records of its data."""

    train: object
    test: object
    val: object  # the held-out part of the training split (data.validation), or None
    classes: list[str]
    spec: object  # the dataset's facts: input shape, mean, std, classes
    validation: float  # the fraction held out
    record: dict  # the data root (and an image folder's split) later stages read the same images from
    counts: dict  # images per process: {"train": n, "validation": n or None, "test": n}


def build_loaders(source: Source, dev: torch.device, loader_rng: torch.Generator, *, workers: int = 0,
                  train_limit: int | None = None, test_limit: int | None = None, shard: tuple[int, int] = (0, 1),
                  console: Console | None = None):
    """Train, test and validation loaders for the source's recipe and pipeline, the class names,
    the dataset's facts and what the run records of its data (``Loaders``); ``shard=(rank, world)`` splits them across processes. ``console`` hears
    what the source reads first (an image folder's decoding and bad files)."""
    recipe = source.recipe
    fraction = recipe.data.validation_fraction
    source.prepare(console)
    spec = source.facts()
    if source.tensor_pipeline:
        from toolkit.data.fast import TensorLoader

        (x, y, classes), (xt, yt, _) = source.tensors(train=True), source.tensors(train=False)
        x, y, xt, yt = x[:train_limit], y[:train_limit], xt[:test_limit], yt[:test_limit]
        kept, held = validation_split(len(x), fraction, recipe.seed)
        norm = {"mean": spec.mean, "std": spec.std}
        val_loader = None
        if held is not None:
            val_loader = TensorLoader(x[held], y[held], recipe.data.test_batch_size, normalization=norm, generator=None, shuffle=False,
                                      device=dev, shard=shard)
            x, y = x[kept], y[kept]
        train_loader = TensorLoader(x, y, recipe.data.batch_size, normalization=norm, generator=loader_rng, shuffle=True,
                                    augment=recipe.data.augment, device=dev, shard=shard)
        test_loader = TensorLoader(xt, yt, recipe.data.test_batch_size, normalization=norm, generator=None, shuffle=False, device=dev, shard=shard)
        return _bundle(source, fraction, train_loader, test_loader, val_loader, classes, spec)
    train_ds, test_ds = source.dataset(train=True), source.dataset(train=False)
    classes = source.class_names(train_ds)
    if train_limit:
        train_ds = Subset(train_ds, range(min(train_limit, len(train_ds))))
    if test_limit:
        test_ds = Subset(test_ds, range(min(test_limit, len(test_ds))))
    kept, held = validation_split(len(train_ds), fraction, recipe.seed)
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
                                                   worker_init_fn=data_mod.seed_worker if workers else None, pin_memory=dev.type == "cuda")
        test_ds = Subset(test_ds, range(rank, len(test_ds), world))
    else:
        train_loader = data_mod.make_loader(train_ds, recipe.data.batch_size, shuffle=True, generator=loader_rng, workers=workers, pin=dev.type == "cuda")
    test_loader = make_loader_for_eval(test_ds, recipe.data.test_batch_size, dev, workers=workers)
    return _bundle(source, fraction, train_loader, test_loader, val_loader, classes, spec)


def _bundle(source: Source, fraction: float, train, test, val, classes, spec) -> Loaders:
    counts = {"train": num_samples(train), "validation": num_samples(val) if val is not None else None, "test": num_samples(test)}
    return Loaders(train, test, val, classes, spec, fraction, source.record(), counts)


def validation_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Indices of the training images kept for training and of those held out for validation
    (``fraction`` of them, the recipe's data.validation, drawn with its seed; sorted); (None, None) without one."""
    if not fraction:
        return None, None
    n_val = round(n * fraction)
    if not 0 < n_val < n:
        raise ToolkitError(f"data.validation = {fraction} holds out {n_val} of {n:,} training images: choose a fraction that leaves both sides some")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def num_samples(loader) -> int:
    return loader.num_samples() if hasattr(loader, "num_samples") else len(loader.sampler if hasattr(loader.sampler, "num_replicas") else loader.dataset)


def make_loader_for_eval(ds, batch_size: int, dev: torch.device, workers: int = 0):
    return data_mod.make_loader(ds, batch_size, shuffle=False, generator=None, workers=workers, pin=dev.type == "cuda")
