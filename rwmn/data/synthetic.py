"""Synthetic MovieQA-style data in the release's layout, with a signal only memory solves.

Each movie is a sequence of scenes of ``scene_len`` story elements. Scene s has a random
key k_s and value v_s living in disjoint coordinate blocks; every element of the scene is
[k_s + noise, v_s + noise, noise]. A question about scene s carries only its key,
[k_s + noise, noise, noise]; the five candidates carry only values, [noise, v + noise,
noise]: the correct one v_s, the distractors values that appear nowhere in the story (the
default, ``distractors="outside"``) or the values of other scenes of the same movie
(``distractors="story"``). Question and candidates share no information, so a model that
does not read the right story stays at chance (1 / num_answer); a model that finds the
scene by its key in memory and reads its value answers it. The scenes span about as many
elements as the default write layer's stride (40-30-3), so the signal survives the write
network's pooling.

For video_sub the subtitle vector of an element is the text element above and its rgb
vector is a dataset-wide constant direction plus a noisy projection of the value, so CBP
of the two keeps the key and the value.

    python -m rwmn.data.synthetic --out DIR --source sub

May import: h5py, numpy, rwmn.cli, rwmn.config.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import h5py
import numpy as np

from rwmn.cli import HelpFormatter, OneLineParser
from rwmn.config import DATA_SOURCES

#: Version of the generator's output; part of the default cache directory's name.
VERSION = 1
DISTRACTORS = ("story", "outside")


@dataclass(frozen=True)
class SyntheticConfig:
    source: str = "sub"
    train_movies: int = 48
    val_movies: int = 12
    test_movies: int = 12
    questions_per_movie: int = 40
    min_scenes: int = 6
    max_scenes: int = 8
    scene_len: int = 30
    dim_text: int = 300
    dim_rgb: int = 2048
    dim_sub: int = 300
    num_answer: int = 5
    noise: float = 0.3
    #: "story": distractors are other scenes' values of the same movie (only the key finds
    #: the answer); "outside": distractors appear nowhere in the story (reading it suffices).
    distractors: str = "outside"
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse what would make unusable data; each error names its flag."""
        if self.source not in DATA_SOURCES:
            raise ValueError(f"--source {self.source!r}: expected one of {DATA_SOURCES}")
        if self.distractors not in DISTRACTORS:
            raise ValueError(f"--distractors {self.distractors!r}: expected one of {DISTRACTORS}")
        for name, low in (("train_movies", 1), ("val_movies", 1), ("test_movies", 1),
                          ("questions_per_movie", 1), ("scene_len", 1), ("dim_rgb", 1),
                          ("num_answer", 2), ("min_scenes", 2), ("seed", 0)):  # fmt: skip
            value = getattr(self, name)
            if value < low:
                raise ValueError(f"--{name} must be at least {low}, got {value}")
        if self.max_scenes < self.min_scenes:
            raise ValueError(
                f"--max_scenes {self.max_scenes} is below --min_scenes {self.min_scenes}"
            )
        if self.dim_text < 6:
            raise ValueError(f"--dim_text must be at least 6, got {self.dim_text}")
        if self.source == "video_sub" and self.dim_sub < 6:
            raise ValueError(f"--dim_sub must be at least 6, got {self.dim_sub}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"--noise must be a finite number >= 0, got {self.noise}")


def _blocks(dim: int) -> tuple[slice, slice, slice]:
    third = dim // 3
    return slice(0, third), slice(third, 2 * third), slice(2 * third, dim)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class _Generator:
    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.video = cfg.source == "video_sub"
        self.story_dim = cfg.dim_sub if self.video else cfg.dim_text
        if self.video:
            self.rgb_bias = _unit(self.rng.standard_normal(cfg.dim_rgb))
            self.rgb_value = self.rng.standard_normal((cfg.dim_rgb, cfg.dim_sub)) / np.sqrt(
                cfg.dim_sub
            )

    def _noise(self, *shape: int) -> np.ndarray:
        return self.cfg.noise * self.rng.standard_normal(shape) / np.sqrt(shape[-1] / 3)

    def movie(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        cfg, rng = self.cfg, self.rng
        key_b, val_b, _ = _blocks(self.story_dim)
        scenes = int(rng.integers(cfg.min_scenes, cfg.max_scenes + 1))
        keys = _unit(rng.standard_normal((scenes, key_b.stop - key_b.start)))
        values = _unit(rng.standard_normal((scenes, val_b.stop - val_b.start)))
        n = scenes * cfg.scene_len
        scene_of = np.repeat(np.arange(scenes), cfg.scene_len)
        text = self._noise(n, self.story_dim)
        text[:, key_b] += keys[scene_of]
        text[:, val_b] += values[scene_of]
        if self.video:
            rgb = self.rgb_bias + 0.2 * text @ self.rgb_value.T + self._noise(n, cfg.dim_rgb)
            story = {"rgb": rgb.astype(np.float32), "sub": text.astype(np.float32)}
        else:
            story = {"story": text.astype(np.float32)}

        q = cfg.questions_per_movie
        qk_b, qv_b, _ = _blocks(cfg.dim_text)
        asked = rng.integers(scenes, size=q)
        query = self._noise(q, cfg.dim_text)
        # Questions and answers live in dim_text; the story's key/value blocks are copied
        # into the same coordinates (dim_text == dim_sub by default).
        width = min(qk_b.stop - qk_b.start, keys.shape[1])
        query[:, qk_b.start : qk_b.start + width] += keys[asked, :width]
        answers = self._noise(q, cfg.num_answer, cfg.dim_text)
        correct = rng.integers(cfg.num_answer, size=q)
        vwidth = min(qv_b.stop - qv_b.start, values.shape[1])
        for i in range(q):
            others = rng.permutation(np.delete(np.arange(scenes), asked[i]))
            pool = list(others[: cfg.num_answer - 1]) if cfg.distractors == "story" else []
            while len(pool) < cfg.num_answer - 1:  # fewer scenes than candidates
                pool.append(-1)
            slots = [j for j in range(cfg.num_answer) if j != correct[i]]
            choice = dict(zip(slots, pool, strict=True))
            choice[correct[i]] = asked[i]
            for j, scene in choice.items():
                value = values[scene] if scene >= 0 else _unit(rng.standard_normal(values.shape[1]))
                answers[i, j, qv_b.start : qv_b.start + vwidth] += value[:vwidth]
        qa = {
            "query_rep": query.astype(np.float32),
            "answer_rep": answers.astype(np.float32),
            "cor_idx": correct.astype(np.int64),
        }
        return story, qa


def generate(out_dir: str | os.PathLike, cfg: SyntheticConfig) -> str:
    """Write ``<out_dir>/<source>/`` (story.h5 and train/val/test) and return its path.

    The directory is written under a temporary name and renamed into place, so an
    interrupted run never leaves a half-written data set behind.
    """
    out_dir = os.fspath(out_dir)
    target = os.path.join(out_dir, cfg.source)
    if os.path.exists(target):
        raise FileExistsError(f"{target} already exists; remove it or choose another --out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"--out {out_dir!r} is a file, not a directory")
    created = _missing_ancestors(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=f".{cfg.source}-", dir=out_dir)
        gen = _Generator(cfg)
        movie_id = 0
        with h5py.File(os.path.join(tmp, "story.h5"), "w") as story_file:
            for split, count in (
                ("train", cfg.train_movies),
                ("val", cfg.val_movies),
                ("test", cfg.test_movies),
            ):
                os.makedirs(os.path.join(tmp, split))
                for _ in range(count):
                    movie = f"tt{movie_id:07d}"
                    movie_id += 1
                    story, qa = gen.movie()
                    if gen.video:
                        group = story_file.create_group(movie)
                        group["rgb"], group["sub"] = story["rgb"], story["sub"]
                    else:
                        story_file[movie] = story["story"]
                    with h5py.File(os.path.join(tmp, split, f"{movie}.h5"), "w") as f:
                        for key, value in qa.items():
                            f[key] = value
                        q = len(qa["cor_idx"])
                        f["qid"] = np.array([f"{movie}:{i}".encode() for i in range(q)])
        with open(os.path.join(tmp, "synthetic.txt"), "w") as f:
            f.write(f"rwmn.data.synthetic version {VERSION}\n{dataclasses.asdict(cfg)}\n")
        try:
            os.replace(tmp, target)
        except OSError as exc:  # another process renamed its copy into place first
            if os.path.isdir(target):
                raise FileExistsError(f"{target} already exists") from exc
            raise
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for path in created:  # the directories this call created, deepest first, if empty
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise
    return target


def _missing_ancestors(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def default_cache_dir(source: str) -> str:
    """Where train.py keeps its default synthetic data set ($RWMN_CACHE or ~/.cache/rwmn)."""
    root = os.environ.get("RWMN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rwmn")
    return os.path.join(root, f"synthetic-v{VERSION}")


def ensure_default(source: str) -> str:
    """The default synthetic data directory for ``source``, generated on first use."""
    data_dir = default_cache_dir(source)
    if not os.path.isdir(os.path.join(data_dir, source)):
        print(f"generating the default synthetic {source} data set in {data_dir} (once)")
        # FileExistsError: another process generated it meanwhile.
        with contextlib.suppress(FileExistsError):
            generate(data_dir, SyntheticConfig(source=source))
    return data_dir


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m rwmn.data.synthetic",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, default=argparse.SUPPRESS,
        help="data directory to write <out>/<source>/ into (the --data_dir of train.py)",
    )  # fmt: skip
    defaults = SyntheticConfig()
    helps = {
        "source": "data source to write: a text source or video_sub",
        "train_movies": "movies in the train split (at least 1)",
        "val_movies": "movies in the val split (at least 1)",
        "test_movies": "movies in the test split (at least 1)",
        "questions_per_movie": "questions per movie (at least 1)",
        "min_scenes": "fewest scenes per movie (at least 2)",
        "max_scenes": "most scenes per movie (at least --min_scenes)",
        "scene_len": "story elements per scene (at least 1)",
        "dim_text": "text feature dimension: questions, answers, text stories (at least 6)",
        "dim_rgb": "video_sub: rgb feature dimension (at least 1)",
        "dim_sub": "video_sub: subtitle feature dimension (at least 6)",
        "num_answer": "answer candidates per question (at least 2)",
        "noise": "noise scale added to every vector (finite, >= 0)",
        "distractors": "story: wrong candidates are other scenes' values of the movie (only "
        "the key finds the answer); outside: they appear nowhere in the story",
        "seed": "numpy seed of the generator (>= 0)",
    }
    choices = {"source": DATA_SOURCES, "distractors": DISTRACTORS}
    for field in dataclasses.fields(SyntheticConfig):
        parser.add_argument(
            f"--{field.name}",
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
            choices=choices.get(field.name),
            help=helps[field.name],
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    try:
        path = generate(out, SyntheticConfig(**args))
    except (ValueError, OSError) as exc:  # FileExistsError, NotADirectoryError, ...
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
