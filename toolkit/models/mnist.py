"""The MNIST family (write-ups 001 and 002): seven 3x3 convs with 1x1 transitions, Opt's and Fine's heads."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.core.errors import ToolkitError
from toolkit.models.blocks import Dropout, check_channels, conv_bn_relu


def seven_conv_stack(widths: tuple[int, ...], in_channels: int, dropout: float, early_padding: int) -> list[nn.Module]:
    """The MNIST nets' feature stack (seeds 001 and 002): seven 3x3 conv-BN-ReLU blocks of ``widths``
    output channels, max-pooled after the third and the fifth, Dropout(p) after every block but the
    first; ``early_padding`` pads the first five (1) or the last two (0) (the write-ups' two readings)."""
    check_channels(in_channels)
    if early_padding not in (0, 1):
        raise ToolkitError(f"early_padding must be 0 or 1, not {early_padding!r}")
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip((in_channels, *widths[:-1]), widths)):
        layers += conv_bn_relu(cin, cout, padding=early_padding if i < 5 else 1 - early_padding)
        if i > 0 and dropout > 0:
            layers.append(Dropout(dropout))
        if i in (2, 4):
            layers.append(nn.MaxPool2d(2, 2))
    return layers


class MnistOptNet(nn.Module):
    """Seed 002, Opt-1 / Opt-2: 6,132 parameters.

    Bias-free 3x3 convs + BatchNorm, channels 10,10,10 | pool | 8,8 | pool | 8,8, then
    Linear(72, 20) and Linear(20, 10). The write-up fixes the flattened size at 72 = 8x3x3,
    which two paddings give: ``early_padding=1`` (default) keeps the first four convs' size
    (28, pool 14, pool 7) and leaves the last two unpadded (7->5->3); ``early_padding=0``
    leaves the first four unpadded (28->26->24->22, pool 11->9->7, pool 3) and pads the last
    two. The default is the reading that reproduced the Fine series' accuracy (MnistGapNet),
    which the write-ups present as the same design (opt2's figures: the README's recipe table).
    A ReLU sits between the two Linear layers (without it they would collapse into one).
    Opt-2 adds Dropout(p) after every conv block but the first, as the write-up's diagram marks.
    """

    def __init__(self, dropout: float = 0.0, early_padding: int = 1, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(*seven_conv_stack((10, 10, 10, 8, 8, 8, 8), in_channels, dropout, early_padding))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(72, 20), nn.ReLU(inplace=True), nn.Linear(20, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MnistGapNet(nn.Module):
    """Seed 001, Fine-1..4: the "dual FC + GAP" CNN, 7,974 parameters.

    Source: the write-up's code, repository Krishnakanth1993/Learnings,
    MNIST_Model/Reference/ERAS6/Model_Evolution/Fine_Tuning/model.py: padding 1 on the first
    five convs and 0 on the last two (``early_padding=1``), bias-free convs, Dropout after every
    conv block but the first, AvgPool2d(3), Linear(8, 28) -> ReLU -> Linear(28, 10).

    Bias-free 3x3 convs + BatchNorm, channels 12,12,12 | pool | 10,10 | pool | 16,8, then a
    3x3 global average pool, Linear(8, 28), ReLU, Linear(28, 10). Dropout(p) follows every
    conv block but the first, as in the write-up's diagram. The write-up does not give padding;
    two readings give its 3x3 map before AvgPool2d(3) and the same 7,974 parameters:

    - ``early_padding=1`` (default): the first five convs keep their size (28, pool 14,
      pool 7) and the last two are unpadded (7->5->3).
    - ``early_padding=0``: the first five convs are unpadded (28->26->24->22, pool 11->9->7,
      pool 3) and the last two use padding 1; 0.6x the multiply-adds.

    Reading 1 reproduces the seed; reading 0 falls short of it (docs/benchmarks.md, "Figures
    behind the code").
    """

    def __init__(self, dropout: float = 0.05, early_padding: int = 1, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(*seven_conv_stack((12, 12, 12, 10, 10, 16, 8), in_channels, dropout, early_padding), nn.AvgPool2d(3))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8, 28), nn.ReLU(inplace=True), nn.Linear(28, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
