"""One benchmark case end to end: build the inputs, pick the backend, time one pass, count.

Shared by the standalone runner (bench/run.py) and the pytest-benchmark suite
(bench/test_bench_ops.py).

Backends:

* ``reference``: ``rwmn.ops.<op>`` under ``use_backend("reference")`` (plain PyTorch).
* ``fused``: ``rwmn.ops.<op>`` under ``use_backend("triton")`` (kernels/*). When the fused
  op cannot run (``BackendUnavailableError``: not written yet, no CUDA and no interpreter)
  the case is *skipped* with the reason; it is never replaced by another backend.
* ``compiled``: ``torch.compile(rwmn.reference.<op>, fullgraph=True, dynamic=False)``;
  compilation (forward and backward) happens in an untimed probe call.

Passes: ``forward`` is the training forward (inputs require grad, the graph is built);
``backward`` is one ``torch.autograd.backward`` over a graph built by an untimed forward
just before; ``forward+backward`` does both. Gradients are cleared (set to None) outside
the timed region.

May import: bench.cases and bench.timing, rwmn.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench import cases as C
from bench import timing
from rwmn import ops, reference
from rwmn.ops import BackendUnavailableError
from rwmn.profiling import nvtx_range

#: dtypes the Triton interpreter can run (it has no bf16 and no fp16 arithmetic).
INTERPRETER_DTYPES = ("fp32",)


class Skip(Exception):
    """The case cannot run here; the message says why."""


@dataclass
class Prepared:
    fn: Callable[[], object]
    setup: Callable[[], object]


#: Error rows keep this many innermost traceback frames (where it went wrong, not how the
#: harness got there).
TRACEBACK_FRAMES = 6


def error_detail(exc: BaseException) -> dict:
    """``reason`` (the error type and the first line of its message, as tables show it) and
    ``detail`` (the whole message and the innermost frames, for the JSON)."""
    message = str(exc).strip()
    first = message.splitlines()[0] if message else ""
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-TRACEBACK_FRAMES)
    return {"reason": f"{type(exc).__name__}: {first}", "detail": "".join(frames)}


class CompiledOps:
    """torch.compile'd reference ops, one compiled callable alive at a time.

    Dynamo's cache lives on the function's code object and gives up (runs eagerly) after a
    few recompilations, so the cache is reset whenever the (op, size, dtype) changes; the
    three passes of one case share one compilation. ``backend`` is torch.compile's
    (inductor by default; a CPU smoke run may use a cheaper one, and says so).
    """

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend
        self._key = None
        self._fn = None

    def get(self, case: C.Case, dtype: str):
        key = (case.op, case.id, dtype)
        if key != self._key:
            torch._dynamo.reset()
            self._fn = torch.compile(
                getattr(reference, case.op), fullgraph=True, dynamic=False, backend=self.backend
            )
            self._key = key
        return self._fn


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _dispatched(op: str, backend: str):
    fn = getattr(ops, op)

    def call(**kwargs):
        with ops.use_backend(backend):
            return fn(**kwargs)

    return call


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_runnable(case: C.Case, backend: str, dtype: str, device: str) -> None:
    """Raise :class:`Skip` for combinations known not to run, before building anything."""
    on_cpu = torch.device(device).type == "cpu"
    if backend == "fused" and on_cpu:
        if not _interpreting():
            raise Skip("fused kernels need CUDA, or TRITON_INTERPRET=1 on CPU (--smoke)")
        if dtype not in INTERPRETER_DTYPES:
            raise Skip(f"the Triton interpreter has no {dtype}")
        if case.group != "smoke":
            raise Skip("the Triton interpreter runs the smoke sizes only")


def prepare(
    case: C.Case,
    backend: str,
    pass_: str,
    dtype: str,
    device: str,
    compiled: CompiledOps | None = None,
    seed: int = 0,
) -> Prepared:
    """Build the timed callable of one case; an untimed probe call runs it once (this is
    where torch.compile compiles). Raises :class:`Skip` when the backend is unavailable."""
    check_runnable(case, backend, dtype, device)
    kwargs, diff = C.make_inputs(case, device, C.DTYPES[dtype], seed)
    if backend == "compiled":
        op = (compiled or CompiledOps()).get(case, dtype)
    elif backend == "fused":
        op = _dispatched(case.op, "triton")
    elif backend == "reference":
        op = _dispatched(case.op, "reference")
    else:
        raise ValueError(f"unknown backend {backend!r}; expected one of {C.BACKENDS}")

    def forward():
        return _as_tuple(op(**kwargs))

    def clear_grads():
        for t in diff:
            t.grad = None

    try:
        outs = forward()
        grads = [torch.randn_like(o) for o in outs]
        if pass_ != "forward":
            torch.autograd.backward(outs, grads)
            clear_grads()
    except BackendUnavailableError as exc:
        raise Skip(str(exc)) from exc

    if pass_ == "forward":
        return Prepared(forward, timing._noop)
    if pass_ == "backward":
        # A fresh graph per repetition, built outside the timed region: the timed call is
        # exactly one training backward (no retain_graph, which compiled backwards with
        # donated buffers refuse).
        graph: list[tuple[torch.Tensor, ...]] = []

        def build_graph():
            clear_grads()
            graph[:] = [forward()]

        return Prepared(lambda: torch.autograd.backward(graph.pop(), grads), build_graph)
    if pass_ == "forward+backward":
        return Prepared(lambda: torch.autograd.backward(forward(), grads), clear_grads)
    raise ValueError(f"unknown pass {pass_!r}; expected one of {C.PASSES}")


def _with_range(name: str, fn):
    def wrapped():
        with nvtx_range(name, "bench"):
            return fn()

    return wrapped


def measure(
    case: C.Case,
    backend: str,
    pass_: str,
    dtype: str,
    device: str,
    ceilings: dict | None,
    compiled: CompiledOps | None = None,
    nvtx: bool = False,
    budget: dict | None = None,
) -> dict:
    """One result row: status, timing, peak memory, FLOPs, bytes and roofline columns."""
    row = base_row(case, backend, pass_, dtype)
    name = f"bench/{case.op}/{case.size}/{backend}/{pass_}/{dtype}"
    ctx = nvtx_range(name, "bench") if nvtx else contextlib.nullcontext()
    try:
        with ctx:
            prepared = prepare(case, backend, pass_, dtype, device, compiled)
            fn = _with_range(f"op/{case.op}", prepared.fn) if nvtx else prepared.fn
            t = timing.time_fn(device, fn, prepared.setup, **(budget or {}))
            peak, extra = timing.peak_memory(device, fn, prepared.setup)
    except Skip as exc:
        return {**row, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # recorded, not hidden: the runner exits non-zero on errors
        return {**row, "status": "error", **error_detail(exc)}
    row.update(t.as_row())
    row["peak_mem_bytes"], row["extra_mem_bytes"] = peak, extra
    if ceilings:
        row.update(timing.roofline(row["flops"], row["bytes"], t.median_ms, ceilings, dtype))
    return row


def base_row(case: C.Case, backend: str, pass_: str, dtype: str) -> dict:
    """The identifying and counted columns of a case's row, before anything runs."""
    return {
        "kind": "op",
        "op": case.op,
        "size": case.size,
        "family": case.family,
        "group": case.group,
        "sweep": case.sweep,
        "sweep_value": case.sweep_value,
        "shapes": case.shapes(),
        "backend": backend,
        "pass": pass_,
        "dtype": dtype,
        "flops": C.flops(case, pass_),
        "executed_flops": C.executed_flops(case, pass_, C.DTYPES[dtype]),
        "bytes": C.bytes_moved(case, pass_, C.DTYPES[dtype]),
        "status": "ok",
        "reason": None,
    }
