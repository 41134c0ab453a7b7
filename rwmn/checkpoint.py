"""Checkpoints: atomic writes, and reads that never run code from the file.

A checkpoint is a ``torch.save``d dict of tensors and plain Python values (numbers,
strings, lists, tuples, dicts, None). It is read with ``torch.load(weights_only=True)``
only: a file holding anything else (a pickled object whose ``__reduce__`` would run code
when unpickled) is refused with one line naming it, and nothing in it runs. The dict is
then checked key by key before any of it is used, so a truncated, foreign or hand-edited
file gives one line naming the file and the key, never a traceback.

May import: torch, rwmn.cli.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import warnings

import torch

from rwmn.cli import one_line

#: Format of the dict below; a reader refuses other formats.
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or from another configuration."""


def temp_path(path: str) -> str:
    """Where :func:`atomic_save` writes ``path`` before renaming it into place."""
    return f"{path}.tmp-{os.getpid()}"


def _fsync_dir(directory: str) -> None:
    # The rename is durable once the directory entry is; not every platform allows it.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, write) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, rename it onto
    ``path``: a reader (or a run killed meanwhile) sees the old file or the new, whole."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read(path: str, what: str = "checkpoint") -> dict:
    """Load ``path`` with ``weights_only=True`` and check it is an rwmn checkpoint holding
    a model configuration and a model state dict."""
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} is not a file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # not tensors and plain values, or not a pickle
        raise CheckpointError(
            f"{what} {path!r} cannot be loaded safely: it is not a file of tensors and plain "
            f"values ({_unpickling_reason(exc)}); nothing in it was run"
        ) from exc
    except Exception as exc:  # truncated, not a torch file, ...: say which file
        raise CheckpointError(f"{what} {path!r} cannot be read ({one_line(exc)})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{what} {path!r} is not an rwmn checkpoint (format {FORMAT})")
    _need(path, state, "model_config", dict)
    for key, value in _need(path, state, "model", dict).items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint {path!r}: 'model' holds {key!r}, not a named tensor")
    return state


def _unpickling_reason(exc: BaseException) -> str:
    """The specific line of torch's weights_only error (it wraps it in a long explanation)."""
    for paragraph in str(exc).split("\n\n"):
        text = " ".join(paragraph.split())
        if text and not text.startswith(("Weights only load failed", "Check the documentation")):
            return text.removeprefix("Please file an issue with the following so that we "
                                     "can make `weights_only=True` compatible with your use "
                                     "case: WeightsUnpickler error:").strip()  # fmt: skip
    return "rejected by torch.load(weights_only=True)"


def _need(path: str, holder: dict, key: str, kind, where: str = ""):
    """``holder[key]``, which must be an instance of ``kind`` (bools are not numbers)."""
    if key not in holder:
        raise CheckpointError(f"checkpoint {path!r} has no {where}{key!r}")
    value = holder[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise CheckpointError(
            f"checkpoint {path!r}: {where}{key!r} is a {type(value).__name__}, expected {names}"
        )
    return value


def _check_rank_state(path: str, holder: dict, where: str) -> None:
    """The running window and random states of one rank (or of a single process)."""
    window = _need(path, holder, "window", dict, where)
    for key, kind in (("loss", (int, float)), ("acc", (int, float)), ("questions", int)):
        _need(path, window, key, kind, f"{where}window/")
    rng = _need(path, holder, "rng", dict, where)
    for key, kind in (("torch", torch.Tensor), ("numpy_sampler", dict),
                      ("numpy_val_sampler", dict), ("python", tuple)):  # fmt: skip
        _need(path, rng, key, kind, f"{where}rng/")
    if "numpy_samplers" in rng:  # one per movie of a step (--movies_per_step)
        samplers = _need(path, rng, "numpy_samplers", list, f"{where}rng/")
        if not samplers or not all(isinstance(s, dict) for s in samplers):
            raise CheckpointError(f"checkpoint {path!r}: {where}rng/numpy_samplers is malformed")


def check_resumable(state: dict, path: str) -> None:
    """Check the training state that ``--resume`` restores (types and ranges)."""
    for key in ("optimizer", "scheduler", "scaler", "train_config"):
        _need(path, state, key, dict)
    step = _need(path, state, "step", int)
    bad = _need(path, state, "bad_evals", int)
    best = _need(path, state, "best_acc", (int, float))
    if step < 0 or bad < 0 or math.isnan(best):
        raise CheckpointError(
            f"checkpoint {path!r}: step {step}, bad_evals {bad}, best_acc {best} out of range"
        )
    _check_rank_state(path, state, "")
    # A run of N > 1 processes holds every rank's window and random states.
    world_size = state.get("world_size", 1)  # absent: written by a single process
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise CheckpointError(f"checkpoint {path!r}: world_size {world_size!r} out of range")
    if world_size > 1:
        ranks = _need(path, state, "ranks", list)
        if len(ranks) != world_size:
            raise CheckpointError(
                f"checkpoint {path!r}: {len(ranks)} rank states for world size {world_size}"
            )
        for rank, part in enumerate(ranks):
            if not isinstance(part, dict):
                raise CheckpointError(f"checkpoint {path!r}: ranks/{rank} is not a dict")
            _check_rank_state(path, part, f"ranks/{rank}/")
    for key, kind in (("seconds", (int, float)), ("window_seconds", (int, float)),
                      ("changes", list)):  # fmt: skip
        if key in state:  # absent from checkpoints written before they were recorded
            _need(path, state, key, kind)
