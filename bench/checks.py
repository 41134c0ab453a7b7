"""Correctness of the fused ops and the fused model against the reference and float64.

A timing is worth nothing if the kernel computes something else, so the GPU session checks
before it measures, on the machine it measures on: every op of ``rwmn.ops`` at the model's
sizes (``bench.cases``) and the whole model, on fresh random inputs, forward and every
gradient.

The rule is the kernel tests' (tests/tolerances.py, which both read): the fused result's
largest error against a float64 reference may be ``ratio`` times the reference's own error
in the same dtype, plus ``rel_atol`` times the largest float64 value; a NaN or inf anywhere
fails. Every buffer allocated inside the fused call (``torch.empty*``,
``Tensor.new_empty*``) starts as NaN (:func:`fused_guard`, from tests/gpu_semantics.py; on
the interpreter also a GPU's semantics), so an element a kernel forgets to write cannot
pass as a stale zero: the ops take no output buffers, so this is where their API lets the
outputs be poisoned. Rows also carry the relative error ||out - ref64|| / ||ref64|| of
both, the figure to quote (fp32 arithmetic lands far under 1e-3, bf16 operands between
1e-3 and 1e-2).

May import: bench.cases, bench.e2e, rwmn, and the test support modules
tests/gpu_semantics.py and tests/tolerances.py (which import nothing of bench).
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Callable, Iterator

import torch

import tests.gpu_semantics as semantics
from bench import cases as C
from rwmn import ops
from tests.tolerances import TOLERANCES, Tolerance

#: Which fused dtypes a check covers: "fp32" compares in fp32, "bf16"/"fp16" draw the
#: op's inputs in that dtype (the model runs them under autocast instead).
MODEL_PRECISIONS = ("fp32", "bf16")


# --------------------------------------------------------------------------------------
# NaN-poisoned allocations, and a GPU's semantics on the interpreter
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def fused_guard() -> Iterator[None]:
    """Around a fused call: every floating buffer allocated inside starts as NaN
    (tests/gpu_semantics.py, ``poisoned_allocations``); on the Triton interpreter (the CPU
    smoke) also the GPU's semantics there (bf16 values, tf32 truncation, NaN masked lanes,
    barrier epochs), or only the poisoning, with a warning, where this Triton's interpreter
    lacks an internal they patch. Process-wide while it lasts: never around a reference."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        with semantics.poisoned_allocations():
            yield
        return
    context = semantics.gpu_semantics()
    try:
        context.__enter__()
    except semantics.Unsupported as e:
        warnings.warn(f"GPU semantics off on this interpreter: {e}", stacklevel=3)
        context = semantics.poisoned_allocations()
        context.__enter__()
    try:
        yield
    finally:
        context.__exit__(None, None, None)


# --------------------------------------------------------------------------------------
# Comparing one tensor
# --------------------------------------------------------------------------------------


def compare(name: str, fused, ref, ref64, tol: Tolerance) -> dict:
    """One output or gradient: the fused error, the reference's, and the verdict."""
    if fused is None or ref is None or ref64 is None:
        ok = fused is None and ref is None and ref64 is None  # unused by all three
        why = None if ok else "no gradient from some of fused/reference/float64"
        return {"tensor": name, "ok": ok, "finite": True, "why": why}
    if tuple(fused.shape) != tuple(ref64.shape):
        why = f"shape {tuple(fused.shape)} vs {tuple(ref64.shape)}"
        return {"tensor": name, "ok": False, "finite": None, "why": why}
    f64, r64 = fused.detach().double(), ref64.detach().double()
    own64 = ref.detach().double()
    finite = bool(torch.isfinite(f64).all())
    scale = r64.abs().max().item() if r64.numel() else 0.0
    norm = r64.norm().item() + 1e-300
    err = (f64 - r64).abs().max().item() if finite and r64.numel() else float("inf")
    own = (own64 - r64).abs().max().item() if r64.numel() else 0.0
    allowed = tol.allowed(own, scale)
    ok = finite and err <= allowed
    why = None
    if not finite:
        why = "NaN/inf (an unwritten output starts as NaN)"
    elif not ok:
        why = f"error {err:.3g} > allowed {allowed:.3g} (reference's own {own:.3g})"
    return {
        "tensor": name,
        "ok": ok,
        "finite": finite,
        "max_err": err,
        "ref_max_err": own,
        "allowed": allowed,
        "scale": scale,
        # ||x - ref64|| / ||ref64||, for fused and reference.
        "rel_err": (f64 - r64).norm().item() / norm if finite else float("inf"),
        "ref_rel_err": (own64 - r64).norm().item() / norm,
        "why": why,
    }


def verdict(results: list[dict]) -> dict:
    """A check's summary: pass or FAIL, and the tensor furthest past (or nearest to) its
    allowance."""
    failed = [r for r in results if not r["ok"]]

    def margin(r):
        allowed = r.get("allowed") or 0.0
        return r.get("max_err", float("inf")) / allowed if allowed else float("inf")

    worst = failed[0] if failed else max(results, key=margin, default=None)
    return {
        "verdict": "pass" if not failed else "FAIL",
        "failed": [r["tensor"] for r in failed],
        "worst": None if worst is None else worst["tensor"],
        "worst_why": None if worst is None else worst.get("why"),
        "worst_rel_err": None if worst is None else worst.get("rel_err"),
        "worst_ref_rel_err": None if worst is None else worst.get("ref_rel_err"),
        "worst_err_over_allowed": None if worst is None else margin(worst),
        "tensors": results,
    }


# --------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------


def _names(kwargs: dict) -> dict[int, str]:
    """id(tensor) -> its argument name ("weights[0]" for list members)."""
    names = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            names[id(value)] = key
        elif isinstance(value, list | tuple):
            for i, t in enumerate(value):
                if isinstance(t, torch.Tensor):
                    names[id(t)] = f"{key}[{i}]"
    return names


def _with_leaves(kwargs: dict, diff: list[torch.Tensor], dtype: torch.dtype):
    """A copy of the op's arguments whose differentiable tensors are fresh leaves in
    ``dtype`` (hashes and signs unchanged); returns (kwargs, leaves in ``diff``'s order)."""
    fresh = {id(t): t.detach().to(dtype).requires_grad_() for t in diff}

    def swap(v):
        if isinstance(v, torch.Tensor):
            return fresh.get(id(v), v)
        if isinstance(v, list | tuple):
            return type(v)(swap(t) for t in v)
        return v

    return {k: swap(v) for k, v in kwargs.items()}, [fresh[id(t)] for t in diff]


def _outputs_and_grads(fn: Callable, kwargs, leaves, cotangents):
    out = fn(**kwargs)
    out = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(
        out, leaves, [c.to(o.dtype) for o, c in zip(out, cotangents, strict=True)],
        allow_unused=True,
    )  # fmt: skip
    return [o.detach() for o in out], [None if g is None else g.detach() for g in grads]


def _dispatched(op: str, backend: str) -> Callable:
    fn = getattr(ops, op)

    def call(**kwargs):
        with ops.use_backend(backend):
            return fn(**kwargs)

    return call


def check_op(
    case: C.Case, dtype: str, device: str, seed: int, fused: Callable | None = None
) -> dict:
    """Fused vs reference vs float64 for one op case: every output and input gradient.

    ``fused`` defaults to ``rwmn.ops.<op>`` under ``use_backend("triton")``; a test passes
    a deliberately wrong one to see the check fail."""
    torch_dtype = C.DTYPES[dtype]
    kwargs, diff = C.make_inputs(case, device, torch_dtype, seed)
    names = _names(kwargs)
    leaf_names = [names[id(t)] for t in diff]
    reference = _dispatched(case.op, "reference")
    fused = fused or _dispatched(case.op, "triton")
    gen = torch.Generator().manual_seed(seed + 1)

    kw64, leaves64 = _with_leaves(kwargs, diff, torch.float64)
    with torch.no_grad():
        probe = reference(**kw64)
    probe = probe if isinstance(probe, tuple) else (probe,)
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device) for o in probe]
    out64, grads64 = _outputs_and_grads(reference, kw64, leaves64, cot)
    kw, leaves = _with_leaves(kwargs, diff, torch_dtype)
    out_ref, grads_ref = _outputs_and_grads(reference, kw, leaves, cot)
    kw, leaves = _with_leaves(kwargs, diff, torch_dtype)
    with fused_guard():
        out_fused, grads_fused = _outputs_and_grads(fused, kw, leaves, cot)

    tol = TOLERANCES[dtype]
    labels = [f"output {i}" for i in range(len(out64))] + [f"grad {n}" for n in leaf_names]
    results = [
        compare(label, f, r, r64, tol)
        for label, f, r, r64 in zip(
            labels, out_fused + grads_fused, out_ref + grads_ref, out64 + grads64, strict=True
        )
    ]
    return {"tolerance": vars(tol), **verdict(results)}


# --------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------


def _model_pass(model, batch, backend: str, precision: str, device: str, poison: bool):
    """Logits and every parameter gradient of the training loss."""
    story, query, answers, targets = batch
    model.zero_grad(set_to_none=True)
    kind = torch.device(device).type
    autocast = (
        torch.autocast(kind, dtype=C.DTYPES[precision])
        if precision != "fp32"
        else contextlib.nullcontext()
    )
    guard = fused_guard() if poison else contextlib.nullcontext()
    with guard, ops.use_backend(backend):
        with autocast:
            logits = model(story, query, answers)
            loss = model.loss(logits, targets)
        loss.backward()
    grads = {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in model.named_parameters()
    }
    return logits.detach(), grads


def _to_double(batch):
    def cast(t):
        if isinstance(t, tuple):
            return tuple(cast(x) for x in t)
        return t.double() if t.is_floating_point() else t

    return tuple(cast(t) for t in batch)


def check_model(
    config: str,
    precision: str,
    device: str,
    seed: int,
    dims: dict,
    n: int,
    batch: int,
    fused_backend: str = "triton",
) -> dict:
    """The whole model (``RWMNConfig(data_source=config, **dims)``) on the fused backend vs
    the reference backend vs a float64 reference copy: the logits and the gradient of the
    training loss with respect to every parameter. ``precision`` "bf16" (or "fp16") is
    autocast, as training runs it."""
    from bench.e2e import make_batch
    from rwmn import RWMN, RWMNConfig

    cfg = RWMNConfig(data_source=config, **dims)
    torch.manual_seed(seed)
    model = RWMN(cfg).to(device)
    model64 = copy.deepcopy(model).double()
    inputs = make_batch(cfg, n, batch, device, seed)
    logits64, grads64 = _model_pass(
        model64, _to_double(inputs), "reference", "fp32", device, poison=False
    )
    logits_ref, grads_ref = _model_pass(model, inputs, "reference", precision, device, False)
    logits_fused, grads_fused = _model_pass(model, inputs, fused_backend, precision, device, True)
    tol = TOLERANCES[precision]
    results = [compare("logits", logits_fused, logits_ref, logits64, tol)]
    results += [
        compare(f"grad {name}", grads_fused[name], grads_ref[name], grads64[name], tol)
        for name in grads64
    ]
    return {"tolerance": vars(tol), "n": n, "batch": batch, **verdict(results)}
