"""GPU semantics for the Triton interpreter: the test-side emulation of what a GPU does and
the interpreter does not, so a defect that only a GPU would show fails on the CPU too.

Each emulation is a flag of :class:`Semantics`, switched on by :func:`gpu_semantics` (a
context manager; the ``gpu_semantics`` fixture of tests/kernel_helpers.py turns on all):

``poison``
    Every floating buffer allocated through ``torch.empty``, ``empty_like``,
    ``empty_strided``, ``Tensor.new_empty`` or ``Tensor.new_empty_strided`` starts as NaN:
    a GPU's caching allocator hands back stale memory, so an element a kernel forgets to
    write must fail the comparison. :func:`poisoned_allocations` alone (no Triton
    internals) is the one poisoning helper of the tests and of ``bench.checks``.
``bf16``
    The interpreter stores bfloat16 as uint16 bit patterns and its arithmetic (``tl.dot``,
    ``+``, ``*``, comparisons, ``exp``, casts to and from integers, ``tl.sum``, ``tl.max``
    ...) reads the patterns as numbers. Every such op sees the bf16 values instead
    (exactly, in fp32) and rounds a bf16 result to nearest even, as the hardware does; a
    bf16 ``tl.sum`` rounds every partial of its pairwise tree. Casts to bf16 round to
    nearest even too (the interpreter truncates).
``tf32``
    ``tl.dot(..., input_precision="tf32")`` on fp32 operands: the tensor cores read only
    the top 10 mantissa bits, truncated (no rounding), so the operands are truncated before
    the interpreter's exact product. ``"tf32x3"`` and ``"ieee"`` stay exact.
``masked_nan``
    A masked load without ``other`` leaves the masked lanes undefined on a GPU; here they
    read as NaN (floating types) instead of the interpreter's 0.
``barriers``
    The interpreter runs a program's block ops one after another, so a missing
    ``tl.debug_barrier`` between a scratch store and a load of it by another thread never
    shows. The checker splits each program into epochs at its barriers and raises
    :class:`BarrierRace` when one epoch touches the same global-memory byte twice, at least
    once by a store, from different lanes. A lane is an element index of a block of a given
    shape: it is the same thread when both accesses have the same shape and layout (the
    checker cannot see layouts, so it trusts same shape and index, as a kernel's in-place
    ``load(p); store(p, ...)`` needs). Programs are not compared with each other.
``reversed_grid``
    The interpreter runs the programs in grid order, so the program with the largest index
    always finishes last; a GPU runs them in any order. The programs run from the last
    grid index to the first instead, so a kernel that finishes a reduction in the last
    program to arrive (``kernels._common.last_to_arrive``) must find it by its counter,
    not by its index, and must not read a partial before its program has run.

Not emulated: scans (``tl.cumsum``) of bf16 blocks, which the kernels never run; integer
masked lanes and integer buffers, which keep 0 and
their contents (a garbage index would crash the interpreter, not reproduce the GPU).

Interpreter internals differ between Triton versions: :func:`gpu_semantics` raises
:class:`Unsupported` when one it patches is missing, and the fixture turns that into a skip.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Semantics:
    """Which emulations are on (all by default)."""

    poison: bool = True
    bf16: bool = True
    tf32: bool = True
    masked_nan: bool = True
    barriers: bool = True
    reversed_grid: bool = True


class Unsupported(RuntimeError):
    """This Triton's interpreter lacks an internal the emulation patches."""


class BarrierRace(AssertionError):
    """A load or store races with another lane's access of the same epoch."""


# --------------------------------------------------------------------------------------
# Stale memory
# --------------------------------------------------------------------------------------

_TORCH_ALLOCATORS = ("empty", "empty_like", "empty_strided")
_TENSOR_ALLOCATORS = ("new_empty", "new_empty_strided")


def _nan_filled(alloc):
    @functools.wraps(alloc)
    def poisoned(*args, **kwargs):
        t = alloc(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    return poisoned


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Every floating buffer allocated through ``torch.empty``, ``empty_like``,
    ``empty_strided``, ``Tensor.new_empty`` or ``Tensor.new_empty_strided`` inside the block
    starts as NaN (restored on exit, even on error).

    Process-wide while it lasts: run only the fused call under it, not a reference that
    allocates with ``torch.empty`` and relies on the values (none does today)."""
    saved = {name: getattr(torch, name) for name in _TORCH_ALLOCATORS}
    own = {name: torch.Tensor.__dict__.get(name) for name in _TENSOR_ALLOCATORS}
    try:
        for name, alloc in saved.items():
            setattr(torch, name, _nan_filled(alloc))
        for name in _TENSOR_ALLOCATORS:
            setattr(torch.Tensor, name, _nan_filled(getattr(torch.Tensor, name)))
        yield
    finally:
        for name, alloc in saved.items():
            setattr(torch, name, alloc)
        for name, method in own.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)


# --------------------------------------------------------------------------------------
# Interpreter patches
# --------------------------------------------------------------------------------------

#: InterpreterBuilder methods whose floating operands the bf16 emulation converts.
_FLOAT_OPS = (
    "create_fadd", "create_fsub", "create_fmul", "create_fdiv", "create_frem", "create_fneg",
    "create_precise_divf", "create_approx_divf", "create_fma", "create_clampf",
    "create_minimumf", "create_maximumf", "create_minnumf", "create_maxnumf",
    "create_fcmpOLT", "create_fcmpOGT", "create_fcmpOLE", "create_fcmpOGE", "create_fcmpOEQ",
    "create_fcmpONE", "create_fcmpULT", "create_fcmpUGT", "create_fcmpULE", "create_fcmpUGE",
    "create_fcmpUEQ", "create_fcmpUNE",
    "create_exp", "create_exp2", "create_log", "create_log2", "create_sqrt",
    "create_precise_sqrt", "create_rsqrt", "create_sin", "create_cos", "create_erf",
    "create_floor", "create_ceil",
)  # fmt: skip
#: The methods every emulation but poison patches (checked up front).
_NEEDED = ("create_dot", "create_masked_load", "create_masked_store", "create_barrier",
           "set_grid_idx", "cast_impl")  # fmt: skip
#: tf32 keeps the top 10 of fp32's 23 mantissa bits: this mask clears the other 13.
_TF32_MASK = np.uint32(0xFFFFE000)
#: The canonical bf16 quiet NaN (masked lanes of bf16 loads).
_BF16_NAN = np.uint16(0x7FC0)


def _interpreter():
    try:
        import triton.language as tl
        from triton._C.libtriton import ir
        from triton.runtime import interpreter
    except ImportError as e:  # pragma: no cover - the project requires triton
        raise Unsupported(f"no Triton interpreter: {e}") from e
    builder = getattr(interpreter, "InterpreterBuilder", None)
    # Every _NEEDED method must exist; a floating op this Triton's interpreter lacks (3.6 has
    # no create_fneg or create_approx_divf) cannot be reached by a kernel and is not patched.
    missing = [n for n in _NEEDED if not hasattr(builder, n)]
    if builder is None or missing or not hasattr(interpreter, "TensorHandle"):
        raise Unsupported(f"Triton {_version()} interpreter lacks {missing or 'its builder'}")
    if not hasattr(ir, "INPUT_PRECISION"):
        raise Unsupported(f"Triton {_version()} has no ir.INPUT_PRECISION")
    return interpreter, builder, tl, ir


def _version() -> str:
    import triton

    return triton.__version__


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> their values, exactly, as float32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> 16
    return np.where(np.isnan(x), _BF16_NAN, rounded.astype(np.uint16))


def truncate_to_tf32(x: np.ndarray) -> np.ndarray:
    """float32 with the low 13 mantissa bits cleared, as a tensor core reads a tf32 operand."""
    return (np.asarray(x, dtype=np.float32).view(np.uint32) & _TF32_MASK).view(np.float32)


class _Patcher:
    """Class attributes set for the duration of the emulation and restored after."""

    def __init__(self):
        self.saved = []

    def set(self, owner, name, value):
        self.saved.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, value)

    def restore(self):
        for owner, name, value in reversed(self.saved):
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        self.saved.clear()


def _patch_bf16(p: _Patcher, interp, builder, tl):
    handle = interp.TensorHandle

    def values(h):
        if isinstance(h, handle) and h.dtype.scalar == tl.bfloat16:
            return handle(bf16_to_f32(h.data), tl.float32), True
        return h, False

    def on_values(method):
        @functools.wraps(method)
        def wrapped(self, *args):
            converted = [values(a) for a in args]
            if not any(was for _, was in converted):
                return method(self, *args)
            out = method(self, *[a for a, _ in converted])
            if out.dtype.scalar == tl.float32:  # a bf16 result (a comparison gives int1)
                return handle(f32_to_bf16(out.data), tl.bfloat16)
            return out

        return wrapped

    for name in _FLOAT_OPS:
        if hasattr(builder, name):
            p.set(builder, name, on_values(getattr(builder, name)))

    cast_impl = builder.cast_impl

    def cast(self, src, dst_type):
        # The interpreter widens bf16 to fp32 exactly but narrows fp32 to bf16 by truncation
        # (the GPU rounds to nearest even), and converts any other pair by the pattern.
        if src.dtype.scalar == tl.bfloat16:
            wide = handle(bf16_to_f32(src.data), tl.float32)
            return wide if dst_type.scalar == tl.float32 else cast_impl(self, wide, dst_type)
        if dst_type.scalar == tl.bfloat16:
            if src.dtype.scalar != tl.float32:
                src = cast_impl(self, src, tl.float32)
            return handle(f32_to_bf16(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    p.set(builder, "cast_impl", cast)
    _patch_bf16_reductions(p, interp, tl)


def _bf16_tree_sum(bits: np.ndarray, axis, keep_dims: bool) -> np.ndarray:
    """Sum of bf16 patterns along axis, pairwise, rounded to bf16 at every level as a
    GPU's reduction tree rounds each partial (the pairing order is the tree's, not the
    GPU's)."""
    x = bf16_to_f32(np.asarray(bits))
    if axis is None:
        x, axis = x.reshape(-1), 0
    x = np.moveaxis(x, axis, -1)
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = np.concatenate([x, np.zeros_like(x[..., :1])], axis=-1)
        x = bf16_to_f32(f32_to_bf16(x[..., 0::2] + x[..., 1::2]))
    out = f32_to_bf16(x[..., 0])
    return np.expand_dims(out, axis) if keep_dims else out


def _patch_bf16_reductions(p: _Patcher, interp, tl):
    ops = getattr(interp, "ReduceOps", None)
    if ops is None or not all(hasattr(ops, n) for n in ("apply_impl", "to_tensor")):
        raise Unsupported(f"Triton {_version()} interpreter has no ReduceOps.apply_impl")
    apply_impl = ops.apply_impl
    std = tl.standard
    by_value = tuple(
        getattr(std, n, None)
        for n in ("_elementwise_max", "_elementwise_min", "_argmax_combine_tie_break_left",
                  "_argmax_combine_tie_break_fast", "_argmin_combine_tie_break_left",
                  "_argmin_combine_tie_break_fast")
    )  # fmt: skip

    def impl(self, input):
        first = input[0]
        if first.dtype.scalar != tl.bfloat16:
            return apply_impl(self, input)
        if self.combine_fn is std._sum_combine:
            return self.to_tensor(
                _bf16_tree_sum(first.handle.data, self.axis, self.keep_dims), first.dtype
            )
        if self.combine_fn in by_value:  # min and max are exact on the values
            values = tl.core.tensor(
                interp.TensorHandle(bf16_to_f32(first.handle.data), tl.float32),
                first.type.with_element_ty(tl.float32) if first.type.is_block() else tl.float32,
            )
            out = apply_impl(self, (values, *input[1:]))
            out = out if isinstance(out, tuple) else (out,)
            back = tuple(
                self.to_tensor(f32_to_bf16(np.asarray(t.handle.data)), tl.bfloat16)
                if t.dtype.scalar == tl.float32
                else t
                for t in out
            )
            return back if len(back) > 1 else back[0]
        return apply_impl(self, input)  # the generic path combines with the builder's ops

    p.set(ops, "apply_impl", impl)


def _patch_dot(p: _Patcher, sem: Semantics, interp, builder, tl, ir):
    handle = interp.TensorHandle
    create_dot = builder.create_dot

    def operand(h, input_precision):
        if sem.bf16 and h.dtype.scalar == tl.bfloat16:
            return handle(bf16_to_f32(h.data), tl.float32)
        tf32 = input_precision == ir.INPUT_PRECISION.TF32
        if sem.tf32 and tf32 and h.dtype.scalar == tl.float32:
            return handle(truncate_to_tf32(h.data), tl.float32)
        return h

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = operand(a, input_precision), operand(b, input_precision)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    p.set(builder, "create_dot", dot)


def _patch_masked_nan(p: _Patcher, interp, builder, tl):
    handle = interp.TensorHandle
    masked_load = builder.create_masked_load

    # The trailing cache/eviction/volatile arguments differ between Triton versions.
    def load(self, ptrs, mask, other, *flags):
        elem = ptrs.get_element_ty()
        if other is None and elem.is_floating():
            shape = np.shape(ptrs.data)
            if elem == tl.bfloat16:
                other = handle(np.full(shape, _BF16_NAN), elem)
            else:
                np_dtype = {tl.float16: np.float16, tl.float32: np.float32,
                            tl.float64: np.float64}.get(elem)  # fmt: skip
                if np_dtype is not None:
                    other = handle(np.full(shape, np.nan, dtype=np_dtype), elem)
        return masked_load(self, ptrs, mask, other, *flags)

    p.set(builder, "create_masked_load", load)


class _Epochs:
    """The bytes one program touched since its last barrier: for each byte, the smallest
    and the largest lane key that stored it and that loaded it."""

    def __init__(self):
        self.shapes: dict[tuple, int] = {}
        self.reset()

    def reset(self):
        empty = (np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.int64))
        self.summary = {"store": empty, "load": empty}

    def accesses(self, ptrs, mask, itemsize):
        """The bytes an access touches and the lane key of each (block shape, element)."""
        data, active = np.broadcast_arrays(np.asarray(ptrs.data), np.asarray(mask.data, bool))
        shape_id = self.shapes.setdefault(data.shape, len(self.shapes))
        on = active.ravel()
        lanes = np.flatnonzero(on).astype(np.int64) + (shape_id << 40)
        addrs = data.ravel()[on].astype(np.uint64)
        offs = np.arange(itemsize, dtype=np.uint64)
        return (addrs[:, None] + offs).ravel(), np.repeat(lanes, itemsize)

    @staticmethod
    def _races(addrs, lanes, summary):
        """Bytes of the access that another lane touched in ``summary``."""
        seen, lo, hi = summary
        pos = np.minimum(np.searchsorted(seen, addrs), max(len(seen) - 1, 0))
        if not len(seen):
            return addrs[:0]
        hit = seen[pos] == addrs
        other = (lo[pos] != lanes) | (hi[pos] != lanes)
        return addrs[hit & other]

    @staticmethod
    def _merge(summary, addrs, lanes):
        seen, lo, hi = summary
        a = np.concatenate([seen, addrs])
        order = np.argsort(a, kind="stable")
        a = a[order]
        lo = np.concatenate([lo, lanes])[order]
        hi = np.concatenate([hi, lanes])[order]
        starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
        return a[starts], np.minimum.reduceat(lo, starts), np.maximum.reduceat(hi, starts)

    def check(self, kind, addrs, lanes, grid_idx):
        """Raise on a race of this access with the epoch's earlier ones, then record it."""
        against = ("store",) if kind == "load" else ("store", "load")
        for earlier in against:
            bad = self._races(addrs, lanes, self.summary[earlier])
            if len(bad):
                raise BarrierRace(
                    f"program {grid_idx}: {kind} of address {int(bad[0]):#x} after a "
                    f"{earlier} of it by another lane in the same barrier epoch "
                    "(a tl.debug_barrier is missing)"
                )
        if len(addrs):
            self.summary[kind] = self._merge(self.summary[kind], addrs, lanes)


def _patch_barriers(p: _Patcher, builder, tl):
    epochs = _Epochs()
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store
    set_grid_idx = builder.set_grid_idx

    def itemsize(elem):
        return 8 if isinstance(elem, tl.pointer_type) else max(1, elem.primitive_bitwidth // 8)

    def load(self, ptrs, mask, other, *flags):
        addrs, lanes = epochs.accesses(ptrs, mask, itemsize(ptrs.get_element_ty()))
        epochs.check("load", addrs, lanes, self.grid_idx)
        return masked_load(self, ptrs, mask, other, *flags)

    def store(self, ptrs, value, mask, *flags):
        addrs, lanes = epochs.accesses(ptrs, mask, itemsize(ptrs.get_element_ty()))
        epochs.check("store", addrs, lanes, self.grid_idx)
        return masked_store(self, ptrs, value, mask, *flags)

    def barrier(self):
        epochs.reset()

    def grid_idx(self, x, y, z):
        epochs.reset()  # programs run one after another: each starts a fresh epoch
        return set_grid_idx(self, x, y, z)

    p.set(builder, "create_masked_load", load)
    p.set(builder, "create_masked_store", store)
    p.set(builder, "create_barrier", barrier)
    p.set(builder, "set_grid_idx", grid_idx)


def _patch_reversed_grid(p: _Patcher, builder):
    set_grid_idx = builder.set_grid_idx  # the barrier checker's, when it is on

    def reversed_idx(self, x, y, z):
        nx, ny, nz = self.grid_dim
        return set_grid_idx(self, nx - 1 - x, ny - 1 - y, nz - 1 - z)

    p.set(builder, "set_grid_idx", reversed_idx)


@contextlib.contextmanager
def gpu_semantics(semantics: Semantics = Semantics()) -> Iterator[Semantics]:
    """The interpreter (and the allocators) with the emulations ``semantics`` turns on.

    Raises :class:`Unsupported` before changing anything if an internal is missing."""
    interp_on = (
        semantics.bf16
        or semantics.tf32
        or semantics.masked_nan
        or semantics.barriers
        or semantics.reversed_grid
    )
    patcher = _Patcher()
    if interp_on:
        interp, builder, tl, ir = _interpreter()
        try:
            if semantics.bf16:
                _patch_bf16(patcher, interp, builder, tl)
            if semantics.bf16 or semantics.tf32:
                _patch_dot(patcher, semantics, interp, builder, tl, ir)
            if semantics.masked_nan:
                _patch_masked_nan(patcher, interp, builder, tl)
            if semantics.barriers:
                _patch_barriers(patcher, builder, tl)
            if semantics.reversed_grid:
                _patch_reversed_grid(patcher, builder)
        except Unsupported:
            patcher.restore()  # all or nothing
            raise
    try:
        with poisoned_allocations() if semantics.poison else contextlib.nullcontext():
            yield semantics
    finally:
        patcher.restore()
