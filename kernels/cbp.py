"""Fused compact bilinear pooling (docs/model.md): one launch forward, one launch backward.

Math. With the count sketches p = psi1(x) (p_j = sum_{i: h1(i) = j} s1(i) x_i) and
q = psi2(y), CBP(x, y) = p (*) q, the circular convolution mod D:

    out = IDFT(P Q),                 P = DFT(p), Q = DFT(q)   (length D, no padding).

Backward, with g = dL/dout and G = DFT(g): dL/dp = IDFT(G conj(Q)) / D and dL/dq =
IDFT(G conj(P)) / D (circular correlations; the 1/D of the inverse is folded into the
spectra here), then the transposed sketch dL/dx_i = s1(i) (dL/dp)[h1(i)], dL/dy_i =
s2(i) (dL/dq)[h2(i)]. Nothing is saved by the forward: the backward recomputes P and Q.

Factorised path (every D = D1 D2 with both factors <= MAX_FACTOR and D >=
FACTORISED_MIN_DIM; the model's 300 and 4096). A program owns rows_per_program rows and
loops over them with one scratch area (per program, sized to stay in L2):
  1. the sketches by a deterministic gather-sum over the inverse hash (inverse_hash: input
     indices sorted by bin, CSR), O(n + D), no atomics;
  2. their DFTs by the four-step Cooley-Tukey factorisation (_dft_factorised_row: a
     D2-point DFT matmul, a twiddle, a D1-point DFT matmul, O(D (D1 + D2)) on tl.dot tiles;
     every twiddle is an exact integer phase mod D looked up in a table of correctly
     rounded cos/sin, so no angle error grows with the index);
  3. the spectrum product and its factorised inverse (forward), or DFT(g), the correlation
     spectra, two inverses and the gathers at h1, h2 (backward).

Dense path (D with no factor pair, e.g. primes). The sketch followed by the DFT is a fixed
linear map, X_k = sum_i s1(i) x_i w^{h1(i) k}, so one program of BLOCK_R rows contracts
its rows with twiddle tiles built on the fly in registers (the "sketch-DFT"), stores the
weighted products c_k X_k Y_k (c_k = 1/D for bins 0 and D/2, else 2/D: the Hermitian half
spectrum) in a per-row workspace and contracts it with the inverse twiddles; backward
likewise with G conj(Y), G conj(X) evaluated at the hashes. O(n D) per row.

Inputs are read as stored (fp32, bf16 or fp16); products accumulate in fp32. Under autocast
the inputs are cast to the autocast dtype first (custom ops have no autocast rule).

Broadcasting. x [..., n1] and y [..., n2] broadcast their leading axes like
``kernels.reference.cbp``. The launcher passes per-operand row offsets (computed from the
strides of the broadcast view, so a stride-0 axis is never materialised) and the kernels
read rows through them. The gradient of a broadcast operand is summed over the rows it was
broadcast to.

Custom ops. ``rwmn::cbp_rows`` and ``rwmn::cbp_rows_backward`` are
``torch.library.triton_op``s launched through ``wrap_triton`` with ``register_autograd``,
so ``torch.compile(fullgraph=True)`` traces them without a graph break.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels import reference
from kernels._common import LaunchConfig, launch

#: Largest output size that is fused. The dense sketch-DFT costs O(D) per input element
#: and the phase product h * k must stay below 2^31 in int32; larger D use the reference.
MAX_FUSED_DIM = 16384
#: Inputs the kernels read natively; float64 (and anything else) uses the reference.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Dense path tiles: rows per program, spectrum bins per tile, input (and output) elements
# per tile. 16 is the smallest tl.dot tile; at 32 x 32 the two twiddle tiles and the six
# fp32 accumulators of the backward stay in registers (64 x 64 spilled on sm_90a / sm_80).
DENSE_BLOCK_R = 16
DENSE_BLOCK_K = 32
DENSE_BLOCK_N = 32
#: Dense path warps, one pipeline stage: fp32 (ieee, both operands in registers) spilled
#: with 4 or 8 warps on sm_90a.
DENSE_WARPS = {"tf32": 4, "ieee": 16}

#: Sizes D at or above this that factor as D1 x D2 with both factors <= MAX_FACTOR take the
#: factorised path; smaller or unfactorable D (primes, 2 x a large prime) stay dense.
FACTORISED_MIN_DIM = 256
#: Largest factor of the factorised transform: a stage's tiles are pow2(D1) rows tall, in
#: registers (at 128, D = 16000, they already spill).
MAX_FACTOR = 128
#: tl.dot needs every operand dimension >= 16, so factors are padded to at least this.
MIN_DOT = 16
#: Factorised stages, by dot precision: rows of the stage-2 output chunk (the M of its
#: product) and width of the stage-1 chunks. Stage 1's M is pow2(D1) (64 at the story size:
#: a wgmma tile). Chosen with the compile gate (bench.compile_report): the largest tiles
#: with no spill on sm_90a and sm_80 in one pipeline stage; fp32 (ieee, CUDA-core FMA)
#: holds both operands in registers and needs the smaller ones.
FFT_TILES = {"tf32": (32, 16), "ieee": (16, 16)}
#: Width of the 1-D chunks (sketch bins, spectrum bins, gathered inputs).
BLOCK_S = 128
#: Warps of the factorised kernels: 8, or 16 with a small first factor (pow2(D1) <= 32,
#: e.g. the read size 300 = 15 x 20), where 8 warps spilled 8-44 B (fp32 on sm_80 with
#: triton 3.9, bf16 on sm_90a with triton 3.6).
FACTORISED_WARPS = 8
FACTORISED_WARPS_SMALL_D1 = 16
FACTORISED_STAGES = 1
#: Bytes of factorised-kernel scratch to aim for in one launch: one program's scratch is
#: reused for its rows, and all of it together should fit in L2 (50 MB on H100/H200,
#: 40 MB on A100) next to the inputs and outputs.
SCRATCH_BUDGET = 24 * 2**20


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _twiddle(a, b, tab_ptr, D: tl.constexpr):
    """cos and sin of 2 pi (a b mod D) / D for int32 vectors a [A] and b [B] -> [A, B].

    The phase index is reduced mod D in integers (exact for every fused D: a b < 2^31), then
    looked up in the launcher's table of correctly rounded cos/sin of 2 pi p / D. With D a
    constexpr the mod is a multiply-shift, and the lookup (an L1-resident gather of at most
    2 x 16384 fp32) replaces tens of instructions of accurate cosf/sinf per element.
    """
    ph = (a[:, None] * b[None, :]) % D
    return tl.load(tab_ptr + ph), tl.load(tab_ptr + D + ph)


@triton.jit
def _sketch_dft(
    src_ptr,
    row_off,
    rmask,
    h_ptr,
    s_ptr,
    N,
    ks,
    tab_ptr,
    D: tl.constexpr,
    IDENTITY: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Re and Im of sum_i s(i) v_i w^{h(i) k} for the rows at row_off and the bins ks.

    IDENTITY uses h(i) = i and s(i) = 1 (the plain DFT of the incoming gradient).
    """
    re = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    im = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nmask = ns < N
        v = tl.load(
            src_ptr + row_off[:, None] + ns[None, :],
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        ).to(tl.float32)
        if IDENTITY:
            h = ns
            s = nmask.to(tl.float32)
        else:
            h = tl.load(h_ptr + ns, mask=nmask, other=0).to(tl.int32)
            s = tl.load(s_ptr + ns, mask=nmask, other=0.0).to(tl.float32)
        cos, sin = _twiddle(h, ks, tab_ptr, D)
        re += tl.dot(v, cos * s[:, None], input_precision=PRECISION)
        im -= tl.dot(v, sin * s[:, None], input_precision=PRECISION)
    return re, im


@triton.jit
def _spectrum_weight(ks, K, D):
    # The dense inverse sums the Hermitian half spectrum: bins 0 and D/2 appear once in
    # the full sum, the rest twice.
    once = (ks == 0) | (2 * ks == D)
    return tl.where(ks < K, tl.where(once, 1.0, 2.0) / D, 0.0)


@triton.jit
def _inverse_tile(
    ws_row,
    rmask,
    a,
    tab_ptr,
    K: tl.constexpr,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_A: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """sum_k Re(W_k e^{+2 pi i a k / D}) for the weighted spectrum W stored at ws_row
    (re in [0, K), im in [K, 2K)) and the phase multipliers a [BLOCK_A]."""
    acc = tl.zeros((BLOCK_R, BLOCK_A), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (ks < K)[None, :]
        wr = tl.load(ws_row + ks[None, :], mask=m, other=0.0)
        wi = tl.load(ws_row + K + ks[None, :], mask=m, other=0.0)
        cos, sin = _twiddle(ks, a, tab_ptr, D)
        acc += tl.dot(wr, cos, input_precision=PRECISION)
        acc -= tl.dot(wi, sin, input_precision=PRECISION)
    return acc


@triton.jit
def _dft_factorised_row(
    src_re,
    src_im,
    dst_re,
    dst_im,
    tab_ptr,
    D: tl.constexpr,
    K: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    P1: tl.constexpr,
    BLOCK_F1: tl.constexpr,
    BLOCK_F2: tl.constexpr,
    INVERSE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One row's length-D DFT as two small dense DFTs and a twiddle (Cooley-Tukey, four
    steps), D = D1 D2, O(D (D1 + D2)) instead of O(D^2). With sign = +1 (INVERSE) or -1,
    input index a = a1 + D1 a2 and output index b = b2 + D2 b1 (a b = a1 b2 + D2 a1 b1 +
    D1 a2 b2 mod D):

        T[a1, b2]   = sum_{a2 < D2} v[a1 + D1 a2] e^{sign 2 pi i a2 b2 / D2}   (DFT over a2)
        U[a1, b2]   = T[a1, b2] e^{sign 2 pi i a1 b2 / D}                      (twiddle)
        out[b2 + D2 b1] = sum_{a1 < D1} e^{sign 2 pi i a1 b1 / D1} U[a1, b2]    (DFT over a1)

    INVERSE: v is the full spectrum rebuilt from the Hermitian half spectrum at src_re /
    src_im (K bins: v_k = conj(v_{D-k}) for k >= K); the real part of out goes to dst_re.
    Forward: v is the real row at src_re; out_b for b < K goes to dst_re / dst_im.
    Every stage is a tl.dot on a [pow2(D1), BLOCK] tile; every twiddle is a table lookup
    of an integer phase reduced mod D (exact), like the dense path. Padded indices (a1 >=
    D1, a2 >= D2) load zeros; padded outputs are masked at the store.
    """
    a1 = tl.arange(0, P1)
    a1_ok = a1 < D1
    for b0 in range(0, D2, BLOCK_F2):
        b2 = b0 + tl.arange(0, BLOCK_F2)
        tr = tl.zeros((P1, BLOCK_F2), dtype=tl.float32)
        ti = tl.zeros((P1, BLOCK_F2), dtype=tl.float32)
        for c0 in range(0, D2, BLOCK_F2):
            a2 = c0 + tl.arange(0, BLOCK_F2)
            idx = a1[:, None] + D1 * a2[None, :]
            m = a1_ok[:, None] & (a2 < D2)[None, :]
            # Each stage names its own twiddles: Triton rejects a loop-carried variable
            # whose shape changes, and the stages' tiles differ in shape.
            c2, s2 = _twiddle(D1 * a2, b2, tab_ptr, D)
            if not INVERSE:
                s2 = -s2
            if INVERSE:
                lower = idx < K
                half = tl.where(lower, idx, D - idx)
                vr = tl.load(src_re + half, mask=m, other=0.0)
                vi = tl.load(src_im + half, mask=m, other=0.0)
                vi = tl.where(lower, vi, -vi)
                tr += tl.dot(vr, c2, input_precision=PRECISION)
                tr -= tl.dot(vi, s2, input_precision=PRECISION)
                ti += tl.dot(vr, s2, input_precision=PRECISION)
                ti += tl.dot(vi, c2, input_precision=PRECISION)
            else:
                vr = tl.load(src_re + idx, mask=m, other=0.0).to(tl.float32)
                tr += tl.dot(vr, c2, input_precision=PRECISION)
                ti += tl.dot(vr, s2, input_precision=PRECISION)
        ct, st = _twiddle(a1, b2, tab_ptr, D)
        if not INVERSE:
            st = -st
        ur = tr * ct - ti * st
        ui = tr * st + ti * ct
        for e0 in range(0, D1, BLOCK_F1):
            b1 = e0 + tl.arange(0, BLOCK_F1)
            c1, s1 = _twiddle(D2 * b1, a1, tab_ptr, D)
            if not INVERSE:
                s1 = -s1
            out_re = tl.dot(c1, ur, input_precision=PRECISION)
            out_re -= tl.dot(s1, ui, input_precision=PRECISION)
            b = b2[None, :] + D2 * b1[:, None]
            m = (b1 < D1)[:, None] & (b2 < D2)[None, :]
            if INVERSE:
                tl.store(dst_re + b, out_re.to(dst_re.dtype.element_ty), mask=m)
            else:
                out_im = tl.dot(c1, ui, input_precision=PRECISION)
                out_im += tl.dot(s1, ur, input_precision=PRECISION)
                tl.store(dst_re + b, out_re, mask=m & (b < K))
                tl.store(dst_im + b, out_im, mask=m & (b < K))


@triton.jit
def _cbp_dense_fwd_kernel(
    x_ptr,
    y_ptr,
    xoff_ptr,
    yoff_ptr,
    h1_ptr,
    s1_ptr,
    h2_ptr,
    s2_ptr,
    tab_ptr,
    out_ptr,
    ws_ptr,
    R,
    N1,
    N2,
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Dense path (D without a factor pair): out[r, j] = sum_k c_k Re(X_k Y_k e^{2 pi i jk/D})
    for BLOCK_R rows r, X and Y by the dense sketch-DFT (module doc)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    xrow = tl.load(xoff_ptr + rows, mask=rmask, other=0)
    yrow = tl.load(yoff_ptr + rows, mask=rmask, other=0)
    # Row stride of the workspace: re and im of the K half-spectrum bins.
    ws_row = ws_ptr + rows[:, None].to(tl.int64) * (2 * K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xr, xi = _sketch_dft(
            x_ptr, xrow, rmask, h1_ptr, s1_ptr, N1, ks, tab_ptr, D,
            False, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION,
        )  # fmt: skip
        yr, yi = _sketch_dft(
            y_ptr, yrow, rmask, h2_ptr, s2_ptr, N2, ks, tab_ptr, D,
            False, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION,
        )  # fmt: skip
        c = _spectrum_weight(ks, K, D)[None, :]
        m = rmask[:, None] & (ks < K)[None, :]
        tl.store(ws_row + ks[None, :], (xr * yr - xi * yi) * c, mask=m)
        tl.store(ws_row + K + ks[None, :], (xr * yi + xi * yr) * c, mask=m)
    # Phase 2 reads workspace entries written by other threads of this program.
    tl.debug_barrier()
    out_row = out_ptr + rows[:, None].to(tl.int64) * D
    for j0 in range(0, D, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        acc = _inverse_tile(ws_row, rmask, js, tab_ptr, K, D, BLOCK_R, BLOCK_K, BLOCK_J, PRECISION)
        m = rmask[:, None] & (js < D)[None, :]
        tl.store(out_row + js[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _cbp_dense_bwd_kernel(
    g_ptr,
    x_ptr,
    y_ptr,
    xoff_ptr,
    yoff_ptr,
    h1_ptr,
    s1_ptr,
    h2_ptr,
    s2_ptr,
    tab_ptr,
    gx_ptr,
    gy_ptr,
    ws_ptr,
    R,
    N1,
    N2,
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Dense path: gx[r, i] = s1(i) sum_k c_k Re(G_k conj(Y_k) e^{2 pi i h1(i) k/D}) and
    symmetrically gy[r, i] with G conj(X), h2, s2, for BLOCK_R rows r of g [R, D]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    xrow = tl.load(xoff_ptr + rows, mask=rmask, other=0)
    yrow = tl.load(yoff_ptr + rows, mask=rmask, other=0)
    # Workspace row: [C re | C im | E re | E im], K bins each.
    ws_row = ws_ptr + rows64[:, None] * (4 * K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (ks < K)[None, :]
        gr, gi = _sketch_dft(
            g_ptr, rows64 * D, rmask, h1_ptr, s1_ptr, D, ks, tab_ptr, D,
            True, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION,
        )  # fmt: skip
        xr, xi = _sketch_dft(
            x_ptr, xrow, rmask, h1_ptr, s1_ptr, N1, ks, tab_ptr, D,
            False, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION,
        )  # fmt: skip
        yr, yi = _sketch_dft(
            y_ptr, yrow, rmask, h2_ptr, s2_ptr, N2, ks, tab_ptr, D,
            False, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION,
        )  # fmt: skip
        c = _spectrum_weight(ks, K, D)[None, :]
        tl.store(ws_row + ks[None, :], (gr * yr + gi * yi) * c, mask=m)
        tl.store(ws_row + K + ks[None, :], (gi * yr - gr * yi) * c, mask=m)
        tl.store(ws_row + 2 * K + ks[None, :], (gr * xr + gi * xi) * c, mask=m)
        tl.store(ws_row + 3 * K + ks[None, :], (gi * xr - gr * xi) * c, mask=m)
    # Phase 2 reads workspace entries written by other threads of this program.
    tl.debug_barrier()
    gx_row = gx_ptr + rows64[:, None] * N1
    for n0 in range(0, N1, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nmask = ns < N1
        h = tl.load(h1_ptr + ns, mask=nmask, other=0).to(tl.int32)
        s = tl.load(s1_ptr + ns, mask=nmask, other=0.0).to(tl.float32)
        acc = _inverse_tile(ws_row, rmask, h, tab_ptr, K, D, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION)
        m = rmask[:, None] & nmask[None, :]
        tl.store(gx_row + ns[None, :], (acc * s[None, :]).to(gx_ptr.dtype.element_ty), mask=m)
    gy_row = gy_ptr + rows64[:, None] * N2
    for n0 in range(0, N2, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nmask = ns < N2
        h = tl.load(h2_ptr + ns, mask=nmask, other=0).to(tl.int32)
        s = tl.load(s2_ptr + ns, mask=nmask, other=0.0).to(tl.float32)
        acc = _inverse_tile(
            ws_row + 2 * K, rmask, h, tab_ptr, K, D, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION
        )
        m = rmask[:, None] & nmask[None, :]
        tl.store(gy_row + ns[None, :], (acc * s[None, :]).to(gy_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sketch_row(
    src_ptr, order_ptr, start_ptr, sign_ptr, dst_ptr, D: tl.constexpr, BLOCK_S: tl.constexpr
):
    """dst[j] = sum_{i: h(i) = j} s(i) src[i] for j < D: the count sketch as a gather-sum
    over the inverse hash (input indices sorted by bin, bin j's at order[start[j]:
    start[j+1]], signs alongside). Deterministic: no atomics; each bin is summed by one
    thread in a fixed order, and the loop runs as long as the fullest bin of the chunk."""
    for j0 in range(0, D, BLOCK_S):
        js = j0 + tl.arange(0, BLOCK_S)
        jm = js < D
        lo = tl.load(start_ptr + js, mask=jm, other=0)
        count = tl.load(start_ptr + js + 1, mask=jm, other=0) - lo
        acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for t in range(0, tl.max(count, axis=0)):
            ok = t < count
            i = tl.load(order_ptr + lo + t, mask=ok, other=0)
            sign = tl.load(sign_ptr + lo + t, mask=ok, other=0.0)
            acc += sign * tl.load(src_ptr + i, mask=ok, other=0.0).to(tl.float32)
        tl.store(dst_ptr + js, acc, mask=jm)


@triton.jit
def _gather_row(src_ptr, h_ptr, s_ptr, dst_ptr, N, BLOCK_S: tl.constexpr):
    """dst[i] = s(i) src[h(i)] for i < N: the transposed count sketch."""
    for n0 in range(0, N, BLOCK_S):
        ns = n0 + tl.arange(0, BLOCK_S)
        nm = ns < N
        h = tl.load(h_ptr + ns, mask=nm, other=0)
        s = tl.load(s_ptr + ns, mask=nm, other=0.0).to(tl.float32)
        v = tl.load(src_ptr + h, mask=nm, other=0.0)
        tl.store(dst_ptr + ns, (s * v).to(dst_ptr.dtype.element_ty), mask=nm)


@triton.jit
def _sketch_spectra(
    x_row,
    y_row,
    order1_ptr,
    start1_ptr,
    sign1_ptr,
    order2_ptr,
    start2_ptr,
    sign2_ptr,
    tab_ptr,
    ws,
    D: tl.constexpr,
    K: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    P1: tl.constexpr,
    BLOCK_F1: tl.constexpr,
    BLOCK_F2: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One row's sketches p = psi1(x), q = psi2(y) into ws[0:D], ws[D:2D] and their half
    spectra P, Q (re, im; K bins each) into ws[2D:2D+2K], ws[2D+2K:2D+4K]. Ends with a CTA
    barrier: the spectra are read by other threads of the program next."""
    _sketch_row(x_row, order1_ptr, start1_ptr, sign1_ptr, ws, D, BLOCK_S)
    _sketch_row(y_row, order2_ptr, start2_ptr, sign2_ptr, ws + D, D, BLOCK_S)
    # The transforms read sketch entries written by other threads of this program.
    tl.debug_barrier()
    _dft_factorised_row(ws, ws, ws + 2 * D, ws + 2 * D + K, tab_ptr,
                        D, K, D1, D2, P1, BLOCK_F1, BLOCK_F2, False, PRECISION)  # fmt: skip
    _dft_factorised_row(ws + D, ws + D, ws + 2 * D + 2 * K, ws + 2 * D + 3 * K, tab_ptr,
                        D, K, D1, D2, P1, BLOCK_F1, BLOCK_F2, False, PRECISION)  # fmt: skip
    tl.debug_barrier()


@triton.jit
def _cbp_fwd_kernel(
    x_ptr,
    y_ptr,
    xoff_ptr,
    yoff_ptr,
    order1_ptr,
    start1_ptr,
    sign1_ptr,
    order2_ptr,
    start2_ptr,
    sign2_ptr,
    tab_ptr,
    out_ptr,
    ws_ptr,
    R,
    ROWS_PER_PROGRAM,
    D: tl.constexpr,
    K: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    P1: tl.constexpr,
    BLOCK_F1: tl.constexpr,
    BLOCK_F2: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out = IDFT(DFT(psi1(x)) DFT(psi2(y))) row by row (module doc, factorised path).

    Per row: the two count sketches by gather-sum into the program's scratch, their
    factorised forward DFTs (half spectra), the product scaled by 1/D, its factorised
    inverse written to out. Scratch per program: [p | q] (D each), [P | Q] (2 K each);
    it is reused for every row the program owns, so it stays in L2."""
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * (2 * D + 4 * K)
    # Layout as _sketch_spectra writes it: [p | q] (D each), [P | Q] (2 K each).
    ws_pr, ws_pi = ws + 2 * D, ws + 2 * D + K
    ws_qr, ws_qi = ws + 2 * D + 2 * K, ws + 2 * D + 3 * K
    row0 = pid * ROWS_PER_PROGRAM
    for r in range(row0, tl.minimum(row0 + ROWS_PER_PROGRAM, R)):
        _sketch_spectra(
            x_ptr + tl.load(xoff_ptr + r), y_ptr + tl.load(yoff_ptr + r),
            order1_ptr, start1_ptr, sign1_ptr, order2_ptr, start2_ptr, sign2_ptr, tab_ptr, ws,
            D, K, D1, D2, P1, BLOCK_F1, BLOCK_F2, BLOCK_S, PRECISION,
        )  # fmt: skip
        for k0 in range(0, K, BLOCK_S):
            ks = k0 + tl.arange(0, BLOCK_S)
            km = ks < K
            pr = tl.load(ws_pr + ks, mask=km, other=0.0)
            pi = tl.load(ws_pi + ks, mask=km, other=0.0)
            qr = tl.load(ws_qr + ks, mask=km, other=0.0)
            qi = tl.load(ws_qi + ks, mask=km, other=0.0)
            tl.store(ws_pr + ks, (pr * qr - pi * qi) / D, mask=km)
            tl.store(ws_pi + ks, (pr * qi + pi * qr) / D, mask=km)
        tl.debug_barrier()
        _dft_factorised_row(ws_pr, ws_pi, out_ptr + tl.cast(r, tl.int64) * D, out_ptr, tab_ptr,
                            D, K, D1, D2, P1, BLOCK_F1, BLOCK_F2, True, PRECISION)  # fmt: skip
        # The next row overwrites scratch that this row's inverse may still be reading.
        tl.debug_barrier()


@triton.jit
def _cbp_bwd_kernel(
    g_ptr,
    x_ptr,
    y_ptr,
    xoff_ptr,
    yoff_ptr,
    h1_ptr,
    s1_ptr,
    h2_ptr,
    s2_ptr,
    order1_ptr,
    start1_ptr,
    sign1_ptr,
    order2_ptr,
    start2_ptr,
    sign2_ptr,
    tab_ptr,
    gx_ptr,
    gy_ptr,
    ws_ptr,
    R,
    N1,
    N2,
    ROWS_PER_PROGRAM,
    D: tl.constexpr,
    K: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    P1: tl.constexpr,
    BLOCK_F1: tl.constexpr,
    BLOCK_F2: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """gx = s1 * IDFT(G conj(Q) / D)[h1], gy = s2 * IDFT(G conj(P) / D)[h2] row by row, with
    G = DFT(g), P = DFT(psi1(x)), Q = DFT(psi2(y)) (module doc, factorised path).

    Scratch per program: [p | q] (D each; they become dL/dp, dL/dq), [P | Q | G] (2 K each;
    P and Q become the correlation spectra C = G conj(Q) / D and E = G conj(P) / D)."""
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * (2 * D + 6 * K)
    ws_p, ws_q = ws, ws + D
    ws_pr, ws_pi = ws + 2 * D, ws + 2 * D + K
    ws_qr, ws_qi = ws + 2 * D + 2 * K, ws + 2 * D + 3 * K
    ws_gr, ws_gi = ws + 2 * D + 4 * K, ws + 2 * D + 5 * K
    row0 = pid * ROWS_PER_PROGRAM
    for r in range(row0, tl.minimum(row0 + ROWS_PER_PROGRAM, R)):
        r64 = tl.cast(r, tl.int64)
        _dft_factorised_row(g_ptr + r64 * D, g_ptr, ws_gr, ws_gi, tab_ptr,
                            D, K, D1, D2, P1, BLOCK_F1, BLOCK_F2, False, PRECISION)  # fmt: skip
        _sketch_spectra(
            x_ptr + tl.load(xoff_ptr + r), y_ptr + tl.load(yoff_ptr + r),
            order1_ptr, start1_ptr, sign1_ptr, order2_ptr, start2_ptr, sign2_ptr, tab_ptr,
            ws_p, D, K, D1, D2, P1, BLOCK_F1, BLOCK_F2, BLOCK_S, PRECISION,
        )  # fmt: skip
        for k0 in range(0, K, BLOCK_S):
            ks = k0 + tl.arange(0, BLOCK_S)
            km = ks < K
            gr = tl.load(ws_gr + ks, mask=km, other=0.0)
            gi = tl.load(ws_gi + ks, mask=km, other=0.0)
            pr = tl.load(ws_pr + ks, mask=km, other=0.0)
            pi = tl.load(ws_pi + ks, mask=km, other=0.0)
            qr = tl.load(ws_qr + ks, mask=km, other=0.0)
            qi = tl.load(ws_qi + ks, mask=km, other=0.0)
            tl.store(ws_pr + ks, (gr * qr + gi * qi) / D, mask=km)
            tl.store(ws_pi + ks, (gi * qr - gr * qi) / D, mask=km)
            tl.store(ws_qr + ks, (gr * pr + gi * pi) / D, mask=km)
            tl.store(ws_qi + ks, (gi * pr - gr * pi) / D, mask=km)
        tl.debug_barrier()
        _dft_factorised_row(ws_pr, ws_pi, ws_p, ws_p, tab_ptr,
                            D, K, D1, D2, P1, BLOCK_F1, BLOCK_F2, True, PRECISION)  # fmt: skip
        _dft_factorised_row(ws_qr, ws_qi, ws_q, ws_q, tab_ptr,
                            D, K, D1, D2, P1, BLOCK_F1, BLOCK_F2, True, PRECISION)  # fmt: skip
        tl.debug_barrier()
        _gather_row(ws_p, h1_ptr, s1_ptr, gx_ptr + r64 * N1, N1, BLOCK_S)
        _gather_row(ws_q, h2_ptr, s2_ptr, gy_ptr + r64 * N2, N2, BLOCK_S)
        # The next row overwrites scratch that this row's gathers may still be reading.
        tl.debug_barrier()


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def half_spectrum(out_dim: int) -> int:
    """Number of independent bins of the DFT of a real sequence of length out_dim."""
    return out_dim // 2 + 1


def factorisation(out_dim: int, min_dim: int = FACTORISED_MIN_DIM) -> tuple[int, int] | None:
    """(D1, D2) with D1 D2 = out_dim for the factorised transform, or None for the dense one.

    None when out_dim < min_dim or out_dim has no factor pair with 2 <= D1, D2 <= MAX_FACTOR
    (a prime, 2 x a prime > 128, ...). Among the pairs it picks the cheapest after padding
    each factor to P = max(16, pow2(factor)) (the factorised stages cost about
    P1 P2 (P1 + P2) multiply-adds), then the most balanced: 4096 -> 64 x 64,
    16000 -> 125 x 128, 600 -> 24 x 25, 300 -> 15 x 20.
    """
    if out_dim < max(min_dim, 4):
        return None
    best = None
    for d1 in range(2, min(MAX_FACTOR, out_dim // 2) + 1):
        d2, rem = divmod(out_dim, d1)
        if rem or d2 > MAX_FACTOR or d2 < 2:
            continue
        p1, p2 = _padded(d1), _padded(d2)
        key = (p1 * p2 * (p1 + p2), abs(d1 - d2), d1)
        if best is None or key < best[0]:
            best = (key, (d1, d2))
    return None if best is None else best[1]


def _padded(factor: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(factor))


def scratch_floats(out_dim: int, backward: bool) -> int:
    """fp32 scratch of one program of the factorised kernels: the sketches [p | q] and the
    half spectra [P | Q] forward, plus G backward."""
    k = half_spectrum(out_dim)
    return 2 * out_dim + (6 * k if backward else 4 * k)


def rows_per_program(rows: int, out_dim: int, backward: bool) -> int:
    """Rows one program of the factorised kernels owns: one each while the scratch of one
    program per row fits SCRATCH_BUDGET (so it stays in L2), else enough to fit it."""
    programs = max(1, min(rows, SCRATCH_BUDGET // (4 * scratch_floats(out_dim, backward))))
    return triton.cdiv(max(rows, 1), programs)


def workspace_numel(
    rows: int, out_dim: int, backward: bool, factors: tuple[int, int] | None
) -> int:
    """fp32 workspace values a launch needs. Dense path: the half spectra per row (2 or 4
    x (D//2+1)). Factorised path: one scratch per program (scratch_floats)."""
    if factors is None:
        return rows * (4 if backward else 2) * half_spectrum(out_dim)
    programs = triton.cdiv(max(rows, 1), rows_per_program(rows, out_dim, backward))
    return programs * scratch_floats(out_dim, backward)


def cbp_config(
    rows: int, out_dim: int, factors: tuple[int, int] | None, precision: str, backward: bool
) -> LaunchConfig:
    """Launch configuration of the CBP kernels.

    Dense path: one program per DENSE_BLOCK_R rows, tiles small enough to stay in registers.
    Factorised path: one program per rows_per_program rows; the stage tiles are pow2(D1) x
    FFT_BLOCK2 (stage 1) and FFT_BLOCK1 x pow2(D1) (stage 2), so at the story size (64 x 64)
    both stage products have M = 64, the wgmma tile of one warpgroup."""
    k = half_spectrum(out_dim)
    if factors is None:
        constexprs = dict(D=out_dim, K=k, BLOCK_R=DENSE_BLOCK_R, BLOCK_K=DENSE_BLOCK_K,
                          BLOCK_N=DENSE_BLOCK_N, PRECISION=precision)  # fmt: skip
        if not backward:
            constexprs["BLOCK_J"] = DENSE_BLOCK_N
        return LaunchConfig(
            grid=(triton.cdiv(rows, DENSE_BLOCK_R),),
            constexprs=constexprs,
            num_warps=DENSE_WARPS[precision],
            num_stages=1,
        )
    d1, d2 = factors
    p1, p2 = _padded(d1), _padded(d2)
    block_f1, block_f2 = FFT_TILES[precision]
    per_program = rows_per_program(rows, out_dim, backward)
    return LaunchConfig(
        grid=(triton.cdiv(max(rows, 1), per_program),),
        constexprs=dict(
            D=out_dim,
            K=k,
            D1=d1,
            D2=d2,
            P1=p1,
            BLOCK_F1=min(block_f1, p1),
            BLOCK_F2=min(block_f2, p2),
            BLOCK_S=BLOCK_S,
            PRECISION=precision,
        ),  # fmt: skip
        num_warps=FACTORISED_WARPS_SMALL_D1 if p1 <= 32 else FACTORISED_WARPS,
        num_stages=FACTORISED_STAGES,
    )


def executed_macs(
    rows: int,
    n1: int,
    n2: int,
    out_dim: int,
    factors: tuple[int, int] | None,
    precision: str,
    backward: bool,
) -> int:
    """Multiply-adds the kernels' products execute for ``rows`` rows, tile padding included
    (tensor cores for half inputs, CUDA-core FMA for fp32), from the same configuration the
    launch uses: the "executed" column of bench.cases beside the algorithmic FLOPs.

    Factorised path, per row: a forward DFT of a real row costs 2 S1 + 4 S2 and an inverse
    4 S1 + 2 S2, with S1 = cdiv(D2, F2)^2 P1 F2^2 (stage 1) and S2 = cdiv(D2, F2) cdiv(D1,
    F1) F1 P1 F2 (stage 2); the forward pass runs 2 DFTs and 1 inverse, the backward 3 and
    2. The gathers (sketch, transposed sketch) and the spectrum products are not products.
    Dense path, per row: the sketch-DFT of every input (2 products per (bin chunk, input
    chunk)) and the inverse (2 per (output chunk, bin chunk)).
    """
    c = cbp_config(rows, out_dim, factors, precision, backward).constexprs
    if factors is None:
        bk, bn = c["BLOCK_K"], c["BLOCK_N"]
        kc = triton.cdiv(c["K"], bk)
        chunks = triton.cdiv(n1, bn) + triton.cdiv(n2, bn)
        if backward:
            per_row = 2 * bk * bn * kc * (triton.cdiv(out_dim, bn) + 2 * chunks)
        else:
            per_row = 2 * bk * bn * kc * (chunks + triton.cdiv(out_dim, c["BLOCK_J"]))
        return rows * per_row
    f1, f2, p1 = c["BLOCK_F1"], c["BLOCK_F2"], c["P1"]
    d1, d2 = factors
    s1 = triton.cdiv(d2, f2) ** 2 * p1 * f2 * f2
    s2 = triton.cdiv(d2, f2) * triton.cdiv(d1, f1) * f1 * p1 * f2
    forward_dft, inverse = 2 * s1 + 4 * s2, 4 * s1 + 2 * s2
    per_row = 3 * forward_dft + 2 * inverse if backward else 2 * forward_dft + inverse
    return rows * per_row


def _check_factors(factors: tuple[int, int] | None, out_dim: int) -> None:
    if factors is None:
        return
    d1, d2 = factors
    if d1 * d2 != out_dim or not (1 <= d1 <= MAX_FACTOR and 1 <= d2 <= MAX_FACTOR):
        raise ValueError(
            f"cbp: factors {factors} must multiply to D = {out_dim}, each in [1, {MAX_FACTOR}]"
        )


def _precision(*tensors: torch.Tensor) -> str:
    # fp32 inputs multiply in exact fp32 on CUDA cores ("ieee"): 3-pass tf32 ("tf32x3"),
    # the tensor-core alternative, spilled registers at every tile size the compile gate
    # tried on sm_90a and sm_80. Half inputs carry 8-11 mantissa bits, which one tf32 pass
    # (tensor cores, fp32 accumulation) already exceeds.
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) else "tf32"


def _check_rows(name: str, t: torch.Tensor, offsets: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"cbp: {name} of shape {tuple(t.shape)} must have a unit last stride")
    if offsets.dtype != torch.int64 or not offsets.is_contiguous():
        raise ValueError(f"cbp: {name} row offsets must be contiguous int64")


def twiddle_table(out_dim: int, device: torch.device | str) -> torch.Tensor:
    """[cos(2 pi p / D) for p < D, sin(2 pi p / D) for p < D] as fp32 [2 * D], computed in
    float64 so every entry is correctly rounded."""
    angle = torch.arange(out_dim, dtype=torch.float64, device=device) * (2 * math.pi / out_dim)
    return torch.cat((torch.cos(angle), torch.sin(angle))).to(torch.float32)


@functools.cache
def _cached_twiddle_table(out_dim: int, device: torch.device) -> torch.Tensor:
    return twiddle_table(out_dim, device)


def _check_twiddles(twiddles: torch.Tensor, out_dim: int) -> None:
    if twiddles.shape != (2 * out_dim,) or twiddles.dtype != torch.float32:
        raise ValueError(
            f"cbp: twiddle table of shape {tuple(twiddles.shape)} and dtype {twiddles.dtype} "
            f"must be fp32 [{2 * out_dim}] (see twiddle_table)"
        )


def inverse_hash(
    h: torch.Tensor, s: torch.Tensor, out_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The count sketch's inverse in CSR form: (order [n] int32, the input indices sorted by
    bin; start [D + 1] int32, bin j's at order[start[j]:start[j+1]]; sign [n] fp32, s at
    order). A few small device ops with static shapes, no host sync."""
    sorted_h, order = torch.sort(h, stable=True)
    # start[j] = #{i: h(i) < j}; searchsorted keeps every shape static (bincount's output
    # size depends on the values, which torch.compile cannot trace).
    bins = torch.arange(out_dim + 1, device=h.device, dtype=sorted_h.dtype)
    start = torch.searchsorted(sorted_h, bins).to(torch.int32)
    return order.to(torch.int32), start, s[order].to(torch.float32)


def _check_workspace(workspace: torch.Tensor, rows: int, out_dim: int, backward: bool, factors):
    need = workspace_numel(rows, out_dim, backward, factors)
    if workspace.dtype != torch.float32 or workspace.numel() < need:
        raise ValueError(
            f"cbp: workspace of shape {tuple(workspace.shape)} and dtype {workspace.dtype} is "
            f"too small: fp32 with at least {need} values (workspace_numel)"
        )


def cbp_forward_launch(
    x, y, xoff, yoff, h1, s1, h2, s2, twiddles, out, workspace, factors=None
) -> None:
    """Launch the forward kernel: out [R, D] (contiguous) from the rows of x and y at the
    element offsets xoff, yoff [R]; twiddles = twiddle_table(D); workspace fp32 with at
    least workspace_numel(R, D, False, factors) values. factors = (D1, D2) with D1 D2 = D
    selects the factorised path (see factorisation); None the dense one."""
    rows, out_dim = out.shape
    _check_twiddles(twiddles, out_dim)
    _check_factors(factors, out_dim)
    _check_rows("x", x, xoff)
    _check_rows("y", y, yoff)
    if not out.is_contiguous() or xoff.numel() != rows or yoff.numel() != rows:
        raise ValueError(f"cbp: output of shape {tuple(out.shape)} must be contiguous [R, D]")
    _check_workspace(workspace, rows, out_dim, False, factors)
    config = cbp_config(rows, out_dim, factors, _precision(x, y), backward=False)
    if factors is None:
        launch(
            _cbp_dense_fwd_kernel, config,
            x, y, xoff, yoff, h1, s1, h2, s2, twiddles, out, workspace,
            rows, x.shape[-1], y.shape[-1],
        )  # fmt: skip
        return
    launch(
        _cbp_fwd_kernel, config,
        x, y, xoff, yoff, *inverse_hash(h1, s1, out_dim), *inverse_hash(h2, s2, out_dim),
        twiddles, out, workspace, rows, rows_per_program(rows, out_dim, False),
    )  # fmt: skip


def cbp_backward_launch(
    grad, x, y, xoff, yoff, h1, s1, h2, s2, twiddles, gx, gy, workspace, factors=None
) -> None:
    """Launch the backward kernel: gx [R, n1] and gy [R, n2] (contiguous, per broadcast row)
    from grad [R, D] (contiguous); twiddles = twiddle_table(D); workspace fp32 with at least
    workspace_numel(R, D, True, factors) values; factors as for cbp_forward_launch."""
    rows, out_dim = grad.shape
    _check_twiddles(twiddles, out_dim)
    _check_factors(factors, out_dim)
    _check_rows("x", x, xoff)
    _check_rows("y", y, yoff)
    if not grad.is_contiguous():
        raise ValueError(f"cbp: gradient of shape {tuple(grad.shape)} must be contiguous")
    if tuple(gx.shape) != (rows, x.shape[-1]) or tuple(gy.shape) != (rows, y.shape[-1]):
        raise ValueError(
            f"cbp: gradients of shapes {tuple(gx.shape)}, {tuple(gy.shape)} must be "
            f"[{rows}, {x.shape[-1]}] and [{rows}, {y.shape[-1]}]"
        )
    if not (gx.is_contiguous() and gy.is_contiguous()):
        raise ValueError("cbp: gradient outputs must be contiguous")
    _check_workspace(workspace, rows, out_dim, True, factors)
    config = cbp_config(rows, out_dim, factors, _precision(grad, x, y), backward=True)
    if factors is None:
        launch(
            _cbp_dense_bwd_kernel, config,
            grad, x, y, xoff, yoff, h1, s1, h2, s2, twiddles, gx, gy, workspace,
            rows, x.shape[-1], y.shape[-1],
        )  # fmt: skip
        return
    launch(
        _cbp_bwd_kernel, config,
        grad, x, y, xoff, yoff, h1, s1, h2, s2,
        *inverse_hash(h1, s1, out_dim), *inverse_hash(h2, s2, out_dim),
        twiddles, gx, gy, workspace, rows, x.shape[-1], y.shape[-1],
        rows_per_program(rows, out_dim, True),
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------


def _factors_of(d1: int, out_dim: int) -> tuple[int, int] | None:
    return None if d1 == 0 else (d1, out_dim // d1)


@triton_op("rwmn::cbp_rows", mutates_args=())
def cbp_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    xoff: torch.Tensor,
    yoff: torch.Tensor,
    h1: torch.Tensor,
    s1: torch.Tensor,
    h2: torch.Tensor,
    s2: torch.Tensor,
    twiddles: torch.Tensor,
    d1: int = 0,
) -> torch.Tensor:
    """CBP of the broadcast rows: xoff, yoff of the broadcast leading shape L hold each
    row's element offset into x and y; twiddles = twiddle_table(D) sets the output size D.
    d1 > 0 selects the factorised transform with D = d1 x (D / d1); 0 the dense one.
    Returns [*L, D] in promote(x, y)."""
    rows, out_dim = xoff.numel(), twiddles.numel() // 2
    factors = _factors_of(d1, out_dim)
    out = x.new_empty((rows, out_dim), dtype=torch.promote_types(x.dtype, y.dtype))
    workspace = x.new_empty(workspace_numel(rows, out_dim, False, factors), dtype=torch.float32)
    cbp_forward_launch(
        x, y, xoff.reshape(-1), yoff.reshape(-1), h1, s1, h2, s2, twiddles, out, workspace,
        factors,
    )  # fmt: skip
    return out.view(*xoff.shape, out_dim)


@triton_op("rwmn::cbp_rows_backward", mutates_args=())
def cbp_rows_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    xoff: torch.Tensor,
    yoff: torch.Tensor,
    h1: torch.Tensor,
    s1: torch.Tensor,
    h2: torch.Tensor,
    s2: torch.Tensor,
    twiddles: torch.Tensor,
    d1: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of cbp_rows in x and y, summed over the rows each was broadcast to."""
    factors = _factors_of(d1, twiddles.numel() // 2)
    lead, rows, out_dim = xoff.shape, xoff.numel(), grad.shape[-1]
    n1, n2 = x.shape[-1], y.shape[-1]
    # A broadcast operand's per-row gradient is summed below, so keep it in fp32 until then.
    x_bcast, y_bcast = x.numel() != rows * n1, y.numel() != rows * n2
    gx = x.new_empty((rows, n1), dtype=torch.float32 if x_bcast else x.dtype)
    gy = y.new_empty((rows, n2), dtype=torch.float32 if y_bcast else y.dtype)
    workspace = x.new_empty(workspace_numel(rows, out_dim, True, factors), dtype=torch.float32)
    grad = grad.reshape(rows, out_dim).contiguous()
    cbp_backward_launch(
        grad,
        x,
        y,
        xoff.reshape(-1),
        yoff.reshape(-1),
        h1,
        s1,
        h2,
        s2,
        twiddles,
        gx,
        gy,
        workspace,
        factors,
    )
    gx = gx.view(*lead, n1).sum_to_size(x.shape).to(x.dtype)
    gy = gy.view(*lead, n2).sum_to_size(y.shape).to(y.dtype)
    return gx, gy


# Explicit fake (meta) kernels. triton_op would trace the bodies above instead, but under
# TRITON_INTERPRET=1 wrap_triton hands back the interpreted kernel, which cannot run on
# fake tensors; these keep shape propagation identical on every platform.
@cbp_rows.register_fake
def _cbp_rows_fake(x, y, xoff, yoff, h1, s1, h2, s2, twiddles, d1=0):
    return x.new_empty(
        (*xoff.shape, twiddles.shape[0] // 2), dtype=torch.promote_types(x.dtype, y.dtype)
    )


@cbp_rows_backward.register_fake
def _cbp_rows_backward_fake(grad, x, y, xoff, yoff, h1, s1, h2, s2, twiddles, d1=0):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        y, memory_format=torch.contiguous_format
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:-1])
    ctx.d1 = inputs[-1]


def _backward(ctx, grad):
    gx, gy = torch.ops.rwmn.cbp_rows_backward(grad, *ctx.saved_tensors, ctx.d1)
    return gx, gy, None, None, None, None, None, None, None, None


cbp_rows.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Public entry point (rwmn.ops.cbp under the "triton" backend)
# --------------------------------------------------------------------------------------


@functools.cache
def _warn_fallback(reason: str) -> None:
    # functools.cache makes this fire once per distinct reason in the process.
    warnings.warn(f"kernels.cbp: {reason}; using kernels.reference.cbp", stacklevel=3)


def row_offsets(t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """Element offset of every row of t broadcast to the leading shape lead, as int64 [*lead].

    Built from the strides of the broadcast view (0 on broadcast axes), never from a copy.
    """
    view = t.expand(*lead, t.shape[-1])
    offsets = torch.zeros(lead, dtype=torch.int64, device=t.device)
    for axis, (size, stride) in enumerate(zip(lead, view.stride()[:-1], strict=True)):
        if size > 1 and stride != 0:
            shape = [1] * len(lead)
            shape[axis] = size
            step = torch.arange(size, dtype=torch.int64, device=t.device) * stride
            offsets = offsets + step.view(shape)
    return offsets


def _check_hash(name: str, h: torch.Tensor, s: torch.Tensor, n: int, out_dim: int) -> None:
    if h.shape != (n,) or s.shape != (n,):
        raise ValueError(
            f"cbp: hash {name} of shape {tuple(h.shape)} and signs of shape {tuple(s.shape)} "
            f"must both be [{n}] to match the input's last axis"
        )
    if h.dtype not in (torch.int32, torch.int64) or not s.is_floating_point():
        raise ValueError(f"cbp: hash {name} must be integer and its signs floating point")
    if not (h.is_contiguous() and s.is_contiguous()):
        raise ValueError(f"cbp: hash {name} and its signs must be contiguous")
    if torch.compiler.is_compiling() or not n:
        return
    message = f"cbp: hash {name} has values outside [0, {out_dim})"
    if h.is_cuda:
        # A device-side assert: reading h.min()/h.max() back would synchronise the GPU on
        # every call. Stream order runs the assert before the CBP kernel that would read it,
        # and a failed device assert stops the CUDA context (untested here: no GPU).
        torch._assert_async(((h >= 0) & (h < out_dim)).all(), message)
    elif int(h.min()) < 0 or int(h.max()) >= out_dim:
        raise ValueError(message)


def _fallback_reason(x: torch.Tensor, y: torch.Tensor, out_dim: int) -> str | None:
    if out_dim > MAX_FUSED_DIM:
        return (
            f"out_dim={out_dim} exceeds the fused limit {MAX_FUSED_DIM} (the dense "
            "sketch-DFT grows as D^2 and the int32 phase index h*k must not overflow)"
        )
    for name, t in (("x", x), ("y", y)):
        if t.dtype not in FUSED_DTYPES:
            return f"{name} of dtype {t.dtype} is not fused (only fp32, bf16 and fp16 are)"
    return None


def cbp(
    x: torch.Tensor,
    y: torch.Tensor,
    h1: torch.Tensor,
    s1: torch.Tensor,
    h2: torch.Tensor,
    s2: torch.Tensor,
    out_dim: int,
    sum_pool: bool = False,
    *,
    factorised_min_dim: int = FACTORISED_MIN_DIM,
) -> torch.Tensor:
    """Fused compact bilinear pooling, same contract as :func:`kernels.reference.cbp`.

    factorised_min_dim: smallest D that takes the factorised transform when D factors
    (see factorisation); tests lower it to run the factorised path at tiny D."""
    if x.dim() < 1 or y.dim() < 1:
        raise ValueError(
            f"cbp: inputs of shapes {tuple(x.shape)}, {tuple(y.shape)} need a last axis"
        )
    if out_dim < 1:
        raise ValueError(f"cbp: out_dim must be positive, got {out_dim}")
    reason = _fallback_reason(x, y, out_dim)
    if reason is not None:
        _warn_fallback(reason)
        return reference.cbp(x, y, h1, s1, h2, s2, out_dim, sum_pool)
    if torch.is_autocast_enabled(x.device.type):
        # Custom ops have no autocast rule: run in the autocast dtype like the other fused
        # ops (the video story CBP gets unit-normalised fp32 inputs under bf16 autocast).
        dtype = torch.get_autocast_dtype(x.device.type)
        x, y = x.to(dtype), y.to(dtype)
    _check_hash("h1", h1, s1, x.shape[-1], out_dim)
    _check_hash("h2", h2, s2, y.shape[-1], out_dim)
    lead = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    if y.stride(-1) != 1:
        y = y.contiguous()
    if torch.compiler.is_compiling():
        twiddles = twiddle_table(out_dim, x.device)  # traced into the graph
    else:
        twiddles = _cached_twiddle_table(out_dim, x.device)
    factors = factorisation(out_dim, factorised_min_dim)
    d1 = 0 if factors is None else factors[0]
    out = torch.ops.rwmn.cbp_rows(
        x, y, row_offsets(x, lead), row_offsets(y, lead), h1, s1, h2, s2, twiddles, d1
    )
    if sum_pool and out.dim() > 2:
        out = out.sum(dim=tuple(range(1, out.dim() - 1)))
    return out


__all__ = [
    "FACTORISED_MIN_DIM",
    "MAX_FUSED_DIM",
    "cbp",
    "cbp_backward_launch",
    "cbp_forward_launch",
    "cbp_rows",
    "cbp_rows_backward",
    "executed_macs",
    "factorisation",
    "half_spectrum",
    "row_offsets",
    "inverse_hash",
    "twiddle_table",
    "workspace_numel",
]
