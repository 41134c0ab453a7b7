"""pytest-benchmark suite of the ops: case x dtype x backend x pass (see bench/conftest.py).

    pytest bench/test_bench_ops.py --benchmark-only --benchmark-json bench/results/pb.json

pytest-benchmark times wall clock around ``fn(); torch.cuda.synchronize()`` on CUDA, so its
figures include the launch and the synchronisation; ``extra_info`` adds the device time of
the CUDA-event timer (bench/timing.py, the figure the standalone runner reports), peak
memory, FLOPs, bytes and the roofline fractions of the session's measured ceilings.

May import: bench.cases, bench.harness and bench.timing.
"""

from __future__ import annotations

import pytest
import torch

from bench import cases as C
from bench import harness, timing

#: pytest-benchmark rounds and untimed warm-up rounds per case.
ROUNDS, WARMUP_ROUNDS = 20, 3


def test_op(benchmark, op_case, device, compiled_ops, ceilings, run_environment):
    case, dtype, backend, pass_ = op_case
    try:
        prepared = harness.prepare(case, backend, pass_, dtype, device, compiled_ops)
    except harness.Skip as exc:
        pytest.skip(str(exc))
    on_cuda = device == "cuda"

    def timed():
        prepared.fn()
        if on_cuda:
            torch.cuda.synchronize()

    def setup():
        prepared.setup()
        return (), {}

    benchmark.group = f"{case.id} {pass_} {dtype}"
    info = benchmark.extra_info
    info.update({k: run_environment[k] for k in ("label", "device_name", "git_commit", "date")})
    info.update(
        shapes=case.shapes(),
        flops=C.flops(case, pass_),
        bytes=C.bytes_moved(case, pass_, C.DTYPES[dtype]),
    )
    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    device_time = timing.time_fn(device, prepared.fn, prepared.setup)
    info.update({f"timer_{k}": v for k, v in device_time.as_row().items()})
    info["peak_mem_bytes"], _ = timing.peak_memory(device, prepared.fn, prepared.setup)
    info.update(
        timing.roofline(info["flops"], info["bytes"], device_time.median_ms, ceilings, dtype)
    )
