"""How the benchmarks measure: timers, peak memory, the run's ceilings and its metadata.

CUDA: every repetition is timed with its own pair of CUDA events, after warm-up calls that
are not timed, with the L2 cache flushed (a 256 MiB buffer zeroed) before each
repetition, as ``triton.testing.do_bench`` does. A ``setup`` callable (clearing
gradients, for instance) runs outside the timed region.

CPU: ``time.perf_counter`` around each call, after untimed warm-up calls. CPU figures are
labelled "CPU" wherever they are written.

Both report the median, the 20th and 80th percentiles, the minimum and the number of
repetitions.

May import: torch and the standard library only (every measuring module imports this).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

#: Warm-up and measurement budgets (seconds of wall time) and repetition bounds.
WARMUP_S = 0.025
MEASURE_S = 0.1
MIN_WARMUP_CALLS = 3
MIN_REPS = 5
MAX_REPS = 1000
#: Size of the buffer zeroed before each CUDA repetition to flush L2 (H100: 50 MiB L2).
L2_FLUSH_BYTES = 256 * 1024**2
#: Quantiles reported as the spread.
LOW_Q, HIGH_Q = 0.2, 0.8

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int
    timer: str

    def as_row(self) -> dict:
        return asdict(self)


def _quantile(sorted_ms: list[float], q: float) -> float:
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    return statistics.quantiles(sorted_ms, n=100, method="inclusive")[round(q * 100) - 1]


def _summarise(ms: list[float], timer: str) -> Timing:
    ms = sorted(ms)
    return Timing(
        median_ms=statistics.median(ms),
        p20_ms=_quantile(ms, LOW_Q),
        p80_ms=_quantile(ms, HIGH_Q),
        min_ms=ms[0],
        reps=len(ms),
        timer=timer,
    )


def _noop() -> None:
    return None


def _rep_count(estimate_s: float, budget_s: float, min_reps: int = MIN_REPS) -> int:
    return int(min(MAX_REPS, max(min_reps, budget_s / max(estimate_s, 1e-9))))


def time_cpu(
    fn: Callable[[], object],
    setup: Callable[[], object] = _noop,
    warmup_s: float = WARMUP_S,
    measure_s: float = MEASURE_S,
    min_warmup: int = MIN_WARMUP_CALLS,
    min_reps: int = MIN_REPS,
) -> Timing:
    """Median (p20, p80) wall time of ``fn`` on the CPU, warm-up excluded."""
    calls, start = 0, time.perf_counter()
    while calls < min_warmup or time.perf_counter() - start < warmup_s:
        setup()
        fn()
        calls += 1
    # No warm-up call (min_warmup=0, the caller has warmed up): no estimate, fewest reps.
    estimate_s = (time.perf_counter() - start) / calls if calls else float("inf")
    reps = _rep_count(estimate_s, measure_s, min_reps)
    ms = []
    for _ in range(reps):
        setup()
        t0 = time.perf_counter()
        fn()
        ms.append(1e3 * (time.perf_counter() - t0))
    return _summarise(ms, "cpu perf_counter")


def time_cuda(
    fn: Callable[[], object],
    setup: Callable[[], object] = _noop,
    warmup_s: float = WARMUP_S,
    measure_s: float = MEASURE_S,
    min_warmup: int = MIN_WARMUP_CALLS,
    min_reps: int = MIN_REPS,
) -> Timing:
    """Median (p20, p80) device time of ``fn`` with CUDA events, warm-up excluded."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    # Estimate one call's time to size the warm-up and the measurement.
    setup()
    fn()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(min_warmup):
        setup()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_s = begin.elapsed_time(end) / 1e3 / min_warmup if min_warmup else float("inf")
    for _ in range(_rep_count(estimate_s, warmup_s, 0)):
        setup()
        fn()
    reps = _rep_count(estimate_s, measure_s, min_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        setup()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    return _summarise(ms, "cuda events, L2 flushed")


def time_fn(device: str, fn, setup=_noop, **budget) -> Timing:
    timer = time_cuda if torch.device(device).type == "cuda" else time_cpu
    return timer(fn, setup, **budget)


def peak_memory(device: str, fn, setup=_noop) -> tuple[int | None, int | None]:
    """(peak bytes allocated during one call, peak minus what was allocated before it).

    CUDA only (``torch.cuda.max_memory_allocated`` after a reset); (None, None) on CPU."""
    if torch.device(device).type != "cuda":
        return None, None
    setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak, peak - before


# --------------------------------------------------------------------------------------
# The run's own ceilings, for the roofline columns
# --------------------------------------------------------------------------------------

#: Sizes of the ceiling measurements: a device-to-device copy and a square matmul.
COPY_BYTES = {"cuda": 1024**3, "cpu": 64 * 1024**2}
MATMUL_N = {"cuda": 8192, "cpu": 512}


def _time_copy(device: str, nbytes: int) -> Timing:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_fn(device, lambda: dst.copy_(src))


#: Name of the fp32-input matmul ceiling run on the tensor cores (TF32 products).
TF32 = "tf32"


@contextlib.contextmanager
def fp32_matmul_precision(precision: str):
    """torch's fp32 matmul precision inside the block ("high" allows TF32), restored after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _time_matmul(device: str, n: int, dtype: torch.dtype) -> float:
    # Random operands: zeros can run faster than real data on some cards.
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_fn(device, lambda: a @ b)
    return 2 * n**3 / (t.median_ms / 1e3)


def measure_ceilings(device: str, dtypes: dict[str, torch.dtype], tf32: bool = False) -> dict:
    """Copy bandwidth (bytes/s, read + write counted) and matmul FLOP/s per dtype, measured
    now on ``device`` with the same timer as the cases. ``fp32`` is measured at torch's
    matmul precision in force (recorded); ``tf32=True`` adds a ``tf32`` entry, fp32
    operands with TF32 products allowed (the tensor cores' fp32-input rate)."""
    kind = torch.device(device).type
    copy = _time_copy(device, COPY_BYTES[kind])
    n = MATMUL_N[kind]
    matmul = {name: _time_matmul(device, n, dtype) for name, dtype in dtypes.items()}
    if tf32:
        with fp32_matmul_precision("high"):
            matmul[TF32] = _time_matmul(device, n, torch.float32)
    return {
        "copy_bytes": COPY_BYTES[kind],
        "copy_bandwidth_Bps": 2 * COPY_BYTES[kind] / (copy.median_ms / 1e3),
        "matmul_n": n,
        "matmul_flops_per_s": matmul,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def roofline(flops: float, nbytes: float, median_ms: float, ceilings: dict, dtype: str) -> dict:
    """Achieved rates, their fractions of the run's ceilings, and the roofline bound."""
    seconds = median_ms / 1e3
    bandwidth = ceilings["copy_bandwidth_Bps"]
    peak = ceilings["matmul_flops_per_s"].get(dtype)
    row = {
        "achieved_GBps": nbytes / seconds / 1e9,
        "achieved_TFLOPs": flops / seconds / 1e12,
        "bw_fraction": nbytes / seconds / bandwidth,
        "flop_fraction": None,
        "bound": None,
        "roofline_fraction": None,
    }
    if peak:
        row["flop_fraction"] = flops / seconds / peak
        memory_s, compute_s = nbytes / bandwidth, flops / peak
        row["bound"] = "memory" if memory_s >= compute_s else "compute"
        # How close the measured time is to the roofline's best time for this op.
        row["roofline_fraction"] = max(memory_s, compute_s) / seconds
    return row


# --------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _git_dir(repo: Path) -> Path | None:
    dot_git = repo / ".git"
    if dot_git.is_file():  # a worktree: "gitdir: <path>"
        text = dot_git.read_text().strip()
        return Path(text.removeprefix("gitdir:").strip()) if text.startswith("gitdir:") else None
    return dot_git if dot_git.is_dir() else None


def git_head_from_files(repo: Path = REPO) -> str | None:
    """HEAD's commit read from .git itself, for machines without the git program.

    Follows a symbolic HEAD to its loose ref or to packed-refs, in the worktree's own git
    directory and in the common one it points to. None when there is no .git at all (a
    copied tree): pass the commit explicitly then."""
    try:
        git_dir = _git_dir(repo)
        if git_dir is None:
            return None
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.removeprefix("ref:").strip()
        dirs = [git_dir]
        if (git_dir / "commondir").is_file():
            dirs.append((git_dir / (git_dir / "commondir").read_text().strip()).resolve())
        for d in dirs:
            if (d / ref).is_file():
                return (d / ref).read_text().strip()
            if (d / "packed-refs").is_file():
                for line in (d / "packed-refs").read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except OSError:
        return None
    return None


#: Source trees hashed into the run's ``source_digest``.
SOURCE_DIRS = ("bench", "kernels", "rwmn", "tests")


def source_digest(repo: Path = REPO) -> str:
    """sha256 (first 16 hex digits) over the paths and bytes of the Python sources.

    Provenance that survives a copy without .git: the same tree gives the same digest
    here and on the machine it was copied to."""
    h = hashlib.sha256()
    for top in SOURCE_DIRS:
        for path in sorted((repo / top).rglob("*.py")):
            h.update(str(path.relative_to(repo)).encode())
            h.update(b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi; None without the program or a driver."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def device_properties(device: str) -> dict | None:
    """Compute capability, multiprocessors, memory and L2 size of a CUDA device."""
    if torch.device(device).type != "cuda":
        return None
    p = torch.cuda.get_device_properties(torch.device(device))
    return {
        "capability": f"{p.major}.{p.minor}",
        "multiprocessors": p.multi_processor_count,
        "memory_bytes": p.total_memory,
        "l2_bytes": getattr(p, "L2_cache_size", None),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU: {_cpu_name()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"


def environment(device: str) -> dict:
    """Who measured what, where and when: written with every result file and row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    kind = torch.device(device).type
    return {
        "label": "GPU" if kind == "cuda" else "CPU",
        "device": kind,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD") or git_head_from_files(),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "source_digest": source_digest(),
        "driver": driver_version() if kind == "cuda" else None,
        "device_properties": device_properties(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "threads": torch.get_num_threads(),
        # Other processes on the machine skew CPU figures: the 1-minute load at the start.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
