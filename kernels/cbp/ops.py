"""Compact bilinear pooling's host side: checked launchers, the ``rwmn::cbp_*`` custom ops
(fakes and autograd), and the entry points ``cbp`` (rwmn.ops.cbp under the "triton"
backend) and ``cbp_with_vjp`` (the read network's recompute).

Dispatch: D with an FFT plan (kernels.cbp.plan.fft_plan) takes the FFT path: one launch
(rwmn::cbp_fft_forward) without a gradient or broadcast, else spectra + product launches
(rwmn::cbp_fft) and one backward launch; other D take the dense path (rwmn::cbp_dense).
Launchers read the kernels from kernels.cbp.kernels and kernels.cbp.dense at launch time,
and the custom ops call the launchers through this module's globals, so tests can swap
either.

May import: torch, triton (not triton.language), kernels._common, kernels.reference,
kernels.unit_norm (the normalised CBP), kernels.cbp.plan, kernels.cbp.kernels,
kernels.cbp.dense and kernels.cbp.sums.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
from torch.library import triton_op

from kernels import reference
from kernels._common import compute_dtype, launch, runs_reference
from kernels.cbp import dense as dense_kernels
from kernels.cbp import kernels as cbp_kernels
from kernels.cbp.plan import (
    MAX_FUSED_DIM,
    cached_inverse_hash,
    cached_twiddles,
    cbp_config,
    check_hash,
    fft_plan,
    half_spectrum,
    input_precision,
    pairs_per_program,
    row_indices,
    row_offsets,
    workspace_numel,
)
from kernels.cbp.sums import broadcast_sums
from kernels.unit_norm import row_norms, unit_norm

# --------------------------------------------------------------------------------------
# Checks and launchers
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


def _check_twiddles(twiddles: torch.Tensor, out_dim: int) -> None:
    if twiddles.shape != (2 * out_dim,) or twiddles.dtype != torch.float32:
        raise ValueError(
            f"cbp: twiddle table of shape {tuple(twiddles.shape)} and dtype {twiddles.dtype} "
            f"must be fp32 [{2 * out_dim}] (see twiddle_table)"
        )


def _check_workspace(workspace: torch.Tensor, need: int) -> None:
    if workspace.dtype != torch.float32 or workspace.numel() < need:
        raise ValueError(
            f"cbp: workspace of shape {tuple(workspace.shape)} and dtype {workspace.dtype} is "
            f"too small: fp32 with at least {need} values (workspace_numel)"
        )


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
    precision = input_precision(x, y)
    for v, h, s, spec in ((x, h1, s1, xs), (y, h2, s2, ys)):
        rows = v.shape[0]
        config = cbp_config("spectra", out_dim, precision, rows, radices=radices)
        launch(
            cbp_kernels._cbp_spectra_kernel, config,
            v, *cached_inverse_hash(h, s, out_dim), twiddles, spec, workspace, rows, v.shape[1],
            pairs_per_program(triton.cdiv(rows, 2), out_dim, "spectra"),
        )  # fmt: skip


def cbp_forward_launch(
    x, y, h1, s1, h2, s2, twiddles, out, workspace, radices, normalize: bool = False
) -> None:
    """Launch the forward-only kernel: out [R, D] (contiguous) = CBP of the rows of x [R, n1]
    and y [R, n2] (contiguous, unbroadcast; of their unit-normalised rows with
    ``normalize``), nothing saved, products at out's dtype's precision; workspace with
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
    config = cbp_config("forward", out_dim, input_precision(out), rows, radices=radices)
    config = dataclasses.replace(config, constexprs={**config.constexprs, "NORMALIZE": normalize})
    # With normalize the rows' inverse norms first (two small launches; inside the CBP
    # kernel their loops spilled under triton 3.6).
    xn, yn = (row_norms(x), row_norms(y)) if normalize else (out, out)
    launch(
        cbp_kernels._cbp_fwd_kernel, config,
        x, y, xn, yn, *cached_inverse_hash(h1, s1, out_dim), *cached_inverse_hash(h2, s2, out_dim),
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
        cbp_kernels._cbp_product_kernel, config,
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
        cbp_kernels._cbp_bwd_kernel, config,
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
    config = cbp_config("dense_forward", out_dim, input_precision(x, y), rows)
    launch(
        dense_kernels._cbp_dense_fwd_kernel, config,
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
    config = cbp_config("dense_spectra", out_dim, input_precision(x), rows)
    launch(
        dense_kernels._cbp_dense_spectra_kernel, config, x, h, s, twiddles, spec, rows, x.shape[1]
    )


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
    config = cbp_config("dense_backward", out_dim, input_precision(grad, x, y), rows)
    launch(
        dense_kernels._cbp_dense_bwd_kernel, config,
        grad, x, y, xoff, yoff, h1, s1, h2, s2, twiddles, gx, gy, workspace,
        rows, x.shape[-1], y.shape[-1],
    )  # fmt: skip


def _check_rows(name: str, t: torch.Tensor, offsets: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"cbp: {name} of shape {tuple(t.shape)} must have a unit last stride")
    if offsets.dtype != torch.int64 or not offsets.is_contiguous():
        raise ValueError(f"cbp: {name} row offsets must be contiguous int64")


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
            input_precision(x, y),
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
    normalize: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """CBP by the FFT path in one launch, for x [*L, n1] and y [*L, n2] (contiguous, the same
    leading shape) when no gradient is needed: nothing is saved. With ``normalize`` the CBP
    of the unit-normalised rows. Returns [*L, D] in ``dtype`` (default promote(x, y)), the
    precision its products run at."""
    out_dim = twiddles.numel() // 2
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    rows = x2.shape[0]
    out = x.new_empty((rows, out_dim), dtype=dtype or torch.promote_types(x.dtype, y.dtype))
    if rows:
        ws = x.new_empty(workspace_numel("forward", out_dim, rows), dtype=torch.float32)
        cbp_forward_launch(x2, y2, h1, s1, h2, s2, twiddles, out, ws, tuple(radices), normalize)
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
    gy_add: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of cbp_fft's output in x and y (shaped like them), summed over the rows
    each was broadcast to; ``gy_add`` (y's shape), a gradient y's accumulates onto."""
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
            input_precision(grad, x, y),
        )  # fmt: skip
    return broadcast_sums(gx, x, gy, y, lead, gy_add)


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
    gy_add: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of cbp_dense in x and y, summed over the rows each was broadcast to;
    ``gy_add`` as in cbp_fft_backward."""
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
    return broadcast_sums(gx, x, gy, y, lead, gy_add)


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
def _cbp_fft_forward_fake(x, y, h1, s1, h2, s2, twiddles, radices, normalize=False, dtype=None):
    return x.new_empty(
        (*x.shape[:-1], twiddles.shape[0] // 2),
        dtype=dtype or torch.promote_types(x.dtype, y.dtype),
    )


@cbp_fft_backward.register_fake
def _cbp_fft_backward_fake(
    grad, x, y, xs, ys, xidx, yidx, h1, s1, h2, s2, twiddles, radices, gy_add=None
):
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
def _cbp_dense_backward_fake(grad, x, y, xoff, yoff, h1, s1, h2, s2, twiddles, gy_add=None):
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


def cbp_with_vjp(
    x: torch.Tensor,
    y: torch.Tensor,
    h1: torch.Tensor,
    s1: torch.Tensor,
    h2: torch.Tensor,
    s2: torch.Tensor,
    out_dim: int,
):
    """(out, vjp) for a caller that runs its own backward: out = CBP(x, y) [*L, D] of the
    broadcast operands by the fused kernels, and vjp(dL/dout, gy_add=None) -> (dL/dx,
    dL/dy + gy_add) shaped like x and y (summed over broadcast rows), reusing what the
    forward computed. No autograd:
    the fused read network recomputes its CBP this way in its backward. x and y must be in
    a fused dtype, D <= MAX_FUSED_DIM, hashes checked by the caller."""
    lead = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    x, y = x.contiguous(), y.contiguous()
    twiddles = cached_twiddles(out_dim, x.device)
    radices = fft_plan(out_dim)
    if radices is None:
        xoff, yoff = row_offsets(x, lead), row_offsets(y, lead)
        out = torch.ops.rwmn.cbp_dense(x, y, xoff, yoff, h1, s1, h2, s2, twiddles)

        def dense_vjp(grad, gy_add=None):
            return torch.ops.rwmn.cbp_dense_backward(
                grad.to(out.dtype).contiguous(), x, y, xoff, yoff, h1, s1, h2, s2, twiddles,
                gy_add,
            )  # fmt: skip

        return out, dense_vjp
    xidx, yidx = row_indices(x, y, lead)
    out, xs, ys = torch.ops.rwmn.cbp_fft(x, y, xidx, yidx, h1, s1, h2, s2, twiddles, list(radices))

    def fft_vjp(grad, gy_add=None):
        return torch.ops.rwmn.cbp_fft_backward(
            grad.to(out.dtype), x, y, xs, ys, xidx, yidx, h1, s1, h2, s2, twiddles,
            list(radices), gy_add,
        )  # fmt: skip

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
    normalize: bool = False,
) -> torch.Tensor:
    """Fused compact bilinear pooling, same contract as :func:`kernels.reference.cbp`: the
    FFT path where D has a plan (fft_plan, D >= plan.FACTORISED_MIN_DIM), else the dense
    path; unfused sizes and dtypes fall back to the reference with a warning. With
    ``normalize``, of the unit-normalised rows: inside the one-launch forward in half
    precision (no gradient, no broadcast: the video story under autocast), else by
    kernels.unit_norm first."""
    if x.dim() < 1 or y.dim() < 1:
        raise ValueError(
            f"cbp: inputs of shapes {tuple(x.shape)}, {tuple(y.shape)} need a last axis"
        )
    if out_dim < 1:
        raise ValueError(f"cbp: out_dim must be positive, got {out_dim}")
    if runs_reference("cbp", x.dtype, y.dtype, out_dim=(out_dim, MAX_FUSED_DIM)):
        return reference.cbp(x, y, h1, s1, h2, s2, out_dim, sum_pool, normalize)
    check_hash("h1", h1, s1, x.shape[-1], out_dim)
    check_hash("h2", h2, s2, y.shape[-1], out_dim)
    lead = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    radices = fft_plan(out_dim)
    one_launch = (
        radices is not None
        and x.shape[:-1] == y.shape[:-1] == lead
        and not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))
    )
    # Custom ops have no autocast rule: the products run in the autocast dtype like the
    # other fused ops. The one-launch forward reads the inputs as they are; normalising in
    # it pays where it saves the casts of the normalised rows (a half compute dtype: the
    # video story under autocast). In fp32 the fused unit norm runs first (the fp32 kernel
    # with the sketches scaled spilled).
    dtype = compute_dtype(x, y)
    if normalize and not (one_launch and dtype != torch.float32):
        x, y, normalize = unit_norm(x), unit_norm(y), False
    if one_launch:
        out = torch.ops.rwmn.cbp_fft_forward(
            x.contiguous(), y.contiguous(), h1, s1, h2, s2, cached_twiddles(out_dim, x.device),
            list(radices), normalize, dtype,
        )  # fmt: skip
        return out.sum(dim=tuple(range(1, out.dim() - 1))) if sum_pool and out.dim() > 2 else out
    x, y = x.to(dtype), y.to(dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if y.stride(-1) != 1:
        y = y.contiguous()
    twiddles = cached_twiddles(out_dim, x.device)
    if radices is None:
        out = torch.ops.rwmn.cbp_dense(
            x, y, row_offsets(x, lead), row_offsets(y, lead), h1, s1, h2, s2, twiddles
        )
    else:
        x, y = x.contiguous(), y.contiguous()
        xidx, yidx = row_indices(x, y, lead)
        out, _, _ = torch.ops.rwmn.cbp_fft(
            x, y, xidx, yidx, h1, s1, h2, s2, twiddles, list(radices)
        )
    if sum_pool and out.dim() > 2:
        out = out.sum(dim=tuple(range(1, out.dim() - 1)))
    return out
