"""The ``@triton.jit`` functions of the CBP's dense path (the math: kernels/cbp/__init__):
the sketch-DFT, a fixed linear map contracted with twiddle tiles built in registers, for
sizes without an FFT plan, and the read network's memory spectra.

Kernel names are what the compile gate (bench/compile_report.py) and kernels.work key on;
kernels.cbp.ops reads them from this module at launch time.

May import: triton, kernels.cbp.kernels (tests/test_gpu_semantics.py copies this source to
plant bugs).
"""

import triton
import triton.language as tl

from kernels.cbp.kernels import _dot_operand, twiddle


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
        cos, sin = twiddle(h, ks, tab_ptr, D)
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
        cos, sin = twiddle(ks, a, tab_ptr, D)
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
