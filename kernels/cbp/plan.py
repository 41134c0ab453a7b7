"""What a CBP launch needs besides its inputs: FFT plans, launch configurations, workspace
sizes and the tables the kernels read (twiddles, the inverse hash, broadcast row indices).

The constants below are read at call time, so tests may monkeypatch them: tiles
(BLOCK_S, FFT_BLOCK_J, FFT_BLOCK_J_ONE_TILE; then clear ``_plan``'s cache), the scratch
budget, and FACTORISED_MIN_DIM, the smallest D that takes the FFT path (lowered to 1 to run
the FFT kernels at tiny D).

May import: torch, triton (not triton.language), kernels._common.
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from kernels._common import LaunchConfig, derived

#: Largest output size that is fused. The dense sketch-DFT costs O(D) per input element
#: and the phase product h * k must stay below 2^31 in int32; larger D use the reference.
MAX_FUSED_DIM = 16384

#: Dense path tiles: rows per program, spectrum bins per tile, input (and output) elements
#: per tile. 16 is the smallest tl.dot tile; 32 x 32 keeps the backward's two twiddle tiles
#: and six fp32 accumulators in registers.
DENSE_BLOCK_R = 16
DENSE_BLOCK_K = 32
DENSE_BLOCK_N = 32
#: Dense path warps (one pipeline stage): fp32 ("ieee") holds both operands in registers
#: and needs the wider spread to stay out of spills.
DENSE_WARPS = {"tf32": 4, "ieee": 16}

#: Sizes D at or above this with a radix plan (fft_plan) take the FFT path; smaller D and D
#: without a plan (a prime factor > MAX_RADIX) stay dense. Read at call time: tests lower
#: it to run the FFT path at tiny D.
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
#: (kind, precision) -> (warps, largest BLOCK_J) where the defaults spill (fitted with the
#: compile gate on both targets): more warps halve each thread's share of the tiles,
#: smaller j tiles shorten the live ranges. Same executed MACs at 4096.
FFT_TILE_OVERRIDES = {
    ("forward", "ieee"): (4, 32),
    ("spectra", "tf32"): (8, None),
}
#: The same for Triton < 3.7, whose bundled ptxas settles on other register budgets;
#: ("one tile") applies where a stage's j loop is one tile (see _block_j).
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


def transform_macs(out_dim: int, radices: tuple[int, ...], block_j: int) -> int:
    """Real multiply-adds of one complex FFT: per stage, cdiv(D/R, BLOCK_J) tiles of
    [BLOCK_J, P] x [P, P], three real products each (Gauss), padding included."""
    return sum(3 * triton.cdiv(out_dim // r, block_j) * block_j * _padded(r) ** 2 for r in radices)


def _block_j(out_dim: int, radices: tuple[int, ...]) -> int:
    """Rows of the stage tiles: every stage's j loop in one tile when the longest has at
    most FFT_BLOCK_J_ONE_TILE values (the model's read size; one tile avoids a rotated j
    loop, whose 64-bit induction variable ptxas spills), else
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
        key = (transform_macs(out_dim, radices, block_j), len(radices))
        if best is None or key < best[0]:
            best = (key, (radices, block_j))
    return None if best is None else best[1]


def fft_plan(out_dim: int, min_dim: int | None = None) -> tuple[int, ...] | None:
    """Radices of the FFT path for D = out_dim (their product), or None for the dense path.

    None when out_dim < min_dim or out_dim has no split into at most MAX_STAGES radices <=
    MAX_RADIX (a prime factor > 32: 97, 4099, 2 x 4099, ...). Among the splits it picks the
    fewest executed multiply-adds (radices padded to max(16, pow2(R)), j tiles to 16, 32 or
    64), then the fewest stages: 4096 -> 16 x 16 x 16, 300 -> 10 x 30, 600 -> 24 x 25,
    16000 -> 10 x 10 x 10 x 16. min_dim defaults to FACTORISED_MIN_DIM, read at call time.
    """
    if min_dim is None:
        min_dim = FACTORISED_MIN_DIM
    if out_dim < max(min_dim, 2):
        return None
    plan = _plan(out_dim)
    return None if plan is None else plan[0]


def fft_constexprs(out_dim: int, radices: tuple[int, ...], precision: str) -> dict:
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
    constexprs = fft_constexprs(out_dim, radices, precision)
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


def input_precision(*tensors: torch.Tensor) -> str:
    """tl.dot input precision of a CBP launch: exact fp32 products ("ieee", on CUDA cores)
    when any input is fp32, since 3-pass "tf32x3" spills at every tile size; one "tf32"
    pass otherwise, already finer than the 8-11 mantissa bits of bf16/fp16 inputs."""
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) else "tf32"


# --------------------------------------------------------------------------------------
# Tables: twiddles, the inverse hash, broadcast row indices
# --------------------------------------------------------------------------------------


def twiddle_table(out_dim: int, device: torch.device | str) -> torch.Tensor:
    """[cos(2 pi p / D) for p < D, sin(2 pi p / D) for p < D] as fp32 [2 * D], computed in
    float64 so every entry is correctly rounded."""
    angle = torch.arange(out_dim, dtype=torch.float64, device=device) * (2 * math.pi / out_dim)
    return torch.cat((torch.cos(angle), torch.sin(angle))).to(torch.float32)


@functools.cache
def _cached_twiddle_table(out_dim: int, device: torch.device) -> torch.Tensor:
    return twiddle_table(out_dim, device)


def cached_twiddles(out_dim: int, device: torch.device) -> torch.Tensor:
    """twiddle_table(out_dim) on ``device``: cached in eager mode, traced under compile."""
    if torch.compiler.is_compiling():
        return twiddle_table(out_dim, device)
    return _cached_twiddle_table(out_dim, device)


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
        # assert stops the CUDA context.
        torch._assert_async(((h >= 0) & (h < out_dim)).all(), message)
    elif int(h.min()) < 0 or int(h.max()) >= out_dim:
        raise ValueError(message)
    return True


def row_indices(x: torch.Tensor, y: torch.Tensor, lead: torch.Size):
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
