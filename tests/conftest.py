"""Test-wide setup: the Triton interpreter on machines without CUDA, CUDA-marked skips, and
a GPU's semantics for every test of a kernel module (test_kernels_*)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: @triton.jit reads it at decoration time.
    # Only without CUDA: on a GPU the kernels must run compiled, not interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gpu_semantics():
    """The Triton interpreter with a GPU's semantics (tests/gpu_semantics.py): bf16 values,
    tf32 truncation, NaN in masked lanes, barrier epochs, and every buffer allocated inside
    the test NaN-poisoned, so an element a kernel forgets to write fails the comparison.
    Skips where this Triton's interpreter lacks an internal the emulation needs."""
    import tests.gpu_semantics as semantics

    context = semantics.gpu_semantics()
    try:
        state = context.__enter__()
    except semantics.Unsupported as e:
        pytest.skip(str(e))
    try:
        yield state
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _kernel_modules_run_with_gpu_semantics(request):
    """Every test of a kernel module (test_kernels_*.py) runs with gpu_semantics."""
    if request.node.path.name.startswith("test_kernels_"):
        request.getfixturevalue("gpu_semantics")
