"""Where a recipe's images come from: one source per dataset kind, chosen in one place (``source_for``).

A built-in dataset (torchvision's MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 files under the data
root) and a folder of the user's own images (``toolkit.inference.folder``) answer the same
questions: the dataset's facts, a split as uint8 tensors, a split as a torch Dataset through the
recipe's augmentations, the test split as training evaluated it, and what a run records about its
data. Training, evaluation, pruning, export's calibration and verify ask the source; none of them
asks which kind of dataset a recipe names.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from toolkit.core.datasets import DatasetFacts, facts
from toolkit.core.files import resolve_data_dir
from toolkit.core.progress import Progress
from toolkit.data import loaders
from toolkit.inference import folder
from toolkit.models.recipes import Recipe

FOLDER = "folder"  # the recipe's dataset name for a folder of the user's own images


def normalized(x: torch.Tensor, spec: DatasetFacts) -> torch.Tensor:
    """uint8 NCHW pixels as the model reads them: ``(x / 255 - mean) / std`` per channel."""
    mean = torch.tensor(spec.mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(spec.std, dtype=torch.float32)[None, :, None, None]
    return (x.float() / 255.0 - mean) / std


@dataclass
class Source(ABC):
    """A recipe's dataset. ``recipe`` is None where only the images are wanted (export's calibration)."""

    recipe: Recipe | None
    download: bool = True

    @property
    @abstractmethod
    def root(self) -> Path:
        """The folder the images are read from."""

    @abstractmethod
    def facts(self) -> DatasetFacts:
        """Classes, size, channels, mean and std."""

    @abstractmethod
    def tensors(self, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """A whole split: uint8 NCHW pixels, int64 labels, the class names."""

    @abstractmethod
    def dataset(self, train: bool, augment: bool = True) -> Dataset:
        """A split as a torch Dataset of normalized tensors (the training split through the recipe's
        augmentations unless ``augment=False``: what held-out validation images look like)."""

    @property
    def tensor_pipeline(self) -> bool:
        """Whether training reads whole tensors (toolkit.data.fast) rather than a DataLoader."""
        return self.recipe.data.pipeline == "fast"

    def prepare(self, console=None) -> None:
        """Read what must be read before training, saying so on ``console``."""

    def class_names(self, split: Dataset | None = None) -> list[str]:
        return list(self.facts().classes) if self.facts().classes is not None else list(self.tensors(train=False)[2])

    def record(self) -> dict:
        """What a run's checkpoint records about its data (later stages read the same images from it)."""
        return {"data_dir": str(self.root.resolve())}

    def test_inputs(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The test split as training evaluated it (normalization only), float32 NCHW and int64 labels."""
        if self.tensor_pipeline:
            from toolkit.data.fast import TensorLoader

            x, y, _ = self.tensors(train=False)
            spec = self.facts()
            loader = TensorLoader(x[:limit], y[:limit], 1000, normalization={"mean": spec.mean, "std": spec.std}, generator=None, shuffle=False)
        else:
            ds = self.dataset(train=False)
            if limit:
                ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
            loader = loaders.make_loader(ds, 1000, shuffle=False, generator=None, workers=0, pin=False)
        xs, ys = zip(*((xb.numpy(), yb.numpy()) for xb, yb in loader))
        return np.concatenate(xs).astype(np.float32, copy=False), np.concatenate(ys).astype(np.int64, copy=False)


@dataclass
class BuiltinSource(Source):
    """torchvision's files for MNIST, Fashion-MNIST, CIFAR-10 or CIFAR-100 under a data root."""

    name: str = "mnist"
    data_root: Path = field(default_factory=Path)

    @property
    def root(self) -> Path:
        return self.data_root

    def facts(self) -> DatasetFacts:
        return facts(self.name)

    def tensors(self, train: bool):
        return loaders.split_arrays(self.name, self.data_root, train=train, download=self.download)

    def dataset(self, train: bool, augment: bool = True) -> Dataset:
        aug = self.recipe.data.augment
        if not augment:
            aug = type(aug)(library=aug.library)
        return loaders.augmented_split(self.name, self.data_root, aug, train=train, download=self.download)

    def class_names(self, split: Dataset | None = None) -> list[str]:
        if self.facts().classes is not None or split is None:
            return super().class_names()
        return list(getattr(split, "base", split).classes)


@dataclass
class FolderSource(Source):
    """A folder of the user's own images, one sub-folder per class, decoded (and cached) once."""

    spec: folder.FolderSpec | None = None
    _found: folder.FolderData | None = field(default=None, repr=False)

    @property
    def root(self) -> Path:
        return self.spec.root

    @property
    def tensor_pipeline(self) -> bool:  # a folder is decoded into memory once: always the tensor pipeline
        return True

    def found(self, progress=None) -> folder.FolderData:
        if self._found is None:
            self._found = folder.load(self.spec, progress=progress)
        return self._found

    def prepare(self, console=None) -> None:
        with Progress(console, unit="images") if console is not None else contextlib.nullcontext() as progress:
            found = self.found(progress)
        if console is not None:
            spec = self.facts()
            console.print(f"image folder {self.root}: {len(found.classes)} classes, {len(found.x_train):,} training / "
                          f"{len(found.x_test):,} test images{' (cached)' if found.cached else ''}; "
                          f"mean {_floats(spec.mean)}, std {_floats(spec.std)}")
            if found.bad:
                console.print(f"[yellow]warning:[/] {found.bad_summary()}")

    def facts(self) -> DatasetFacts:
        found = self.found()
        mean, std = found.mean_std()
        if self.recipe is not None:
            mean, std = self.recipe.data.mean or mean, self.recipe.data.std or std
        return DatasetFacts(FOLDER, self.spec.channels, self.spec.size, len(found.classes), tuple(mean), tuple(std), "resize",
                            str(self.root), (), (), tuple(found.classes))

    def tensors(self, train: bool):
        found = self.found()
        x, y = (found.x_train, found.y_train) if train else (found.x_test, found.y_test)
        return torch.from_numpy(x), torch.from_numpy(y), list(found.classes)

    def dataset(self, train: bool, augment: bool = True) -> Dataset:
        x, y, classes = self.tensors(train)
        ds = torch.utils.data.TensorDataset(normalized(x, self.facts()), y)
        ds.classes = classes
        return ds

    def test_inputs(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        x, y, _ = self.tensors(train=False)
        return normalized(x[:limit], self.facts()).numpy(), y[:limit].numpy().astype(np.int64, copy=False)

    def record(self) -> dict:
        return {**super().record(), "folder": {"root": str(self.root), "split": self.spec.split, "seed": self.spec.seed}}


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def source_for(recipe: Recipe, data_dir=None, *, recorded_data_dir=None, download: bool = True) -> Source:
    """The recipe's dataset: its image folder (``source.recipe`` holds the folder's absolute path) or a built-in dataset
    under ``data_dir`` (else the run's recorded data root, ``TOOLKIT_DATA_DIR``, the user cache)."""
    d = recipe.data
    if d.dataset == FOLDER:
        spec = folder.FolderSpec(Path(d.root).expanduser().resolve(), int(d.size), int(d.channels), float(d.split), int(recipe.seed), bool(d.strict))
        # the run records where its folder is, wherever it is reproduced from
        recipe = recipe.model_copy(update={"data": d.model_copy(update={"root": str(spec.root)})})
        return FolderSource(recipe, download, spec=spec)
    return BuiltinSource(recipe, download, name=d.dataset, data_root=Path(resolve_data_dir(data_dir, recorded_data_dir)))


def source_for_export(manifest, data_dir=None, *, download: bool = True) -> Source:
    """The images an export's model was trained on, from its manifest (no recipe: export's calibration)."""
    if manifest.source.folder is not None:
        return FolderSource(None, download, spec=folder.from_manifest(manifest))
    return BuiltinSource(None, download, name=manifest.dataset, data_root=Path(resolve_data_dir(data_dir, manifest.source.data_dir)))


def build_dataset(recipe: Recipe, data_dir=None, train: bool = False, download: bool = True) -> Dataset:
    """The recipe's split as a torch Dataset (``Source.dataset``)."""
    return source_for(recipe, data_dir, download=download).dataset(train)


def test_inputs(recipe: Recipe, data_dir=None, *, limit: int | None = None, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The recipe's test split as training evaluated it (``Source.test_inputs``)."""
    return source_for(recipe, data_dir, download=download).test_inputs(limit)
