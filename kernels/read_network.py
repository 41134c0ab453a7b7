"""The read network of B questions over one write memory, from the fused pieces.

Math (kernels.reference.read_network is the ground truth): Mq[b, c, i] = CBP(M[c, i], u[b]),
then the read convolutions over Mq [B, C, m, d], the last one fused with the attention
readout (kernels/attention.py: its rows never reach device memory in the forward).

What runs, in launches (pinned by tests/test_kernels_read_network.py): the CBP's spectra
launches (one for the memory rows, one for the questions: each transformed once, not once
per pair) and its product launch (Mq = the inverse FFTs of the spectrum products), one
memory_conv launch per read layer but the last (kernels/memconv.py), and the
conv-attention launch plus a few tiny merge ops: 3 + L launches forward for L read layers,
no torch.fft. Not achieved yet: the
read network in ONE launch after the memory spectra. Mq [B, C, m, d] and each intermediate
read layer are materialised between launches. See kernels/README.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.attention import conv_attention_read
from kernels.cbp import cbp
from kernels.memconv import memory_conv


def _cbp_rows(memory, u, h1, s1, h2, s2, d):
    """Mq [B, C, m, d] = CBP of every memory row with every question vector."""
    return cbp(memory.unsqueeze(0), u[:, None, None, :], h1, s1, h2, s2, d)


def read_network(
    memory: torch.Tensor,
    u: torch.Tensor,
    hashes: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    strides: Sequence[int],
    sharp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused kernels.reference.read_network: memory [C, m, d], u [B, d] -> (o [B, d], p [B, R])."""
    if not weights:
        raise ValueError("read_network needs at least one read layer")
    if memory.dim() != 3 or u.dim() != 2 or memory.shape[-1] != u.shape[-1]:
        raise ValueError(
            f"read_network: memory {tuple(memory.shape)} must be [C, m, d] and u "
            f"{tuple(u.shape)} must be [B, d] with the same d"
        )
    h1, s1, h2, s2 = hashes
    d = memory.shape[-1]
    mq = _cbp_rows(memory, u, h1, s1, h2, s2, d)
    layers = list(zip(weights, biases, strides, strict=True))
    for w, b, s in layers[:-1]:
        mq = memory_conv(mq, w, b, s)
    w, b, s = layers[-1]
    return conv_attention_read(mq, w, b, s, u, sharp)
