"""The embedding y = unit_norm(unit_norm(x) W^T + b): three launches forward, two backward.

Math (kernels.reference.embed is the ground truth), rows x [R, K], W [N, K], b [N],
n(v) = (eps + |v|^2)^(-1/2) per row, eps = 1e-12:
    x^ = n(x) x,   z = x^ W^T + b,   y = n(z) z;
with ``normalize_input`` False (the story's CBP output in video_sub, used as it is) n(x)
is 1.
backward from g = dL/dy:
    dz = n(z) (g - y <y, g>)                        (row by row)
    dW = dz^T x^,   db = sum_r dz_r,
    dx = n(x) (dx^ - x^ <x^, dx^>),  dx^ = dz W      (only if x needs a gradient).
The model embeds data (story rows, questions, answers, the story's CBP), whose rows need
no gradient, so dx is left to plain torch ops; dW and db are the kernels' work.

The reference takes about six launches forward under autocast (the input's norm, three
casts, the GEMM, the output's norm) and six back. Here:

* ``_row_norms_kernel``: the rows' norms (when x is normalised);
* ``_embed_fwd_kernel``, one program per [BLOCK_M, BLOCK_N] tile of z: the GEMM on x and
  W rounded in-kernel to the compute dtype from their own (no cast launch), the rows'
  norms and the bias in the epilogue; z is stored in fp32 (the backward's input);
* ``_unit_norm_fwd_kernel`` (kernels/unit_norm.py): y = n(z) z in the compute dtype.
  (One launch for all three spilled: ptxas would not keep a whole row's accumulators, the
  norms and the loops in registers.)
* ``_unit_norm_bwd_kernel`` (kernels/unit_norm.py) gives dz from z and g, in the compute
  dtype (the GEMM operand).
* ``_embed_dw_kernel``, one program per [BLOCK_WN, BLOCK_WK] tile of dW, reduces over all
  rows (x^ recomputed from x and the stored norms, rounded exactly as in the forward)
  and writes dW in W's dtype; the programs of the first K tile also sum db. No partial
  sums, no cast.

May import: torch, triton, kernels._common, kernels.reference, kernels.unit_norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels import reference
from kernels._common import (
    LaunchConfig,
    compute_dtype,
    dot_precision,
    launch,
    runs_reference,
)
from kernels.unit_norm import row_norms, unit_norm_backward, unit_norm_forward

#: Forward rows per program: one warpgroup's wgmma M in bf16/fp16; fp32 multiplies on CUDA
#: cores (ieee) with register-resident operands, so half.
BLOCK_M_HALF = 64
BLOCK_M_FP32 = 16
BLOCK_K = 32
#: Output columns per tile (N = 300 pads to 320).
BLOCK_N = 64
NUM_WARPS = 4
#: dW tile ([output columns, input columns]) and the rows of one reduction step.
BLOCK_WN = 64
BLOCK_WK = 64
BLOCK_R = 32
DW_WARPS = 4


@triton.jit
def _embed_fwd_kernel(
    x_ptr, w_ptr, b_ptr, nx_ptr, z_ptr, y_ptr, R, K, N,
    NORM_X: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of z = n(x) (x W^T) + b (fp32): x's and W's tiles
    rounded to the compute dtype (y_ptr's, an empty tensor that carries it) from their
    own."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < R
    c_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(x_rows[:, None] + ks[None, :], mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0).to(y_ptr.dtype.element_ty)  # fmt: skip
        # W rows (contiguous along K), transposed into the B operand.
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=c_ok[:, None] & k_ok[None, :],
                    other=0.0).to(a.dtype)  # fmt: skip
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    if NORM_X:
        acc = acc * tl.load(nx_ptr + rows, mask=r_ok, other=0.0)[:, None]
    elif tl.program_id(1) == 0:
        tl.store(nx_ptr + rows, tl.full((BLOCK_M,), 1.0, tl.float32), mask=r_ok)  # for dW
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(z_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc,
             mask=r_ok[:, None] & c_ok[None, :])  # fmt: skip


@triton.jit
def _embed_dw_kernel(
    dz_ptr, x_ptr, nx_ptr, dw_ptr, db_ptr, R, K, N,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_WN: tl.constexpr,
    BLOCK_WK: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(1)
    ns = tl.program_id(0) * BLOCK_WN + tl.arange(0, BLOCK_WN)
    ks = pid_k * BLOCK_WK + tl.arange(0, BLOCK_WK)
    n_ok = ns < N
    k_ok = ks < K
    acc = tl.zeros((BLOCK_WN, BLOCK_WK), dtype=tl.float32)
    db = tl.zeros((BLOCK_WN,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < R
        dz = tl.load(dz_ptr + rs.to(tl.int64)[:, None] * N + ns[None, :],
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
        xt = tl.load(x_ptr + rs.to(tl.int64)[:, None] * K + ks[None, :],
                     mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        n_x = tl.load(nx_ptr + rs, mask=r_ok, other=0.0)
        # x rounded as the forward rounded its A operand; dW = dz^T (n(x) x) = (n(x) dz)^T x.
        dzx = (dz.to(tl.float32) * n_x[:, None]).to(dz.dtype)
        acc = tl.dot(tl.trans(dzx), xt.to(dz.dtype), acc, input_precision=PRECISION)
        db += tl.sum(dz.to(tl.float32), axis=0)
    tl.store(dw_ptr + ns[:, None] * K + ks[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])  # fmt: skip
    if pid_k == 0:
        tl.store(db_ptr + ns, db.to(db_ptr.dtype.element_ty), mask=n_ok)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def embed_forward_config(
    rows: int, k: int, n: int, dtype: torch.dtype, has_bias: bool, normalize_input: bool
) -> LaunchConfig:
    """Launch configuration of _embed_fwd_kernel: one program per [BLOCK_M, BLOCK_N] tile
    of z."""
    block_m = BLOCK_M_FP32 if dtype == torch.float32 else BLOCK_M_HALF
    return LaunchConfig(
        grid=(triton.cdiv(rows, block_m), triton.cdiv(n, BLOCK_N)),
        constexprs=dict(
            NORM_X=normalize_input,
            HAS_BIAS=has_bias,
            PRECISION=dot_precision(dtype),
            BLOCK_M=block_m,
            BLOCK_K=BLOCK_K,
            BLOCK_N=BLOCK_N,
        ),
        num_warps=NUM_WARPS,
        num_stages=1,
    )


def embed_dw_config(k: int, n: int, dtype: torch.dtype) -> LaunchConfig:
    """Launch configuration of _embed_dw_kernel: one program per [BLOCK_WN, BLOCK_WK] tile
    of dW [n, k]."""
    return LaunchConfig(
        grid=(triton.cdiv(n, BLOCK_WN), triton.cdiv(k, BLOCK_WK)),
        constexprs=dict(
            PRECISION=dot_precision(dtype), BLOCK_R=BLOCK_R, BLOCK_WN=BLOCK_WN, BLOCK_WK=BLOCK_WK
        ),
        num_warps=DW_WARPS,
        num_stages=1,
    )


def embed_forward(x, weight, bias, dtype: torch.dtype, normalize_input: bool):
    """(y [R, N] in ``dtype``, z [R, N] fp32, n(x) [R] fp32) for contiguous x [R, K]: the
    rows' norms (if normalised), z tile by tile, y = unit_norm(z) (kernels/unit_norm.py)."""
    rows, k = x.shape
    n = weight.shape[0]
    # y's dtype is the compute dtype the GEMM rounds its operands to (its dtype argument).
    dtype_of = torch.empty((0,), device=x.device, dtype=dtype)
    z = torch.empty((rows, n), device=x.device, dtype=torch.float32)
    n_x = torch.empty((rows,), device=x.device, dtype=torch.float32)
    if rows:
        if normalize_input:
            row_norms(x, n_x)
        launch(
            _embed_fwd_kernel,
            embed_forward_config(rows, k, n, dtype, bias is not None, normalize_input),
            x, weight, weight if bias is None else bias, n_x, z, dtype_of, rows, k, n,
        )  # fmt: skip
    return unit_norm_forward(z, dtype), z, n_x


def embed_backward(grad, z, x, n_x, weight, dtype: torch.dtype):
    """(dz [R, N] in ``dtype``, dW [N, K] and db [N] in W's dtype) from grad = dL/dy."""
    rows, k = x.shape
    n = weight.shape[0]
    dz = unit_norm_backward(z, grad, dtype)
    dw = torch.empty_like(weight)
    db = torch.empty((n,), device=weight.device, dtype=weight.dtype)
    launch(_embed_dw_kernel, embed_dw_config(k, n, dtype), dz, x, n_x, dw, db, rows, k, n)
    return dz, dw, db


# --------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------


@triton_op("rwmn::embed", mutates_args=())
def _embed_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    normalize_input: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z, n(x)) of the embedding in the compute ``dtype`` (z and n(x) are the
    backward's, not differentiable)."""
    return embed_forward(x, weight, bias, dtype, normalize_input)


@triton_op("rwmn::embed_backward", mutates_args=())
def _embed_backward_op(
    grad: torch.Tensor,
    z: torch.Tensor,
    x: torch.Tensor,
    n_x: torch.Tensor,
    weight: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return embed_backward(grad, z, x, n_x, weight, dtype)


# Explicit fakes: under TRITON_INTERPRET=1 the bodies cannot run on fake tensors.
@_embed_op.register_fake
def _embed_fake(x, weight, bias, dtype, normalize_input):
    rows, n = x.shape[0], weight.shape[0]
    f32 = torch.float32
    return (
        x.new_empty((rows, n), dtype=dtype),
        x.new_empty((rows, n), dtype=f32),
        x.new_empty((rows,), dtype=f32),
    )


@_embed_backward_op.register_fake
def _embed_backward_fake(grad, z, x, n_x, weight, dtype):
    n = weight.shape[0]
    return grad.new_empty(z.shape, dtype=dtype), torch.empty_like(weight), weight.new_empty((n,))


def _setup(ctx, inputs, output):
    x, weight, bias, dtype, normalize_input = inputs
    _, z, n_x = output
    ctx.normalize_input = normalize_input
    ctx.mark_non_differentiable(z, n_x)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, z, n_x)
    ctx.dtype, ctx.has_bias = dtype, bias is not None


def _backward(ctx, grad, _gz, _gnx):
    x, weight, z, n_x = ctx.saved_tensors
    dz, dw, db = torch.ops.rwmn.embed_backward(grad.contiguous(), z, x, n_x, weight, ctx.dtype)
    dx = None
    if ctx.needs_input_grad[0]:
        dx = dz.float() @ weight.float()
        if ctx.normalize_input:
            x_hat = x.float() * n_x[:, None]
            dx = n_x[:, None] * (dx - x_hat * (x_hat * dx).sum(-1, keepdim=True))
        dx = dx.to(x.dtype)
    return dx, dw, db if ctx.has_bias else None, None, None


_embed_op.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------
# Public entry point (the signature rwmn.ops dispatches to)
# --------------------------------------------------------------------------------------


def embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    normalize_input: bool = True,
) -> torch.Tensor:
    """Fused kernels.reference.embed: x [..., K], weight [N, K], bias [N] or None ->
    unit_norm(unit_norm(x) W^T + b) [..., N] (x used as it is without
    ``normalize_input``) in the compute dtype (autocast's under autocast, else the inputs'
    promoted dtype)."""
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k or (bias is not None and tuple(bias.shape) != (n,)):
        raise ValueError(
            f"embed: input {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
            f"{None if bias is None else tuple(bias.shape)} do not match (expected [..., {k}], "
            f"[{n}, {k}], [{n}])"
        )
    dtype = compute_dtype(x, weight, bias)
    if runs_reference("embed", dtype):
        return reference.embed(x, weight, bias, normalize_input)
    rows = x.reshape(-1, k).contiguous()
    y, _, _ = torch.ops.rwmn.embed(rows, weight.contiguous(), bias, dtype, normalize_input)
    return y.view(*x.shape[:-1], n)


__all__ = ["embed"]
