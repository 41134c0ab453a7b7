"""The GPU session's configuration: the GPU and smoke presets, narrowed by the command line.

Plain data (frozen dataclasses) that the session, its subprocesses and its report all read;
it imports nothing of the session, so they can all import it. May import: bench.cases and
bench.e2e (lazily, for their constants).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import cli
from bench import gpu_session as package

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
PARTS = ("main", "sweep")
SECTIONS = ("tests", "checks", "ops", "pipeline", "step")
#: Ceilings measured once per run: the timed dtypes' matmul rates, and TF32.
CEILING_DTYPES = ("fp32", "bf16")
#: Smoke model of the step and model-check sections: bench.e2e's smoke dimensions with a
#: shorter story and fewer questions, since every fused call runs on the interpreter.
SMOKE_STEP_N, SMOKE_STEP_BATCH = 16, 2


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Wall-time budget of a run. Deadlines are fractions of ``total_s`` from the start;
    a section starts when the one before ends and stops at its deadline, so time one
    section leaves over goes to the next."""

    total_s: float
    checks_by: float = 0.45
    tests_by: float = 0.5
    warm_by: float = 0.5
    ops_by: float = 0.72
    pipeline_by: float = 0.76
    #: The step section ends here; the rest is for writing results and plots.
    step_by: float = 0.95
    #: Longest one case may run (a cold model compile and its warm-up steps included).
    case_s: float = 120.0
    #: A case with less than this left before its deadline is skipped, not started.
    min_case_s: float = 2.0

    def at(self, fraction: float) -> float:
        return self.total_s * fraction


@dataclass(frozen=True)
class TimingBounds:
    """bench.timing's per-case budgets; None keeps its default."""

    warmup_s: float | None = None
    measure_s: float | None = None
    min_warmup: int | None = None
    min_reps: int | None = None

    def kwargs(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class StepConfig:
    """The training-step section (bench.e2e)."""

    configs: tuple[str, ...] = ("video_sub", "sub")
    modes: tuple[str, ...] = ("eager", "compiled", "reduce-overhead")
    precisions: tuple[str, ...] = ("bf16", "fp32")
    backends: tuple[str, ...] = ("fused", "reference")
    n: int = 1500
    batch: int = 32
    dims: tuple[tuple[str, int | str], ...] = ()
    warmup_steps: int = 3
    measure_s: float = 0.5
    bounds: TimingBounds = TimingBounds()

    def cases(self) -> list[tuple[str, str, str, str]]:
        """(config, mode, precision, backend), cheapest and most wanted first: every eager
        case, then each compiled mode (video_sub first: the step target)."""
        return [
            (config, mode, precision, backend)
            for mode in self.modes
            for config in self.configs
            for precision in self.precisions
            for backend in self.backends
        ]


@dataclass(frozen=True)
class SessionConfig:
    """Everything a run does; :func:`build_config` makes the GPU and the smoke presets."""

    part: str
    smoke: bool
    device: str
    budget: Budget
    groups: tuple[str, ...]
    ops: tuple[str, ...]
    check_dtypes: tuple[str, ...]
    model_precisions: tuple[str, ...]
    time_dtypes: tuple[str, ...]
    backends: tuple[str, ...]
    passes: tuple[str, ...]
    op_bounds: TimingBounds
    step: StepConfig
    pipeline_sources: tuple[str, ...]
    pipeline_dims: tuple[tuple[str, int], ...]
    pipeline_movies: int
    pipeline_cold_reps: int
    pipeline_warm_s: float
    compile_backend: str
    warm_processes: int
    sections: tuple[str, ...]
    #: The warmers take the first this many compile jobs (None: all of them).
    warm_jobs: int | None = None
    threads: int | None = None
    inject_errors: tuple[str, ...] = ()
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(2**31))

    @property
    def label(self) -> str:
        return "CPU smoke" if self.smoke else "GPU"


def build_config(args: argparse.Namespace) -> SessionConfig:
    """The preset of --part and --smoke, narrowed by the command line."""
    from bench import cases as C
    from bench import e2e

    sweep = args.part == "sweep"
    if args.smoke:
        budget = Budget(total_s=args.budget_s or 240.0)
        cfg = SessionConfig(
            part=args.part,
            smoke=True,
            device="cpu",
            budget=budget,
            groups=("smoke",),
            ops=C.OPS,
            # The Triton interpreter has no bf16 or fp16.
            check_dtypes=("fp32",),
            model_precisions=("fp32",),
            time_dtypes=("fp32",),
            backends=C.BACKENDS,
            # The forward and backward passes alone are bench.run's (tests/test_bench_smoke).
            passes=("forward+backward",),
            op_bounds=TimingBounds(warmup_s=0, measure_s=0, min_warmup=0, min_reps=1),
            step=StepConfig(
                precisions=("fp32",),
                n=SMOKE_STEP_N,
                batch=SMOKE_STEP_BATCH,
                dims=tuple(e2e.SMOKE_DIMS.items()),
                warmup_steps=0,
                measure_s=0,
                bounds=TimingBounds(warmup_s=0, min_warmup=0, min_reps=1),
            ),
            pipeline_sources=("sub", "video_sub"),
            pipeline_dims=(("dim_text", 24), ("dim_rgb", 32), ("dim_sub", 24)),
            pipeline_movies=2,
            pipeline_cold_reps=2,
            pipeline_warm_s=0.02,
            # inductor's C++ compile of every case would take minutes on two cores;
            # aot_eager still traces (dynamo, AOTAutograd) what the GPU run compiles.
            compile_backend="aot_eager",
            # One warmer with one job: the path runs, and the two cores stay with the checks.
            warm_processes=1,
            warm_jobs=1,
            sections=("ops",) if sweep else SECTIONS,
            threads=1,
        )
    else:
        cfg = SessionConfig(
            part=args.part,
            smoke=False,
            device="cuda",
            budget=Budget(total_s=args.budget_s or 510.0),
            groups=("sweep",) if sweep else ("model",),
            ops=C.OPS,
            check_dtypes=("fp32", "bf16", "fp16"),
            model_precisions=("fp32", "bf16"),
            time_dtypes=("bf16", "fp32"),
            backends=C.BACKENDS,
            passes=("forward+backward",) if sweep else C.PASSES,
            op_bounds=TimingBounds(),
            step=StepConfig(),
            pipeline_sources=("sub", "video_sub"),
            pipeline_dims=(),
            pipeline_movies=8,
            pipeline_cold_reps=5,
            pipeline_warm_s=0.3,
            compile_backend="inductor",
            warm_processes=4,
            sections=("ops",) if sweep else SECTIONS,
        )
    if sweep:
        # No checks or tests run alongside: the warmers have the machine to themselves
        # first, then the op timing has the rest.
        cfg = replace(cfg, budget=replace(cfg.budget, warm_by=0.4, ops_by=0.95))
    if args.ops:
        cfg = replace(cfg, ops=tuple(args.ops))
    if args.sections:
        cfg = replace(cfg, sections=tuple(s for s in cfg.sections if s in args.sections))
    if args.warm_processes is not None:
        cfg = replace(cfg, warm_processes=args.warm_processes)
    if args.threads:
        cfg = replace(cfg, threads=args.threads)
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    return replace(cfg, inject_errors=tuple(args.inject_error or ()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("gpu_session", package.__doc__)
    p.add_argument("--part", choices=PARTS, default="main", help="main (default) or sweep")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton interpreter")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: "
                   "bench/results; --smoke: a new temporary directory)")  # fmt: skip
    p.add_argument("--ops", type=lambda v: v.split(","), default=None, help="ops, comma-separated")
    p.add_argument("--sections", type=lambda v: v.split(","), default=None,
                   help=f"sections to run, comma-separated, of {SECTIONS}")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=None, help="total time budget (s)")
    p.add_argument("--warm-processes", type=int, default=None, help="compile warmers (0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=None, help="check inputs' seed (default: fresh)")
    p.add_argument("--git-commit", default=None,
                   help="the commit this tree was copied from, where it has no .git")  # fmt: skip
    p.add_argument("--inject-error", action="append", metavar="PATTERN",
                   help="testing: matching case ids (fnmatch) raise InjectedError")  # fmt: skip
    p.add_argument("--warmer", default=None, help=argparse.SUPPRESS)  # internal: "k/n"
    p.add_argument("--warm-log", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from bench import cases as C

    bad = [o for o in args.ops or () if o not in C.OPS]
    bad += [s for s in args.sections or () if s not in SECTIONS]
    if bad:
        p.error(f"unknown ops or sections {bad}; ops: {C.OPS}, sections: {SECTIONS}")
    return args
