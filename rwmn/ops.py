"""The one dispatch point between the reference ops and the fused Triton kernels.

Every hot operation of the model is called through this module. Which implementation runs
is chosen by the backend:

* ``"reference"``: plain PyTorch (``rwmn.reference``), any device.
* ``"triton"``: the fused kernels of the ``kernels`` package. They run on CUDA tensors, and
  on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``, for tests).
  Asking for them where they cannot run raises :class:`BackendUnavailableError`; there is
  no silent fallback.
* ``"auto"``: triton for CUDA tensors when Triton is installed, else reference.

The default comes from the environment variable ``RWMN_BACKEND`` (``"auto"`` when unset),
read once at import; an unknown value does not break the import but raises
:class:`BackendUnavailableError` naming the variable when the backend is first asked for
(:func:`get_backend`, an op call). :func:`use_backend` overrides it inside a ``with`` block::

    with rwmn.ops.use_backend("reference"):
        logits = model(story, query, answers)

The choice is held as an attribute of a module-level object rather than a ContextVar
because TorchDynamo guards on such attributes (a compiled model recompiles when the
backend changes) but cannot trace ContextVar reads. It is process-wide, not per thread.

May import: torch, kernels._common, kernels.reference, and the fused kernel modules
(kernels.*, by importlib where the backend needs them).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence

import torch

from kernels import reference
from kernels._common import recording as _recording_launches

BACKENDS = ("reference", "triton", "auto")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run the op on these tensors."""


def _check_backend(name: str, origin: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{origin}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


class _BackendState:
    def __init__(self) -> None:
        # Kept as given and validated on use: importing rwmn must not fail on a bad variable
        # (train.py reports it as one line naming RWMN_BACKEND).
        self.backend = os.environ.get("RWMN_BACKEND", "auto")


def _unknown_env_backend(name: str) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"RWMN_BACKEND={name!r}: unknown backend; expected one of {', '.join(BACKENDS)}"
    )


_STATE = _BackendState()


def get_backend() -> str:
    """The backend in force: the innermost :func:`use_backend`, else ``RWMN_BACKEND``."""
    if _STATE.backend not in BACKENDS:
        raise _unknown_env_backend(_STATE.backend)
    return _STATE.backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the ops inside the ``with`` block on backend ``name``."""
    _check_backend(name, "use_backend")
    if name != "reference":
        preload_kernels()
    previous = _STATE.backend
    _STATE.backend = name
    try:
        yield name
    finally:
        _STATE.backend = previous


# Looked up once: resolve_backend runs on every op call, inside compiled graphs too, where
# an import-system query would be both slow and untraceable.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the ``triton`` package is importable."""
    return _TRITON_AVAILABLE


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(op: str, *tensors: torch.Tensor) -> str:
    """The concrete backend ("reference" or "triton") that runs ``op`` on ``tensors``."""
    backend = _STATE.backend
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    if backend != "triton":
        raise _unknown_env_backend(backend)
    if not triton_available():
        raise BackendUnavailableError(
            f"rwmn.ops.{op}: backend 'triton' was requested but the triton package is not "
            "installed; install triton or use backend 'reference'"
        )
    if not on_cuda and not _interpreting() and not _recording_launches():
        devices = sorted({str(t.device) for t in tensors})
        raise BackendUnavailableError(
            f"rwmn.ops.{op}: backend 'triton' needs CUDA tensors (got {devices}); set "
            "TRITON_INTERPRET=1 to run the kernels on the CPU interpreter, or use backend "
            "'reference'"
        )
    return "triton"


def check_device(device: torch.device, backend: str | None = None) -> None:
    """Raise :class:`BackendUnavailableError` if ``backend`` (default: the one in force)
    could not run the ops on ``device``; a run checks this before it writes anything."""
    name = get_backend() if backend is None else _check_backend(backend, "check_device")
    origin = "--backend triton" if backend is not None else "backend 'triton' (RWMN_BACKEND)"
    if name != "triton":
        return
    if not triton_available():
        raise BackendUnavailableError(
            f"{origin}: the triton package is not installed; use backend reference or auto"
        )
    if device.type != "cuda" and not _interpreting():
        raise BackendUnavailableError(
            f"{origin} needs a CUDA device (this run's device is {device}); use backend "
            "reference or auto, or set TRITON_INTERPRET=1 for the (slow) CPU interpreter"
        )


KERNEL_MODULES = (
    "cbp", "memconv", "attention", "spectral_weights", "read_network", "unit_norm", "embedding",
    "cross_entropy",
)  # fmt: skip


def preload_kernels() -> None:
    """Import the fused kernel modules where they could run (CUDA or the interpreter).

    TorchDynamo cannot trace an import, so the modules are imported eagerly here (by
    :func:`use_backend` and by the model's constructor) and :func:`_fused` only looks them
    up; a compiled model then traces the fused ops without a graph break.
    """
    if triton_available() and (torch.cuda.is_available() or _interpreting()):
        for module in KERNEL_MODULES:
            importlib.import_module(f"kernels.{module}")


def _fused(module: str, name: str):
    try:
        loaded = sys.modules.get(f"kernels.{module}")
        if loaded is None:  # not preloaded: an eager call, where an import is fine
            loaded = importlib.import_module(f"kernels.{module}")
        return getattr(loaded, name)
    except (ImportError, AttributeError) as exc:
        raise BackendUnavailableError(
            f"rwmn.ops.{name}: no fused kernel kernels.{module}.{name} is available ({exc})"
        ) from exc


def _tensor_args(args, kwargs) -> list[torch.Tensor]:
    """The tensors among an op's arguments, those inside lists and tuples included."""
    found = []
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, torch.Tensor):
            found.append(arg)
        elif isinstance(arg, (list, tuple)):
            found.extend(t for t in arg if isinstance(t, torch.Tensor))
    return found


def _dispatched(module: str, name: str):
    """The op ``name``: ``kernels.<module>.<name>`` where the backend resolves to triton, else
    ``kernels.reference.<name>``; both take the reference's signature, whose name, signature
    and docstring the op carries."""
    ref = getattr(reference, name)

    @functools.wraps(ref)
    def op(*args, **kwargs):
        if resolve_backend(name, *_tensor_args(args, kwargs)) == "triton":
            return _fused(module, name)(*args, **kwargs)
        return ref(*args, **kwargs)

    op.kernel_module = module
    return op


#: Compact bilinear pooling (of the unit-normalised rows with ``normalize``).
cbp = _dispatched("cbp", "cbp")
#: One strided full-width SAME convolution + bias + ReLU.
memory_conv = _dispatched("memconv", "memory_conv")
#: The attention readout.
attention_read = _dispatched("attention", "attention_read")
#: The last read layer fused with the readout.
conv_attention_read = _dispatched("attention", "conv_attention_read")
#: x / sqrt(eps + sum(x^2)) along the last axis.
unit_norm = _dispatched("unit_norm", "unit_norm")
#: unit_norm(unit_norm(x) W^T + b) along the last axis.
embed = _dispatched("embedding", "embed")
#: Mean softmax cross-entropy over the (kept) questions.
cross_entropy = _dispatched("cross_entropy", "cross_entropy")
#: unit_norm(a unit_norm(o) + b u), the controller's update between hops.
hop_update = _dispatched("unit_norm", "hop_update")
#: The answers' scores against the last hop's update.
answer_scores = _dispatched("unit_norm", "answer_scores")
#: The paper's whole read network; ``prepared``: prepare_read of this memory (hops reuse it).
read_network = _dispatched("read_network", "read_network")


def prepare_read(
    memory: torch.Tensor,
    hashes: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
):
    """What every hop's :func:`read_network` over this memory shares, computed once: under
    the triton backend the memory's CBP spectra and the read layer's spectral weights
    (``kernels.read_network.prepare``); None where nothing is shared (the reference)."""
    if resolve_backend("read_network", memory, *weights) == "triton":
        return _fused("read_network", "prepare")(memory, hashes, weights, biases)
    return None
