"""The CBP gradients of broadcast operands, summed over the rows they were broadcast to.

The backward kernels write one gradient row per output row (fp32 where the operand is
broadcast). A broadcast operand's gradient is the sum of those rows over the broadcast
axes, rounded once to the operand's dtype: for the read network's CBP(memory, u), the
memory's over the questions and u's over the memory slots. Both sums, with an optional
gradient to accumulate onto y's (the read's attention gradient of u), run in one launch of
_broadcast_sums_kernel instead of a reduction and a cast per operand and an add.

A program owns one output row: its operand's rows r = 0 .. RED - 1 at row
(ko RED + r) KI + ki of the leading shape, with the output row q = ko KI + ki, where the
leading shape reads as (KO, RED, KI) rows around the one run of broadcast axes. Operands
broadcast along several separate runs of axes fall back to torch (sum_to_size).

May import: torch, triton, kernels._common.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._common import LaunchConfig, launch, pow2_at_least

#: Columns a program sums per step (the model's rows are 300 wide: one step).
MAX_BLOCK_N = 1024


@triton.jit
def _sum_rows(g_ptr, out_ptr, add_ptr, q, RED, KI, N, HAS_ADD: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    """out[q] = sum_r g[(ko RED + r) KI + ki] (+ add[q]) for q = ko KI + ki, in fp32."""
    ko = q // KI
    first = (ko * RED * KI + q % KI).to(tl.int64)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = cols < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r in range(RED):
            acc += tl.load(g_ptr + (first + r * KI) * N + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_ADD:
            acc += tl.load(add_ptr + q.to(tl.int64) * N + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + q.to(tl.int64) * N + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _broadcast_sums_kernel(
    gx_ptr, ox_ptr, gy_ptr, oy_ptr, add_ptr,
    ROWS_X, RED_X, KI_X, N_X, RED_Y, KI_Y, N_Y,
    HAS_ADD: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Programs 0 .. ROWS_X - 1 sum x's gradient rows, the rest y's (with the addend)."""
    q = tl.program_id(0)
    if q < ROWS_X:
        _sum_rows(gx_ptr, ox_ptr, add_ptr, q, RED_X, KI_X, N_X, False, BLOCK_N)
    else:
        _sum_rows(gy_ptr, oy_ptr, add_ptr, q - ROWS_X, RED_Y, KI_Y, N_Y, HAS_ADD, BLOCK_N)


def broadcast_runs(shape: torch.Size, lead: torch.Size) -> tuple[int, int, int] | None:
    """(KO, RED, KI): the rows of the leading shape ``lead`` outside, along and inside the one
    run of axes an operand of ``shape`` ([..., n]) is broadcast along; (KO, 1, KI) for an
    operand not broadcast, None for one broadcast along several separate runs."""
    own = (1,) * (len(lead) - len(shape) + 1) + tuple(shape[:-1])
    axes = [i for i, (a, b) in enumerate(zip(own, lead, strict=True)) if a == 1 and b != 1]
    if not axes:
        return math.prod(lead), 1, 1
    lo, hi = axes[0], axes[-1] + 1
    if any(own[i] != 1 for i in range(lo, hi)):
        return None
    return math.prod(lead[:lo]), math.prod(lead[lo:hi]), math.prod(lead[hi:])


def broadcast_sums_config(rows: int, n: int, has_add: bool) -> LaunchConfig:
    """One program per output row of both operands, BLOCK_N columns a step."""
    return LaunchConfig(
        grid=(rows,),
        constexprs=dict(HAS_ADD=has_add, BLOCK_N=min(pow2_at_least(n), MAX_BLOCK_N)),
        num_warps=4,
        num_stages=1,
    )


def _torch_sum(g: torch.Tensor, like: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    return g.view(*lead, g.shape[-1]).sum_to_size(like.shape).to(like.dtype)


def broadcast_sums(
    gx: torch.Tensor,
    x: torch.Tensor,
    gy: torch.Tensor,
    y: torch.Tensor,
    lead: torch.Size,
    gy_add: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dy + gy_add) shaped like x and y, in their dtypes, from the per-row
    gradients gx [rows, n1], gy [rows, n2] (rows = prod(lead); fp32 for a broadcast operand,
    else already in its dtype): one launch for what needs a sum or the addend."""
    runs_x, runs_y = broadcast_runs(x.shape, lead), broadcast_runs(y.shape, lead)
    if runs_x is None or runs_y is None:  # several runs of broadcast axes: torch's sums
        gx, gy = _torch_sum(gx, x, lead), _torch_sum(gy, y, lead)
        return gx, gy if gy_add is None else gy + gy_add.view_as(gy)
    x_sum, y_sum = runs_x[1] > 1, runs_y[1] > 1 or gy_add is not None
    if not (x_sum or y_sum):
        return gx.view(x.shape), gy.view(y.shape)
    ox = torch.empty(x.shape, device=x.device, dtype=x.dtype) if x_sum else gx.view(x.shape)
    oy = torch.empty(y.shape, device=y.device, dtype=y.dtype) if y_sum else gy.view(y.shape)
    rows_x = runs_x[0] * runs_x[2] if x_sum else 0
    rows_y = runs_y[0] * runs_y[2] if y_sum else 0
    n1, n2 = x.shape[-1], y.shape[-1]
    config = broadcast_sums_config(rows_x + rows_y, max(n1, n2), gy_add is not None)
    if not rows_x + rows_y:
        return ox, oy
    launch(
        _broadcast_sums_kernel, config,
        gx, ox, gy, oy, gy if gy_add is None else gy_add.contiguous(),
        rows_x, runs_x[1], runs_x[2], n1, runs_y[1], runs_y[2], n2,
    )  # fmt: skip
    return ox, oy
