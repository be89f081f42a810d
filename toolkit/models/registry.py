"""Model zoo: every architecture of the write-ups, registered by name.

Recipes, the CLI listing and the tests all read ``MODELS``; a model is added in one place.
Each entry records the parameter count its write-up documents, and ``tests/models/test_models.py``
asserts it. Where a write-up leaves a choice open, the docstring of the builder says which
reading was taken and why.
"""


from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from toolkit.core.errors import ToolkitError
from toolkit.models.cifar_ft import FT_LAYOUTS, DilatedDepthwiseNet
from toolkit.models.mnist import MnistGapNet, MnistOptNet
from toolkit.models.resnet import ResNet20
from toolkit.models.resnet_v2 import ResNetV2


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    defaults: dict
    documented_params: int
    exact: bool  # the write-up pins the layers, so the count must match exactly
    source: str
    channels: int  # of the input images it was written for (toolkit.core.datasets gives each dataset's)

    def build(self, **options) -> nn.Module:
        return self.builder(**{**self.defaults, **options})


def _entries() -> dict[str, ModelEntry]:
    ft = DilatedDepthwiseNet
    rows = [
        ModelEntry("mnist_opt", MnistOptNet, {"dropout": 0.0}, 6_132, True, "seeds/002 Opt-1/Opt-2", 1),
        ModelEntry("mnist_gap", MnistGapNet, {"dropout": 0.05}, 7_974, True,
                   "seeds/001 Fine-1..4; Krishnakanth1993/Learnings ERAS6/Model_Evolution/Fine_Tuning/model.py", 1),
        ModelEntry("cifar_ft1", ft, {"layout": "ft1"}, 177_302, True, "seeds/000 FT-1; " + FT_LAYOUTS["ft1"].source, 3),
        ModelEntry("cifar_ft2", ft, {"layout": "ft2"}, 179_318, True, "seeds/000 FT-2; " + FT_LAYOUTS["ft2"].source, 3),
        ModelEntry("cifar_ft3", ft, {"layout": "ft3"}, 144_426, True, "seeds/000 FT-3/FT-4; " + FT_LAYOUTS["ft3"].source, 3),
        ModelEntry("cifar_ft5", ft, {"layout": "ft3", "block3_dilation": 2}, 144_426, True, "seeds/000 FT-5; FT-3's code, block 3 dilated", 3),
        ModelEntry("cifar_ft6", ft, {"layout": "ft3", "block3_dilation": 2, "dropout_after": "pool"}, 144_426, True,
                   "seeds/000 FT-6; FT-5 with dropout after the transition convs and the first Linear", 3),
        ModelEntry("resnet20", ResNet20, {"head": "plain"}, 270_410, True, "seeds/003 experiments 1, 5", 3),
        ModelEntry("resnet20_dropout", ResNet20, {"head": "dropout"}, 270_410, True, "seeds/003 experiment 4", 3),
        ModelEntry("resnet20_dense", ResNet20, {"head": "dense"}, 274_698, True, "seeds/003 experiments 2, 3 (width chosen here)", 3),
        ModelEntry("resnet44v2", ResNetV2, {}, 5_941_316, True, "seeds/004; erkarthi17/ERA Week_8_RESNET_CIFAR_from_Scratch/model.py", 3),
        ModelEntry("resnet44v2_3stage", ResNetV2, {"stages": (7, 7, 7), "widths": (32, 64, 128), "design": "he2016"}, 2_647_684, True,
                   "seeds/004's name read as ResNet-44 (6n+2, n = 7) with He et al. 2016 blocks; not the source's network", 3),
    ]
    return {row.name: row for row in rows}


MODELS: dict[str, ModelEntry] = _entries()


def create_model(name: str, **options) -> nn.Module:
    """Build a registered model; unknown names or options are a ToolkitError naming them."""
    if name not in MODELS:
        raise ToolkitError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    entry = MODELS[name]
    accepted = set(inspect.signature(entry.builder).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ToolkitError(f"model {name!r} has no option {unknown[0]!r}; options: {', '.join(sorted(accepted))}")
    try:
        return entry.build(**options)
    except (TypeError, ValueError) as exc:
        raise ToolkitError(f"model {name!r}: bad options ({exc})") from exc


def takes_option(name: str, option: str) -> bool:
    return option in inspect.signature(MODELS[name].builder).parameters


def resolved_options(name: str, options: dict) -> dict:
    """Every builder option spelled out (defaults included, the class count left out).

    Checkpoints store these, so a model rebuilt later is the model that was trained even if a
    default changes in between.
    """
    entry = MODELS[name]
    params = inspect.signature(entry.builder).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty and k != "num_classes"}
    merged = {**defaults, **entry.defaults, **options}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in merged.items()}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
