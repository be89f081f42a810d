"""Built-in datasets: torchvision's real MNIST / CIFAR-10 / CIFAR-100 loaders and the recipes' augmentations
(toolkit.data.sources puts them and image folders behind one interface).

The data root comes from ``--data-dir``, then ``TOOLKIT_DATA_DIR``, then a user cache
directory. Missing files are downloaded where there is a network; where there is none, the
error names the folder the files must go into.
"""

from __future__ import annotations

import contextlib

import signal
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from toolkit.core.datasets import DatasetFacts, facts
from toolkit.core.errors import ToolkitError
from toolkit.models.recipes import Augment


_TORCHVISION = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


class AlbumentationsDataset(Dataset):
    """Wraps a torchvision dataset (PIL images) with an albumentations pipeline."""

    def __init__(self, base: Dataset, pipeline):
        self.base, self.pipeline = base, pipeline
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return self.pipeline(image=np.asarray(img))["image"], label

    def reseed(self, seed: int) -> None:
        self.pipeline.set_random_seed(seed)


def albumentations_pipeline(aug: Augment, spec: DatasetFacts, train: bool):
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    steps = []
    if train:
        if aug.hflip:
            steps.append(A.HorizontalFlip(p=aug.hflip))
        if aug.shift_scale_rotate:
            ssr = aug.shift_scale_rotate
            # the current API for the write-ups' ShiftScaleRotate(shift_limit, scale_limit, rotate_limit)
            steps.append(
                A.Affine(
                    translate_percent=(-ssr.shift, ssr.shift), scale=(1 - ssr.scale, 1 + ssr.scale), rotate=(-ssr.rotate, ssr.rotate), p=ssr.p
                )
            )
        if aug.coarse_dropout:
            cd = aug.coarse_dropout
            steps.append(
                A.CoarseDropout(
                    num_holes_range=(cd.holes, cd.holes), hole_height_range=(cd.size, cd.size), hole_width_range=(cd.size, cd.size), p=cd.p
                )
            )
        if aug.rotation:
            steps.append(A.Rotate(limit=(-aug.rotation, aug.rotation), p=1.0))
        if aug.random_crop_padding:
            pad = aug.random_crop_padding
            steps += [A.PadIfNeeded(spec.size + 2 * pad, spec.size + 2 * pad, border_mode=0), A.RandomCrop(spec.size, spec.size)]
    steps += [A.Normalize(mean=spec.mean, std=spec.std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps)


def torchvision_pipeline(aug: Augment, spec: DatasetFacts, train: bool):
    steps = []
    if train:
        if aug.rotation:
            steps.append(transforms.RandomRotation(aug.rotation, fill=0))
        if aug.random_crop_padding:
            steps.append(transforms.RandomCrop(spec.size, padding=aug.random_crop_padding))
        if aug.hflip:
            steps.append(transforms.RandomHorizontalFlip(aug.hflip))
    steps += [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    return transforms.Compose(steps)


def _missing_files(spec: DatasetFacts, root: Path) -> list[str]:
    return [f for f in spec.files if not (root / spec.folder / f).exists()]


def _download_host(cls) -> str | None:
    """The host torchvision would download the dataset from."""
    from urllib.parse import urlparse

    url = (getattr(cls, "mirrors", None) or [getattr(cls, "url", None) or getattr(cls, "base_folder", "")])[0]
    return urlparse(url).hostname


def _reachable(host: str, timeout: float = 3.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_split(dataset: str, root: Path, train: bool, transform=None, download: bool = True) -> Dataset:
    """torchvision's dataset for one split; download only when files are missing."""
    spec = facts(dataset)
    cls = _TORCHVISION[dataset]
    missing = _missing_files(spec, root)
    if missing:
        reason = "download disabled"
        if download:
            host = _download_host(cls)
            if host and not _reachable(host):  # fail in seconds, not after a minute of retries
                reason = f"no network: {host} cannot be reached to download it"
            else:
                created = [d for d in (root, *(root / spec.folder).parents, root / spec.folder) if not d.exists()]
                try:
                    return cls(str(root), train=train, transform=transform, download=True)
                except Exception as exc:  # no network, partial files, bad checksum: all end the same way for a user
                    detail = next((line.strip().rstrip(":") for line in str(exc).splitlines() if line.strip()), "")
                    reason = f"download failed: {type(exc).__name__}: {detail}"
                    for d in sorted(created, key=lambda d: len(d.parts), reverse=True):  # leave no empty folders behind
                        with contextlib.suppress(OSError):
                            d.rmdir()
        raise ToolkitError(
            f"{dataset} not found: put {', '.join(missing)} into {root / spec.folder} "
            f"(set the root with --data-dir or TOOLKIT_DATA_DIR; {reason})"
        )
    try:
        return cls(str(root), train=train, transform=transform, download=False)
    except Exception as exc:
        raise ToolkitError(f"{dataset} under {root / spec.folder} could not be read: {exc}") from None


def class_names(dataset: str, split: Dataset) -> list[str]:
    """A built-in dataset's class names: its facts where they are fixed, else read from its files by torchvision."""
    if facts(dataset).classes is not None:
        return list(facts(dataset).classes)
    base = getattr(split, "base", split)
    return list(base.classes)


def augmented_split(dataset: str, root: Path, aug: Augment, *, train: bool, download: bool = True) -> Dataset:
    """A built-in dataset's split through the recipe's augmentations (albumentations or torchvision)
    and its normalization; the test split gets the normalization only."""
    spec = facts(dataset)
    if aug.library == "albumentations":
        base = load_split(spec.name, root, train, transform=None, download=download)
        return AlbumentationsDataset(base, albumentations_pipeline(aug, spec, train))
    return load_split(spec.name, root, train, transform=torchvision_pipeline(aug, spec, train), download=download)


def seed_worker(worker_id: int) -> None:
    # Ctrl-C and SIGTERM are the main process's to handle (it stops the workers); a worker that
    # inherited the CLI's handlers would print its own traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # torch seeds `random` and torch per worker; albumentations keeps its own generator
    info = torch.utils.data.get_worker_info()
    ds = getattr(info.dataset, "dataset", info.dataset) if info is not None else None  # through a Subset
    if hasattr(ds, "reseed"):
        ds.reseed(info.seed % 2**32)


def make_loader(ds: Dataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        worker_init_fn=seed_worker if workers else None,
        persistent_workers=False,  # fresh workers each epoch: their seeds come from `generator`, so resume is exact
        pin_memory=pin,
        drop_last=False,
    )


def split_arrays(dataset: str, root: Path, train: bool, download: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A whole split as one uint8 NCHW tensor, its int64 labels and the class names (MNIST and CIFAR fit in memory)."""
    ds = load_split(dataset, root, train, transform=None, download=download)
    x = ds.data
    x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2) if isinstance(x, np.ndarray) else x.unsqueeze(1)
    return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long), class_names(dataset, ds)
