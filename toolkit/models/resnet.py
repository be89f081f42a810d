"""ResNet20 (write-up 003): He et al.'s CIFAR ResNet with zero-padded shortcuts, and its heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.errors import ToolkitError
from toolkit.models.blocks import Dropout


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlockV1(nn.Module):
    """conv-BN-ReLU-conv-BN, add the shortcut, ReLU (Keras ResNet v1 ordering, biased convs)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = ZeroPadShortcut(cout - cin) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet20(nn.Module):
    """Seed 003: ResNet20 for CIFAR-10 as its Keras table gives it, 270,410 trainable parameters.

    Conv biases are kept (Keras ``use_bias=True``, which is how the table's 448 / 2,320 / 4,640
    counts arise) and the stride-2 shortcuts are option A (the table's ``lambda`` layers).
    ``head`` selects the follow-up experiments:

    - ``"plain"`` (experiments 1 and 5): GAP -> Dense(10).
    - ``"dropout"`` (experiment 4): GAP -> Dropout(p) -> Dense(10). The seed prints 270,602
      trainable / 1,568 non-trainable for it: 192 more of each, i.e. one BatchNorm over 96
      features that the text does not describe, so it is not reproduced; 270,410 here.
    - ``"dense"`` (experiments 2 and 3, "one more block"): GAP -> Dense(hidden) -> BN -> ReLU
      -> Dropout(p) -> Dense(10). The seed gives no width or count; ``hidden`` defaults to 64.
    """

    def __init__(self, head: str = "plain", dropout: float = 0.5, hidden: int = 64, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if head not in ("plain", "dropout", "dense"):
            raise ToolkitError(f"ResNet20 head must be 'plain', 'dropout' or 'dense', not {head!r}")
        if not 1 <= in_channels <= 4:
            raise ToolkitError(f"ResNet20 in_channels must be 1 to 4, not {in_channels!r}")
        # in_channels: 3 for the write-ups' CIFAR images; 1 adapts it to grey images (Fashion-MNIST's 28x28:
        # the global average pool takes any side)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=True), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlockV1(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        if head == "plain":
            self.classifier: nn.Module = nn.Linear(64, num_classes)
        elif head == "dropout":
            self.classifier = nn.Sequential(Dropout(dropout), nn.Linear(64, num_classes))
        else:
            self.classifier = nn.Sequential(
                nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), Dropout(dropout), nn.Linear(hidden, num_classes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.blocks(self.stem(x))))
