"""NVTX ranges around the model's stages and the kernels, for Nsight Systems.

Off by default. Switch them on with the environment variable ``RWMN_NVTX=1`` (read once at
import), ``train.py --nvtx`` or ``with rwmn.profiling.nvtx_enabled(): ...``. They are a
no-op without CUDA and while TorchDynamo traces (a range push is a side effect a compiled
graph cannot hold). Profile with, for example::

    RWMN_NVTX=1 nsys profile -t cuda,nvtx -o rwmn python train.py --device cuda --max_steps 50
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


class _NvtxState:
    def __init__(self) -> None:
        self.enabled = os.environ.get("RWMN_NVTX", "0") == "1"


_STATE = _NvtxState()


@contextlib.contextmanager
def nvtx_enabled(enabled: bool = True) -> Iterator[None]:
    """Turn the NVTX ranges on (or off) inside the ``with`` block."""
    previous = _STATE.enabled
    _STATE.enabled = enabled
    try:
        yield
    finally:
        _STATE.enabled = previous


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range named ``rwmn/<name>`` when ranges are on and CUDA is present."""
    active = _STATE.enabled and not torch.compiler.is_compiling() and torch.cuda.is_available()
    if active:
        torch.cuda.nvtx.range_push(f"rwmn/{name}")
    try:
        yield
    finally:
        if active:
            torch.cuda.nvtx.range_pop()
