"""The optimizer and the learning-rate scheduler a recipe asks for."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler

from toolkit.models.recipes import Recipe


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
