"""Options of the pytest-benchmark suites (``pytest bench/ --benchmark-only``).

--bench-device  cuda | cpu            (default: cuda if available, else cpu)
--bench-sizes   model,sweep,smoke     (default: model on CUDA, smoke on CPU)
--bench-dtypes  fp32,bf16,fp16        (default: all on CUDA, fp32 on CPU)
--bench-backends reference,fused,compiled
--bench-passes  forward,backward,forward+backward
--bench-e2e-smoke                     (tiny model for the training-step suite)

May import: bench.cases, bench.harness and bench.timing.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench import cases as C


def pytest_addoption(parser):
    group = parser.getgroup("rwmn-bench")
    group.addoption("--bench-device", default=None)
    group.addoption("--bench-sizes", default=None)
    group.addoption("--bench-dtypes", default=None)
    group.addoption("--bench-backends", default=",".join(C.BACKENDS))
    group.addoption("--bench-passes", default=",".join(C.PASSES))
    group.addoption("--bench-e2e-smoke", action="store_true")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def bench_device(config) -> str:
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    if bench_device(config) == "cpu" and "smoke" in (config.getoption("--bench-sizes") or "smoke"):
        # The fused ops run on the Triton interpreter on CPU at the smoke sizes.
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_generate_tests(metafunc):
    config = metafunc.config
    on_cuda = bench_device(config) == "cuda"
    if "op_case" in metafunc.fixturenames:
        sizes = _split(config.getoption("--bench-sizes") or ("model" if on_cuda else "smoke"))
        dtypes = _split(
            config.getoption("--bench-dtypes") or ("fp32,bf16,fp16" if on_cuda else "fp32")
        )
        params, ids = [], []
        # Case, dtype, backend, pass, outermost first: the compiled backend compiles once
        # per (case, dtype) and its three passes reuse the compilation.
        for case in C.cases(sizes):
            for dtype in dtypes:
                for backend in _split(config.getoption("--bench-backends")):
                    for pass_ in _split(config.getoption("--bench-passes")):
                        params.append((case, dtype, backend, pass_))
                        ids.append(f"{case.id}-{dtype}-{backend}-{pass_}")
        metafunc.parametrize("op_case", params, ids=ids)


@pytest.fixture(scope="session")
def device(request) -> str:
    return bench_device(request.config)


@pytest.fixture(scope="session")
def compiled_ops():
    from bench.harness import CompiledOps

    return CompiledOps()


@pytest.fixture(scope="session")
def ceilings(device):
    from bench import timing

    return timing.measure_ceilings(device, C.DTYPES)


@pytest.fixture(scope="session")
def run_environment(device) -> dict:
    from bench import timing

    return timing.environment(device)
