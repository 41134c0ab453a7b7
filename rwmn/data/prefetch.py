"""The next training batch, prepared while the current step runs.

On CUDA the batch of step k+1 is drawn and moved to the device on a side stream right
after step k's batch is handed out, before step k's kernels are queued: its question
gather and its host-to-device copies (asynchronous from pinned memory) run beside step
k's compute. Handing a batch out makes the training stream wait for the side stream, and
records every tensor of the batch on the training stream, so the caching allocator does
not reuse their memory while step k+1 still reads them (``Tensor.record_stream``).

On the CPU there is nothing to overlap with (the step runs on the calling thread), so the
batch is drawn one step ahead on the same thread; the bookkeeping is the same, so resume
exactness with the prefetcher is tested on the CPU.

Determinism: batches are drawn from the sampler in step order, exactly as without a
prefetcher. The batch drawn ahead is not yet used when a checkpoint is written, so
:meth:`Prefetcher.sampler_state` is the sampler's state from *before* that draw: a run
resumed from the checkpoint draws the same batch again and goes on bit-identically.

May import: numpy, torch, rwmn.data.cache, rwmn.data.movieqa.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch

from rwmn.data.cache import BatchSource
from rwmn.data.movieqa import QABatch


class NoPrefetch:
    """``--prefetch false``: each batch drawn and moved when the step asks for it."""

    def __init__(
        self,
        source: BatchSource,
        sampler: np.random.Generator,
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.source, self.sampler, self.batch_size = source, sampler, batch_size
        self.device = torch.device(device)
        self._start()

    def _start(self) -> None:
        """What a subclass sets up once its source, sampler and device are known."""

    def next(self, draw_ahead: bool = True) -> QABatch:
        return self.source.random_batch(self.sampler, self.batch_size).to(self.device)

    def sampler_state(self) -> dict:
        return copy.deepcopy(self.sampler.bit_generator.state)


class Prefetcher(NoPrefetch):
    """Random training batches of ``source`` on ``device``, one drawn ahead."""

    def _start(self) -> None:
        self.stream = None
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
            # A device cache was filled on the current stream: read it after that.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._pending: QABatch | None = None
        self._state_before_pending: dict | None = None

    def _prepare(self) -> None:
        self._state_before_pending = copy.deepcopy(self.sampler.bit_generator.state)
        side = (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        )
        with side:
            batch = self.source.random_batch(self.sampler, self.batch_size)
            self._pending = batch.to(self.device, non_blocking=True)

    def next(self, draw_ahead: bool = True) -> QABatch:
        """The next batch (ready to use on the current stream); with ``draw_ahead`` the
        one after it starts being prepared (leave it off after the last step)."""
        if self._pending is None:
            self._prepare()
        batch, self._pending = self._pending, None
        self._state_before_pending = None
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for tensor in batch.tensors():
                if tensor.device.type == "cuda":
                    tensor.record_stream(current)
        if draw_ahead:
            self._prepare()
        return batch

    def sampler_state(self) -> dict:
        """The sampler's state as if no batch had been drawn ahead (for checkpoints)."""
        if self._state_before_pending is not None:
            return copy.deepcopy(self._state_before_pending)
        return copy.deepcopy(self.sampler.bit_generator.state)
