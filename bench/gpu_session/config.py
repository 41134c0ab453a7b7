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
SECTIONS = ("tests", "checks", "census", "ops", "pipeline", "step")
#: The GPU run's budget: 7 minutes wall at most, less 30 s for Python's start-up and the
#: imports before the clock starts.
GPU_BUDGET_S = 390.0
#: Files a run leaves in its output folder at most: the JSON, the markdown and the plots
#: (one per op, one of the step); the subprocesses' logs go elsewhere (--logs).
MAX_RESULT_FILES = 8
#: Ceilings measured once per run: the timed dtypes' matmul rates, and TF32.
CEILING_DTYPES = ("fp32", "bf16")
#: Smoke model of the step, census and model-check sections: bench.e2e's smoke dimensions
#: with a shorter story and fewer questions, since every fused call runs on the interpreter.
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
    #: The GPU census runs after the checks, while the tests and warmers still do.
    census_by: float = 0.5
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
class ModeScope:
    """One training-step mode of the step section and the cases it runs: these configs,
    precisions and backends crossed (each empty: all of the section's)."""

    mode: str
    precisions: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    configs: tuple[str, ...] = ()
    #: Estimated seconds one case takes in the timed process on the H200, compile caches
    #: warm: an estimate to plan the budget by, not a measurement (see GPU_STEP_MODES).
    est_s: float = 0.0


#: The GPU run's step modes, in the order they run (a short run loses the last ones).
#: Estimated seconds per case (model build, warm-up steps, 0.5 s of timing, one step for
#: peak memory; estimates for planning, not measurements):
#:
#: ======================= ===== ===== ===================================================
#: mode                    cases s/case what
#: ======================= ===== ===== ===================================================
#: eager                   8     3     the reference and the fused step, fp32 and bf16
#: cuda-graphs             4     5     the fused step replayed from a CUDA graph (rwmn.graphs;
#:                                     one capture, no compile); CUDA only
#: max-autotune            2     25    the reference in bf16, torch.compile max-autotune:
#:                                     the baseline of the step target. Compiled cold it
#:                                     takes minutes; the warmers compile it first
#: compiled                8     15    torch.compile (default mode), warm caches
#: reduce-overhead         8     20    torch.compile with inductor's CUDA graphs
#: ======================= ===== ===== ===================================================
#:
#: About 24 + 20 + 50 + 120 + 160 s: more than the section's share of the budget (19% of
#: GPU_BUDGET_S, about 75 s, and what the sections before it leave over), so the order
#: decides what is cut: reduce-overhead and compiled first, their rows say so. The first
#: three modes, about 95 s, are the ones the session is for.
GPU_STEP_MODES = (
    ModeScope("eager", est_s=3.0),
    ModeScope("cuda-graphs", backends=("fused",), est_s=5.0),
    ModeScope("max-autotune", precisions=("bf16",), backends=("reference",), est_s=25.0),
    ModeScope("compiled", est_s=15.0),
    ModeScope("reduce-overhead", est_s=20.0),
)

#: The smoke run's step modes: every mode's code path once at least. cuda-graphs is
#: skipped off CUDA (its row says so); max-autotune runs as compiled (aot_eager), once
#: (sub: the cheaper model).
SMOKE_STEP_MODES = (
    ModeScope("eager"),
    ModeScope("cuda-graphs", backends=("fused",)),
    ModeScope("max-autotune", backends=("reference",), configs=("sub",)),
    ModeScope("compiled"),
    ModeScope("reduce-overhead"),
)


@dataclass(frozen=True)
class StepConfig:
    """The training-step section (bench.e2e)."""

    configs: tuple[str, ...] = ("video_sub", "sub")
    modes: tuple[ModeScope, ...] = GPU_STEP_MODES
    precisions: tuple[str, ...] = ("bf16", "fp32")
    backends: tuple[str, ...] = ("fused", "reference")
    n: int = 1500
    batch: int = 32
    dims: tuple[tuple[str, int | str], ...] = ()
    warmup_steps: int = 3
    measure_s: float = 0.5
    bounds: TimingBounds = TimingBounds()

    @property
    def mode_names(self) -> tuple[str, ...]:
        return tuple(m.mode for m in self.modes)

    def scope(self, mode: str) -> ModeScope:
        return next(m for m in self.modes if m.mode == mode)

    def cases(self) -> list[tuple[str, str, str, str]]:
        """(config, mode, precision, backend), cheapest and most wanted first: every case
        of the first mode (eager), then each other mode in turn (video_sub first: the
        step target)."""
        return [
            (config, scope.mode, precision, backend)
            for scope in self.modes
            for config in self.configs
            if config in (scope.configs or self.configs)
            for precision in self.precisions
            if precision in (scope.precisions or self.precisions)
            for backend in self.backends
            if backend in (scope.backends or self.backends)
        ]

    def est_s(self) -> float:
        """Estimated seconds of the whole section on the H200 (see GPU_STEP_MODES)."""
        return sum(self.scope(mode).est_s for _, mode, _, _ in self.cases())


#: The GPU census's configurations, in the order they run: the fused step first (the
#: count to agree with bench.census within CENSUS_TOLERANCE), video_sub first.
CENSUS_CASES = tuple(
    (config, precision, backend)
    for backend in ("fused", "reference")
    for precision in ("bf16", "fp32")
    for config in ("video_sub", "sub")
)
#: How far the profiled kernel count may be from bench.census's count (fused step).
CENSUS_TOLERANCE = 0.10


@dataclass(frozen=True)
class CensusConfig:
    """The GPU census section: one training step per configuration under torch.profiler,
    its device kernels against bench.census's CPU count of the same step.

    Estimated seconds per configuration on the H200 (estimates, not measurements): the
    CPU count 1 to 3 s for the fused step and 3 to 25 s for the reference (it runs the
    reference model on the CPU: 0.1 to 24 s measured on one core of the build machine,
    bf16 slowest), and on the GPU a fresh model, one warm-up and one profiled step,
    about 3 s. About 15 to 25 s for the four fused configurations, 40 to 130 s for all
    eight; it runs while the CUDA-marked tests and the compile warmers still do, up to
    the deadline ``Budget.census_by``, and what does not fit is skipped (the reference
    configurations, which run last)."""

    cases: tuple[tuple[str, str, str], ...] = CENSUS_CASES
    n: int = 1500
    batch: int = 32
    #: Untimed steps before the profiled one (the first step builds the optimizer state
    #: and compiles the Triton kernels not yet compiled).
    warmup_steps: int = 1
    tolerance: float = CENSUS_TOLERANCE


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
    census: CensusConfig
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
                modes=SMOKE_STEP_MODES,
                precisions=("fp32",),
                n=SMOKE_STEP_N,
                batch=SMOKE_STEP_BATCH,
                dims=tuple(e2e.SMOKE_DIMS.items()),
                warmup_steps=0,
                measure_s=0,
                bounds=TimingBounds(warmup_s=0, min_warmup=0, min_reps=1),
            ),
            # The fused step on the interpreter and the reference; CI makes the third fail.
            # No warm-up step: nothing is compiled, and an interpreted step takes seconds.
            census=CensusConfig(
                cases=(
                    ("sub", "fp32", "fused"),
                    ("sub", "fp32", "reference"),
                    ("video_sub", "fp32", "fused"),
                ),
                n=SMOKE_STEP_N,
                batch=SMOKE_STEP_BATCH,
                warmup_steps=0,
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
            budget=Budget(total_s=args.budget_s or GPU_BUDGET_S),
            groups=("sweep",) if sweep else ("model",),
            ops=C.OPS,
            check_dtypes=("fp32", "bf16", "fp16"),
            model_precisions=("fp32", "bf16"),
            time_dtypes=("bf16", "fp32"),
            backends=C.BACKENDS,
            passes=("forward+backward",) if sweep else C.PASSES,
            op_bounds=TimingBounds(),
            step=StepConfig(),
            census=CensusConfig(),
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
    p.add_argument("--logs", type=Path, default=None, help="the tests' and warmers' logs "
                   "(default: a new temporary directory, outside --out)")  # fmt: skip
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
