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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels import reference
from kernels._common import FUSED_DTYPES, UNIT_NORM_EPS, LaunchConfig, launch, warn_once

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
def _hop_update_fwd_kernel(
    o_ptr, u_ptr, y_ptr, R, D, a, b, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    o, offs, ok, n_o = _rows(o_ptr, R, D, eps, BLOCK_R, BLOCK_D)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    v = a * (o * n_o[:, None]) + b * u
    n_v = tl.rsqrt(eps + tl.sum(v * v, axis=1))
    tl.store(y_ptr + offs, (v * n_v[:, None]).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _hop_update_bwd_kernel(
    o_ptr, u_ptr, g_ptr, do_ptr, du_ptr, R, D, a, b, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    o, offs, ok, n_o = _rows(o_ptr, R, D, eps, BLOCK_R, BLOCK_D)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    o_hat = o * n_o[:, None]
    v = a * o_hat + b * u
    n_v = tl.rsqrt(eps + tl.sum(v * v, axis=1))
    y = v * n_v[:, None]
    dv = n_v[:, None] * (g - y * tl.sum(y * g, axis=1)[:, None])
    tl.store(du_ptr + offs, (b * dv).to(du_ptr.dtype.element_ty), mask=ok)
    do_hat = a * dv
    do = n_o[:, None] * (do_hat - o_hat * tl.sum(o_hat * do_hat, axis=1)[:, None])
    tl.store(do_ptr + offs, do.to(do_ptr.dtype.element_ty), mask=ok)


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


def unit_norm(x: torch.Tensor) -> torch.Tensor:
    """Fused kernels.reference.unit_norm (default eps) along the last axis of x."""
    if x.dtype not in FUSED_DTYPES:
        warn_once(
            f"kernels: unit_norm runs the reference for {x.dtype} inputs: the fused kernels "
            f"support {', '.join(str(t) for t in FUSED_DTYPES)}"
        )
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
    if o.dtype not in FUSED_DTYPES or u.dtype not in FUSED_DTYPES:
        warn_once(
            f"kernels: hop_update runs the reference for {o.dtype}/{u.dtype} inputs: the "
            f"fused kernels support {', '.join(str(t) for t in FUSED_DTYPES)}"
        )
        return reference.hop_update(o, u, a, b)
    d = o.shape[-1]
    o2, u2 = o.reshape(-1, d).contiguous(), u.reshape(-1, d).contiguous()
    return torch.ops.rwmn.hop_update(o2, u2, float(a), float(b)).view(o.shape)


__all__ = ["hop_update", "unit_norm"]
