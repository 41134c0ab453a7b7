"""ReadNetwork: the nn.Module around ``rwmn.ops.read_network`` (docs/model.md section 4).

May import: torch, rwmn.cbp, rwmn.config, rwmn.memconv, rwmn.ops, rwmn.padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rwmn import ops
from rwmn.cbp import CompactBilinearPooling
from rwmn.config import LayerSpec
from rwmn.memconv import MemoryConvStack
from rwmn.padding import Padding, masked_attention_read, padded_conv_stack


def legacy_rows(memory: torch.Tensor) -> torch.Tensor:
    """The release's reshape of an NHWC conv output [1, m, d, c] to rows [-1, d].

    ``memory`` is our channel-first [c, m, d]; row-major flattening of [m, d, c] interleaves
    the channel values into the rows when c > 1 (docs/model.md section 6).
    """
    return memory.permute(1, 2, 0).reshape(-1, memory.shape[-1])


class ReadNetwork(MemoryConvStack):
    """Read convolutions, the query-dependent CBP memory and the attention readout.

    Paper mode: Mq = CBP(M, u) per question, the read convs over Mq, attention over the
    unit-normalised (channel, slot) rows. Empty read spec: attention over M's rows.
    Legacy mode: the read convs run over the release's interleaved rows of M (no CBP);
    see docs/model.md section 6.
    """

    def __init__(
        self,
        layers: Sequence[LayerSpec],
        memory_channels: int,
        width: int,
        sharp: float = 1.0,
        legacy: bool = False,
        cbp_hash: str = "random",
    ) -> None:
        # Legacy reads the reshaped memory as a one-channel image.
        super().__init__(layers, 1 if legacy else memory_channels, width)
        self.sharp, self.legacy = sharp, legacy
        self.cbp = (
            CompactBilinearPooling(width, width, width, cbp_hash) if layers and not legacy else None
        )

    def prepare(self, memory: torch.Tensor):
        """What every hop's read of ``memory`` shares (rwmn.ops.prepare_read), or None."""
        if self.legacy or not len(self):
            return None
        return ops.prepare_read(
            memory,
            self.cbp.hashes,
            [conv.weight for conv in self.convs],
            [conv.bias for conv in self.convs],
        )

    def forward(
        self, memory: torch.Tensor, u: torch.Tensor, prepared=None, padding: Padding | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """memory [C, m, d], u [B, d] -> o [B, d], attention p [B, R]. ``prepared``:
        self.prepare(memory), computed once for several hops (optional). ``padding``: the
        memory is padded to M slots, the past-m ones zero (RWMN.forward with padding)."""
        if padding is not None:
            return self._padded(memory, u, padding)
        if self.legacy:
            rows = legacy_rows(memory)
            if not len(self):
                return ops.attention_read(rows, u, self.sharp, normalize=False)
            read = super().forward(rows.unsqueeze(0))
            return ops.attention_read(legacy_rows(read), u, self.sharp, normalize=True)
        if not len(self):
            return ops.attention_read(memory.flatten(0, 1), u, self.sharp, normalize=True)
        return ops.read_network(
            memory,
            u,
            self.cbp.hashes,
            [conv.weight for conv in self.convs],
            [conv.bias for conv in self.convs],
            [conv.stride for conv in self.convs],
            self.sharp,
            prepared,
        )

    def _padded(
        self, memory: torch.Tensor, u: torch.Tensor, padding: Padding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward over a padded memory: the read convolutions laid out by ``padding.read``
        and the attention over the rows ``padding.attention`` keeps. The fused whole-read
        op has no row mask, so this runs the read as its parts (rwmn.ops.cbp,
        rwmn.ops.memory_conv, each fused under the triton backend) and the masked
        attention in plain PyTorch; p is over the padded rows."""
        keep = padding.attention
        if self.legacy:
            rows = legacy_rows(memory)
            if not len(self):
                return masked_attention_read(rows, u, self.sharp, False, keep)
            read = padded_conv_stack(self.convs, rows.unsqueeze(0), padding.read)
            return masked_attention_read(legacy_rows(read), u, self.sharp, True, keep)
        if not len(self):
            return masked_attention_read(memory.flatten(0, 1), u, self.sharp, True, keep)
        d = memory.shape[-1]
        mq = ops.cbp(memory.unsqueeze(0), u[:, None, None, :], *self.cbp.hashes, d)
        read = padded_conv_stack(self.convs, mq, padding.read)
        return masked_attention_read(read.flatten(-3, -2), u, self.sharp, True, keep)
