"""Reader of the released MovieQA features (SPEC section 7), streaming with h5py.

    <data_dir>/<source>/story.h5               text: dataset per movie [n, dim_text]
                                               video_sub: group per movie, rgb and sub
    <data_dir>/<source>/<split>/<movie>.h5     query_rep, answer_rep, cor_idx, qid

Only shapes are read at construction; a movie's story and questions are read when a batch
needs them. Every array is checked (shape, dtype, NaN/inf, emptiness) as it is read, and
errors name the file and dataset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import h5py
import numpy as np
import torch

SPLITS = ("train", "val", "test")
QA_DATASETS = ("query_rep", "answer_rep", "cor_idx", "qid")
# The release's QA files also hold per-question video/subtitle datasets that it ignored.
IGNORED_MARKERS = ("video", "subtt")


class DataError(ValueError):
    """The data on disk does not match the layout or the configuration."""


@dataclass
class QABatch:
    """Up to batch_size questions about one movie, as tensors."""

    movie: str
    story: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    query: torch.Tensor  # [B, dim_text]
    answers: torch.Tensor  # [B, A, dim_text]
    target: torch.Tensor | None  # [B] int64, None where cor_idx is absent (test)
    qids: list[str]

    def to(self, device: torch.device | str) -> QABatch:
        story = (
            tuple(s.to(device) for s in self.story)
            if isinstance(self.story, tuple)
            else self.story.to(device)
        )
        target = None if self.target is None else self.target.to(device)
        return QABatch(
            self.movie, story, self.query.to(device), self.answers.to(device), target, self.qids
        )


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
        if not os.path.isdir(os.fspath(data_dir)):
            raise DataError(f"--data_dir {os.fspath(data_dir)!r} does not exist")
        if not os.path.isdir(root):
            raise DataError(
                f"data source directory {root!r} does not exist (--data_source {source})"
            )
        self.story_path = os.path.join(root, "story.h5")
        if not os.path.isfile(self.story_path):
            raise DataError(f"story file {self.story_path!r} does not exist")
        self.split_dir = os.path.join(root, split)
        if not os.path.isdir(self.split_dir):
            raise DataError(f"split directory {self.split_dir!r} does not exist")
        files = sorted(f for f in os.listdir(self.split_dir) if f.endswith(".h5"))
        if not files:
            raise DataError(f"split directory {self.split_dir!r} holds no <movie>.h5 files")
        self._story_file: h5py.File | None = None
        self.movies: list[str] = []
        self.counts: list[int] = []
        with h5py.File(self.story_path, "r") as story:
            for name in files:
                movie = name[: -len(".h5")]
                if movie not in story:
                    raise DataError(f"{self.story_path}: no story for movie {movie!r} of {split}")
                self._check_story_shapes(story[movie], movie)
                self.movies.append(movie)
                self.counts.append(self._check_qa_shapes(movie))

    # ----------------------------------------------------------------------------------
    def _qa_path(self, movie: str) -> str:
        return os.path.join(self.split_dir, f"{movie}.h5")

    def _check_story_shapes(self, node, movie: str) -> None:
        where = f"{self.story_path}:{movie}"
        if self.video:
            if not isinstance(node, h5py.Group) or "rgb" not in node or "sub" not in node:
                raise DataError(f"{where}: a video_sub story must be a group with rgb and sub")
            rgb, sub = node["rgb"].shape, node["sub"].shape
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
            if node.ndim != 2 or node.shape[1] != self.dim_text:
                raise DataError(
                    f"{where} has shape {node.shape}, expected [n, {self.dim_text}] (--dim_text)"
                )
            rows = node.shape[0]
        if rows == 0:
            raise DataError(f"{where}: the story is empty (0 elements)")

    def _check_qa_shapes(self, movie: str) -> int:
        path = self._qa_path(movie)
        with h5py.File(path, "r") as f:
            needed = ("query_rep", "answer_rep") + (("cor_idx",) if self.require_answers else ())
            for key in needed:
                if key not in f:
                    raise DataError(f"{path}: missing dataset {key!r}")
            q = f["query_rep"].shape
            a = f["answer_rep"].shape
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
            if "cor_idx" in f and self.require_answers and f["cor_idx"].shape != (q[0],):
                raise DataError(f"{path}:cor_idx has shape {f['cor_idx'].shape}, expected [{q[0]}]")
            if "qid" in f and f["qid"].shape != (q[0],):
                raise DataError(f"{path}:qid has shape {f['qid'].shape}, expected [{q[0]}]")
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
        if self._story_file is None:
            self._story_file = h5py.File(self.story_path, "r")
        node = self._story_file[movie]
        where = f"{self.story_path}:{movie}"
        if self.video:
            rgb = self._finite(np.asarray(node["rgb"], dtype=np.float32), f"{where}/rgb")
            sub = self._finite(np.asarray(node["sub"], dtype=np.float32), f"{where}/sub")
            return torch.from_numpy(rgb), torch.from_numpy(sub)
        return torch.from_numpy(self._finite(np.asarray(node, dtype=np.float32), where))

    def batch(self, movie_index: int, rows: np.ndarray) -> QABatch:
        """Questions ``rows`` (sorted indices) of movie number ``movie_index``."""
        movie = self.movies[movie_index]
        path = self._qa_path(movie)
        with h5py.File(path, "r") as f:
            query = self._finite(np.asarray(f["query_rep"][rows], np.float32), f"{path}:query_rep")
            answers = self._finite(
                np.asarray(f["answer_rep"][rows], np.float32), f"{path}:answer_rep"
            )
            target = None
            if "cor_idx" in f:
                target = np.asarray(f["cor_idx"][rows]).astype(np.int64)
                if target.min() < 0 or target.max() >= self.num_answer:
                    raise DataError(f"{path}:cor_idx holds values outside [0, {self.num_answer})")
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

    def random_batch(self, rng: np.random.Generator, batch_size: int) -> QABatch:
        """Up to batch_size random questions about one random movie, as the release did."""
        index = int(rng.integers(len(self.movies)))
        count = self.counts[index]
        rows = np.sort(rng.choice(count, size=min(batch_size, count), replace=False))
        return self.batch(index, rows)

    def iter_batches(self, batch_size: int) -> Iterator[QABatch]:
        """Every question once, in order, in batches of up to batch_size about one movie."""
        for index, count in enumerate(self.counts):
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
