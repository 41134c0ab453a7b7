"""The ``@triton.jit`` functions of compact bilinear pooling's FFT path (the math:
kernels/cbp/__init__); the dense path's are in kernels/cbp/dense.py.

Kernel names are what the compile gate (bench/compile_report.py) and kernels.work key on;
kernels.cbp.ops reads them from this module at launch time. ``twiddle`` is public: the read
network's kernels (kernels/read_network.py) build their twiddle tiles with it.

May import: triton only (tests/test_gpu_semantics.py copies this source to plant bugs).
"""

import triton
import triton.language as tl

# --------------------------------------------------------------------------------------
# Shared by the FFT and the dense path (kernels/cbp/dense.py)
# --------------------------------------------------------------------------------------


@triton.jit
def _dot_operand(v, PRECISION: tl.constexpr):
    """v as an fp32 tl.dot operand at PRECISION. A "tf32" product truncates the operand to
    10 mantissa bits, which biases the transforms; rounding v to the nearest tf32 first (as
    PTX cvt.rna.tf32.f32, in integers so the interpreter runs it too) removes the bias."""
    if PRECISION == "tf32":
        bits = v.to(tl.uint32, bitcast=True)
        v = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return v


@triton.jit
def twiddle(a, b, tab_ptr, D: tl.constexpr):
    """cos and sin of 2 pi (a b mod D) / D for int32 vectors a [A] and b [B] -> [A, B].

    The phase index is reduced mod D in integers (exact for every fused D: a b < 2^31), then
    looked up in the launcher's table of correctly rounded cos/sin of 2 pi p / D. With D a
    constexpr the mod is a multiply-shift, and the lookup (an L1-resident gather of at most
    2 x 16384 fp32) replaces tens of instructions of accurate cosf/sinf per element.
    """
    ph = (a[:, None] * b[None, :]) % D
    return tl.load(tab_ptr + ph), tl.load(tab_ptr + D + ph)


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
    im_ok,
):
    """One radix-R Stockham stage of a length-D complex DFT (module doc), src -> dst, both
    planar (re at [0, D), im at [D, 2N)); SIGN = -1 forward, +1 inverse (unscaled). dst is
    written in its own dtype, its im half only where im_ok.

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
        out_ty = dst.dtype.element_ty
        tl.store(dst + dst_idx, (t1 - t2).to(out_ty), mask=m)
        tl.store(dst + D + dst_idx, (t3 - t1 - t2).to(out_ty), mask=tl.where(im_ok, m, False))


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
    if STAGES % 2 == 1:
        _fft_into(a, b, b, 0, True, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4, STAGES, BLOCK_J,
                  SIGN, PRECISION)  # fmt: skip
        return b, a
    else:
        _fft_into(a, b, a, 0, True, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4, STAGES, BLOCK_J,
                  SIGN, PRECISION)  # fmt: skip
        return a, b


@triton.jit
def _fft_into(
    a,
    b,
    out_ptr,
    out_row,
    im_ok,
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
    """_fft with the last stage writing out = out_ptr + out_row D (re at out[0, D), im at
    out[D, 2D) where im_ok, in out's dtype): an inverse whose real and imaginary parts are
    two output rows stores them there, with no scratch round trip and no copy. The stages
    before ping-pong between a (the input) and b. Ends with a barrier."""
    if STAGES == 1:
        out = out_ptr + tl.cast(out_row, tl.int64) * D
        _fft_stage(a, out, tab_ptr, D, R1, 1, P1, BLOCK_J, SIGN, PRECISION, im_ok)
    else:
        _fft_stage(a, b, tab_ptr, D, R1, 1, P1, BLOCK_J, SIGN, PRECISION, True)
        tl.debug_barrier()  # the next stage reads what other threads of the program wrote
        if STAGES == 2:
            out = out_ptr + tl.cast(out_row, tl.int64) * D
            _fft_stage(b, out, tab_ptr, D, R2, R1, P2, BLOCK_J, SIGN, PRECISION, im_ok)
        else:
            _fft_stage(b, a, tab_ptr, D, R2, R1, P2, BLOCK_J, SIGN, PRECISION, True)
            tl.debug_barrier()
            if STAGES == 3:
                out = out_ptr + tl.cast(out_row, tl.int64) * D
                _fft_stage(a, out, tab_ptr, D, R3, R1 * R2, P3, BLOCK_J, SIGN, PRECISION, im_ok)
            else:
                _fft_stage(a, b, tab_ptr, D, R3, R1 * R2, P3, BLOCK_J, SIGN, PRECISION, True)
                tl.debug_barrier()
                out = out_ptr + tl.cast(out_row, tl.int64) * D
                _fft_stage(b, out, tab_ptr, D, R4, R1 * R2 * R3, P4, BLOCK_J, SIGN, PRECISION,
                           im_ok)  # fmt: skip
    tl.debug_barrier()  # the caller reads what the last stage's threads wrote


@triton.jit
def _sketch_row(
    src_ptr, order_ptr, start_ptr, sign_ptr, dst_ptr, valid, scale, D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """dst[j] = scale sum_{i: h(i) = j} s(i) src[i] for j < D (zeros where not valid): the count
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
        tl.store(dst_ptr + js, acc * scale, mask=jm)


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
    _sketch_row(row, order_ptr, start_ptr, sign_ptr, ws, r0 < R, 1.0, D, BLOCK_S)
    _sketch_row(row + n, order_ptr, start_ptr, sign_ptr, ws + D, has_b, 1.0, D, BLOCK_S)
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
        # Rows a and b are out's rows ra, ra + 1: the inverse's last stage writes them. Its
        # closing barrier keeps the next pair from overwriting buffers still being read.
        _fft_into(ws, ws + 2 * D, out_ptr, ra, has_b, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4,
                  STAGES, BLOCK_J, 1, PRECISION)  # fmt: skip


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
def _sketch_pair(
    x_ptr, y_ptr, xn_ptr, yn_ptr, r, order1_ptr, start1_ptr, sign1_ptr, order2_ptr,
    start2_ptr, sign2_ptr, dst_ptr, valid, N1, N2, D: tl.constexpr, BLOCK_S: tl.constexpr,
    NORMALIZE: tl.constexpr,
):  # fmt: skip
    """The sketches of row r of x and of y into dst [2D] (Re, Im of one complex FFT input),
    with NORMALIZE each scaled by its row's inverse norm (xn, yn)."""
    sx = 1.0
    sy = 1.0
    if NORMALIZE:
        sx = tl.load(xn_ptr + r, mask=valid, other=1.0)
        sy = tl.load(yn_ptr + r, mask=valid, other=1.0)
    r64 = tl.cast(r, tl.int64)
    _sketch_row(x_ptr + r64 * N1, order1_ptr, start1_ptr, sign1_ptr, dst_ptr, valid, sx, D,
                BLOCK_S)  # fmt: skip
    _sketch_row(y_ptr + r64 * N2, order2_ptr, start2_ptr, sign2_ptr, dst_ptr + D, valid, sy, D,
                BLOCK_S)  # fmt: skip


@triton.jit
def _cbp_fwd_kernel(
    x_ptr,
    y_ptr,
    xn_ptr,
    yn_ptr,
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
    NORMALIZE: tl.constexpr,
):
    """Forward only, unbroadcast rows (x [R, N1], y [R, N2]): out[r] = IDFT(P_r Q_r) in one
    launch with nothing saved. Per row one complex FFT of p_r + i q_r gives P_r and Q_r; two
    rows' products travel as one inverse FFT (out_a = Re, out_b = Im). The same transforms
    as the spectra + product launches, without writing the spectra to device memory and
    reading them back. Scratch per program: three complex D-vectors. With NORMALIZE the
    CBP of the unit-normalised rows: the sketch is linear, so each is scaled by its row's
    inverse norm (eps + |x_r|^2)^-1/2 (xn, yn: kernels.unit_norm.row_norms) as it is
    written."""
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * (6 * D)
    first = pid * PAIRS_PER_PROGRAM
    for pair in range(first, tl.minimum(first + PAIRS_PER_PROGRAM, tl.cdiv(R, 2))):
        ra = 2 * pair
        has_b = ra + 1 < R
        # With NORMALIZE each sketch is scaled by its row's inverse norm as it is written:
        # x and y of a row travel as one complex FFT, so they must be of one magnitude.
        _sketch_pair(x_ptr, y_ptr, xn_ptr, yn_ptr, ra, order1_ptr, start1_ptr, sign1_ptr,
                     order2_ptr, start2_ptr, sign2_ptr, ws, ra < R, N1, N2, D, BLOCK_S,
                     NORMALIZE)  # fmt: skip
        tl.debug_barrier()  # the FFT reads sketch bins written by other threads
        za, free = _fft(ws, ws + 2 * D, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4, STAGES,
                        BLOCK_J, -1, PRECISION)  # fmt: skip
        _sketch_pair(x_ptr, y_ptr, xn_ptr, yn_ptr, ra + 1, order1_ptr, start1_ptr, sign1_ptr,
                     order2_ptr, start2_ptr, sign2_ptr, free, has_b, N1, N2, D, BLOCK_S,
                     NORMALIZE)  # fmt: skip
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
        # P_a Q_a is consumed: its buffer is the inverse's ping-pong partner. Its last stage
        # writes out's rows ra (re) and ra + 1 (im), and its closing barrier keeps the next
        # pair from overwriting buffers still being read; except in fp32 ("ieee"), whose
        # build then spills (ptxas keeps the extra row pointer of the stage's j loop on the
        # stack, 72 B on sm_80): there the inverse stays in scratch and the rows are copied.
        if PRECISION == "ieee":
            z, _ = _fft(spare, za, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3, P4, STAGES, BLOCK_J,
                        1, PRECISION)  # fmt: skip
            out_a = out_ptr + tl.cast(ra, tl.int64) * D
            for j0 in range(0, D, BLOCK_S):
                j = j0 + tl.arange(0, BLOCK_S)
                jm = j < D
                jb = tl.where(has_b, jm, False)
                out_ty = out_ptr.dtype.element_ty
                tl.store(out_a + j, tl.load(z + j, mask=jm).to(out_ty), mask=jm)
                tl.store(out_a + D + j, tl.load(z + D + j, mask=jb).to(out_ty), mask=jb)
            tl.debug_barrier()
        else:
            _fft_into(spare, za, out_ptr, ra, has_b, tab_ptr, D, R1, R2, R3, R4, P1, P2, P3,
                      P4, STAGES, BLOCK_J, 1, PRECISION)  # fmt: skip


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
