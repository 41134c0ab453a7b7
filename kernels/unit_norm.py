"""Row-wise unit normalisation, and the hop update built from it, in one launch each way.

Math (kernels.reference.unit_norm and hop_update are the ground truth), along the last
axis, eps = 1e-12:
    n = (eps + sum_j x_j^2)^(-1/2),   y = n x;
    dx = n (g - y <y, g>)              for g = dL/dy.
The reference takes five to seven launches each way (casts, square, sum, rsqrt, product),
and the model normalises every input, every embedding and every hop's update: one launch
per call here. Rows are read in their dtype and normalised in fp32 (a 300-wide sum of
squares overflows fp16, and eps underflows in it); y is stored in x's dtype. The backward
recomputes n and y from x (fp32) rather than reading back a rounded y.

The hop update u' = unit_norm(v), v = a unit_norm(o) + b u, runs whole in one program per
block of rows (its reference: two normalisations, two scalings and a sum, each rounded to
the inputs' dtype; here fp32 throughout and one rounding of u'); its backward, from
g = dL/du': dv = n_v (g - u' <u', g>), du = b dv, do = n_o (a dv - o^ <o^, a dv>).

The model's last hop ends in the answer scores s_i = <g_i, u'> (g_i the A embedded
answers): that update and the scores run as one op (answer_scores) in one launch each way;
its backward takes g = sum_i ds_i g_i as dL/du' and stores dg_i = ds_i u'. u' is rounded
to the output dtype before the products, as the reference's separate product sees it.

May import: torch, triton, kernels._common, kernels.reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels import reference
from kernels._common import UNIT_NORM_EPS, LaunchConfig, launch, runs_reference

#: Elements of one program's tile (rows x pow2(d)): 4096 fp32 per tile, two tiles live in
#: the backward, 32 or 64 registers a thread at 4 warps.
TILE = 4096
NUM_WARPS = 4


@triton.jit
def _rows(x_ptr, R, D, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows of x (fp32, zero outside), their offsets, mask and norms n."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    ok = (rows < R)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    return x, offs, ok, tl.rsqrt(eps + tl.sum(x * x, axis=1))


@triton.jit
def _row_norms_kernel(x_ptr, nx_ptr, R, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """n(x) [R] (fp32) of the rows of x [R, K]: the inverse norms alone, for kernels that
    apply them themselves (the embedding's GEMM, the video story's CBP)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < R
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :],
                     mask=r_ok[:, None] & (ks < K)[None, :], other=0.0).to(tl.float32)  # fmt: skip
        squares += tl.sum(xt * xt, axis=1)
    tl.store(nx_ptr + rows, tl.rsqrt(eps + squares), mask=r_ok)


@triton.jit
def _unit_norm_fwd_kernel(
    x_ptr, y_ptr, R, D, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    x, offs, ok, n = _rows(x_ptr, R, D, eps, BLOCK_R, BLOCK_D)
    tl.store(y_ptr + offs, (x * n[:, None]).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _unit_norm_bwd_kernel(
    x_ptr, g_ptr, dx_ptr, R, D, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    x, offs, ok, n = _rows(x_ptr, R, D, eps, BLOCK_R, BLOCK_D)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = x * n[:, None]
    dx = n[:, None] * (g - y * tl.sum(y * g, axis=1)[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _hop_rows(o_ptr, u_ptr, R, D, a, b, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows of the hop update (fp32): o^ = n_o o, n_o, n_v and
    u' = n_v (a o^ + b u), with the rows' offsets and mask."""
    o, offs, ok, n_o = _rows(o_ptr, R, D, eps, BLOCK_R, BLOCK_D)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    o_hat = o * n_o[:, None]
    v = a * o_hat + b * u
    n_v = tl.rsqrt(eps + tl.sum(v * v, axis=1))
    return o_hat, n_o, n_v, v * n_v[:, None], offs, ok


@triton.jit
def _hop_rows_backward(o_hat, n_o, n_v, y, g, offs, ok, do_ptr, du_ptr, a, b):
    """Store do and du of the hop update from g = dL/du' (fp32)."""
    dv = n_v[:, None] * (g - y * tl.sum(y * g, axis=1)[:, None])
    tl.store(du_ptr + offs, (b * dv).to(du_ptr.dtype.element_ty), mask=ok)
    do_hat = a * dv
    do = n_o[:, None] * (do_hat - o_hat * tl.sum(o_hat * do_hat, axis=1)[:, None])
    tl.store(do_ptr + offs, do.to(do_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _hop_update_fwd_kernel(
    o_ptr, u_ptr, y_ptr, R, D, a, b, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    _, _, _, y, offs, ok = _hop_rows(o_ptr, u_ptr, R, D, a, b, eps, BLOCK_R, BLOCK_D)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _hop_update_bwd_kernel(
    o_ptr, u_ptr, g_ptr, do_ptr, du_ptr, R, D, a, b, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    o_hat, n_o, n_v, y, offs, ok = _hop_rows(o_ptr, u_ptr, R, D, a, b, eps, BLOCK_R, BLOCK_D)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    _hop_rows_backward(o_hat, n_o, n_v, y, g, offs, ok, do_ptr, du_ptr, a, b)


@triton.jit
def _answer_offsets(offs, i, A, D):
    """Offsets in the answers [R, A, d] of answer i of the rows at ``offs`` in [R, d]."""
    return offs + (offs // D * (A - 1) + i) * D


@triton.jit
def _answer_fwd_kernel(
    o_ptr, u_ptr, g_ptr, s_ptr, R, D, A, a, b, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    _, _, _, y, offs, ok = _hop_rows(o_ptr, u_ptr, R, D, a, b, eps, BLOCK_R, BLOCK_D)
    # u' as the reference rounds it before its product with the answers.
    y = y.to(s_ptr.dtype.element_ty).to(tl.float32)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    for i in range(A):
        g_offs = _answer_offsets(offs, i, A, D)
        g = tl.load(g_ptr + g_offs, mask=ok, other=0.0).to(tl.float32)
        score = tl.sum(g * y, axis=1)
        tl.store(s_ptr + rows * A + i, score.to(s_ptr.dtype.element_ty), mask=rows < R)


@triton.jit
def _answer_bwd_kernel(
    o_ptr, u_ptr, g_ptr, gs_ptr, do_ptr, du_ptr, dg_ptr, R, D, A, a, b, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    o_hat, n_o, n_v, y, offs, ok = _hop_rows(o_ptr, u_ptr, R, D, a, b, eps, BLOCK_R, BLOCK_D)
    y_q = y.to(dg_ptr.dtype.element_ty).to(tl.float32)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    gy = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for i in range(A):
        g_offs = _answer_offsets(offs, i, A, D)
        g = tl.load(g_ptr + g_offs, mask=ok, other=0.0).to(tl.float32)
        gs = tl.load(gs_ptr + rows * A + i, mask=rows < R, other=0.0).to(tl.float32)
        gy += gs[:, None] * g
        tl.store(dg_ptr + g_offs, (gs[:, None] * y_q).to(dg_ptr.dtype.element_ty), mask=ok)
    _hop_rows_backward(o_hat, n_o, n_v, y, gy, offs, ok, do_ptr, du_ptr, a, b)


#: The hop update's backward holds about three times the tiles of unit_norm's: half the tile.
HOP_TILE = TILE // 2


def unit_norm_config(rows: int, d: int, tile: int = TILE) -> LaunchConfig:
    """One program per block of rows, each tile (at most ``tile`` elements) spanning the
    whole width pow2(d)."""
    block_d = triton.next_power_of_2(max(d, 1))
    block_r = max(1, min(tile // block_d, triton.next_power_of_2(max(rows, 1))))
    return LaunchConfig(
        grid=(triton.cdiv(rows, block_r),),
        constexprs=dict(BLOCK_R=block_r, BLOCK_D=block_d),
        num_warps=NUM_WARPS,
        num_stages=1,
    )


#: Row norms: rows per program and columns per step.
ROW_NORMS_BLOCK_M = 64
ROW_NORMS_BLOCK_K = 32


def row_norms_config(rows: int) -> LaunchConfig:
    """Launch configuration of _row_norms_kernel: one program per ROW_NORMS_BLOCK_M rows."""
    return LaunchConfig(
        grid=(triton.cdiv(rows, ROW_NORMS_BLOCK_M),),
        constexprs=dict(BLOCK_M=ROW_NORMS_BLOCK_M, BLOCK_K=ROW_NORMS_BLOCK_K),
        num_warps=NUM_WARPS,
        num_stages=1,
    )


def row_norms(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(eps + sum_j x_j^2)^(-1/2) [R] fp32 of the rows of a contiguous x [R, K] (into ``out``)."""
    rows, k = x.shape
    if out is None:
        out = torch.empty((rows,), device=x.device, dtype=torch.float32)
    if rows:
        launch(_row_norms_kernel, row_norms_config(rows), x, out, rows, k, UNIT_NORM_EPS)
    return out


def unit_norm_forward(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [R, d] = unit_norm(x) for a contiguous x [R, d], in ``dtype`` (default x's)."""
    rows, d = x.shape
    y = torch.empty_like(x, dtype=dtype)
    if rows:
        launch(_unit_norm_fwd_kernel, unit_norm_config(rows, d), x, y, rows, d, UNIT_NORM_EPS)
    return y


def unit_norm_backward(
    x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """dx [R, d] of unit_norm at x for the gradient grad (both contiguous [R, d]), in
    ``dtype`` (default x's)."""
    rows, d = x.shape
    dx = torch.empty_like(x, dtype=dtype)
    if rows:
        config = unit_norm_config(rows, d)
        launch(_unit_norm_bwd_kernel, config, x, grad, dx, rows, d, UNIT_NORM_EPS)
    return dx


@triton_op("rwmn::unit_norm", mutates_args=())
def _unit_norm_op(x: torch.Tensor) -> torch.Tensor:
    return unit_norm_forward(x)


@triton_op("rwmn::unit_norm_backward", mutates_args=())
def _unit_norm_backward_op(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return unit_norm_backward(x, grad)


# Explicit fakes: under TRITON_INTERPRET=1 the bodies cannot run on fake tensors.
@_unit_norm_op.register_fake
def _unit_norm_fake(x):
    return torch.empty_like(x)


@_unit_norm_backward_op.register_fake
def _unit_norm_backward_fake(x, grad):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.rwmn.unit_norm_backward(x, grad.to(x.dtype).contiguous())


_unit_norm_op.register_autograd(_backward, setup_context=_setup)


def hop_update_forward(o: torch.Tensor, u: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """unit_norm(a unit_norm(o) + b u) [R, d] for contiguous o, u [R, d], in the promoted
    dtype of o and u."""
    rows, d = o.shape
    y = torch.empty(o.shape, device=o.device, dtype=torch.promote_types(o.dtype, u.dtype))
    if rows:
        config = unit_norm_config(rows, d, HOP_TILE)
        launch(_hop_update_fwd_kernel, config, o, u, y, rows, d, a, b, UNIT_NORM_EPS)
    return y


def hop_update_backward(o, u, grad, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(do, du) of hop_update_forward for the gradient grad (all contiguous [R, d])."""
    rows, d = o.shape
    do, du = torch.empty_like(o), torch.empty_like(u)
    if rows:
        config = unit_norm_config(rows, d, HOP_TILE)
        launch(_hop_update_bwd_kernel, config, o, u, grad, do, du, rows, d, a, b, UNIT_NORM_EPS)
    return do, du


@triton_op("rwmn::hop_update", mutates_args=())
def _hop_update_op(o: torch.Tensor, u: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return hop_update_forward(o, u, a, b)


@triton_op("rwmn::hop_update_backward", mutates_args=())
def _hop_update_backward_op(
    o: torch.Tensor, u: torch.Tensor, grad: torch.Tensor, a: float, b: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return hop_update_backward(o, u, grad, a, b)


@_hop_update_op.register_fake
def _hop_update_fake(o, u, a, b):
    return o.new_empty(o.shape, dtype=torch.promote_types(o.dtype, u.dtype))


@_hop_update_backward_op.register_fake
def _hop_update_backward_fake(o, u, grad, a, b):
    return torch.empty_like(o), torch.empty_like(u)


def _hop_setup(ctx, inputs, output):
    o, u, a, b = inputs
    ctx.save_for_backward(o, u)
    ctx.a, ctx.b = a, b


def _hop_backward(ctx, grad):
    o, u = ctx.saved_tensors
    do, du = torch.ops.rwmn.hop_update_backward(o, u, grad.contiguous(), ctx.a, ctx.b)
    return do, du, None, None


_hop_update_op.register_autograd(_hop_backward, setup_context=_hop_setup)


def answer_scores_forward(o, u, g, a: float, b: float) -> torch.Tensor:
    """scores [R, A] = <g[r, i], hop_update(o, u, a, b)[r]> for contiguous o, u [R, d] and
    g [R, A, d], in their promoted dtype."""
    rows, d = o.shape
    n_answers = g.shape[1]
    dtype = torch.promote_types(torch.promote_types(o.dtype, u.dtype), g.dtype)
    scores = torch.empty((rows, n_answers), device=o.device, dtype=dtype)
    if rows:
        config = unit_norm_config(rows, d, HOP_TILE)
        launch(_answer_fwd_kernel, config, o, u, g, scores, rows, d, n_answers, a, b,
               UNIT_NORM_EPS)  # fmt: skip
    return scores


def answer_scores_backward(o, u, g, grad, a: float, b: float):
    """(do, du, dg) of answer_scores_forward for the gradient grad [R, A] (contiguous)."""
    rows, d = o.shape
    do, du, dg = torch.empty_like(o), torch.empty_like(u), torch.empty_like(g)
    if rows:
        config = unit_norm_config(rows, d, HOP_TILE)
        launch(_answer_bwd_kernel, config, o, u, g, grad, do, du, dg, rows, d, g.shape[1], a,
               b, UNIT_NORM_EPS)  # fmt: skip
    return do, du, dg


@triton_op("rwmn::answer_scores", mutates_args=())
def _answer_scores_op(
    o: torch.Tensor, u: torch.Tensor, g: torch.Tensor, a: float, b: float
) -> torch.Tensor:
    return answer_scores_forward(o, u, g, a, b)


@triton_op("rwmn::answer_scores_backward", mutates_args=())
def _answer_scores_backward_op(
    o: torch.Tensor, u: torch.Tensor, g: torch.Tensor, grad: torch.Tensor, a: float, b: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return answer_scores_backward(o, u, g, grad, a, b)


@_answer_scores_op.register_fake
def _answer_scores_fake(o, u, g, a, b):
    dtype = torch.promote_types(torch.promote_types(o.dtype, u.dtype), g.dtype)
    return o.new_empty((o.shape[0], g.shape[1]), dtype=dtype)


@_answer_scores_backward_op.register_fake
def _answer_scores_backward_fake(o, u, g, grad, a, b):
    return torch.empty_like(o), torch.empty_like(u), torch.empty_like(g)


def _answer_setup(ctx, inputs, output):
    o, u, g, a, b = inputs
    ctx.save_for_backward(o, u, g)
    ctx.a, ctx.b = a, b


def _answer_backward(ctx, grad):
    o, u, g = ctx.saved_tensors
    do, du, dg = torch.ops.rwmn.answer_scores_backward(o, u, g, grad.contiguous(), ctx.a, ctx.b)
    return do, du, dg, None, None


_answer_scores_op.register_autograd(_answer_backward, setup_context=_answer_setup)


def unit_norm(x: torch.Tensor) -> torch.Tensor:
    """Fused kernels.reference.unit_norm (default eps) along the last axis of x."""
    if runs_reference("unit_norm", x.dtype):
        return reference.unit_norm(x)
    if x.dim() == 0:
        raise ValueError("unit_norm: the input needs a last axis")
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    return torch.ops.rwmn.unit_norm(rows).view(x.shape)


def hop_update(o: torch.Tensor, u: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Fused kernels.reference.hop_update: unit_norm(a unit_norm(o) + b u) along the last
    axis of o and u (of one shape)."""
    if o.shape != u.shape or o.dim() == 0:
        raise ValueError(
            f"hop_update: o {tuple(o.shape)} and u {tuple(u.shape)} must have one shape with "
            "a last axis"
        )
    if runs_reference("hop_update", o.dtype, u.dtype):
        return reference.hop_update(o, u, a, b)
    d = o.shape[-1]
    o2, u2 = o.reshape(-1, d).contiguous(), u.reshape(-1, d).contiguous()
    return torch.ops.rwmn.hop_update(o2, u2, float(a), float(b)).view(o.shape)


def answer_scores(o: torch.Tensor, u: torch.Tensor, g: torch.Tensor, a: float, b: float):
    """Fused kernels.reference.answer_scores: the scores <g[.., i, :], u'> of the A answers
    g [B, A, d] against the last hop's update u' = hop_update(o, u, a, b) (o, u [B, d])."""
    if o.dim() != 2 or o.shape != u.shape or g.dim() != 3 or g.shape[::2] != o.shape:
        raise ValueError(
            f"answer_scores: o {tuple(o.shape)} and u {tuple(u.shape)} must be [B, d] and "
            f"the answers {tuple(g.shape)} [B, A, d]"
        )
    if runs_reference("answer_scores", o.dtype, u.dtype, g.dtype):
        return reference.answer_scores(o, u, g, a, b)
    return torch.ops.rwmn.answer_scores(
        o.contiguous(), u.contiguous(), g.contiguous(), float(a), float(b)
    )


__all__ = ["answer_scores", "hop_update", "unit_norm"]
