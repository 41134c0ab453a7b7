"""AttentionRead: the nn.Module around ``rwmn.ops.attention_read``.

May import: torch, rwmn.ops.
"""

from __future__ import annotations

import torch
from torch import nn

from rwmn import ops


class AttentionRead(nn.Module):
    """o = sum_r softmax(sharp * <u, r>)_r r over the rows r (optionally unit-normalised)."""

    def __init__(self, sharp: float = 1.0, normalize: bool = True) -> None:
        super().__init__()
        self.sharp, self.normalize = sharp, normalize

    def forward(self, rows: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.attention_read(rows, u, self.sharp, self.normalize)

    def extra_repr(self) -> str:
        return f"sharp={self.sharp}, normalize={self.normalize}"
