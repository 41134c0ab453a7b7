"""MemoryConv and MemoryConvStack: nn.Modules around ``rwmn.ops.memory_conv``.

May import: torch, rwmn.config, rwmn.ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from rwmn import ops
from rwmn.config import LayerSpec


class MemoryConv(nn.Module):
    """A write/read layer: kernel [c_out, c_in, k, d] spanning the width, stride (s, 1),
    TensorFlow SAME padding, bias, ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, width: int) -> None:
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel, width))
        self.bias = nn.Parameter(torch.empty(c_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation (kaiming-uniform with a = sqrt(5), fan-in bias bound).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.memory_conv(x, self.weight, self.bias, self.stride)

    def extra_repr(self) -> str:
        c_out, c_in, k, d = self.weight.shape
        return f"{c_in} -> {c_out}, kernel {k}x{d}, stride ({self.stride}, 1)"


class MemoryConvStack(nn.Module):
    """Layers from a "k-s-c/..." spec; x [..., c_in, n, d] -> [..., c_last, m, d]."""

    def __init__(self, layers: Sequence[LayerSpec], c_in: int, width: int) -> None:
        super().__init__()
        convs = []
        for layer in layers:
            convs.append(MemoryConv(c_in, layer.channels, layer.kernel, layer.stride, width))
            c_in = layer.channels
        self.convs = nn.ModuleList(convs)
        self.out_channels = c_in

    def __len__(self) -> int:
        return len(self.convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return x
