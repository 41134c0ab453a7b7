"""Progress of reading a split before training: movies, sizes, rate and time left.

May import: rwmn.data.movieqa.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rwmn.data.movieqa import MovieQAData

_MB = 1e6


def movie_nbytes(data: MovieQAData, index: int) -> int:
    """Bytes of float32 features movie ``index`` is read as (story, questions, answers)."""
    width = data.dim_rgb + data.dim_sub if data.video else data.dim_text
    questions = data.counts[index] * data.dim_text * (1 + data.num_answer)
    return 4 * (data.story_rows[index] * width + questions)


class ReadProgress:
    """Call once per movie read; logs ``reading <split>: 12/100 movies, 170/1,410 MB,
    85 MB/s, about 15 s left`` at most every ``interval`` seconds, and a last line when the
    split is read (when it took longer than ``interval``)."""

    def __init__(
        self,
        data: MovieQAData,
        log: Callable[[str], None],
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.data, self.log, self.interval, self.clock = data, log, interval, clock
        self.sizes = [movie_nbytes(data, i) for i in range(len(data.movies))]
        self.total = sum(self.sizes)
        self.done = self.movies = 0
        self.start = self.last = clock()

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "done" if self.done >= self.total else f"about {left:,.0f} s left"
        return (
            f"reading {self.data.split} ({self.data.source}): {self.movies}/"
            f"{len(self.sizes)} movies, {self.done / _MB:,.0f}/{self.total / _MB:,.0f} MB, "
            f"{rate / _MB:,.1f} MB/s, {eta}"
        )

    def __call__(self, index: int) -> None:
        self.done += self.sizes[index]
        self.movies += 1
        now = self.clock()
        finished = self.movies == len(self.sizes)
        if now - self.last >= self.interval or (finished and now - self.start >= self.interval):
            self.last = now
            self.log(self.line(now))
