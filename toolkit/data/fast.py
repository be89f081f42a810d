"""The fast data path: a whole split as one uint8 tensor on the training device, augmented batch-wise.

MNIST and CIFAR fit in memory many times over, so per-sample PIL transforms and DataLoader
workers are pure overhead. Here each batch is indexed out of the resident tensor and the
recipe's augmentations run on the whole batch at once, with the parameter ranges of the
torchvision / albumentations pipelines they replace:

- rotation (torchvision RandomRotation): angle ~ U(-d, d), nearest interpolation, zero fill;
- hflip (HorizontalFlip / RandomHorizontalFlip): with probability p;
- shift_scale_rotate (albumentations Affine as the FT recipes configure it): with
  probability p, a shift of int(U(-s, s) * size) whole pixels per axis (albumentations
  truncates), scale ~ U(1-s, 1+s), angle ~ U(-r, r), bilinear, zero fill;
- coarse_dropout (CoarseDropout): with probability p, ``holes`` squares of ``size`` pixels at a
  uniformly random place inside the image, filled with 0;
- random_crop_padding (RandomCrop(size, padding)): zero-pad and crop back, i.e. an integer
  shift ~ U{-pad..pad} per axis.

An epoch is laid out ahead as an ``EpochPlan``: the training order and every image's augmentation
parameters, drawn at once on the data's device by a generator seeded from the loader's generator
(whose state the training checkpoint saves, so resuming stays exact). The eager loop reads the plan
batch by batch; the step engine (``toolkit.train.engine``) indexes it on the device inside its step, so
both see the same images in the same order with the same augmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toolkit.models.recipes import Augment


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=g.device)


def sample_params(aug: Augment, n: int, size: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-sample transform parameters for ``n`` images of ``size`` x ``size``, drawn on ``g``'s device."""
    dev = g.device
    params: dict[str, torch.Tensor] = {}
    angle = torch.zeros(n, device=dev)
    scale = torch.ones(n, device=dev)
    shift = torch.zeros(n, 2, device=dev)  # fraction of the image size, (x, y)
    if aug.rotation:
        angle += _uniform(n, -aug.rotation, aug.rotation, g)
    if aug.shift_scale_rotate:
        ssr = aug.shift_scale_rotate
        on = torch.rand(n, generator=g, device=dev) < ssr.p
        angle += torch.where(on, _uniform(n, -ssr.rotate, ssr.rotate, g), torch.zeros(n, device=dev))
        scale = torch.where(on, _uniform(n, 1 - ssr.scale, 1 + ssr.scale, g), scale)
        # albumentations shifts by whole pixels: int(U(-s, s) * size), truncated toward zero
        pixels = torch.trunc(_uniform(2 * n, -ssr.shift, ssr.shift, g).view(n, 2) * size)
        shift = torch.where(on[:, None], pixels / size, shift)
    params.update(angle=angle, scale=scale, shift=shift)
    params["flip"] = torch.rand(n, generator=g, device=dev) < aug.hflip if aug.hflip else torch.zeros(n, dtype=torch.bool, device=dev)
    if aug.coarse_dropout:
        cd = aug.coarse_dropout
        params["hole_on"] = torch.rand(n, generator=g, device=dev) < cd.p
        # top-left corners such that each hole lies inside the image
        params["hole_yx"] = torch.randint(0, size - cd.size + 1, (n, cd.holes, 2), generator=g, device=dev)
    if aug.random_crop_padding:
        pad = aug.random_crop_padding
        params["crop_dyx"] = torch.randint(-pad, pad + 1, (n, 2), generator=g, device=dev)
    return params


def prepared(aug: Augment, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` with the affine matrices computed once (``theta``) in place of angle/scale/shift,
    so a step that takes a batch of them only gathers rows (same values as computing per batch)."""
    if not (aug.rotation or aug.shift_scale_rotate):
        return params
    rest = {k: v for k, v in params.items() if k not in ("angle", "scale", "shift", "flip")}
    return {**rest, "theta": affine_theta(params)}


@dataclass
class EpochPlan:
    """One epoch laid out ahead on the data's device: ``order`` (the training images in the order
    they are taken) and ``params`` (each taken image's augmentation parameters, row for row)."""

    order: torch.Tensor
    params: dict[str, torch.Tensor]

    def rows(self, rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The images and parameters at plan positions ``rows`` (a slice or a device index tensor)."""
        return self.order[rows], {k: v[rows] for k, v in self.params.items()}

    def copy_(self, other: "EpochPlan") -> None:
        """Take ``other``'s values into this plan's tensors (a captured step reads them by address)."""
        self.order.copy_(other.order)
        for k, v in self.params.items():
            v.copy_(other.params[k])


def epoch_generator(loader_rng: torch.Generator, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` for one epoch's plan, seeded by one draw from ``loader_rng``."""
    seed = int(torch.randint(2**62, (1,), generator=loader_rng))
    return torch.Generator(device=device).manual_seed(seed)


def affine_theta(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n, 2, 3) matrices for F.affine_grid: flip, then rotate/scale/shift about the centre."""
    a = params["angle"] * math.pi / 180
    cos, sin = torch.cos(a) / params["scale"], torch.sin(a) / params["scale"]
    # inverse of p_out = s R(a) p_in + t, in normalized coordinates (shift x2: [-1, 1] spans the size)
    inv = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)
    t = 2 * params["shift"]
    offset = -(inv @ t.unsqueeze(-1)).squeeze(-1)
    theta = torch.cat([inv, offset.unsqueeze(-1)], 2)
    flip = torch.where(params["flip"], -1.0, 1.0)
    theta[:, 0, :] *= flip[:, None]  # flipping the input's x axis comes first
    return theta


def apply_batch(x: torch.Tensor, aug: Augment, params: dict[str, torch.Tensor], nearest: bool) -> torch.Tensor:
    """Augment a float batch in [0, 1] (n, c, h, w) on its device."""
    n, _, h, w = x.shape
    dev = x.device
    geometric = bool(aug.rotation or aug.shift_scale_rotate)
    if aug.hflip and not geometric:
        # a flip alone (the ResNet recipes' RandomCrop + flip) is an index reversal: grid_sample
        # would give the same pixels (tests/data/test_fastdata.py) for a full resampling's cost
        flip = params["flip"].to(dev, non_blocking=True).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    elif geometric:
        theta = (params["theta"] if "theta" in params else affine_theta(params)).to(dev, non_blocking=True)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest" if nearest else "bilinear", padding_mode="zeros", align_corners=False)
    if "hole_on" in params:
        size = aug.coarse_dropout.size
        ys = torch.arange(h, device=dev).view(1, 1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, 1, w)
        yx = params["hole_yx"].to(dev, non_blocking=True)
        y0, x0 = yx[..., 0].view(n, -1, 1, 1), yx[..., 1].view(n, -1, 1, 1)
        holes = ((ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)).any(1, keepdim=True)
        holes &= params["hole_on"].to(dev, non_blocking=True).view(n, 1, 1, 1)
        x = x.masked_fill(holes, 0.0)
    if "crop_dyx" in params:
        pad = aug.random_crop_padding
        padded = F.pad(x, (pad, pad, pad, pad))
        d = params["crop_dyx"].to(dev, non_blocking=True) + pad
        rows = (d[:, 0:1] + torch.arange(h, device=dev)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
        x = padded.gather(2, rows)
        cols = (d[:, 1:2] + torch.arange(w, device=dev)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
        x = x.gather(3, cols)
    return x


class TensorLoader:
    """Batches of a resident uint8 split: shuffled with ``generator``, augmented, normalized."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, normalization: dict, generator: torch.Generator | None,
                 shuffle: bool, augment: Augment | None = None, device: torch.device | str = "cpu", shard: tuple[int, int] = (0, 1)):
        """``shard=(rank, world)``: this process takes every world-th sample of a permutation all
        ranks share, the same number on every rank (the remainder is dropped when training), so
        the ranks' generators stay in step and their shards never overlap."""
        self.x, self.y = x.to(device), y.to(device)
        self.rank, self.world = shard
        self.batch_size, self.shuffle, self.generator, self.augment = batch_size, shuffle, generator, augment
        self.mean = torch.tensor(normalization["mean"], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(normalization["std"], device=device).view(1, -1, 1, 1)
        # torchvision's RandomRotation samples nearest pixels; albumentations' Affine interpolates
        self.nearest = bool(augment and augment.library == "torchvision")

    def _shard(self, order: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return order
        if self.shuffle:  # training: equal shards
            order = order[: len(order) - len(order) % self.world]
        return order[self.rank :: self.world]

    def num_samples(self) -> int:
        return len(self._shard(torch.arange(len(self.y))))

    def __len__(self) -> int:
        return math.ceil(self.num_samples() / self.batch_size)

    def plan(self) -> EpochPlan:
        """The next epoch's order and augmentation parameters (one draw from the loader's generator)."""
        dev = self.x.device
        if not self.shuffle:
            return EpochPlan(self._shard(torch.arange(len(self.y), device=dev)), {})
        g = epoch_generator(self.generator, dev)
        order = self._shard(torch.randperm(len(self.y), generator=g, device=dev))
        params = prepared(self.augment, sample_params(self.augment, len(order), self.x.shape[-1], g)) if self.augment is not None else {}
        return EpochPlan(order, params)

    def batch(self, plan: EpochPlan, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalized, augmented batch at plan positions ``rows`` and its labels."""
        idx, params = plan.rows(rows)
        xb = self.x[idx].float().div_(255)
        if self.augment is not None:
            xb = apply_batch(xb, self.augment, params, self.nearest)
        return (xb - self.mean) / self.std, self.y[idx]

    def __iter__(self):
        plan = self.plan()
        for start in range(0, len(plan.order), self.batch_size):
            yield self.batch(plan, slice(start, start + self.batch_size))
