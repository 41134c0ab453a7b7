"""Data: the release's HDF5 layout reader (rwmn/data/movieqa.py) and the synthetic
generator (rwmn/data/synthetic.py): round trips, hand-written release files, every
malformed-input error, the CLI, and the property that makes the synthetic task a memory
task (the question shares nothing with the candidates; the story links them)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from rwmn.data import DataError, MovieQAData
from rwmn.data.synthetic import SyntheticConfig, generate

REPO = Path(__file__).resolve().parents[1]
DIMS = dict(dim_text=12, dim_rgb=16, dim_sub=12)
TINY = dict(
    train_movies=3,
    val_movies=2,
    test_movies=1,
    questions_per_movie=7,
    min_scenes=2,
    max_scenes=3,
    scene_len=4,
    **DIMS,
)
NUM_ANSWER = 5


@pytest.fixture(scope="module", params=["sub", "video_sub"])
def generated(request, tmp_path_factory):
    cfg = SyntheticConfig(source=request.param, **TINY)
    out = tmp_path_factory.mktemp(f"synthetic-{request.param}")
    path = generate(out, cfg)
    return out, cfg, path


def read(data_dir, source="sub", split="train", **kwargs):
    return MovieQAData(data_dir, source, split, **{**DIMS, **kwargs})


# --------------------------------------------------------------------------------------
# Round trip of the generator's output
# --------------------------------------------------------------------------------------


def test_round_trip(generated):
    out, cfg, path = generated
    assert path == os.path.join(out, cfg.source)
    assert sorted(os.listdir(path)) == ["story.h5", "synthetic.txt", "test", "train", "val"]
    all_movies = []
    for split, count in (("train", 3), ("val", 2), ("test", 1)):
        data = read(out, cfg.source, split)
        assert len(data.movies) == count
        assert data.movies == sorted(f[:-3] for f in os.listdir(os.path.join(path, split)))
        assert data.counts == [cfg.questions_per_movie] * count
        assert len(data) == data.num_questions == count * cfg.questions_per_movie
        all_movies += data.movies
        with h5py.File(os.path.join(path, "story.h5"), "r") as f:
            for movie in data.movies:
                story = data.story(movie)
                if cfg.source == "video_sub":
                    rgb, sub = story
                    n = rgb.shape[0]
                    assert rgb.shape == (n, cfg.dim_rgb) and sub.shape == (n, cfg.dim_sub)
                    np.testing.assert_array_equal(rgb.numpy(), f[movie]["rgb"][()])
                    np.testing.assert_array_equal(sub.numpy(), f[movie]["sub"][()])
                else:
                    n = story.shape[0]
                    assert story.shape == (n, cfg.dim_text) and story.dtype == torch.float32
                    np.testing.assert_array_equal(story.numpy(), f[movie][()])
                assert n % cfg.scene_len == 0
                assert cfg.min_scenes <= n // cfg.scene_len <= cfg.max_scenes
        data.close()
    assert len(set(all_movies)) == len(all_movies), "a movie appears in two splits"


def test_random_batch(generated):
    out, cfg, _ = generated
    data = read(out, cfg.source)
    rng = np.random.default_rng(0)
    seen_movies = set()
    for batch_size in (1, 4, 7, 32):
        for _ in range(4):
            batch = data.random_batch(rng, batch_size)
            size = min(batch_size, cfg.questions_per_movie)
            assert batch.movie in data.movies
            seen_movies.add(batch.movie)
            assert batch.query.shape == (size, cfg.dim_text)
            assert batch.answers.shape == (size, NUM_ANSWER, cfg.dim_text)
            assert batch.target.shape == (size,) and batch.target.dtype == torch.int64
            assert ((batch.target >= 0) & (batch.target < NUM_ANSWER)).all()
            assert all(isinstance(q, str) for q in batch.qids)
            assert all(q.startswith(f"{batch.movie}:") for q in batch.qids), batch.qids
            assert len(set(batch.qids)) == size, "a question drawn twice in one batch"
            story = batch.story if cfg.source == "video_sub" else (batch.story,)
            assert all(torch.isfinite(s).all() for s in story)
            moved = batch.to("cpu")
            assert moved.qids == batch.qids and torch.equal(moved.query, batch.query)
    assert len(seen_movies) > 1
    data.close()


@pytest.mark.parametrize("batch_size", [1, 3, 7, 100])
def test_iter_batches_covers_every_question_once(generated, batch_size):
    out, cfg, _ = generated
    data = read(out, cfg.source, "val")
    qids = []
    for batch in data.iter_batches(batch_size):
        assert 1 <= len(batch.qids) <= batch_size
        assert all(q.startswith(f"{batch.movie}:") for q in batch.qids)
        assert batch.query.shape[0] == batch.answers.shape[0] == batch.target.shape[0]
        qids += batch.qids
    expected = [f"{m}:{i}" for m in data.movies for i in range(cfg.questions_per_movie)]
    assert qids == expected
    data.close()


def test_generate_refuses_to_overwrite(generated):
    out, cfg, path = generated
    before = sorted(os.listdir(path))
    with pytest.raises(FileExistsError, match="already exists"):
        generate(out, cfg)
    assert sorted(os.listdir(path)) == before
    assert not [f for f in os.listdir(out) if f.startswith(".")], "temporary directory left"


def test_synthetic_config_errors():
    with pytest.raises(ValueError, match="--source 'movies'"):
        SyntheticConfig(source="movies")
    with pytest.raises(ValueError, match="min_scenes"):
        SyntheticConfig(min_scenes=3, max_scenes=2)
    with pytest.raises(ValueError, match="at least 6"):
        SyntheticConfig(dim_text=4)


@pytest.mark.parametrize(
    "flags",
    [
        ["--train_movies", "0"], ["--val_movies", "0"], ["--test_movies", "0"],
        ["--scene_len", "0"], ["--questions_per_movie", "0"], ["--distractors", "bogus"],
        ["--dim_rgb", "0", "--source", "video_sub"], ["--num_answer", "1"],
        ["--min_scenes", "1"], ["--max_scenes", "3", "--min_scenes", "4"],
        ["--noise", "nan"], ["--noise", "-1"], ["--seed", "-1"], ["--dim_text", "5"],
        ["--source", "movies"], ["--train_movies", "x"],
    ],
    ids=" ".join,
)  # fmt: skip
def test_synthetic_cli_refuses_unusable_data(tmp_path, capsys, flags):
    """Every flag is validated, the error names it on one line (exit 2),
    and the --out directory it would have created is not left behind."""
    from rwmn.data.synthetic import main as synthetic_main

    out = tmp_path / "new" / "data"
    try:
        status = synthetic_main(["--out", str(out), *flags])
    except SystemExit as exc:  # argparse's own errors (a choice, a type)
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2
    assert flags[0] in err or (flags[0] == "--max_scenes" and "--min_scenes" in err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "new").exists()


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    """A generator that fails half-way removes what it created."""
    from rwmn.data import synthetic

    def broken(self):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic._Generator, "movie", broken)
    out = tmp_path / "a" / "b"
    with pytest.raises(OSError, match="disk full"):
        generate(out, SyntheticConfig(**TINY))
    assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()  # a directory that existed before is kept, emptied
    with pytest.raises(OSError, match="disk full"):
        generate(tmp_path / "kept", SyntheticConfig(**TINY))
    assert os.listdir(tmp_path / "kept") == []


def test_cli(tmp_path):
    args = [sys.executable, "-m", "rwmn.data.synthetic", "--out", str(tmp_path), "--source"]
    args += ["sub", "--train_movies", "2", "--val_movies", "1", "--test_movies", "1"]
    args += ["--questions_per_movie", "3", "--dim_text", "12", "--scene_len", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'sub'}" in done.stdout
    data = read(tmp_path, "sub", "train")
    assert len(data.movies) == 2 and data.counts == [3, 3]
    data.close()
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exists" in again.stderr


# --------------------------------------------------------------------------------------
# Files written by hand in the release layout
# --------------------------------------------------------------------------------------

MOVIES = ("tt0000001", "tt0000002")


def write_release(
    root: Path,
    source: str = "sub",
    split: str = "train",
    n: int = 6,
    q: int = 4,
    seed: int = 0,
) -> Path:
    """<root>/<source>/story.h5 and <root>/<source>/<split>/<movie>.h5, as the release
    laid them out, with per-question video/subtitle datasets the reader must ignore."""
    rng = np.random.default_rng(seed)
    src = root / source
    (src / split).mkdir(parents=True)
    with h5py.File(src / "story.h5", "w") as f:
        for movie in MOVIES:
            if source == "video_sub":
                group = f.create_group(movie)
                group["rgb"] = rng.standard_normal((n, DIMS["dim_rgb"])).astype(np.float32)
                group["sub"] = rng.standard_normal((n, DIMS["dim_sub"])).astype(np.float32)
            else:
                f[movie] = rng.standard_normal((n, DIMS["dim_text"])).astype(np.float32)
    for movie in MOVIES:
        with h5py.File(src / split / f"{movie}.h5", "w") as f:
            f["query_rep"] = rng.standard_normal((q, DIMS["dim_text"])).astype(np.float32)
            f["answer_rep"] = rng.standard_normal((q, NUM_ANSWER, DIMS["dim_text"]))
            f["cor_idx"] = rng.integers(NUM_ANSWER, size=q)
            f["qid"] = np.array([f"{movie}:{i:03d}".encode() for i in range(q)])
            # Ignored by the release (and by us): odd shapes and dtypes on purpose.
            f["video_feature"] = rng.standard_normal((q + 1, 3, 7))
            f["subtt_rep"] = np.array([b"not a vector"])
    return root


def edit_qa(root: Path, movie=MOVIES[0], source="sub", split="train"):
    return h5py.File(root / source / split / f"{movie}.h5", "a")


def edit_story(root: Path, source="sub"):
    return h5py.File(root / source / "story.h5", "a")


@pytest.mark.parametrize("source", ["sub", "video_sub"])
def test_hand_written_release_layout(tmp_path, source):
    root = write_release(tmp_path, source)
    data = read(root, source)
    assert data.movies == list(MOVIES) and data.counts == [4, 4]
    batch = data.batch(1, np.array([0, 2]))
    assert batch.movie == MOVIES[1]
    assert batch.qids == [f"{MOVIES[1]}:000", f"{MOVIES[1]}:002"]
    assert batch.answers.dtype == torch.float32  # stored as float64, read as float32
    with h5py.File(root / source / "train" / f"{MOVIES[1]}.h5", "r") as f:
        np.testing.assert_array_equal(batch.query.numpy(), f["query_rep"][[0, 2]])
        np.testing.assert_array_equal(batch.target.numpy(), f["cor_idx"][[0, 2]])
    if source == "video_sub":
        assert isinstance(batch.story, tuple) and [s.shape[1] for s in batch.story] == [16, 12]
    data.close()


def test_test_split_without_answers(tmp_path):
    root = write_release(tmp_path, split="test")
    for movie in MOVIES:
        with edit_qa(root, movie, split="test") as f:
            del f["cor_idx"], f["qid"]
    data = read(root, split="test")
    batch = data.batch(0, np.arange(4))
    assert batch.target is None
    assert batch.qids == [f"{MOVIES[0]}:{i}" for i in range(4)]
    data.close()


def test_failed_construction_raises_nothing_more(tmp_path, monkeypatch):
    """A reader whose __init__ raised must not raise again when it is collected."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(DataError):
        read(tmp_path / "missing")
    gc.collect()
    assert not unraisable, [u.exc_value for u in unraisable]


# --------------------------------------------------------------------------------------
# Malformed data: each a DataError naming the file, dataset or flag
# --------------------------------------------------------------------------------------


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match=r"--data_dir '.*nowhere' does not exist"):
        read(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"data source directory .* \(--data_source sub\)"):
        read(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=r"story file '.*story\.h5' does not exist"):
        read(tmp_path)
    h5py.File(tmp_path / "sub" / "story.h5", "w").close()
    with pytest.raises(DataError, match=r"split directory '.*train' does not exist"):
        read(tmp_path)
    (tmp_path / "sub" / "train").mkdir()
    (tmp_path / "sub" / "train" / "notes.txt").write_text("not a movie")
    with pytest.raises(DataError, match=r"'.*train' holds no <movie>\.h5 files"):
        read(tmp_path)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        read(tmp_path, split="dev")


@pytest.mark.parametrize("dataset", ["query_rep", "answer_rep", "cor_idx"])
def test_missing_qa_dataset(tmp_path, dataset):
    root = write_release(tmp_path)
    with edit_qa(root) as f:
        del f[dataset]
    with pytest.raises(DataError, match=rf"{MOVIES[0]}\.h5: missing dataset '{dataset}'"):
        read(root)


def test_cor_idx_required_for_val(tmp_path):
    root = write_release(tmp_path, split="val")
    with edit_qa(root, split="val") as f:
        del f["cor_idx"]
    with pytest.raises(DataError, match="missing dataset 'cor_idx'"):
        read(root, split="val")
    assert read(root, split="val", require_answers=False).counts == [4, 4]


@pytest.mark.parametrize(
    "source, kwargs, message",
    [
        (
            "sub",
            dict(dim_text=13),
            r"tt0000001 has shape \(6, 12\), expected \[n, 13\] \(--dim_text\)",
        ),
        ("video_sub", dict(dim_rgb=15), r"tt0000001/rgb has shape \(6, 16\).*\(--dim_rgb\)"),
        ("video_sub", dict(dim_sub=11), r"tt0000001/sub has shape \(6, 12\).*\(--dim_sub\)"),
        ("sub", dict(num_answer=4), r"tt0000001\.h5:answer_rep has shape .*\(--num_answer"),
    ],
)
def test_dims_disagree_with_config(tmp_path, source, kwargs, message):
    root = write_release(tmp_path, source)
    with pytest.raises(DataError, match=message):
        read(root, source, **kwargs)


def test_query_dim_disagrees(tmp_path):
    root = write_release(tmp_path)
    with edit_qa(root, MOVIES[1]) as f:
        del f["query_rep"]
        f["query_rep"] = np.zeros((4, 11), np.float32)
    with pytest.raises(DataError, match=r"tt0000002\.h5:query_rep has shape \(4, 11\).*--dim_text"):
        read(root)


def test_qa_counts_disagree(tmp_path):
    root = write_release(tmp_path)
    with edit_qa(root) as f:
        del f["cor_idx"]
        f["cor_idx"] = np.zeros(3, np.int64)
    with pytest.raises(DataError, match=r"cor_idx has shape \(3,\), expected \[4\]"):
        read(root)


def test_video_story_rows_disagree(tmp_path):
    root = write_release(tmp_path, "video_sub")
    with edit_story(root, "video_sub") as f:
        del f[MOVIES[0]]["sub"]
        f[MOVIES[0]]["sub"] = np.zeros((5, 12), np.float32)
    with pytest.raises(DataError, match="rgb has 6 rows but sub has 5"):
        read(root, "video_sub")


def test_video_story_not_a_group(tmp_path):
    root = write_release(tmp_path, "sub")
    os.rename(root / "sub", root / "video_sub")
    with pytest.raises(DataError, match="must be a group with rgb and sub"):
        read(root, "video_sub")


def test_story_missing_a_movie(tmp_path):
    root = write_release(tmp_path)
    with edit_story(root) as f:
        del f[MOVIES[1]]
    with pytest.raises(DataError, match=r"story\.h5: no story for movie 'tt0000002' of train"):
        read(root)


def test_empty_story(tmp_path):
    root = write_release(tmp_path)
    with edit_story(root) as f:
        del f[MOVIES[0]]
        f[MOVIES[0]] = np.zeros((0, 12), np.float32)
    with pytest.raises(DataError, match=r"story\.h5:tt0000001: the story is empty"):
        read(root)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_story(tmp_path, bad):
    root = write_release(tmp_path)
    with edit_story(root) as f:
        f[MOVIES[1]][3, 5] = bad
    data = read(root)
    data.batch(0, np.arange(2))  # the other movie is fine
    with pytest.raises(DataError, match=r"story\.h5:tt0000002: holds NaN or inf"):
        data.batch(1, np.arange(2))
    data.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_video_story(tmp_path, bad):
    root = write_release(tmp_path, "video_sub")
    with edit_story(root, "video_sub") as f:
        f[MOVIES[0]]["rgb"][0, 0] = bad
    data = read(root, "video_sub")
    with pytest.raises(DataError, match=r"story\.h5:tt0000001/rgb: holds NaN or inf"):
        data.story(MOVIES[0])
    data.close()


@pytest.mark.parametrize("dataset", ["query_rep", "answer_rep"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_questions(tmp_path, dataset, bad):
    root = write_release(tmp_path)
    with edit_qa(root) as f:
        f[dataset][2] = bad
    data = read(root)
    data.batch(0, np.array([0, 1]))  # rows without the bad value read fine
    with pytest.raises(DataError, match=rf"tt0000001\.h5:{dataset}: holds NaN or inf"):
        data.batch(0, np.array([1, 2]))
    data.close()


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _as_strings(group, key: str) -> None:
    shape = group[key].shape
    del group[key]
    group[key] = np.full(shape, b"0.5")


def _truncated_story(root: Path) -> None:
    _truncate(root / "sub" / "story.h5")


def _random_bytes_qa(root: Path) -> None:
    (root / "sub" / "train" / f"{MOVIES[1]}.h5").write_bytes(os.urandom(2048))


def _truncated_qa(root: Path) -> None:
    _truncate(root / "sub" / "train" / f"{MOVIES[1]}.h5", 0.9)


def _story_strings(root: Path) -> None:
    with edit_story(root) as f:
        _as_strings(f, MOVIES[1])


def _query_strings(root: Path) -> None:
    with edit_qa(root, MOVIES[1]) as f:
        _as_strings(f, "query_rep")


def _answers_group(root: Path) -> None:
    with edit_qa(root) as f:
        del f["answer_rep"]
        f.create_group("answer_rep")


#: How a file is spoiled, and what the one-line message must say.
UNREADABLE = {
    "truncated story.h5": (_truncated_story, r"story\.h5: cannot be read \(.*truncated"),
    "QA file of random bytes": (_random_bytes_qa, rf"{MOVIES[1]}\.h5: cannot be read"),
    "truncated QA file": (_truncated_qa, rf"{MOVIES[1]}\.h5: cannot be read"),
    "story as strings": (_story_strings, rf"story\.h5:{MOVIES[1]} has dtype \|S3, expected num"),
    "query_rep as strings": (_query_strings, rf"{MOVIES[1]}\.h5:query_rep has dtype \|S3"),
    "answer_rep a group": (_answers_group, rf"{MOVIES[0]}\.h5:answer_rep is a Group, expected"),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_unreadable_files(tmp_path, case):
    """A file h5py cannot open, or whose data cannot be read as numbers,
    is a one-line DataError naming the file (and dataset), raised when the reader is built
    (train.py turns it into exit status 2: tests/test_hardening.py)."""
    root = write_release(tmp_path)
    spoil, message = UNREADABLE[case]
    spoil(root)
    with pytest.raises(DataError, match=message) as caught:
        read(root)
    assert "\n" not in str(caught.value)


def test_unreadable_video_story(tmp_path):
    root = write_release(tmp_path, "video_sub")
    with edit_story(root, "video_sub") as f:
        _as_strings(f[MOVIES[0]], "rgb")
    with pytest.raises(DataError, match=rf"story\.h5:{MOVIES[0]}/rgb has dtype \|S3"):
        read(root, "video_sub")


@pytest.mark.parametrize("value", [-1, NUM_ANSWER])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cor_idx_out_of_range(tmp_path, value, split):
    """Refused when the reader is built (every file up front), not when a
    batch first draws that movie; in the test split too, where cor_idx is optional."""
    root = write_release(tmp_path, split=split)
    with edit_qa(root, MOVIES[1], split=split) as f:
        f["cor_idx"][1] = value
    with pytest.raises(DataError, match=r"tt0000002\.h5:cor_idx holds values outside \[0, 5\)"):
        read(root, split=split)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, bool])
def test_cor_idx_not_integers(tmp_path, dtype):
    """A float cor_idx was truncated silently (1.7 read as 1)."""
    root = write_release(tmp_path)
    with edit_qa(root, MOVIES[1]) as f:
        values = f["cor_idx"][()]
        del f["cor_idx"]
        f["cor_idx"] = (values + 0.7).astype(dtype) if dtype is not bool else values > 1
    with pytest.raises(DataError, match=r"tt0000002\.h5:cor_idx has dtype .*expected integers"):
        read(root)


# --------------------------------------------------------------------------------------
# The synthetic signal
# --------------------------------------------------------------------------------------

SIGNAL = dict(
    train_movies=6,
    val_movies=1,
    test_movies=1,
    questions_per_movie=20,
    scene_len=6,
    dim_text=60,
)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("distractors", ["outside", "story"])
def test_synthetic_signal_needs_the_story(tmp_path, distractors):
    """Question and candidates share nothing (blind cosine ranking is at chance); the
    correct candidate is in its own movie's story and not in another movie's; reading the
    story where the question's key points (an oracle two-step lookup) answers it."""
    cfg = SyntheticConfig(source="sub", distractors=distractors, **SIGNAL)
    generate(tmp_path, cfg)
    data = read(tmp_path, dim_text=cfg.dim_text)
    stories = [unit(data.story(m).numpy()) for m in data.movies]
    cos_correct, cos_wrong, own, other, wrong_in_story, oracle, blind = ([] for _ in range(7))
    for index, movie in enumerate(data.movies):
        batch = data.batch(index, np.arange(data.counts[index]))
        q, a, t = unit(batch.query.numpy()), unit(batch.answers.numpy()), batch.target.numpy()
        correct = np.eye(cfg.num_answer, dtype=bool)[t]
        cos = np.einsum("bad,bd->ba", a, q)
        cos_correct += list(np.abs(cos[correct]))
        cos_wrong += list(np.abs(cos[~correct]))
        blind += list(cos.argmax(1) == t)
        story, elsewhere = stories[index], stories[(index + 1) % len(stories)]
        answer = a[correct]
        own += list((answer @ story.T).max(1))
        other += list((answer @ elsewhere.T).max(1))
        wrong_in_story += list((a[~correct] @ story.T).max(1))
        found = story[(q @ story.T).argmax(1)]  # the element the question's key matches
        oracle += list(np.einsum("bad,bd->ba", a, found).argmax(1) == t)
        assert batch.movie == movie

    chance = 1 / cfg.num_answer
    assert abs(np.mean(cos_correct) - np.mean(cos_wrong)) < 0.03
    assert np.mean(cos_correct) < 0.15
    assert np.mean(blind) < chance + 0.2, f"blind accuracy {np.mean(blind):.2f}"
    assert np.mean(own) > 0.5 and np.mean(other) < 0.35
    assert np.mean(np.array(own) > np.array(other)) > 0.95
    assert np.mean(oracle) > 0.9, f"oracle accuracy {np.mean(oracle):.2f}"
    if distractors == "outside":
        assert np.mean(wrong_in_story) < 0.35  # only the correct candidate is in the story
    else:
        assert np.mean(wrong_in_story) > 0.5  # distractors are in the story: need the key
    data.close()


def test_movie_without_questions(tmp_path):
    """random_batch would pick such a movie and fail on an empty batch: refused up front."""
    root = write_release(tmp_path)
    with edit_qa(root) as f:
        for key in ("query_rep", "answer_rep", "cor_idx", "qid"):
            value = f[key][()]
            del f[key]
            f[key] = value[:0]
    with pytest.raises(DataError, match=r"tt0000001\.h5:query_rep holds no questions"):
        read(root)
