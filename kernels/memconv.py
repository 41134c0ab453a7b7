"""Strided full-width memory convolution as an implicit GEMM (write and read layers).

Math (one layer; kernels.reference.memory_conv is the ground truth). x [N, c_in, n, d],
weight w [c_out, c_in, k, d], bias [c_out], stride s, TF SAME padding: p = pad_top of the
row axis (same_padding(n, k, s)), q = (d - 1) // 2 the left pad of the width axis (the
kernel spans the full width d, so the width keeps its size). Out-of-range x reads as 0.

Forward, m = ceil(n / s):
    y[b, o, i, j] = bias[o] + sum_{c, a, t} x[b, c, i*s + a - p, j + t - q] w[o, c, a, t]
                  = bias[o] + sum_{c, a} (X_{c,a} T_{o,c,a})[i, j]
with X_{c,a}[i, :] = x[b, c, i*s + a - p, :] (one shifted, strided row view) and
T_{o,c,a}[j', j] = w[o, c, a, j' - j + q] (zero outside [0, d)), the d x d Toeplitz
matrix of kernel row a. So each output tile is a GEMM over K = (c, a, j'), with the
Toeplitz tile gathered on the fly from the kernel row: the d x d matrices are never built.
out = relu(y) when ``relu``.

Backward, with g = dL/dy (dL/dout masked by out > 0 under ReLU):
    dx[b, c, r, :] = sum_{o, a, i: i*s + a - p = r} g[b, o, i, :] T_{o,c,a}^T
Only the taps a = a0 + l*s with a0 = (r + p) mod s hit row r (then i = (r + p - a)/s), so
the kernel walks rows of one phase r mod s at a time and visits exactly those taps.
    dw[o, c, a, t] = sum_b sum_i sum_j x[b, c, i*s + a - p, j + t - q] g[b, o, i, j]
(the diagonal sums of dT = X^T g: T's entry (j', j) is w[j' - j + q], so dw[t] collects
the diagonal j' - j = t - q). Rather than form dT, the kernel computes it as one implicit
GEMM whose long axis (c, a, t) is M and whose reduction K = (b, i, j) gathers a Hankel
tile H[(b,i,j), (c,a,t)] = x[b, c, i*s + a - p, j + t - q] from x's rows. Its N would be
c_out alone (3 in the model), padded to the 16 tl.dot needs: 5x wasted work. Instead, a
shift of the tap is a shift of g: dw[o, c, a, t0 + delta] = sum_{b,i,j} H[(b,i,j),
(c,a,t0)] g[b, o, i, j - delta], so the N columns are (delta, o) for SHIFTS = 16 // c_out
shifts (15 of 16 columns used at c_out = 3) and M only needs the taps t0 = u * SHIFTS.
K is split across programs and the fp32 partials summed afterwards (deterministic).
    dbias[o] = sum_{b, i, j} g[b, o, i, j]

May import: torch, triton, kernels._common, kernels.reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels import reference
from kernels._common import (
    FUSED_DTYPES,
    LaunchConfig,
    arrival_counters,
    cast,
    compute_dtype,
    dot_precision,
    last_to_arrive,
    launch,
    pow2_at_least,
    runs_reference,
)
from kernels.reference import same_padding

#: Output rows of one forward tile: the M of one warpgroup's wgmma in bf16/fp16; fp32 (ieee,
#: operands in registers) the most that stays in registers.
BLOCK_I_HALF = 64
BLOCK_I_FP32 = 32
#: Output columns of a forward/dx tile and the reduction chunk of the width.
BLOCK_J = 64
BLOCK_K = 32
#: dw: (c, a, u) rows of its product (the M, 64 for wgmma), (shift, output channel)
#: columns (the N: 16, the least tl.dot takes), width chunk of the reduction.
BLOCK_F = 64
BLOCK_O_MIN = 16
BLOCK_JW = 32
#: dw: about this many (b, i) rows of the reduction per program before K is split.
ROWS_PER_SPLIT = 64
#: Programs a launch should fill: the SMs of an H100/H200.
MIN_PROGRAMS = 132
NUM_WARPS = 4
#: Pipeline stages of the K loops: fp32 (ieee) operand tiles stay in registers only unpipelined.
STAGES_FP32 = 1
STAGES_HALF = 3


def _block_i(dtype: torch.dtype) -> int:
    return BLOCK_I_FP32 if dtype == torch.float32 else BLOCK_I_HALF


#: dx: rows of one phase per tile (bf16/fp16: the wgmma tile) and warps, the largest tile and
#: fewest warps that build without a spill on both targets.
DX_BLOCK_Q = {torch.float32: 16}
DX_WARPS = 8
#: dx stages (fp32: see STAGES_FP32).
DX_STAGES = {torch.float32: STAGES_FP32}
#: dx columns per tile: half precision streams the ReLU output next to the gradient, so
#: half the forward's.
DX_BLOCK_J = {torch.bfloat16: BLOCK_J // 2, torch.float16: BLOCK_J // 2}


def _stages(dtype: torch.dtype) -> int:
    return STAGES_FP32 if dtype == torch.float32 else STAGES_HALF


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _toeplitz_conv_tile(
    x_ptr,
    w_ptr,
    b,
    o,
    offs_i,
    j_first,
    offs_j,
    C_IN,
    N_ROWS,
    M_ROWS,
    D,
    K,
    STRIDE,
    PAD_TOP,
    PAD_LEFT,
    ca_lo,
    ca_hi,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Pre-activation tile acc[i, j] = sum_{c, a, j'} x[b, c, i*s + a - p_top, j']
    * w[o, c, a, j' - j + p_left] (fp32; rows and taps outside the tensor count as zero)
    over the kernel rows ca = c K + a in [ca_lo, ca_hi): the implicit GEMM whose Toeplitz
    tiles are gathered from the kernel row on the fly. Shared by the memory_conv forward
    and the fused conv-attention kernels."""
    x_base = x_ptr + b.to(tl.int64) * C_IN * N_ROWS * D
    w_base = w_ptr + o * C_IN * K * D
    # Only input columns j' with a tap j' - j + q in [0, d) for some j of this tile
    # contribute: the Toeplitz band. Start on a BLOCK_K boundary for aligned loads.
    jp_lo = (tl.maximum(j_first - PAD_LEFT, 0) // BLOCK_K) * BLOCK_K
    jp_hi = tl.minimum(j_first + BLOCK_J - 1 - PAD_LEFT + D, D)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for ca in range(ca_lo, ca_hi):
        c = ca // K
        a = ca % K
        rows = offs_i * STRIDE + a - PAD_TOP
        row_ok = (offs_i < M_ROWS) & (rows >= 0) & (rows < N_ROWS)
        x_rows = x_base + (c * N_ROWS + rows).to(tl.int64) * D
        w_row = w_base + ca * D
        for jp0 in range(jp_lo, jp_hi, BLOCK_K):
            offs_jp = jp0 + tl.arange(0, BLOCK_K)
            xt = tl.load(
                x_rows[:, None] + offs_jp[None, :],
                mask=row_ok[:, None] & (offs_jp < D)[None, :],
                other=0.0,
            )
            tap = offs_jp[:, None] - offs_j[None, :] + PAD_LEFT
            wt = tl.load(w_row + tap, mask=(tap >= 0) & (tap < D), other=0.0)
            acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _memconv_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
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
    N_J,
    TAPS_PER_SPLIT,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_bo = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2) % N_J
    b = pid_bo // C_OUT
    o = pid_bo % C_OUT
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    j_first = pid_j * BLOCK_J
    offs_j = j_first + tl.arange(0, BLOCK_J)
    # With SPLIT the kernel rows (the K of the GEMM) are split over tl.num_programs(2) // N_J
    # programs; each stores its fp32 partial tile and the tile's last sums them.
    split = tl.program_id(2) // N_J
    ca_lo = split * TAPS_PER_SPLIT
    ca_hi = tl.minimum(ca_lo + TAPS_PER_SPLIT, C_IN * K)
    acc = _toeplitz_conv_tile(
        x_ptr, w_ptr, b, o, offs_i, j_first, offs_j, C_IN, N_ROWS, M_ROWS, D, K, STRIDE,
        PAD_TOP, PAD_LEFT, ca_lo, ca_hi, PRECISION, BLOCK_I, BLOCK_J, BLOCK_K,
    )  # fmt: skip
    if SPLIT:
        n_splits = tl.num_programs(2) // N_J
        tile = (pid_bo * tl.num_programs(1) + pid_i) * N_J + pid_j
        n_tiles = tl.num_programs(0) * tl.num_programs(1) * N_J
        local = tl.arange(0, BLOCK_I)[:, None] * BLOCK_J + tl.arange(0, BLOCK_J)[None, :]
        part = part_ptr + tile.to(tl.int64) * (BLOCK_I * BLOCK_J) + local
        stride_s = n_tiles.to(tl.int64) * (BLOCK_I * BLOCK_J)
        tl.store(part + split * stride_s, acc)
        if last_to_arrive(count_ptr + tile, n_splits):
            acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
            for _ in range(n_splits):
                acc += tl.load(part, cache_modifier=".cg")
                part += stride_s
            _conv_epilogue(acc, bias_ptr, out_ptr, b, o, offs_i, offs_j, C_OUT, M_ROWS, D,
                           HAS_BIAS, RELU)  # fmt: skip
    else:
        _conv_epilogue(acc, bias_ptr, out_ptr, b, o, offs_i, offs_j, C_OUT, M_ROWS, D,
                       HAS_BIAS, RELU)  # fmt: skip


@triton.jit
def _conv_epilogue(
    acc, bias_ptr, out_ptr, b, o, offs_i, offs_j, C_OUT, M_ROWS, D,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
):  # fmt: skip
    """Bias, ReLU and the store of the forward's output tile."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_rows = out_ptr + ((b * C_OUT + o) * M_ROWS + offs_i).to(tl.int64) * D
    tl.store(
        out_rows[:, None] + offs_j[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=(offs_i < M_ROWS)[:, None] & (offs_j < D)[None, :],
    )


@triton.jit
def _masked_grad(g_ptr, out_ptr, offs, mask, RELU: tl.constexpr):
    """The pre-activation gradient at ``offs``: dL/dout, zero where out <= 0 under ReLU."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    if RELU:
        out = tl.load(out_ptr + offs, mask=mask, other=0.0)
        g = tl.where(out > 0, g, 0.0).to(g.dtype)
    return g


@triton.jit
def _memconv_dx_kernel(
    g_ptr,
    out_ptr,
    w_ptr,
    dx_ptr,
    C_IN,
    C_OUT,
    N_ROWS,
    M_ROWS,
    D,
    K,
    STRIDE,
    PAD_TOP,
    PAD_LEFT,
    N_PHASE_BLOCKS,
    RELU: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_j = tl.program_id(2)
    b = pid_bc // C_IN
    c = pid_bc % C_IN
    # Rows r = q*s + rho of one phase rho share the same taps a = a0 + l*s.
    rho = pid_r // N_PHASE_BLOCKS
    offs_q = (pid_r % N_PHASE_BLOCKS) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rows = offs_q * STRIDE + rho
    row_ok = rows < N_ROWS
    a0 = (rho + PAD_TOP) % STRIDE
    i0 = (rho + PAD_TOP - a0) // STRIDE
    n_taps = (K - a0 + STRIDE - 1) // STRIDE
    jp_first = pid_j * BLOCK_J
    offs_jp = jp_first + tl.arange(0, BLOCK_J)
    # Output columns j with a tap j' - j + q in [0, d) for some j' of this tile.
    j_lo = (tl.maximum(jp_first + PAD_LEFT - D + 1, 0) // BLOCK_K) * BLOCK_K
    j_hi = tl.minimum(jp_first + BLOCK_J + PAD_LEFT, D)
    acc = tl.zeros((BLOCK_Q, BLOCK_J), dtype=tl.float32)
    for o in range(0, C_OUT):
        for tap_i in range(0, n_taps):
            a = a0 + tap_i * STRIDE
            offs_i = offs_q + i0 - tap_i
            i_ok = row_ok & (offs_i >= 0) & (offs_i < M_ROWS)
            g_offs = ((b * C_OUT + o) * M_ROWS + offs_i).to(tl.int64) * D
            w_row = w_ptr + ((o * C_IN + c) * K + a) * D
            for j0 in range(j_lo, j_hi, BLOCK_K):
                offs_j = j0 + tl.arange(0, BLOCK_K)
                g_mask = i_ok[:, None] & (offs_j < D)[None, :]
                gt = _masked_grad(g_ptr, out_ptr, g_offs[:, None] + offs_j[None, :], g_mask, RELU)
                tap = offs_jp[None, :] - offs_j[:, None] + PAD_LEFT
                wt = tl.load(w_row + tap, mask=(tap >= 0) & (tap < D), other=0.0)
                acc = tl.dot(gt, wt.to(gt.dtype), acc, input_precision=PRECISION)
    dx_rows = dx_ptr + ((b * C_IN + c) * N_ROWS + rows).to(tl.int64) * D
    tl.store(
        dx_rows[:, None] + offs_jp[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (offs_jp < D)[None, :],
    )


@triton.jit
def _memconv_dw_kernel(
    g_ptr,
    out_ptr,
    x_ptr,
    dw_part_ptr,
    dw_ptr,
    count_ptr,
    N_BATCH,
    C_IN,
    C_OUT,
    N_ROWS,
    M_ROWS,
    D,
    K,
    STRIDE,
    PAD_TOP,
    PAD_LEFT,
    ROWS_PER_PROGRAM,
    RELU: tl.constexpr,
    PRECISION: tl.constexpr,
    SHIFTS: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid_f = tl.program_id(1)
    pid_s = tl.program_id(2)
    # Rows of the product: (c, a, u) for the taps t = u * SHIFTS + delta; U of them per
    # kernel row. Columns: (delta, o), SHIFTS shifts of every output channel (module doc).
    U = tl.cdiv(D, SHIFTS)
    F = C_IN * K * U
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    ca = offs_f // U
    t0 = (offs_f % U) * SHIFTS
    c = ca // K
    a = ca % K
    n = tl.arange(0, BLOCK_O)
    o = n % C_OUT
    delta = n // C_OUT
    n_ok = delta < SHIFTS
    # dw^T[(c, a, u), (delta, o)] = sum_{b, i, j} x[b, c, i*s + a - p, j + t0 - q]
    #                                             g[b, o, i, j - delta]
    # (with j' = j + delta the tap t0 + delta's correlation): the long (c, a, u) axis in M,
    # and SHIFTS x c_out columns in the N of 16 that tl.dot needs instead of c_out alone.
    acc = tl.zeros((BLOCK_F, BLOCK_O), dtype=tl.float32)
    # dbias[o] = sum_{b, i, j} g[b, o, i, j]: the unshifted (delta = 0) columns of the g
    # tiles, which visit every j once.
    db = tl.zeros((BLOCK_O,), dtype=tl.float32)
    bi_lo = pid_s * ROWS_PER_PROGRAM
    bi_hi = tl.minimum(bi_lo + ROWS_PER_PROGRAM, N_BATCH * M_ROWS)
    for bi in range(bi_lo, bi_hi):
        b = bi // M_ROWS
        i = bi % M_ROWS
        x_row = i * STRIDE + a - PAD_TOP
        x_ok = f_ok & (x_row >= 0) & (x_row < N_ROWS)
        x_cols = x_ptr + ((b * C_IN + c) * N_ROWS + x_row).to(tl.int64) * D + t0 - PAD_LEFT
        g_row = ((b * C_OUT + o) * M_ROWS + i).to(tl.int64) * D - delta
        for j0 in range(0, D + SHIFTS - 1, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            gj = offs_j[:, None] - delta[None, :]
            gt = _masked_grad(
                g_ptr,
                out_ptr,
                g_row[None, :] + offs_j[:, None],
                n_ok[None, :] & (gj >= 0) & (gj < D),
                RELU,
            )
            db += tl.sum(gt.to(tl.float32), axis=0)
            col = offs_j[None, :] + t0[:, None] - PAD_LEFT
            ht = tl.load(
                x_cols[:, None] + offs_j[None, :],
                mask=x_ok[:, None] & (col >= 0) & (col < D),
                other=0.0,
            )
            acc = tl.dot(ht, gt, acc, input_precision=PRECISION)
    # One split's partials: dw [C_OUT, C_IN*K*D], then dbias [C_OUT] (from the first
    # column tile's programs); the column tile's last split sums them in split order into
    # dw (and dbias), in the weight's dtype.
    weights = C_IN * K * D
    stride_s = C_OUT * (weights + 1)
    t = t0[:, None] + delta[None, :]
    offs = (o * weights)[None, :] + (ca * D)[:, None] + t
    ok = f_ok[:, None] & n_ok[None, :] & (t < D)
    db_ok = delta + pid_f == 0  # the unshifted columns of the first column tile
    split = dw_part_ptr + pid_s.to(tl.int64) * stride_s
    tl.store(split + offs, acc, mask=ok)
    tl.store(split + C_OUT * weights + o, db, mask=db_ok)
    n_splits = tl.num_programs(2)
    if last_to_arrive(count_ptr + pid_f, n_splits):
        acc = tl.zeros((BLOCK_F, BLOCK_O), dtype=tl.float32)
        db = tl.zeros((BLOCK_O,), dtype=tl.float32)
        split = dw_part_ptr
        for _ in range(n_splits):
            acc += tl.load(split + offs, mask=ok, other=0.0, cache_modifier=".cg")
            db += tl.load(split + C_OUT * weights + o, mask=db_ok, other=0.0,
                          cache_modifier=".cg")  # fmt: skip
            split += stride_s
        tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=ok)
        tl.store(dw_ptr + C_OUT * weights + o, db.to(dw_ptr.dtype.element_ty), mask=db_ok)


# --------------------------------------------------------------------------------------
# Launchers (plain functions on contiguous 4-D tensors of one dtype)
# --------------------------------------------------------------------------------------


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int):
    if weight.dim() != 4:
        raise ValueError(
            f"memory_conv: weight must be [c_out, c_in, k, d], got {tuple(weight.shape)}"
        )
    c_out, c_in, _, d = weight.shape
    if x.dim() != 4 or x.shape[1] != c_in or x.shape[3] != d:
        raise ValueError(
            f"memory_conv: input of shape {tuple(x.shape)} does not match a kernel of shape "
            f"{tuple(weight.shape)} (expected [N, {c_in}, n, {d}])"
        )
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"memory_conv: bias must be [{c_out}], got {tuple(bias.shape)}")
    if stride < 1:
        raise ValueError(f"memory_conv: stride must be >= 1, got {stride}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"memory_conv: {name} of shape {tuple(t.shape)} must be contiguous")
        if t is not None and t.dtype not in FUSED_DTYPES:
            raise ValueError(f"memory_conv: {name} is {t.dtype}, not one of {FUSED_DTYPES}")


def forward_split(tiles: int, taps: int) -> tuple[int, int]:
    """(splits, kernel rows per split) of the forward's K (its c_in * k kernel rows): one
    split where the output tiles fill MIN_PROGRAMS programs, else enough to fill them."""
    if tiles >= MIN_PROGRAMS:
        return 1, taps
    per_split = max(1, taps // triton.cdiv(MIN_PROGRAMS, tiles))
    return triton.cdiv(taps, per_split), per_split


def memconv_forward_config(
    n_batch: int,
    c_out: int,
    m: int,
    d: int,
    taps: int,
    dtype: torch.dtype,
    relu: bool,
    has_bias: bool,
) -> LaunchConfig:
    """Launch configuration of _memconv_fwd_kernel for an output [n_batch, c_out, m, d] from
    taps = c_in * k kernel rows: one program per output tile and split of the kernel rows
    (forward_split), the splits along grid axis 2 after the column tiles."""
    block_i = _block_i(dtype)
    n_j = triton.cdiv(d, BLOCK_J)
    tiles = n_batch * c_out * triton.cdiv(m, block_i) * n_j
    splits, _ = forward_split(tiles, taps)
    return LaunchConfig(
        grid=(n_batch * c_out, triton.cdiv(m, block_i), n_j * splits),
        constexprs=dict(
            HAS_BIAS=has_bias,
            RELU=relu,
            SPLIT=splits > 1,
            PRECISION=dot_precision(dtype),
            BLOCK_I=block_i,
            BLOCK_J=BLOCK_J,
            BLOCK_K=BLOCK_K,
        ),
        num_warps=NUM_WARPS,
        num_stages=_stages(dtype),
    )


def memconv_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, relu: bool
) -> torch.Tensor:
    """relu(conv(x)) for x [N, c_in, n, d]; returns [N, c_out, ceil(n/s), d]."""
    _check(x, weight, bias, stride)
    n_batch, c_in, n, d = x.shape
    c_out, _, k, _ = weight.shape
    m, top, _ = same_padding(n, k, stride)
    left = same_padding(d, d, 1)[1]
    out = torch.empty((n_batch, c_out, m, d), device=x.device, dtype=x.dtype)
    config = memconv_forward_config(n_batch, c_out, m, d, c_in * k, x.dtype, relu, bias is not None)
    n_tiles = config.grid[0] * config.grid[1] * triton.cdiv(d, BLOCK_J)
    splits, per_split = forward_split(n_tiles, c_in * k)
    block = config.constexprs["BLOCK_I"] * BLOCK_J
    part = x.new_empty((splits * n_tiles * block,) if splits > 1 else (1,), dtype=torch.float32)
    launch(
        _memconv_fwd_kernel, config,
        x, weight, bias if bias is not None else weight, out, part,
        arrival_counters(x.device, n_tiles), c_in, c_out, n, m, d, k, stride, top, left,
        triton.cdiv(d, BLOCK_J), per_split,
    )  # fmt: skip
    return out


def memconv_dx_config(
    n_batch: int, c_in: int, n: int, d: int, stride: int, dtype: torch.dtype, relu: bool
) -> LaunchConfig:
    """Launch configuration of _memconv_dx_kernel for dx [n_batch, c_in, n, d]: the rows of
    each phase r mod stride in blocks of BLOCK_Q."""
    block_q = DX_BLOCK_Q.get(dtype, BLOCK_I_HALF)
    n_phase_blocks = triton.cdiv(triton.cdiv(n, stride), block_q)
    return LaunchConfig(
        grid=(
            n_batch * c_in,
            stride * n_phase_blocks,
            triton.cdiv(d, DX_BLOCK_J.get(dtype, BLOCK_J)),
        ),
        constexprs=dict(
            RELU=relu,
            PRECISION=dot_precision(dtype),
            BLOCK_Q=block_q,
            BLOCK_J=DX_BLOCK_J.get(dtype, BLOCK_J),
            BLOCK_K=BLOCK_K,
        ),
        num_warps=DX_WARPS,
        num_stages=DX_STAGES.get(dtype, STAGES_HALF),
    )


def memconv_backward_input(
    grad: torch.Tensor, out: torch.Tensor | None, weight: torch.Tensor, n: int, stride: int
):
    """dx [N, c_in, n, d] from grad [N, c_out, m, d]: dL/dout masked by out > 0 in the
    kernel when ``out`` is given (ReLU), else the pre-activation gradient."""
    n_batch, c_out, m, d = grad.shape
    _, c_in, k, _ = weight.shape
    _, top, _ = same_padding(n, k, stride)
    left = same_padding(d, d, 1)[1]
    dx = torch.empty((n_batch, c_in, n, d), device=grad.device, dtype=grad.dtype)
    config = memconv_dx_config(n_batch, c_in, n, d, stride, grad.dtype, out is not None)
    n_phase_blocks = config.grid[1] // stride
    launch(
        _memconv_dx_kernel, config,
        grad, grad if out is None else out, weight, dx,
        c_in, c_out, n, m, d, k, stride, top, left, n_phase_blocks,
    )  # fmt: skip
    return dx


def dw_shifts(c_out: int) -> int:
    """Shifts of the output channels that fill the dw product's N (module docstring)."""
    return max(1, pow2_at_least(c_out, BLOCK_O_MIN) // c_out)


#: dw warps: two warpgroups; one warpgroup's registers cannot hold the tiles and the last
#: split's reduction.
DW_WARPS = 8


#: dw rows (the M) per tile: fp32 (ieee) holds the Hankel tile in registers, so half.
DW_BLOCK_F = {torch.float32: BLOCK_F // 2}


def memconv_dw_config(
    n_batch: int, c_in: int, c_out: int, m: int, d: int, k: int, dtype: torch.dtype, relu: bool
) -> LaunchConfig:
    """Launch configuration of _memconv_dw_kernel: rows (c, a, u) in BLOCK_F tiles (taps t =
    u * SHIFTS + delta), columns (delta, o) in one BLOCK_O tile, the reduction over (b, i)
    split into grid[2] parts of about ROWS_PER_SPLIT rows, or more parts where that leaves
    fewer than MIN_PROGRAMS programs."""
    rows = n_batch * m
    block_o = pow2_at_least(c_out, BLOCK_O_MIN)
    block_f = DW_BLOCK_F.get(dtype, BLOCK_F)
    shifts = dw_shifts(c_out)
    tiles = triton.cdiv(c_in * k * triton.cdiv(d, shifts), block_f)
    # Split K further where the column tiles alone leave SMs idle (the write conv's 50 rows).
    splits = min(rows, max(triton.cdiv(rows, ROWS_PER_SPLIT), triton.cdiv(MIN_PROGRAMS, tiles)))
    return LaunchConfig(
        grid=(1, tiles, max(splits, 1)),
        constexprs=dict(
            RELU=relu,
            PRECISION=dot_precision(dtype),
            SHIFTS=shifts,
            BLOCK_O=block_o,
            BLOCK_F=block_f,
            BLOCK_J=BLOCK_JW,
        ),
        num_warps=DW_WARPS,
        num_stages=_stages(dtype),
    )


def memconv_backward_weight(
    grad: torch.Tensor,
    out: torch.Tensor | None,
    x: torch.Tensor,
    k: int,
    stride: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """dw [c_out, c_in, k, d] flattened, then dbias [c_out], in one vector of ``dtype`` (the
    parameters'), from grad [N, c_out, m, d] (masked as in memconv_backward_input) and x
    [N, c_in, n, d]: one launch (its splits' partials summed by the last split)."""
    n_batch, c_out, m, d = grad.shape
    _, c_in, n, _ = x.shape
    _, top, _ = same_padding(n, k, stride)
    left = same_padding(d, d, 1)[1]
    config = memconv_dw_config(n_batch, c_in, c_out, m, d, k, x.dtype, out is not None)
    splits = config.grid[2]
    rows_per_program = triton.cdiv(n_batch * m, splits)
    n_weights = c_out * c_in * k * d
    parts = torch.empty((splits, n_weights + c_out), device=x.device, dtype=torch.float32)
    dwb = torch.empty((n_weights + c_out,), device=x.device, dtype=dtype)
    launch(
        _memconv_dw_kernel, config,
        grad, grad if out is None else out, x, parts, dwb,
        arrival_counters(x.device, config.grid[1]),
        n_batch, c_in, c_out, n, m, d, k, stride, top, left, rows_per_program,
    )  # fmt: skip
    return dwb


# --------------------------------------------------------------------------------------
# Custom ops (torch.compile sees them as opaque nodes; inductor inlines the kernels)
# --------------------------------------------------------------------------------------


@triton_op("rwmn::memory_conv", mutates_args=())
def _memory_conv_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, relu: bool
) -> torch.Tensor:
    return memconv_forward(x, weight, bias, stride, relu)


@triton_op("rwmn::memory_conv_backward", mutates_args=())
def _memory_conv_backward_op(
    grad: torch.Tensor, out: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, [dw flattened, dbias]) from dL/dout and the layer's ReLU output ``out`` (the
    mask out > 0 applied in the kernels), or from the pre-activation gradient when ``out``
    is None; dx in x's dtype, the parameters' gradients in the weight's."""
    if out is not None and x.dtype == torch.float32:
        # fp32 (ieee) dx with the ReLU mask inside spilled: the mask goes first there.
        grad, out = torch.where(out > 0, grad, 0.0), None
    # dx reads the kernel rows in the compute dtype (fp32 rows next to the ReLU mask spilled).
    dx = memconv_backward_input(grad, out, weight.to(x.dtype), x.shape[2], stride)
    return dx, memconv_backward_weight(grad, out, x, weight.shape[2], stride, weight.dtype)


def conv_input_grads(grad, x, weight, has_bias: bool, stride: int, out=None):
    """(dx, dw, dbias or None) of the layer from dL/dout and its ReLU output ``out``, or
    from the pre-activation gradient when ``out`` is None."""
    dx, dwb = torch.ops.rwmn.memory_conv_backward(
        grad.to(x.dtype).contiguous(), out, x, weight, stride
    )
    dw, db = dwb.split([weight.numel(), weight.shape[0]])
    return dx, dw.view(weight.shape), db if has_bias else None


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, relu = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.has_bias = bias is not None
    ctx.stride = stride
    ctx.relu = relu


def _backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    mask = out if ctx.relu else None
    dx, dw, db = conv_input_grads(grad_out, x, weight, ctx.has_bias, ctx.stride, mask)
    return dx, dw, db, None, None


_memory_conv_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Public entry point (the signature rwmn.ops dispatches to)
# --------------------------------------------------------------------------------------


def memory_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    relu: bool = True,
) -> torch.Tensor:
    """Fused kernels.reference.memory_conv: x [..., c_in, n, d] -> [..., c_out, ceil(n/s), d]."""
    c_out, c_in, _, d = weight.shape
    if x.dim() < 3 or x.shape[-3] != c_in or x.shape[-1] != d:
        raise ValueError(
            f"memory_conv: input of shape {tuple(x.shape)} does not match a kernel of shape "
            f"{tuple(weight.shape)} (expected [..., {c_in}, n, {d}])"
        )
    dtype = compute_dtype(x, weight, bias)
    if runs_reference("memory_conv", dtype):
        return reference.memory_conv(x, weight, bias, stride, relu)
    lead, n = x.shape[:-3], x.shape[-2]
    x4 = cast(x.reshape(-1, c_in, n, d), dtype)
    # The parameters go in as they are (the kernels round their tiles to x's dtype, and
    # return their gradients in the parameters' dtype): no cast launches either way.
    out = torch.ops.rwmn.memory_conv(x4, weight.contiguous(), bias, stride, relu)
    return out.reshape(*lead, c_out, out.shape[-2], d)
