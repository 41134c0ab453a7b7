"""What every kernel launch executes: multiply-adds and global-memory bytes.

The one cost model of the fused kernels. :func:`launch_work` turns a launch recorded by
``kernels._common.record_launches`` (kernel, runtime arguments, LaunchConfig) into a
:class:`Work` computed from the kernel's own grid, tiles and loop trips, so a change of
tiles or loops in a launcher changes the count with it; :func:`executed_work` records
what a call launches and sums it. ``bench.census`` adds the non-Triton launches of a
training step, and ``bench.cases`` the executed columns of the op tables.

Conventions (every formula below follows them):

* ``macs``: multiply-adds of the products the kernel issues, tile padding included: a
  ``tl.dot`` of [M, K] x [K, N] is M K N whatever its masks; Gauss's complex product is
  three real dots; a matrix-vector product done on CUDA cores as a broadcast multiply and
  a sum (the read's question spectrum) counts its tile the same way. Other elementwise
  work (norms, softmax, twiddle rotations, spectrum products) is not counted: it is a few
  operations per byte moved and shows up in ``bytes``.
* ``bytes``: bytes that load and store instructions move to and from global memory
  (device memory through L2), scratch included, counted per instruction over its
  in-bounds lanes: a scratch vector stored by one FFT stage and loaded by the next counts
  twice. A gather that reads the same elements in many lanes of one instruction (a
  Toeplitz tile gathered from one kernel row, a twiddle tile from its table) counts the
  distinct elements it touches. Small read-only tables loaded once per program (DFT
  matrices of a stage, the inverse hash) count at their size per load.

Everything here is a pure function of shapes, dtypes and the launch configuration.

May import: torch, kernels._common.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from kernels._common import KernelLaunch, record_launches

F32 = 4
I32 = 4


@dataclass(frozen=True)
class Work:
    """Multiply-adds and global-memory bytes of one or more launches."""

    macs: int = 0
    bytes: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(self.macs + other.macs, self.bytes + other.bytes)

    def __mul__(self, times: int) -> Work:
        return Work(self.macs * times, self.bytes * times)

    __rmul__ = __mul__

    @property
    def flops(self) -> int:
        return 2 * self.macs


def total(works: Iterable[Work]) -> Work:
    out = Work()
    for w in works:
        out = out + w
    return out


def _esize(t) -> int:
    return t.element_size() if isinstance(t, torch.Tensor) else F32


def _valid(start: int, block: int, limit: int) -> int:
    """In-bounds lanes of a block of ``block`` starting at ``start`` below ``limit``."""
    return max(0, min(block, limit - start))


def _args(launch: KernelLaunch) -> dict:
    names = launch.kernel.arg_names
    values = dict(zip(names, launch.args, strict=False))
    values.update(launch.config.constexprs)
    return values


_FORMULAS: dict[str, Callable[[dict, tuple], Work]] = {}


def _formula(*names: str):
    def register(fn):
        for name in names:
            _FORMULAS[name] = fn
        return fn

    return register


def launch_work(launch: KernelLaunch) -> Work:
    """The multiply-adds and bytes of one recorded launch."""
    try:
        formula = _FORMULAS[launch.name]
    except KeyError as exc:
        raise KeyError(f"kernels.work: no cost formula for kernel {launch.name}") from exc
    return formula(_args(launch), launch.config.grid)


def executed_work(fn: Callable, *args, **kwargs) -> tuple[Work, list[KernelLaunch]]:
    """Run ``fn(*args, **kwargs)`` with its launches recorded (not run: outputs stay
    unwritten) and return their summed Work and the launches."""
    with record_launches() as launches:
        fn(*args, **kwargs)
    return total(launch_work(x) for x in launches), launches


# --------------------------------------------------------------------------------------
# Memory convolutions (kernels/memconv.py) and the conv tile they share
# --------------------------------------------------------------------------------------


def _toeplitz_tile(
    a: dict, i0: int, j_first: int, block_j: int, esize: int, wsize: int, taps: int | None = None
) -> Work:
    """_toeplitz_conv_tile for the rows at i0 and the columns from j_first (x elements of
    esize bytes, kernel elements of wsize) over ``taps`` kernel rows (default all)."""
    bi, bk, d = a["BLOCK_I"], a["BLOCK_K"], a["D"]
    left = a["PAD_LEFT"]
    lo = (max(j_first - left, 0) // bk) * bk
    hi = min(j_first + block_j - 1 - left + d, d)
    taps = a["C_IN"] * a["K"] if taps is None else taps
    rows = _valid(i0, bi, a["M_ROWS"])
    macs = bytes_ = 0
    for jp in range(lo, hi, bk):
        macs += bi * bk * block_j
        # x tile, and the Toeplitz tile gathered from one kernel row (its distinct taps).
        bytes_ += rows * _valid(jp, bk, d) * esize + min(bk + block_j - 1, d) * wsize
    return Work(macs * taps, bytes_ * taps)


@_formula("_memconv_fwd_kernel")
def _memconv_fwd(a, grid) -> Work:
    n_out, n_i, n_js = grid
    n_j = a["N_J"]
    splits, per_split, taps = n_js // n_j, a["TAPS_PER_SPLIT"], a["C_IN"] * a["K"]
    bi, bj, d = a["BLOCK_I"], a["BLOCK_J"], a["D"]
    esize, wsize = _esize(a["x_ptr"]), _esize(a["w_ptr"])
    out = Work()
    for pi in range(n_i):
        for pj in range(n_j):
            rows, cols = _valid(pi * bi, bi, a["M_ROWS"]), _valid(pj * bj, bj, d)
            for s in range(splits):
                part = _valid(s * per_split, per_split, taps)
                out = out + _toeplitz_tile(a, pi * bi, pj * bj, bj, esize, wsize, part)
            out = out + Work(0, rows * cols * _esize(a["out_ptr"]))
            if splits > 1:
                # Each split's fp32 partial tile out, then all of them in for the last.
                out = out + Work(0, 2 * splits * bi * bj * F32 + _arrivals(splits))
    return out * n_out


@_formula("_memconv_dx_kernel")
def _memconv_dx(a, grid) -> Work:
    n_bc, n_r, n_j = grid
    bq, bj, bk, d = a["BLOCK_Q"], a["BLOCK_J"], a["BLOCK_K"], a["D"]
    stride, k, left = a["STRIDE"], a["K"], a["PAD_LEFT"]
    n, blocks = a["N_ROWS"], a["N_PHASE_BLOCKS"]
    esize, wsize = _esize(a["g_ptr"]), _esize(a["w_ptr"])
    # Under RELU every gradient element read comes with the output element of its mask.
    gsize = esize + (_esize(a["out_ptr"]) if a["RELU"] else 0)
    macs = bytes_ = 0
    for pr in range(n_r):
        rho, qb = pr // blocks, pr % blocks
        rows = sum(1 for q in range(qb * bq, qb * bq + bq) if q * stride + rho < n)
        a0 = (rho + a["PAD_TOP"]) % stride
        n_taps = max(0, -(-(k - a0) // stride))
        for pj in range(n_j):
            first = pj * bj
            lo = (max(first + left - d + 1, 0) // bk) * bk
            hi = min(first + bj + left, d)
            trips = max(0, -(-(hi - lo) // bk))
            cols = _valid(first, bj, d)
            per_tap = trips * (rows * bk * gsize + min(bk + bj - 1, d) * wsize)
            macs += a["C_OUT"] * n_taps * trips * bq * bk * bj
            bytes_ += a["C_OUT"] * n_taps * per_tap + rows * cols * esize
    return Work(macs, bytes_) * n_bc


@_formula("_memconv_dw_kernel")
def _memconv_dw(a, grid) -> Work:
    _, n_f, splits = grid
    bo, bf, bj, d = a["BLOCK_O"], a["BLOCK_F"], a["BLOCK_J"], a["D"]
    shifts, c_out = a["SHIFTS"], a["C_OUT"]
    f = a["C_IN"] * a["K"] * -(-d // shifts)
    rows_total = a["N_BATCH"] * a["M_ROWS"]
    per_program = a["ROWS_PER_PROGRAM"]
    esize = _esize(a["x_ptr"])
    gsize = _esize(a["g_ptr"]) + (_esize(a["out_ptr"]) if a["RELU"] else 0)
    macs = bytes_ = 0
    for s in range(splits):
        rows = _valid(s * per_program, per_program, rows_total)
        bytes_ += c_out * F32  # this split's dbias partials
        for pf in range(n_f):
            cols = _valid(pf * bf, bf, f)
            for j0 in range(0, d + shifts - 1, bj):
                jv = _valid(j0, bj, d + shifts - 1)
                macs += rows * bf * bj * bo
                # g rows of every channel over the shifted window, and the Hankel tile
                # gathered from x's rows (taps SHIFTS apart).
                g_bytes = c_out * min(jv + shifts - 1, d) * gsize
                bytes_ += rows * (g_bytes + min(cols * shifts + jv - 1, d) * esize)
            bytes_ += cols * min(bo, shifts * c_out) * F32
    # The last split of each column tile: every split's partials in, dw (and dbias) out.
    wsize = _esize(a["dw_ptr"])
    for pf in range(n_f):
        tile = _valid(pf * bf, bf, f) * min(bo, shifts * c_out) + (c_out if pf == 0 else 0)
        bytes_ += tile * (splits * F32 + wsize)
    return Work(macs, bytes_ + _arrivals(n_f * splits))


# --------------------------------------------------------------------------------------
# Attention (kernels/attention.py) and the one-launch read (kernels/read_network.py)
# --------------------------------------------------------------------------------------


def _arrivals(programs: int) -> int:
    """Bytes of the arrival counters (kernels._common.last_to_arrive): one read-modify-write
    of an int32 a program."""
    return programs * 2 * I32


def _merge(a: dict, n_b: int, n_blocks: int, r: int, d: int) -> Work:
    """The block merge of each question by its last block (attention.merge_if_last): block
    maxima, sums and readouts in; o, lse out; z in and p out."""
    eo = _esize(a["o_ptr"])
    per_question = 2 * n_blocks * F32 + n_blocks * d * F32 + d * eo + F32 + r * (F32 + eo)
    return Work(0, n_b * per_question + _arrivals(n_b * n_blocks))


def _row_sums(n_b: int, n_blocks: int, d: int, esize: int) -> int:
    """Bytes of the du partials summed by each question's last block (_common.sum_rows)."""
    return n_b * (n_blocks * d * F32 + d * esize) + _arrivals(n_b * n_blocks)


def _readout_epilogue(rows: int, d: int, esize_u: int) -> int:
    """Bytes of the softmax partials of one row block: u, z, block max and sum, readout."""
    return d * esize_u + rows * F32 + 2 * F32 + d * F32


@_formula("_attn_fwd_kernel")
def _attn_fwd(a, grid) -> Work:
    n_b, n_blocks = grid
    br, d, r = a["BLOCK_R"], a["D"], a["R"]
    esize = _esize(a["rows_ptr"])
    bytes_ = sum(
        _valid(blk * br, br, r) * d * esize + _readout_epilogue(_valid(blk * br, br, r), d, 4)
        for blk in range(n_blocks)
    )
    return Work(0, bytes_ * n_b) + _merge(a, n_b, n_blocks, r, d)


@_formula("_attn_bwd_kernel")
def _attn_bwd(a, grid) -> Work:
    n_b, n_blocks = grid
    br, d, r = a["BLOCK_R"], a["D"], a["R"]
    questions = a["B"] if a["SHARED"] else 1
    esize = _esize(a["rows_ptr"])
    bytes_ = 0
    for blk in range(n_blocks):
        rows = _valid(blk * br, br, r)
        # rows in, drows out; per question u, go, lse in, du partial out, and the delta.
        bytes_ += 2 * rows * d * esize
        bytes_ += questions * (2 * d * esize + F32 + d * F32 + _delta_bytes(a, r, d))
        if a["HAS_GP"]:
            bytes_ += questions * rows * _esize(a["gp_ptr"])
    sums = 0 if a["SHARED"] else _row_sums(n_b, n_blocks, d, _esize(a["du_ptr"]))
    return Work(0, bytes_ * n_b + sums)


def _delta_bytes(a: dict, r: int, d: int) -> int:
    """_question_delta: o, and p and gp when the weights have a gradient."""
    out = d * _esize(a["o_ptr"])
    if a["HAS_GP"]:
        out += r * (_esize(a["p_ptr"]) + _esize(a["gp_ptr"]))
    return out


def _conv_attention(a, grid, backward: bool) -> Work:
    n_b, n_blocks = grid
    bi, bd, d = a["BLOCK_I"], a["BLOCK_D"], a["D"]
    n_i = a["N_I_BLOCKS"]
    esize = _esize(a["x_ptr"])
    out = Work()
    for blk in range(n_i):
        rows = _valid(blk * bi, bi, a["M_ROWS"])
        tile = _toeplitz_tile(a, blk * bi, 0, bd, esize, _esize(a["w_ptr"]))
        if backward:
            # u, go, gp, lse in, the delta; dL/dy and the du partial out.
            extra = 2 * d * esize + rows * esize + F32 + rows * d * esize + d * F32
            extra += _delta_bytes(a, a["C_OUT"] * a["M_ROWS"], d)
        else:
            extra = _readout_epilogue(rows, d, esize)
        out = out + tile + Work(0, extra)
    out = out * (n_b * (n_blocks // n_i))
    if backward:
        return out
    return out + _merge(a, n_b, n_blocks, a["C_OUT"] * a["M_ROWS"], d)


@_formula("_conv_attn_fwd_kernel")
def _conv_attn_fwd(a, grid) -> Work:
    return _conv_attention(a, grid, backward=False)


@_formula("_conv_attn_bwd_kernel")
def _conv_attn_bwd(a, grid) -> Work:
    return _conv_attention(a, grid, backward=True)


def _spectral_rows(a, rows: int) -> Work:
    """_spectral_conv_rows of one program: question spectrum, [Re P | Im P] x G."""
    bi, bk, bn = a["BLOCK_I"], a["BLOCK_K"], a["BLOCK_N"]
    bd = a["BLOCK_D1"] + a["BLOCK_D2"]
    k, d = a["K"], a["D"]
    taps = a["C_IN"] * a["KH"]
    esize_g = _esize(a["g_ptr"])
    macs = bytes_ = 0
    for k0 in range(0, k, bk):
        bins = _valid(k0, bk, k)
        # The question's spectrum chunk on CUDA cores: u, s, h and two twiddle gathers.
        for n0 in range(0, d, bn):
            nv = _valid(n0, bn, d)
            macs += 2 * bn * 2 * bk
            bytes_ += nv * (_esize(a["u_ptr"]) + F32 + 8) + 2 * min(nv * 2 * bk, d) * F32
        macs += taps * bi * 2 * bk * bd
        bytes_ += taps * (rows * 2 * bins * F32 + 2 * bins * d * esize_g)
    return Work(macs, bytes_)


def _spectral_read(a, grid, epilogue: Callable[[int], int]) -> Work:
    """The read kernels: per program the spectral rows and ``epilogue(rows)`` bytes."""
    n_b, n_blocks = grid
    n_i, bi = a["N_I_BLOCKS"], a["BLOCK_I"]
    out = Work()
    for blk in range(n_i):
        rows = _valid(blk * bi, bi, a["M_ROWS"])
        out = out + _spectral_rows(a, rows) + Work(0, epilogue(rows))
    return out * (n_b * (n_blocks // n_i))


@_formula("_read_fwd_kernel")
def _read_fwd(a, grid) -> Work:
    # The readout's partials, the stored read memory Mr, and the merge.
    d, esize = a["D"], _esize(a["mr_ptr"])
    rows = _spectral_read(a, grid, lambda rows: _readout_epilogue(rows, d, 4) + rows * d * esize)
    return rows + _merge(a, grid[0], grid[1], a["C_OUT"] * a["M_ROWS"], d)


@_formula("_read_conv_fwd_kernel")
def _read_conv_fwd(a, grid) -> Work:
    d, esize = a["D"], _esize(a["out_ptr"])
    return _spectral_read(a, grid, lambda rows: rows * d * esize)


# --------------------------------------------------------------------------------------
# Compact bilinear pooling (kernels/cbp/): dense path
# --------------------------------------------------------------------------------------


def _sketch_dft(a, rows: int, n: int, esize: int) -> Work:
    """_sketch_dft over n inputs for one chunk of BLOCK_K bins."""
    br, bk, bn = a["BLOCK_R"], a["BLOCK_K"], a["BLOCK_N"]
    macs = bytes_ = 0
    for n0 in range(0, n, bn):
        nv = _valid(n0, bn, n)
        macs += 2 * br * bn * bk
        bytes_ += rows * nv * esize + nv * (8 + F32) + 2 * min(nv * bk, a["D"]) * F32
    return Work(macs, bytes_)


def _inverse_tile(a, rows: int, cols: int) -> Work:
    """_inverse_tile: the weighted spectrum [rows, 2K] and cos/sin tiles, two dots per chunk."""
    br, bk, k = a["BLOCK_R"], a["BLOCK_K"], a["K"]
    macs = bytes_ = 0
    for k0 in range(0, k, bk):
        bins = _valid(k0, bk, k)
        macs += 2 * br * bk * cols
        bytes_ += 2 * rows * bins * F32 + 2 * min(bins * cols, a["D"]) * F32
    return Work(macs, bytes_)


def _row_blocks(a, grid):
    br, r = a["BLOCK_R"], a["R"]
    return [_valid(p * br, br, r) for p in range(grid[0])]


@_formula("_cbp_dense_fwd_kernel")
def _cbp_dense_fwd(a, grid) -> Work:
    k, d, bk, bj = a["K"], a["D"], a["BLOCK_K"], a["BLOCK_J"]
    ex, ey = _esize(a["x_ptr"]), _esize(a["y_ptr"])
    eo = _esize(a["out_ptr"])
    out = Work()
    for rows in _row_blocks(a, grid):
        for k0 in range(0, k, bk):
            out = out + _sketch_dft(a, rows, a["N1"], ex) + _sketch_dft(a, rows, a["N2"], ey)
            out = out + Work(0, 2 * rows * _valid(k0, bk, k) * F32)
        for j0 in range(0, d, bj):
            out = out + _inverse_tile(a, rows, bj) + Work(0, rows * _valid(j0, bj, d) * eo)
    return out


@_formula("_cbp_dense_bwd_kernel")
def _cbp_dense_bwd(a, grid) -> Work:
    k, d, bk, bn = a["K"], a["D"], a["BLOCK_K"], a["BLOCK_N"]
    eg, ex, ey = _esize(a["g_ptr"]), _esize(a["x_ptr"]), _esize(a["y_ptr"])
    out = Work()
    for rows in _row_blocks(a, grid):
        for k0 in range(0, k, bk):
            out = out + _sketch_dft(a, rows, d, eg) + _sketch_dft(a, rows, a["N1"], ex)
            out = out + _sketch_dft(a, rows, a["N2"], ey)
            out = out + Work(0, 4 * rows * _valid(k0, bk, k) * F32)
        for n, e in ((a["N1"], _esize(a["gx_ptr"])), (a["N2"], _esize(a["gy_ptr"]))):
            for n0 in range(0, n, bn):
                nv = _valid(n0, bn, n)
                out = out + _inverse_tile(a, rows, bn) + Work(0, rows * nv * e + nv * (8 + F32))
    return out


@_formula("_cbp_dense_spectra_kernel")
def _cbp_dense_spectra(a, grid) -> Work:
    k, bk = a["K"], a["BLOCK_K"]
    e = _esize(a["src_ptr"])
    out = Work()
    for rows in _row_blocks(a, grid):
        for k0 in range(0, k, bk):
            out = (
                out + _sketch_dft(a, rows, a["N"], e) + Work(0, 2 * rows * _valid(k0, bk, k) * F32)
            )
    return out


# --------------------------------------------------------------------------------------
# Compact bilinear pooling: FFT path
# --------------------------------------------------------------------------------------


def fft_work(a, out_esize: int = F32) -> Work:
    """One complex FFT of _fft (all its Stockham stages) from the launch's constexprs; with
    ``out_esize`` the last stage writes elements of that size (_fft_into's output rows)."""
    d, bj = a["D"], a["BLOCK_J"]
    macs = bytes_ = 0
    ns = 1
    for i in range(1, a["STAGES"] + 1):
        r, p = a[f"R{i}"], a[f"P{i}"]
        j = d // r
        tiles = -(-j // bj)
        macs += 3 * tiles * bj * p * p
        # The stage's DFT matrix, its input and output vectors (re, im), the twiddles.
        out = 2 * d * (out_esize if i == a["STAGES"] else F32)
        bytes_ += 2 * p * p * F32 + 2 * d * F32 + out + (2 * d * F32 if ns > 1 else 0)
        ns *= r
    return Work(macs, bytes_)


def _sketch_bytes(n: int, d: int, esize: int) -> int:
    """_sketch_row: the CSR bounds, each input once with its order and sign, the bins out."""
    return 2 * d * I32 + n * (esize + I32 + F32) + d * F32


def _gather_bytes(n: int, esize: int) -> int:
    """_gather_row: h, s and the gathered bin per input, the gradient out."""
    return n * (8 + F32 + F32 + esize)


def _pairs(a, grid) -> int:
    return -(-a["R"] // 2)


@_formula("_cbp_spectra_kernel")
def _cbp_spectra(a, grid) -> Work:
    d, k = a["D"], a["K"]
    per_pair = fft_work(a) + Work(
        0, 2 * _sketch_bytes(a["N_IN"], d, _esize(a["src_ptr"])) + 4 * k * F32 + 4 * k * F32
    )
    return per_pair * _pairs(a, grid)


@_formula("_cbp_product_kernel")
def _cbp_product(a, grid) -> Work:
    d = a["D"]
    # Both rows' P and Q at every bin in, the packed product out; the inverse, whose last
    # stage writes the two output rows.
    per_pair = fft_work(a, _esize(a["out_ptr"])) + Work(0, 8 * d * F32 + 2 * d * F32)
    return per_pair * _pairs(a, grid)


@_formula("_broadcast_sums_kernel")
def _broadcast_sums(a, grid) -> Work:
    # Each output row: its RED fp32 rows in (and the addend), the row out.
    def rows(red, out_rows, n, g, out, add):
        return out_rows * n * (red * _esize(g) + _esize(out) + (0 if add is None else _esize(add)))

    rows_x = a["ROWS_X"]
    rows_y = grid[0] - rows_x
    add = a["add_ptr"] if a["HAS_ADD"] else None
    return Work(
        0,
        rows(a["RED_X"], rows_x, a["N_X"], a["gx_ptr"], a["ox_ptr"], None)
        + rows(a["RED_Y"], rows_y, a["N_Y"], a["gy_ptr"], a["oy_ptr"], add),
    )


@_formula("_cbp_fwd_kernel")
def _cbp_fwd(a, grid) -> Work:
    d = a["D"]
    ex, ey, eo = _esize(a["x_ptr"]), _esize(a["y_ptr"]), _esize(a["out_ptr"])
    sketches = 2 * (_sketch_bytes(a["N1"], d, ex) + _sketch_bytes(a["N2"], d, ey))
    products = 8 * d * F32 + 2 * d * F32
    # With NORMALIZE the two rows' inverse norms of x and of y.
    norms = 4 * F32 if a["NORMALIZE"] else 0
    # Two forward FFTs, then the inverse, whose last stage writes the two output rows (in
    # fp32 the inverse stays in scratch and the rows are copied out).
    if a["PRECISION"] == "ieee":
        ffts = fft_work(a) * 3 + Work(0, 2 * d * F32 + 2 * d * eo)
    else:
        ffts = fft_work(a) * 2 + fft_work(a, eo)
    return (ffts + Work(0, sketches + products + norms)) * _pairs(a, grid)


@_formula("_cbp_bwd_kernel")
def _cbp_bwd(a, grid) -> Work:
    d = a["D"]
    eg = _esize(a["g_ptr"])
    grads_in = 2 * d * eg + 2 * d * F32
    correlations = 2 * 8 * d * F32 + 4 * d * F32
    gathers = 2 * (_gather_bytes(a["N1"], _esize(a["gx_ptr"])))
    gathers += 2 * (_gather_bytes(a["N2"], _esize(a["gy_ptr"])))
    return (fft_work(a) * 3 + Work(0, grads_in + correlations + gathers)) * _pairs(a, grid)


# --------------------------------------------------------------------------------------
# Unit normalisation (kernels/unit_norm.py)
# --------------------------------------------------------------------------------------


@_formula("_unit_norm_fwd_kernel")
def _unit_norm_fwd(a, grid) -> Work:
    return Work(0, 2 * a["R"] * a["D"] * _esize(a["x_ptr"]))


@_formula("_unit_norm_bwd_kernel")
def _unit_norm_bwd(a, grid) -> Work:
    sizes = _esize(a["x_ptr"]) + _esize(a["g_ptr"]) + _esize(a["dx_ptr"])
    return Work(0, a["R"] * a["D"] * sizes)


# --------------------------------------------------------------------------------------
# The embedding (kernels/embedding.py)
# --------------------------------------------------------------------------------------


@_formula("_row_norms_kernel")
def _row_norms(a, grid) -> Work:
    return Work(0, a["R"] * (a["K"] * _esize(a["x_ptr"]) + F32))


@_formula("_embed_fwd_kernel")
def _embed_fwd(a, grid) -> Work:
    """Per [BLOCK_M, BLOCK_N] tile: the x rows and W rows over K, the padded tile's
    products; z (fp32) out, the norms in (or written once)."""
    n_m, n_n = grid
    rows, k, n = a["R"], a["K"], a["N"]
    bm, bk, bn = a["BLOCK_M"], a["BLOCK_K"], a["BLOCK_N"]
    macs = n_m * n_n * bm * bn * -(-k // bk) * bk
    x_bytes = n_n * rows * k * _esize(a["x_ptr"])
    w_bytes = n_m * n * k * _esize(a["w_ptr"])
    return Work(macs, x_bytes + w_bytes + rows * n * F32 + rows * F32)


@_formula("_embed_dw_kernel")
def _embed_dw(a, grid) -> Work:
    """Every dW tile reduces over all rows: dz and x tiles (and the norms) per program."""
    n_n, n_k = grid
    rows, k, n = a["R"], a["K"], a["N"]
    bn, bk, br = a["BLOCK_WN"], a["BLOCK_WK"], a["BLOCK_R"]
    padded_rows = -(-rows // br) * br
    macs = n_n * n_k * bn * bk * padded_rows
    reads = n_k * rows * n * _esize(a["dz_ptr"]) + n_n * rows * (k * _esize(a["x_ptr"]) + F32)
    return Work(macs, reads + n * k * _esize(a["dw_ptr"]) + n * _esize(a["db_ptr"]))


@_formula("_spectral_weights_kernel")
def _spectral_weights(a, grid) -> Work:
    """Per (row, bin): the prefix products w e^{i theta} (2 real MACs per tap) and, per
    output column, the rotation by e^{i phi} (4); the row in, G's Re and Im rows out (the
    float64 sines and cosines are not multiply-adds and are not counted)."""
    rows, _ = grid
    d, k = a["D"], a["K"]
    macs = rows * k * d * (2 + 4)
    return Work(macs, rows * (d * _esize(a["w_ptr"]) + 2 * k * d * _esize(a["g_ptr"])))


@_formula("_hop_update_fwd_kernel")
def _hop_update_fwd(a, grid) -> Work:
    return Work(0, a["R"] * a["D"] * sum(_esize(a[p]) for p in ("o_ptr", "u_ptr", "y_ptr")))


@_formula("_hop_update_bwd_kernel")
def _hop_update_bwd(a, grid) -> Work:
    tensors = ("o_ptr", "u_ptr", "g_ptr", "do_ptr", "du_ptr")
    return Work(0, a["R"] * a["D"] * sum(_esize(a[p]) for p in tensors))


@_formula("_answer_fwd_kernel")
def _answer_fwd(a, grid) -> Work:
    # o, u in; each answer row in and its score out.
    rows, d, n = a["R"], a["D"], a["A"]
    update = rows * d * (_esize(a["o_ptr"]) + _esize(a["u_ptr"]))
    return Work(0, update + rows * n * (d * _esize(a["g_ptr"]) + _esize(a["s_ptr"])))


@_formula("_answer_bwd_kernel")
def _answer_bwd(a, grid) -> Work:
    # o, u in, do, du out; each answer row and its score's gradient in, dg out.
    rows, d, n = a["R"], a["D"], a["A"]
    update = rows * d * sum(_esize(a[p]) for p in ("o_ptr", "u_ptr", "do_ptr", "du_ptr"))
    answers = rows * n * (d * (_esize(a["g_ptr"]) + _esize(a["dg_ptr"])) + _esize(a["gs_ptr"]))
    return Work(0, update + answers)


# --------------------------------------------------------------------------------------
# The answer loss (kernels/cross_entropy.py)
# --------------------------------------------------------------------------------------


@_formula("_ce_fwd_kernel", "_ce_bwd_kernel")
def _cross_entropy(a, grid) -> Work:
    """Scores and targets in (the mask, the loss gradient), the loss or dx out."""
    rows, width = a["B"], a["A"]
    scores = rows * width * _esize(a["x_ptr"])
    out = scores if "dx_ptr" in a else F32
    return Work(0, scores + rows * (_esize(a["t_ptr"]) + _esize(a["keep_ptr"])) + out)


def formulas() -> tuple[str, ...]:
    """The kernels this module has a formula for."""
    return tuple(sorted(_FORMULAS))


__all__ = ["Work", "executed_work", "launch_work", "total"]
