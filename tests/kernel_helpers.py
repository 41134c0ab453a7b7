"""Shared checks for the kernel tests: float64 ground truth, poisoned outputs, tolerances."""

from __future__ import annotations

import pytest
import torch

from tests.tolerances import BY_DTYPE, Tolerance

# TRITON_INTERPRET=1 on machines without CUDA is set by tests/conftest.py, before any
# test module imports triton.

# The tolerance rule of tests/tolerances.py, under the names the kernel tests use.
#: fp32 fused error may be this many times the fp32 reference's own error vs float64 ...
ERROR_RATIO = BY_DTYPE[torch.float32].ratio
#: ... plus this much relative to the largest float64 value (fp32 rounding headroom).
FP32_REL_ATOL = BY_DTYPE[torch.float32].rel_atol
#: bf16/fp16: the fused error may be this many times the reference's in the same dtype.
LOW_PRECISION_RATIO = BY_DTYPE[torch.bfloat16].ratio
assert BY_DTYPE[torch.float16].ratio == LOW_PRECISION_RATIO
LOW_PRECISION_REL_ATOL = {d: BY_DTYPE[d].rel_atol for d in (torch.bfloat16, torch.float16)}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
cuda = [pytest.mark.cuda, needs_cuda]


def cbp_fft_threshold(monkeypatch, min_dim: int) -> None:
    """For this test, the smallest CBP output size D that takes the FFT path (where D has a
    radix plan): kernels.cbp.plan.FACTORISED_MIN_DIM, read at call time. 1 runs the FFT
    kernels at tiny D; a value above D forces the dense kernels."""
    from kernels.cbp import plan

    monkeypatch.setattr(plan, "FACTORISED_MIN_DIM", min_dim)


def autocast(fn, dtype, device="cuda"):
    """fn run under torch.autocast(device, dtype)."""

    def run(*args):
        with torch.autocast(device, dtype=dtype):
            return fn(*args)

    return run


def leaves(tensors, dtype, device="cpu"):
    """Fresh differentiable copies (None stays None)."""
    return [None if t is None else t.detach().to(device, dtype).requires_grad_() for t in tensors]


def outputs_and_grads(fn, inputs, cotangents):
    """fn's outputs and the gradients of sum <out, cotangent> w.r.t. every non-None input."""
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    wrt = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(
        out, wrt, [c.to(o.dtype) for o, c in zip(out, cotangents, strict=False)]
    )
    return [o.detach() for o in out], [g.detach() for g in grads]


def assert_matches(fused, ref_same_dtype, ref64, what, ratio=ERROR_RATIO, rel_atol=FP32_REL_ATOL):
    """Fused error vs float64 within ratio x the reference's own error (+ a small atol)."""
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} vs {tuple(ref64.shape)}"
    assert ref64.dtype == torch.float64, f"{what}: the float64 reference computed in {ref64.dtype}"
    fused64, own64 = fused.double().cpu(), ref_same_dtype.double().cpu()
    assert torch.isfinite(fused64).all(), f"{what}: non-finite values (unwritten output?)"
    err = (fused64 - ref64.cpu()).abs().max().item()
    own = (own64 - ref64.cpu()).abs().max().item()
    scale = ref64.abs().max().item() + 1e-30
    assert err <= Tolerance(ratio, rel_atol).allowed(own, scale), (
        f"{what}: fused error {err:.3e} vs reference error {own:.3e} (scale {scale:.3e})"
    )


def check_against_float64(fused_fn, ref_fn, inputs, dtype=torch.float32, device="cpu", **tol):
    """Outputs and every gradient of fused_fn in ``dtype`` vs ref_fn in ``dtype`` and
    float64, for random cotangents of every output."""
    with torch.no_grad():
        out64 = ref_fn(*leaves(inputs, torch.float64, device))
    out64 = out64 if isinstance(out64, tuple) else (out64,)
    cot = [torch.randn_like(o) for o in out64]
    ref64_out, ref64_grads = outputs_and_grads(ref_fn, leaves(inputs, torch.float64, device), cot)
    ref_out, ref_grads = outputs_and_grads(ref_fn, leaves(inputs, dtype, device), cot)
    fused_out, fused_grads = outputs_and_grads(fused_fn, leaves(inputs, dtype, device), cot)
    names = [f"output {i}" for i in range(len(ref64_out))]
    names += [f"grad of input {i}" for i, t in enumerate(inputs) if t is not None]
    for name, f, r, r64 in zip(
        names, fused_out + fused_grads, ref_out + ref_grads, ref64_out + ref64_grads, strict=True
    ):
        assert_matches(f, r, r64, name, **tol)
