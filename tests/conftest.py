"""Test-wide setup: the Triton interpreter on machines without CUDA, CUDA-marked skips."""

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
