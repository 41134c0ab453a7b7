"""Helpers shared by the memory-convolution and attention kernels (not a public API)."""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch._subclasses.fake_tensor import is_fake

#: dtypes the kernels run natively (fp32 accumulation in all of them).
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: eps of the row unit-norm, as in rwmn.reference.UNIT_NORM_EPS.
UNIT_NORM_EPS = 1e-12


def interpreting() -> bool:
    """Whether Triton runs on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch a (wrap_triton'd) kernel.

    Under TRITON_INTERPRET=1 ``wrap_triton`` hands back the raw interpreted function, which
    cannot see FakeTensors; skipping the launch there lets the ops' fake (meta) path be
    checked on CPU with FakeTensorMode. On a GPU the traceable wrapper handles fake
    tensors itself, so nothing is skipped.
    """
    if interpreting() and any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FUNCTIONAL) is not None:
            # AOTAutograd inlines triton_op bodies; an interpreted kernel cannot be traced,
            # so the graph would silently lose it.
            raise RuntimeError(
                "kernels: an AOTAutograd/inductor compile of the fused ops needs a GPU; under "
                "TRITON_INTERPRET=1 use torch.compile(backend='eager')"
            )
        return
    kernel[grid](*args, **kwargs)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def warn_once(message: str) -> None:
    """warnings.warn ``message`` the first time it is seen in this process."""
    if not torch.compiler.is_compiling():
        _warn_once(message)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the kernels run in: the autocast dtype when autocast is on for the
    tensors' device (custom ops are not autocast aware, so the wrappers cast for them),
    else the promoted dtype of the floating inputs."""
    present = [t for t in tensors if t is not None]
    device_type = present[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in ``dtype`` and contiguous (None stays None)."""
    if t is None:
        return None
    return t.to(dtype).contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 inputs (faithful to the
    reference), native tensor-core products for bf16/fp16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2_at_least(n: int, floor: int = 16) -> int:
    """The next power of two >= n and >= floor (tl.dot needs every dim >= 16)."""
    p = floor
    while p < n:
        p *= 2
    return p
