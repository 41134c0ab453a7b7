"""Helpers shared by the kernels (not a public API): launch configurations, the one launch
path, the launch recorder of the compile gate, the dtype rules (compute dtype, the one
fallback warning), and the reduction finished by the last program to arrive
(:func:`last_to_arrive` with its counters, :func:`sum_rows`).

Every launcher computes a :class:`LaunchConfig` (grid, constexprs, warps, stages) with a pure
function of shapes, dtypes and options, and launches through :func:`launch`. Inside
:func:`record_launches` the launches are recorded instead of run: the compile gate
(``bench.compile_report``) runs the model and the bench cases that way and compiles exactly
what they would launch, with Triton's real code generator, for each GPU target.

May import: torch, triton, kernels.reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from kernels.reference import UNIT_NORM_EPS  # noqa: F401  (re-exported for the kernels)

#: dtypes the kernels run natively (fp32 accumulation in all of them).
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LaunchConfig:
    """How one kernel is launched: a pure function of shapes, dtypes and options."""

    grid: tuple[int, ...]
    constexprs: Mapping[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class KernelLaunch:
    """A launch as recorded by :func:`record_launches`: the ``@triton.jit`` function, its
    runtime arguments (tensors, ints, floats) and its configuration."""

    kernel: Any
    args: tuple
    config: LaunchConfig

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else str(self.kernel)


_RECORDER: contextvars.ContextVar[list[KernelLaunch] | None] = contextvars.ContextVar(
    "kernels_launch_recorder", default=None
)


@contextlib.contextmanager
def record_launches() -> Iterator[list[KernelLaunch]]:
    """Record every launch in the block instead of running it (outputs stay unwritten).

    The compile gate uses this to collect the configurations that real calls make, from the
    same launchers, on CPU tensors and without a GPU or the interpreter.
    """
    launches: list[KernelLaunch] = []
    token = _RECORDER.set(launches)
    try:
        yield launches
    finally:
        _RECORDER.reset(token)


def recording() -> bool:
    """Whether launches are being recorded (then the kernels accept CPU tensors)."""
    return _RECORDER.get() is not None


def interpreting() -> bool:
    """Whether Triton runs on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch(kernel, config: LaunchConfig, *args) -> None:
    """Launch the ``@triton.jit`` function ``kernel`` with ``config`` (or record it).

    Launches go through ``wrap_triton`` so that ``torch.compile`` traces them inside the
    ``triton_op`` custom ops.

    Under TRITON_INTERPRET=1 ``wrap_triton`` hands back the raw interpreted function, which
    cannot see FakeTensors; skipping the launch there lets the ops' fake (meta) path be
    checked on CPU with FakeTensorMode. On a GPU the traceable wrapper handles fake
    tensors itself, so nothing is skipped.
    """
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.append(KernelLaunch(kernel, args, config))
        return
    if interpreting() and any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FUNCTIONAL) is not None:
            # AOTAutograd inlines triton_op bodies; an interpreted kernel cannot be traced,
            # so the graph would silently lose it.
            raise RuntimeError(
                "kernels: an AOTAutograd/inductor compile of the fused ops needs a GPU; under "
                "TRITON_INTERPRET=1 use torch.compile(backend='eager')"
            )
        return
    wrap_triton(kernel)[config.grid](
        *args, **config.constexprs, num_warps=config.num_warps, num_stages=config.num_stages
    )


class _Derived:
    """Values derived from buffers (a CBP hash and its signs), computed once per version.

    A training step must not rebuild what depends only on buffers: the hash's range check,
    its inverse (CSR) and the like are computed at the first call and reused while the
    buffers keep their storage and version counter (an in-place change, such as
    ``load_state_dict`` copying new hashes in, bumps it and the value is rebuilt). Under
    torch.compile the value is computed in the graph instead.
    """

    def __init__(self) -> None:
        self._entries: dict = {}

    def get(self, tensors: tuple[torch.Tensor, ...], key: tuple, make):
        if torch.compiler.is_compiling():
            return make()
        slot = (tuple(id(t) for t in tensors), key)
        stamp = tuple((t._version, t.data_ptr(), t.device) for t in tensors)
        entry = self._entries.get(slot)
        if (
            entry is not None
            and entry[1] == stamp
            and all(ref() is t for ref, t in zip(entry[0], tensors, strict=True))
        ):
            return entry[2]
        value = make()
        # Forget entries whose buffers are gone (their ids may be reused).
        dead = [k for k, (refs, _, _) in self._entries.items() if any(r() is None for r in refs)]
        for k in dead:
            del self._entries[k]
        self._entries[slot] = (tuple(weakref.ref(t) for t in tensors), stamp, value)
        return value


_DERIVED = _Derived()


def derived(tensors: tuple[torch.Tensor, ...], key: tuple, make):
    """``make()``, computed once per version of ``tensors`` (see :class:`_Derived`)."""
    return _DERIVED.get(tensors, key, make)


class _Counters:
    """The arrival counters of :func:`last_to_arrive`: int32, zero between launches (the
    last program of a group resets its counter), one buffer per device, replaced by a larger
    one when a launch needs more groups than it holds. A replaced buffer is kept: a CUDA
    graph captured with it still writes to it. Launches that use them run one after another
    on one stream (the kernels of a step do); under torch.compile each launch gets fresh
    zeros."""

    def __init__(self) -> None:
        self._buffers: dict[torch.device, list[torch.Tensor]] = {}

    def get(self, device: torch.device, n: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.zeros(n, device=device, dtype=torch.int32)
        buffers = self._buffers.setdefault(device, [])
        if not buffers or buffers[-1].numel() < n:
            buffers.append(torch.zeros(pow2_at_least(n, 1024), device=device, dtype=torch.int32))
        return buffers[-1]


_COUNTERS = _Counters()


def arrival_counters(device: torch.device, groups: int) -> torch.Tensor:
    """At least ``groups`` zeroed int32 counters on ``device`` for one launch that finishes
    its reductions with :func:`last_to_arrive` (kept between launches: no fill a call)."""
    return _COUNTERS.get(torch.device(device), groups)


@triton.jit
def last_to_arrive(counter_ptr, n):
    """Whether this program is the last of the ``n`` programs sharing ``counter_ptr`` to get
    here; that one resets the counter for the next launch. What the others stored before
    their call is visible to it: a barrier orders every thread's stores before the
    release-acquire counter; the last program loads them with ``cache_modifier=".cg"``
    (from L2, past this SM's L1). The split-K "last block" reduction: partial results are
    summed by the program that completes them, in a fixed order, with no extra launch."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == n - 1
    tl.atomic_xchg(counter_ptr, 0, mask=last, sem="relaxed", scope="gpu")
    return last


@triton.jit
def sum_rows(parts_ptr, n, out_ptr, D, BLOCK_D: tl.constexpr):
    """out[:D] = sum_k parts[k, :D] over n fp32 rows in order, stored in out's dtype; for the
    last program of a group (the loads read past L1, see last_to_arrive)."""
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(n):
        acc += tl.load(parts_ptr + k * D + offs, mask=ok, other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def warn_once(message: str) -> None:
    """warnings.warn ``message`` the first time it is seen in this process."""
    if not torch.compiler.is_compiling():
        _warn_once(message)


def runs_reference(op: str, *dtypes: torch.dtype, **sizes: tuple[int, int]) -> bool:
    """The fused entry points' one fallback rule: whether ``op`` runs its twin in
    kernels.reference because its kernels do not run one of ``dtypes`` (float64, integers)
    or a size is past what their tiles hold (name=(size, limit)); warns once, naming the op
    and the reason. Which backend runs at all is rwmn.ops's choice, from the device."""
    if not all(t in FUSED_DTYPES for t in dtypes):
        reason = (
            f"{'/'.join(dict.fromkeys(map(str, dtypes)))} inputs: the fused kernels support "
            f"{', '.join(str(t) for t in FUSED_DTYPES)}"
        )
    else:
        over = [(name, size, limit) for name, (size, limit) in sizes.items() if size > limit]
        if not over:
            return False
        name, size, limit = over[0]
        reason = f"{name} = {size}: its kernels hold at most {limit}"
    warn_once(f"kernels: {op} runs the reference for {reason}")
    return True


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


def split_width(n: int) -> tuple[int, int]:
    """Two power-of-two tile widths covering n columns, for a row held whole in two
    accumulators: the largest power of two <= n, and the rest rounded up (at least 16,
    tl.dot's least). 300 -> (256, 64): 7% padding where one tile of 512 pads 71%."""
    first = max(16, 1 << (max(n, 1).bit_length() - 1))
    return first, pow2_at_least(max(n - first, 1))


def pow2_at_least(n: int, floor: int = 16) -> int:
    """The next power of two >= n and >= floor (tl.dot needs every dim >= 16)."""
    p = floor
    while p < n:
        p *= 2
    return p
