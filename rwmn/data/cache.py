"""Batch sources for training: a split decoded and checked once, then served from memory.

Reading a video_sub story from HDF5 and checking it costs milliseconds per batch, more
than a fused GPU step. So ``train.py`` reads every movie of its splits once,
before the first step, checks it (shapes at open, NaN and inf here, so a bad movie stops
the run before it trains), and then serves batches from one of:

* ``device``: every story and question on the training device. A batch is a view of the
  movie's story plus a gather of its question rows: no copy, no host work but the draw.
  On a CPU run the device is the CPU, so this is ordinary host memory.
* ``host``: in pinned host memory (page-locked, so that the host-to-device copy can run
  asynchronously on a side stream, see rwmn.data.prefetch). Without CUDA there is nothing
  to pin for and the memory stays ordinary; the plan's reason says so.
* ``none``: read from HDF5 per batch, as before (the data is still checked up front).

``auto`` chooses by size (:func:`plan_cache`). Features are stored in ``--data_dtype``
(fp32, bf16 or fp16): bf16 halves the memory and the copies; the trainer upcasts them to
fp32 on the device. Every source draws its batches with :func:`rwmn.data.movieqa.draw`
from the same generator and converts float32 values to the storage dtype the same way, so
all modes give bit-identical batches.

May import: numpy, torch, rwmn.data.movieqa.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from rwmn.data.movieqa import MovieQAData, QABatch, draw

DATA_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CACHE_MODES = ("auto", "device", "host", "none")
#: ``auto`` keeps the data on a GPU when it needs at most this fraction of the GPU's free
#: memory: the rest is left to the model's activations, gradients and the allocator.
DEVICE_FRACTION = 0.5
#: ... else in host memory when it needs at most this fraction of the available RAM (the
#: rest is left to the process, the page cache and whatever else runs on the machine).
HOST_FRACTION = 0.5
_GIB = 2**30


def _gib(nbytes: float) -> str:
    return f"{nbytes / _GIB:.2f} GiB"


def split_nbytes(data: MovieQAData, dtype: torch.dtype) -> int:
    """Bytes a cache of ``data`` takes in ``dtype``, from the shapes checked at open (no
    read): stories and question features in ``dtype``, answer indices as int64."""
    item = torch.empty((), dtype=dtype).element_size()
    width = data.dim_rgb + data.dim_sub if data.video else data.dim_text
    features = sum(data.story_rows) * width + data.num_questions * data.dim_text * (
        1 + data.num_answer
    )
    return features * item + data.num_questions * torch.empty((), dtype=torch.int64).element_size()


def available_ram() -> int | None:
    """Bytes of RAM available to a new allocation (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None for other devices)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free


@dataclass(frozen=True)
class CachePlan:
    """Where the data is served from, why, and how big it is."""

    mode: str  # device, host or none
    reason: str
    nbytes: int
    pinned: bool = False  # host: the memory is page-locked

    def line(self, dtype_name: str) -> str:
        """The log line train.py starts with."""
        return (
            f"data cache: {self.mode} ({_gib(self.nbytes)} of {dtype_name} features and "
            f"answer indices): {self.reason}"
        )


def _can_pin(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"ordinary memory, nothing to pin for on a {device.type} run"
    try:
        torch.empty(1).pin_memory()
    except RuntimeError as exc:  # a CPU-only build, or no driver
        return False, f"ordinary memory, pinning failed ({' '.join(str(exc).split())[:80]})"
    return True, "pinned memory"


def plan_cache(
    requested: str,
    nbytes: int,
    device: torch.device,
    free_device: int | None = None,
    ram: int | None = None,
) -> CachePlan:
    """Where ``nbytes`` of data are kept for a run on ``device``. ``free_device`` and
    ``ram`` default to what the machine has now (tests pass their own)."""
    if requested not in CACHE_MODES:
        raise ValueError(f"--data_cache {requested!r}: expected one of {CACHE_MODES}")
    free_device = free_device_memory(device) if free_device is None else free_device
    ram = available_ram() if ram is None else ram
    ram_text = "unknown" if ram is None else _gib(ram)
    fits_ram = ram is not None and nbytes <= HOST_FRACTION * ram
    if requested == "none":
        return CachePlan("none", "--data_cache none: read from HDF5 per batch", nbytes)
    if requested == "host":
        pinned, how = _can_pin(device)
        return CachePlan("host", f"--data_cache host: {how}", nbytes, pinned)
    if requested == "device":
        where = "CPU memory (the device is the CPU)" if device.type == "cpu" else str(device)
        return CachePlan("device", f"--data_cache device: on {where}", nbytes)
    # auto
    if device.type == "cpu":
        if fits_ram:
            return CachePlan(
                "device",
                f"auto: the device is the CPU and the data fits in {HOST_FRACTION:.0%} of the "
                f"available RAM ({ram_text})",
                nbytes,
            )
        return CachePlan(
            "none",
            f"auto: the data exceeds {HOST_FRACTION:.0%} of the available RAM ({ram_text})",
            nbytes,
        )
    free_text = "unknown" if free_device is None else _gib(free_device)
    if free_device is not None and nbytes <= DEVICE_FRACTION * free_device:
        return CachePlan(
            "device",
            f"auto: fits in {DEVICE_FRACTION:.0%} of the free memory of {device} ({free_text})",
            nbytes,
        )
    if fits_ram:
        pinned, how = _can_pin(device)
        return CachePlan(
            "host",
            f"auto: exceeds {DEVICE_FRACTION:.0%} of the free memory of {device} ({free_text}) "
            f"but fits in {HOST_FRACTION:.0%} of the available RAM ({ram_text}); {how}",
            nbytes,
            pinned,
        )
    return CachePlan(
        "none",
        f"auto: exceeds {DEVICE_FRACTION:.0%} of the free memory of {device} ({free_text}) "
        f"and {HOST_FRACTION:.0%} of the available RAM ({ram_text})",
        nbytes,
    )


class BatchSource(Protocol):
    """What the training loop draws batches from."""

    movies: list[str]
    counts: list[int]

    @property
    def num_questions(self) -> int: ...

    def random_batch(self, rng: np.random.Generator, batch_size: int) -> QABatch: ...

    def iter_batches(
        self, batch_size: int, movies: Iterable[int] | None = None
    ) -> Iterator[QABatch]: ...


class ReadPerBatch:
    """``--data_cache none``: batches read from HDF5 as needed, features in ``dtype``.
    With ``check`` every movie is read once now, so a NaN anywhere stops the run before
    its first step rather than in the middle of training."""

    def __init__(
        self,
        data: MovieQAData,
        dtype: torch.dtype,
        check: bool = True,
        on_movie: Callable[[int], None] | None = None,
    ) -> None:
        self.data, self.dtype = data, dtype
        self.movies, self.counts = data.movies, data.counts
        if check:
            for index in range(len(data.movies)):
                data.decode_movie(index)
                if on_movie is not None:
                    on_movie(index)

    @property
    def num_questions(self) -> int:
        return self.data.num_questions

    def random_batch(self, rng: np.random.Generator, batch_size: int) -> QABatch:
        return self.data.random_batch(rng, batch_size).features(self.dtype)

    def iter_batches(
        self, batch_size: int, movies: Iterable[int] | None = None
    ) -> Iterator[QABatch]:
        for batch in self.data.iter_batches(batch_size, movies):
            yield batch.features(self.dtype)


class CachedSplit:
    """``--data_cache device`` or ``host``: every movie of ``data`` decoded, checked and
    stored in ``dtype`` on ``device`` (pinned when ``pinned``). Question rows of all movies
    are concatenated, so a batch is one gather; stories stay per movie, so a batch's story
    is a view."""

    def __init__(
        self,
        data: MovieQAData,
        dtype: torch.dtype,
        device: torch.device,
        pinned: bool = False,
        on_movie: Callable[[int], None] | None = None,
    ) -> None:
        self.movies, self.counts = data.movies, data.counts
        self.device, self.pinned, self.dtype = torch.device(device), pinned, dtype
        self.offsets = np.concatenate([[0], np.cumsum(data.counts)]).astype(np.int64)
        total = int(self.offsets[-1])
        self.query = self._empty((total, data.dim_text), dtype)
        self.answers = self._empty((total, data.num_answer, data.dim_text), dtype)
        self.target = self._empty((total,), torch.int64)
        self.has_target: list[bool] = []
        self.stories: list[tuple[torch.Tensor, ...]] = []
        self.qids: list[list[str]] = []
        for index in range(len(data.movies)):
            arrays = data.decode_movie(index)
            start, stop = self.offsets[index], self.offsets[index + 1]
            self.query[start:stop].copy_(torch.from_numpy(arrays.query))
            self.answers[start:stop].copy_(torch.from_numpy(arrays.answers))
            self.has_target.append(arrays.target is not None)
            if arrays.target is not None:
                self.target[start:stop].copy_(torch.from_numpy(arrays.target))
            else:
                self.target[start:stop].zero_()
            stories = []
            for part in arrays.story:
                stored = self._empty(part.shape, dtype)
                stored.copy_(torch.from_numpy(part))
                stories.append(stored)
            self.stories.append(tuple(stories))
            self.qids.append(arrays.qids)
            if on_movie is not None:
                on_movie(index)
        self.video = data.video

    def _empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        if self.pinned:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        return torch.empty(shape, dtype=dtype, device=self.device)

    @property
    def num_questions(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        tensors = [self.query, self.answers, self.target, *(s for m in self.stories for s in m)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def batch(self, index: int, rows: np.ndarray) -> QABatch:
        """Questions ``rows`` of movie number ``index``: the story as a view, the question
        features and answers gathered (into pinned memory for a pinned cache, so that the
        copy to the GPU can be asynchronous)."""
        picked = torch.from_numpy(rows.astype(np.int64) + self.offsets[index])
        if self.query.device.type != "cpu":
            if torch.cuda.is_available():
                picked = picked.pin_memory()
            picked = picked.to(self.query.device, non_blocking=True)

        def gather(source: torch.Tensor) -> torch.Tensor:
            if not self.pinned:
                return source.index_select(0, picked)
            out = torch.empty((len(rows), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
            return torch.index_select(source, 0, picked, out=out)

        story = self.stories[index]
        qids = self.qids[index]
        return QABatch(
            self.movies[index],
            story if self.video else story[0],
            gather(self.query),
            gather(self.answers),
            gather(self.target) if self.has_target[index] else None,
            [qids[r] for r in rows.tolist()],
        )

    def random_batch(self, rng: np.random.Generator, batch_size: int) -> QABatch:
        return self.batch(*draw(rng, self.counts, batch_size))

    def iter_batches(
        self, batch_size: int, movies: Iterable[int] | None = None
    ) -> Iterator[QABatch]:
        """Every question (of ``movies``, default all) once, in order."""
        for index in range(len(self.counts)) if movies is None else movies:
            count = self.counts[index]
            for start in range(0, count, batch_size):
                yield self.batch(index, np.arange(start, min(start + batch_size, count)))


def build_source(
    data: MovieQAData,
    plan: CachePlan,
    dtype: torch.dtype,
    device: torch.device,
    on_movie: Callable[[int], None] | None = None,
) -> BatchSource:
    """The batch source ``plan`` names, every movie of ``data`` read and checked;
    ``on_movie(index)`` after each movie is read (progress)."""
    if plan.mode == "none":
        return ReadPerBatch(data, dtype, on_movie=on_movie)
    if plan.mode == "host":
        return CachedSplit(data, dtype, torch.device("cpu"), plan.pinned, on_movie)
    return CachedSplit(data, dtype, device, on_movie=on_movie)
