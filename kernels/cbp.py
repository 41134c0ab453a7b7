"""Fused compact bilinear pooling (docs/model.md) by mixed-radix FFTs on tensor-core tiles.

Math. With the count sketches p = psi1(x) (p_j = sum_{i: h1(i) = j} s1(i) x_i) and
q = psi2(y), CBP(x, y) = p (*) q, the circular convolution mod D:

    out = IDFT(P Q),                 P = DFT(p), Q = DFT(q)   (length D, no padding).

Backward, with g = dL/dout and G = DFT(g): dL/dp = IDFT(G conj(Q)) / D and dL/dq =
IDFT(G conj(P)) / D (circular correlations), then the transposed sketch dL/dx_i = s1(i)
(dL/dp)[h1(i)], dL/dy_i = s2(i) (dL/dq)[h2(i)].

FFT path (every D whose radix plan, fft_plan, has at most MAX_STAGES radices <= MAX_RADIX:
the model's 300 = 10 x 30 and 4096 = 16 x 16 x 16). With a gradient to come, or broadcast
operands, three kernels:
  1. _cbp_spectra_kernel, launched for x and for y, once per *distinct* input row (a
     broadcast operand, such as the read network's memory, is transformed once, not once
     per output row): the sketches by a deterministic gather-sum over the inverse hash
     (inverse_hash, CSR), O(n + D), no atomics; then the half spectra P [Rx, K], Q [Ry, K]
     (K = D // 2 + 1, fp32), saved for the backward. Two real rows travel as one complex
     sequence z = p_a + i p_b, so one complex FFT yields both spectra (P_a = (Z_k + conj
     Z_{D-k}) / 2, P_b = (Z_k - conj Z_{D-k}) / 2i).
  2. _cbp_product_kernel, per pair of output rows a, b: Z = P_a Q_a / D + i P_b Q_b / D
     rebuilt on all D bins from the half spectra, one inverse FFT, out_a = Re, out_b = Im.
  3. _cbp_bwd_kernel, per pair of output rows: G_a, G_b from one FFT of g_a + i g_b; then for
     each row C = G conj(Q) / D and E = G conj(P) / D, one inverse FFT of C + i E gives the
     two correlations (Re, Im), and the gathers at h1, h2 write the input gradients.

Without a gradient and without broadcasting (the story embedding, whose inputs are data)
one kernel, _cbp_fwd_kernel, does it all per pair of rows: one complex FFT of p_r + i q_r
per row gives P_r and Q_r, and two rows' products travel as one inverse; the spectra stay
in the program's scratch instead of a round trip through device memory.

Each FFT is a self-sorting (Stockham) decimation-in-time transform of mixed radices R_1 ...
R_s (D = prod R_i): stage i, with NS = R_1 ... R_{i-1}, takes for each j < D / R the R inputs
v_t = z[j + t D / R], multiplies them by the twiddles w^{t (j mod NS) D / (NS R)}, applies
the R-point DFT as one [BLOCK_J, R] x [R, R] complex product on tensor cores (three real
products, Gauss's trick: Re = VrWr - ViWi, Im = (Vr + Vi)(Wr + Wi) - VrWr - ViWi), and
stores output u at (j div NS) NS R + (j mod NS) + u NS. Every twiddle and DFT-matrix entry is
an exact integer phase mod D looked up in a table of correctly rounded cos/sin. The work of
a complex transform is D (R_1 + ... + R_s) complex multiply-adds (3 real products each), so
a row costs O(n1 + n2 + D sum R_i) instead of the O(n D) of a dense sketch-DFT.

Dense path (D < FACTORISED_MIN_DIM, or a D with a prime factor > MAX_RADIX such as a large
prime). The sketch followed by the DFT is a fixed linear map, X_k = sum_i s1(i) x_i w^{h1(i)
k}, so one program of BLOCK_R rows contracts its rows with twiddle tiles built on the fly in
registers (the "sketch-DFT"), stores the weighted products c_k X_k Y_k (c_k = 1/D for bins 0
and D/2, else 2/D: the Hermitian half spectrum) in a per-row workspace and contracts it with
the inverse twiddles; backward likewise with G conj(Y), G conj(X) evaluated at the hashes.
_cbp_dense_spectra_kernel (op ``rwmn::cbp_dense_spectra``, no autograd) writes the half
spectra of one operand's rows the same way: the read network's memory spectra
(kernels/read_network.py), a few hundred rows computed once per forward.

Scratch. The FFT kernels stage each transform through a per-program scratch area in device
memory (2 complex D-vectors for the spectra and product kernels, 3 for the backward and
the forward-only kernel), reused for every pair of rows the program
owns; pairs_per_program keeps a launch's scratch within SCRATCH_BUDGET so it stays in L2.

Inputs are read as stored (fp32, bf16 or fp16); products accumulate in fp32. Under autocast
the inputs are cast to the autocast dtype first (custom ops have no autocast rule).

Custom ops. ``rwmn::cbp_fft`` / ``rwmn::cbp_fft_backward`` and ``rwmn::cbp_fft_forward``
(forward only, no autograd) for the FFT path, ``rwmn::cbp_dense``
/ ``rwmn::cbp_dense_backward`` are ``torch.library.triton_op``s launched through
``wrap_triton`` with ``register_autograd``, so ``torch.compile(fullgraph=True)`` traces them
without a graph break.
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
from kernels._common import LaunchConfig, derived, launch

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

#: Sizes D at or above this with a radix plan (fft_plan) take the FFT path; smaller D and D
#: without a plan (a prime factor > MAX_RADIX) stay dense. Tests lower it to run the FFT
#: path at tiny D.
FACTORISED_MIN_DIM = 256
#: Largest radix of one FFT stage: its DFT matrix is a [pow2(R), pow2(R)] register tile, and
#: a stage costs pow2(R)^2 / R multiply-adds per point, so radices of 16 are the cheapest.
MAX_RADIX = 32
#: Most stages of one transform (16384 = 16 x 32 x 32; 16000 = 10 x 10 x 10 x 16).
MAX_STAGES = 4
#: tl.dot needs every operand dimension >= 16, so radices are padded to at least this.
MIN_DOT = 16
#: Rows (j values) of a stage's product tile: 64 is the M of one warpgroup's wgmma.
FFT_BLOCK_J = 64
#: Longest j range of a transform that runs each stage as one tile (see _block_j).
FFT_BLOCK_J_ONE_TILE = 128
#: Width of the 1-D chunks (sketch bins, spectrum bins, gathered inputs).
BLOCK_S = 128
#: Warps of the FFT kernels: one warpgroup, which the [64, 16] stage tiles fill exactly.
FFT_WARPS = 4
#: (kind, precision) -> (warps, largest BLOCK_J) where the defaults spilled, fitted with the
#: compile gate on both targets. ptxas, given no register cap, settles on a register
#: budget of its own (96-128 for a 4-warp program) and spills past it; more warps halve each
#: thread's share of the tiles, smaller j tiles shorten the live ranges. ieee products hold
#: both operands in registers. Same executed MACs at 4096 (256 j values divide 32 and 64).
FFT_TILE_OVERRIDES = {
    ("forward", "ieee"): (4, 32),
    ("spectra", "tf32"): (8, None),
}
#: The same for Triton < 3.7 (CI's floor, 3.6), whose bundled ptxas settles on other
#: budgets: the fp32 backward needs 8 warps (4 spilled 20 B at D = 300 on sm_90a) and the
#: fp32 spectra 8 warps with 32-row tiles where a stage is one tile (4 spilled 8 B at
#: D = 600), while Triton 3.9 spills with exactly those (16-20 B at D = 600).
FFT_TILE_OVERRIDES_FLOOR = {
    ("forward", "ieee"): (4, 32),
    ("backward", "ieee"): (8, 32),
    ("spectra", "tf32"): (8, None),
    ("spectra", "ieee", "one tile"): (8, 32),
}
TRITON_FLOOR = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7)
#: Bytes of FFT-kernel scratch to aim for in one launch: one program's scratch is reused for
#: its pairs of rows, and all of it together should fit in L2 (50 MB on H100/H200, 40 MB
#: on A100) next to the inputs and outputs.
SCRATCH_BUDGET = 24 * 2**20
#: Complex D-vectors of scratch per program: ping-pong buffers of the stages, plus the
#: second correlation spectrum in the backward.
SCRATCH_VECTORS = {"spectra": 2, "product": 2, "backward": 3, "forward": 3}


# --------------------------------------------------------------------------------------
# Triton kernels: dense path
# --------------------------------------------------------------------------------------


@triton.jit
def _dot_operand(v, PRECISION: tl.constexpr):
    """v as an fp32 tl.dot operand at PRECISION. A "tf32" product reads the operand's top 10
    mantissa bits, truncated, which biases the CBP transforms (errors up to 3x the half
    precision tests' limits); rounding v to the nearest tf32 first (ties away from zero, as
    PTX cvt.rna.tf32.f32) removes the bias. Integer arithmetic rather than inline PTX: the
    same code compiles for the GPU and runs in the interpreter. Other precisions take v as
    it is."""
    if PRECISION == "tf32":
        bits = v.to(tl.uint32, bitcast=True)
        v = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return v


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
        # v holds half-precision values, exact in tf32; the twiddles need the rounding.
        re += tl.dot(v, _dot_operand(cos * s[:, None], PRECISION), input_precision=PRECISION)
        im -= tl.dot(v, _dot_operand(sin * s[:, None], PRECISION), input_precision=PRECISION)
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
        wr, wi = _dot_operand(wr, PRECISION), _dot_operand(wi, PRECISION)
        cos, sin = _dot_operand(cos, PRECISION), _dot_operand(sin, PRECISION)
        acc += tl.dot(wr, cos, input_precision=PRECISION)
        acc -= tl.dot(wi, sin, input_precision=PRECISION)
    return acc


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
def _cbp_dense_spectra_kernel(
    src_ptr,
    h_ptr,
    s_ptr,
    tab_ptr,
    spec_ptr,
    R,
    N,
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """spec[r] = DFT(psi(src[r])) at the K half-spectrum bins ([re K | im K] per row, fp32)
    by the dense sketch-DFT, for BLOCK_R rows of src [R, N]: the read network's memory
    spectra (a few hundred rows, where one launch of this costs less than planning FFTs)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    spec_row = spec_ptr + rows64[:, None] * (2 * K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        re, im = _sketch_dft(
            src_ptr, rows64 * N, rmask, h_ptr, s_ptr, N, ks, tab_ptr, D,
            False, BLOCK_R, BLOCK_K, BLOCK_N, PRECISION,
        )  # fmt: skip
        m = rmask[:, None] & (ks < K)[None, :]
        tl.store(spec_row + ks[None, :], re, mask=m)
        tl.store(spec_row + K + ks[None, :], im, mask=m)


# --------------------------------------------------------------------------------------
# Triton kernels: FFT path
# --------------------------------------------------------------------------------------


@triton.jit
def _fft_stage(
    src,
    dst,
    tab_ptr,
    D: tl.constexpr,
    R: tl.constexpr,
    NS: tl.constexpr,
    P: tl.constexpr,
    BLOCK_J: tl.constexpr,
    SIGN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One radix-R Stockham stage of a length-D complex DFT (module doc), src -> dst, both
    planar (re at [0, D), im at [D, 2N)); SIGN = -1 forward, +1 inverse (unscaled).

    y[(j div NS) NS R + (j mod NS) + u NS] = sum_{t < R} W_R^{t u} w_N^{t (j mod NS) D/(NS R)}
    src[j + t D / R], with W_R = e^{SIGN 2 pi i / R}. A tile holds BLOCK_J values of j (rows,
    the M of the product) by P >= R values of t (zero-padded), so the R-point DFT is one
    complex [BLOCK_J, P] x [P, P] product, run as three real tl.dot (Gauss).
    """
    J: tl.constexpr = D // R
    t = tl.arange(0, P)
    t_ok = t < R
    # W[t, u] = e^{SIGN 2 pi i t u / R} = table entry t u D / R mod D (exact integers).
    ph = (t[:, None] * t[None, :] * J) % D
    wr = tl.load(tab_ptr + ph)
    wi = SIGN * tl.load(tab_ptr + D + ph)
    wsum = _dot_operand(wr + wi, PRECISION)
    wr, wi = _dot_operand(wr, PRECISION), _dot_operand(wi, PRECISION)
    for j0 in range(0, J, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        m = (j < J)[:, None] & t_ok[None, :]
        src_idx = j[:, None] + J * t[None, :]
        vr = tl.load(src + src_idx, mask=m, other=0.0)
        vi = tl.load(src + D + src_idx, mask=m, other=0.0)
        k = j % NS
        if NS > 1:
            tp = t[None, :] * k[:, None] * (D // (NS * R))
            c = tl.load(tab_ptr + tp, mask=m, other=0.0)
            s = SIGN * tl.load(tab_ptr + D + tp, mask=m, other=0.0)
            vr, vi = vr * c - vi * s, vr * s + vi * c
        vr, vi = _dot_operand(vr, PRECISION), _dot_operand(vi, PRECISION)
        t1 = tl.dot(vr, wr, input_precision=PRECISION)
        t2 = tl.dot(vi, wi, input_precision=PRECISION)
        t3 = tl.dot(_dot_operand(vr + vi, PRECISION), wsum, input_precision=PRECISION)
        dst_idx = ((j // NS) * (NS * R) + k)[:, None] + NS * t[None, :]
        tl.store(dst + dst_idx, t1 - t2, mask=m)
        tl.store(dst + D + dst_idx, t3 - t1 - t2, mask=m)


@triton.jit
def _fft(
    a,
    b,
    tab_ptr,
    D: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    R4: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    STAGES: tl.constexpr,
    BLOCK_J: tl.constexpr,
    SIGN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The length-D complex DFT of the planar vector at a, by STAGES Stockham stages of
    radices R1..R4 (unused ones are 1), ping-ponging between a and b. The caller has made a
    visible to the whole program (barrier). Returns (result, other): the buffer holding the
    result and the free one; ends with a barrier, so the result is visible."""
    _fft_stage(a, b, tab_ptr, D, R1, 1, P1, BLOCK_J, SIGN, PRECISION)
    tl.debug_barrier()  # the next stage reads what other threads of the program wrote
    if STAGES > 1:
        _fft_stage(b, a, tab_ptr, D, R2, R1, P2, BLOCK_J, SIGN, PRECISION)
        tl.debug_barrier()
    if STAGES > 2:
        _fft_stage(a, b, tab_ptr, D, R3, R1 * R2, P3, BLOCK_J, SIGN, PRECISION)
        tl.debug_barrier()
    if STAGES > 3:
        _fft_stage(b, a, tab_ptr, D, R4, R1 * R2 * R3, P4, BLOCK_J, SIGN, PRECISION)
        tl.debug_barrier()
    if STAGES % 2 == 1:
        return b, a
    else:
        return a, b


@triton.jit
def _sketch_row(
    src_ptr, order_ptr, start_ptr, sign_ptr, dst_ptr, valid, D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """dst[j] = sum_{i: h(i) = j} s(i) src[i] for j < D (zeros where not valid): the count
    sketch as a gather-sum over the inverse hash (input indices sorted by bin, bin j's at
    order[start[j]: start[j+1]], signs alongside). Deterministic: no atomics; each bin is
    summed by one thread in a fixed order, and the loop runs as long as the fullest bin of
    the chunk."""
    for j0 in range(0, D, BLOCK_S):
        js = j0 + tl.arange(0, BLOCK_S)
        jm = js < D
        lo = tl.load(start_ptr + js, mask=jm, other=0)
        count = tl.load(start_ptr + js + 1, mask=jm, other=0) - lo
        count = tl.where(valid, count, 0)
        acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for t in range(0, tl.max(count, axis=0)):
            ok = t < count
            i = tl.load(order_ptr + lo + t, mask=ok, other=0)
            sign = tl.load(sign_ptr + lo + t, mask=ok, other=0.0)
            acc += sign * tl.load(src_ptr + i, mask=ok, other=0.0).to(tl.float32)
        tl.store(dst_ptr + js, acc, mask=jm)


@triton.jit
def _gather_row(src_ptr, h_ptr, s_ptr, dst_ptr, D, valid, BLOCK_S: tl.constexpr):
    """dst[i] = s(i) src[h(i)] for i < D (nothing where not valid): the transposed sketch."""
    for n0 in range(0, D, BLOCK_S):
        ns = n0 + tl.arange(0, BLOCK_S)
        nm = tl.where(valid, ns < D, False)
        h = tl.load(h_ptr + ns, mask=nm, other=0)
        s = tl.load(s_ptr + ns, mask=nm, other=0.0).to(tl.float32)
        v = tl.load(src_ptr + h, mask=nm, other=0.0)
        tl.store(dst_ptr + ns, (s * v).to(dst_ptr.dtype.element_ty), mask=nm)


@triton.jit
def _split_pair(z, k, km, D: tl.constexpr):
    """The spectra A_k, B_k of two real rows a, b from Z = DFT(a + i b) at the bins k:
    A_k = (Z_k + conj Z_{D-k}) / 2, B_k = (Z_k - conj Z_{D-k}) / 2i. Returns (Ar, Ai, Br, Bi)."""
    kn = (D - k) % D
    zr = tl.load(z + k, mask=km, other=0.0)
    zi = tl.load(z + D + k, mask=km, other=0.0)
    mr = tl.load(z + kn, mask=km, other=0.0)
    mi = tl.load(z + D + kn, mask=km, other=0.0)
    return (zr + mr) * 0.5, (zi - mi) * 0.5, (zi + mi) * 0.5, (mr - zr) * 0.5


@triton.jit
def _load_bins(spec_row, kk, m, K: tl.constexpr):
    """Re and Im of the half spectrum stored at spec_row ([re K | im K]) at the bins kk."""
    return tl.load(spec_row + kk, mask=m, other=0.0), tl.load(spec_row + K + kk, mask=m, other=0.0)


@triton.jit
def _spectra_pair(
    src_ptr,
    n,
    r0,
    R,
    order_ptr,
    start_ptr,
    sign_ptr,
    spec_ptr,
    ws,
    tab_ptr,
    D: tl.constexpr,
    K: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    R4: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    STAGES: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Half spectra of the sketches of rows r0 and r0 + 1 (if < R) of src [R, n] into
    spec [R, 2K] ([re K | im K] per row), by one complex FFT of p_r0 + i p_r0+1."""
    has_b = r0 + 1 < R
    row = src_ptr + tl.cast(r0, tl.int64) * n
    _sketch_row(row, order_ptr, start_ptr, sign_ptr, ws, r0 < R, D, BLOCK_S)
    _sketch_row(row + n, order_ptr, start_ptr, sign_ptr, ws + D, has_b, D, BLOCK_S)
    tl.debug_barrier()  # the FFT reads sketch bins written by other threads
    z, _ = _fft(ws, ws + 2 * D, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4, STAGES, BLOCK_J,
                -1, PRECISION)  # fmt: skip
    spec_a = spec_ptr + tl.cast(r0, tl.int64) * (2 * K)
    spec_b = spec_a + 2 * K
    for k0 in range(0, K, BLOCK_S):
        k = k0 + tl.arange(0, BLOCK_S)
        km = k < K
        ar, ai, br, bi = _split_pair(z, k, km, D)
        tl.store(spec_a + k, ar, mask=km)
        tl.store(spec_a + K + k, ai, mask=km)
        tl.store(spec_b + k, br, mask=tl.where(has_b, km, False))
        tl.store(spec_b + K + k, bi, mask=tl.where(has_b, km, False))
    tl.debug_barrier()  # the next pair's sketches overwrite this pair's FFT buffers


@triton.jit
def _cbp_spectra_kernel(
    src_ptr,
    order_ptr,
    start_ptr,
    sign_ptr,
    tab_ptr,
    spec_ptr,
    ws_ptr,
    R,
    N_IN,
    PAIRS_PER_PROGRAM,
    D: tl.constexpr,
    K: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    R4: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    STAGES: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """spec = DFT(psi(src)) [R, 2K] (half spectra, [re K | im K] per row) for the distinct
    rows of one operand src [R, N_IN] and its inverse hash (launched once for x, once for
    y: one copy of the pipeline per kernel keeps the build within registers), each program
    PAIRS_PER_PROGRAM pairs of rows. Scratch per program: two complex D-vectors."""
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * (4 * D)
    first = pid * PAIRS_PER_PROGRAM
    for pair in range(first, tl.minimum(first + PAIRS_PER_PROGRAM, tl.cdiv(R, 2))):
        _spectra_pair(
            src_ptr, N_IN, 2 * pair, R, order_ptr, start_ptr, sign_ptr, spec_ptr, ws, tab_ptr,
            D, K, R1, R2, R3, R4, P1, P2, P3, P4, STAGES, BLOCK_J, BLOCK_S, PRECISION,
        )  # fmt: skip


@triton.jit
def _cbp_product_kernel(
    xs_ptr,
    ys_ptr,
    xidx_ptr,
    yidx_ptr,
    tab_ptr,
    out_ptr,
    ws_ptr,
    R,
    PAIRS_PER_PROGRAM,
    D: tl.constexpr,
    K: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    R4: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    STAGES: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[r] = IDFT(P[xidx[r]] Q[yidx[r]]) for the R output rows, two rows a, b per inverse
    FFT: Z_k = A_k + i B_k on all D bins (A = P Q / D, and A_k = conj A_{D-k} above the half
    spectrum), out_a = Re IDFT(Z), out_b = Im IDFT(Z). Scratch per program: two complex
    D-vectors."""
    INV_D: tl.constexpr = 1.0 / D  # a multiply, not a divide (see _correlation_pair)
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * (4 * D)
    first = pid * PAIRS_PER_PROGRAM
    for pair in range(first, tl.minimum(first + PAIRS_PER_PROGRAM, tl.cdiv(R, 2))):
        ra = 2 * pair
        has_b = ra + 1 < R
        rb = tl.minimum(ra + 1, R - 1)
        xa = xs_ptr + tl.load(xidx_ptr + ra) * (2 * K)
        ya = ys_ptr + tl.load(yidx_ptr + ra) * (2 * K)
        xb = xs_ptr + tl.load(xidx_ptr + rb) * (2 * K)
        yb = ys_ptr + tl.load(yidx_ptr + rb) * (2 * K)
        for k0 in range(0, D, BLOCK_S):
            k = k0 + tl.arange(0, BLOCK_S)
            km = k < D
            low = k < K
            kk = tl.where(low, k, D - k)
            pr, pi = _load_bins(xa, kk, km, K)
            qr, qi = _load_bins(ya, kk, km, K)
            ar = (pr * qr - pi * qi) * INV_D
            ai = (pr * qi + pi * qr) * INV_D
            ai = tl.where(low, ai, -ai)
            pr, pi = _load_bins(xb, kk, tl.where(has_b, km, False), K)
            qr, qi = _load_bins(yb, kk, tl.where(has_b, km, False), K)
            br = (pr * qr - pi * qi) * INV_D
            bi = (pr * qi + pi * qr) * INV_D
            bi = tl.where(low, bi, -bi)
            tl.store(ws + k, ar - bi, mask=km)
            tl.store(ws + D + k, ai + br, mask=km)
        tl.debug_barrier()  # the FFT reads bins written by other threads
        z, _ = _fft(ws, ws + 2 * D, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4, STAGES,
                    BLOCK_J, 1, PRECISION)  # fmt: skip
        out_a = out_ptr + tl.cast(ra, tl.int64) * D
        for j0 in range(0, D, BLOCK_S):
            j = j0 + tl.arange(0, BLOCK_S)
            jm = j < D
            tl.store(out_a + j, tl.load(z + j, mask=jm).to(out_ptr.dtype.element_ty), mask=jm)
            tl.store(
                out_a + D + j,
                tl.load(z + D + j, mask=tl.where(has_b, jm, False)).to(out_ptr.dtype.element_ty),
                mask=tl.where(has_b, jm, False),
            )
        tl.debug_barrier()  # the next pair overwrites the buffers this pair just read


@triton.jit
def _product_bins(z, k, km, D: tl.constexpr, K: tl.constexpr):
    """P Q / D at the bins k < D (conjugated above the half spectrum), with P, Q read from Z =
    DFT(p + i q) of one row. Returns (Re, Im)."""
    INV_D: tl.constexpr = 1.0 / D  # a multiply, not a divide (see _correlation_pair)
    low = k < K
    kk = tl.where(low, k, D - k)
    pr, pi, qr, qi = _split_pair(z, kk, km, D)
    ar = (pr * qr - pi * qi) * INV_D
    ai = (pr * qi + pi * qr) * INV_D
    return ar, tl.where(low, ai, -ai)


@triton.jit
def _cbp_fwd_kernel(
    x_ptr,
    y_ptr,
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
    N1,
    N2,
    PAIRS_PER_PROGRAM,
    D: tl.constexpr,
    K: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    R4: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    STAGES: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Forward only, unbroadcast rows (x [R, N1], y [R, N2]): out[r] = IDFT(P_r Q_r) in one
    launch with nothing saved. Per row one complex FFT of p_r + i q_r gives P_r and Q_r; two
    rows' products travel as one inverse FFT (out_a = Re, out_b = Im). The same transforms
    as the spectra + product launches, without writing the spectra to device memory and
    reading them back. Scratch per program: three complex D-vectors."""
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * (6 * D)
    first = pid * PAIRS_PER_PROGRAM
    for pair in range(first, tl.minimum(first + PAIRS_PER_PROGRAM, tl.cdiv(R, 2))):
        ra = 2 * pair
        has_b = ra + 1 < R
        ra64 = tl.cast(ra, tl.int64)
        _sketch_row(x_ptr + ra64 * N1, order1_ptr, start1_ptr, sign1_ptr, ws, ra < R, D, BLOCK_S)
        _sketch_row(y_ptr + ra64 * N2, order2_ptr, start2_ptr, sign2_ptr, ws + D, ra < R, D,
                    BLOCK_S)  # fmt: skip
        tl.debug_barrier()  # the FFT reads sketch bins written by other threads
        za, free = _fft(ws, ws + 2 * D, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4, STAGES,
                        BLOCK_J, -1, PRECISION)  # fmt: skip
        _sketch_row(x_ptr + (ra64 + 1) * N1, order1_ptr, start1_ptr, sign1_ptr, free, has_b, D,
                    BLOCK_S)  # fmt: skip
        _sketch_row(y_ptr + (ra64 + 1) * N2, order2_ptr, start2_ptr, sign2_ptr, free + D, has_b,
                    D, BLOCK_S)  # fmt: skip
        tl.debug_barrier()
        zb, spare = _fft(free, ws + 4 * D, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4, STAGES,
                         BLOCK_J, -1, PRECISION)  # fmt: skip
        for k0 in range(0, D, BLOCK_S):
            k = k0 + tl.arange(0, BLOCK_S)
            km = k < D
            ar, ai = _product_bins(za, k, km, D, K)
            br, bi = _product_bins(zb, k, tl.where(has_b, km, False), D, K)
            tl.store(spare + k, ar - bi, mask=km)
            tl.store(spare + D + k, ai + br, mask=km)
        tl.debug_barrier()  # the inverse reads bins written by other threads
        # P_a Q_a is consumed: its buffer is the inverse's ping-pong partner.
        z, _ = _fft(spare, za, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4, STAGES, BLOCK_J, 1,
                    PRECISION)  # fmt: skip
        out_a = out_ptr + ra64 * D
        for j0 in range(0, D, BLOCK_S):
            j = j0 + tl.arange(0, BLOCK_S)
            jm = j < D
            tl.store(out_a + j, tl.load(z + j, mask=jm).to(out_ptr.dtype.element_ty), mask=jm)
            jb = tl.where(has_b, jm, False)
            tl.store(out_a + D + j, tl.load(z + D + j, mask=jb).to(out_ptr.dtype.element_ty),
                     mask=jb)  # fmt: skip
        tl.debug_barrier()  # the next pair overwrites the buffers this pair just read


@triton.jit
def _correlation_pair(
    z, kk, kn, low, m, xs_row, ys_row, BCAST_B: tl.constexpr, D: tl.constexpr,
    K: tl.constexpr,
):  # fmt: skip
    """For the row G is the (BCAST_B ? second : first) of the pair whose g + i g' FFT is z:
    C = G conj(Q) / D and E = G conj(P) / D at the bins kk (conjugated above the half
    spectrum), packed as C + i E. Returns (Re, Im)."""
    # A multiply by 1/D, not a divide: an exact fp32 divide by a constant that is not a power
    # of two is a subroutine call in SASS, whose register saves ptxas reports as spills.
    INV_D: tl.constexpr = 1.0 / D
    zr = tl.load(z + kk, mask=m, other=0.0)
    zi = tl.load(z + D + kk, mask=m, other=0.0)
    mr = tl.load(z + kn, mask=m, other=0.0)
    mi = tl.load(z + D + kn, mask=m, other=0.0)
    if BCAST_B:
        gr, gi = (zi + mi) * 0.5, (mr - zr) * 0.5
    else:
        gr, gi = (zr + mr) * 0.5, (zi - mi) * 0.5
    pr, pi = _load_bins(xs_row, kk, m, K)
    qr, qi = _load_bins(ys_row, kk, m, K)
    cr = (gr * qr + gi * qi) * INV_D
    ci = (gi * qr - gr * qi) * INV_D
    er = (gr * pr + gi * pi) * INV_D
    ei = (gi * pr - gr * pi) * INV_D
    ci = tl.where(low, ci, -ci)
    ei = tl.where(low, ei, -ei)
    return cr - ei, ci + er


@triton.jit
def _cbp_bwd_kernel(
    g_ptr,
    xs_ptr,
    ys_ptr,
    xidx_ptr,
    yidx_ptr,
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
    PAIRS_PER_PROGRAM,
    D: tl.constexpr,
    K: tl.constexpr,
    R1: tl.constexpr,
    R2: tl.constexpr,
    R3: tl.constexpr,
    R4: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    STAGES: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """gx[r] = s1 * IDFT(G conj(Q) / D)[h1], gy[r] = s2 * IDFT(G conj(P) / D)[h2] for the R
    output rows (per broadcast row; P = xs[xidx[r]], Q = ys[yidx[r]] from the forward), two
    rows a, b per program step: G_a, G_b from one FFT of g_a + i g_b, then for each row one
    inverse FFT of C + i E whose real and imaginary parts are the two correlations.
    Scratch per program: three complex D-vectors."""
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * (6 * D)
    buf_a, buf_b, buf_c = ws, ws + 2 * D, ws + 4 * D
    first = pid * PAIRS_PER_PROGRAM
    for pair in range(first, tl.minimum(first + PAIRS_PER_PROGRAM, tl.cdiv(R, 2))):
        ra = 2 * pair
        has_b = ra + 1 < R
        rb = tl.minimum(ra + 1, R - 1)
        g_a = g_ptr + tl.cast(ra, tl.int64) * D
        for j0 in range(0, D, BLOCK_S):
            j = j0 + tl.arange(0, BLOCK_S)
            jm = j < D
            tl.store(buf_a + j, tl.load(g_a + j, mask=jm).to(tl.float32), mask=jm)
            gb = tl.load(g_a + D + j, mask=tl.where(has_b, jm, False), other=0.0).to(tl.float32)
            tl.store(buf_a + D + j, gb, mask=jm)
        tl.debug_barrier()  # the FFT reads what other threads loaded
        zg, free = _fft(buf_a, buf_b, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4, STAGES,
                        BLOCK_J, -1, PRECISION)  # fmt: skip
        xa = xs_ptr + tl.load(xidx_ptr + ra) * (2 * K)
        ya = ys_ptr + tl.load(yidx_ptr + ra) * (2 * K)
        xb = xs_ptr + tl.load(xidx_ptr + rb) * (2 * K)
        yb = ys_ptr + tl.load(yidx_ptr + rb) * (2 * K)
        for k0 in range(0, D, BLOCK_S):
            k = k0 + tl.arange(0, BLOCK_S)
            km = k < D
            low = k < K
            kk = tl.where(low, k, D - k)
            kn = (D - kk) % D
            zr, zi = _correlation_pair(zg, kk, kn, low, km, xa, ya, False, D, K)
            tl.store(free + k, zr, mask=km)
            tl.store(free + D + k, zi, mask=km)
            zr, zi = _correlation_pair(
                zg, kk, kn, low, tl.where(has_b, km, False), xb, yb, True, D, K
            )
            tl.store(buf_c + k, zr, mask=km)
            tl.store(buf_c + D + k, zi, mask=km)
        tl.debug_barrier()  # the inverses read bins written by other threads
        # The FFT of g is consumed: its buffer is the first inverse's ping-pong partner.
        ca, spare = _fft(free, zg, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4, STAGES,
                         BLOCK_J, 1, PRECISION)  # fmt: skip
        cb, _ = _fft(buf_c, spare, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4, STAGES,
                     BLOCK_J, 1, PRECISION)  # fmt: skip
        ra64 = tl.cast(ra, tl.int64)
        _gather_row(ca, h1_ptr, s1_ptr, gx_ptr + ra64 * N1, N1, ra < R, BLOCK_S)
        _gather_row(ca + D, h2_ptr, s2_ptr, gy_ptr + ra64 * N2, N2, ra < R, BLOCK_S)
        _gather_row(cb, h1_ptr, s1_ptr, gx_ptr + (ra64 + 1) * N1, N1, has_b, BLOCK_S)
        _gather_row(cb + D, h2_ptr, s2_ptr, gy_ptr + (ra64 + 1) * N2, N2, has_b, BLOCK_S)
        tl.debug_barrier()  # the next pair overwrites the buffers these gathers read


# --------------------------------------------------------------------------------------
# Plans, configurations and costs (pure functions of shapes and dtypes)
# --------------------------------------------------------------------------------------


def half_spectrum(out_dim: int) -> int:
    """Number of independent bins of the DFT of a real sequence of length out_dim."""
    return out_dim // 2 + 1


def _padded(radix: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(radix))


def _radix_splits(n: int, smallest: int, stages: int):
    """Every nondecreasing tuple of radices in [smallest, MAX_RADIX] with product n and at
    most ``stages`` entries."""
    if n == 1:
        yield ()
        return
    if stages == 0:
        return
    for r in range(smallest, min(MAX_RADIX, n) + 1):
        if n % r == 0:
            for rest in _radix_splits(n // r, r, stages - 1):
                yield (r, *rest)


def _transform_macs(out_dim: int, radices: tuple[int, ...], block_j: int) -> int:
    """Real multiply-adds of one complex FFT: per stage, cdiv(D/R, BLOCK_J) tiles of
    [BLOCK_J, P] x [P, P], three real products each (Gauss), padding included."""
    return sum(3 * triton.cdiv(out_dim // r, block_j) * block_j * _padded(r) ** 2 for r in radices)


def _block_j(out_dim: int, radices: tuple[int, ...]) -> int:
    """Rows of the stage tiles: every stage's j loop in one tile when the longest has at
    most FFT_BLOCK_J_ONE_TILE values (the model's read size; a rotated j loop made ptxas
    spill its 64-bit induction variable around the loop's reconvergence point), else
    FFT_BLOCK_J (the story size: [64, 16] wgmma tiles, 4 per stage)."""
    longest = max(out_dim // r for r in radices)
    if longest <= FFT_BLOCK_J_ONE_TILE:
        return max(MIN_DOT, triton.next_power_of_2(longest))
    return FFT_BLOCK_J


@functools.cache
def _plan(out_dim: int) -> tuple[tuple[int, ...], int] | None:
    best = None
    for radices in _radix_splits(out_dim, 2, MAX_STAGES):
        block_j = _block_j(out_dim, radices)
        key = (_transform_macs(out_dim, radices, block_j), len(radices))
        if best is None or key < best[0]:
            best = (key, (radices, block_j))
    return None if best is None else best[1]


def fft_plan(out_dim: int, min_dim: int = FACTORISED_MIN_DIM) -> tuple[int, ...] | None:
    """Radices of the FFT path for D = out_dim (their product), or None for the dense path.

    None when out_dim < min_dim or out_dim has no split into at most MAX_STAGES radices <=
    MAX_RADIX (a prime factor > 32: 97, 4099, 2 x 4099, ...). Among the splits it picks the
    fewest executed multiply-adds (radices padded to max(16, pow2(R)), j tiles to 16, 32 or
    64), then the fewest stages: 4096 -> 16 x 16 x 16, 300 -> 10 x 30, 600 -> 24 x 25,
    16000 -> 10 x 10 x 10 x 16.
    """
    if out_dim < max(min_dim, 2):
        return None
    plan = _plan(out_dim)
    return None if plan is None else plan[0]


def _fft_constexprs(out_dim: int, radices: tuple[int, ...], precision: str) -> dict:
    plan = _plan(out_dim)
    if plan is None or plan[0] != tuple(radices):
        raise ValueError(f"cbp: radices {tuple(radices)} are not fft_plan({out_dim})")
    padded = [*radices, *(1,) * (MAX_STAGES - len(radices))]
    constexprs = dict(D=out_dim, K=half_spectrum(out_dim))
    for i, r in enumerate(padded, start=1):
        constexprs[f"R{i}"] = r
        constexprs[f"P{i}"] = _padded(r)
    constexprs.update(STAGES=len(radices), BLOCK_J=plan[1], BLOCK_S=BLOCK_S, PRECISION=precision)
    return constexprs


def scratch_floats(out_dim: int, kind: str) -> int:
    """fp32 scratch of one program of an FFT kernel (kind: spectra, product, backward)."""
    return 2 * out_dim * SCRATCH_VECTORS[kind]


def pairs_per_program(pairs: int, out_dim: int, kind: str) -> int:
    """Pairs of rows one program of an FFT kernel owns: one each while the scratch of one
    program per pair fits SCRATCH_BUDGET (so it stays in L2), else enough to fit it."""
    programs = max(1, min(pairs, SCRATCH_BUDGET // (4 * scratch_floats(out_dim, kind))))
    return triton.cdiv(max(pairs, 1), programs)


def workspace_numel(kind: str, out_dim: int, rows: int, y_rows: int = 0) -> int:
    """fp32 workspace values a launch of ``kind`` needs. FFT kinds (spectra: rows = x rows,
    y_rows = y rows; the others: rows = output rows): one scratch per program
    (scratch_floats).
    Dense kinds (dense_forward, dense_backward): the half spectra per row."""
    if kind.startswith("dense"):
        return rows * (4 if kind == "dense_backward" else 2) * half_spectrum(out_dim)
    if kind == "spectra":
        # One launch per operand, one after the other on the stream: they share the space.
        return max(_fft_programs(r, out_dim, kind) for r in (rows, y_rows)) * scratch_floats(
            out_dim, kind
        )
    return _fft_programs(rows, out_dim, kind) * scratch_floats(out_dim, kind)


def _fft_programs(rows: int, out_dim: int, kind: str) -> int:
    pairs = triton.cdiv(rows, 2)
    return triton.cdiv(max(pairs, 1), pairs_per_program(pairs, out_dim, kind))


def cbp_config(
    kind: str,
    out_dim: int,
    precision: str,
    rows: int,
    radices: tuple[int, ...] | None = None,
) -> LaunchConfig:
    """Launch configuration of a CBP kernel.

    kind: "spectra" (rows = the distinct rows of one operand), "product", "backward" or
    "forward" (the forward-only kernel; rows = output rows), with the FFT plan ``radices``;
    or "dense_forward" / "dense_backward" (rows = output rows) / "dense_spectra" (rows =
    input rows). FFT kernels: one warpgroup
    (FFT_TILE_OVERRIDES aside), one program per
    pairs_per_program pairs of rows, stage tiles [BLOCK_J, pow2(R)] (at the story size
    [64, 16]: the M of one warpgroup's wgmma). Dense kernels: one program per DENSE_BLOCK_R
    rows, tiles small enough to stay in registers."""
    if kind.startswith("dense"):
        constexprs = dict(D=out_dim, K=half_spectrum(out_dim), BLOCK_R=DENSE_BLOCK_R,
                          BLOCK_K=DENSE_BLOCK_K, BLOCK_N=DENSE_BLOCK_N,
                          PRECISION=precision)  # fmt: skip
        if kind == "dense_forward":
            constexprs["BLOCK_J"] = DENSE_BLOCK_N
        return LaunchConfig(
            grid=(triton.cdiv(rows, DENSE_BLOCK_R),),
            constexprs=constexprs,
            num_warps=DENSE_WARPS[precision],
            num_stages=1,
        )
    constexprs = _fft_constexprs(out_dim, radices, precision)
    overrides = FFT_TILE_OVERRIDES_FLOOR if TRITON_FLOOR else FFT_TILE_OVERRIDES
    key = (kind, precision)
    if constexprs["BLOCK_J"] != FFT_BLOCK_J and (*key, "one tile") in overrides:
        key = (*key, "one tile")
    warps, block_j = overrides.get(key, (FFT_WARPS, None))
    if block_j is not None:
        constexprs["BLOCK_J"] = min(constexprs["BLOCK_J"], block_j)
    return LaunchConfig(
        grid=(_fft_programs(rows, out_dim, kind),),
        constexprs=constexprs,
        num_warps=warps,
        num_stages=1,
    )


def _precision(*tensors: torch.Tensor) -> str:
    # fp32 inputs multiply in exact fp32 on CUDA cores ("ieee"): 3-pass tf32 ("tf32x3"),
    # the tensor-core alternative, spilled registers at every tile size the compile gate
    # tried on sm_90a and sm_80. Half inputs carry 8-11 mantissa bits, which one tf32 pass
    # (tensor cores, fp32 accumulation) already exceeds.
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) else "tf32"


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _check_matrix(name: str, t: torch.Tensor, cols: int | None = None) -> None:
    if t.dim() != 2 or not t.is_contiguous() or (cols is not None and t.shape[1] != cols):
        want = "[rows, cols]" if cols is None else f"[rows, {cols}]"
        raise ValueError(f"cbp: {name} of shape {tuple(t.shape)} must be contiguous {want}")


def _check_index(name: str, idx: torch.Tensor, rows: int) -> None:
    if idx.dtype != torch.int64 or idx.dim() != 1 or idx.numel() != rows:
        raise ValueError(f"cbp: {name} must be int64 [{rows}], got {idx.dtype} {tuple(idx.shape)}")


def _check_spectra(name: str, spec: torch.Tensor, out_dim: int) -> None:
    _check_matrix(name, spec, 2 * half_spectrum(out_dim))
    if spec.dtype != torch.float32:
        raise ValueError(f"cbp: {name} spectra must be fp32, got {spec.dtype}")


def cbp_spectra_launch(x, y, h1, s1, h2, s2, twiddles, xs, ys, workspace, radices) -> None:
    """Launch the spectra kernel for x, then for y: xs [Rx, 2K], ys [Ry, 2K] (fp32, [re K |
    im K] per row) = the half spectra of the sketches of the rows of x [Rx, n1] and y [Ry,
    n2] (contiguous); twiddles = twiddle_table(D); workspace fp32 with
    workspace_numel("spectra", D, Rx, Ry) values; radices = fft_plan(D)."""
    out_dim = twiddles.numel() // 2
    _check_twiddles(twiddles, out_dim)
    _check_matrix("x", x)
    _check_matrix("y", y)
    _check_spectra("x", xs, out_dim)
    _check_spectra("y", ys, out_dim)
    if xs.shape[0] != x.shape[0] or ys.shape[0] != y.shape[0]:
        raise ValueError(
            f"cbp: spectra of shapes {tuple(xs.shape)}, {tuple(ys.shape)} need one row per "
            f"input row ({x.shape[0]}, {y.shape[0]})"
        )
    _check_workspace(workspace, workspace_numel("spectra", out_dim, x.shape[0], y.shape[0]))
    precision = _precision(x, y)
    for v, h, s, spec in ((x, h1, s1, xs), (y, h2, s2, ys)):
        rows = v.shape[0]
        config = cbp_config("spectra", out_dim, precision, rows, radices=radices)
        launch(
            _cbp_spectra_kernel, config,
            v, *cached_inverse_hash(h, s, out_dim), twiddles, spec, workspace, rows, v.shape[1],
            pairs_per_program(triton.cdiv(rows, 2), out_dim, "spectra"),
        )  # fmt: skip


def cbp_forward_launch(x, y, h1, s1, h2, s2, twiddles, out, workspace, radices) -> None:
    """Launch the forward-only kernel: out [R, D] (contiguous) = CBP of the rows of x [R, n1]
    and y [R, n2] (contiguous, unbroadcast), nothing saved; workspace with
    workspace_numel("forward", D, R); radices = fft_plan(D)."""
    rows, out_dim = out.shape
    _check_twiddles(twiddles, out_dim)
    _check_matrix("x", x)
    _check_matrix("y", y)
    _check_matrix("output", out, out_dim)
    if x.shape[0] != rows or y.shape[0] != rows:
        raise ValueError(
            f"cbp: inputs of shapes {tuple(x.shape)}, {tuple(y.shape)} need {rows} rows each"
        )
    _check_workspace(workspace, workspace_numel("forward", out_dim, rows))
    config = cbp_config("forward", out_dim, _precision(x, y), rows, radices=radices)
    launch(
        _cbp_fwd_kernel, config,
        x, y, *cached_inverse_hash(h1, s1, out_dim), *cached_inverse_hash(h2, s2, out_dim),
        twiddles, out,
        workspace, rows, x.shape[1], y.shape[1],
        pairs_per_program(triton.cdiv(rows, 2), out_dim, "forward"),
    )  # fmt: skip


def cbp_product_launch(xs, ys, xidx, yidx, twiddles, out, workspace, radices, precision) -> None:
    """Launch the product kernel: out [R, D] (contiguous) = IDFT(xs[xidx[r]] ys[yidx[r]])
    for r < R; xidx, yidx int64 [R]; workspace with workspace_numel("product", D, R)."""
    rows, out_dim = out.shape
    _check_twiddles(twiddles, out_dim)
    _check_spectra("x", xs, out_dim)
    _check_spectra("y", ys, out_dim)
    _check_matrix("output", out, out_dim)
    _check_index("xidx", xidx, rows)
    _check_index("yidx", yidx, rows)
    _check_workspace(workspace, workspace_numel("product", out_dim, rows))
    config = cbp_config("product", out_dim, precision, rows, radices=radices)
    launch(
        _cbp_product_kernel, config,
        xs, ys, xidx, yidx, twiddles, out, workspace, rows,
        pairs_per_program(triton.cdiv(rows, 2), out_dim, "product"),
    )  # fmt: skip


def cbp_backward_launch(
    grad, xs, ys, xidx, yidx, h1, s1, h2, s2, twiddles, gx, gy, workspace, radices, precision
) -> None:
    """Launch the backward kernel: gx [R, n1], gy [R, n2] (contiguous, per output row) from
    grad [R, D] (contiguous) and the forward's spectra; workspace with
    workspace_numel("backward", D, R)."""
    rows, out_dim = grad.shape
    _check_twiddles(twiddles, out_dim)
    _check_matrix("gradient", grad, out_dim)
    _check_spectra("x", xs, out_dim)
    _check_spectra("y", ys, out_dim)
    _check_index("xidx", xidx, rows)
    _check_index("yidx", yidx, rows)
    _check_matrix("x gradient", gx, h1.numel())
    _check_matrix("y gradient", gy, h2.numel())
    if gx.shape[0] != rows or gy.shape[0] != rows:
        raise ValueError(
            f"cbp: gradients of shapes {tuple(gx.shape)}, {tuple(gy.shape)} need {rows} rows"
        )
    _check_workspace(workspace, workspace_numel("backward", out_dim, rows))
    config = cbp_config("backward", out_dim, precision, rows, radices=radices)
    launch(
        _cbp_bwd_kernel, config,
        grad, xs, ys, xidx, yidx, h1, s1, h2, s2, twiddles, gx, gy, workspace,
        rows, gx.shape[1], gy.shape[1],
        pairs_per_program(triton.cdiv(rows, 2), out_dim, "backward"),
    )  # fmt: skip


def cbp_dense_forward_launch(x, y, xoff, yoff, h1, s1, h2, s2, twiddles, out, workspace) -> None:
    """Launch the dense forward kernel: out [R, D] (contiguous) from the rows of x and y at
    the element offsets xoff, yoff [R]; workspace with workspace_numel("dense_forward", D, R)."""
    rows, out_dim = out.shape
    _check_twiddles(twiddles, out_dim)
    _check_rows("x", x, xoff)
    _check_rows("y", y, yoff)
    if not out.is_contiguous() or xoff.numel() != rows or yoff.numel() != rows:
        raise ValueError(f"cbp: output of shape {tuple(out.shape)} must be contiguous [R, D]")
    _check_workspace(workspace, workspace_numel("dense_forward", out_dim, rows))
    config = cbp_config("dense_forward", out_dim, _precision(x, y), rows)
    launch(
        _cbp_dense_fwd_kernel, config,
        x, y, xoff, yoff, h1, s1, h2, s2, twiddles, out, workspace,
        rows, x.shape[-1], y.shape[-1],
    )  # fmt: skip


def cbp_dense_spectra_launch(x, h, s, twiddles, spec) -> None:
    """Launch the dense spectra kernel: spec [R, 2K] (fp32, [re K | im K] per row) = the half
    spectra of the sketches (hash h, signs s) of the rows of x [R, n] (contiguous)."""
    out_dim = twiddles.numel() // 2
    _check_twiddles(twiddles, out_dim)
    _check_matrix("x", x, h.numel())
    _check_spectra("x", spec, out_dim)
    if spec.shape[0] != x.shape[0]:
        raise ValueError(
            f"cbp: spectra of shape {tuple(spec.shape)} need one row per input row ({x.shape[0]})"
        )
    rows = x.shape[0]
    config = cbp_config("dense_spectra", out_dim, _precision(x), rows)
    launch(_cbp_dense_spectra_kernel, config, x, h, s, twiddles, spec, rows, x.shape[1])


def cbp_dense_backward_launch(
    grad, x, y, xoff, yoff, h1, s1, h2, s2, twiddles, gx, gy, workspace
) -> None:
    """Launch the dense backward kernel: gx [R, n1] and gy [R, n2] (contiguous, per broadcast
    row) from grad [R, D] (contiguous); workspace with workspace_numel("dense_backward", D, R)."""
    rows, out_dim = grad.shape
    _check_twiddles(twiddles, out_dim)
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
    _check_workspace(workspace, workspace_numel("dense_backward", out_dim, rows))
    config = cbp_config("dense_backward", out_dim, _precision(grad, x, y), rows)
    launch(
        _cbp_dense_bwd_kernel, config,
        grad, x, y, xoff, yoff, h1, s1, h2, s2, twiddles, gx, gy, workspace,
        rows, x.shape[-1], y.shape[-1],
    )  # fmt: skip


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


def cached_inverse_hash(
    h: torch.Tensor, s: torch.Tensor, out_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inverse_hash(h, s, out_dim), built once per version of the hash buffers."""
    return derived((h, s), ("csr", out_dim), lambda: inverse_hash(h, s, out_dim))


def _check_workspace(workspace: torch.Tensor, need: int) -> None:
    if workspace.dtype != torch.float32 or workspace.numel() < need:
        raise ValueError(
            f"cbp: workspace of shape {tuple(workspace.shape)} and dtype {workspace.dtype} is "
            f"too small: fp32 with at least {need} values (workspace_numel)"
        )


# --------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------


@triton_op("rwmn::cbp_fft", mutates_args=())
def cbp_fft(
    x: torch.Tensor,
    y: torch.Tensor,
    xidx: torch.Tensor,
    yidx: torch.Tensor,
    h1: torch.Tensor,
    s1: torch.Tensor,
    h2: torch.Tensor,
    s2: torch.Tensor,
    twiddles: torch.Tensor,
    radices: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CBP by the FFT path. x [..., n1] and y [..., n2] contiguous, unbroadcast; xidx, yidx
    int64 of the broadcast leading shape L: the x row and y row of each output row;
    twiddles = twiddle_table(D) sets D; radices = fft_plan(D). Returns (out [*L, D] in
    promote(x, y), the half spectra of x's and y's rows, fp32 [rows, 2K], which the
    backward reuses)."""
    out_dim, k = twiddles.numel() // 2, half_spectrum(twiddles.numel() // 2)
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    rows = xidx.numel()
    out = x.new_empty((rows, out_dim), dtype=torch.promote_types(x.dtype, y.dtype))
    xs = x.new_empty((x2.shape[0], 2 * k), dtype=torch.float32)
    ys = y.new_empty((y2.shape[0], 2 * k), dtype=torch.float32)
    if rows and x2.shape[0] and y2.shape[0]:
        radices = tuple(radices)
        ws = x.new_empty(
            workspace_numel("spectra", out_dim, x2.shape[0], y2.shape[0]), dtype=torch.float32
        )
        cbp_spectra_launch(x2, y2, h1, s1, h2, s2, twiddles, xs, ys, ws, radices)
        ws = x.new_empty(workspace_numel("product", out_dim, rows), dtype=torch.float32)
        cbp_product_launch(
            xs, ys, xidx.reshape(-1), yidx.reshape(-1), twiddles, out, ws, radices,
            _precision(x, y),
        )  # fmt: skip
    return out.view(*xidx.shape, out_dim), xs, ys


@triton_op("rwmn::cbp_fft_forward", mutates_args=())
def cbp_fft_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    h1: torch.Tensor,
    s1: torch.Tensor,
    h2: torch.Tensor,
    s2: torch.Tensor,
    twiddles: torch.Tensor,
    radices: list[int],
) -> torch.Tensor:
    """CBP by the FFT path in one launch, for x [*L, n1] and y [*L, n2] (contiguous, the same
    leading shape) when no gradient is needed: nothing is saved. Returns [*L, D]."""
    out_dim = twiddles.numel() // 2
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    rows = x2.shape[0]
    out = x.new_empty((rows, out_dim), dtype=torch.promote_types(x.dtype, y.dtype))
    if rows:
        ws = x.new_empty(workspace_numel("forward", out_dim, rows), dtype=torch.float32)
        cbp_forward_launch(x2, y2, h1, s1, h2, s2, twiddles, out, ws, tuple(radices))
    return out.view(*x.shape[:-1], out_dim)


@triton_op("rwmn::cbp_fft_backward", mutates_args=())
def cbp_fft_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    xidx: torch.Tensor,
    yidx: torch.Tensor,
    h1: torch.Tensor,
    s1: torch.Tensor,
    h2: torch.Tensor,
    s2: torch.Tensor,
    twiddles: torch.Tensor,
    radices: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of cbp_fft's output in x and y (shaped like them), summed over the rows
    each was broadcast to."""
    lead, rows, out_dim = xidx.shape, xidx.numel(), twiddles.numel() // 2
    n1, n2 = x.shape[-1], y.shape[-1]
    # A broadcast operand's per-row gradient is summed below, so keep it in fp32 until then.
    x_bcast, y_bcast = x.numel() != rows * n1, y.numel() != rows * n2
    gx = x.new_empty((rows, n1), dtype=torch.float32 if x_bcast else x.dtype)
    gy = y.new_empty((rows, n2), dtype=torch.float32 if y_bcast else y.dtype)
    if rows:
        ws = x.new_empty(workspace_numel("backward", out_dim, rows), dtype=torch.float32)
        cbp_backward_launch(
            grad.reshape(rows, out_dim).contiguous(), xs, ys, xidx.reshape(-1),
            yidx.reshape(-1), h1, s1, h2, s2, twiddles, gx, gy, ws, tuple(radices),
            _precision(grad, x, y),
        )  # fmt: skip
    gx = gx.view(*lead, n1).sum_to_size(x.shape).to(x.dtype)
    gy = gy.view(*lead, n2).sum_to_size(y.shape).to(y.dtype)
    return gx, gy


@triton_op("rwmn::cbp_dense", mutates_args=())
def cbp_dense(
    x: torch.Tensor,
    y: torch.Tensor,
    xoff: torch.Tensor,
    yoff: torch.Tensor,
    h1: torch.Tensor,
    s1: torch.Tensor,
    h2: torch.Tensor,
    s2: torch.Tensor,
    twiddles: torch.Tensor,
) -> torch.Tensor:
    """CBP by the dense path: xoff, yoff of the broadcast leading shape L hold each row's
    element offset into x and y; twiddles = twiddle_table(D) sets D. Returns [*L, D] in
    promote(x, y)."""
    rows, out_dim = xoff.numel(), twiddles.numel() // 2
    out = x.new_empty((rows, out_dim), dtype=torch.promote_types(x.dtype, y.dtype))
    ws = x.new_empty(workspace_numel("dense_forward", out_dim, rows), dtype=torch.float32)
    if rows:
        cbp_dense_forward_launch(
            x, y, xoff.reshape(-1), yoff.reshape(-1), h1, s1, h2, s2, twiddles, out, ws
        )
    return out.view(*xoff.shape, out_dim)


@triton_op("rwmn::cbp_dense_backward", mutates_args=())
def cbp_dense_backward(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of cbp_dense in x and y, summed over the rows each was broadcast to."""
    lead, rows, out_dim = xoff.shape, xoff.numel(), grad.shape[-1]
    n1, n2 = x.shape[-1], y.shape[-1]
    x_bcast, y_bcast = x.numel() != rows * n1, y.numel() != rows * n2
    gx = x.new_empty((rows, n1), dtype=torch.float32 if x_bcast else x.dtype)
    gy = y.new_empty((rows, n2), dtype=torch.float32 if y_bcast else y.dtype)
    ws = x.new_empty(workspace_numel("dense_backward", out_dim, rows), dtype=torch.float32)
    if rows:
        cbp_dense_backward_launch(
            grad.reshape(rows, out_dim).contiguous(), x, y, xoff.reshape(-1),
            yoff.reshape(-1), h1, s1, h2, s2, twiddles, gx, gy, ws,
        )  # fmt: skip
    gx = gx.view(*lead, n1).sum_to_size(x.shape).to(x.dtype)
    gy = gy.view(*lead, n2).sum_to_size(y.shape).to(y.dtype)
    return gx, gy


@triton_op("rwmn::cbp_dense_spectra", mutates_args=())
def cbp_dense_spectra(
    x: torch.Tensor, h: torch.Tensor, s: torch.Tensor, twiddles: torch.Tensor
) -> torch.Tensor:
    """The half spectra DFT(psi(x)) [R, 2K] (fp32, [re K | im K] per row) of the rows of x
    [R, n] by the dense sketch-DFT, D = twiddles.numel() // 2. No autograd: the read
    network, its one caller, returns the memory's gradient from its own backward."""
    out_dim = twiddles.numel() // 2
    spec = torch.empty((x.shape[0], 2 * half_spectrum(out_dim)), device=x.device,
                       dtype=torch.float32)  # fmt: skip
    if x.shape[0]:
        cbp_dense_spectra_launch(x.contiguous(), h, s, twiddles, spec)
    return spec


# Explicit fake (meta) kernels. triton_op would trace the bodies above instead, but under
# TRITON_INTERPRET=1 wrap_triton hands back the interpreted kernel, which cannot run on
# fake tensors; these keep shape propagation identical on every platform.
@cbp_fft.register_fake
def _cbp_fft_fake(x, y, xidx, yidx, h1, s1, h2, s2, twiddles, radices):
    out_dim = twiddles.shape[0] // 2
    k = out_dim // 2 + 1
    out = x.new_empty((*xidx.shape, out_dim), dtype=torch.promote_types(x.dtype, y.dtype))
    xs = x.new_empty((x.numel() // x.shape[-1], 2 * k), dtype=torch.float32)
    ys = y.new_empty((y.numel() // y.shape[-1], 2 * k), dtype=torch.float32)
    return out, xs, ys


@cbp_fft_forward.register_fake
def _cbp_fft_forward_fake(x, y, h1, s1, h2, s2, twiddles, radices):
    return x.new_empty(
        (*x.shape[:-1], twiddles.shape[0] // 2), dtype=torch.promote_types(x.dtype, y.dtype)
    )


@cbp_fft_backward.register_fake
def _cbp_fft_backward_fake(grad, x, y, xs, ys, xidx, yidx, h1, s1, h2, s2, twiddles, radices):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        y, memory_format=torch.contiguous_format
    )


@cbp_dense.register_fake
def _cbp_dense_fake(x, y, xoff, yoff, h1, s1, h2, s2, twiddles):
    return x.new_empty(
        (*xoff.shape, twiddles.shape[0] // 2), dtype=torch.promote_types(x.dtype, y.dtype)
    )


@cbp_dense_spectra.register_fake
def _cbp_dense_spectra_fake(x, h, s, twiddles):
    return x.new_empty((x.shape[0], 2 * (twiddles.shape[0] // 4 + 1)), dtype=torch.float32)


@cbp_dense_backward.register_fake
def _cbp_dense_backward_fake(grad, x, y, xoff, yoff, h1, s1, h2, s2, twiddles):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        y, memory_format=torch.contiguous_format
    )


def _fft_setup_context(ctx, inputs, output) -> None:
    x, y, xidx, yidx, h1, s1, h2, s2, twiddles, radices = inputs
    _, xs, ys = output
    ctx.mark_non_differentiable(xs, ys)
    # The spectra's gradients stay None (no zero tensors filled for them).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, y, xs, ys, xidx, yidx, h1, s1, h2, s2, twiddles)
    ctx.radices = radices


def _fft_backward(ctx, grad, _grad_xs, _grad_ys):
    if grad is None:
        return (None,) * 10
    gx, gy = torch.ops.rwmn.cbp_fft_backward(grad, *ctx.saved_tensors, ctx.radices)
    return gx, gy, None, None, None, None, None, None, None, None


cbp_fft.register_autograd(_fft_backward, setup_context=_fft_setup_context)


def _dense_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _dense_backward(ctx, grad):
    gx, gy = torch.ops.rwmn.cbp_dense_backward(grad, *ctx.saved_tensors)
    return gx, gy, None, None, None, None, None, None, None


cbp_dense.register_autograd(_dense_backward, setup_context=_dense_setup_context)


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


def check_hash(name: str, h: torch.Tensor, s: torch.Tensor, n: int, out_dim: int) -> None:
    if h.shape != (n,) or s.shape != (n,):
        raise ValueError(
            f"cbp: hash {name} of shape {tuple(h.shape)} and signs of shape {tuple(s.shape)} "
            f"must both be [{n}] to match the input's last axis"
        )
    if h.dtype not in (torch.int32, torch.int64) or not s.is_floating_point():
        raise ValueError(f"cbp: hash {name} must be integer and its signs floating point")
    if not (h.is_contiguous() and s.is_contiguous()):
        raise ValueError(f"cbp: hash {name} and its signs must be contiguous")
    if n and not torch.compiler.is_compiling():
        derived((h,), ("range", out_dim), lambda: _check_range(name, h, out_dim))


def _check_range(name: str, h: torch.Tensor, out_dim: int) -> bool:
    """Raise unless every hash value is in [0, out_dim): once per version of the hash
    (kernels._common.derived), not per call."""
    message = f"cbp: hash {name} has values outside [0, {out_dim})"
    if h.is_cuda:
        # A device-side assert: reading h.min()/h.max() back would synchronise the GPU. Stream
        # order runs it before the first CBP kernel that reads the hash, and a failed device
        # assert stops the CUDA context (untested here: no GPU).
        torch._assert_async(((h >= 0) & (h < out_dim)).all(), message)
    elif int(h.min()) < 0 or int(h.max()) >= out_dim:
        raise ValueError(message)
    return True


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


def cached_twiddles(out_dim: int, device: torch.device) -> torch.Tensor:
    """twiddle_table(out_dim) on ``device``: cached in eager mode, traced under compile."""
    if torch.compiler.is_compiling():
        return twiddle_table(out_dim, device)
    return _cached_twiddle_table(out_dim, device)


def _row_indices(x: torch.Tensor, y: torch.Tensor, lead: torch.Size):
    """The x row and y row of every output row of the broadcast shape ``lead`` (int64): the
    FFT path transforms each distinct row once and indexes it, never copies it. A function
    of shapes and strides only: built once per geometry (traced under torch.compile)."""
    if torch.compiler.is_compiling():
        return _row_index_pair(x, y, lead)
    key = (tuple(lead), tuple(x.shape), x.stride(), tuple(y.shape), y.stride(), x.device)
    return _cached_row_indices(key, lambda: _row_index_pair(x, y, lead))


def _row_index_pair(x: torch.Tensor, y: torch.Tensor, lead: torch.Size):
    xidx = torch.div(row_offsets(x, lead), x.shape[-1], rounding_mode="floor")
    yidx = torch.div(row_offsets(y, lead), y.shape[-1], rounding_mode="floor")
    return xidx, yidx


_ROW_INDICES: dict = {}
#: Geometries kept (a model has a handful; tests make many).
_ROW_INDICES_KEPT = 64


def _cached_row_indices(key, make):
    if key not in _ROW_INDICES:
        if len(_ROW_INDICES) >= _ROW_INDICES_KEPT:
            _ROW_INDICES.pop(next(iter(_ROW_INDICES)))
        _ROW_INDICES[key] = make()
    return _ROW_INDICES[key]


def cbp_with_vjp(
    x: torch.Tensor,
    y: torch.Tensor,
    h1: torch.Tensor,
    s1: torch.Tensor,
    h2: torch.Tensor,
    s2: torch.Tensor,
    out_dim: int,
    *,
    factorised_min_dim: int = FACTORISED_MIN_DIM,
):
    """(out, vjp) for a caller that runs its own backward: out = CBP(x, y) [*L, D] of the
    broadcast operands by the fused kernels, and vjp(dL/dout) -> (dL/dx, dL/dy) shaped like
    x and y (summed over broadcast rows), reusing what the forward computed. No autograd:
    the fused read network recomputes its CBP this way in its backward. x and y must be in
    a fused dtype, D <= MAX_FUSED_DIM, hashes checked by the caller."""
    lead = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    x, y = x.contiguous(), y.contiguous()
    twiddles = cached_twiddles(out_dim, x.device)
    radices = fft_plan(out_dim, factorised_min_dim)
    if radices is None:
        xoff, yoff = row_offsets(x, lead), row_offsets(y, lead)
        out = torch.ops.rwmn.cbp_dense(x, y, xoff, yoff, h1, s1, h2, s2, twiddles)

        def dense_vjp(grad):
            return torch.ops.rwmn.cbp_dense_backward(
                grad.to(out.dtype).contiguous(), x, y, xoff, yoff, h1, s1, h2, s2, twiddles
            )

        return out, dense_vjp
    xidx, yidx = _row_indices(x, y, lead)
    out, xs, ys = torch.ops.rwmn.cbp_fft(x, y, xidx, yidx, h1, s1, h2, s2, twiddles, list(radices))

    def fft_vjp(grad):
        return torch.ops.rwmn.cbp_fft_backward(
            grad.to(out.dtype), x, y, xs, ys, xidx, yidx, h1, s1, h2, s2, twiddles, list(radices)
        )

    return out, fft_vjp


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

    factorised_min_dim: smallest D that takes the FFT path when it has a radix plan (see
    fft_plan); tests lower it to run the FFT path at tiny D."""
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
    check_hash("h1", h1, s1, x.shape[-1], out_dim)
    check_hash("h2", h2, s2, y.shape[-1], out_dim)
    lead = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    if y.stride(-1) != 1:
        y = y.contiguous()
    twiddles = cached_twiddles(out_dim, x.device)
    radices = fft_plan(out_dim, factorised_min_dim)
    if radices is None:
        out = torch.ops.rwmn.cbp_dense(
            x, y, row_offsets(x, lead), row_offsets(y, lead), h1, s1, h2, s2, twiddles
        )
    elif x.shape[:-1] == y.shape[:-1] == lead and not (
        torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    ):
        # No gradient and no broadcast (the story embedding: its inputs are data): one
        # launch, the spectra stay in the program's scratch.
        out = torch.ops.rwmn.cbp_fft_forward(
            x.contiguous(), y.contiguous(), h1, s1, h2, s2, twiddles, list(radices)
        )
    else:
        x, y = x.contiguous(), y.contiguous()
        xidx, yidx = _row_indices(x, y, lead)
        out, _, _ = torch.ops.rwmn.cbp_fft(
            x, y, xidx, yidx, h1, s1, h2, s2, twiddles, list(radices)
        )
    if sum_pool and out.dim() > 2:
        out = out.sum(dim=tuple(range(1, out.dim() - 1)))
    return out


__all__ = [
    "cached_twiddles",
    "cbp_dense_spectra",
    "cbp_dense_spectra_launch",
    "cbp_with_vjp",
    "check_hash",
    "cbp_dense",
    "cbp_dense_backward",
    "cbp_dense_backward_launch",
    "cbp_dense_forward_launch",
    "cbp_fft",
    "cbp_fft_backward",
    "cbp_fft_forward",
    "cbp_forward_launch",
    "cbp_product_launch",
    "cbp_spectra_launch",
    "fft_plan",
    "FACTORISED_MIN_DIM",
    "MAX_FUSED_DIM",
    "cbp",
    "cbp_backward_launch",
    "half_spectrum",
    "row_offsets",
    "inverse_hash",
    "twiddle_table",
    "workspace_numel",
]
