"""The flash-decoding readout's pieces shared by the attention kernels (kernels/attention.py)
and the one-launch read (kernels/read_network.py): a program's block partials of the
softmax readout (logits z, block max, block sum, unnormalised readout; module docstring
of kernels/attention.py) and their merge by the question's last block to finish
(kernels._common.last_to_arrive), with the buffers both write.

May import: torch, triton, kernels._common.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import arrival_counters, last_to_arrive, pow2_at_least


@triton.jit
def _block_weights(z, r_ok, z_ptrs, pm_ptr, pl_ptr):
    """Store the block's logits z (its valid rows), their max and the sum of e^(z - max);
    return the weights e^(z - max) (0 on invalid rows)."""
    z = tl.where(r_ok, z, float("-inf"))
    tl.store(z_ptrs, z, mask=r_ok)
    m = tl.max(z, axis=0)
    e = tl.exp(z - m)
    tl.store(pm_ptr, m)
    tl.store(pl_ptr, tl.sum(e, axis=0))
    return e


@triton.jit
def softmax_block(tile, u, rn, r_ok, z_ptrs, pm_ptr, pl_ptr, acc_ptrs, d_ok, sharp):
    """Write z, block max, block sum and block readout of the rows ``tile`` [BR, BD]."""
    rhat = tile * rn[:, None]
    z = sharp * tl.sum(rhat * u[None, :], axis=1)
    e = _block_weights(z, r_ok, z_ptrs, pm_ptr, pl_ptr)
    tl.store(acc_ptrs, tl.sum(e[:, None] * rhat, axis=0), mask=d_ok)


@triton.jit
def softmax_block_split(
    tile1, tile2, u1, u2, rn, r_ok, z_ptrs, pm_ptr, pl_ptr, acc_ptrs1, acc_ptrs2, ok1, ok2,
    sharp,
):  # fmt: skip
    """softmax_block of rows held as two column chunks [BR, BD1] and [BR, BD2]."""
    rhat1 = tile1 * rn[:, None]
    rhat2 = tile2 * rn[:, None]
    z = sharp * (tl.sum(rhat1 * u1[None, :], axis=1) + tl.sum(rhat2 * u2[None, :], axis=1))
    e = _block_weights(z, r_ok, z_ptrs, pm_ptr, pl_ptr)
    tl.store(acc_ptrs1, tl.sum(e[:, None] * rhat1, axis=0), mask=ok1)
    tl.store(acc_ptrs2, tl.sum(e[:, None] * rhat2, axis=0), mask=ok2)


@triton.jit
def merge_if_last(
    count_ptr, z_ptr, pm_ptr, pl_ptr, pacc_ptr, o_ptr, p_ptr, lse_ptr, b, R, D, N_BLOCKS,
    BLOCK_B: tl.constexpr, MERGE_R: tl.constexpr, MERGE_D: tl.constexpr,
):  # fmt: skip
    """The block merge of question b (module docstring), run by the last of its N_BLOCKS
    programs to finish its block: M = max m_blk, L = sum e^(m_blk - M) l_blk,
    o = sum e^(m_blk - M) acc_blk / L, lse = M + log L, p = exp(z - lse)."""
    if last_to_arrive(count_ptr + b, N_BLOCKS):
        blks = tl.arange(0, BLOCK_B)
        b_ok = blks < N_BLOCKS
        part = b * N_BLOCKS + blks
        pm = tl.load(pm_ptr + part, mask=b_ok, other=float("-inf"), cache_modifier=".cg")
        pl = tl.load(pl_ptr + part, mask=b_ok, other=0.0, cache_modifier=".cg")
        big = tl.max(pm, axis=0)
        scale = tl.where(b_ok, tl.exp(pm - big), 0.0)
        total = tl.sum(scale * pl, axis=0)
        cols = tl.arange(0, MERGE_D)
        d_ok = cols < D
        acc = tl.load(
            pacc_ptr + part.to(tl.int64)[:, None] * D + cols[None, :],
            mask=b_ok[:, None] & d_ok[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        o = tl.sum(scale[:, None] * acc, axis=0) / total
        tl.store(o_ptr + b * D + cols, o.to(o_ptr.dtype.element_ty), mask=d_ok)
        lse = big + tl.log(total)
        tl.store(lse_ptr + b, lse)
        for r0 in range(0, R, MERGE_R):
            rs = r0 + tl.arange(0, MERGE_R)
            r_ok = rs < R
            z = tl.load(z_ptr + b.to(tl.int64) * R + rs, mask=r_ok, other=0.0,
                        cache_modifier=".cg")  # fmt: skip
            tl.store(p_ptr + b.to(tl.int64) * R + rs,
                     tl.exp(z - lse).to(p_ptr.dtype.element_ty), mask=r_ok)  # fmt: skip


#: Rows of the attention weights per step of the merge.
MERGE_BLOCK_R = 256


def merge_constexprs(n_blocks: int, d: int) -> dict:
    """The merge's tile constants (blocks of a question, rows per step, width)."""
    return dict(BLOCK_B=pow2_at_least(n_blocks, 1), MERGE_R=MERGE_BLOCK_R, MERGE_D=pow2_at_least(d))


def readout_buffers(n_batch: int, n_blocks: int, r: int, d: int, dtype, device) -> tuple:
    """The forward kernels' outputs and scratch, in their argument order: the softmax
    partials (z, block max, sum, readout; fp32), o [B, d] and p [B, R] in ``dtype``, lse
    [B] fp32, and the merge's arrival counters."""
    f32 = dict(device=device, dtype=torch.float32)
    return (
        torch.empty((n_batch, r), **f32),
        torch.empty((n_batch, n_blocks), **f32),
        torch.empty((n_batch, n_blocks), **f32),
        torch.empty((n_batch, n_blocks, d), **f32),
        torch.empty((n_batch, d), device=device, dtype=dtype),
        torch.empty((n_batch, r), device=device, dtype=dtype),
        torch.empty((n_batch,), **f32),
        arrival_counters(device, n_batch),
    )


__all__ = [
    "merge_constexprs",
    "merge_if_last",
    "readout_buffers",
    "softmax_block",
    "softmax_block_split",
]
