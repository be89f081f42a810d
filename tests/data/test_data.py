"""Data roots, torchvision's real loaders (real MNIST, generated CIFAR files) and the augmentations."""


import numpy as np
from pathlib import Path

import pytest
import torch

from tests.helpers import RECIPES
from toolkit.data import loaders as data_mod
from toolkit.data import sources
from toolkit.core.datasets import facts
from toolkit.core.errors import ToolkitError
from toolkit.core.files import resolve_data_dir
from toolkit.models.recipes import load_recipe


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TOOLKIT_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "opt") == tmp_path / "opt"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("TOOLKIT_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir(None) == tmp_path / "cache" / "toolkit" / "data"


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"), ("cifar10", "cifar-10-batches-py"),
                                             ("cifar100", "cifar-100-python")])
def test_missing_data_says_where_files_go(tmp_path, dataset, folder):
    with pytest.raises(ToolkitError) as err:
        data_mod.load_split(dataset, tmp_path, train=True, download=False)
    msg = str(err.value)
    assert "put " in msg and str(tmp_path / folder) in msg and "\n" not in msg


def test_real_mnist(mnist_root):
    train = data_mod.load_split("mnist", mnist_root, train=True, download=False)
    test = data_mod.load_split("mnist", mnist_root, train=False, download=False)
    assert (len(train), len(test)) == (60_000, 10_000)
    # class balance of the real test set: 980 zeros ... 1009 nines
    counts = torch.bincount(test.targets, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_test_pipeline_is_normalization_only(mnist_root):
    recipe = load_recipe(RECIPES / "fine4.toml")
    ds = sources.build_dataset(recipe, mnist_root, train=False, download=False)
    x, y = ds[0]
    raw = ds.data[0].float() / 255
    assert torch.allclose(x[0], (raw - 0.1307) / 0.3081, atol=1e-6) and y == 7


def test_mnist_rotation_is_applied_to_training_images(mnist_root):
    recipe = load_recipe(RECIPES / "fine4.toml")
    ds = sources.build_dataset(recipe, mnist_root, train=True, download=False)
    torch.manual_seed(0)
    a, b = ds[0][0], ds[0][0]
    assert not torch.equal(a, b)  # two random rotations of the same digit differ
    assert abs(a.mean() - b.mean()) < 0.05  # but it is still the same digit, rotated a little


def test_cifar10_real_loader_on_generated_files(cifar_root, cifar_classes):
    train = data_mod.load_split("cifar10", cifar_root, train=True, download=False)
    test = data_mod.load_split("cifar10", cifar_root, train=False, download=False)
    assert (len(train), len(test)) == (200, 50)
    assert data_mod.class_names("cifar10", train) == cifar_classes
    img, label = test[3]
    assert img.size == (32, 32) and img.mode == "RGB" and label == 3


def test_cifar100_real_loader_on_generated_files(cifar_root):
    train = data_mod.load_split("cifar100", cifar_root, train=True, download=False)
    assert len(train) == 300 and len(data_mod.class_names("cifar100", train)) == 100
    assert train[42][1] == 42


def test_corrupted_cifar_file_is_a_clear_error(cifar_root):
    (cifar_root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(ToolkitError, match="could not be read"):
        data_mod.load_split("cifar10", cifar_root, train=True, download=False)


def test_albumentations_ft_pipeline(cifar_root):
    recipe = load_recipe(RECIPES / "ft6.toml")
    spec = facts("cifar10")
    test_ds = sources.build_dataset(recipe, cifar_root, train=False, download=False)
    x, _ = test_ds[0]
    raw = torch.from_numpy(np.array(test_ds.base[0][0])).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    assert x.shape == (3, 32, 32) and torch.allclose(x, expected, atol=1e-5)  # test split: normalization only

    train_ds = sources.build_dataset(recipe, cifar_root, train=True, download=False)
    train_ds.reseed(0)
    outs = [train_ds[0][0] for _ in range(40)]
    changed = sum(not torch.allclose(o, outs[0]) for o in outs[1:])
    assert changed >= 30  # flip / affine / dropout each fire with p=0.5: nearly every draw differs
    train_ds.reseed(0)
    assert torch.equal(train_ds[0][0], outs[0])  # reseeding reproduces the draw


def test_coarse_dropout_hole_is_16x16(cifar_root):
    from toolkit.models.recipes import Augment, CoarseDropout

    spec = facts("cifar10")
    aug = Augment(library="albumentations", coarse_dropout=CoarseDropout(holes=1, size=16, p=1.0))
    pipe = data_mod.albumentations_pipeline(aug, spec, train=True)
    img = np.full((32, 32, 3), 200, dtype=np.uint8)
    out = pipe(image=img)["image"]
    hole_value = (0 - spec.mean[0]) / spec.std[0]
    holes = torch.isclose(out[0], torch.tensor(hole_value), atol=1e-4)
    assert holes.sum() == 16 * 16
    rows, cols = holes.any(1).nonzero().flatten(), holes.any(0).nonzero().flatten()
    assert rows.max() - rows.min() == 15 and cols.max() - cols.min() == 15  # one contiguous square


def test_resnet_recipes_use_crop_and_flip():
    aug = load_recipe(RECIPES / "resnet20_baseline.toml").data.augment
    pipe = data_mod.torchvision_pipeline(aug, facts("cifar10"), train=True)
    names = [type(t).__name__ for t in pipe.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert pipe.transforms[0].padding == 4


def test_a_missing_dataset_without_network_fails_fast_and_leaves_nothing(tmp_path, monkeypatch):
    """Where the download host cannot be reached the error comes at once (no minute of retries), in one
    clean line that names the host; nothing is left under the data root."""
    monkeypatch.setattr(data_mod, "_reachable", lambda host, timeout=3.0: False)
    root = tmp_path / "data"
    with pytest.raises(ToolkitError) as err:
        data_mod.load_split("fashion_mnist", root, train=True, download=True)
    msg = str(err.value)
    assert "no network: fashion-mnist.s3-website.eu-central-1.amazonaws.com cannot be reached" in msg and "\n" not in msg
    assert not msg.endswith(":)") and not root.exists()


def test_a_failed_download_removes_the_folders_it_made(tmp_path, monkeypatch):
    from torchvision import datasets

    def fail(root, *args, **kwargs):
        (Path(root) / "MNIST" / "raw").mkdir(parents=True)  # as torchvision does before fetching
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://mirror/, got: refused")

    monkeypatch.setattr(data_mod, "_reachable", lambda host, timeout=3.0: True)
    monkeypatch.setitem(data_mod._TORCHVISION, "mnist", fail)
    root = tmp_path / "data"
    with pytest.raises(ToolkitError) as err:
        data_mod.load_split("mnist", root, train=True, download=True)
    assert "download failed: RuntimeError: Error downloading train-images-idx3-ubyte.gz)" in str(err.value)
    assert not root.exists()
    assert datasets.MNIST.mirrors  # the host is read from torchvision's own list
