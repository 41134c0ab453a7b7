"""The answer loss: mean softmax cross-entropy over the questions, one launch each way.

Math (kernels.reference.cross_entropy is the ground truth), scores x [B, A] in any float
dtype, targets t [B], an optional question mask keep [B] (a padded batch's), C = the number
of kept questions (B without a mask):
    s = x                          (paper)   or  s = softmax(x)   (the release's legacy form)
    L = sum_b keep_b (lse(s_b) - s_{b, t_b}) / C,    lse = log sum exp;
backward from g = dL:
    dL/ds_b = g keep_b / C (softmax(s_b) - onehot(t_b)),
    legacy: dL/dx_b = s_b * (dL/ds_b - <s_b, dL/ds_b>).
The reference takes three launches forward (the fp32 cast, log_softmax, nll) and three
back; the model's B x A is tiny (32 x 5), so one program does all rows in fp32.

May import: torch, triton, kernels._common, kernels.reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels import reference
from kernels._common import LaunchConfig, launch, runs_reference

#: Rows per step of the single program's loop, and the widest score row it holds.
BLOCK_B = 64
MAX_FUSED_A = 1024


@triton.jit
def _scores(x_ptr, rows, cols, ok, A, LEGACY: tl.constexpr):
    """The rows' scores s in fp32 (-inf outside), and softmax(x) for the legacy form."""
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * A + cols[None, :], mask=ok,
                other=float("-inf")).to(tl.float32)  # fmt: skip
    if LEGACY:
        e = tl.where(ok, tl.exp(x - _row_max(x)[:, None]), 0.0)
        x = tl.where(ok, e / tl.maximum(tl.sum(e, axis=1), 1e-30)[:, None], float("-inf"))
    return x


@triton.jit
def _row_max(s):
    """Each row's max, 0 for a row that is all padding (no -inf - -inf)."""
    big = tl.max(s, axis=1)
    return tl.where(big == float("-inf"), 0.0, big)


@triton.jit
def _log1p(u):
    """log(1 + u) to a few ulps for u >= 0, from log alone (Goldberg's form)."""
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _count(keep_ptr, B, HAS_KEEP: tl.constexpr, BLOCK_B: tl.constexpr):
    """The number of kept questions (fp32)."""
    if HAS_KEEP:
        count = 0.0
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            kept = tl.load(keep_ptr + rows, mask=rows < B, other=0).to(tl.float32)
            count += tl.sum(kept, axis=0)
    else:
        count = B * 1.0
    return count


@triton.jit
def _ce_fwd_kernel(
    x_ptr, t_ptr, keep_ptr, loss_ptr, B, A,
    LEGACY: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, BLOCK_A)
    total = 0.0
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        r_ok = rows < B
        ok = r_ok[:, None] & (cols < A)[None, :]
        s = _scores(x_ptr, rows, cols, ok, A, LEGACY)
        big = _row_max(s)
        top = s == big[:, None]
        # lse - s_t = log1p(rest) - (s_t - max), rest = sum(exp(s - max)) - 1 summed over
        # all but one of the max's columns (each exactly 1): no cancellation where the
        # target leads and the loss is small.
        rest = tl.sum(tl.where(ok & ~top, tl.exp(s - big[:, None]), 0.0), axis=1)
        rest += tl.sum(top.to(tl.float32), axis=1) - 1.0
        t = tl.load(t_ptr + rows, mask=r_ok, other=0)
        picked = tl.sum(tl.where(cols[None, :] == t[:, None], s - big[:, None], 0.0), axis=1)
        per_row = tl.where(r_ok, _log1p(tl.where(r_ok, rest, 0.0)) - picked, 0.0)
        if HAS_KEEP:
            per_row = tl.where(tl.load(keep_ptr + rows, mask=r_ok, other=0) != 0, per_row, 0.0)
        total += tl.sum(per_row, axis=0)
    tl.store(loss_ptr, total / _count(keep_ptr, B, HAS_KEEP, BLOCK_B))


@triton.jit
def _ce_bwd_kernel(
    x_ptr, t_ptr, keep_ptr, g_ptr, dx_ptr, B, A,
    LEGACY: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, BLOCK_A)
    scale = tl.load(g_ptr).to(tl.float32) / _count(keep_ptr, B, HAS_KEEP, BLOCK_B)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        r_ok = rows < B
        ok = r_ok[:, None] & (cols < A)[None, :]
        s = _scores(x_ptr, rows, cols, ok, A, LEGACY)
        e = tl.where(ok, tl.exp(s - _row_max(s)[:, None]), 0.0)
        p = e / tl.where(r_ok, tl.sum(e, axis=1), 1.0)[:, None]
        t = tl.load(t_ptr + rows, mask=r_ok, other=0)
        is_t = cols[None, :] == t[:, None]
        c = tl.where(r_ok, scale, 0.0)  # each row's dL/dloss_b
        if HAS_KEEP:
            c = tl.where(tl.load(keep_ptr + rows, mask=r_ok, other=0) != 0, c, 0.0)
        # 1 - p_t as the sum of the other answers' p: no cancellation where p_t is near one.
        p_rest = tl.sum(tl.where(is_t, 0.0, p), axis=1)
        if LEGACY:
            # ds_i - <s, ds> with ds = p - onehot(t) and sum(s) = 1, regrouped so that each
            # sum has terms of one sign: dx stays accurate where s_t is near one.
            sm = tl.where(ok, s, 0.0)  # the softmax of x
            s_t = tl.sum(tl.where(is_t, sm, 0.0), axis=1)
            s_rest = tl.sum(tl.where(is_t, 0.0, sm), axis=1)
            sp_rest = tl.sum(tl.where(is_t, 0.0, sm * p), axis=1)
            inner = tl.where(
                is_t, -(s_rest * p_rest + sp_rest)[:, None], p + (s_t * p_rest - sp_rest)[:, None]
            )
            ds = c[:, None] * (sm * inner)
        else:
            ds = c[:, None] * tl.where(is_t, -p_rest[:, None], p)
        offs = rows.to(tl.int64)[:, None] * A + cols[None, :]
        tl.store(dx_ptr + offs, ds.to(dx_ptr.dtype.element_ty), mask=ok)


def cross_entropy_config(a: int, legacy: bool, has_keep: bool) -> LaunchConfig:
    """One program for all rows, BLOCK_B rows a step, the whole score row pow2(A)."""
    return LaunchConfig(
        grid=(1,),
        constexprs=dict(
            LEGACY=legacy,
            HAS_KEEP=has_keep,
            BLOCK_B=BLOCK_B,
            BLOCK_A=triton.next_power_of_2(max(a, 2)),
        ),
        num_warps=4,
        num_stages=1,
    )


@triton_op("rwmn::cross_entropy", mutates_args=())
def _cross_entropy_op(
    x: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None, legacy: bool
) -> torch.Tensor:
    batch, a = x.shape
    loss = torch.empty((), device=x.device, dtype=torch.float32)
    config = cross_entropy_config(a, legacy, keep is not None)
    launch(_ce_fwd_kernel, config, x, target, target if keep is None else keep, loss, batch, a)
    return loss


@triton_op("rwmn::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(
    grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None,
    legacy: bool,
) -> torch.Tensor:  # fmt: skip
    batch, a = x.shape
    dx = torch.empty_like(x)
    config = cross_entropy_config(a, legacy, keep is not None)
    launch(
        _ce_bwd_kernel, config,
        x, target, target if keep is None else keep, grad, dx, batch, a,
    )  # fmt: skip
    return dx


@_cross_entropy_op.register_fake
def _cross_entropy_fake(x, target, keep, legacy):
    return x.new_empty((), dtype=torch.float32)


@_cross_entropy_backward_op.register_fake
def _cross_entropy_backward_fake(grad, x, target, keep, legacy):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, target, keep, legacy = inputs
    ctx.save_for_backward(x, target, keep)
    ctx.legacy = legacy


def _backward(ctx, grad):
    x, target, keep = ctx.saved_tensors
    dx = torch.ops.rwmn.cross_entropy_backward(grad, x, target, keep, ctx.legacy)
    return dx, None, None, None


_cross_entropy_op.register_autograd(_backward, setup_context=_setup)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    keep: torch.Tensor | None = None,
    legacy: bool = False,
) -> torch.Tensor:
    """Fused kernels.reference.cross_entropy: logits [B, A], target [B] (int), keep [B]
    (bool) or None -> the mean loss over the kept questions (fp32 scalar)."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} must be [B, A] and target "
            f"{tuple(target.shape)} [B]"
        )
    if keep is not None and keep.shape != target.shape:
        raise ValueError(f"cross_entropy: keep {tuple(keep.shape)} must be [B] like target")
    if runs_reference("cross_entropy", logits.dtype, answers=(logits.shape[1], MAX_FUSED_A)):
        return reference.cross_entropy(logits, target, keep, legacy)
    return torch.ops.rwmn.cross_entropy(logits.contiguous(), target.contiguous(), keep, legacy)


__all__ = ["cross_entropy"]
