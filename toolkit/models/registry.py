"""Model zoo: every architecture of the write-ups, registered by name.

Recipes, the CLI listing and the tests all read ``MODELS``; a model is added in one place.
Each entry records the parameter count its write-up documents, and ``tests/models/test_models.py``
asserts it. Where a write-up leaves a choice open, the docstring of the builder says which
reading was taken and why.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.errors import ToolkitError


def _check_channels(in_channels: int) -> None:
    if not isinstance(in_channels, int) or not 1 <= in_channels <= 4:
        raise ToolkitError(f"in_channels must be 1 to 4, not {in_channels!r}")


def conv_bn_relu(cin: int, cout: int, *, padding: int = 0, dilation: int = 1, bias: bool = False) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=padding, dilation=dilation, bias=bias),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


# --------------------------------------------------------------------------- MNIST


def seven_conv_stack(widths: tuple[int, ...], in_channels: int, dropout: float, early_padding: int) -> list[nn.Module]:
    """The MNIST nets' feature stack (seeds 001 and 002): seven 3x3 conv-BN-ReLU blocks of ``widths``
    output channels, max-pooled after the third and the fifth, Dropout(p) after every block but the
    first; ``early_padding`` pads the first five (1) or the last two (0) (the write-ups' two readings)."""
    _check_channels(in_channels)
    if early_padding not in (0, 1):
        raise ToolkitError(f"early_padding must be 0 or 1, not {early_padding!r}")
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip((in_channels, *widths[:-1]), widths)):
        layers += conv_bn_relu(cin, cout, padding=early_padding if i < 5 else 1 - early_padding)
        if i > 0 and dropout > 0:
            layers.append(nn.Dropout(dropout))
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


# --------------------------------------------------------------------------- CIFAR-10 FT family


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
            head.append(nn.Dropout(dropout))
        self.classifier = nn.Sequential(*head, nn.Linear(spec.hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- ResNet20 (write-up 003)


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
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(64, num_classes))
        else:
            self.classifier = nn.Sequential(
                nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.blocks(self.stem(x))))


# --------------------------------------------------------------------------- ResNet44V2 (write-up 004)


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
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


# --------------------------------------------------------------------------- registry


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


# --------------------------------------------------------------------------- pruned widths

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
