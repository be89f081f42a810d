"""The small building blocks the model families share."""

from __future__ import annotations

import numpy as np
import torch
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


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose training masks on the CPU come from NumPy's PCG64 generator.

    torch's CPU dropout draws its mask element by element from one Mersenne Twister (~4 ms for one
    64x12x28x28 activation here, a sixth of fine4's whole training step); PCG64 fills the same
    uniform floats in a fifth of that. The rest is aten's own arithmetic: an element is kept where its
    uniform float32 draw is >= p and scaled by 1/(1-p), the output is ``x * (keep * scale)`` (the
    same products as ``F.dropout``'s ``x * keep * scale``, since keep is 0 or 1) and the gradient is
    the same mask times the incoming gradient. Each call seeds a fresh PCG64 from torch's default
    generator, so ``torch.manual_seed`` and the saved torch RNG state (resume) govern these masks as
    they govern torch's own. Evaluation, other devices, tracing and compiling use ``nn.Dropout``
    unchanged, so exports and GPU steps (CUDA graphs) are as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.inplace or not 0.0 < self.p < 1.0 or x.device.type != "cpu" \
                or x.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return super().forward(x)
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        uniform = torch.from_numpy(np.random.Generator(np.random.PCG64(seed)).random(x.numel(), dtype=np.float32)).view(x.shape)
        return x * (uniform >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))


def with_torch_dropout(model: nn.Module) -> int:
    """Put torch's own ``nn.Dropout`` where ``model`` has the toolkit's (the write-ups' modules, for the
    benchmarks that time their pipeline against the toolkit's); returns how many were replaced."""
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, Dropout):
                setattr(parent, name, nn.Dropout(child.p, child.inplace))
                swapped += 1
    return swapped
