"""The reference ops (rwmn/reference.py) against independent float64 computations.

Every ground truth here is written from the formulas of docs/model.md with numpy loops (TF SAME
padding, count sketch + direct circular convolution, softmax attention); none calls rwmn
code. Also: float64 gradcheck of every op, bf16 autocast on CPU, and the backend dispatch
of rwmn.ops.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwmn import ops, reference
from rwmn.cbp import TENSORFLOW_SEEDS, tensorflow_hashes

#: float64 reference vs float64 ground truth: agreement up to accumulated rounding.
F64_RTOL = 1e-12
#: bf16 unit roundoff (8 significant bits).
BF16_U = 2.0**-8


def rng_for(*key) -> np.random.Generator:
    """A generator seeded by the test case (stable across processes, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def randn(gen: np.random.Generator, *shape) -> np.ndarray:
    return gen.standard_normal(shape)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def assert_close64(actual: torch.Tensor, expected: np.ndarray, what: str, rtol=F64_RTOL):
    actual = actual.detach().double().numpy()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    scale = np.abs(expected).max() + 1e-300
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} (scale {scale:.3e})"


# --------------------------------------------------------------------------------------
# TF SAME padding and the memory convolution
# --------------------------------------------------------------------------------------


def tf_same(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """docs/model.md section 3, written out: out = ceil(in / s), pad_total, before = total // 2."""
    out = math.ceil(size / stride)
    pad_total = max((out - 1) * stride + kernel - size, 0)
    return out, pad_total // 2, pad_total - pad_total // 2


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        # TF docs (nn.convolution "SAME" example): in 13, filter 6, stride 5 -> out 3,
        # padded 1 on the left and 2 on the right (the extra one goes after).
        (13, 6, 5, (3, 1, 2)),
        # The release's write layer on 1,500 elements: 40-30 -> 50 slots, pad 5 + 5.
        (1500, 40, 30, (50, 5, 5)),
        # Full-width kernel, stride 1: out d, pad (d-1)//2 before, the rest after.
        (300, 300, 1, (300, 149, 150)),
        (7, 7, 1, (7, 3, 3)),
        # Kernel smaller than the stride: no padding at all (pad_total clipped at 0).
        (10, 2, 5, (2, 0, 0)),
        # n < k.
        (3, 5, 1, (3, 2, 2)),
        (3, 5, 2, (2, 2, 2)),
        (1, 4, 3, (1, 1, 2)),
    ],
)
def test_same_padding(size, kernel, stride, expected):
    assert reference.same_padding(size, kernel, stride) == expected
    assert tf_same(size, kernel, stride) == expected


def memory_conv_numpy(x, w, b, stride, relu=True):
    """TF SAME conv of a [..., c_in, n, d] input with a [c_out, c_in, k, kw] kernel, as a
    float64 loop over the kernel taps (vectorised over output rows and columns)."""
    c_out, c_in, k, kw = w.shape
    n, d = x.shape[-2:]
    m, top, bottom = tf_same(n, k, stride)
    out_w, left, right = tf_same(d, kw, 1)
    pad = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
    xp = np.pad(x, pad)
    out = np.zeros(x.shape[:-3] + (c_out, m, out_w))
    for a in range(k):
        for e in range(kw):
            # Input rows i*stride + a (in padded coordinates) for output rows i.
            window = xp[..., a : a + stride * (m - 1) + 1 : stride, e : e + out_w]
            out += np.einsum("...cij,oc->...oij", window, w[:, :, a, e])
    if b is not None:
        out += b[:, None, None]
    return np.maximum(out, 0.0) if relu else out


# (lead dims, c_in, c_out, n, k, stride, d): strides 1..k, n not divisible by the stride,
# n < k, odd and even d, with and without leading batch dims.
CONV_CASES = [
    ((), 1, 1, 9, 3, 1, 5),
    ((), 1, 3, 10, 4, 3, 6),
    ((), 2, 3, 11, 4, 4, 7),
    ((), 3, 2, 13, 5, 2, 4),
    ((), 1, 2, 3, 5, 1, 5),  # n < k
    ((), 2, 1, 2, 6, 4, 3),  # n < k, stride > n
    ((2,), 3, 2, 7, 3, 2, 6),
    ((2, 3), 2, 3, 8, 3, 3, 5),
    ((4,), 1, 1, 1, 2, 2, 2),  # one row
    ((), 2, 2, 17, 1, 1, 8),  # k = 1
]


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("lead, c_in, c_out, n, k, stride, d", CONV_CASES)
def test_memory_conv_matches_numpy_loop(lead, c_in, c_out, n, k, stride, d, relu):
    gen = rng_for("conv", lead, c_in, c_out, n, k, stride, d)
    x, w, b = randn(gen, *lead, c_in, n, d), randn(gen, c_out, c_in, k, d), randn(gen, c_out)
    expected = memory_conv_numpy(x, w, b, stride, relu)
    got = reference.memory_conv(t64(x), t64(w), t64(b), stride, relu)
    assert got.shape == (*lead, c_out, math.ceil(n / stride), d)
    assert_close64(got, expected, "memory_conv")
    no_bias = reference.memory_conv(t64(x), t64(w), None, stride, relu)
    assert_close64(no_bias, memory_conv_numpy(x, w, None, stride, relu), "memory_conv no bias")


@pytest.mark.parametrize("lead, c_in, c_out, n, k, stride, d", CONV_CASES)
def test_memory_conv_matches_conv2d_on_padded_input(lead, c_in, c_out, n, k, stride, d):
    gen = rng_for("conv2d", lead, c_in, c_out, n, k, stride, d)
    x, w, b = randn(gen, *lead, c_in, n, d), randn(gen, c_out, c_in, k, d), randn(gen, c_out)
    _, top, bottom = tf_same(n, k, stride)
    _, left, right = tf_same(d, d, 1)
    xt = t64(x).reshape(-1, c_in, n, d)
    padded = F.pad(xt, (left, right, top, bottom))
    expected = F.relu(F.conv2d(padded, t64(w), t64(b), stride=(stride, 1)))
    expected = expected.reshape(*lead, *expected.shape[1:])
    got = reference.memory_conv(t64(x), t64(w), t64(b), stride)
    assert_close64(got, expected.numpy(), "memory_conv vs F.conv2d")


def test_memory_conv_rejects_mismatched_input():
    w = torch.randn(2, 3, 3, 5)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, n, 5\]"):
        reference.memory_conv(torch.randn(2, 4, 5), w, None, 1)
    with pytest.raises(ValueError, match="does not match"):
        reference.memory_conv(torch.randn(3, 4, 6), w, None, 1)


# --------------------------------------------------------------------------------------
# Compact bilinear pooling
# --------------------------------------------------------------------------------------


def count_sketch_numpy(x, h, s, out_dim):
    out = np.zeros(x.shape[:-1] + (out_dim,))
    for i in range(x.shape[-1]):
        out[..., h[i]] += s[i] * x[..., i]
    return out


def circular_conv_numpy(a, b):
    """out[j] = sum_t a[t] b[(j - t) mod D], directly (O(D^2), no FFT), broadcasting."""
    dim = a.shape[-1]
    a, b = np.broadcast_arrays(a, b)
    out = np.zeros(a.shape)
    for t in range(dim):
        out += a[..., t : t + 1] * np.roll(b, t, axis=-1)
    return out


def cbp_numpy(x, y, h1, s1, h2, s2, out_dim, sum_pool=False):
    out = circular_conv_numpy(
        count_sketch_numpy(x, h1, s1, out_dim), count_sketch_numpy(y, h2, s2, out_dim)
    )
    if sum_pool and out.ndim > 2:
        out = out.sum(axis=tuple(range(1, out.ndim - 1)))
    return out


def draw_hashes(gen, n1, n2, out_dim):
    return (
        gen.integers(out_dim, size=n1),
        gen.choice([-1.0, 1.0], size=n1),
        gen.integers(out_dim, size=n2),
        gen.choice([-1.0, 1.0], size=n2),
    )


def torch_hashes(h1, s1, h2, s2):
    return (torch.from_numpy(h1), torch.from_numpy(s1), torch.from_numpy(h2), torch.from_numpy(s2))


# (x shape, y shape, D, sum_pool): odd and even D, the story form, the read network's
# broadcast form (x [C, m, n1] with y [B, 1, 1, n2]), sum pooling.
CBP_CASES = [
    ((6, 13), (6, 11), 17, False),
    ((6, 13), (6, 11), 16, False),
    ((3, 5, 9), (4, 1, 1, 9), 9, False),
    ((2, 4, 10), (3, 1, 1, 10), 12, False),
    ((7,), (7,), 5, False),
    ((2, 3, 4, 8), (2, 3, 4, 6), 11, True),
    ((2, 3, 4, 8), (2, 1, 1, 6), 10, True),
]


@pytest.mark.parametrize("xs, ys, out_dim, sum_pool", CBP_CASES)
def test_cbp_matches_direct_circular_convolution(xs, ys, out_dim, sum_pool):
    gen = rng_for("cbp", xs, ys, out_dim, sum_pool)
    x, y = randn(gen, *xs), randn(gen, *ys)
    hashes = draw_hashes(gen, xs[-1], ys[-1], out_dim)
    expected = cbp_numpy(x, y, *hashes, out_dim, sum_pool)
    got = reference.cbp(t64(x), t64(y), *torch_hashes(*hashes), out_dim, sum_pool)
    assert_close64(got, expected, "cbp")
    got32 = reference.cbp(t64(x).float(), t64(y).float(), *torch_hashes(*hashes), out_dim, sum_pool)
    assert got32.dtype == torch.float32
    assert_close64(got32, expected, "cbp fp32", rtol=1e-5)


def test_count_sketch_matches_loop():
    gen = rng_for("sketch")
    x = randn(gen, 3, 20)
    h, s, _, _ = draw_hashes(gen, 20, 1, 7)
    got = reference.count_sketch(t64(x), torch.from_numpy(h), torch.from_numpy(s), 7)
    assert_close64(got, count_sketch_numpy(x, h, s, 7), "count_sketch")


#: MCB models for VQA use D = 16000; inputs of size 2048 (ResNet features).
KERNEL_D, KERNEL_N = 16000, 2048
#: Hash draws averaged for the kernel-property estimate.
KERNEL_DRAWS = 4
KERNEL_RTOL = 0.02


def kernel_ratio(out_dim: int, seed: int = 0) -> float:
    """<CBP(x,y), CBP(z,w)> / (<x,z><y,w>), averaged over KERNEL_DRAWS hash draws, with z
    and w correlated with x and y (cosine ~0.9) so that the target is far from zero."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(KERNEL_N, generator=gen), torch.randn(KERNEL_N, generator=gen)
    z = x + 0.5 * torch.randn(KERNEL_N, generator=gen)
    w = y + 0.5 * torch.randn(KERNEL_N, generator=gen)
    x, y, z, w = (v.double() for v in (x, y, z, w))
    target = (x @ z) * (y @ w)
    estimates = []
    for _ in range(KERNEL_DRAWS):
        h1 = torch.randint(out_dim, (KERNEL_N,), generator=gen)
        h2 = torch.randint(out_dim, (KERNEL_N,), generator=gen)
        s1 = torch.randint(2, (KERNEL_N,), generator=gen).double() * 2 - 1
        s2 = torch.randint(2, (KERNEL_N,), generator=gen).double() * 2 - 1
        a = reference.cbp(x, y, h1, s1, h2, s2, out_dim)
        b = reference.cbp(z, w, h1, s1, h2, s2, out_dim)
        estimates.append(a @ b)
    return (sum(estimates) / len(estimates) / target).item()


def test_cbp_kernel_property():
    """<CBP(x,y), CBP(z,w)> ~ <x,z><y,w> within 2% at D = 16000 (relative std of one
    draw ~ sqrt(2/D) = 1.1%, of the 4-draw mean ~0.6%)."""
    ratio = kernel_ratio(KERNEL_D)
    assert abs(ratio - 1.0) < KERNEL_RTOL, f"kernel ratio {ratio:.4f} at D={KERNEL_D}"


def test_cbp_kernel_property_check_has_power():
    """The same check fails at D = 64 (relative std ~9%): it is not vacuous."""
    ratios = [kernel_ratio(64, seed) for seed in range(3)]
    assert max(abs(r - 1.0) for r in ratios) > KERNEL_RTOL, ratios


@pytest.mark.parametrize("n1, n2, out_dim", [(2048, 300, 16000), (300, 300, 300), (7, 5, 3)])
def test_tensorflow_hashes_are_numpy_seeded_draw(n1, n2, out_dim):
    h1, s1, h2, s2 = tensorflow_hashes(n1, n2, out_dim)
    assert TENSORFLOW_SEEDS == (1, 3, 5, 7)
    expected = []
    for seed, size, sign in ((1, n1, False), (3, n1, True), (5, n2, False), (7, n2, True)):
        np.random.seed(seed)
        if sign:
            expected.append(2 * np.random.randint(2, size=size) - 1)
        else:
            expected.append(np.random.randint(out_dim, size=size))
    for got, want, name in zip((h1, s1, h2, s2), expected, ("h1", "s1", "h2", "s2"), strict=True):
        assert got.shape == (want.shape[0],), name
        np.testing.assert_array_equal(got.numpy(), want, err_msg=name)
    assert h1.dtype == h2.dtype == torch.int64
    assert s1.dtype == s2.dtype == torch.float32
    assert set(s1.unique().tolist()) <= {-1.0, 1.0}


# --------------------------------------------------------------------------------------
# Attention readout
# --------------------------------------------------------------------------------------


def attention_numpy(rows, u, sharp, normalize):
    """rows [B, R, d] or [R, d], u [B, d] -> o [B, d], p [B, R]."""
    if rows.ndim == 2:
        rows = np.broadcast_to(rows, (u.shape[0],) + rows.shape)
    if normalize:
        rows = rows / np.sqrt(reference.UNIT_NORM_EPS + (rows**2).sum(-1, keepdims=True))
    logits = sharp * np.einsum("brd,bd->br", rows, u)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("br,brd->bd", p, rows), p


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("b, r, d, sharp", [(3, 7, 5, 1.0), (1, 1, 4, 2.5), (4, 11, 8, 10.0)])
def test_attention_read_matches_direct(shared, normalize, b, r, d, sharp):
    gen = rng_for("attn", shared, normalize, b, r, d, sharp)
    rows = randn(gen, r, d) if shared else randn(gen, b, r, d)
    u = randn(gen, b, d)
    o_exp, p_exp = attention_numpy(rows, u, sharp, normalize)
    o, p = reference.attention_read(t64(rows), t64(u), sharp, normalize)
    assert_close64(o, o_exp, "o")
    assert_close64(p, p_exp, "p")
    torch.testing.assert_close(p.sum(-1), torch.ones(b, dtype=torch.float64), rtol=0, atol=1e-12)


def test_conv_attention_read_is_conv_then_read():
    gen = rng_for("convattn")
    x, w, b, u = randn(gen, 2, 3, 9, 6), randn(gen, 4, 3, 3, 6), randn(gen, 4), randn(gen, 2, 6)
    mr = memory_conv_numpy(x, w, b, 2)  # [2, 4, 5, 6]: rows in (channel, slot) order
    o_exp, p_exp = attention_numpy(mr.reshape(2, -1, 6), u, 1.5, True)
    o, p = reference.conv_attention_read(t64(x), t64(w), t64(b), 2, t64(u), 1.5)
    assert_close64(o, o_exp, "o")
    assert_close64(p, p_exp, "p")


def test_unit_norm():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([[0.6, 0.8], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(reference.unit_norm(x), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Gradients: torch.autograd.gradcheck in float64 for every op
# --------------------------------------------------------------------------------------


def gradcheck(fn, inputs) -> bool:
    """float64 finite differences vs autograd. fast_mode compares v^T J u for random u, v
    (one backward, two forwards per input) instead of the full Jacobian: ~100x faster on
    these shapes and still fails on any wrong gradient that random u, v can see."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def leaf(*shape, gen) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()


def hashes_torch(n1, n2, out_dim, gen):
    return (
        torch.randint(out_dim, (n1,), generator=gen),
        torch.randint(2, (n1,), generator=gen).double() * 2 - 1,
        torch.randint(out_dim, (n2,), generator=gen),
        torch.randint(2, (n2,), generator=gen).double() * 2 - 1,
    )


@pytest.mark.parametrize(
    "xs, ys, out_dim, sum_pool",
    [
        ((3, 7), (3, 5), 6, False),
        ((2, 3, 5), (2, 1, 1, 5), 7, False),
        ((2, 2, 3, 4), (2, 1, 3, 4), 5, True),
    ],
)
def test_gradcheck_cbp(xs, ys, out_dim, sum_pool):
    gen = torch.Generator().manual_seed(1)
    x, y = leaf(*xs, gen=gen), leaf(*ys, gen=gen)
    hashes = hashes_torch(xs[-1], ys[-1], out_dim, gen)
    assert gradcheck(lambda a, b: reference.cbp(a, b, *hashes, out_dim, sum_pool), (x, y))


@pytest.mark.parametrize(
    "lead, c_in, c_out, n, k, stride, d, relu",
    [((), 1, 2, 7, 3, 2, 4, True), ((2,), 2, 1, 4, 5, 1, 3, False), ((), 2, 2, 5, 2, 3, 5, True)],
)
def test_gradcheck_memory_conv(lead, c_in, c_out, n, k, stride, d, relu):
    gen = torch.Generator().manual_seed(2)
    x, w, b = (
        leaf(*lead, c_in, n, d, gen=gen),
        leaf(c_out, c_in, k, d, gen=gen),
        leaf(c_out, gen=gen),
    )
    assert gradcheck(lambda x_, w_, b_: reference.memory_conv(x_, w_, b_, stride, relu), (x, w, b))
    assert gradcheck(lambda x_, w_: reference.memory_conv(x_, w_, None, stride, relu), (x, w))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_attention_read(shared, normalize):
    gen = torch.Generator().manual_seed(3)
    rows = leaf(6, 4, gen=gen) if shared else leaf(3, 6, 4, gen=gen)
    u = leaf(3, 4, gen=gen)
    assert gradcheck(lambda r, q: reference.attention_read(r, q, 1.7, normalize), (rows, u))


def test_gradcheck_conv_attention_read():
    gen = torch.Generator().manual_seed(4)
    x, w, b = leaf(2, 2, 7, 4, gen=gen), leaf(3, 2, 3, 4, gen=gen), leaf(3, gen=gen)
    u = leaf(2, 4, gen=gen)
    assert gradcheck(
        lambda x_, w_, b_, u_: reference.conv_attention_read(x_, w_, b_, 2, u_, 1.3),
        (x, w, b, u),
    )


@pytest.mark.parametrize("strides", [(1,), (2, 1)])
def test_gradcheck_read_network(strides):
    gen = torch.Generator().manual_seed(5)
    c, m, d, b = 2, 5, 4, 2
    memory, u = leaf(c, m, d, gen=gen), leaf(b, d, gen=gen)
    hashes = hashes_torch(d, d, d, gen)
    weights, biases, c_in = [], [], c
    for c_out in (3, 2)[: len(strides)]:
        weights.append(leaf(c_out, c_in, 2, d, gen=gen))
        biases.append(leaf(c_out, gen=gen))
        c_in = c_out
    layers = len(strides)

    def fn(mem, q, *params):
        ws, bs = params[:layers], params[layers:]
        return reference.read_network(mem, q, hashes, ws, bs, strides, 1.0)

    assert gradcheck(fn, (memory, u, *weights, *biases))


def test_read_network_needs_a_layer():
    with pytest.raises(ValueError, match="at least one read layer"):
        reference.read_network(torch.randn(1, 2, 3), torch.randn(1, 3), (), [], [], [], 1.0)


# --------------------------------------------------------------------------------------
# bf16 autocast on CPU
# --------------------------------------------------------------------------------------


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_memory_conv_bf16_autocast():
    """Under autocast the GEMM runs on bf16-rounded operands with fp32 accumulation: the
    error is bounded by ~2u sum|x||w| (operand rounding) + u|out| (output rounding)."""
    gen = torch.Generator().manual_seed(6)
    x, w, b = (torch.randn(*s, generator=gen) for s in ((2, 40, 16), (3, 2, 5, 16), (3,)))
    ref = reference.memory_conv(x, w, b, 3, relu=False)
    with bf16_autocast():
        low = reference.memory_conv(x, w, b, 3, relu=False)
    assert torch.isfinite(low).all()
    bound = reference.memory_conv(x.abs(), w.abs(), b.abs(), 3, relu=False)
    err = (low.float() - ref).abs()
    assert (err <= 3 * BF16_U * bound + BF16_U * ref.abs()).all(), err.max()
    assert err.max() > 0, "autocast did not lower the precision (the test would be vacuous)"


def test_attention_read_bf16_autocast():
    """The logits <u, r> of unit rows r lose at most ~2u |u| to operand rounding, so p and
    o (a convex combination of unit rows) carry a relative error of a few u |u|; plus the
    rounding of the bf16 outputs themselves."""
    gen = torch.Generator().manual_seed(7)
    rows, u = torch.randn(3, 20, 16, generator=gen), torch.randn(3, 16, generator=gen)
    o, p = reference.attention_read(rows, u, 1.0)
    with bf16_autocast():
        o_low, p_low = reference.attention_read(rows, u, 1.0)
    assert o_low.dtype == p_low.dtype == torch.bfloat16
    u_norm = u.norm(dim=-1).max().item()
    for got, ref, what in ((o_low, o, "o"), (p_low, p, "p")):
        assert torch.isfinite(got).all(), what
        err = (got.float() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= (4 * BF16_U * u_norm + BF16_U) * scale, f"{what}: {err:.3e} ({scale:.3e})"


def test_cbp_bf16():
    """CBP computes in fp32 whatever the input dtype (torch's half FFT needs power-of-two
    sizes): under autocast fp32 inputs give the fp32 result unchanged, and bf16 inputs give
    the exact CBP of the bf16 values up to the final bf16 rounding (<= u relative)."""
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(3, 20, 16, generator=gen), torch.randn(3, 1, 16, generator=gen)
    hashes = [t.float() if t.is_floating_point() else t for t in hashes_torch(16, 16, 15, gen)]
    ref = reference.cbp(x, y, *hashes, 15)
    with bf16_autocast():
        same = reference.cbp(x, y, *hashes, 15)
    assert same.dtype == torch.float32 and torch.equal(same, ref)
    xb, yb = x.bfloat16(), y.bfloat16()
    low = reference.cbp(xb, yb, *hashes, 15)
    assert low.dtype == torch.bfloat16
    exact = reference.cbp(xb.double(), yb.double(), *hashes, 15)
    bound = BF16_U * exact.abs() + 1e-5 * exact.abs().max()  # + fp32 FFT rounding
    assert ((low.double() - exact).abs() <= bound).all()


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------


def test_use_backend_nesting_restores_previous():
    outer = ops.get_backend()
    with ops.use_backend("reference") as name:
        assert name == "reference" and ops.get_backend() == "reference"
        with ops.use_backend("triton"):
            assert ops.get_backend() == "triton"
            with ops.use_backend("auto"):
                assert ops.get_backend() == "auto"
            assert ops.get_backend() == "triton"
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == outer


def test_use_backend_restores_after_exception():
    outer = ops.get_backend()
    with pytest.raises(RuntimeError, match="boom"), ops.use_backend("reference"):
        raise RuntimeError("boom")
    assert ops.get_backend() == outer


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"), ops.use_backend("cuda"):
        pass


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 3)
    with ops.use_backend("triton"):
        if not ops.triton_available():
            with pytest.raises(ops.BackendUnavailableError, match="not installed"):
                ops.resolve_backend("cbp", x)
            return
        with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET=1") as info:
            ops.attention_read(x[None], x, 1.0)
    message = str(info.value)
    assert "attention_read" in message and "CUDA" in message and "'reference'" in message


def test_auto_on_cpu_picks_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even with the interpreter available
    rows, u = torch.randn(2, 5, 4), torch.randn(2, 4)
    with ops.use_backend("auto"):
        assert ops.resolve_backend("attention_read", rows, u) == "reference"
        o, p = ops.attention_read(rows, u, 1.0)
    o_ref, p_ref = reference.attention_read(rows, u, 1.0)
    assert torch.equal(o, o_ref) and torch.equal(p, p_ref)
    with ops.use_backend("reference"):
        assert ops.resolve_backend("cbp", rows.cuda() if torch.cuda.is_available() else rows) == (
            "reference"
        )


def test_dispatched_ops_share_the_reference_signature():
    """Each op of rwmn.ops forwards its arguments as given (keywords included) to the reference
    or to the fused kernel, so the two must take the same parameters with the same defaults."""
    import importlib
    import inspect

    pytest.importorskip("triton")
    dispatched = {n: f for n, f in vars(ops).items() if hasattr(f, "kernel_module")}
    assert {"cbp", "memory_conv", "embed", "cross_entropy", "answer_scores"} <= set(dispatched)
    for name, op in dispatched.items():
        module = importlib.import_module(f"kernels.{op.kernel_module}")
        fused, ref = inspect.signature(getattr(module, name)), inspect.signature(op.__wrapped__)
        as_list = [(p.name, p.kind, p.default) for p in fused.parameters.values()]
        assert as_list == [(p.name, p.kind, p.default) for p in ref.parameters.values()], name
