"""kernels/unit_norm.py: row-wise unit normalisation, one launch each way."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import (
    LOW_PRECISION_RATIO,
    LOW_PRECISION_REL_ATOL,
    check_against_float64,
)
from torch._subclasses.fake_tensor import FakeTensorMode

import rwmn.ops
from kernels import unit_norm
from kernels._common import record_launches
from rwmn import reference

# Odd widths, several row blocks ending in a partial one, 1-D to 3-D inputs, a width past
# one tile's rows (2048: one row a program).
SHAPES = [(7, 13), (33, 300), (2, 5, 12), (17,), (3, 2048)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(shape):
    check_against_float64(unit_norm.unit_norm, reference.unit_norm, [torch.randn(shape) * 3.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_matches_float64(dtype):
    """fp16 in and out, the norm in fp32."""
    check_against_float64(
        unit_norm.unit_norm, reference.unit_norm, [torch.randn(9, 45)], dtype=dtype,
        ratio=LOW_PRECISION_RATIO, rel_atol=LOW_PRECISION_REL_ATOL[dtype],
    )  # fmt: skip


def test_zero_rows_stay_finite():
    """A dead (all-zero) row gives 0 and a zero gradient, as the reference does (eps)."""
    x = torch.zeros(3, 10, requires_grad=True)
    y = unit_norm.unit_norm(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(y, torch.zeros_like(y)) and torch.isfinite(x.grad).all()


def test_non_contiguous_input():
    x = torch.randn(12, 8).t()
    torch.testing.assert_close(unit_norm.unit_norm(x), reference.unit_norm(x))


def test_one_launch_each_way():
    x = torch.randn(40, 300, requires_grad=True)
    with record_launches() as forward:
        y = unit_norm.unit_norm(x)
    with record_launches() as backward:
        y.backward(torch.randn_like(y))
    assert [k.name for k in forward] == ["_unit_norm_fwd_kernel"]
    assert [k.name for k in backward] == ["_unit_norm_bwd_kernel"]


def test_dispatch_and_fake():
    x = torch.randn(4, 6)
    with rwmn.ops.use_backend("triton"), record_launches() as launches:
        rwmn.ops.unit_norm(x)
    assert [k.name for k in launches] == ["_unit_norm_fwd_kernel"]
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(5, 7))
        assert torch.ops.rwmn.unit_norm(fake).shape == (5, 7)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    x = torch.randn(5, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.rwmn.unit_norm.default, (x,), test_utils=tests)


def test_float64_runs_the_reference():
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="unit_norm runs the reference"):
        torch.testing.assert_close(unit_norm.unit_norm(x), reference.unit_norm(x))


# --------------------------------------------------------------------------------------
# The hop update unit_norm(a unit_norm(o) + b u)
# --------------------------------------------------------------------------------------

#: (a, b): the paper's blend (alpha = 0.7) and the release's sum.
HOP_COEFFICIENTS = [(0.7, 0.3), (1.0, 1.0)]


def _hop(a, b):
    return lambda o, u: unit_norm.hop_update(o, u, a, b)


def _hop_reference(a, b):
    return lambda o, u: reference.hop_update(o, u, a, b)


@pytest.mark.parametrize(("a", "b"), HOP_COEFFICIENTS)
@pytest.mark.parametrize("shape", [(7, 13), (33, 300), (2, 5, 12)], ids=str)
def test_hop_update_matches_float64(shape, a, b):
    inputs = [torch.randn(shape) * 3.0, torch.randn(shape)]
    check_against_float64(_hop(a, b), _hop_reference(a, b), inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hop_update_half_matches_float64(dtype):
    check_against_float64(
        _hop(0.7, 0.3), _hop_reference(0.7, 0.3), [torch.randn(9, 45), torch.randn(9, 45)],
        dtype=dtype, ratio=LOW_PRECISION_RATIO, rel_atol=LOW_PRECISION_REL_ATOL[dtype],
    )  # fmt: skip


def test_hop_update_zero_read_stays_finite():
    """A zero readout o (every read row dead) gives u' = unit_norm(b u) and finite grads."""
    o = torch.zeros(3, 10, requires_grad=True)
    u = torch.randn(3, 10, requires_grad=True)
    y = unit_norm.hop_update(o, u, 0.7, 0.3)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(y, reference.unit_norm(u.detach()))
    assert torch.isfinite(o.grad).all() and torch.isfinite(u.grad).all()


def test_hop_update_one_launch_each_way_and_dispatch():
    o = torch.randn(32, 300, requires_grad=True)
    u = torch.randn(32, 300, requires_grad=True)
    with rwmn.ops.use_backend("triton"), record_launches() as forward:
        y = rwmn.ops.hop_update(o, u, 0.7, 0.3)
    with record_launches() as backward:
        y.backward(torch.randn_like(y))
    assert [k.name for k in forward] == ["_hop_update_fwd_kernel"]
    assert [k.name for k in backward] == ["_hop_update_bwd_kernel"]
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    args = (torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True), 0.5, 0.5)
    torch.library.opcheck(torch.ops.rwmn.hop_update.default, args, test_utils=tests)


def test_hop_update_bad_shapes_raise():
    with pytest.raises(ValueError, match="one shape"):
        unit_norm.hop_update(torch.randn(3, 4), torch.randn(3, 5), 0.5, 0.5)


# --------------------------------------------------------------------------------------
# The last hop's update and the answer scores <g_i, u'>
# --------------------------------------------------------------------------------------


def _answers(a, b):
    return lambda o, u, g: unit_norm.answer_scores(o, u, g, a, b)


def _answers_reference(a, b):
    return lambda o, u, g: reference.answer_scores(o, u, g, a, b)


@pytest.mark.parametrize(("a", "b"), HOP_COEFFICIENTS)
@pytest.mark.parametrize(("batch", "n_answers", "d"), [(7, 5, 13), (33, 5, 300), (3, 1, 40)])
def test_answer_scores_match_float64(batch, n_answers, d, a, b):
    inputs = [torch.randn(batch, d) * 3.0, torch.randn(batch, d), torch.randn(batch, n_answers, d)]
    check_against_float64(_answers(a, b), _answers_reference(a, b), inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_answer_scores_half_match_float64(dtype):
    inputs = [torch.randn(9, 45), torch.randn(9, 45), torch.randn(9, 5, 45)]
    check_against_float64(
        _answers(0.7, 0.3), _answers_reference(0.7, 0.3), inputs,
        dtype=dtype, ratio=LOW_PRECISION_RATIO, rel_atol=LOW_PRECISION_REL_ATOL[dtype],
    )  # fmt: skip


def test_answer_scores_one_launch_each_way_and_dispatch():
    o, u = torch.randn(32, 300, requires_grad=True), torch.randn(32, 300, requires_grad=True)
    g = torch.randn(32, 5, 300, requires_grad=True)
    with rwmn.ops.use_backend("triton"), record_launches() as forward:
        s = rwmn.ops.answer_scores(o, u, g, 0.7, 0.3)
    with record_launches() as backward:
        s.backward(torch.randn_like(s))
    assert [k.name for k in forward] == ["_answer_fwd_kernel"]
    assert [k.name for k in backward] == ["_answer_bwd_kernel"]
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    args = (
        torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True),
        torch.randn(5, 3, 7, requires_grad=True), 0.5, 0.5,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.rwmn.answer_scores.default, args, test_utils=tests)


def test_answer_scores_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\[B, A, d\]"):
        unit_norm.answer_scores(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 5, 5), 1, 1)
