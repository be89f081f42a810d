"""A pruned model's layer widths: recorded in its checkpoint, given back to a freshly built model so the
checkpoint's state dict loads."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.core.errors import ToolkitError


_WIDTH_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm2d: ("num_features",),
    nn.BatchNorm1d: ("num_features",),
    nn.Linear: ("in_features", "out_features"),
}


def layer_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Channel / feature counts of every layer: what structured pruning changes."""
    return {
        name: {a: int(getattr(m, a)) for a in _WIDTH_ATTRS[type(m)]}
        for name, m in model.named_modules()
        if type(m) in _WIDTH_ATTRS
    }


def apply_layer_widths(model: nn.Module, widths: dict[str, dict[str, int]], state_dict: dict) -> nn.Module:
    """Give a freshly built model the (pruned) widths a checkpoint records, so its state dict loads."""
    modules = dict(model.named_modules())
    for name, attrs in widths.items():
        module = modules.get(name)
        if module is None:
            raise ToolkitError(f"checkpoint names layer {name!r}, which this model does not have")
        if all(getattr(module, a) == v for a, v in attrs.items()):
            continue
        for a, v in attrs.items():
            setattr(module, a, v)
        for pname, _ in list(module.named_parameters(recurse=False)):
            setattr(module, pname, nn.Parameter(torch.empty_like(state_dict[f"{name}.{pname}"])))
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and f"{name}.{bname}" in state_dict:
                module.register_buffer(bname, torch.empty_like(state_dict[f"{name}.{bname}"]))
    return model
