"""Dataset facts: what a model trained on a dataset takes and answers, in one place, free of dependencies.

Every reader that needs an input shape, a normalization, a number of classes, class names or
the way a user's image is prepared asks here (``facts(name)``) instead of testing the
dataset's name. Training records these facts in the checkpoint and export copies them into
the manifest, so serving and prediction read them from the manifest and never from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from toolkit.core.errors import ToolkitError

# how a user's image becomes the model's uint8 input (toolkit.inference.preprocess):
#   "digit":  a drawing or photo of one digit, turned into an MNIST digit (light stroke on black,
#             fitted into a 20x20 box and centred by its centre of mass in the 28x28 frame)
#   "garment": a photo of one object, as Fashion-MNIST made its images: grey, light object on
#             black (inverted when the background is light), trimmed, its longest side fitted to the frame
#   "resize": the whole picture, converted to the model's channels and resized to its input size
Preparation = Literal["digit", "garment", "resize"]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class DatasetFacts:
    name: str
    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    preparation: Preparation
    folder: str  # where torchvision keeps the raw files, under the data root
    files: tuple[str, ...]  # every file the train and test splits need
    test_files: tuple[str, ...]  # the test split's images and labels (one file for CIFAR)
    classes: tuple[str, ...] | None  # None: the names are read from the dataset's own files

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


DATASETS: dict[str, DatasetFacts] = {
    "mnist": DatasetFacts(
        "mnist", 1, 28, 10, (0.1307,), (0.3081,), "digit", "MNIST/raw",
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        tuple(str(i) for i in range(10)),
    ),
    # Zalando's Fashion-MNIST: MNIST's format and layout; mean/std measured on its 60,000 training images
    "fashion_mnist": DatasetFacts(
        "fashion_mnist", 1, 28, 10, (0.2860,), (0.3530,), "garment", "FashionMNIST/raw",
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        FASHION_MNIST_CLASSES,
    ),
    "cifar10": DatasetFacts(
        "cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "resize", "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"),
        ("test_batch",),
        CIFAR10_CLASSES,
    ),
    # CIFAR-100 mean/std as seed 004 gives them; its 100 fine label names come from its `meta` file
    "cifar100": DatasetFacts(
        "cifar100", 3, 32, 100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), "resize", "cifar-100-python",
        ("train", "test", "meta"),
        ("test",),
        None,
    ),
}


def facts(dataset: str) -> DatasetFacts:
    if dataset not in DATASETS:
        raise ToolkitError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return DATASETS[dataset]


def preparation_for(dataset: str, channels: int) -> Preparation:
    """How an image is prepared for a model of an export: the dataset's own way when the dataset
    is known here, else the whole picture resized (a dataset this version does not know)."""
    known = DATASETS.get(dataset)
    return known.preparation if known is not None and known.channels == channels else "resize"
