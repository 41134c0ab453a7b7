"""Reader of the released MovieQA features (docs/data.md), streaming with h5py.

    <data_dir>/<source>/story.h5               text: dataset per movie [n, dim_text]
                                               video_sub: group per movie, rgb and sub
    <data_dir>/<source>/story.hkl              or the release's hickle file (rwmn.data.release)
    <data_dir>/<source>/<split>/<movie>.h5     query_rep, answer_rep, cor_idx, qid

At construction every file is opened and checked: each dataset's shape and dtype, and every
QA file's cor_idx (integers in [0, num_answer)). A movie's story and question vectors are
read when a batch needs them and checked then for NaN and inf; :meth:`MovieQAData.decode_movie`
reads and checks a whole movie at once, which ``rwmn.data.cache`` does for every movie of
a split before training starts. A file that cannot be read (truncated, not HDF5) or holds
the wrong kind of data raises :class:`DataError` with one line naming the file and dataset.

May import: h5py, numpy, torch, rwmn.cli, rwmn.data.errors, rwmn.data.release.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from rwmn.cli import one_line
from rwmn.data.errors import DataError
from rwmn.data.release import StoryFile, check_node, find_story_file, story_names

SPLITS = ("train", "val", "test")
QA_DATASETS = ("query_rep", "answer_rep", "cor_idx", "qid")
# The release's QA files also hold per-question video/subtitle datasets that it ignored.
IGNORED_MARKERS = ("video", "subtt")


@contextlib.contextmanager
def _reading(where: str) -> Iterator[None]:
    """Turn what h5py and numpy raise on an unreadable file into a DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{where}: cannot be read ({one_line(exc)})") from exc


def _open(path: str) -> h5py.File:
    with _reading(path):
        return h5py.File(path, "r")


def _dataset(node, where: str, kinds: str = "fiu", expected: str = "numbers") -> h5py.Dataset:
    """``node`` as a dataset whose dtype kind is one of ``kinds`` (numpy dtype.kind)."""
    if not isinstance(node, h5py.Dataset):
        raise DataError(f"{where} is a {type(node).__name__}, expected a dataset")
    if node.dtype.kind not in kinds:
        raise DataError(f"{where} has dtype {node.dtype}, expected {expected}")
    return node


@dataclass
class QABatch:
    """Up to batch_size questions about one movie, as tensors."""

    movie: str
    story: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    query: torch.Tensor  # [B, dim_text]
    answers: torch.Tensor  # [B, A, dim_text]
    target: torch.Tensor | None  # [B] int64, None where cor_idx is absent (test)
    qids: list[str]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QABatch:
        """The batch on ``device`` (a no-op for tensors already there); ``non_blocking``
        makes copies from pinned host memory asynchronous."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        story = (
            tuple(move(s) for s in self.story)
            if isinstance(self.story, tuple)
            else move(self.story)
        )
        target = None if self.target is None else move(self.target)
        return QABatch(self.movie, story, move(self.query), move(self.answers), target, self.qids)

    def features(self, dtype: torch.dtype) -> QABatch:
        """The batch with its feature tensors (story, query, answers) in ``dtype``."""
        story = (
            tuple(s.to(dtype) for s in self.story)
            if isinstance(self.story, tuple)
            else self.story.to(dtype)
        )
        return QABatch(
            self.movie, story, self.query.to(dtype), self.answers.to(dtype), self.target, self.qids
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch (for stream bookkeeping)."""
        story = list(self.story) if isinstance(self.story, tuple) else [self.story]
        return [*story, self.query, self.answers, *([] if self.target is None else [self.target])]


@dataclass
class MovieArrays:
    """One movie read whole and checked (NaN, inf): what a cache holds for it."""

    story: tuple[np.ndarray, ...]  # (story,) for text, (rgb, sub) for video_sub; float32
    query: np.ndarray  # [q, dim_text] float32
    answers: np.ndarray  # [q, A, dim_text] float32
    target: np.ndarray | None  # [q] int64, None where cor_idx is absent
    qids: list[str]


def draw(rng: np.random.Generator, counts: list[int], batch_size: int) -> tuple[int, np.ndarray]:
    """A random movie and up to ``batch_size`` of its question rows (sorted), as the
    release drew a batch. Every batch source draws through this one function, so they all
    consume ``rng`` identically: the same seed gives the same batches whatever serves them."""
    index = int(rng.integers(len(counts)))
    count = counts[index]
    rows = np.sort(rng.choice(count, size=min(batch_size, count), replace=False))
    return index, rows


def _decode(qid) -> str:
    return qid.decode() if isinstance(qid, bytes) else str(qid)


class MovieQAData:
    """One split of one data source."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        source: str,
        split: str,
        dim_text: int = 300,
        dim_rgb: int = 2048,
        dim_sub: int = 300,
        num_answer: int = 5,
        require_answers: bool | None = None,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.video = source == "video_sub"
        self.source, self.split = source, split
        self.dim_text, self.dim_rgb, self.dim_sub = dim_text, dim_rgb, dim_sub
        self.num_answer = num_answer
        self.require_answers = split != "test" if require_answers is None else require_answers
        root = os.path.join(os.fspath(data_dir), source)
        if os.path.exists(os.fspath(data_dir)) and not os.path.isdir(os.fspath(data_dir)):
            raise DataError(f"--data_dir {os.fspath(data_dir)!r} is a file, not a directory")
        if not os.path.isdir(os.fspath(data_dir)):
            raise DataError(f"--data_dir {os.fspath(data_dir)!r} does not exist")
        unpacked = os.path.join(os.fspath(data_dir), "data", source)
        if not os.path.isdir(root) and os.path.isdir(unpacked):
            root = unpacked  # the directory the release's download.sh unpacked into
        if not os.path.isdir(root):
            raise DataError(
                f"data source directory {root!r} does not exist (--data_source {source})"
            )
        story_path = find_story_file(root, source)
        if story_path is None:
            first, *others = story_names(source)
            raise DataError(
                f"story file {os.path.join(root, first)!r} does not exist "
                f"(nor {' or '.join(others)})"
            )
        self.story_path = story_path
        self.data_dir = os.fspath(data_dir)
        self.split_dir = os.path.join(root, split)
        if not os.path.isdir(self.split_dir):
            raise DataError(f"split directory {self.split_dir!r} does not exist")
        files = sorted(f for f in os.listdir(self.split_dir) if f.endswith(".h5"))
        if not files:
            raise DataError(f"split directory {self.split_dir!r} holds no <movie>.h5 files")
        self._story_file: StoryFile | None = None
        self.movies: list[str] = []
        self.counts: list[int] = []
        self.story_rows: list[int] = []  # story elements per movie (sizes the caches)
        with _reading(self.story_path):
            story = StoryFile(self.story_path, self.data_dir)
        try:
            for name in files:
                movie = name[: -len(".h5")]
                with _reading(f"{self.story_path}:{movie}"):
                    if movie not in story:
                        raise DataError(
                            f"{self.story_path}: no story for movie {movie!r} of {split}"
                        )
                    self.story_rows.append(self._check_story_shapes(story.value(movie), movie))
                self.movies.append(movie)
                self.counts.append(self._check_qa_file(movie))
        finally:
            story.close()

    # ----------------------------------------------------------------------------------
    def _qa_path(self, movie: str) -> str:
        return os.path.join(self.split_dir, f"{movie}.h5")

    def _check_story_shapes(self, node, movie: str) -> int:
        where = f"{self.story_path}:{movie}"
        if self.video:
            if not isinstance(node, dict) or "rgb" not in node or "sub" not in node:
                raise DataError(f"{where}: a video_sub story must be a group with rgb and sub")
            rgb = _dataset(node["rgb"], f"{where}/rgb", expected="numbers (features)").shape
            sub = _dataset(node["sub"], f"{where}/sub", expected="numbers (features)").shape
            if len(rgb) != 2 or rgb[1] != self.dim_rgb:
                raise DataError(
                    f"{where}/rgb has shape {rgb}, expected [n, {self.dim_rgb}] (--dim_rgb)"
                )
            if len(sub) != 2 or sub[1] != self.dim_sub:
                raise DataError(
                    f"{where}/sub has shape {sub}, expected [n, {self.dim_sub}] (--dim_sub)"
                )
            if rgb[0] != sub[0]:
                raise DataError(f"{where}: rgb has {rgb[0]} rows but sub has {sub[0]}")
            rows = rgb[0]
        else:
            if not isinstance(node, h5py.Dataset):
                raise DataError(f"{where}: a {self.source} story must be a dataset [n, dim_text]")
            _dataset(node, where, expected="numbers (features)")
            if node.ndim != 2 or node.shape[1] != self.dim_text:
                raise DataError(
                    f"{where} has shape {node.shape}, expected [n, {self.dim_text}] (--dim_text)"
                )
            rows = node.shape[0]
        if rows == 0:
            raise DataError(f"{where}: the story is empty (0 elements)")
        return rows

    def _check_qa_file(self, movie: str) -> int:
        """Check a QA file's datasets (shapes, dtypes, cor_idx values); its question count."""
        path = self._qa_path(movie)
        with _open(path) as f, _reading(path):
            needed = ("query_rep", "answer_rep") + (("cor_idx",) if self.require_answers else ())
            for key in needed:
                if key not in f:
                    raise DataError(f"{path}: missing dataset {key!r}")
            features = "numbers (features)"
            for key in QA_DATASETS:  # links and storage outside the data directory: refused
                if key in f:
                    check_node(f, key, f"{path}:{key}", self.data_dir)
            q = _dataset(f["query_rep"], f"{path}:query_rep", expected=features).shape
            a = _dataset(f["answer_rep"], f"{path}:answer_rep", expected=features).shape
            if len(q) != 2 or q[1] != self.dim_text:
                raise DataError(
                    f"{path}:query_rep has shape {q}, expected [q, {self.dim_text}] (--dim_text)"
                )
            if q[0] == 0:
                # random_batch would draw this movie and fail on an empty batch.
                raise DataError(f"{path}:query_rep holds no questions")
            if a != (q[0], self.num_answer, self.dim_text):
                raise DataError(
                    f"{path}:answer_rep has shape {a}, expected "
                    f"[{q[0]}, {self.num_answer}, {self.dim_text}] (--num_answer, --dim_text)"
                )
            if "cor_idx" in f:
                # Read whole (q integers): a float or out-of-range answer index is refused
                # now, not truncated or found when a batch first draws this movie.
                cor = _dataset(f["cor_idx"], f"{path}:cor_idx", "iu", "integers (answer indices)")
                if cor.shape != (q[0],):
                    raise DataError(f"{path}:cor_idx has shape {cor.shape}, expected [{q[0]}]")
                values = np.asarray(cor[()])
                if values.min() < 0 or values.max() >= self.num_answer:
                    raise DataError(
                        f"{path}:cor_idx holds values outside [0, {self.num_answer}) "
                        f"(min {values.min()}, max {values.max()}; --num_answer)"
                    )
            if "qid" in f:
                qid = f["qid"]
                if not isinstance(qid, h5py.Dataset) or qid.shape != (q[0],):
                    shape = getattr(qid, "shape", type(qid).__name__)
                    raise DataError(f"{path}:qid has shape {shape}, expected [{q[0]}]")
            return q[0]

    @staticmethod
    def _finite(array: np.ndarray, where: str) -> np.ndarray:
        if not np.isfinite(array).all():
            raise DataError(f"{where}: holds NaN or inf values")
        return array

    # ----------------------------------------------------------------------------------
    @property
    def num_questions(self) -> int:
        return sum(self.counts)

    def __len__(self) -> int:
        return self.num_questions

    def story(self, movie: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The movie's story, read from disk now."""
        where = f"{self.story_path}:{movie}"
        with _reading(where):
            if self._story_file is None:
                self._story_file = StoryFile(self.story_path, self.data_dir)
            node = self._story_file.value(movie)
            if self.video:
                rgb = self._finite(np.asarray(node["rgb"], dtype=np.float32), f"{where}/rgb")
                sub = self._finite(np.asarray(node["sub"], dtype=np.float32), f"{where}/sub")
                return torch.from_numpy(rgb), torch.from_numpy(sub)
            return torch.from_numpy(self._finite(np.asarray(node, dtype=np.float32), where))

    def batch(self, movie_index: int, rows: np.ndarray) -> QABatch:
        """Questions ``rows`` (sorted indices) of movie number ``movie_index``."""
        movie = self.movies[movie_index]
        path = self._qa_path(movie)
        with _open(path) as f, _reading(path):
            query = self._finite(np.asarray(f["query_rep"][rows], np.float32), f"{path}:query_rep")
            answers = self._finite(
                np.asarray(f["answer_rep"][rows], np.float32), f"{path}:answer_rep"
            )
            target = None
            if "cor_idx" in f:  # integers in range: checked at construction
                target = np.asarray(f["cor_idx"][rows]).astype(np.int64)
            if "qid" in f:
                qids = [_decode(q) for q in f["qid"][rows]]
            else:
                qids = [f"{movie}:{i}" for i in rows]
        return QABatch(
            movie,
            self.story(movie),
            torch.from_numpy(query),
            torch.from_numpy(answers),
            None if target is None else torch.from_numpy(target),
            qids,
        )

    def decode_movie(self, index: int) -> MovieArrays:
        """Movie number ``index`` read whole: its story and every question, as float32,
        checked for NaN and inf (a DataError names the file and dataset)."""
        movie = self.movies[index]
        story = self.story(movie)
        path = self._qa_path(movie)
        with _open(path) as f, _reading(path):
            query = self._finite(np.asarray(f["query_rep"], np.float32), f"{path}:query_rep")
            answers = self._finite(np.asarray(f["answer_rep"], np.float32), f"{path}:answer_rep")
            target = np.asarray(f["cor_idx"]).astype(np.int64) if "cor_idx" in f else None
            rows = range(self.counts[index])
            qids = [_decode(q) for q in f["qid"]] if "qid" in f else [f"{movie}:{i}" for i in rows]
        stories = tuple(s.numpy() for s in story) if isinstance(story, tuple) else (story.numpy(),)
        return MovieArrays(stories, query, answers, target, qids)

    def random_batch(self, rng: np.random.Generator, batch_size: int) -> QABatch:
        """Up to batch_size random questions about one random movie, as the release did."""
        return self.batch(*draw(rng, self.counts, batch_size))

    def iter_batches(
        self, batch_size: int, movies: Iterable[int] | None = None
    ) -> Iterator[QABatch]:
        """Every question once, in order, in batches of up to batch_size about one movie;
        ``movies``: only these movie indices (a rank's share of a sharded validation)."""
        for index in range(len(self.counts)) if movies is None else movies:
            count = self.counts[index]
            for start in range(0, count, batch_size):
                yield self.batch(index, np.arange(start, min(start + batch_size, count)))

    def close(self) -> None:
        # getattr: __del__ runs this on an instance whose __init__ raised before the
        # attribute was set (e.g. a missing --data_dir).
        if getattr(self, "_story_file", None) is not None:
            self._story_file.close()
            self._story_file = None

    def __del__(self) -> None:
        self.close()
