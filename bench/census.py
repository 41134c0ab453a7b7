"""Launch and work census of one training step: every kernel launch, what it executes.

    python -m bench census                          # sub and video_sub, n 1500, B 32
    python -m bench census --configs video_sub --precisions bf16 --backends fused
    python -m bench census --out bench/results      # writes census-cpu.{md,json}

One step is what ``train.py`` does for one batch (bench.e2e's step): gradients set to
None, forward under autocast (bf16) or not (fp32), ``model.loss``, backward, one fused
Adagrad step. It runs on the CPU in seconds with the fused kernels' launches *recorded*
(kernels._common.record_launches: arguments and configuration kept, nothing run) and every
other op run by PyTorch and seen by a dispatch mode below autograd. Each launch gets

* its stage: the model's NVTX stage (``embedding``, ``write``, ``read/prepare``,
  ``read/hop0``, ``answer``), ``loss`` and ``optimizer``; in the backward, the stage of the
  forward op whose autograd node runs it (``write/backward``, ...), and
  ``accumulate-grad`` for the gradient accumulation of the leaves;
* its kind: ``triton`` (a fused kernel), ``gemm`` (cuBLAS), ``fft`` (cuFFT),
  ``elementwise``, ``copy`` (casts and copies), ``fill``, ``reduction``, ``index``
  (sorts, searches, gathers and scatters), ``optimizer``;
* its work: multiply-adds and global-memory bytes, from ``kernels.work`` for the fused
  kernels (tiles and padding included) and for the others from torch's FLOP formulas
  (``torch.utils.flop_counter``) and the sizes of the tensors they read and write.

A host synchronisation (a value read back to the host: ``.item()``, ``int(t)``,
``.tolist()``, data-dependent output shapes) is listed separately. Views, allocations and
the custom ops' own dispatch are not launches.

On a GPU (``bench.gpu_session``) the same step runs under ``torch.profiler`` and the
kernel list it records is compared with this count. The CPU census counts one launch per
aten op; a few ops launch more than one kernel on a GPU (a sort, a large reduction),
which is what that comparison shows.

May import: bench.e2e and bench.timing, rwmn and kernels (their launch recorder and cost
model).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from bench import cli

CONFIGS = ("sub", "video_sub")
PRECISIONS = ("fp32", "bf16")
BACKENDS = ("reference", "fused")
N_STORY, BATCH = 1500, 32
LR, INITIAL_ACCUMULATOR = 0.003, 0.1
KINDS = (
    "triton", "gemm", "fft", "elementwise", "copy", "fill", "reduction", "index", "optimizer",
)  # fmt: skip

_GEMM = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "dot", "_scaled_mm"}
_COPY = {"_to_copy", "copy_", "clone", "_copy_from", "contiguous", "flip", "constant_pad_nd",
         "cat", "stack", "repeat", "roll"}  # fmt: skip
_FILL = {"fill_", "zero_", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like",
         "new_zeros", "new_ones", "new_full", "arange", "scalar_tensor", "fill"}  # fmt: skip
_REDUCTION = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "norm",
              "linalg_vector_norm", "_softmax", "_log_softmax", "_softmax_backward_data",
              "_log_softmax_backward_data", "nll_loss_forward", "nll_loss_backward", "cumsum",
              "logsumexp", "var", "std", "all", "any", "prod"}  # fmt: skip
_INDEX = {"sort", "searchsorted", "index_add", "index_add_", "index_select", "gather",
          "scatter", "scatter_add", "scatter_add_", "index", "index_put", "index_put_",
          "embedding", "embedding_dense_backward", "bincount", "unique"}  # fmt: skip
_SYNC = {"_local_scalar_dense", "item", "nonzero", "masked_select", "equal", "is_nonzero",
         }  # fmt: skip
#: Ops that launch nothing: allocations and metadata.
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
         "lift_fresh", "lift_fresh_copy", "_record_function_enter_new",
         "_record_function_exit", "set_", "resize_", "_has_compatible_shallow_copy_type",
         "is_same_size", "_unsafe_view", "sym_size", "sym_stride", "sym_numel",
         "promote_types"}  # fmt: skip


@dataclass(frozen=True)
class StepConfig:
    """The step a census counts."""

    data_source: str = "video_sub"
    n: int = N_STORY
    batch: int = BATCH
    precision: str = "bf16"
    backend: str = "fused"

    @property
    def name(self) -> str:
        return f"{self.data_source}-{self.precision}-{self.backend}"


@dataclass(frozen=True)
class Launch:
    """One kernel launch of the step."""

    stage: str
    kind: str
    name: str
    macs: int
    bytes: int
    #: Programs (CTAs) of a Triton launch; 0 where not known (library kernels).
    programs: int = 0


@dataclass
class Census:
    """Every launch and host synchronisation of one step."""

    config: StepConfig
    launches: list[Launch] = field(default_factory=list)
    syncs: list[tuple[str, str]] = field(default_factory=list)

    def count(self, **where) -> int:
        return sum(1 for x in self.launches if all(getattr(x, k) == v for k, v in where.items()))

    def by(self, key: str) -> dict[str, dict[str, int]]:
        """Launches, multiply-adds and bytes per value of ``key`` (stage, kind, name)."""
        out: dict[str, dict[str, int]] = {}
        for x in self.launches:
            row = out.setdefault(getattr(x, key), {"launches": 0, "macs": 0, "bytes": 0})
            row["launches"] += 1
            row["macs"] += x.macs
            row["bytes"] += x.bytes
        return out

    @property
    def totals(self) -> dict[str, int]:
        return {
            "launches": len(self.launches),
            "triton": self.count(kind="triton"),
            "macs": sum(x.macs for x in self.launches),
            "bytes": sum(x.bytes for x in self.launches),
            "syncs": len(self.syncs),
        }

    def to_json(self) -> dict:
        return {
            "config": asdict(self.config),
            "totals": self.totals,
            "by_stage": self.by("stage"),
            "by_kind": self.by("kind"),
            "launches": [asdict(x) for x in self.launches],
            "syncs": [list(s) for s in self.syncs],
        }


def _base(func) -> str:
    return func._schema.name.split("::")[-1]


def classify(func) -> str | None:
    """The kind of launch an aten op makes, "sync" for a host synchronisation, or None for
    an op that launches nothing (a view, an allocation)."""
    if func.is_view:
        return None
    return classify_name(_base(func))


def classify_name(name: str) -> str | None:
    """:func:`classify` by the op's base name alone (``mm``, ``_fused_adagrad_``), for
    op lists without the ops themselves (a profiler's); views only by their usual names."""
    if name in _SYNC:
        return "sync"
    if name in _FREE or name in ("detach", "alias", "view", "t"):
        return None
    if name == "sum_to_size":  # a reduction only where it sums (else a view)
        return "reduction"
    if name.startswith(("_foreach", "_fused_")):
        return "optimizer"
    if name.startswith("_fft"):
        return "fft"
    for kind, names in (("gemm", _GEMM), ("copy", _COPY), ("fill", _FILL),
                        ("reduction", _REDUCTION), ("index", _INDEX)):  # fmt: skip
        if name in names:
            return kind
    return "elementwise"


def _copied(args, out) -> bool:
    """Whether an op that may return its input (a view or ``to``) returned new storage."""
    return (
        isinstance(out, torch.Tensor)
        and bool(args)
        and isinstance(args[0], torch.Tensor)
        and out.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr()
    )


def _tensors(tree) -> list[torch.Tensor]:
    out = []
    for x in torch.utils._pytree.tree_leaves(tree):
        if isinstance(x, torch.Tensor):
            out.append(x)
    return out


def _op_bytes(args, kwargs, out) -> int:
    seen, total = set(), 0
    for t in _tensors((args, kwargs)):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen and t.numel() > 1:
            seen.add(key)
            total += t.numel() * t.element_size()
    for t in _tensors(out):
        total += t.numel() * t.element_size()
    return total


def _op_macs(func, args, kwargs, out) -> int:
    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0
    return int(formula(*args, **(kwargs or {}), out_val=out)) // 2


class _Stages:
    """The stage of the op running now: forward stages by name, and in the backward the
    stage whose forward created the autograd node that runs (by sequence number)."""

    def __init__(self) -> None:
        self.current = "step"
        self.ranges: list[tuple[int, int, str]] = []
        #: Called before the stage changes: the launches recorded so far belong to the
        #: stage being left (a kernel launched outside any custom op is seen no later).
        self.flush = lambda: None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.flush()
        previous, self.current = self.current, name
        lo = torch._C._autograd._get_sequence_nr()
        try:
            yield
        finally:
            self.flush()
            self.ranges.append((lo, torch._C._autograd._get_sequence_nr(), name))
            self.current = previous

    def now(self) -> str:
        node = torch._C._current_autograd_node()
        if node is None:
            return self.current
        seq = node._sequence_nr()
        for lo, hi, name in self.ranges:
            if lo <= seq < hi:
                return f"{name}/backward"
        return "accumulate-grad" if "AccumulateGrad" in node.name() else "backward"


class _CensusMode(TorchDispatchMode):
    """Sees every aten op below autograd, the bodies of the project's custom ops included;
    turns the fused kernels' recorded launches into Launch rows as they appear."""

    def __init__(self, census: Census, stages: _Stages, recorded: list) -> None:
        super().__init__()
        self.census, self.stages, self.recorded = census, stages, recorded
        stages.flush = self._take_launches

    def _take_launches(self) -> None:
        from kernels.work import launch_work

        for launch in self.recorded:
            work = launch_work(launch)
            programs = math.prod(launch.config.grid)
            self.census.launches.append(
                Launch(self.stages.now(), "triton", launch.name, work.macs, work.bytes, programs)
            )
        # Priced: drop them, so that the record does not keep their tensors alive (a
        # gradient still referenced is copied, not taken, by autograd's accumulation: a
        # launch the step would not make).
        self.recorded.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._take_launches()  # launched before this op, outside any custom op
        qualified = func._schema.name
        if qualified in OPDEFS:
            # A custom op of this project: count what its body launches.
            with self:
                out = OPDEFS[qualified]._init_fn(*args, **kwargs)
            self._take_launches()
            return out
        out = func(*args, **kwargs)
        kind = classify(func)
        if kind is None and _base(func) not in _FREE and _copied(args, out):
            kind = "copy"  # an aliasing op that had to copy (``to`` a dtype, ``reshape``)
        if kind == "sync":
            self.census.syncs.append((self.stages.now(), _base(func)))
        elif kind is not None:
            self.census.launches.append(
                Launch(
                    self.stages.now(),
                    kind,
                    _base(func),
                    _op_macs(func, args, kwargs, out),
                    _op_bytes(args, kwargs, out),
                )
            )
        return out


def _model(cfg: StepConfig):
    from rwmn import RWMN, RWMNConfig

    torch.manual_seed(0)
    return RWMN(RWMNConfig(data_source=cfg.data_source))


def count_step(cfg: StepConfig, model=None) -> Census:
    """The census of one training step of ``cfg`` (a fresh model with seed 0 unless
    ``model`` is given), on the CPU with the fused kernels' launches recorded."""
    import rwmn.model
    from bench.e2e import make_batch
    from kernels._common import record_launches
    from rwmn import ops
    from rwmn.loop import backward, make_adagrad

    if cfg.precision not in PRECISIONS or cfg.backend not in BACKENDS:
        raise ValueError(f"census: unknown precision or backend in {cfg}")
    model = _model(cfg) if model is None else model
    opt, _ = make_adagrad(
        model.parameters(),
        torch.device("cpu"),
        lr=LR,
        initial_accumulator_value=INITIAL_ACCUMULATOR,
    )
    story, query, answers, targets = make_batch(model.cfg, cfg.n, cfg.batch, "cpu")
    census, stages = Census(cfg), _Stages()
    backend = "triton" if cfg.backend == "fused" else "reference"
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp:
            logits = model(story, query, answers)
        with stages.stage("loss"):
            loss = model.loss(logits, targets)
        backward(loss)
        with stages.stage("optimizer"):
            opt.step()

    # The census counts a step in steady state: what the first step builds once (the
    # optimizer's state, tables cached per buffer) is not part of it.
    with ops.use_backend(backend), record_launches():
        step()
    with (
        ops.use_backend(backend),
        record_launches() as recorded,
        _patch_stage_ranges(rwmn.model, stages),
        _CensusMode(census, stages, recorded),
    ):
        step()
    return census


@contextlib.contextmanager
def _patch_stage_ranges(module, stages: _Stages) -> Iterator[None]:
    """Route the model's NVTX stage ranges through ``stages`` for the block."""
    original = module.nvtx_range

    @contextlib.contextmanager
    def both(name: str):
        with original(name), stages.stage(name):
            yield

    module.nvtx_range = both
    try:
        yield
    finally:
        module.nvtx_range = original


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _g(x: int) -> str:
    return f"{x / 1e9:.3f}"


def _mb(x: int) -> str:
    return f"{x / 1e6:.1f}"


def markdown(censuses: list[Census], meta: dict) -> str:
    lines = [
        "# Launch and work census of one training step (CPU count)",
        "",
        f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, commit "
        f"{meta['commit']}. `python -m bench census`: fused launches recorded, the rest run "
        "on the CPU and counted one launch per aten op (see bench/census.py). "
        "GFLOP = 2 x multiply-adds executed (tile padding included); MB = global-memory "
        "bytes moved by the launches' loads and stores.",
        "",
        "| step | launches | of which Triton | host syncs | GFLOP | MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in censuses:
        t = c.totals
        lines.append(
            f"| {c.config.name} | {t['launches']} | {t['triton']} | {t['syncs']} | "
            f"{_g(2 * t['macs'])} | {_mb(t['bytes'])} |"
        )
    for c in censuses:
        lines += ["", f"## {c.config.name}", "", "| kind | launches | GFLOP | MB |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for kind, row in sorted(c.by("kind").items(), key=lambda kv: -kv[1]["launches"]):
            lines.append(f"| {kind} | {row['launches']} | {_g(2 * row['macs'])} | "
                         f"{_mb(row['bytes'])} |")  # fmt: skip
        lines += ["", "| stage | launches | GFLOP | MB |", "|---|---:|---:|---:|"]
        for stage, row in c.by("stage").items():
            lines.append(f"| {stage} | {row['launches']} | {_g(2 * row['macs'])} | "
                         f"{_mb(row['bytes'])} |")  # fmt: skip
        if c.config.backend == "fused":
            lines += ["", "| Triton kernel | programs | GFLOP | MB |", "|---|---:|---:|---:|"]
            for x in c.launches:
                if x.kind == "triton":
                    lines.append(f"| {x.stage}: `{x.name}` | {x.programs} | {_g(2 * x.macs)} | "
                                 f"{_mb(x.bytes)} |")  # fmt: skip
        if c.syncs:
            counts = collections.Counter(f"{s}: {op}" for s, op in c.syncs)
            lines += ["", "Host synchronisations: " + ", ".join(
                f"{k} x{v}" for k, v in counts.items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def _meta() -> dict:
    import triton

    from bench.timing import git_head_from_files

    return {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": (git_head_from_files() or "unknown")[:12],
        "device": "cpu",
    }


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("census", __doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--n", type=int, default=N_STORY)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--out", default=None, help="folder for census-cpu.{md,json}")
    args = parser.parse_args(argv)
    censuses = []
    for source in args.configs.split(","):
        for precision in args.precisions.split(","):
            for backend in args.backends.split(","):
                cfg = StepConfig(source, args.n, args.batch, precision, backend)
                try:
                    censuses.append(count_step(cfg))
                except ValueError as exc:
                    print(f"census: {exc}", file=sys.stderr)
                    return 2
    meta = _meta()
    text = markdown(censuses, meta)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "census-cpu.md").write_text(text)
        payload = {"meta": meta, "steps": [c.to_json() for c in censuses]}
        (out / "census-cpu.json").write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
