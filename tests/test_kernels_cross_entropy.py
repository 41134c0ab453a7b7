"""kernels/cross_entropy.py: the answer loss, one launch each way."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import (
    LOW_PRECISION_RATIO,
    LOW_PRECISION_REL_ATOL,
    check_against_float64,
)

import kernels._common as kernels_common
import rwmn.ops
from kernels import cross_entropy as ce
from kernels._common import record_launches
from rwmn import reference

# (B, A): the model's, one row, several row steps ending in a partial one, A not a power
# of two and wider than one.
SHAPES = [(32, 5), (1, 5), (130, 7), (3, 2)]
#: Relative error allowed for each value in test_confident_answers (~80 fp32 ulps).
RELATIVE_ERROR = 1e-5


def _fns(target, keep, legacy):
    fused = lambda x: ce.cross_entropy(x, target, keep, legacy)
    ref = lambda x: reference.cross_entropy(x, target, keep, legacy)
    return fused, ref


@pytest.mark.parametrize("legacy", [False, True], ids=["paper", "legacy"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "keep"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(shape, masked, legacy):
    batch, a = shape
    target = torch.randint(0, a, (batch,))
    keep = None
    if masked:
        keep = torch.rand(batch) < 0.7
        keep[0] = True
    check_against_float64(*_fns(target, keep, legacy), [torch.randn(batch, a) * 3.0])


@pytest.mark.parametrize("legacy", [False, True], ids=["paper", "legacy"])
@pytest.mark.parametrize("margin", [6.0, 12.0])
def test_confident_answers(margin, legacy):
    """The target well ahead of the other answers (a trained model's batch), scores away
    from zero: the loss and dx are small differences of O(1) terms, and only
    cancellation-free forms of them stay within the rule against float64."""
    x = torch.randn(32, 5)
    target = x.argmax(1)
    x[torch.arange(32), target] += margin
    x += 16.0
    fused, ref = _fns(target, None, legacy)
    check_against_float64(fused, ref, [x])
    # Stronger than the rule (torch's own forms cancel here too): every value, however
    # small, to RELATIVE_ERROR of its float64 value.
    for what, got, want in zip(
        ("loss", "dx"), _loss_and_grad(fused, x), _loss_and_grad(ref, x.double()), strict=True
    ):
        rel = ((got.double() - want).abs() / want.abs()).max().item()
        assert rel <= RELATIVE_ERROR, f"{what}: relative error {rel:.2e} vs float64"


def _loss_and_grad(fn, x):
    x = x.clone().requires_grad_()
    loss = fn(x)
    return loss.detach(), torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_scores(dtype):
    """bf16/fp16 scores (the model's under autocast) are read as they are; the loss is
    fp32 and the gradient in the scores' dtype."""
    target = torch.randint(0, 5, (32,))
    check_against_float64(
        *_fns(target, None, False), [torch.randn(32, 5)], dtype=dtype,
        ratio=LOW_PRECISION_RATIO, rel_atol=LOW_PRECISION_REL_ATOL[dtype],
    )  # fmt: skip


def test_one_launch_each_way_and_dispatch():
    x = torch.randn(32, 5, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 5, (32,))
    with rwmn.ops.use_backend("triton"), record_launches() as forward:
        loss = rwmn.ops.cross_entropy(x, target)
    assert [k.name for k in forward] == ["_ce_fwd_kernel"] and loss.dtype == torch.float32
    with record_launches() as backward:
        loss.backward()
    assert [k.name for k in backward] == ["_ce_bwd_kernel"]
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    args = (torch.randn(4, 3, requires_grad=True), torch.tensor([0, 2, 1, 1]), None, False)
    torch.library.opcheck(torch.ops.rwmn.cross_entropy.default, args, test_utils=tests)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"must be \[B, A\]"):
        ce.cross_entropy(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="keep"):
        ce.cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(3) > 0)


def test_too_many_answers_fall_back_with_one_warning():
    """Past the scores a program holds, the reference runs (nothing launched), warned once."""
    kernels_common._warn_once.cache_clear()
    n = ce.MAX_FUSED_A + 1
    logits, target = torch.randn(3, n), torch.tensor([0, 5, n - 1])
    match = f"cross_entropy runs the reference for answers = {n}: its kernels hold at most"
    with pytest.warns(UserWarning, match=match), record_launches() as launches:
        loss = ce.cross_entropy(logits, target)
    assert not launches
    torch.testing.assert_close(loss, reference.cross_entropy(logits, target), rtol=0, atol=0)
