"""The read layer's spectral weights G = Finv T: the inverse half-spectrum DFT folded into
each kernel row's Toeplitz matrix (kernels/read_network.py's module docstring has the
math), so the one-launch read multiplies the spectra [Re P | Im P] by G directly.

A weight transform recomputed every forward from the (master) weight, in one launch:
O(K d) a kernel row by prefix sums of w[t] e^{2 pi i k t / D} (a window of taps a column
sees is a difference of two prefix sums), in float64 throughout and rounded once, with no
matmul, so no global matmul precision reaches it. Also Finv itself (tests, documentation)
and the float64 table of the D-th roots of unity the kernel reads.

May import: torch, triton, kernels._common, kernels.cbp (half_spectrum), kernels.reference.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels._common import LaunchConfig, launch, pow2_at_least
from kernels.cbp import half_spectrum
from kernels.reference import same_padding


@triton.jit
def _spectral_weights_kernel(
    w_ptr, roots_ptr, scratch_ptr, g_ptr, D, K, PAD_LEFT,
    BLOCK_BINS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """G rows k and K + k of one kernel row w (module docstring), float64 throughout:
    G[k, j] = c_k/D Re(e^{i phi_j} S_k(j)), G[K + k, j] = -c_k/D Im(e^{i phi_j} S_k(j)),
    phi_j = 2 pi k (j - q) / D, S_k(j) = sum_{t in R_j} w[t] e^{2 pi i k t / D} over the
    taps R_j = [max(0, q - j), min(D - 1, D - 1 + q - j)] that output j sees: a difference
    of two prefix sums of w[t] e^{2 pi i k t / D}, so O(K D) per row, not O(K D^2). The
    prefix sums go through this program's scratch rows, read back at the window ends (a
    register gather spilled)."""
    row = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_BINS + tl.arange(0, BLOCK_BINS)
    k_ok = ks < K
    ts = tl.arange(0, BLOCK_T)
    w = tl.load(w_ptr + row * D + ts, mask=ts < D, other=0.0).to(tl.float64)
    # Phases reduced mod D in integers, then read from the float64 table of the D-th roots
    # of unity (cos, sin): no float64 trigonometry in the kernel (its libdevice code spills).
    angle = (ks[:, None] * ts[None, :]) % D
    c_re = tl.cumsum(w[None, :] * tl.load(roots_ptr + angle), axis=1)
    c_im = tl.cumsum(w[None, :] * tl.load(roots_ptr + D + angle), axis=1)
    program = row * tl.num_programs(1) + tl.program_id(1)
    scr_re = scratch_ptr + program.to(tl.int64) * (2 * BLOCK_BINS * BLOCK_T)
    scr_re += tl.arange(0, BLOCK_BINS)[:, None] * BLOCK_T
    scr_im = scr_re + BLOCK_BINS * BLOCK_T
    tl.store(scr_re + ts[None, :], c_re)
    tl.store(scr_im + ts[None, :], c_im)
    # Every thread reads prefix sums other threads stored.
    tl.debug_barrier()
    scale = tl.where((ks == 0) | (2 * ks == D), 1.0, 2.0).to(tl.float64) / D
    g_row = g_ptr + row.to(tl.int64) * (2 * K * D)
    for j0 in range(0, D, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_ok = js < D
        hi = tl.maximum(tl.minimum(D - 1 + PAD_LEFT - js, D - 1), 0)
        lo = tl.maximum(PAD_LEFT - js, 0)
        hi2 = hi[None, :]
        lo2 = tl.maximum(lo - 1, 0)[None, :]
        below = (lo > 0)[None, :]
        s_re = tl.load(scr_re + hi2) - tl.where(below, tl.load(scr_re + lo2), 0.0)
        s_im = tl.load(scr_im + hi2) - tl.where(below, tl.load(scr_im + lo2), 0.0)
        phi = (ks[:, None] * (js + D - PAD_LEFT)[None, :]) % D
        cos = tl.load(roots_ptr + phi)
        sin = tl.load(roots_ptr + D + phi)
        re = scale[:, None] * (s_re * cos - s_im * sin)
        im = -scale[:, None] * (s_re * sin + s_im * cos)
        ok = k_ok[:, None] & j_ok[None, :]
        out = g_row + ks[:, None] * D + js[None, :]
        tl.store(out, re.to(g_ptr.dtype.element_ty), mask=ok)
        tl.store(out + K * D, im.to(g_ptr.dtype.element_ty), mask=ok)


#: Spectral weights: bins per program and output columns per step (the prefix sums wait in
#: a float64 scratch row per bin).
G_BLOCK_BINS = 4
G_BLOCK_J = 64


def spectral_weights_config(rows: int, d: int) -> LaunchConfig:
    """Launch configuration of _spectral_weights_kernel for ``rows`` kernel rows of width d:
    one program per (row, G_BLOCK_BINS bins)."""
    return LaunchConfig(
        grid=(rows, triton.cdiv(half_spectrum(d), G_BLOCK_BINS)),
        constexprs=dict(BLOCK_BINS=G_BLOCK_BINS, BLOCK_T=pow2_at_least(d), BLOCK_J=G_BLOCK_J),
        num_warps=4,
        num_stages=1,
    )


def inverse_dft_matrix(d: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Finv [2K, d] in ``dtype`` with irfft(P, d) = [Re P | Im P] @ Finv (module docstring):
    the phases reduced mod d in integers and evaluated in float64, so entries are correctly
    rounded."""
    k = half_spectrum(d)
    bins = torch.arange(k, device=device)
    t = torch.arange(d, device=device)
    angle = ((bins[:, None] * t[None, :]) % d).to(torch.float64) * (2 * math.pi / d)
    scale = torch.where((bins == 0) | (2 * bins == d), 1.0, 2.0).to(torch.float64)[:, None] / d
    return torch.cat((scale * torch.cos(angle), -scale * torch.sin(angle))).to(dtype)


def unit_roots(d: int, device) -> torch.Tensor:
    """[cos | sin](2 pi m / d), m < d, float64 [2 d]: the spectral weights' twiddles, built
    once per (d, device) in eager mode (traced under torch.compile)."""
    if torch.compiler.is_compiling():
        return _unit_roots(d, torch.device(device))
    return _cached_unit_roots(d, torch.device(device))


def _unit_roots(d: int, device: torch.device) -> torch.Tensor:
    angle = torch.arange(d, device=device, dtype=torch.float64) * (2 * math.pi / d)
    return torch.cat((torch.cos(angle), torch.sin(angle)))


@functools.cache
def _cached_unit_roots(d: int, device: torch.device) -> torch.Tensor:
    return _unit_roots(d, device)


@triton_op("rwmn::spectral_weights", mutates_args=())
def _spectral_weights_op(
    weight: torch.Tensor, roots: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    c_out, c_in, kh, d = weight.shape
    g = torch.empty((c_out, c_in, kh, 2 * half_spectrum(d), d), device=weight.device, dtype=dtype)
    config = spectral_weights_config(c_out * c_in * kh, d)
    block = config.constexprs["BLOCK_BINS"] * config.constexprs["BLOCK_T"]
    scratch = torch.empty(
        (math.prod(config.grid), 2 * block), device=weight.device, dtype=torch.float64
    )
    launch(
        _spectral_weights_kernel, config,
        weight, roots, scratch, g, d, half_spectrum(d), same_padding(d, d, 1)[1],
    )  # fmt: skip
    return g


@_spectral_weights_op.register_fake
def _spectral_weights_fake(weight, roots, dtype):
    c_out, c_in, kh, d = weight.shape
    return weight.new_empty((c_out, c_in, kh, 2 * half_spectrum(d), d), dtype=dtype)


def spectral_weights(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """G [c_out, c_in, k, 2K, d] = Finv T_{o,c,a} in ``dtype`` for a read layer's weight
    [c_out, c_in, k, d], one launch (a custom op, so torch.compile sees one node):
    computed in float64 from the (master) weight and rounded once (no matmul, so no global
    matmul precision reaches it), with no gradient (the fused op returns the weight's
    gradient itself)."""
    d = weight.shape[-1]
    roots = unit_roots(d, weight.device)
    return torch.ops.rwmn.spectral_weights(weight.detach().contiguous(), roots, dtype)


__all__ = ["inverse_dft_matrix", "spectral_weights", "unit_roots"]
