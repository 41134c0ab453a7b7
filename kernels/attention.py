"""Attention readout, alone and fused with the last read convolution.

Math (kernels.reference.attention_read / conv_attention_read are the ground truth). For one
question b with vector u and rows r_1..r_R (eps = 1e-12, s = sharp):
    n_r = (eps + |r|^2)^(-1/2),  rhat = n_r r       (rhat = r without ``normalize``)
    z_r = s <u, rhat_r>,  p = softmax(z),  o = sum_r p_r rhat_r,  lse = log sum_r exp z_r.
The forward is flash-decoding: each program owns one block of rows and writes the raw
logits z, its block max m_blk, sum l_blk = sum exp(z - m_blk) and unnormalised readout
acc_blk = sum exp(z - m_blk) rhat; the last program of a question to finish its block
merges them (M = max m_blk, L = sum e^(m_blk - M) l_blk, o = sum e^(m_blk - M) acc_blk / L,
lse = M + log L, p = exp(z - lse)) in the same launch. Only [B, R] logits and [B, blocks,
d] partials touch memory, never a normalised row. The backward's du partials of the row
blocks are summed the same way, by the question's last block.

Backward, from go = dL/do and gp = dL/dp, recomputing p from the saved lse:
    dp_r = <go, rhat_r> + gp_r,  delta = sum_r p_r dp_r = <go, o> + <p, gp>,
    dz_r = p_r (dp_r - delta),
    drhat_r = p_r go + s dz_r u,            du = s sum_r dz_r rhat_r,
    dr = n_r (drhat - rhat <rhat, drhat>)   (unit-norm backward; dr = drhat otherwise).
With rows shared by every question ([R, d]), dr sums over b: one program per row block
loops over the questions.

conv_attention_read computes the rows on the fly: the rows of question b are
relu(memory_conv(x[b])) in (channel, slot) order, produced tile by tile by the same
Toeplitz implicit GEMM as kernels/memconv.py (see its docstring), so the read memory Mr
never lands in device memory in the forward. Its backward recomputes the tile, forms
dL/dy = [y > 0] dr for the pre-activation y (written once, [B, c_out, m, d]) and hands
it to the memory_conv backward kernels for dx, dw; dbias = sum of dL/dy.

May import: torch, triton, kernels._common, kernels.memconv, kernels.readout,
kernels.reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels import reference
from kernels._common import (
    UNIT_NORM_EPS,
    LaunchConfig,
    arrival_counters,
    cast,
    compute_dtype,
    dot_precision,
    last_to_arrive,
    launch,
    pow2_at_least,
    runs_reference,
    sum_rows,
)
from kernels.memconv import _toeplitz_conv_tile, conv_input_grads
from kernels.readout import merge_constexprs, merge_if_last, readout_buffers, softmax_block
from kernels.reference import same_padding

#: Rows of one attention block (one program; the width is one block of pow2(d)): the backward
#: holds three [rows, pow2(d)] fp32 tiles and the softmax delta's, which fit in registers at 8.
BLOCK_R_FWD = 32
BLOCK_R_BWD = 8
#: Slots of one conv-attention tile: the M of a wgmma tile in the bf16/fp16 forward; 16 where
#: the tiles live in registers (the backward's five epilogue tiles, fp32's ieee operands).
BLOCK_I_WGMMA = 64
BLOCK_I_SMALL = 16
#: Reduction chunk of the width in the conv tile.
BLOCK_K = 32
#: Widest row the kernels hold in registers (one tile spans the whole width).
MAX_FUSED_D = 1024
NUM_WARPS = 8
#: The fp32 conv-attention backward: warps and reduction chunk that hold its five epilogue
#: tiles next to the CUDA-core dot operands in registers.
CONV_ATTN_FP32_BWD_WARPS = 16
CONV_ATTN_FP32_BWD_BLOCK_K = 16
#: One pipeline stage: the conv tiles' K loops stay in registers only unpipelined.
NUM_STAGES = 1


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    rows_ptr,
    u_ptr,
    z_ptr,
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    o_ptr,
    p_ptr,
    lse_ptr,
    count_ptr,
    R,
    D,
    ROWS_BATCH_STRIDE,
    N_BLOCKS,
    sharp,
    eps,
    NORMALIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    MERGE_R: tl.constexpr,
    MERGE_D: tl.constexpr,
):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs_r = blk * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < R
    d_ok = offs_d < D
    row_ptrs = rows_ptr + b.to(tl.int64) * ROWS_BATCH_STRIDE + offs_r.to(tl.int64) * D
    tile = tl.load(
        row_ptrs[:, None] + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0
    ).to(tl.float32)
    u = tl.load(u_ptr + b * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    if NORMALIZE:
        rn = tl.rsqrt(eps + tl.sum(tile * tile, axis=1))
    else:
        rn = tl.full((BLOCK_R,), 1.0, tl.float32)
    part = b * N_BLOCKS + blk
    softmax_block(
        tile,
        u,
        rn,
        r_ok,
        z_ptr + b * R + offs_r,
        pm_ptr + part,
        pl_ptr + part,
        pacc_ptr + part.to(tl.int64) * D + offs_d,
        d_ok,
        sharp,
    )
    merge_if_last(
        count_ptr, z_ptr, pm_ptr, pl_ptr, pacc_ptr, o_ptr, p_ptr, lse_ptr, b, R, D, N_BLOCKS,
        BLOCK_B, MERGE_R, MERGE_D,
    )  # fmt: skip


@triton.jit
def _question_delta(
    go, o_ptr, gp_ptr, p_ptr, b, R, D, offs_d, d_ok,
    HAS_GP: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """delta_b = <go_b, o_b> + <p_b, gp_b> (fp32; go_b loaded) of the softmax's backward,
    over the whole row of question b: each program forms the deltas it needs itself."""
    o = tl.load(o_ptr + b * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    delta = tl.sum(go * o, axis=0)
    if HAS_GP:
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_ok = rs < R
            p = tl.load(p_ptr + b * R + rs, mask=r_ok, other=0.0).to(tl.float32)
            gp = tl.load(gp_ptr + b * R + rs, mask=r_ok, other=0.0).to(tl.float32)
            delta += tl.sum(p * gp, axis=0)
    return delta


@triton.jit
def _attn_bwd_kernel(
    rows_ptr,
    u_ptr,
    go_ptr,
    gp_ptr,
    o_ptr,
    p_ptr,
    lse_ptr,
    drows_ptr,
    du_part_ptr,
    du_ptr,
    count_ptr,
    B,
    R,
    D,
    N_BLOCKS,
    sharp,
    eps,
    NORMALIZE: tl.constexpr,
    SHARED: tl.constexpr,
    RELU: tl.constexpr,
    HAS_GP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    blk = tl.program_id(1)
    if SHARED:
        # One row block serves every question: its gradient sums over b.
        b_lo = 0
        b_hi = B
        row_base = 0
    else:
        b_lo = tl.program_id(0)
        b_hi = b_lo + 1
        row_base = b_lo.to(tl.int64) * R * D
    offs_r = blk * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < R
    d_ok = offs_d < D
    tile_off = row_base + offs_r.to(tl.int64)[:, None] * D + offs_d[None, :]
    tile_ok = r_ok[:, None] & d_ok[None, :]
    tile = tl.load(rows_ptr + tile_off, mask=tile_ok, other=0.0).to(tl.float32)
    if NORMALIZE:
        rn = tl.rsqrt(eps + tl.sum(tile * tile, axis=1))
    else:
        rn = tl.full((BLOCK_R,), 1.0, tl.float32)
    rhat = tile * rn[:, None]
    drhat = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for b in range(b_lo, b_hi):
        u = tl.load(u_ptr + b * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        go = tl.load(go_ptr + b * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_GP:
            gp = tl.load(gp_ptr + b * R + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        else:
            gp = tl.zeros((BLOCK_R,), dtype=tl.float32)
        lse = tl.load(lse_ptr + b)
        delta = _question_delta(go, o_ptr, gp_ptr, p_ptr, b, R, D, offs_d, d_ok, HAS_GP, BLOCK_R)
        p = tl.exp(sharp * tl.sum(rhat * u[None, :], axis=1) - lse)
        p = tl.where(r_ok, p, 0.0)
        dz = p * (tl.sum(rhat * go[None, :], axis=1) + gp - delta)
        drhat += p[:, None] * go[None, :] + (sharp * dz)[:, None] * u[None, :]
        du_ptrs = du_part_ptr + (b * N_BLOCKS + blk).to(tl.int64) * D + offs_d
        tl.store(du_ptrs, sharp * tl.sum(dz[:, None] * rhat, axis=0), mask=d_ok)
    if NORMALIZE:
        drhat = rn[:, None] * (drhat - rhat * tl.sum(rhat * drhat, axis=1)[:, None])
    if RELU:
        # The rows are a ReLU's output r = max(y, 0): dL/dy = [r > 0] dL/dr.
        drhat = tl.where(tile > 0, drhat, 0.0)
    tl.store(drows_ptr + tile_off, drhat.to(drows_ptr.dtype.element_ty), mask=tile_ok)
    # du = the sum of the row blocks' partials, by the question's last block (rows shared
    # by the questions: by the launcher; summing every question's in the last block spilled).
    if not SHARED:  # noqa: SIM102  (a constexpr: the shared kernel makes no atomic)
        if last_to_arrive(count_ptr + b_lo, N_BLOCKS):
            sum_rows(du_part_ptr + b_lo * N_BLOCKS * D, N_BLOCKS, du_ptr + b_lo * D, D, BLOCK_D)


@triton.jit
def _conv_rows(
    x_ptr,
    w_ptr,
    bias_ptr,
    b,
    o,
    offs_i,
    offs_d,
    C_IN,
    N_ROWS,
    M_ROWS,
    D,
    K,
    STRIDE,
    PAD_TOP,
    PAD_LEFT,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Pre-activation conv rows y[b, o, offs_i, :] (fp32, zero outside the tensor)."""
    # One tile spans the whole width (BLOCK_D >= D), so the Toeplitz band is every column.
    acc = _toeplitz_conv_tile(
        x_ptr, w_ptr, b, o, offs_i, 0, offs_d, C_IN, N_ROWS, M_ROWS, D, K, STRIDE,
        PAD_TOP, PAD_LEFT, 0, C_IN * K, PRECISION, BLOCK_I, BLOCK_D, BLOCK_K,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o).to(tl.float32)
    # Padding rows/columns would otherwise carry the bias (or band taps) into the softmax.
    valid = (offs_i < M_ROWS)[:, None] & (offs_d < D)[None, :]
    return tl.where(valid, acc, 0.0)


@triton.jit
def _conv_attn_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    u_ptr,
    z_ptr,
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    o_ptr,
    p_ptr,
    lse_ptr,
    count_ptr,
    C_IN,
    C_OUT,
    N_ROWS,
    M_ROWS,
    D,
    K,
    STRIDE,
    PAD_TOP,
    PAD_LEFT,
    N_I_BLOCKS,
    sharp,
    eps,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    MERGE_R: tl.constexpr,
    MERGE_D: tl.constexpr,
):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    o = blk // N_I_BLOCKS
    offs_i = (blk % N_I_BLOCKS) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    i_ok = offs_i < M_ROWS
    d_ok = offs_d < D
    y = _conv_rows(
        x_ptr, w_ptr, bias_ptr, b, o, offs_i, offs_d, C_IN, N_ROWS, M_ROWS, D, K, STRIDE,
        PAD_TOP, PAD_LEFT, HAS_BIAS, PRECISION, BLOCK_I, BLOCK_D, BLOCK_K,
    )  # fmt: skip
    tile = tl.maximum(y, 0.0)
    rn = tl.rsqrt(eps + tl.sum(tile * tile, axis=1))
    u = tl.load(u_ptr + b * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    n_blocks = C_OUT * N_I_BLOCKS
    part = b * n_blocks + blk
    softmax_block(
        tile,
        u,
        rn,
        i_ok,
        z_ptr + (b * C_OUT + o) * M_ROWS + offs_i,
        pm_ptr + part,
        pl_ptr + part,
        pacc_ptr + part.to(tl.int64) * D + offs_d,
        d_ok,
        sharp,
    )
    merge_if_last(
        count_ptr, z_ptr, pm_ptr, pl_ptr, pacc_ptr, o_ptr, p_ptr, lse_ptr, b, C_OUT * M_ROWS,
        D, n_blocks, BLOCK_B, MERGE_R, MERGE_D,
    )  # fmt: skip


@triton.jit
def _conv_attn_bwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    u_ptr,
    go_ptr,
    gp_ptr,
    o_ptr,
    p_ptr,
    lse_ptr,
    gy_ptr,
    du_part_ptr,
    C_IN,
    C_OUT,
    N_ROWS,
    M_ROWS,
    D,
    K,
    STRIDE,
    PAD_TOP,
    PAD_LEFT,
    N_I_BLOCKS,
    sharp,
    eps,
    HAS_BIAS: tl.constexpr,
    HAS_GP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    o = blk // N_I_BLOCKS
    offs_i = (blk % N_I_BLOCKS) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    i_ok = offs_i < M_ROWS
    d_ok = offs_d < D
    y = _conv_rows(
        x_ptr, w_ptr, bias_ptr, b, o, offs_i, offs_d, C_IN, N_ROWS, M_ROWS, D, K, STRIDE,
        PAD_TOP, PAD_LEFT, HAS_BIAS, PRECISION, BLOCK_I, BLOCK_D, BLOCK_K,
    )  # fmt: skip
    tile = tl.maximum(y, 0.0)
    rn = tl.rsqrt(eps + tl.sum(tile * tile, axis=1))
    rhat = tile * rn[:, None]
    u = tl.load(u_ptr + b * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    go = tl.load(go_ptr + b * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    r_idx = (b * C_OUT + o) * M_ROWS + offs_i
    if HAS_GP:
        gp = tl.load(gp_ptr + r_idx, mask=i_ok, other=0.0).to(tl.float32)
    else:
        gp = tl.zeros((BLOCK_I,), dtype=tl.float32)
    lse = tl.load(lse_ptr + b)
    delta = _question_delta(
        go, o_ptr, gp_ptr, p_ptr, b, C_OUT * M_ROWS, D, offs_d, d_ok, HAS_GP, BLOCK_I
    )
    p = tl.exp(sharp * tl.sum(rhat * u[None, :], axis=1) - lse)
    p = tl.where(i_ok, p, 0.0)
    dz = p * (tl.sum(rhat * go[None, :], axis=1) + gp - delta)
    drhat = p[:, None] * go[None, :] + (sharp * dz)[:, None] * u[None, :]
    dr = rn[:, None] * (drhat - rhat * tl.sum(rhat * drhat, axis=1)[:, None])
    gy = tl.where(y > 0, dr, 0.0)
    tl.store(
        gy_ptr + r_idx.to(tl.int64)[:, None] * D + offs_d[None, :],
        gy.to(gy_ptr.dtype.element_ty),
        mask=i_ok[:, None] & d_ok[None, :],
    )
    n_blocks = C_OUT * N_I_BLOCKS
    du_ptrs = du_part_ptr + (b * n_blocks + blk).to(tl.int64) * D + offs_d
    tl.store(du_ptrs, sharp * tl.sum(dz[:, None] * rhat, axis=0), mask=d_ok)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def attention_config(
    n_batch: int,
    r: int,
    d: int,
    normalize: bool,
    shared: bool | None = None,
    relu: bool = False,
    has_gp: bool = False,
) -> LaunchConfig:
    """Launch configuration of the attention kernels over R rows of width d: one program
    per (question, BLOCK_R rows). Backward only: ``shared``, rows [R, d] shared by every
    question, one program per row block looping over the questions; ``relu``, the rows are
    a ReLU's output and the gradient is that of its input; ``has_gp``, the attention
    weights have a gradient (else it is zero and not read)."""
    block_r = BLOCK_R_FWD if shared is None else BLOCK_R_BWD
    n_blocks = triton.cdiv(r, block_r)
    constexprs = dict(NORMALIZE=normalize, BLOCK_R=block_r, BLOCK_D=pow2_at_least(d))
    if shared is None:
        constexprs.update(merge_constexprs(n_blocks, d))
    else:
        constexprs.update(SHARED=shared, RELU=relu, HAS_GP=has_gp)
    return LaunchConfig(
        grid=(1 if shared else n_batch, n_blocks), constexprs=constexprs, num_warps=NUM_WARPS
    )


def attention_forward(rows: torch.Tensor, u: torch.Tensor, sharp: float, normalize: bool):
    """(o [B, d], p [B, R], lse [B] fp32) for rows [B, R, d] or [R, d] and u [B, d]."""
    n_batch, d = u.shape
    r = rows.shape[-2]
    config = attention_config(n_batch, r, d, normalize)
    buffers = readout_buffers(n_batch, config.grid[1], r, d, rows.dtype, u.device)
    launch(
        _attn_fwd_kernel, config,
        rows, u, *buffers, r, d, 0 if rows.dim() == 2 else r * d, config.grid[1],
        float(sharp), UNIT_NORM_EPS,
    )  # fmt: skip
    return buffers[4:7]


def attention_backward(
    go, gp, rows, u, o, p, lse, sharp: float, normalize: bool, relu: bool = False
):
    """(drows, du) of attention_forward (gp None: the weights' gradient is zero); with
    ``relu`` the rows are r = max(y, 0) and drows is dL/dy (zero where r is)."""
    n_batch, d = u.shape
    r = rows.shape[-2]
    config = attention_config(
        n_batch, r, d, normalize, shared=rows.dim() == 2, relu=relu, has_gp=gp is not None
    )
    n_blocks = config.grid[1]
    drows = torch.empty_like(rows)
    du_part = torch.empty((n_batch, n_blocks, d), device=u.device, dtype=torch.float32)
    du = torch.empty_like(u)
    launch(
        _attn_bwd_kernel, config,
        rows, u, go.contiguous(), go if gp is None else gp.contiguous(), o, p, lse, drows,
        du_part, du, arrival_counters(u.device, config.grid[0]), n_batch, r, d, n_blocks,
        float(sharp), UNIT_NORM_EPS,
    )  # fmt: skip
    if config.constexprs["SHARED"]:
        du = du_part.sum(dim=1).to(u.dtype)
    return drows, du


def _conv_geometry(x: torch.Tensor, weight: torch.Tensor, stride: int):
    _, c_in, n, d = x.shape
    c_out, _, k, _ = weight.shape
    m, top, _ = same_padding(n, k, stride)
    left = same_padding(d, d, 1)[1]
    return c_in, c_out, n, m, d, k, top, left


def conv_attention_config(
    n_batch: int,
    c_out: int,
    m: int,
    d: int,
    dtype: torch.dtype,
    has_bias: bool,
    backward: bool,
    has_gp: bool = False,
) -> LaunchConfig:
    """Launch configuration of the conv-attention kernels: one program per (question,
    output channel, BLOCK_I slots), each tile spanning the whole width pow2(d); has_gp
    (backward only) as in attention_config."""
    wgmma = dtype != torch.float32 and not backward
    block_i = BLOCK_I_WGMMA if wgmma else BLOCK_I_SMALL
    fp32_bwd = backward and dtype == torch.float32
    warps = CONV_ATTN_FP32_BWD_WARPS if fp32_bwd else NUM_WARPS
    constexprs = dict(
        HAS_BIAS=has_bias,
        PRECISION=dot_precision(dtype),
        BLOCK_I=block_i,
        BLOCK_D=pow2_at_least(d),
        BLOCK_K=CONV_ATTN_FP32_BWD_BLOCK_K if fp32_bwd else BLOCK_K,
    )
    n_blocks = c_out * triton.cdiv(m, block_i)
    if backward:
        constexprs.update(HAS_GP=has_gp)
    else:
        constexprs.update(merge_constexprs(n_blocks, d))
    return LaunchConfig(
        grid=(n_batch, n_blocks),
        constexprs=constexprs,
        num_warps=warps,
        num_stages=NUM_STAGES,
    )


def conv_attention_forward(x, weight, bias, stride: int, u, sharp: float):
    """(o, p, lse) of attention over relu(memory_conv(x)) rows, without storing them."""
    n_batch = x.shape[0]
    c_in, c_out, n, m, d, k, top, left = _conv_geometry(x, weight, stride)
    config = conv_attention_config(n_batch, c_out, m, d, x.dtype, bias is not None, False)
    n_blocks = config.grid[1]
    buffers = readout_buffers(n_batch, n_blocks, c_out * m, d, x.dtype, x.device)
    launch(
        _conv_attn_fwd_kernel, config,
        x, weight, bias if bias is not None else weight, u, *buffers,
        c_in, c_out, n, m, d, k, stride, top, left, n_blocks // c_out,
        float(sharp), UNIT_NORM_EPS,
    )  # fmt: skip
    return buffers[4:7]


def conv_attention_backward(go, gp, x, weight, bias, stride: int, u, sharp: float, o, p, lse):
    """(dL/dy [B, c_out, m, d] of the conv pre-activation, du); gp None: zero."""
    n_batch = x.shape[0]
    c_in, c_out, n, m, d, k, top, left = _conv_geometry(x, weight, stride)
    config = conv_attention_config(
        n_batch, c_out, m, d, x.dtype, bias is not None, True, has_gp=gp is not None
    )
    n_blocks = config.grid[1]
    gy = torch.empty((n_batch, c_out, m, d), device=x.device, dtype=x.dtype)
    du_part = torch.empty((n_batch, n_blocks, d), device=x.device, dtype=torch.float32)
    launch(
        _conv_attn_bwd_kernel, config,
        x, weight, bias if bias is not None else weight, u, go.contiguous(),
        go if gp is None else gp.contiguous(), o, p, lse, gy, du_part,
        c_in, c_out, n, m, d, k, stride, top, left, n_blocks // c_out,
        float(sharp), UNIT_NORM_EPS,
    )  # fmt: skip
    # The du partials are summed here: in the kernel (by the last block, as the attention
    # backward does) the conv tile's registers spilled.
    return gy, du_part.sum(dim=1).to(u.dtype)


# --------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------


@triton_op("rwmn::attention_read", mutates_args=())
def _attention_read_op(
    rows: torch.Tensor, u: torch.Tensor, sharp: float, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_forward(rows, u, sharp, normalize)


@triton_op("rwmn::attention_read_backward", mutates_args=())
def _attention_read_backward_op(
    go: torch.Tensor,
    gp: torch.Tensor | None,
    rows: torch.Tensor,
    u: torch.Tensor,
    o: torch.Tensor,
    p: torch.Tensor,
    lse: torch.Tensor,
    sharp: float,
    normalize: bool,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_backward(go, gp, rows, u, o, p, lse, sharp, normalize, relu)


def zeros_if_none(grad, like):
    """The output gradient the backward kernels read (any float dtype), zero if unused."""
    return torch.zeros_like(like) if grad is None else grad


def _attention_setup(ctx, inputs, output):
    rows, u, sharp, normalize = inputs
    o, p, lse = output
    # Unused outputs' gradients stay None (no zero tensors filled for them).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(rows, u, o, p, lse)
    ctx.sharp = sharp
    ctx.normalize = normalize


def _attention_backward(ctx, go, gp, _glse):
    rows, u, o, p, lse = ctx.saved_tensors
    drows, du = torch.ops.rwmn.attention_read_backward(
        zeros_if_none(go, o), gp, rows, u, o, p, lse, ctx.sharp, ctx.normalize, False
    )
    return drows, du, None, None


_attention_read_op.register_autograd(_attention_backward, setup_context=_attention_setup)


@triton_op("rwmn::conv_attention_read", mutates_args=())
def _conv_attention_read_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    u: torch.Tensor,
    sharp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return conv_attention_forward(x, weight, bias, stride, u, sharp)


@triton_op("rwmn::conv_attention_read_backward", mutates_args=())
def _conv_attention_read_backward_op(
    go: torch.Tensor,
    gp: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    u: torch.Tensor,
    sharp: float,
    o: torch.Tensor,
    p: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return conv_attention_backward(go, gp, x, weight, bias, stride, u, sharp, o, p, lse)


def _conv_attention_setup(ctx, inputs, output):
    x, weight, bias, stride, u, sharp = inputs
    o, p, lse = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, u, o, p, lse)
    ctx.stride = stride
    ctx.sharp = sharp


def _conv_attention_backward(ctx, go, gp, _glse):
    x, weight, bias, u, o, p, lse = ctx.saved_tensors
    gy, du = torch.ops.rwmn.conv_attention_read_backward(
        zeros_if_none(go, o), gp, x, weight, bias, ctx.stride, u, ctx.sharp, o, p, lse
    )
    dx, dw, db = conv_input_grads(gy, x, weight, bias is not None, ctx.stride)
    return dx, dw, db, None, du, None


_conv_attention_read_op.register_autograd(
    _conv_attention_backward, setup_context=_conv_attention_setup
)


# --------------------------------------------------------------------------------------
# Public entry points (the signatures rwmn.ops dispatches to)
# --------------------------------------------------------------------------------------


def attention_read(
    rows: torch.Tensor, u: torch.Tensor, sharp: float, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused kernels.reference.attention_read: rows [B, R, d] or [R, d], u [B, d] -> (o, p)."""
    if rows.dim() not in (2, 3) or u.dim() != 2 or rows.shape[-1] != u.shape[-1]:
        raise ValueError(
            f"attention_read: rows {tuple(rows.shape)} must be [B, R, d] or [R, d] and u "
            f"{tuple(u.shape)} must be [B, d] with the same d"
        )
    if rows.dim() == 3 and rows.shape[0] != u.shape[0]:
        raise ValueError(
            f"attention_read: rows {tuple(rows.shape)} and u {tuple(u.shape)} disagree on B"
        )
    dtype = compute_dtype(rows, u)
    if runs_reference("attention_read", dtype, width=(u.shape[-1], MAX_FUSED_D)):
        return reference.attention_read(rows, u, sharp, normalize)
    o, p, _ = torch.ops.rwmn.attention_read(
        cast(rows, dtype), cast(u, dtype), float(sharp), normalize
    )
    return o, p


def conv_attention_read(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    u: torch.Tensor,
    sharp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused kernels.reference.conv_attention_read: x [B, c_in, n, d] -> (o [B, d], p [B, R])."""
    c_out, c_in, _, d = weight.shape
    if x.dim() != 4 or x.shape[1] != c_in or x.shape[3] != d:
        raise ValueError(
            f"conv_attention_read: input of shape {tuple(x.shape)} does not match a kernel of "
            f"shape {tuple(weight.shape)} (expected [B, {c_in}, n, {d}])"
        )
    if u.shape != (x.shape[0], d):
        raise ValueError(
            f"conv_attention_read: u {tuple(u.shape)} must be [{x.shape[0]}, {d}] for x "
            f"{tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"conv_attention_read: bias must be [{c_out}], got {tuple(bias.shape)}")
    if stride < 1:
        raise ValueError(f"conv_attention_read: stride must be >= 1, got {stride}")
    dtype = compute_dtype(x, weight, bias, u)
    op = "conv_attention_read"
    if runs_reference(op, dtype, width=(d, MAX_FUSED_D)):
        return reference.conv_attention_read(x, weight, bias, stride, u, sharp)
    o, p, _ = torch.ops.rwmn.conv_attention_read(
        cast(x, dtype), cast(weight, dtype), cast(bias, dtype), stride, cast(u, dtype), float(sharp)
    )
    return o, p
