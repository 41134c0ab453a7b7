"""kernels/memconv.py: the strided full-width memory convolution, forward and backward."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from kernel_helpers import (
    LOW_PRECISION_RATIO,
    LOW_PRECISION_REL_ATOL,
    autocast,
    check_against_float64,
    cuda,
)
from torch._subclasses.fake_tensor import FakeTensorMode

import rwmn.ops
from kernels import memconv
from rwmn import reference

# (batch, c_in, c_out, n, d, k, stride): n not divisible by the stride, several channel
# counts, d not a power of two, k > s, k == s, k < s, stride larger than n.
SHAPES = [
    (2, 1, 3, 20, 13, 4, 3),
    (1, 2, 2, 11, 7, 3, 1),
    (2, 3, 1, 9, 12, 2, 2),
    (1, 1, 2, 17, 13, 4, 5),
    (3, 3, 3, 10, 7, 3, 3),
    (1, 2, 3, 3, 12, 4, 5),
    # The forward's K split (fewer than 132 output tiles): 40 tiles, 9 kernel rows in
    # splits of 2 and a last of 1; 132 tiles: one split.
    (8, 3, 5, 10, 7, 3, 2),
    (66, 1, 2, 5, 7, 2, 1),
]


def _inputs(batch, c_in, c_out, n, d, k, with_bias=True):
    x = torch.randn(batch, c_in, n, d)
    w = torch.randn(c_out, c_in, k, d) / (c_in * k * d) ** 0.5
    b = 0.1 * torch.randn(c_out) if with_bias else None
    return x, w, b


def _fns(stride, relu=True):
    fused = lambda x, w, b: memconv.memory_conv(x, w, b, stride, relu)
    ref = lambda x, w, b: reference.memory_conv(x, w, b, stride, relu)
    return fused, ref


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(shape):
    *dims, stride = shape
    fused, ref = _fns(stride)
    check_against_float64(fused, ref, _inputs(*dims))


@pytest.mark.parametrize(("with_bias", "relu"), [(False, True), (True, False), (False, False)])
def test_bias_and_relu_options(with_bias, relu):
    fused, ref = _fns(2, relu)
    check_against_float64(fused, ref, _inputs(2, 2, 3, 9, 13, 3, with_bias))


def test_leading_axes():
    """x [..., c_in, n, d] with no or several leading axes (the write network's input)."""
    fused, ref = _fns(3)
    _, w, b = _inputs(1, 1, 2, 10, 7, 4)
    check_against_float64(fused, ref, [torch.randn(1, 10, 7), w, b])
    check_against_float64(fused, ref, [torch.randn(2, 2, 1, 10, 7), w, b])


def _numpy_conv(x, w, b, stride):
    """Direct float64 loops of the docstring's formula, independent of torch's conv."""
    batch, c_in, n, d = x.shape
    c_out, _, k, _ = w.shape
    m, top, _ = reference.same_padding(n, k, stride)
    left = reference.same_padding(d, d, 1)[1]
    xp = np.zeros((batch, c_in, n + 2 * k + stride, 3 * d))
    xp[:, :, k : k + n, d : 2 * d] = x
    y = np.zeros((batch, c_out, m, d))
    for i in range(m):
        for a in range(k):
            row = xp[:, :, k + i * stride + a - top, :]  # [batch, c_in, 3d]
            for t in range(d):
                cols = row[:, :, d + t - left : 2 * d + t - left]  # x[., j + t - left]
                y[:, :, i, :] += np.einsum("bcj,oc->boj", cols, w[:, :, a, t])
    return y + b[None, :, None, None], xp, (m, top, left)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=str)
def test_numpy_formulas(shape):
    """Forward and the weight gradient's diagonal-sum formula in float64 numpy:
    dW[o,c,a,t] = sum_b,i,j x[b, c, i*s + a - p, j + t - q] g[b, o, i, j]."""
    *dims, stride = shape
    x, w, b = _inputs(*dims)
    y64, xp, (m, top, left) = _numpy_conv(
        x.double().numpy(), w.double().numpy(), b.double().numpy(), stride
    )
    xf, wf, bf = (t.clone().requires_grad_() for t in (x, w, b))
    out = memconv.memory_conv(xf, wf, bf, stride, relu=False)
    np.testing.assert_allclose(out.detach().numpy(), y64, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    (dw,) = torch.autograd.grad(out, [wf], g)
    k, d = w.shape[2], w.shape[3]
    n = x.shape[2]
    g64 = g.double().numpy()
    dw64 = np.zeros(w.shape)
    for a in range(k):
        for t in range(d):
            for i in range(m):
                cols = xp[:, :, k + i * stride + a - top, d + t - left : 2 * d + t - left]
                dw64[:, :, a, t] += np.einsum("bcj,boj->oc", cols, g64[:, :, i, :])
    assert n == x.shape[2]
    np.testing.assert_allclose(dw.numpy(), dw64, rtol=1e-5, atol=1e-5)


def test_dispatch_runs_the_kernels(monkeypatch):
    calls = []
    fused = memconv.memory_conv
    monkeypatch.setattr(memconv, "memory_conv", lambda *a: calls.append(1) or fused(*a))
    x, w, b = _inputs(2, 2, 3, 9, 7, 3)
    with rwmn.ops.use_backend("triton"):
        out = rwmn.ops.memory_conv(x, w, b, 2)
    assert calls, "rwmn.ops.memory_conv did not call kernels.memconv.memory_conv"
    torch.testing.assert_close(out, reference.memory_conv(x, w, b, 2), rtol=1e-5, atol=1e-5)


def test_fake_tensor_shapes():
    """The custom op's meta path (what torch.compile traces) gives the right shapes."""
    with FakeTensorMode():
        x, w, b = _inputs(2, 3, 4, 11, 13, 3)
        out = torch.ops.rwmn.memory_conv(x, w, b, 2, True)
        dx, dwb = torch.ops.rwmn.memory_conv_backward(out, out, x, w, 2)
    assert out.shape == (2, 4, 6, 13)
    assert dx.shape == x.shape and dwb.shape == (w.numel() + b.numel(),)


def test_bad_shapes_raise():
    x, w, b = _inputs(1, 2, 3, 9, 7, 3)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, n, 7\]"):
        memconv.memory_conv(x[:, :1], w, b, 2)
    with pytest.raises(ValueError, match="stride"):
        memconv.memory_conv(x, w, b, 0)


def test_float64_falls_back_with_one_warning():
    x, w, b = (t.double() for t in _inputs(1, 1, 2, 6, 7, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = memconv.memory_conv(x, w, b, 2)
        memconv.memory_conv(x, w, b, 2)
    torch.testing.assert_close(out, reference.memory_conv(x, w, b, 2))
    messages = [str(c.message) for c in caught if "float64" in str(c.message)]
    assert len(messages) <= 1  # one per process: an earlier test may already have warned


# ----------------------------------------------------------------------------- GPU


MODEL_SHAPES = [(1, 1, 3, 1500, 300, 40, 30), (32, 3, 3, 50, 300, 3, 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_low_precision_autocast_cpu(shape, dtype):
    """bf16/fp16 under autocast, as training runs them, forward and every gradient (on the
    interpreter with the gpu_semantics fixture: bf16 tiles reach tl.dot as values)."""
    *dims, stride = shape
    fused, ref = _fns(stride)
    check_against_float64(autocast(fused, dtype, "cpu"), autocast(ref, dtype, "cpu"),
                          _inputs(*dims), ratio=LOW_PRECISION_RATIO,
                          rel_atol=LOW_PRECISION_REL_ATOL[dtype])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", MODEL_SHAPES + SHAPES[:2], ids=str)
@pytest.mark.cuda
@cuda[1]
def test_low_precision_autocast(shape, dtype):
    *dims, stride = shape
    fused, ref = _fns(stride)

    def under_autocast(fn):
        def run(*args):
            with torch.autocast("cuda", dtype=dtype):
                return fn(*args)

        return run

    check_against_float64(
        under_autocast(fused),
        under_autocast(ref),
        _inputs(*dims),
        device="cuda",
        ratio=LOW_PRECISION_RATIO,
        rel_atol=LOW_PRECISION_REL_ATOL[dtype],
    )


@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=str)
@pytest.mark.cuda
@cuda[1]
def test_fp32_model_shapes_cuda(shape):
    *dims, stride = shape
    fused, ref = _fns(stride)
    check_against_float64(fused, ref, _inputs(*dims), device="cuda")


@pytest.mark.cuda
@cuda[1]
def test_compile_fullgraph():
    x, w, b = (t.cuda().requires_grad_() for t in _inputs(2, 3, 3, 50, 300, 3))
    compiled = torch.compile(lambda x, w, b: memconv.memory_conv(x, w, b, 2), fullgraph=True)
    out = compiled(x, w, b)
    out.sum().backward()
    torch.testing.assert_close(out, reference.memory_conv(x, w, b, 2), rtol=1e-4, atol=1e-4)
