"""tests/gpu_semantics.py: each emulation on a tiny kernel, then each catching a bug planted
in a copy of the project's kernels (a barrier deleted, an ``other`` removed, the tf32
rounding removed) that the plain interpreter lets pass, and the bf16 conversion dropped."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
import triton
import triton.language as tl
from kernel_helpers import (
    LOW_PRECISION_RATIO,
    LOW_PRECISION_REL_ATOL,
    cbp_fft_threshold,
    check_against_float64,
)
from test_kernels_cbp import _errors, half_precision_limit, make_inputs

import kernels.cbp as kcbp
import kernels.cbp.dense as cbp_dense
import kernels.cbp.kernels as cbp_kernels
import kernels.cbp.plan as cbp_plan
import kernels.memconv as kmemconv
import tests.gpu_semantics as gs
from kernels import reference
from kernels._common import arrival_counters, last_to_arrive

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="emulates a GPU on the Triton interpreter"
)

#: Every emulation off: the plain interpreter.
PLAIN = gs.Semantics(
    poison=False, bf16=False, tf32=False, masked_nan=False, barriers=False, reversed_grid=False
)


def semantics(**off):
    """All emulations on but the ones named False; skips where the interpreter lacks one."""
    context = gs.gpu_semantics(gs.Semantics(**off))
    try:
        context.__enter__()
    except gs.Unsupported as e:
        pytest.skip(str(e))
    context.__exit__(None, None, None)
    return gs.gpu_semantics(gs.Semantics(**off))


# --------------------------------------------------------------------------------------
# Each emulation on a tiny kernel
# --------------------------------------------------------------------------------------


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, PRECISION: tl.constexpr):
    i = tl.arange(0, 16)
    tile = i[:, None] * 16 + i[None, :]
    a, b = tl.load(a_ptr + tile), tl.load(b_ptr + tile)
    tl.store(out_ptr + tile, tl.dot(a, b, input_precision=PRECISION))


def _dot(a, b, precision, sem):
    out = torch.zeros(16, 16)
    with sem:
        _dot_kernel[(1,)](a, b, out, precision)
    return out.double()


def test_bf16_dot_multiplies_values():
    a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    exact = a.double() @ b.double()  # bf16 products are exact in fp32
    assert (_dot(a, b, "tf32", semantics()) - exact).abs().max() < 1e-5
    assert (_dot(a, b, "tf32", gs.gpu_semantics(PLAIN)) - exact).abs().max() > 1e3


@triton.jit
def _bf16_ops_kernel(x_ptr, y_ptr, out_ptr):
    i = tl.arange(0, 16)
    x = tl.load(x_ptr + i[:, None] * 16 + i[None, :])
    y = tl.load(y_ptr + i[:, None] * 16 + i[None, :])
    z = tl.where(x < y, x * y, x + y)  # bf16 arithmetic and comparisons
    tl.store(out_ptr + i, tl.sum(z, axis=1).to(tl.float32) + tl.max(x, axis=1).to(tl.int32))


def test_bf16_arithmetic_reductions_and_casts_on_values():
    x, y = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    out = torch.zeros(16)
    with semantics():
        _bf16_ops_kernel[(1,)](x, y, out)
    xd, yd = x.double(), y.double()
    z = torch.where(xd < yd, (xd * yd).bfloat16().double(), (xd + yd).bfloat16().double())
    want = z.sum(1) + xd.max(1).values.trunc()
    # Each of the 4 levels of the bf16 sum tree rounds (2^-9 relative to the partial).
    assert (out.double() - want).abs().max() <= 4 * 2**-9 * z.abs().sum(1).max()


def test_tf32_truncates_operands_and_only_for_tf32():
    a, b = torch.randn(16, 16), torch.randn(16, 16)

    def truncated(t):
        return torch.from_numpy(gs.truncate_to_tf32(t.numpy())).double()

    want = truncated(a) @ truncated(b)
    got = _dot(a, b, "tf32", semantics())
    assert (got - want).abs().max() < 1e-5
    assert (got - a.double() @ b.double()).abs().max() > 1e-3  # truncation is visible
    for precision in ("ieee", "tf32x3"):
        exact = _dot(a, b, precision, semantics())
        assert (exact - a.double() @ b.double()).abs().max() < 1e-5


@triton.jit
def _masked_load_kernel(x_ptr, out_ptr, n):
    i = tl.arange(0, 16)
    tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n) + tl.load(x_ptr + i, mask=i < n, other=1))


def test_masked_lanes_without_other_are_nan():
    out = torch.zeros(16)
    with semantics():
        _masked_load_kernel[(1,)](torch.ones(16), out, 5)
    assert (out[:5] == 2).all() and out[5:].isnan().all()


@triton.jit
def _scratch_kernel(buf_ptr, out_ptr, BARRIER: tl.constexpr, IN_PLACE: tl.constexpr):
    i = tl.arange(0, 16)
    tl.store(buf_ptr + i, i.to(tl.float32))
    if BARRIER:
        tl.debug_barrier()
    if IN_PLACE:  # each lane rewrites its own element: no barrier needed
        tl.store(buf_ptr + i, tl.load(buf_ptr + i) * 2)
        tl.store(out_ptr + i, tl.load(buf_ptr + i))
    else:  # lane i reads lane 15 - i's element
        tl.store(out_ptr + i, tl.load(buf_ptr + 15 - i))


@pytest.mark.parametrize(("barrier", "in_place"), [(True, False), (False, True), (True, True)])
def test_scratch_read_back_after_a_barrier_or_by_the_same_lane(barrier, in_place):
    out = torch.zeros(16)
    with semantics():
        _scratch_kernel[(3,)](torch.zeros(16), out, barrier, in_place)
    assert torch.equal(out, torch.arange(16.0) * 2 if in_place else torch.arange(15.0, -1, -1))


@triton.jit
def _overwrite_kernel(buf_ptr, out_ptr, BARRIER: tl.constexpr):
    i = tl.arange(0, 16)
    v = tl.load(buf_ptr + 15 - i)
    if BARRIER:
        tl.debug_barrier()
    tl.store(buf_ptr + i, v + 1)  # overwrites what another lane just read
    tl.store(out_ptr + i, v)


def test_missing_barriers_raise():
    with semantics(), pytest.raises(Exception, match="BarrierRace.*load of address"):
        _scratch_kernel[(1,)](torch.zeros(16), torch.zeros(16), False, False)
    with semantics(), pytest.raises(Exception, match="BarrierRace.*store of address"):
        _overwrite_kernel[(1,)](torch.zeros(16), torch.zeros(16), False)
    with semantics():
        _overwrite_kernel[(1,)](torch.zeros(16), torch.zeros(16), True)


@triton.jit
def _group_sum_kernel(part_ptr, out_ptr, count_ptr, BY_COUNTER: tl.constexpr):
    """Each of 4 programs stores a partial; the last to arrive (or, the planted bug, the
    one with the largest index) sums them."""
    pid = tl.program_id(0)
    tl.store(part_ptr + pid, (pid + 1).to(tl.float32))
    if BY_COUNTER:
        last = last_to_arrive(count_ptr, 4)
    else:
        tl.debug_barrier()
        last = pid == 3
    if last:
        tl.store(out_ptr, tl.sum(tl.load(part_ptr + tl.arange(0, 4)), axis=0))


@pytest.mark.parametrize("by_counter", [True, False])
def test_programs_run_in_reverse_grid_order(by_counter):
    """The last program is found by its arrival, not its index: under the reversed grid
    the index-based finish reads partials not yet written (poisoned), the counter's does
    not; the plain interpreter lets both pass. The counter is back at zero after a launch."""
    counters = arrival_counters("cpu", 1)
    for sem, ok in ((gs.gpu_semantics(PLAIN), True), (semantics(), by_counter)):
        with sem:
            part, out = torch.empty(4), torch.empty(1)
            _group_sum_kernel[(4,)](part, out, counters, by_counter)
        assert (out.item() == 10.0) == ok
        assert counters[0].item() == 0


def test_every_allocation_path_is_poisoned_and_restored():
    t = torch.zeros(3)
    allocs = [
        lambda: torch.empty(3),
        lambda: torch.empty_like(t),
        lambda: torch.empty_strided((3,), (1,)),
        lambda: t.new_empty(3),
        lambda: t.new_empty_strided((3,), (1,)),
    ]
    with gs.poisoned_allocations():
        assert all(a().isnan().all() for a in allocs)
        assert torch.empty(3, dtype=torch.int32).dtype == torch.int32  # integers untouched
    assert torch.Tensor.new_empty is not None and "new_empty" not in torch.Tensor.__dict__
    assert torch.empty.__module__ != __name__ and not hasattr(torch.empty, "__wrapped__")


# --------------------------------------------------------------------------------------
# Bugs planted in copies of the kernels
# --------------------------------------------------------------------------------------


def _kernels_source(source: str) -> str:
    """``source`` up to its first top-level function that is not ``@triton.jit``."""
    lines = source.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("def "):
            start = i
            while start > 0 and lines[start - 1].startswith("@"):
                start -= 1
            if lines[start].strip() != "@triton.jit":
                return "".join(lines[:start])
    return source


def plant(monkeypatch, tmp_path, module, old: str, new: str):
    """Replace ``module``'s Triton kernels by those of a copy of its source with ``old``
    (which must occur once) replaced by ``new``. Only the kernels travel: the copy stops
    at the first host-side function, so no custom op is registered twice."""
    source = _kernels_source(inspect.getsource(module))
    assert source.count(old) == 1, f"{old!r} occurs {source.count(old)} times"
    path = tmp_path / f"planted_{module.__name__.replace('.', '_')}.py"
    path.write_text(source.replace(old, new))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    for name, value in vars(copy).items():
        if isinstance(value, triton.runtime.KernelInterface) and hasattr(module, name):
            monkeypatch.setattr(module, name, value)


def _cbp_check(x_shape, y_shape, out_dim, dtype=torch.float32):
    """kcbp.cbp forward and both gradients against the reference and float64."""
    x, y, h1, s1, h2, s2 = make_inputs(x_shape, y_shape, out_dim, 3)
    tol = {}
    if dtype != torch.float32:
        tol = dict(ratio=LOW_PRECISION_RATIO, rel_atol=LOW_PRECISION_REL_ATOL[dtype])
    check_against_float64(
        lambda x, y: kcbp.cbp(x, y, h1, s1, h2, s2, out_dim),
        lambda x, y: reference.cbp(x, y, h1, s1, h2, s2, out_dim),
        [x, y], dtype, **tol,
    )  # fmt: skip


@pytest.mark.parametrize(
    "barrier",
    [
        "tl.debug_barrier()  # the next stage reads what other threads of the program wrote",
        "tl.debug_barrier()  # the FFT reads sketch bins written by other threads\n"
        "    z, _ = _fft(",
        "tl.debug_barrier()  # the inverses read bins written by other threads",
        "tl.debug_barrier()  # the caller reads what the last stage's threads wrote",
    ],
    ids=["fft-stage", "after-sketch", "before-inverse", "fft-end"],
)
def test_a_deleted_barrier_is_caught(barrier, monkeypatch, tmp_path):
    """FFT path (D = 45 = 3 x 15, two stages): with a barrier deleted the plain interpreter
    still gets every value right; the barrier-epoch checker raises."""
    assert len(cbp_plan.fft_plan(45, min_dim=1)) == 2
    plant(
        monkeypatch, tmp_path, cbp_kernels, barrier, barrier.replace("tl.debug_barrier()", "pass")
    )
    cbp_fft_threshold(monkeypatch, 1)
    with gs.gpu_semantics(PLAIN):
        _cbp_check((3, 13), (3, 11), 45)
    with semantics(), pytest.raises(Exception, match="BarrierRace"):
        _cbp_check((3, 13), (3, 11), 45)


def test_a_removed_other_is_caught(monkeypatch, tmp_path):
    """Dense path (D = 17): the sketch-DFT's input tile is masked past n; without
    ``other=0.0`` its masked lanes enter tl.dot, 0 on the interpreter, undefined on a GPU."""
    old = "mask=rmask[:, None] & nmask[None, :],\n            other=0.0,\n        ).to(tl.float32)"
    plant(monkeypatch, tmp_path, cbp_dense, old, old.replace("other=0.0,", ""))
    with gs.gpu_semantics(PLAIN):
        _cbp_check((3, 13), (3, 11), 17)
    with semantics(), pytest.raises(AssertionError, match="non-finite"):
        _cbp_check((3, 13), (3, 11), 17)


def test_removed_tf32_rounding_is_caught(monkeypatch, tmp_path):
    """fp16 CBP at D = 300 (three story rows): with the operands' rounding removed the
    truncation of "tf32" products gives ~2.3x the CUDA tests' limit."""

    def within_limit():
        fused = _errors(torch.float16, (3, 300), (3, 300), 300, 1, kcbp.cbp)
        ref = _errors(torch.float16, (3, 300), (3, 300), 300, 1, reference.cbp)
        return all(f <= half_precision_limit(r) for f, r in zip(fused, ref, strict=True))

    with semantics():
        assert within_limit()
    old = 'if PRECISION == "tf32":\n        bits'
    plant(monkeypatch, tmp_path, cbp_kernels, old, old.replace('PRECISION == "tf32"', "False"))
    with gs.gpu_semantics(PLAIN):
        assert within_limit()
    with semantics():
        assert not within_limit()


def test_bf16_conversion_dropped_is_caught():
    """The write convolution in bf16 (its tiles go to tl.dot as bf16): it matches under the
    emulation, and with the emulation's bf16-to-value conversion dropped (the plain
    interpreter's tl.dot on bit patterns) the same check fails. (Dropping a kernel's own
    bf16-to-fp32 cast is no silent bug here: every such value meets an fp32 operand and is
    promoted, or reaches an fp32-only op and fails to compile.)"""
    x, w, b = torch.randn(2, 2, 11, 13), torch.randn(3, 2, 4, 13) / 10, torch.randn(3) / 10

    def check():
        check_against_float64(
            lambda x, w, b: kmemconv.memory_conv(x, w, b, 3, True),
            lambda x, w, b: reference.memory_conv(x, w, b, 3, True),
            [x, w, b], torch.bfloat16,
            ratio=LOW_PRECISION_RATIO, rel_atol=LOW_PRECISION_REL_ATOL[torch.bfloat16],
        )  # fmt: skip

    with semantics():
        check()
    with semantics(bf16=False), pytest.raises(AssertionError, match="fused error"):
        check()


def test_a_missing_interpreter_internal_raises_unsupported_and_changes_nothing(monkeypatch):
    """Interpreter internals differ between Triton versions: a missing one is reported (the
    fixture turns it into a skip), with every patch already made undone."""
    from triton.runtime import interpreter

    before = dict(vars(interpreter.InterpreterBuilder))
    monkeypatch.delattr(interpreter, "ReduceOps")
    with pytest.raises(gs.Unsupported, match="ReduceOps"), gs.gpu_semantics():
        pass
    assert dict(vars(interpreter.InterpreterBuilder)) == before
