"""The read network of B questions over one write memory, one launch per hop.

Math (kernels.reference.read_network is the ground truth). With the read CBP's count
sketches psi1 (memory rows) and psi2 (questions), D = d, K = D // 2 + 1:
    Mq[b, c, r] = CBP(M[c, r], u[b]) = IDFT(X[c, r] Q[b]),
    X[c, r] = DFT(psi1(M[c, r])),  Q[b] = DFT(psi2(u[b]))        (half spectra, K bins),
then the read convolutions over Mq [B, C, m, d] and the attention readout over the rows of
the last one (kernels/attention.py).

The inverse DFT is linear, and so is each read convolution along the width: with
Finv [2K, D] the real inverse half-spectrum DFT (rows k < K: c_k cos(2 pi k t / D) / D,
rows K + k: -c_k sin(2 pi k t / D) / D; c_k = 1 for bins 0 and D/2, else 2) and T_{o,c,a}
the d x d Toeplitz matrix of kernel row (o, c, a) (kernels/memconv.py),
    y[b, o, i] = bias_o + sum_{c, a} Mq[b, c, i*s + a - p] T_{o,c,a}
               = bias_o + sum_{c, a} [Re P | Im P][b, c, i*s + a - p] G_{o,c,a},
    P[b, c, r] = X[c, r] Q[b],   G_{o,c,a} = Finv T_{o,c,a}   ([2K, D], "spectral weights").
So the last read layer runs as a GEMM whose A operand is formed in the prologue of each
K chunk from the spectra (one complex multiply per element, in registers) and whose B
operand is G: Mq is never formed, in registers or in memory, and the reduction is 2K =
D + 2 long, so the executed tensor-core work equals the Toeplitz convolution's. The
question spectrum Q[b] is a dense sketch-DFT of one row on CUDA cores, chunk by chunk, in
the same program (O(d K) per program, ~1% of its tensor work at the model's sizes).

What runs (one read layer, the model's --read 3-1-3):
  * once per forward, shared by every hop (prepare): the memory spectra X (one launch of
    kernels.cbp's dense spectra kernel: C*m rows, ~0.03 GFLOP at the model's sizes) and
    G for the read layer (one launch, kernels/spectral_weights.py);
  * per hop: ONE launch, _read_fwd_kernel, per (question, output channel, BLOCK_I slots):
    Q chunk, P chunk, the spectral GEMM, bias, ReLU, unit norm, and the flash-decoding
    softmax partials of kernels/attention.py, merged by the question's last block.
Backward. The forward stores the read memory Mr = relu(y) ([B, c_out, m, d], 2.9 MB in
bf16 at the model's sizes): the readout's backward (kernels/attention.py, ReLU mask
included) runs over it and gives dL/dy without recomputing the conv tile, which would
cost the forward's whole GEMM again (18 GFLOP at the model's sizes). Then the CBP forward
again (kernels.cbp, Mq materialised once: the A operand of the weight gradient, needed in
time order), the memory_conv dx/dw kernels and the CBP backward: dL/dMq is materialised
once ([B, C, m, d], 5.8 MB fp32), cheaper than forming dL/dP and dL/dG in the spectral
domain, which would need a second dense GEMM family for the weight gradient.

With several read layers the first runs from the spectra too (_read_conv_fwd_kernel: the
same spectral GEMM, its ReLU output stored), then one memory_conv per further layer but
the last and the conv-attention launch: the layers before the last are materialised, Mq
is not. Backward as above (the first layer's ReLU mask from its saved output). See
kernels/README.md.

May import: torch, triton, kernels._common, kernels.attention, kernels.cbp, kernels.memconv,
kernels.readout, kernels.reference, kernels.spectral_weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels._common import (
    FUSED_DTYPES,
    UNIT_NORM_EPS,
    LaunchConfig,
    cast,
    compute_dtype,
    dot_precision,
    launch,
    split_width,
)
from kernels.attention import (
    BLOCK_I_SMALL,
    BLOCK_I_WGMMA,
    MAX_FUSED_D,
    conv_attention_read,
    zeros_if_none,
)
from kernels.cbp import (
    cached_twiddles,
    cbp,
    cbp_with_vjp,
    check_hash,
    half_spectrum,
    twiddle,
)
from kernels.memconv import conv_input_grads, memory_conv
from kernels.readout import merge_constexprs, merge_if_last, readout_buffers, softmax_block_split
from kernels.reference import same_padding
from kernels.spectral_weights import spectral_weights

#: Spectrum bins per step of the spectral GEMM, whose K is twice that (Re and Im); bf16/fp16:
#: the smallest wgmma step (K = 16), which keeps the 64-slot tile in registers on sm_80.
BLOCK_BINS = 16
BLOCK_BINS_HALF = 8
#: Question elements per step of the question spectrum ([BLOCK_N, bins] twiddle tiles).
BLOCK_N = 32
NUM_WARPS = 8


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _question_spectrum(
    u_ptr,
    h_ptr,
    s_ptr,
    tab_ptr,
    b,
    ks,
    D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Re and Im of Q_k = sum_i s2(i) u[b, i] e^{-2 pi i h2(i) k / D} at the bins ks: one
    row, too thin for a tensor-core tile, so CUDA-core products and a reduction."""
    re = tl.zeros((BLOCK_K,), dtype=tl.float32)
    im = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nm = ns < D
        v = tl.load(u_ptr + b * D + ns, mask=nm, other=0.0).to(tl.float32)
        v *= tl.load(s_ptr + ns, mask=nm, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + ns, mask=nm, other=0).to(tl.int32)
        cos, sin = twiddle(h, ks, tab_ptr, D)
        re += tl.sum(v[:, None] * cos, axis=0)
        im -= tl.sum(v[:, None] * sin, axis=0)
    return re, im


@triton.jit
def _spectral_conv_rows(
    xs_ptr,
    g_ptr,
    bias_ptr,
    u_ptr,
    h2_ptr,
    s2_ptr,
    tab_ptr,
    b,
    o,
    offs_i,
    offs_d1,
    offs_d2,
    C_IN,
    N_ROWS,
    M_ROWS,
    KH,
    STRIDE,
    PAD_TOP,
    D: tl.constexpr,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Pre-activation rows y[b, o, offs_i, :] of the read layer over Mq = CBP(M, u[b]),
    from the memory spectra xs [C*n, 2K] and the spectral weights g [c_out, C, k, 2K, D]
    (module docstring), as two column chunks (offs_d1, offs_d2: split_width(D)); fp32,
    zero outside the tensor."""
    ok1 = offs_d1 < D
    ok2 = offs_d2 < D
    acc1 = tl.zeros((BLOCK_I, BLOCK_D1), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_I, BLOCK_D2), dtype=tl.float32)
    g_out = g_ptr + o.to(tl.int64) * C_IN * KH * (2 * K * D)
    # One GEMM step per chunk of BLOCK_K bins, K = 2 BLOCK_K: A = [Re P | Im P] of the
    # chunk, B = the matching rows of G (one product per step, not one each for Re and
    # Im: two wgmma in flight spill). Column c < BLOCK_K is Re of bin k0 + c, column
    # BLOCK_K + c its Im; with X = [xr | xi] read at col and X' = [xi | xr] at swap,
    # [Re P | Im P] = X [Qr | Qr] + X' [-Qi | Qi].
    cols = tl.arange(0, 2 * BLOCK_K)
    is_im = cols >= BLOCK_K
    for k0 in range(0, K, BLOCK_K):
        # Bins outermost: the question's spectrum chunk is formed once per chunk and serves
        # every (channel, tap).
        ks = k0 + cols % BLOCK_K
        k_ok = ks < K
        col = tl.where(is_im, K + ks, ks)
        swap = tl.where(is_im, ks, K + ks)
        qr, qi = _question_spectrum(u_ptr, h2_ptr, s2_ptr, tab_ptr, b, ks, D, 2 * BLOCK_K,
                                    BLOCK_N)  # fmt: skip
        qi = tl.where(is_im, qi, -qi)
        g_off1 = col[:, None] * D + offs_d1[None, :]
        g_off2 = col[:, None] * D + offs_d2[None, :]
        g_ok1 = k_ok[:, None] & ok1[None, :]
        g_ok2 = k_ok[:, None] & ok2[None, :]
        for ca in range(0, C_IN * KH):
            c = ca // KH
            a = ca % KH
            rows = offs_i * STRIDE + a - PAD_TOP
            row_ok = (offs_i < M_ROWS) & (rows >= 0) & (rows < N_ROWS)
            spec = xs_ptr + (c * N_ROWS + rows).to(tl.int64)[:, None] * (2 * K)
            x_ok = row_ok[:, None] & k_ok[None, :]
            x = tl.load(spec + col[None, :], mask=x_ok, other=0.0)
            x_swap = tl.load(spec + swap[None, :], mask=x_ok, other=0.0)
            g_ca = g_out + ca * (2 * K * D)
            gt1 = tl.load(g_ca + g_off1, mask=g_ok1, other=0.0)
            gt2 = tl.load(g_ca + g_off2, mask=g_ok2, other=0.0)
            # P = X Q, formed in fp32 and rounded once to the operand dtype of the GEMM.
            p = (x * qr[None, :] + x_swap * qi[None, :]).to(gt1.dtype)
            acc1 = tl.dot(p, gt1, acc1, input_precision=PRECISION)
            acc2 = tl.dot(p, gt2, acc2, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + o).to(tl.float32)
        acc1 += bias
        acc2 += bias
    # Padding rows/columns would otherwise carry the bias into the softmax.
    i_ok = (offs_i < M_ROWS)[:, None]
    return tl.where(i_ok & ok1[None, :], acc1, 0.0), tl.where(i_ok & ok2[None, :], acc2, 0.0)


@triton.jit
def _read_fwd_kernel(
    xs_ptr,
    g_ptr,
    bias_ptr,
    u_ptr,
    h2_ptr,
    s2_ptr,
    tab_ptr,
    z_ptr,
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    o_ptr,
    p_ptr,
    lse_ptr,
    count_ptr,
    mr_ptr,
    C_IN,
    C_OUT,
    N_ROWS,
    M_ROWS,
    KH,
    STRIDE,
    PAD_TOP,
    N_I_BLOCKS,
    sharp,
    eps,
    D: tl.constexpr,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    MERGE_R: tl.constexpr,
    MERGE_D: tl.constexpr,
):
    """One read layer and the attention readout for question b, output channel o and
    BLOCK_I slots: the spectral GEMM (module docstring), bias, ReLU (its output, the read
    memory Mr, stored for the backward), unit norm, and the softmax partials of
    kernels/attention.py (z, block max, block sum, block readout), on the row's two
    column chunks; the question's last block merges them (o, p, lse)."""
    b = tl.program_id(0)
    blk = tl.program_id(1)
    o = blk // N_I_BLOCKS
    offs_i = (blk % N_I_BLOCKS) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d1 = tl.arange(0, BLOCK_D1)
    offs_d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
    i_ok = offs_i < M_ROWS
    ok1 = offs_d1 < D
    ok2 = offs_d2 < D
    y1, y2 = _spectral_conv_rows(
        xs_ptr, g_ptr, bias_ptr, u_ptr, h2_ptr, s2_ptr, tab_ptr, b, o, offs_i, offs_d1,
        offs_d2, C_IN, N_ROWS, M_ROWS, KH, STRIDE, PAD_TOP,
        D, K, HAS_BIAS, PRECISION, BLOCK_I, BLOCK_D1, BLOCK_D2, BLOCK_K, BLOCK_N,
    )  # fmt: skip
    tile1 = tl.maximum(y1, 0.0)
    tile2 = tl.maximum(y2, 0.0)
    # The read memory Mr (the ReLU rows) for the backward: storing it costs 2 bytes an
    # element (bf16) where recomputing it costs the whole conv tile again.
    rows = mr_ptr + ((b * C_OUT + o) * M_ROWS).to(tl.int64) * D + offs_i[:, None] * D
    tl.store(rows + offs_d1[None, :], tile1.to(mr_ptr.dtype.element_ty),
             mask=i_ok[:, None] & ok1[None, :])  # fmt: skip
    tl.store(rows + offs_d2[None, :], tile2.to(mr_ptr.dtype.element_ty),
             mask=i_ok[:, None] & ok2[None, :])  # fmt: skip
    rn = tl.rsqrt(eps + tl.sum(tile1 * tile1, axis=1) + tl.sum(tile2 * tile2, axis=1))
    u1 = tl.load(u_ptr + b * D + offs_d1, mask=ok1, other=0.0).to(tl.float32)
    u2 = tl.load(u_ptr + b * D + offs_d2, mask=ok2, other=0.0).to(tl.float32)
    part = b * (C_OUT * N_I_BLOCKS) + blk
    acc = pacc_ptr + part.to(tl.int64) * D
    softmax_block_split(
        tile1, tile2, u1, u2, rn, i_ok,
        z_ptr + (b * C_OUT + o) * M_ROWS + offs_i, pm_ptr + part, pl_ptr + part,
        acc + offs_d1, acc + offs_d2, ok1, ok2, sharp,
    )  # fmt: skip
    merge_if_last(
        count_ptr, z_ptr, pm_ptr, pl_ptr, pacc_ptr, o_ptr, p_ptr, lse_ptr, b, C_OUT * M_ROWS,
        D, C_OUT * N_I_BLOCKS, BLOCK_B, MERGE_R, MERGE_D,
    )  # fmt: skip


@triton.jit
def _read_conv_fwd_kernel(
    xs_ptr,
    g_ptr,
    bias_ptr,
    u_ptr,
    h2_ptr,
    s2_ptr,
    tab_ptr,
    out_ptr,
    C_IN,
    C_OUT,
    N_ROWS,
    M_ROWS,
    KH,
    STRIDE,
    PAD_TOP,
    N_I_BLOCKS,
    D: tl.constexpr,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The first of several read layers over Mq = CBP(M, u[b]), from the spectra:
    out[b, o, i, :] = relu(y[b, o, i, :]) (the same spectral GEMM as _read_fwd_kernel), for
    question b, output channel o and BLOCK_I slots; the layer's output is stored."""
    b = tl.program_id(0)
    blk = tl.program_id(1)
    o = blk // N_I_BLOCKS
    offs_i = (blk % N_I_BLOCKS) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d1 = tl.arange(0, BLOCK_D1)
    offs_d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
    y1, y2 = _spectral_conv_rows(
        xs_ptr, g_ptr, bias_ptr, u_ptr, h2_ptr, s2_ptr, tab_ptr, b, o, offs_i, offs_d1,
        offs_d2, C_IN, N_ROWS, M_ROWS, KH, STRIDE, PAD_TOP,
        D, K, HAS_BIAS, PRECISION, BLOCK_I, BLOCK_D1, BLOCK_D2, BLOCK_K, BLOCK_N,
    )  # fmt: skip
    # A 64-bit base per (question, channel) and int32 offsets within it (at most m * d):
    # 64-bit addresses for the whole tile cost registers the store can spare less.
    rows = out_ptr + ((b * C_OUT + o) * M_ROWS).to(tl.int64) * D + offs_i[:, None] * D
    i_ok = (offs_i < M_ROWS)[:, None]
    tl.store(rows + offs_d1[None, :], tl.maximum(y1, 0.0).to(out_ptr.dtype.element_ty),
             mask=i_ok & (offs_d1 < D)[None, :])  # fmt: skip
    tl.store(rows + offs_d2[None, :], tl.maximum(y2, 0.0).to(out_ptr.dtype.element_ty),
             mask=i_ok & (offs_d2 < D)[None, :])  # fmt: skip


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def read_config(
    n_batch: int,
    c_out: int,
    m: int,
    d: int,
    dtype: torch.dtype,
    has_bias: bool,
    readout: bool = True,
) -> LaunchConfig:
    """Launch configuration of _read_fwd_kernel and _read_conv_fwd_kernel: one program per
    (question, output channel, BLOCK_I slots), each holding the whole width in two column
    chunks (split_width(d)). bf16/fp16: 64 slots, the M of a wgmma tile; fp32 (ieee on
    CUDA cores): 16 (the conv-attention kernel's tiles). ``readout``: _read_fwd_kernel's
    (with the merge's constants), else _read_conv_fwd_kernel's."""
    half = dtype != torch.float32
    block_i = BLOCK_I_WGMMA if half else BLOCK_I_SMALL
    bins = BLOCK_BINS_HALF if half else BLOCK_BINS
    d1, d2 = split_width(d)
    n_blocks = c_out * triton.cdiv(m, block_i)
    constexprs = dict(
        D=d,
        K=half_spectrum(d),
        HAS_BIAS=has_bias,
        PRECISION=dot_precision(dtype),
        BLOCK_I=block_i,
        BLOCK_D1=d1,
        BLOCK_D2=d2,
        BLOCK_K=bins,
        BLOCK_N=BLOCK_N,
    )
    if readout:
        constexprs.update(merge_constexprs(n_blocks, d))
    return LaunchConfig(
        grid=(n_batch, n_blocks),
        constexprs=constexprs,
        num_warps=NUM_WARPS,
        num_stages=1,
    )


def _check_contiguous(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(
            f"read_network: {name} of shape {tuple(t.shape)} and dtype {t.dtype} must be a "
            f"contiguous {dtype} tensor of shape {list(shape)}"
        )


def _read_geometry(spectra, g, bias, u, h2, s2, twiddles, n_rows: int, stride: int):
    """Check the spectral read's operands; (c_in, c_out, kh, m, pad_top)."""
    n_batch, d = u.shape
    c_out, c_in, kh, two_k = g.shape[0], g.shape[1], g.shape[2], 2 * half_spectrum(d)
    _check_contiguous("u", u, (n_batch, d), u.dtype)
    _check_contiguous("spectral weights", g, (c_out, c_in, kh, two_k, d), u.dtype)
    _check_contiguous("memory spectra", spectra, (c_in * n_rows, two_k), torch.float32)
    _check_contiguous("twiddles", twiddles, (2 * d,), torch.float32)
    if bias is not None:
        _check_contiguous("bias", bias, (c_out,), bias.dtype)
    if h2.shape != (d,) or s2.shape != (d,):
        raise ValueError(f"read_network: the question hash and signs must be [{d}]")
    if stride < 1:
        raise ValueError(f"read_network: stride must be >= 1, got {stride}")
    m, top, _ = same_padding(n_rows, kh, stride)
    return c_in, c_out, kh, m, top


def read_forward(spectra, g, bias, u, h2, s2, twiddles, n_rows: int, stride: int, sharp: float):
    """(o [B, d], p [B, c_out * m], lse [B] fp32, Mr [B, c_out, m, d]) of the read layer and
    readout, one launch; Mr = relu(read layer) in u's dtype, kept for the backward.

    spectra [C * n_rows, 2K] fp32: the memory's half spectra (cbp_dense_spectra_launch);
    g [c_out, C, k, 2K, d] = spectral_weights(weight) in u's dtype; bias [c_out] or None;
    u [B, d] (contiguous); h2, s2 the question's hash and signs; twiddles =
    kernels.cbp.plan.twiddle_table(d)."""
    n_batch, d = u.shape
    c_in, c_out, kh, m, top = _read_geometry(spectra, g, bias, u, h2, s2, twiddles, n_rows, stride)
    config = read_config(n_batch, c_out, m, d, u.dtype, bias is not None)
    n_blocks = config.grid[1]
    buffers = readout_buffers(n_batch, n_blocks, c_out * m, d, u.dtype, u.device)
    mr = torch.empty((n_batch, c_out, m, d), device=u.device, dtype=u.dtype)
    launch(
        _read_fwd_kernel, config,
        spectra, g, bias if bias is not None else g, u, h2, s2, twiddles, *buffers, mr,
        c_in, c_out, n_rows, m, kh, stride, top, n_blocks // c_out, float(sharp),
        UNIT_NORM_EPS,
    )  # fmt: skip
    return (*buffers[4:7], mr)


def read_conv_forward(spectra, g, bias, u, h2, s2, twiddles, n_rows: int, stride: int):
    """relu(read layer) [B, c_out, m, d] over Mq = CBP(memory, u) from the same operands as
    read_forward (the first of several read layers), one launch."""
    n_batch, d = u.shape
    c_in, c_out, kh, m, top = _read_geometry(spectra, g, bias, u, h2, s2, twiddles, n_rows, stride)
    config = read_config(n_batch, c_out, m, d, u.dtype, bias is not None, readout=False)
    out = torch.empty((n_batch, c_out, m, d), device=u.device, dtype=u.dtype)
    launch(
        _read_conv_fwd_kernel, config,
        spectra, g, bias if bias is not None else g, u, h2, s2, twiddles, out,
        c_in, c_out, n_rows, m, kh, stride, top, config.grid[1] // c_out,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------
# Custom op and autograd
# --------------------------------------------------------------------------------------


@triton_op("rwmn::read_conv_attention", mutates_args=())
def _read_conv_attention_op(
    memory: torch.Tensor,
    spectra: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    h1: torch.Tensor,
    s1: torch.Tensor,
    h2: torch.Tensor,
    s2: torch.Tensor,
    twiddles: torch.Tensor,
    sharp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, p, lse, Mr) of the one-layer read network. spectra and g must be the memory's
    spectra and spectral_weights(weight) (prepare): the forward reads only them; the
    backward runs the readout's backward over the saved read memory Mr, recomputes Mq from
    memory and u for the weight's gradient and returns the gradients of memory, u, weight
    and bias (none for spectra, g; lse and Mr are not differentiable)."""
    return read_forward(spectra, g, bias, u, h2, s2, twiddles, memory.shape[1], stride, sharp)


@_read_conv_attention_op.register_fake
def _read_conv_attention_fake(
    memory, spectra, u, weight, g, bias, stride, h1, s1, h2, s2, twiddles, sharp
):
    # Explicit, as for kernels.cbp's ops: under TRITON_INTERPRET=1 the body cannot run on
    # fake tensors.
    n_batch, d = u.shape
    m = same_padding(memory.shape[1], weight.shape[2], stride)[0]
    return (
        u.new_empty((n_batch, d)),
        u.new_empty((n_batch, weight.shape[0] * m)),
        u.new_empty((n_batch,), dtype=torch.float32),
        u.new_empty((n_batch, weight.shape[0], m, d)),
    )


def _read_setup(ctx, inputs, output):
    memory, _, u, weight, _, bias, stride, h1, s1, h2, s2, _, sharp = inputs
    o, p, lse, mr = output
    ctx.mark_non_differentiable(lse, mr)
    # Unused outputs' gradients stay None (no zero tensors filled for lse and Mr).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(memory, u, weight, bias, h1, s1, h2, s2, o, p, lse, mr)
    ctx.stride, ctx.sharp = stride, sharp


def _recompute_mq(memory, u, h1, s1, h2, s2):
    """Mq [B, C, m, d] again (the backward's recompute) and the CBP's vjp."""
    return cbp_with_vjp(memory.unsqueeze(0), u[:, None, None, :], h1, s1, h2, s2, u.shape[-1])


def _read_backward(ctx, go, gp, _glse, _gmr):
    memory, u, weight, bias, h1, s1, h2, s2, o, p, lse, mr = ctx.saved_tensors
    # The readout's backward over the saved rows Mr (ReLU mask included): dL/dy.
    n_batch, c_out, m, d = mr.shape
    gy, du = torch.ops.rwmn.attention_read_backward(
        zeros_if_none(go, o),
        gp,
        mr.view(n_batch, c_out * m, d),
        u,
        o,
        p,
        lse,
        ctx.sharp,
        True,
        True,
    )
    mq, cbp_vjp = _recompute_mq(memory, u, h1, s1, h2, s2)
    dmq, dw, db = conv_input_grads(gy.view_as(mr), mq, weight, bias is not None, ctx.stride)
    # u's gradient from the CBP accumulates onto the readout's in the CBP's reduction.
    dmemory, du = cbp_vjp(dmq, du.view(u.shape[0], 1, 1, u.shape[1]))
    return dmemory.view_as(memory), None, du.view_as(u), dw, None, db, *(None,) * 7


_read_conv_attention_op.register_autograd(_read_backward, setup_context=_read_setup)


@triton_op("rwmn::read_conv", mutates_args=())
def _read_conv_op(
    memory: torch.Tensor,
    spectra: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    h1: torch.Tensor,
    s1: torch.Tensor,
    h2: torch.Tensor,
    s2: torch.Tensor,
    twiddles: torch.Tensor,
) -> torch.Tensor:
    """relu(memory_conv(CBP(memory, u))) [B, c_out, m, d], the first of several read layers,
    with the contract of rwmn::read_conv_attention (spectra and g from prepare)."""
    return read_conv_forward(spectra, g, bias, u, h2, s2, twiddles, memory.shape[1], stride)


@_read_conv_op.register_fake
def _read_conv_fake(memory, spectra, u, weight, g, bias, stride, h1, s1, h2, s2, twiddles):
    m = same_padding(memory.shape[1], weight.shape[2], stride)[0]
    return u.new_empty((u.shape[0], weight.shape[0], m, u.shape[1]))


def _read_conv_setup(ctx, inputs, output):
    memory, _, u, weight, _, bias, stride, h1, s1, h2, s2, _ = inputs
    ctx.save_for_backward(memory, u, weight, bias, h1, s1, h2, s2, output)
    ctx.stride = stride


def _read_conv_backward(ctx, grad_out):
    memory, u, weight, bias, h1, s1, h2, s2, out = ctx.saved_tensors
    mq, cbp_vjp = _recompute_mq(memory, u, h1, s1, h2, s2)
    dmq, dw, db = conv_input_grads(grad_out, mq, weight, bias is not None, ctx.stride, out)
    dmemory, du = cbp_vjp(dmq)
    return dmemory.view_as(memory), None, du.view_as(u), dw, None, db, *(None,) * 6


_read_conv_op.register_autograd(_read_conv_backward, setup_context=_read_conv_setup)


# --------------------------------------------------------------------------------------
# Public entry points (the signatures rwmn.ops dispatches to)
# --------------------------------------------------------------------------------------


class ReadMemory(NamedTuple):
    """The question-independent part of the one-launch read (see prepare), reused by every
    hop: the memory in the kernels' dtype, its CBP spectra, the read layer's spectral
    weights, the twiddle table."""

    memory: torch.Tensor
    spectra: torch.Tensor
    spectral_weight: torch.Tensor
    twiddles: torch.Tensor


def _spectral_dtype(memory, weights, biases, u=None) -> torch.dtype | None:
    """The kernels' dtype when the first read layer runs from the spectra (a row width the
    tile holds, a fused dtype), else None."""
    dtype = compute_dtype(memory, u, *weights, *biases)
    if memory.shape[-1] > MAX_FUSED_D or dtype not in FUSED_DTYPES:
        return None
    return dtype


def _prepare(memory, hashes, weight, dtype) -> ReadMemory:
    c, m, d = memory.shape
    h1, s1, _, _ = hashes
    check_hash("h1", h1, s1, d, d)
    memory = cast(memory, dtype)
    twiddles = cached_twiddles(d, memory.device)
    spectra = torch.ops.rwmn.cbp_dense_spectra(memory.detach().view(c * m, d), h1, s1, twiddles)
    return ReadMemory(memory, spectra, spectral_weights(weight, dtype), twiddles)


def prepare(
    memory: torch.Tensor,
    hashes: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
) -> ReadMemory | None:
    """What every hop's read shares (one launch for the memory spectra, the first read
    layer's spectral weights), or None where the read does not run from the spectra (rows
    wider than MAX_FUSED_D, an unfused dtype)."""
    dtype = _spectral_dtype(memory, weights, biases)
    return None if dtype is None else _prepare(memory, hashes, weights[0], dtype)


def _check_read_inputs(memory, u, weights):
    if not weights:
        raise ValueError("read_network needs at least one read layer")
    if memory.dim() != 3 or u.dim() != 2 or memory.shape[-1] != u.shape[-1]:
        raise ValueError(
            f"read_network: memory {tuple(memory.shape)} must be [C, m, d] and u "
            f"{tuple(u.shape)} must be [B, d] with the same d"
        )
    c_out, c_in, _, d = weights[0].shape
    if c_in != memory.shape[0] or d != memory.shape[-1]:
        raise ValueError(
            f"read_network: the first read kernel {tuple(weights[0].shape)} does not match "
            f"memory {tuple(memory.shape)} (expected [c_out, {memory.shape[0]}, k, "
            f"{memory.shape[-1]}])"
        )


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
    prepared: ReadMemory | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused kernels.reference.read_network: memory [C, m, d], u [B, d] -> (o [B, d], p [B, R]).

    prepared: prepare(memory, ...) of this memory, computed once for several hops (else
    computed here)."""
    _check_read_inputs(memory, u, weights)
    h1, s1, h2, s2 = hashes
    d = memory.shape[-1]
    dtype = _spectral_dtype(memory, weights, biases, u)
    layers = list(zip(weights, biases, strides, strict=True))
    if dtype is None:
        mq = _cbp_rows(memory, u, h1, s1, h2, s2, d)
        for w, b, s in layers[:-1]:
            mq = memory_conv(mq, w, b, s)
        w, b, s = layers[-1]
        return conv_attention_read(mq, w, b, s, u, sharp)
    if prepared is not None and prepared.memory.shape != memory.shape:
        raise ValueError(
            f"read_network: prepared for a memory of shape {tuple(prepared.memory.shape)}, "
            f"called with {tuple(memory.shape)}"
        )
    if prepared is None or prepared.spectral_weight.dtype != dtype:
        prepared = _prepare(memory, hashes, weights[0], dtype)
    check_hash("h2", h2, s2, d, d)
    u = cast(u, dtype)
    w, b, s = layers[0]
    # The layer's parameters go in as they are: the kernel reads the bias in fp32 and the
    # backward returns the gradients in the parameters' dtype.
    spectral = (prepared.memory, prepared.spectra, u, w.contiguous(), prepared.spectral_weight,
                b, s, h1, s1, h2, s2, prepared.twiddles)  # fmt: skip
    if len(layers) == 1:
        o, p, _, _ = torch.ops.rwmn.read_conv_attention(*spectral, float(sharp))
        return o, p
    x = torch.ops.rwmn.read_conv(*spectral)
    for w, b, s in layers[1:-1]:
        x = memory_conv(x, w, b, s)
    w, b, s = layers[-1]
    return conv_attention_read(x, w, b, s, u, sharp)


__all__ = [
    "ReadMemory",
    "prepare",
    "read_config",
    "read_conv_forward",
    "read_forward",
    "read_network",
]
