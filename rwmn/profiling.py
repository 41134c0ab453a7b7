"""NVTX ranges for Nsight Systems, through the ``nvtx`` package, in one domain: ``rwmn``.

Off by default. Switch them on with the environment variable ``RWMN_NVTX=1`` (read once at
import), ``train.py --nvtx`` or ``with rwmn.profiling.nvtx_enabled(): ...``. Every range
has a category (:data:`CATEGORIES`): ``model`` (the forward's stages: embedding, write,
read/hop<i>, answer), ``train`` (the training loop's phases: data, step, validation,
checkpoint) and ``bench`` (the benchmark cases and op calls). Ranges are host-side
annotations: they work with or without CUDA, and cost two cheap tests when off; when on and no
profiler is attached, the ``nvtx`` package hands out a domain whose calls do nothing
(bench/results/nvtx-cpu.md measures both). They are skipped while TorchDynamo traces (a
range push is a side effect a compiled graph cannot hold). Profile with::

    nsys profile -t cuda,nvtx -o rwmn python train.py --device cuda --max_steps 50 --nvtx

and in the report (``nsys stats -r nvtx_sum rwmn.nsys-rep``, or the GUI's NVTX row) the
ranges appear as ``rwmn`` domain ranges such as ``step``, ``read/hop0``.

``nvtx_range`` is a context manager and a decorator::

    with nvtx_range("write"): ...

    @nvtx_range("checkpoint", "train")
    def save(...): ...

May import: nvtx, torch.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator

import torch

try:
    import nvtx as _nvtx
except ImportError:  # the package is in install_requires; without it ranges are no-ops
    _nvtx = None

DOMAIN = "rwmn"
#: Range categories and their colours in the Nsight Systems timeline.
CATEGORIES = {"model": "blue", "train": "green", "bench": "orange"}


#: Whether ranges are pushed, per execution context: ``RWMN_NVTX`` (read at import) is the
#: default and :func:`nvtx_enabled` sets it for its block only. A thread sees its own
#: context (the default, unless it was started with a copy of another's).
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "rwmn_nvtx_enabled", default=os.environ.get("RWMN_NVTX", "0") == "1"
)


@functools.cache
def _domain():
    """The ``rwmn`` domain (the package's no-op domain when no profiler is attached)."""
    return None if _nvtx is None else _nvtx.get_domain(DOMAIN)


@functools.cache
def _attributes(name: str, category: str):
    """Event attributes of a range (message, colour, category), built once per name."""
    domain = _domain()
    if category not in CATEGORIES:
        raise ValueError(f"unknown NVTX category {category!r}; expected one of {CATEGORIES}")
    return domain.get_event_attributes(message=name, color=CATEGORIES[category], category=category)


def available() -> bool:
    """Whether the ``nvtx`` package is installed (ranges are no-ops without it)."""
    return _nvtx is not None


def is_enabled() -> bool:
    """Whether ranges are on here (``RWMN_NVTX=1``, or inside :func:`nvtx_enabled`)."""
    return _ENABLED.get()


@contextlib.contextmanager
def nvtx_enabled(enabled: bool = True) -> Iterator[None]:
    """Turn the NVTX ranges on (or off) inside the ``with`` block."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


class nvtx_range(contextlib.ContextDecorator):  # noqa: N801 (reads as a function)
    """An NVTX range ``name`` of ``category`` in the ``rwmn`` domain while ranges are on,
    not under TorchDynamo tracing; a context manager or a decorator."""

    def __init__(self, name: str, category: str = "model") -> None:
        self.name, self.category = name, category
        self._pushed = False

    def __enter__(self) -> nvtx_range:
        # Dynamo cannot trace ContextVar.get: ask whether it traces first.
        if not torch.compiler.is_compiling() and _ENABLED.get() and _nvtx is not None:
            _domain().push_range(_attributes(self.name, self.category))
            self._pushed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._pushed:
            self._pushed = False
            _domain().pop_range()

    def _recreate_cm(self) -> nvtx_range:
        # A decorated function may recurse or run on several threads: a range per call.
        return nvtx_range(self.name, self.category)


def annotate(name: str, category: str = "model") -> Callable[[Callable], Callable]:
    """``nvtx_range`` as a decorator (the same object; this name reads better on a def)."""
    return nvtx_range(name, category)
