"""pytest-benchmark suite of the training step: config x mode x precision x backend.

    pytest bench/test_bench_e2e.py --benchmark-only            # model sizes (GPU)
    pytest bench/test_bench_e2e.py --benchmark-only --bench-e2e-smoke --bench-device cpu
    pytest bench/test_bench_e2e.py --benchmark-disable --bench-e2e-smoke   # a plain test, untimed

``extra_info`` holds questions/s (B / median step time).

May import: bench.e2e and bench.harness.
"""

from __future__ import annotations

import pytest
import torch

from bench import e2e
from bench.harness import Skip

#: pytest-benchmark rounds per case (warm-up steps happen in e2e.build_step).
ROUNDS = 10


@pytest.mark.parametrize("backend", e2e.BACKENDS)
@pytest.mark.parametrize("precision", e2e.PRECISIONS)
@pytest.mark.parametrize("mode", e2e.MODES)
@pytest.mark.parametrize("config", e2e.CONFIGS)
def test_training_step(benchmark, request, device, config, mode, precision, backend):
    smoke = request.config.getoption("--bench-e2e-smoke")
    n, batch = (e2e.SMOKE_N, e2e.SMOKE_BATCH) if smoke else (e2e.N_STORY, e2e.BATCH)
    try:
        step = e2e.build_step(config, mode, precision, backend, device, n, batch, smoke)
    except Skip as exc:
        pytest.skip(str(exc))
    on_cuda = device == "cuda"

    def timed():
        step()
        if on_cuda:
            torch.cuda.synchronize()

    benchmark.group = f"e2e {config} n={n} B={batch}"
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(n=n, batch=batch)
    # None under --benchmark-disable: the step ran once, as a plain test, and was not timed.
    if benchmark.stats is not None:
        benchmark.extra_info["questions_per_s"] = batch / benchmark.stats.stats.median
