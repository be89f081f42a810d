"""ResNet44V2 (write-up 004): pre-activation residual blocks, as the write-up's published code builds them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.errors import ToolkitError
from toolkit.models.blocks import Dropout


class BasicBlockV2(nn.Module):
    """Pre-activation block: BN-ReLU, then conv3x3-BN-ReLU-conv3x3, plus the shortcut.

    ``design="source"`` is write-up 004's published code: the shortcut (identity, or a 1x1 conv -> BN
    projection when the shape changes) takes the block's pre-activated input ReLU(BN(x)).
    ``design="he2016"`` is He et al.'s "identity mappings" reading: the identity shortcut takes x
    itself and the projection is a bare 1x1 conv.
    """

    def __init__(self, cin: int, cout: int, stride: int, design: str = "source"):
        super().__init__()
        self.design = design
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            projection = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.shortcut = nn.Sequential(projection, nn.BatchNorm2d(cout)) if design == "source" else projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        if self.shortcut is not None:
            shortcut = self.shortcut(pre)
        else:
            shortcut = pre if self.design == "source" else x
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNetV2(nn.Module):
    """Seed 004: ResNet44V2 for CIFAR-100, pre-activation BasicBlockV2, 5,941,316 parameters.

    Source: the write-up is published with its code, repository ``erkarthi17/ERA``, folder
    ``Week_8_RESNET_CIFAR_from_Scratch`` (``model.py``; ``logs_RESNET.md`` is the write-up). Its
    ResNet44V2 is what ``design="source"`` (the default) builds, in this module's own code:

    - stem: conv3x3(3 -> 32, no bias) -> BN -> ReLU;
    - four stages, [7, 7, 7, 3] blocks x [32, 64, 128, 256] channels, the first block of stages 2-4
      with stride 2 and a 1x1 conv -> BN projection shortcut;
    - every shortcut, identity included, takes the block's pre-activated input ReLU(BN(x));
    - head: BN -> ReLU -> global average pool -> Dropout(0.1) -> Linear(256, 100).

    That is 5,941,316 trainable parameters with 100 classes, and it is the network behind the
    74.86%. The write-up's "~2.7M parameters" is a mistake of the write-up. A three-stage
    reading (three stages of 7 blocks at [32, 64, 128], i.e. ResNet-44 as 6n+2 with n = 7, and
    He et al.'s block: a bare conv stem, bare 1x1 projections, identity shortcuts from x;
    2,647,684 parameters) is available as the model ``resnet44v2_3stage`` (``stages=(7, 7, 7)``, ``widths=(32, 64, 128)``, ``design="he2016"``).
    """

    def __init__(
        self,
        stages: tuple[int, ...] = (7, 7, 7, 3),
        widths: tuple[int, ...] = (32, 64, 128, 256),
        dropout: float = 0.1,
        num_classes: int = 100,
        design: str = "source",
        in_channels: int = 3,
    ):
        super().__init__()
        stages, widths = tuple(stages), tuple(widths)
        if len(stages) != len(widths) or not stages:
            raise ToolkitError("ResNetV2 needs as many stage depths as stage widths")
        if design not in ("source", "he2016"):
            raise ToolkitError(f"ResNetV2 design must be 'source' or 'he2016', not {design!r}")
        if not 1 <= in_channels <= 4:
            raise ToolkitError(f"ResNetV2 in_channels must be 1 to 4, not {in_channels!r}")
        conv = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.stem: nn.Module = nn.Sequential(conv, nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)) if design == "source" else conv
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, (depth, width) in enumerate(zip(stages, widths)):
            for j in range(depth):
                blocks.append(BasicBlockV2(cin, width, 2 if (i > 0 and j == 0) else 1, design))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), Dropout(dropout), nn.Linear(cin, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
