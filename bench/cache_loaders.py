"""Loaders of bench.pipeline for train.py's data caches (``--data_cache``).

Each times what train.py does per batch with that cache: draw a batch from the cached
split (rwmn.data.cache) and move it to the device (asynchronously from pinned memory),
then wait for the device. The cache is built on the first call for an open data set, so
the ``cold`` phase of bench.pipeline (first batch of a freshly opened data set) is the
build (every movie read, checked and stored) plus one batch, and ``warm`` is a batch.

May import: rwmn.data (bench.pipeline imports this, never the reverse).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from rwmn.data import MovieQAData, QABatch
from rwmn.data.cache import BatchSource, build_source, plan_cache, split_nbytes


class CacheLoad:
    """``load`` of a bench.pipeline Loader for ``--data_cache mode`` (fp32 features). The
    built source lives as long as its data set (a weak map keyed by it)."""

    def __init__(self, mode: str, dtype: torch.dtype = torch.float32) -> None:
        self.mode, self.dtype = mode, dtype
        self._sources: weakref.WeakKeyDictionary[MovieQAData, BatchSource] = (
            weakref.WeakKeyDictionary()
        )

    def source(self, data: MovieQAData, device: torch.device) -> BatchSource:
        if data not in self._sources:
            plan = plan_cache(self.mode, split_nbytes(data, self.dtype), device)
            self._sources[data] = build_source(data, plan, self.dtype, device)
        return self._sources[data]

    def __call__(
        self, data: MovieQAData, rng: np.random.Generator, batch: int, device: str
    ) -> QABatch:
        dev = torch.device(device)
        out = self.source(data, dev).random_batch(rng, batch).to(dev, non_blocking=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out
