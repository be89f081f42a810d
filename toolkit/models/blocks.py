"""The small building blocks the model families share."""

from __future__ import annotations

from torch import nn

from toolkit.core.errors import ToolkitError


def check_channels(in_channels: int) -> None:
    if not isinstance(in_channels, int) or not 1 <= in_channels <= 4:
        raise ToolkitError(f"in_channels must be 1 to 4, not {in_channels!r}")


def conv_bn_relu(cin: int, cout: int, *, padding: int = 0, dilation: int = 1, bias: bool = False) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=padding, dilation=dilation, bias=bias),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
