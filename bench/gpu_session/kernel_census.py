"""The GPU census: the kernels one training step launches on the device, against
bench.census's count of the same step on the CPU.

Per configuration (data source, precision, backend) a fresh model (seed 0) takes the step
bench.census counts (gradients set to None, forward under autocast or not, ``model.loss``,
backward, Adagrad as ``rwmn.loop.make_adagrad`` builds it) once untimed, then once under
``torch.profiler`` with CUDA activity. The device events of that step (kernels, and the
copies and fills the driver runs: ``Memcpy ...``, ``Memset ...``) are the kernel list; each
gets a kind by its name (:func:`kernel_kind`: the project's Triton kernels, cuBLAS gemms,
cuFFT, elementwise, copies, fills, reductions, index kernels, the optimizer's, other). The
comparison (:func:`compare`) puts the count and the count per kind next to bench.census's
(``count_step``: one launch per aten op, the fused kernels' launches recorded), with their
ratio: device kernels over CPU-counted launches, where 1 means that the CPU census counts
what the GPU runs.

Without CUDA the profiler sees no kernel. Then the profiled step's CPU op list stands in
(the innermost aten ops, views and allocations left out, classified as bench.census
classifies them), so that a CPU run goes through every part of this module; its ratio is
labelled as such and carries no verdict.

May import: bench.gpu_session.config, bench.census, bench.e2e, rwmn and torch.
"""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import Callable, Iterable

from bench.gpu_session.config import CensusConfig

#: What a kernel list can come from: the device's kernels, or (no CUDA) the CPU op list.
SOURCE_CUDA = "cuda kernels"
SOURCE_CPU_OPS = "profiler CPU ops (no CUDA here: a stand-in, no verdict)"
#: bench.census's kinds, and ``other`` for a kernel no rule names.
KINDS = (
    "triton", "gemm", "fft", "elementwise", "copy", "fill", "reduction", "index", "optimizer",
    "other",
)  # fmt: skip
#: Kernel kinds by name, the first match wins (after the known Triton kernels). Library
#: kernels have C++ names (``void at::native::reduce_kernel<...>(...)``) or cuBLAS's own
#: (``nvjet_...``, ``sm90_xmma_gemm_...``, ``cutlass::Kernel2<...>``).
_RULES = (
    ("gemm", re.compile(r"gemm|gemv|nvjet|xmma|cutlass|cublas|splitK|dot_kernel", re.I)),
    ("fft", re.compile(r"fft", re.I)),
    ("fill", re.compile(r"^Memset|FillFunctor|\bfill_kernel")),
    ("copy", re.compile(r"^Memcpy|copy_kernel|CatArray|_copy|Copy")),
    ("optimizer", re.compile(r"multi_tensor_apply|[Aa]dagrad|foreach")),
    (
        "index",
        re.compile(
            r"[Ss]ort|[Gg]ather|[Ss]catter|index|[Ee]mbedding|searchsorted|"
            r"[Rr]adix|unique|bincount"
        ),
    ),  # fmt: skip
    ("reduction", re.compile(r"reduce|Reduce|[Ss]oft[Mm]ax|nll_loss|cumsum|[Ss]can|norm")),
)
#: A plain identifier: how a Triton kernel (the project's, or inductor's ``triton_*``) is
#: named on the device, where library kernels have C++ names.
_IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")
#: Names kept per step in the JSON, most launched first.
TOP_NAMES = 60


def kernel_kind(name: str, triton_names: Iterable[str] = ()) -> str:
    """The kind of a device kernel by its name (one of KINDS). ``triton_names`` are the
    Triton kernels the CPU census recorded; a name like ``aten::mm`` (a profiler's CPU op)
    is classified as bench.census classifies that op."""
    from bench import census

    if name in set(triton_names):
        return "triton"
    if name.startswith("aten::"):
        return census.classify_name(name.removeprefix("aten::")) or "other"
    for kind, rule in _RULES:
        if rule.search(name):
            return kind
    if _IDENTIFIER.match(name):
        return "triton"
    if "elementwise" in name or "at::native" in name:
        return "elementwise"
    return "other"


def short_name(name: str, width: int = 100) -> str:
    """A kernel's name at most ``width`` long; a C++ name without ``void`` and without its
    argument list (the last parenthesised group)."""
    if name.startswith("void ") or "::" in name:
        name = name.removeprefix("void ")
        depth = 0
        for i in range(len(name) - 1, 0, -1) if name.endswith(")") else ():
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name if len(name) <= width else name[: width - 3] + "..."


def compare(
    cpu_by_kind: dict[str, int], names: list[str], triton_names: Iterable[str], tolerance: float
) -> dict:
    """A kernel list against the CPU census's launches per kind: totals, the ratio (device
    over CPU), whether it is within ``tolerance`` of 1, per kind both counts, and the most
    launched names."""
    triton_names = set(triton_names)
    kinds = collections.Counter(kernel_kind(n, triton_names) for n in names)
    cpu_total = sum(cpu_by_kind.values())
    ratio = round(len(names) / cpu_total, 4) if cpu_total else None
    by_name = collections.Counter(short_name(n) for n in names)
    return {
        "cpu_launches": cpu_total,
        "device_kernels": len(names),
        "ratio": ratio,
        "tolerance": tolerance,
        # (1e-9: 33 / 30 is within 10%, though not in binary floating point)
        "within_tolerance": None if ratio is None else abs(ratio - 1) <= tolerance + 1e-9,
        "by_kind": {
            k: {"cpu": cpu_by_kind.get(k, 0), "device": kinds.get(k, 0)}
            for k in KINDS
            if cpu_by_kind.get(k) or kinds.get(k)
        },
        "kernels": [[n, c] for n, c in by_name.most_common(TOP_NAMES)],
        "distinct_kernels": len(by_name),
    }


def device_kernels(events) -> list[str]:
    """The names of a profile's device (CUDA) events that do work, in launch order: not
    the GPU-side copies of annotated ranges (``Optimizer.step#...``), which torch's own
    tables leave out too."""
    from torch.autograd import DeviceType

    def work(e) -> bool:
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            return False
        return "annotation" not in str(getattr(e, "activity_type", "") or "").lower()

    found = [e for e in events if work(e)]
    return [e.name for e in sorted(found, key=lambda e: e.time_range.start)]


def cpu_op_stand_in(events) -> list[str]:
    """The aten ops of a CPU profile that the census's dispatch mode would see: the
    outermost ops that have a kernel of their own (a composite op such as ``matmul`` is
    looked into; what an op's kernel calls, a ``fill_`` inside ``sum``, is not), views and
    the ops that launch nothing left out."""
    from torch.autograd import DeviceType

    from bench import census

    names: list[str] = []

    def visit(e) -> None:
        if e.name.startswith("aten::") and not _composite(e.name):
            base = e.name.removeprefix("aten::")
            if not _is_view(base) and census.classify_name(base) not in (None, "sync"):
                names.append(e.name)
            return
        for child in sorted(e.cpu_children, key=lambda c: c.time_range.start):
            visit(child)

    tops = [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    for e in sorted(tops, key=lambda e: e.time_range.start):
        visit(e)
    return names


def _composite(op: str) -> bool:
    """Whether an aten op (``aten::matmul``) is implemented by other aten ops for
    autograd (CompositeImplicitAutograd): the census sees those ops, not it."""
    import torch

    with contextlib.suppress(Exception):
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeImplicitAutograd")
    return False


def _is_view(op: str) -> bool:
    """Whether an aten op of this name is a view (in any overload)."""
    import torch

    with contextlib.suppress(Exception):
        packet = getattr(torch.ops.aten, op)
        return any(getattr(packet, o).is_view for o in packet.overloads())
    return False


def _model(config: str, dims: dict):
    import torch

    from rwmn import RWMN, RWMNConfig

    torch.manual_seed(0)
    return RWMN(RWMNConfig(data_source=config, **dims))


def training_step(model, precision: str, device: str, n: int, batch: int) -> Callable[[], None]:
    """bench.census's step (``count_step``) of ``model`` on ``device``: gradients set to None,
    forward under autocast (bf16) or not, the loss, backward, Adagrad."""
    import torch

    from bench import census
    from bench.e2e import make_batch
    from rwmn.loop import backward, make_adagrad

    kind = torch.device(device).type
    opt, _ = make_adagrad(
        model.parameters(),
        torch.device(device),
        lr=census.LR,
        initial_accumulator_value=census.INITIAL_ACCUMULATOR,
    )
    story, query, answers, targets = make_batch(model.cfg, n, batch, device)
    amp = torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp:
            logits = model(story, query, answers)
        loss = model.loss(logits, targets)
        backward(loss)
        opt.step()

    return step


def profile_step(
    cfg: CensusConfig, config: str, precision: str, backend: str, device: str, dims: dict
) -> tuple[list[str], str]:
    """The kernel list of one steady-state step (after ``cfg.warmup_steps`` untimed ones)
    and its source (SOURCE_CUDA, or SOURCE_CPU_OPS without CUDA)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from rwmn import ops

    cuda = torch.device(device).type == "cuda"
    model = _model(config, dims).to(device)
    step = training_step(model, precision, device, cfg.n, cfg.batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with ops.use_backend("triton" if backend == "fused" else "reference"):
        for _ in range(cfg.warmup_steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
    events = prof.events()
    if not cuda:
        return cpu_op_stand_in(events), SOURCE_CPU_OPS
    names = device_kernels(events)
    if not names:
        raise RuntimeError("the profiler recorded no CUDA kernel (CUPTI not available?)")
    return names, SOURCE_CUDA


def census_row(
    cfg: CensusConfig, config: str, precision: str, backend: str, device: str, dims: dict,
    smoke: bool,
) -> dict:  # fmt: skip
    """One configuration: bench.census's CPU count, the profiled step's kernel list, and
    their comparison (a row of the session's ``census`` list). Raises
    ``bench.harness.Skip`` where the backend cannot run here."""
    import torch

    from bench import census, e2e

    e2e._check_runnable(backend, precision, torch.device(device).type, smoke)
    step_cfg = census.StepConfig(config, cfg.n, cfg.batch, precision, backend)
    counted = census.count_step(step_cfg, model=_model(config, dims) if dims else None)
    cpu_by_kind = {k: v["launches"] for k, v in counted.by("kind").items()}
    triton_names = {x.name for x in counted.launches if x.kind == "triton"}
    names, source = profile_step(cfg, config, precision, backend, device, dims)
    row = compare(cpu_by_kind, names, triton_names, cfg.tolerance)
    if source != SOURCE_CUDA:
        row["within_tolerance"] = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "status": "ok", "reason": None, "source": source, "cpu_syncs": len(counted.syncs),
        **row,
    }  # fmt: skip
