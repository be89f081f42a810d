"""The CIFAR-10 FT family (write-up 000): depthwise-separable and dilated convs, no max-pooling."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from toolkit.core.errors import ToolkitError
from toolkit.models.blocks import Dropout


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv then 1x1 pointwise conv, both with a bias (the source's separable conv);
    the BatchNorm and ReLU that follow belong to the block around it."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=True)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


# Dilation of the "transition" conv that closes blocks 1-3. A 3x3 conv with padding 1 and
# dilation d shrinks the map by 2(d-1): 32 -> 16 (d=9) -> 8 (d=5) -> 4 (d=3). That is how the
# the write-up's "dilation rates 9, 5, 3" replace max-pooling in a network that has none.
POOL_DILATIONS = (9, 5, 3)


@dataclass(frozen=True)
class FTLayout:
    widths: tuple[int, int, int, int]  # channels of blocks 1-4; the stem conv gives block 1's width
    blocks: tuple[str, str, str, str]  # layers per block in order: "c" = 3x3 conv, "d" = depthwise separable
    block3_dilation: int  # dilation (= padding) of block 3's 3x3 convs; block 4's after its first are dilated by 2
    hidden: int  # the Linear layer between the global average pool and the classifier
    conv1x1_before_gap: int = 0  # FT-1 only: a 1x1 conv (no bias) + BN + ReLU to this many channels before GAP
    source: str = ""


# Seed 000's code is public: repository Krishnakanth1993/Learnings, folder
# MNIST_Model/Reference/ERAS7/Model_Evolution/FineTune (model.py, and logs/ beside it). Its
# stored versions give FT-1 and FT-3 layer for layer; each hits the documented count exactly.
# Counted as the write-up counted them (torchsummary: the layers the forward pass uses; the
# source's model defines a few more that its forward skips, which are left out here). Facts taken
# from it: the stem is a 3x3 conv (no bias) + BN + ReLU; every 3x3 conv is bias-free and followed
# by BN, ReLU, Dropout2d; the dilated transition convs have a bias and are followed by BN only
# (no ReLU, no dropout); the depthwise and pointwise halves of a separable conv both have biases
# and one BN + ReLU + Dropout2d follows the pair; block 4's convs after the first are dilated by 2
# (padding 2); the head is AvgPool(4) -> Linear -> ReLU -> Linear.
# FT-2's version is not among the stored ones: its layout is the source's FT-1 code with the
# write-up's FT-2 changes (32 channels in blocks 1-3, no 1x1 conv before GAP, a depthwise
# separable conv opening block 4, head 64 -> 100 -> 10), which gives 179,318 exactly.
FT_LAYOUTS: dict[str, FTLayout] = {
    "ft1": FTLayout((16, 32, 32, 64), ("ccc", "ccc", "dc", "ccc"), 2, 100, conv1x1_before_gap=128,
                    source="Krishnakanth1993/Learnings ERAS7/Model_Evolution/FineTune/model.py (FT-1 version), 177,302"),
    "ft2": FTLayout((32, 32, 32, 64), ("ccc", "ccc", "dc", "dcc"), 2, 100,
                    source="FT-1's code with the write-up's FT-2 changes, 179,318"),
    "ft3": FTLayout((32, 32, 32, 64), ("cc", "ccc", "dcc", "dc"), 1, 128,
                    source="Krishnakanth1993/Learnings ERAS7/Model_Evolution/FineTune/model.py (FT-3 version), 144,426"),
}


class DilatedDepthwiseNet(nn.Module):
    """Seed 000, FT-1..FT-6: dilated transition convs + depthwise separable convs, no max-pool.

    A stem conv, then four blocks (see FT_LAYOUTS for each one's layers and their source);
    blocks 1-3 close with a dilated transition conv that halves the map; then global average
    pooling and a two-layer head. Options beyond the layout:

    - ``block3_dilation`` (FT-5: 2): the dilation of block 3's 3x3 convs; None keeps the
      layout's (FT-3's code: 1). It widens the receptive field and keeps the parameter count.
    - ``dropout_after``: ``"conv"`` (FT-1..5, Dropout2d after every conv block) or
      ``"pool"`` (FT-6, Dropout2d only after the transition convs, and Dropout after the first
      Linear layer: the write-up's "after pooling conv layers and FC layer").
    """

    def __init__(
        self,
        layout: str = "ft3",
        dropout: float = 0.05,
        block3_dilation: int | None = None,
        dropout_after: str = "conv",
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        if layout not in FT_LAYOUTS:
            raise ToolkitError(f"unknown FT layout {layout!r}; known: {', '.join(FT_LAYOUTS)}")
        if dropout_after not in ("conv", "pool"):
            raise ToolkitError(f"dropout_after must be 'conv' or 'pool', not {dropout_after!r}")
        if not 1 <= in_channels <= 4:
            raise ToolkitError(f"FT in_channels must be 1 to 4, not {in_channels!r}")
        spec = FT_LAYOUTS[layout]
        dil3 = spec.block3_dilation if block3_dilation is None else int(block3_dilation)
        if dil3 < 1:
            raise ToolkitError(f"block3_dilation must be 1 or more, not {block3_dilation!r}")
        per_conv = [nn.Dropout2d(dropout)] if dropout_after == "conv" and dropout > 0 else []
        per_pool = [nn.Dropout2d(dropout)] if dropout_after == "pool" and dropout > 0 else []

        def block_end(width: int) -> list[nn.Module]:
            return [nn.BatchNorm2d(width), nn.ReLU(inplace=True), *(copy.deepcopy(m) for m in per_conv)]

        layers: list[nn.Module] = [nn.Conv2d(in_channels, spec.widths[0], 3, padding=1, bias=False), *block_end(spec.widths[0])]
        cin = spec.widths[0]
        for block, (width, kinds) in enumerate(zip(spec.widths, spec.blocks)):
            for i, kind in enumerate(kinds):
                if kind == "d":
                    layers.append(DepthwiseSeparable(cin, width))
                else:
                    dilation = dil3 if block == 2 else (2 if block == 3 and i > 0 else 1)
                    layers.append(nn.Conv2d(cin, width, 3, padding=dilation, dilation=dilation, bias=False))
                layers += block_end(width)
                cin = width
            if block < 3:  # the transition: dilated conv with a bias, BN, no ReLU
                layers += [nn.Conv2d(cin, cin, 3, padding=1, dilation=POOL_DILATIONS[block], bias=True), nn.BatchNorm2d(cin)]
                layers += [copy.deepcopy(m) for m in per_pool]
        if spec.conv1x1_before_gap:
            layers += [nn.Conv2d(cin, spec.conv1x1_before_gap, 1, bias=False), *block_end(spec.conv1x1_before_gap)]
            cin = spec.conv1x1_before_gap
        # the source's AvgPool2d(4) on its 4x4 map; adaptive so that other input sizes work too
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Linear(cin, spec.hidden), nn.ReLU(inplace=True)]
        if dropout_after == "pool" and dropout > 0:
            head.append(Dropout(dropout))
        self.classifier = nn.Sequential(*head, nn.Linear(spec.hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
