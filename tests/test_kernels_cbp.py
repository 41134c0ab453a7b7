"""Fused compact bilinear pooling (kernels/cbp/) against rwmn.reference.cbp and an
independent float64 numpy implementation (direct circular convolution, no FFT).

On CPU the kernels run in the Triton interpreter (fp32, tiny shapes); the CUDA-marked
tests cover bf16/fp16, autocast and torch.compile(fullgraph=True).
"""

import contextlib
import math
import os
import warnings
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: @triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_helpers import (  # noqa: E402
    LOW_PRECISION_RATIO,
    LOW_PRECISION_REL_ATOL,
    cbp_fft_threshold,
    check_against_float64,
)

import kernels._common as kernels_common  # noqa: E402
import kernels.cbp as kcbp  # noqa: E402
from kernels._common import record_launches  # noqa: E402
from kernels.cbp import ops as cbp_ops  # noqa: E402
from kernels.cbp import plan as cbp_plan  # noqa: E402
from kernels.cbp.sums import broadcast_sums  # noqa: E402
from kernels.work import executed_work  # noqa: E402
from rwmn import ops, reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

#: fp32 kernel vs float64 truth, relative to the largest magnitude of the true tensor.
FP32_RTOL = 2e-5

# (x shape, y shape, out_dim, sum_pool): odd and even D (even D has a Nyquist bin), odd n1
# and n2, the story form (same rows), the read-network form (both operands broadcast), a
# 1-D y, sum pooling with and without broadcasting, and the model's sizes D = 300, 600.
CASES = [
    ((7, 37), (7, 23), 17, False),
    ((5, 40), (5, 33), 32, False),
    ((1, 2, 3, 19), (2, 1, 1, 19), 19, False),
    ((4, 3, 21), (21,), 21, False),
    ((2, 3, 5, 13), (2, 3, 5, 11), 15, True),
    ((2, 3, 1, 9), (2, 1, 4, 7), 16, True),
    ((3, 31), (3, 9), 300, False),
    ((2, 17), (2, 40), 600, False),
]
CASE_IDS = [f"x{xs}-y{ys}-D{d}{'-pool' if p else ''}" for xs, ys, d, p in CASES]


# --------------------------------------------------------------------------------------
# float64 numpy ground truth
# --------------------------------------------------------------------------------------


def np_sketch(v, h, s, out_dim):
    out = np.zeros(v.shape[:-1] + (out_dim,))
    for i, (hi, si) in enumerate(zip(h, s, strict=True)):
        out[..., hi] += si * v[..., i]
    return out


def np_circular_conv(p, q):
    """out_j = sum_a p_a q_{(j - a) mod D}, directly (np.roll(q, a)[j] = q[j - a])."""
    out_dim = p.shape[-1]
    return sum(p[..., a : a + 1] * np.roll(q, a, axis=-1) for a in range(out_dim))


def np_sum_to(a, shape):
    """Sum a over the axes that broadcasting to a.shape added or stretched."""
    a = a.sum(axis=tuple(range(a.ndim - len(shape))))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return a.sum(axis=stretched, keepdims=True)


def np_cbp(x, y, h1, s1, h2, s2, out_dim, sum_pool):
    out = np_circular_conv(np_sketch(x, h1, s1, out_dim), np_sketch(y, h2, s2, out_dim))
    if sum_pool and out.ndim > 2:
        out = out.sum(axis=tuple(range(1, out.ndim - 1)))
    return out


def np_cbp_row_grads(x, y, h1, s1, h2, s2, g_rows):
    """Per broadcast row: dL/dx_i = s1(i) (g corr q)_{h1(i)}, symmetrically for y."""
    out_dim = g_rows.shape[-1]
    p = np.broadcast_to(np_sketch(x, h1, s1, out_dim), g_rows.shape)
    q = np.broadcast_to(np_sketch(y, h2, s2, out_dim), g_rows.shape)
    # (g corr q)_a = sum_j g_j q_{(j - a) mod D}
    gp = np.stack([(g_rows * np.roll(q, a, axis=-1)).sum(-1) for a in range(out_dim)], -1)
    gq = np.stack([(g_rows * np.roll(p, a, axis=-1)).sum(-1) for a in range(out_dim)], -1)
    return gp[..., h1] * s1, gq[..., h2] * s2


def np_cbp_grads(x, y, h1, s1, h2, s2, out_dim, sum_pool, g):
    lead = np.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    if sum_pool and len(lead) > 1:
        g = g.reshape(g.shape[:1] + (1,) * (len(lead) - 1) + g.shape[1:])
    g_rows = np.broadcast_to(g, lead + (out_dim,))
    gx, gy = np_cbp_row_grads(x, y, h1, s1, h2, s2, g_rows)
    return np_sum_to(gx, x.shape), np_sum_to(gy, y.shape)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def make_hashes(n, out_dim, gen, device=DEVICE):
    h = torch.randint(out_dim, (n,), generator=gen).to(device)
    s = (torch.randint(2, (n,), generator=gen) * 2 - 1).float().to(device)
    return h, s


def make_inputs(x_shape, y_shape, out_dim, seed, dtype=torch.float32, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=gen).to(device=device, dtype=dtype)
    y = torch.randn(y_shape, generator=gen).to(device=device, dtype=dtype)
    h1, s1 = make_hashes(x_shape[-1], out_dim, gen, device)
    h2, s2 = make_hashes(y_shape[-1], out_dim, gen, device)
    return x, y, h1, s1, h2, s2


def to_np(*tensors):
    return [t.detach().double().cpu().numpy() for t in tensors]


def assert_close_to_truth(actual, truth, rtol=FP32_RTOL, what=""):
    truth = torch.as_tensor(np.ascontiguousarray(truth))
    actual = actual.detach().double().cpu()
    assert actual.shape == truth.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = truth.abs().max().item()
    err = (actual - truth).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.1e} * {scale:.3e}"


def fresh_seed(request):
    # A different seed per test case, stable across runs so a failure reproduces.
    return zlib.crc32(request.node.nodeid.encode())


# --------------------------------------------------------------------------------------
# CPU (interpreter) / GPU fp32 correctness
# --------------------------------------------------------------------------------------


def check_cbp_output_and_grads(x_shape, y_shape, out_dim, sum_pool, seed):
    """kcbp.cbp and its gradients vs the reference vs float64 truth."""
    x, y, h1, s1, h2, s2 = make_inputs(x_shape, y_shape, out_dim, seed)
    x.requires_grad_(True)
    y.requires_grad_(True)
    out = kcbp.cbp(x, y, h1, s1, h2, s2, out_dim, sum_pool)
    ref = reference.cbp(x, y, h1, s1, h2, s2, out_dim, sum_pool)
    g = torch.randn_like(ref)
    gx, gy = torch.autograd.grad(out, (x, y), g)
    rgx, rgy = torch.autograd.grad(ref, (x, y), g)

    npx, npy, nh1, ns1, nh2, ns2, ng = to_np(x, y, h1, s1, h2, s2, g)
    nh1, nh2 = nh1.astype(np.int64), nh2.astype(np.int64)
    truth = np_cbp(npx, npy, nh1, ns1, nh2, ns2, out_dim, sum_pool)
    tgx, tgy = np_cbp_grads(npx, npy, nh1, ns1, nh2, ns2, out_dim, sum_pool, ng)

    assert out.dtype == ref.dtype and out.shape == ref.shape
    for name, fused, refd, t in (
        ("out", out, ref, truth),
        ("grad x", gx, rgx, tgx),
        ("grad y", gy, rgy, tgy),
    ):
        assert_close_to_truth(refd, t, what=f"reference {name}")  # the truth is right
        assert_close_to_truth(fused, t, what=f"fused {name}")
        torch.testing.assert_close(fused, refd, rtol=0, atol=2 * FP32_RTOL * np.abs(t).max())


@pytest.mark.parametrize(("x_shape", "y_shape", "out_dim", "sum_pool"), CASES, ids=CASE_IDS)
def test_cbp_output_and_grads_fp32(x_shape, y_shape, out_dim, sum_pool, request):
    check_cbp_output_and_grads(x_shape, y_shape, out_dim, sum_pool, fresh_seed(request))


def _launch_inputs(x_shape, y_shape, out_dim, seed):
    x, y, h1, s1, h2, s2 = make_inputs(x_shape, y_shape, out_dim, seed)
    lead = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    g = torch.randn(*lead, out_dim, generator=torch.Generator().manual_seed(seed + 1))
    return x, y, h1, s1, h2, s2, lead, g.to(DEVICE)


def _check_against_truth(x, y, h1, s1, h2, s2, lead, g, out, gx, gy):
    rows, out_dim = out.shape
    npx, npy, nh1, ns1, nh2, ns2, ng = to_np(x, y, h1, s1, h2, s2, g)
    nh1, nh2 = nh1.astype(np.int64), nh2.astype(np.int64)
    truth = np_cbp(npx, npy, nh1, ns1, nh2, ns2, out_dim, False).reshape(rows, out_dim)
    tgx, tgy = np_cbp_row_grads(npx, npy, nh1, ns1, nh2, ns2, ng)
    assert_close_to_truth(out, truth, what="out")
    assert_close_to_truth(gx, tgx.reshape(rows, -1), what="per-row grad x")
    assert_close_to_truth(gy, tgy.reshape(rows, -1), what="per-row grad y")


def check_dense_launchers_write_every_element(x_shape, y_shape, out_dim, seed):
    """Dense path. Outputs, gradients and workspaces start as NaN: every output element
    must be written and no workspace element read before it is written."""
    x, y, h1, s1, h2, s2, lead, g = _launch_inputs(x_shape, y_shape, out_dim, seed)
    xoff = cbp_plan.row_offsets(x, lead).reshape(-1)
    yoff = cbp_plan.row_offsets(y, lead).reshape(-1)
    rows = xoff.numel()
    twiddles = cbp_plan.twiddle_table(out_dim, DEVICE)
    nan = float("nan")
    out = torch.full((rows, out_dim), nan, device=DEVICE)
    ws = torch.full((cbp_plan.workspace_numel("dense_forward", out_dim, rows),), nan, device=DEVICE)
    cbp_ops.cbp_dense_forward_launch(x, y, xoff, yoff, h1, s1, h2, s2, twiddles, out, ws)
    gx = torch.full((rows, x.shape[-1]), nan, device=DEVICE)
    gy = torch.full((rows, y.shape[-1]), nan, device=DEVICE)
    ws = torch.full(
        (cbp_plan.workspace_numel("dense_backward", out_dim, rows),), nan, device=DEVICE
    )
    cbp_ops.cbp_dense_backward_launch(
        g.reshape(rows, out_dim), x, y, xoff, yoff, h1, s1, h2, s2, twiddles, gx, gy, ws
    )
    _check_against_truth(x, y, h1, s1, h2, s2, lead, g, out, gx, gy)


def guarded(rows: int, out_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN-poisoned [rows, out_dim] output and the poisoned row just after it in memory:
    the FFT launches write two rows per inverse, the second only where it exists."""
    buf = torch.full((rows + 1, out_dim), float("nan"), device=DEVICE)
    return buf[:rows], buf[rows]


def check_fft_launchers_write_every_element(x_shape, y_shape, out_dim, seed):
    """FFT path (spectra, product, backward launches). Spectra, outputs, gradients and every
    workspace start as NaN; the spectra must equal the float64 DFT of the sketches."""
    radices = cbp_plan.fft_plan(out_dim, min_dim=1)
    assert radices is not None
    x, y, h1, s1, h2, s2, lead, g = _launch_inputs(x_shape, y_shape, out_dim, seed)
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    xidx = cbp_plan.row_offsets(x, lead).reshape(-1) // x.shape[-1]
    yidx = cbp_plan.row_offsets(y, lead).reshape(-1) // y.shape[-1]
    rows, k = xidx.numel(), cbp_plan.half_spectrum(out_dim)
    twiddles = cbp_plan.twiddle_table(out_dim, DEVICE)
    nan = float("nan")

    def poisoned(*shape):
        return torch.full(shape, nan, device=DEVICE)

    xs, ys = poisoned(x2.shape[0], 2 * k), poisoned(y2.shape[0], 2 * k)
    ws = poisoned(cbp_plan.workspace_numel("spectra", out_dim, x2.shape[0], y2.shape[0]))
    cbp_ops.cbp_spectra_launch(x2, y2, h1, s1, h2, s2, twiddles, xs, ys, ws, radices)
    for name, v, h, s, spec in (("x", x2, h1, s1, xs), ("y", y2, h2, s2, ys)):
        nv, nh, ns = to_np(v, h, s)
        dft = np.fft.rfft(np_sketch(nv, nh.astype(np.int64), ns, out_dim), axis=-1)
        assert_close_to_truth(
            spec, np.concatenate((dft.real, dft.imag), -1), what=f"{name} spectra"
        )

    out, guard = guarded(rows, out_dim)
    ws = poisoned(cbp_plan.workspace_numel("product", out_dim, rows))
    cbp_ops.cbp_product_launch(xs, ys, xidx, yidx, twiddles, out, ws, radices, "ieee")
    assert guard.isnan().all(), "the product launch wrote past its last output row"
    gx, gy = poisoned(rows, x.shape[-1]), poisoned(rows, y.shape[-1])
    ws = poisoned(cbp_plan.workspace_numel("backward", out_dim, rows))
    cbp_ops.cbp_backward_launch(
        g.reshape(rows, out_dim), xs, ys, xidx, yidx, h1, s1, h2, s2, twiddles, gx, gy, ws,
        radices, "ieee",
    )  # fmt: skip
    _check_against_truth(x, y, h1, s1, h2, s2, lead, g, out, gx, gy)


@pytest.mark.parametrize(("x_shape", "y_shape", "out_dim", "sum_pool"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("path", ["dense", "fft"])
def test_launchers_write_every_element(x_shape, y_shape, out_dim, sum_pool, path, request):
    if path == "dense":
        check_dense_launchers_write_every_element(x_shape, y_shape, out_dim, fresh_seed(request))
    elif cbp_plan.fft_plan(out_dim, min_dim=1) is None:
        pytest.skip(f"D = {out_dim} has no radix plan (a prime factor > {cbp_plan.MAX_RADIX})")
    else:
        check_fft_launchers_write_every_element(x_shape, y_shape, out_dim, fresh_seed(request))


# --------------------------------------------------------------------------------------
# FFT path, forced at tiny D with tiny tiles
# --------------------------------------------------------------------------------------

# (x shape, y shape, D): the story form with an odd number of rows (a last pair with one
# row), the read-network form (both operands broadcast), odd D, one to three stages.
FFT_CASES = [
    ((19, 37), (19, 23), 12),
    ((4, 19), (4, 30), 15),
    ((1, 3, 4, 11), (2, 1, 1, 13), 16),
    ((2, 3, 5, 13), (2, 3, 1, 11), 45),
    ((3, 21), (3, 17), 80),
    ((1, 2, 3, 9), (2, 1, 1, 10), 300),
    ((5, 17), (5, 40), 600),
    ((3, 7), (3, 5), 2310),
]
FFT_IDS = [f"x{xs}-y{ys}-D{d}" for xs, ys, d in FFT_CASES]


@pytest.fixture
def small_tiles(monkeypatch):
    """Stage tiles of 16 rows and 1-D chunks of 16, so at these D every j loop of a stage
    and every chunk loop (sketch, spectrum, gather) runs more than once."""
    monkeypatch.setattr(cbp_plan, "BLOCK_S", 16)
    monkeypatch.setattr(cbp_plan, "FFT_BLOCK_J", 16)
    monkeypatch.setattr(cbp_plan, "FFT_BLOCK_J_ONE_TILE", 0)
    cbp_plan._plan.cache_clear()
    yield
    cbp_plan._plan.cache_clear()


@pytest.mark.parametrize(("x_shape", "y_shape", "out_dim"), FFT_CASES, ids=FFT_IDS)
def test_fft_launchers_write_every_element(x_shape, y_shape, out_dim, small_tiles, request):
    check_fft_launchers_write_every_element(x_shape, y_shape, out_dim, fresh_seed(request))


def test_fft_cases_run_one_to_three_stages(small_tiles):
    assert {len(cbp_plan.fft_plan(d, min_dim=1)) for _, _, d in FFT_CASES} == {1, 2, 3}


def test_fft_four_stages(request):
    """D = 16000 = 10 x 10 x 10 x 16 (default tiles): the four-stage transform."""
    assert len(cbp_plan.fft_plan(16000)) == 4
    check_fft_launchers_write_every_element((2, 5), (2, 4), 16000, fresh_seed(request))


def check_fft_forward_launcher_writes_every_element(shape1, shape2, out_dim, seed):
    """The forward-only FFT launch (unbroadcast rows, nothing saved) with its output and
    workspace NaN-poisoned, against the float64 truth."""
    radices = cbp_plan.fft_plan(out_dim, min_dim=1)
    x, y, h1, s1, h2, s2 = make_inputs(shape1, shape2, out_dim, seed)
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    rows = x2.shape[0]
    out, guard = guarded(rows, out_dim)
    ws = torch.full(
        (cbp_plan.workspace_numel("forward", out_dim, rows),), float("nan"), device=DEVICE
    )
    twiddles = cbp_plan.twiddle_table(out_dim, DEVICE)
    cbp_ops.cbp_forward_launch(x2, y2, h1, s1, h2, s2, twiddles, out, ws, radices)
    assert guard.isnan().all(), "the forward launch wrote past its last output row"
    npx, npy, nh1, ns1, nh2, ns2 = to_np(x2, y2, h1, s1, h2, s2)
    truth = np_cbp(npx, npy, nh1.astype(np.int64), ns1, nh2.astype(np.int64), ns2, out_dim, False)
    assert_close_to_truth(out, truth, what="forward-only out")


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "out_dim"),
    [c for c in FFT_CASES if c[0][:-1] == c[1][:-1]],
    ids=[i for c, i in zip(FFT_CASES, FFT_IDS, strict=True) if c[0][:-1] == c[1][:-1]],
)
def test_fft_forward_launcher_writes_every_element(x_shape, y_shape, out_dim, small_tiles, request):
    check_fft_forward_launcher_writes_every_element(x_shape, y_shape, out_dim, fresh_seed(request))


def spy_launchers(monkeypatch, *names):
    """Wrap the named launchers (kernels.cbp.ops) so each call appends its name to the
    returned list."""
    seen = []
    for name in names:
        launch = getattr(cbp_ops, name)

        def spy(*args, _launch=launch, _name=name):
            seen.append(_name)
            return _launch(*args)

        monkeypatch.setattr(cbp_ops, name, spy)
    return seen


@pytest.mark.parametrize("grad", [False, True])
def test_fft_forward_only_dispatch(grad, request, monkeypatch):
    """Without a gradient and without broadcasting (the story embedding) the public op runs
    the one-launch forward; with a gradient, the spectra + product launches it saves for."""
    seen = spy_launchers(
        monkeypatch, "cbp_forward_launch", "cbp_spectra_launch", "cbp_product_launch"
    )
    x, y, h1, s1, h2, s2 = make_inputs((5, 31), (5, 9), 300, fresh_seed(request))
    x.requires_grad_(grad)
    out = kcbp.cbp(x, y, h1, s1, h2, s2, 300)
    truth = np_cbp(*to_np(x, y), *(t.cpu().numpy() for t in (h1, s1, h2, s2)), 300, False)
    assert_close_to_truth(out, truth, what="out")
    if grad:
        assert seen == ["cbp_spectra_launch", "cbp_product_launch"]
    else:
        assert seen == ["cbp_forward_launch"]
    with torch.no_grad():
        seen.clear()
        kcbp.cbp(x, y, h1, s1, h2, s2, 300)
        assert seen == ["cbp_forward_launch"]


@pytest.mark.parametrize("pairs_per_program", [2, 5])
def test_fft_programs_loop_over_pairs(pairs_per_program, small_tiles, request, monkeypatch):
    """A small scratch budget makes each program own several pairs of rows (the pair loop
    runs more than once, reusing the NaN-poisoned scratch); 19 rows leave a half pair."""
    x_shape, y_shape, out_dim = FFT_CASES[0]
    floats = max(cbp_plan.scratch_floats(out_dim, kind) for kind in cbp_plan.SCRATCH_VECTORS)
    programs = -(-10 // pairs_per_program)
    monkeypatch.setattr(cbp_plan, "SCRATCH_BUDGET", 4 * floats * programs)
    assert cbp_plan.pairs_per_program(10, out_dim, "backward") == pairs_per_program
    assert cbp_plan.pairs_per_program(10, out_dim, "product") > 1
    assert cbp_plan.pairs_per_program(10, out_dim, "forward") == pairs_per_program
    check_fft_launchers_write_every_element(x_shape, y_shape, out_dim, fresh_seed(request))
    check_fft_forward_launcher_writes_every_element(x_shape, y_shape, out_dim, fresh_seed(request))


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "out_dim", "sum_pool"),
    [
        ((19, 37), (19, 23), 12, False),
        ((1, 3, 4, 11), (2, 1, 1, 13), 16, False),
        ((2, 3, 5, 13), (2, 3, 5, 11), 15, True),
    ],
)
def test_fft_cbp_output_and_grads_fp32(x_shape, y_shape, out_dim, sum_pool, request, monkeypatch):
    """The public entry point with the threshold lowered runs the FFT kernels (the
    launchers are spied on) and matches the float64 truth, forward and both gradients."""
    seen = spy_launchers(
        monkeypatch, "cbp_spectra_launch", "cbp_product_launch", "cbp_backward_launch"
    )
    cbp_fft_threshold(monkeypatch, 1)
    check_cbp_output_and_grads(x_shape, y_shape, out_dim, sum_pool, fresh_seed(request))
    assert seen == ["cbp_spectra_launch", "cbp_product_launch", "cbp_backward_launch"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("x_shape", "y_shape", "out_dim", "sum_pool", "fft_threshold"),
    [((3, 13), (3, 11), 15, False, 1), ((2, 1, 9), (1, 3, 7), 17, True, None)],
    ids=["fft", "dense"],
)
def test_cbp_every_dtype(
    x_shape, y_shape, out_dim, sum_pool, fft_threshold, dtype, request, monkeypatch
):
    """Output and both gradients in fp32, bf16 and fp16 on both paths (the half ones
    multiply fp32 scratch at "tf32", truncated as the hardware does), against the reference
    in the same dtype and float64."""
    if fft_threshold is not None:
        cbp_fft_threshold(monkeypatch, fft_threshold)
    x, y, h1, s1, h2, s2 = make_inputs(x_shape, y_shape, out_dim, fresh_seed(request))

    def fused(x, y):
        return kcbp.cbp(x, y, h1, s1, h2, s2, out_dim, sum_pool)

    def ref(x, y):
        return reference.cbp(x, y, h1, s1, h2, s2, out_dim, sum_pool)

    tol = {}
    if dtype != torch.float32:
        tol = dict(ratio=LOW_PRECISION_RATIO, rel_atol=LOW_PRECISION_REL_ATOL[dtype])
    check_against_float64(fused, ref, [x, y], dtype, DEVICE, **tol)


@pytest.mark.parametrize(
    ("out_dim", "radices"),
    [(300, (10, 30)), (600, (20, 30)), (4096, (16, 16, 16)), (16000, (10, 10, 10, 16)),
     (16384, (16, 32, 32))],
)  # fmt: skip
def test_fft_plans(out_dim, radices):
    assert cbp_plan.fft_plan(out_dim) == radices
    assert math.prod(radices) == out_dim and max(radices) <= cbp_plan.MAX_RADIX


@pytest.mark.parametrize("out_dim", [37, 97, 257, 4099, 12289, 16381, 2 * 4099, 3 * 4099])
def test_sizes_with_a_large_prime_factor_stay_dense(out_dim):
    """A prime factor > MAX_RADIX leaves no radix plan: the dense path."""
    assert cbp_plan.fft_plan(out_dim) is None
    assert cbp_plan.fft_plan(out_dim, min_dim=1) is None


def test_fft_threshold_is_a_parameter():
    assert cbp_plan.fft_plan(255) is None  # 15 x 17, below FACTORISED_MIN_DIM
    assert cbp_plan.fft_plan(255, min_dim=1) == (15, 17)
    assert cbp_plan.fft_plan(12, min_dim=1) == (12,)
    assert cbp_plan.fft_plan(256) == (16, 16)


def test_launcher_rejects_a_foreign_plan():
    x, y, h1, s1, h2, s2 = make_inputs((2, 9), (2, 7), 16, 0)
    k = cbp_plan.half_spectrum(16)
    xs, ys = torch.empty(2, 2 * k, device=DEVICE), torch.empty(2, 2 * k, device=DEVICE)
    ws = torch.empty(cbp_plan.workspace_numel("spectra", 16, 2, 2), device=DEVICE)
    twiddles = cbp_plan.twiddle_table(16, DEVICE)
    with pytest.raises(ValueError, match="fft_plan"):
        cbp_ops.cbp_spectra_launch(x, y, h1, s1, h2, s2, twiddles, xs, ys, ws, (4, 4))


def test_strided_inputs(request):
    """Leading axes with arbitrary strides are read in place; a non-unit last stride is
    made contiguous; an expanded (stride-0) y is never copied."""
    gen = torch.Generator().manual_seed(fresh_seed(request))
    out_dim = 13
    x = torch.randn(4, 2, 27, generator=gen).to(DEVICE).transpose(0, 1)  # [2, 4, 27]
    y = torch.randn(11, 4, generator=gen).to(DEVICE).t()[None].expand(2, 4, 11)
    h1, s1 = make_hashes(27, out_dim, gen)
    h2, s2 = make_hashes(11, out_dim, gen)
    xs = x.detach().clone().requires_grad_(True)
    out = kcbp.cbp(xs, y, h1, s1, h2, s2, out_dim)
    ref = reference.cbp(x, y, h1, s1, h2, s2, out_dim)
    truth = np_cbp(*to_np(x, y), h1.cpu().numpy(), s1.cpu().numpy(), h2.cpu().numpy(),
                   s2.cpu().numpy(), out_dim, False)  # fmt: skip
    assert_close_to_truth(out, truth, what="out")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    (gx,) = torch.autograd.grad(out, xs, torch.ones_like(out))
    (rgx,) = torch.autograd.grad(reference.cbp(xs, y, h1, s1, h2, s2, out_dim), xs,
                                 torch.ones_like(out))  # fmt: skip
    torch.testing.assert_close(gx, rgx, rtol=1e-4, atol=1e-4)


def test_twiddle_table_is_correctly_rounded():
    for out_dim in (15, 300, 4096):
        p = np.arange(out_dim) * (2 * np.pi / out_dim)
        expected = np.concatenate((np.cos(p), np.sin(p))).astype(np.float32)
        assert np.array_equal(cbp_plan.twiddle_table(out_dim, "cpu").numpy(), expected)


def test_row_offsets_use_strides_not_copies():
    x = torch.arange(6.0).view(2, 1, 3)
    off = cbp_plan.row_offsets(x, torch.Size([2, 4]))
    assert off.tolist() == [[0, 0, 0, 0], [3, 3, 3, 3]]
    y = torch.arange(12.0).view(4, 3)
    assert cbp_plan.row_offsets(y, torch.Size([2, 4])).tolist() == [[0, 3, 6, 9]] * 2


# --------------------------------------------------------------------------------------
# Dispatch, fallback, validation, custom-op registration
# --------------------------------------------------------------------------------------


def test_ops_dispatch_calls_fused_kernel(monkeypatch, request):
    calls = []
    fused = kcbp.cbp

    def counting(*args):
        calls.append(args[6])
        return fused(*args)

    monkeypatch.setattr(kcbp, "cbp", counting)
    x, y, h1, s1, h2, s2 = make_inputs((1, 3, 5, 20), (4, 1, 1, 20), 20, fresh_seed(request))
    with ops.use_backend("triton"):
        out = ops.cbp(x, y, h1, s1, h2, s2, 20)
    assert calls == [20]
    torch.testing.assert_close(out, reference.cbp(x, y, h1, s1, h2, s2, 20), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("out_dim", "dtype", "match"),
    [(cbp_plan.MAX_FUSED_DIM + 1, torch.float32, "at most"), (16, torch.float64, "float64")],
)
def test_fallback_warns_once(out_dim, dtype, match, request):
    kernels_common._warn_once.cache_clear()
    x, y, h1, s1, h2, s2 = make_inputs((2, 9), (2, 7), out_dim, fresh_seed(request), dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kcbp.cbp(x, y, h1, s1, h2, s2, out_dim)
        second = kcbp.cbp(x, y, h1, s1, h2, s2, out_dim)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and match in messages[0], messages
    expected = reference.cbp(x, y, h1, s1, h2, s2, out_dim)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_sizes_up_to_the_limit_are_fused():
    """Sizes up to MAX_FUSED_DIM launch the kernels (recorded, not run); one past it runs the
    reference."""
    x, y = torch.zeros(2, 3), torch.zeros(2, 5, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    for out_dim in (300, 600, 4096, 16000, cbp_plan.MAX_FUSED_DIM, cbp_plan.MAX_FUSED_DIM + 1):
        hashes = (*make_hashes(3, out_dim, gen), *make_hashes(5, out_dim, gen))
        with warnings.catch_warnings(), record_launches() as launches:
            warnings.simplefilter("ignore")
            kcbp.cbp(x, y, *hashes, out_dim)
        assert bool(launches) == (out_dim <= cbp_plan.MAX_FUSED_DIM), out_dim


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("out_dim", [16000, cbp_plan.MAX_FUSED_DIM])
def test_large_out_dim_exact(out_dim):
    """The largest sizes run the kernel (no warning) with exact phases: with 3 x 2 inputs
    the truth is 6 sketch products, cheap even at D = 16384."""
    kernels_common._warn_once.cache_clear()
    x, y, h1, s1, h2, s2 = make_inputs((4, 3), (4, 2), out_dim, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = kcbp.cbp(x, y, h1, s1, h2, s2, out_dim)
    truth = np.zeros((4, out_dim))
    for i in range(3):
        for j in range(2):
            col = (h1[i] + h2[j]).item() % out_dim
            truth[:, col] += (s1[i] * x[:, i] * s2[j] * y[:, j]).cpu().double().numpy()
    assert_close_to_truth(out, truth, rtol=1e-5, what=f"D = {out_dim}")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda h, s: (h + 100, s), "outside"),
        (lambda h, s: (h[:-1], s), "must both be"),
        (lambda h, s: (h.float(), s), "integer"),
    ],
)
def test_hash_validation(mutate, match):
    x, y, h1, s1, h2, s2 = make_inputs((2, 9), (2, 7), 16, 0)
    h1, s1 = mutate(h1, s1)
    with pytest.raises(ValueError, match=match):
        kcbp.cbp(x, y, h1, s1, h2, s2, 16)


def test_custom_op_registration(request):
    """Schema, fake-tensor (meta) kernel and autograd registration of the custom ops."""
    x, y, h1, s1, h2, s2 = make_inputs((1, 2, 11), (3, 1, 7), 12, fresh_seed(request))
    lead = torch.Size([3, 2])
    xoff, yoff = cbp_plan.row_offsets(x, lead), cbp_plan.row_offsets(y, lead)
    x.requires_grad_(True)
    y.requires_grad_(True)
    twiddles = cbp_plan.twiddle_table(12, DEVICE)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(
        torch.ops.rwmn.cbp_dense.default,
        (x, y, xoff, yoff, h1, s1, h2, s2, twiddles),
        test_utils=tests,
    )
    g = torch.randn(3, 2, 12, device=DEVICE)
    torch.library.opcheck(
        torch.ops.rwmn.cbp_dense_backward.default,
        (g, x.detach(), y.detach(), xoff, yoff, h1, s1, h2, s2, twiddles),
        test_utils=("test_schema", "test_faketensor"),
    )
    radices = list(cbp_plan.fft_plan(12, min_dim=1))
    xidx, yidx = xoff // 11, yoff // 7
    torch.library.opcheck(
        torch.ops.rwmn.cbp_fft.default,
        (x, y, xidx, yidx, h1, s1, h2, s2, twiddles, radices),
        test_utils=tests,
    )
    _, xs, ys = torch.ops.rwmn.cbp_fft(x, y, xidx, yidx, h1, s1, h2, s2, twiddles, radices)
    xb, yb = (t.detach().expand(3, 2, t.shape[-1]).contiguous() for t in (x, y))
    torch.library.opcheck(
        torch.ops.rwmn.cbp_fft_forward.default,
        (xb, yb, h1, s1, h2, s2, twiddles, radices),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.rwmn.cbp_fft_backward.default,
        (g, x.detach(), y.detach(), xs, ys, xidx, yidx, h1, s1, h2, s2, twiddles, radices),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_dynamo_fullgraph_traces_wrapper(request):
    """TorchDynamo captures the whole wrapper (offsets, table, custom op, sum pooling) in one
    graph. backend="eager" runs the captured graph without Inductor, which the interpreter
    cannot lower; the Inductor path is test_compile_fullgraph (CUDA)."""
    torch._dynamo.reset()
    x, y, h1, s1, h2, s2 = make_inputs((2, 3, 5, 11), (2, 1, 1, 7), 13, fresh_seed(request))
    x.requires_grad_(True)

    def pool(x, y):
        return kcbp.cbp(x, y, h1, s1, h2, s2, 13, True)

    eager = pool(x, y)
    (eager_gx,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(pool, fullgraph=True, backend="eager")(x, y)
    (gx,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(gx, eager_gx, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# GPU: half precision, autocast, torch.compile
# --------------------------------------------------------------------------------------

# (x shape, y shape, out_dim): a slice of the story embedding and of the read network.
GPU_CASES = [((64, 2048), (64, 300), 4096), ((1, 3, 40, 300), (8, 1, 1, 300), 300)]


def _errors(dtype, x_shape, y_shape, out_dim, seed, fn):
    x, y, h1, s1, h2, s2 = make_inputs(x_shape, y_shape, out_dim, seed, dtype)
    x64, y64 = (t.double().requires_grad_(True) for t in (x, y))
    truth = reference.cbp(x64, y64, h1, s1, h2, s2, out_dim)
    g = torch.randn_like(truth)
    truth_grads = torch.autograd.grad(truth, (x64, y64), g)
    x.requires_grad_(True)
    y.requires_grad_(True)
    out = fn(x, y, h1, s1, h2, s2, out_dim)
    grads = torch.autograd.grad(out, (x, y), g.to(out.dtype))
    return [
        ((a.double() - t).abs().max() / t.abs().max()).item()
        for a, t in zip((out, *grads), (truth, *truth_grads), strict=True)
    ]


def half_precision_limit(reference_error: float) -> float:
    """The bound on a half-precision fused error (max |error| / max |truth|): the fused
    kernel may not be much worse than the reference's own rounding error."""
    return 2 * reference_error + 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("x_shape", "y_shape", "out_dim"), GPU_CASES)
@pytest.mark.cuda
@requires_cuda
def test_half_precision_vs_reference_error(dtype, x_shape, y_shape, out_dim):
    fused = _errors(dtype, x_shape, y_shape, out_dim, 1, kcbp.cbp)
    ref = _errors(dtype, x_shape, y_shape, out_dim, 1, reference.cbp)
    for name, f, r in zip(("out", "grad x", "grad y"), fused, ref, strict=True):
        assert f <= half_precision_limit(r), f"{name}: fused error {f:.2e} vs reference {r:.2e}"


@pytest.mark.cuda
@requires_cuda
def test_autocast_bf16():
    x, y, h1, s1, h2, s2 = make_inputs((16, 64), (16, 48), 300, 2)
    lin = torch.nn.Linear(64, 64).to(DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = kcbp.cbp(lin(x), y, h1, s1, h2, s2, 300)
        ref = reference.cbp(lin(x), y, h1, s1, h2, s2, 300)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max())


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("entry", ["kernels", "ops"])
def test_compile_fullgraph(entry):
    """Inductor compiles the custom ops (wrap_triton) with no graph break. The "ops" entry
    also needs rwmn.ops._fused to be traceable by Dynamo (importlib is not)."""
    fn = kcbp.cbp if entry == "kernels" else ops.cbp

    class Pool(torch.nn.Module):
        def __init__(self, h1, s1, h2, s2, out_dim):
            super().__init__()
            self.out_dim = out_dim
            for name, t in zip(("h1", "s1", "h2", "s2"), (h1, s1, h2, s2), strict=True):
                self.register_buffer(name, t)

        def forward(self, x, y):
            return fn(x, y, self.h1, self.s1, self.h2, self.s2, self.out_dim, True)

    x, y, *hashes = make_inputs((2, 3, 5, 64), (2, 1, 1, 48), 300, 3)
    model = Pool(*hashes, 300)
    x.requires_grad_(True)
    torch._dynamo.reset()
    with ops.use_backend("triton"):
        eager = model(x, y)
        (eager_gx,) = torch.autograd.grad(eager.sum(), x)
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x, y)
        (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, eager_gx, rtol=1e-5, atol=1e-5)


def _hashes_for(n1, n2, out_dim):
    gen = torch.Generator().manual_seed(5)
    return (*make_hashes(n1, out_dim, gen), *make_hashes(n2, out_dim, gen))


def _story_cbp_work(dtype, grad: bool):
    x = torch.randn(1500, 2048, dtype=dtype, requires_grad=grad)
    y = torch.randn(1500, 300, dtype=dtype, requires_grad=grad)
    h1, s1, h2, s2 = _hashes_for(2048, 300, 4096)

    def call():
        out = kcbp.cbp(x, y, h1, s1, h2, s2, 4096)
        if grad:
            out.backward(torch.zeros_like(out))

    return executed_work(call)


def test_executed_work_at_the_story_size(monkeypatch):
    """What the kernels execute at the story size (1500 rows, 2048 x 300 -> 4096 = 16 x 16 x
    16), priced by kernels.work from the recorded launches, pinned. One complex 4096-point
    FFT is 3 stages x 256 tile rows x 16 x 16 x 3 real products = 589,824 MACs. The model's
    forward (no gradient: one launch) runs 3 per pair of rows: 2250 in all, 2.65 GFLOP;
    with a gradient, spectra (750 + 750) and inverses (750) forward and 3 x 750 backward:
    5.31 GFLOP."""
    transform = 3 * 256 * 16 * 16 * 3
    for dtype in (torch.bfloat16, torch.float32):
        work, launches = _story_cbp_work(dtype, grad=False)
        assert [x.name for x in launches] == ["_cbp_fwd_kernel"]
        assert work.macs == 2250 * transform
        work, _ = _story_cbp_work(dtype, grad=True)
        assert work.macs == 4500 * transform
        assert work.flops / 1e9 == pytest.approx(5.308, abs=0.001)
    with monkeypatch.context() as patch:
        cbp_fft_threshold(patch, 10**9)
        dense, _ = _story_cbp_work(torch.bfloat16, grad=False)
    assert dense.macs > 25 * 2250 * transform
    # Broadcast operands are transformed once per distinct row (the read network's memory).
    h1, s1, h2, s2 = _hashes_for(300, 300, 300)
    memory, u = torch.randn(3, 50, 300, requires_grad=True), torch.randn(32, 300)

    def read():
        kcbp.cbp(memory.unsqueeze(0), u[:, None, None, :], h1, s1, h2, s2, 300)

    def per_row():
        x = memory.unsqueeze(0).expand(32, 3, 50, 300).contiguous()
        kcbp.cbp(x, u[:, None, None, :].expand(32, 3, 50, 300).contiguous(), h1, s1, h2, s2, 300)

    assert executed_work(read)[0].macs < 0.6 * executed_work(per_row)[0].macs


def test_inverse_hash_is_the_csr_of_the_sketch():
    """Bin j's inputs are exactly {i: h(i) = j}, in increasing i (a fixed summation order),
    with their signs; empty bins have empty ranges; the starts cover all n inputs."""
    gen = torch.Generator().manual_seed(3)
    n, out_dim = 100, 37
    h = torch.randint(out_dim, (n,), generator=gen)
    s = torch.randint(2, (n,), generator=gen).float() * 2 - 1
    order, start, sign = cbp_plan.inverse_hash(h, s, out_dim)
    assert order.dtype == start.dtype == torch.int32 and sign.dtype == torch.float32
    assert start[0] == 0 and start[-1] == n
    assert torch.equal(start[1:] - start[:-1], torch.bincount(h, minlength=out_dim).int())
    for j in range(out_dim):
        idx = order[start[j] : start[j + 1]].long()
        assert torch.equal(idx, torch.nonzero(h == j).flatten())
        assert torch.equal(sign[start[j] : start[j + 1]], s[idx])


# --------------------------------------------------------------------------------------
# The broadcast operands' gradient sums (kernels/cbp/sums.py)
# --------------------------------------------------------------------------------------

#: (x shape, y shape): the read's (memory over the questions, u over the slots), x not
#: broadcast, both along inner axes, and x along two separate runs of axes (torch's sums).
BROADCAST_SUM_CASES = [
    ((1, 3, 5, 7), (4, 1, 1, 9)),
    ((4, 3, 5, 7), (4, 1, 1, 9)),
    ((6, 1, 7), (1, 5, 9)),
    ((1, 3, 1, 7), (2, 3, 5, 9)),
]


@pytest.mark.parametrize(("x_shape", "y_shape"), BROADCAST_SUM_CASES, ids=str)
@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_broadcast_sums_match_float64(x_shape, y_shape, with_add, dtype):
    """dL/dx, dL/dy (+ an addend) against float64 sums of the same fp32 rows, rounded once
    to the operands' dtype; one launch (none where nothing is summed or added)."""

    x, y = torch.randn(x_shape).to(dtype), torch.randn(y_shape).to(dtype)
    lead = torch.broadcast_shapes(x_shape[:-1], y_shape[:-1])
    rows = math.prod(lead)
    gx = torch.randn(rows, x_shape[-1])
    gy = torch.randn(rows, y_shape[-1])
    if x.numel() == rows * x_shape[-1]:
        gx = gx.to(dtype)  # not broadcast: the backward writes it in x's dtype
    add = torch.randn(y_shape).to(dtype) if with_add else None
    with record_launches() as launches:
        broadcast_sums(gx, x, gy, y, lead, add)
    out_x, out_y = broadcast_sums(gx, x, gy, y, lead, add)
    want_x = gx.double().view(*lead, -1).sum_to_size(x_shape)
    want_y = gy.double().view(*lead, -1).sum_to_size(y_shape)
    if with_add:
        want_y = want_y + add.double()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-5)
    assert out_x.dtype == out_y.dtype == dtype
    torch.testing.assert_close(out_x.double(), want_x, **tol)
    torch.testing.assert_close(out_y.double(), want_y, **tol)
    if x_shape == (1, 3, 1, 7):
        assert launches == []  # several runs of axes: torch's sums
    else:
        assert [k.name for k in launches] == ["_broadcast_sums_kernel"]


# --------------------------------------------------------------------------------------
# CBP of the unit-normalised rows (the video story: normalize=True)
# --------------------------------------------------------------------------------------


def _relative_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    return ((out.double() - truth).abs().max() / truth.abs().max()).item()


@pytest.mark.parametrize("out_dim", [300, 600])
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_normalize_in_the_one_launch_forward(out_dim, amp, request):
    """fp32 features (odd row count, rows of very different norms) pooled after unit
    normalisation. Under autocast: the rows' inverse norms, then one CBP launch that reads
    the features as they are (no normalised copy, no cast), in the autocast dtype, within
    the half-precision bound of the reference's own error (normalised rows rounded to that
    dtype, as the unfused model did). In fp32: the fused unit norms, then the CBP, within
    1e-5 of float64."""
    x, y, h1, s1, h2, s2 = make_inputs((7, 45), (7, 23), out_dim, fresh_seed(request))
    x, y = x * torch.logspace(-3, 3, 7)[:, None], y * 5.0
    truth = reference.cbp(x.double(), y.double(), h1, s1, h2, s2, out_dim, normalize=True)
    context = torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext()
    with context, record_launches() as launches:
        kcbp.cbp(x, y, h1, s1, h2, s2, out_dim, normalize=True)
    norms = "_unit_norm_fwd_kernel" if amp is None else "_row_norms_kernel"
    assert [k.name for k in launches] == [norms] * 2 + ["_cbp_fwd_kernel"]
    assert launches[-1].config.constexprs["NORMALIZE"] is (amp is not None)
    with context:
        out = kcbp.cbp(x, y, h1, s1, h2, s2, out_dim, normalize=True)
    assert out.dtype == (amp or torch.float32)
    if amp is None:
        assert _relative_error(out, truth) < 1e-5
    else:
        rounded = (reference.unit_norm(t).to(amp) for t in (x, y))
        ref = reference.cbp(*rounded, h1, s1, h2, s2, out_dim)
        assert _relative_error(out, truth) <= half_precision_limit(_relative_error(ref, truth))


def test_normalize_with_a_gradient_or_broadcast():
    """Where the one-launch forward does not apply the rows are normalised first (the fused
    unit norm) and the usual path runs: values and gradients against float64."""
    x, y, h1, s1, h2, s2 = make_inputs((1, 3, 5, 20), (4, 1, 1, 20), 300, 5)
    check_against_float64(
        lambda x, y: kcbp.cbp(x, y, h1, s1, h2, s2, 300, normalize=True),
        lambda x, y: reference.cbp(x, y, h1, s1, h2, s2, 300, normalize=True),
        [x * 3.0, y],
    )
