"""Data-parallel training under ``torchrun``: the launch, the collectives the
trainer needs, and the per-slot batch streams.

``torchrun`` starts one process per rank and passes RANK, WORLD_SIZE and LOCAL_RANK in
the environment. With a world size above 1 :class:`Comm` joins the process group
(``cpu:gloo,cuda:nccl`` where CUDA is available, so CPU tensors go through gloo and CUDA
tensors through NCCL; ``gloo`` on a machine without CUDA); with one process nothing is
initialised and every collective is the identity, so a plain ``python train.py`` runs
exactly as before.

Errors: a check that can fail on some ranks only (the run directory, read by rank 0; the
data, read by every rank) is followed by :meth:`Comm.agree`, so every rank stops at the
same point instead of waiting forever in the next collective. The lowest failing rank
raises its own error (train.py prints it as one line); the others raise
:class:`PeerError`, which train.py does not print: one line per failure, exit status 2.

Batch streams: an optimizer step of ``N`` ranks with ``--movies_per_step K`` consumes
``N * K`` movies. Movie ``k`` of rank ``r`` is drawn from the stream of *slot*
``r * K + k`` (:func:`slot_sampler`), so the batches of a step depend on ``--seed`` and on
``N * K`` only: one process with ``--movies_per_step 2`` draws, each step, rank 0's and then
rank 1's movie of a two-rank run, and makes the same update up to rounding (tested).

May import: numpy, torch, rwmn.config.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from rwmn.config import ConfigError

T = TypeVar("T")
#: How long a rank waits in a collective for the others (a dead peer is reported by
#: torchrun long before this; it bounds a hang if it is not).
TIMEOUT = datetime.timedelta(minutes=30)


class PeerError(RuntimeError):
    """Another rank failed and reported it; this rank stops without a message of its own."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"rank {rank} failed: {message}")
        self.rank = rank


@dataclass(frozen=True)
class Launch:
    """Where this process stands in the launch: rank, world size, local rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Launch:
        """The launch torchrun describes in ``environ`` (default os.environ); a single
        process where WORLD_SIZE is absent."""
        environ = os.environ if environ is None else environ
        if "WORLD_SIZE" not in environ:
            return cls()
        values = {}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            text = environ.get(name, "0")
            try:
                values[name] = int(text)
            except ValueError:
                message = f"environment variable {name}={text!r} is not an integer"
                raise ConfigError(message) from None
        launch = cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
        rank, size, local = launch.rank, launch.world_size, launch.local_rank
        if size < 1 or not 0 <= rank < size or local < 0:
            raise ConfigError(
                f"torchrun environment out of range: RANK {launch.rank}, WORLD_SIZE "
                f"{launch.world_size}, LOCAL_RANK {launch.local_rank}"
            )
        return launch

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def slot_sampler(seed: int, slot: int) -> np.random.Generator:
    """The batch stream of ``slot`` (rank * movies_per_step + movie of the step). Slot 0
    is ``default_rng(seed)``, the stream of a single-process run before data parallelism, so such
    runs draw the batches they drew before; slot j > 0 is an independent child stream of
    the same seed (numpy's SeedSequence spawn key)."""
    if slot == 0:
        return np.random.default_rng(seed)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(slot,)))


def process_group_backend() -> str:
    """NCCL for CUDA tensors where CUDA is available, gloo for CPU tensors (and for
    everything on a machine without CUDA)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


class Comm:
    """The collectives of a run over ``launch``'s ranks; with one process each is the
    identity and no process group exists."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        self.rank, self.world_size = launch.rank, launch.world_size
        self.started = False

    @property
    def distributed(self) -> bool:
        return self.launch.distributed

    @property
    def is_main(self) -> bool:
        return self.launch.is_main

    def __enter__(self) -> Comm:
        if self.distributed and not dist.is_initialized():
            if torch.cuda.is_available() and self.launch.local_rank < torch.cuda.device_count():
                torch.cuda.set_device(self.launch.local_rank)
            dist.init_process_group(backend=process_group_backend(), timeout=TIMEOUT)
            self.started = True
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.started:
            # The run's DDP reducer and its gloo work objects, if a reference cycle keeps
            # them, are freed now, while the process group they use still exists.
            gc.collect()
            if exc_type is None:
                # Every rank leaves together: a rank that tears its gloo connections down
                # while a peer is still finishing its last collective makes that peer fail
                # ("connection closed by peer") after a complete run.
                dist.barrier()
            dist.destroy_process_group()
            self.started = False

    # -- agreement -------------------------------------------------------------------------
    def agree(self, error: BaseException | None) -> None:
        """Every rank passes the error its last phase raised (or None); if any rank has
        one, every rank raises: the lowest failing rank its own, the others PeerError."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, None if error is None else str(error))
        failed = [rank for rank, message in enumerate(messages) if message is not None]
        if not failed:
            return
        if failed[0] == self.rank and error is not None:
            raise error
        raise PeerError(failed[0], messages[failed[0]])

    def phase(self, errors: tuple[type[BaseException], ...], fn: Callable[[], T]) -> T:
        """``fn()`` on every rank, then :meth:`agree` on whether one of ``errors`` was raised."""
        try:
            result = fn()
        except errors as exc:
            self.agree(exc)
            raise  # unreachable: agree re-raises it
        self.agree(None)
        return result

    def on_main(self, errors: tuple[type[BaseException], ...], fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 only (what reads or writes the run directory); its result,
        or its error, reaches every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except errors as exc:
                error = exc
        self.agree(error if self.is_main else None)
        return self.broadcast(result)

    # -- data --------------------------------------------------------------------------------
    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled: plain values and CPU tensors)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` stacked in rank order ([world_size, *shape]) on every rank."""
        if not self.distributed:
            return tensor.unsqueeze(0)
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous())
        return torch.stack(out)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (the identity with one process)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
