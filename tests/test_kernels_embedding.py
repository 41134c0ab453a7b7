"""kernels/embedding.py: unit_norm(unit_norm(x) W^T + b), forward and every gradient."""

from __future__ import annotations

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
from kernels import embedding
from kernels._common import record_launches
from rwmn import reference

# (leading shape, K, N): odd widths, one and several row blocks ending in a partial one,
# N a power of two (the second accumulator all padding), N past 256 (both used), a 3-D x.
SHAPES = [((7,), 13, 9), ((70,), 45, 300), ((5,), 64, 16), ((2, 3), 24, 40), ((33,), 200, 257)]


def _inputs(lead, k, n, with_bias=True):
    x = torch.randn(*lead, k) * 2.0
    w = torch.randn(n, k) / k**0.5
    b = 0.1 * torch.randn(n) if with_bias else None
    return x, w, b


@pytest.mark.parametrize("normalize_input", [True, False], ids=["normed", "as-is"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(shape, normalize_input):
    check_against_float64(
        lambda x, w, b: embedding.embed(x, w, b, normalize_input),
        lambda x, w, b: reference.embed(x, w, b, normalize_input),
        _inputs(*shape),
    )


def test_without_bias():
    check_against_float64(embedding.embed, reference.embed, _inputs((9,), 20, 30, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_low_precision_autocast_cpu(shape, dtype):
    """bf16/fp16 under autocast, as training runs it: x and W rounded to the compute dtype
    for the GEMM, everything else fp32, y in the compute dtype."""
    check_against_float64(
        autocast(embedding.embed, dtype, "cpu"), autocast(reference.embed, dtype, "cpu"),
        _inputs(*shape), ratio=LOW_PRECISION_RATIO, rel_atol=LOW_PRECISION_REL_ATOL[dtype],
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [((1500,), 4096, 300), ((192,), 300, 300)], ids=str)
@pytest.mark.cuda
@cuda[1]
def test_model_shapes_cuda(shape, dtype):
    check_against_float64(
        autocast(embedding.embed, dtype), autocast(reference.embed, dtype), _inputs(*shape),
        device="cuda", ratio=LOW_PRECISION_RATIO, rel_atol=LOW_PRECISION_REL_ATOL[dtype],
    )  # fmt: skip


def test_launches_and_parameter_gradients_in_their_dtype():
    """Three launches forward (the rows' norms, z, y); two backward (dz, then dW and db
    together) when x is data;
    the parameters' gradients come out fp32 under bf16 autocast, with no cast launch."""
    x, w, b = _inputs((40,), 64, 48)
    w.requires_grad_()
    b.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), record_launches() as forward:
        y = embedding.embed(x, w, b)
    assert y.dtype == torch.bfloat16
    assert [k.name for k in forward] == [
        "_row_norms_kernel", "_embed_fwd_kernel", "_unit_norm_fwd_kernel"
    ]  # fmt: skip
    with record_launches() as backward:
        y.backward(torch.randn_like(y))
    assert [k.name for k in backward] == ["_unit_norm_bwd_kernel", "_embed_dw_kernel"]


def test_dispatch_fake_and_opcheck():
    x, w, b = _inputs((6,), 10, 12)
    with rwmn.ops.use_backend("triton"), record_launches() as launches:
        rwmn.ops.embed(x, w, b, normalize_input=False)
    assert [k.name for k in launches] == ["_embed_fwd_kernel", "_unit_norm_fwd_kernel"]
    with FakeTensorMode() as mode:
        y, z, n_x = torch.ops.rwmn.embed(
            mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b), torch.bfloat16, True
        )
    assert y.shape == z.shape == (6, 12) and y.dtype == torch.bfloat16 and n_x.shape == (6,)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    args = (x, w.requires_grad_(), b.requires_grad_(), torch.float32, False)
    torch.library.opcheck(torch.ops.rwmn.embed.default, args, test_utils=tests)


def test_bad_shapes_raise_and_float64_falls_back():
    x, w, b = _inputs((3,), 8, 5)
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 8\]"):
        embedding.embed(x[:, :7], w, b)
    x, w, b = (t.double() for t in _inputs((2,), 4, 6))
    with pytest.warns(UserWarning, match="embed runs the reference"):
        torch.testing.assert_close(embedding.embed(x, w, b), reference.embed(x, w, b))
