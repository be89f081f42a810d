"""The fast path's batch-wise augmentations: exact geometry, and the same distributions as torchvision / albumentations."""

import pytest
import numpy as np
import torch
from torchvision import transforms

from tests.helpers import RECIPES
from toolkit.data import loaders as data_mod
from toolkit.data import sources
from toolkit.core.datasets import facts
from toolkit.data.fast import TensorLoader, apply_batch, sample_params
from toolkit.models.recipes import Augment, CoarseDropout, ShiftScaleRotate, load_recipe

N = 4000


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda s: np.searchsorted(np.sort(s), grid, side="right") / len(s)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


# at alpha = 0.001 the critical KS distance for two samples of N is 1.95 * sqrt(2 / N) = 0.044
KS_CRITICAL = 1.95 * (2 / N) ** 0.5


def params_for(aug: Augment, n: int = N, size: int = 32, seed: int = 0) -> dict:
    return sample_params(aug, n, size, torch.Generator().manual_seed(seed))


def test_geometry_is_exact():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 1, 2] = 1.0  # one asymmetric pixel
    base = {"angle": torch.zeros(1), "scale": torch.ones(1), "shift": torch.zeros(1, 2), "flip": torch.zeros(1, dtype=torch.bool)}
    flip = apply_batch(x, Augment(hflip=1.0), {**base, "flip": torch.ones(1, dtype=torch.bool)}, nearest=True)
    assert torch.equal(flip, torch.flip(x, [3]))
    rot = apply_batch(x, Augment(rotation=90), {**base, "angle": torch.tensor([90.0])}, nearest=True)
    assert torch.equal(rot, torch.rot90(x, 1, [2, 3])) or torch.equal(rot, torch.rot90(x, -1, [2, 3]))
    shift = apply_batch(x, Augment(rotation=1), {**base, "shift": torch.tensor([[0.25, 0.0]])}, nearest=True)
    assert shift[0, 0, 1, 4] == 1.0 and shift.sum() == 1.0  # a quarter of 8 px = 2 px to the right
    crop = apply_batch(x, Augment(random_crop_padding=4), {"crop_dyx": torch.tensor([[1, -2]])}, nearest=True)
    assert crop[0, 0, 0, 4] == 1.0 and crop.sum() == 1.0  # window moved down 1, left 2: content moves up 1, right 2


def test_rotation_angles_match_torchvision():
    ours = params_for(Augment(rotation=7.0))["angle"].numpy()
    torch.manual_seed(0)
    theirs = np.array([transforms.RandomRotation.get_params([-7.0, 7.0]) for _ in range(N)])
    assert ks_statistic(ours, theirs) < KS_CRITICAL
    assert ours.min() >= -7 and ours.max() <= 7


def test_random_crop_offsets_match_torchvision():
    ours = params_for(Augment(random_crop_padding=4))["crop_dyx"].numpy()
    torch.manual_seed(0)
    padded = torch.zeros(3, 40, 40)
    theirs = np.array([transforms.RandomCrop.get_params(padded, (32, 32))[:2] for _ in range(N)]) - 4
    for axis in (0, 1):
        assert set(np.unique(ours[:, axis])) == set(range(-4, 5)) == set(np.unique(theirs[:, axis]))
        assert ks_statistic(ours[:, axis].astype(float), theirs[:, axis].astype(float)) < KS_CRITICAL


def _albumentations(aug: Augment, images: np.ndarray, seed: int = 0) -> np.ndarray:
    pipe = data_mod.albumentations_pipeline(aug, facts("cifar10"), train=True)
    pipe.set_random_seed(seed)
    spec = facts("cifar10")
    out = np.stack([pipe(image=img)["image"].numpy() for img in images])
    return out * np.array(spec.std)[:, None, None] + np.array(spec.mean)[:, None, None]  # back to [0, 1]


def _ours(aug: Augment, images: np.ndarray, seed: int = 0) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return apply_batch(x, aug, params_for(aug, len(images), seed=seed), nearest=False).numpy()


def test_coarse_dropout_holes_match_albumentations():
    aug = Augment(library="albumentations", coarse_dropout=CoarseDropout(holes=1, size=16, p=0.5))
    images = np.full((N, 32, 32, 3), 200, dtype=np.uint8)
    stats = {}
    for name, out in (("ours", _ours(aug, images)), ("albumentations", _albumentations(aug, images))):
        holes = out[:, 0] < 0.05
        area = holes.sum((1, 2))
        has = area > 0
        assert set(np.unique(area)) == {0, 256}  # exactly one 16x16 hole or none
        top = np.array([np.argwhere(h).min(0) for h in holes[has]])
        stats[name] = (has.mean(), top[:, 0], top[:, 1])
    (p1, y1, x1), (p2, y2, x2) = stats["ours"], stats["albumentations"]
    assert abs(p1 - 0.5) < 0.04 and abs(p2 - 0.5) < 0.04
    assert ks_statistic(y1, y2) < 2 * KS_CRITICAL and ks_statistic(x1, x2) < 2 * KS_CRITICAL
    assert y1.min() == 0 and y1.max() == 16  # hole corners cover every position inside the image


def _blob_centroids(out: np.ndarray) -> np.ndarray:
    w = out[:, 0]
    ys, xs = np.mgrid[: w.shape[1], : w.shape[2]]
    mass = w.sum((1, 2))
    return np.stack([(w * ys).sum((1, 2)) / mass, (w * xs).sum((1, 2)) / mass], 1)


def test_shift_scale_rotate_matches_albumentations():
    """Shift distribution (from the displacement of a centred blob) and how often the transform fires."""
    aug = Augment(library="albumentations", shift_scale_rotate=ShiftScaleRotate(shift=0.1, scale=0.1, rotate=15.0, p=0.5))
    images = np.zeros((N, 32, 32, 3), dtype=np.uint8)
    images[:, 14:18, 14:18] = 255  # a blob at the centre: rotation and scale barely move its centroid
    source = images.transpose(0, 3, 1, 2) / 255
    shifts = {}
    for name, out in (("ours", _ours(aug, images)), ("albumentations", _albumentations(aug, images))):
        fired = np.abs(out - source).reshape(len(out), -1).max(1) > 1e-3
        assert abs(fired.mean() - 0.5) < 0.04, name  # p = 0.5
        # whole-pixel shifts: round away float noise so the two discrete distributions compare
        shifts[name] = d = np.round(_blob_centroids(out[fired]) - 15.5, 1)
        assert np.abs(d).max() <= 0.1 * 32 + 0.5  # shift limit 10% of 32 px
    a, b = shifts["ours"], shifts["albumentations"]
    for axis in (0, 1):
        assert ks_statistic(a[:, axis], b[:, axis]) < 2 * KS_CRITICAL


def test_flip_rate():
    flips = params_for(Augment(hflip=0.5))["flip"].float().mean().item()
    assert abs(flips - 0.5) < 0.04


def test_tensor_loader_matches_the_torchvision_test_pipeline(mnist_root):
    recipe = load_recipe(RECIPES / "fine4.toml")
    x, y, classes = data_mod.split_arrays("mnist", mnist_root, train=False, download=False)
    spec = facts("mnist")
    loader = TensorLoader(x[:100], y[:100], 64, normalization={"mean": spec.mean, "std": spec.std}, generator=None, shuffle=False)
    xb, yb = next(iter(loader))
    reference = sources.build_dataset(recipe, mnist_root, train=False, download=False)
    expected = torch.stack([reference[i][0] for i in range(64)])
    assert torch.allclose(xb, expected, atol=1e-6) and torch.equal(yb, y[:64])
    assert len(loader) == 2 and loader.num_samples() == 100 and classes == [str(i) for i in range(10)]


@pytest.mark.parametrize("library", ["torchvision", "albumentations"])
def test_a_flip_alone_is_a_reversal_with_the_resampling_s_pixels(library):
    """Flip-only augmentation skips grid_sample; the pixels are those grid_sample gives."""
    import torch.nn.functional as F

    from toolkit.data.fast import affine_theta, apply_batch, sample_params
    from toolkit.models.recipes import Augment

    aug = Augment(library=library, hflip=0.5, random_crop_padding=4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g)
    params = sample_params(aug, 64, 32, torch.Generator().manual_seed(1))
    assert 0 < int(params["flip"].sum()) < 64
    fast = apply_batch(x, aug, params, nearest=library == "torchvision")
    grid = F.affine_grid(affine_theta(params), list(x.shape), align_corners=False)
    for mode in ("nearest", "bilinear"):
        resampled = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
        no_flip = {k: v for k, v in params.items() if k != "flip"} | {"flip": torch.zeros(64, dtype=torch.bool)}
        expected = apply_batch(resampled, Augment(library=library, random_crop_padding=4), no_flip, nearest=True)
        assert torch.equal(fast, expected)
