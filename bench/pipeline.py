"""Input-pipeline benchmark: how long the training loop waits for a batch.

train.py draws every batch with ``MovieQAData.random_batch`` (h5py reads of one movie's
story and some of its questions) and moves it to the device. A GPU step of a few
milliseconds is only as fast as that, so the GPU session times it next to the step, on a
synthetic data set in the release's layout (``rwmn.data.synthetic``), per data source:

* ``cold``: the first batch of a freshly opened data set (file handles not yet open);
  the OS page cache is warm (the files were just written), so this is Python and h5py
  start-up, not the disk.
* ``warm``: later batches of the same open data set, median over repetitions.

What produces a batch is a :class:`Loader` in :data:`LOADERS`; a faster pipeline (an
in-memory cache, say) is timed by adding its loader there.

May import: bench.timing and bench.cache_loaders, rwmn.data.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import timing
from bench.cache_loaders import CacheLoad
from rwmn.data import MovieQAData, QABatch
from rwmn.data.synthetic import SyntheticConfig, generate


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Loader:
    """One way of producing a training batch from an open data set."""

    name: str
    #: (data set, rng, batch size, device) -> a batch, on the device when ``to_device``.
    load: Callable[[MovieQAData, np.random.Generator, int, str], QABatch]
    to_device: bool


def _random_batch(data, rng, batch, device):
    return data.random_batch(rng, batch)


def _random_batch_to(data, rng, batch, device):
    out = data.random_batch(rng, batch).to(device)
    _sync(device)
    return out


#: What is timed. train.py's path is random_batch, then .to(device).
LOADERS = (
    Loader("random_batch", _random_batch, to_device=False),
    Loader("random_batch+to(device)", _random_batch_to, to_device=True),
    *(
        Loader(f"cache:{mode}", CacheLoad(mode), to_device=True)
        for mode in ("none", "host", "device")
    ),
)


@dataclass(frozen=True)
class PipelineConfig:
    """Data set and repetitions of the pipeline benchmark."""

    sources: tuple[str, ...] = ("sub", "video_sub")
    batch: int = 32
    #: Synthetic data set: movies per split (the default data set has 48 train movies;
    #: random_batch touches one movie per batch, so a few suffice) and their dimensions.
    train_movies: int = 8
    dims: tuple[tuple[str, int], ...] = ()
    #: Fresh data sets opened for the cold figure, and the warm timing budget (seconds).
    cold_reps: int = 5
    warm_measure_s: float = 0.2
    warm_min_reps: int = 5
    seed: int = 0


def make_data(source: str, root: Path, cfg: PipelineConfig) -> Path:
    """A synthetic data set of ``source`` under ``root``; returns its --data_dir."""
    synth = SyntheticConfig(
        source=source, train_movies=cfg.train_movies, val_movies=1, test_movies=1,
        seed=cfg.seed, **dict(cfg.dims),
    )  # fmt: skip
    generate(root, synth)
    return root


def _open(source: str, data_dir: Path, cfg: PipelineConfig) -> MovieQAData:
    dims = {k: v for k, v in cfg.dims if k in ("dim_text", "dim_rgb", "dim_sub")}
    return MovieQAData(data_dir, source, "train", **dims)


PHASES = ("cold", "warm")


def measure(
    loader: Loader, phase: str, source: str, data_dir: Path, cfg: PipelineConfig, device: str
) -> dict:
    """One row: ``loader``'s time per batch on ``source`` in ``phase`` (cold or warm)."""
    row = {
        "kind": "pipeline",
        "source": source,
        "loader": loader.name,
        "phase": phase,
        "batch": cfg.batch,
        "device": device if loader.to_device else "cpu",
        "status": "ok",
        "reason": None,
    }
    rng = np.random.default_rng(cfg.seed)
    if phase == "cold":
        ms = []
        for _ in range(cfg.cold_reps):
            data = _open(source, data_dir, cfg)
            try:
                t0 = time.perf_counter()
                loader.load(data, rng, cfg.batch, device)
                ms.append(1e3 * (time.perf_counter() - t0))
            finally:
                data.close()
        row.update(
            median_ms=statistics.median(ms),
            min_ms=min(ms),
            reps=len(ms),
            timer="cpu perf_counter, first batch of a freshly opened data set",
        )
    elif phase == "warm":
        data = _open(source, data_dir, cfg)
        try:
            t = timing.time_cpu(
                lambda: loader.load(data, rng, cfg.batch, device),
                measure_s=cfg.warm_measure_s,
                min_reps=cfg.warm_min_reps,
            )
        finally:
            data.close()
        row.update(t.as_row())
    else:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    row["questions_per_s"] = cfg.batch / (row["median_ms"] / 1e3)
    return row
