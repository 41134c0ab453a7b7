"""The release's files as downloaded (rwmn/data/release.py): story.hkl in the hickle
layouts (hickle 5 written by the hickle package when it is installed, hickle 2 and 3, the
Python 2 era's, written by hand as their dump code laid them out), QA files with the
release's extra datasets and movie keys; a train and an eval run on them; and untrusted
content refused: pickles (not run), external links and virtual datasets leaving the data
directory, truncated and malformed files (one line, exit 2)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from rwmn.data import DataError, MovieQAData
from rwmn.data.release import StoryFile
from rwmn.training import main

# Real MovieQA movie keys (IMDb ids), as the release's QA files are named.
MOVIES = {"train": ("tt0109830", "tt0111161", "tt0068646"), "val": ("tt0120338", "tt0133093")}
DIM, RGB, Q, N, A = 12, 16, 5, 9, 5
MODEL_FLAGS = [
    "--dim_text", str(DIM), "--dim_memory", str(DIM), "--dim_sub", str(DIM),
    "--dim_rgb", str(RGB), "--dim_mcb", "20", "--write", "3-2-2", "--read", "3-1-2",
]  # fmt: skip
RUN_FLAGS = [*MODEL_FLAGS, "--batch_size", "4", "--validation_step", "2",
             "--full_validation_step", "3", "--max_steps", "3"]  # fmt: skip


def stories(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        movie: {
            "rgb": rng.standard_normal((N + i, RGB)).astype(np.float32),
            "sub": rng.standard_normal((N + i, DIM)).astype(np.float32),
        }
        for i, movie in enumerate(MOVIES["train"] + MOVIES["val"])
    }


def _type(node, text: str) -> None:
    node.attrs["type"] = np.array([text.encode()])  # Python 2 h5py: fixed-length bytes


def write_hickle_by_hand(path: Path, value: dict, version: int) -> None:
    """``value`` (a dict of dicts of arrays, or of arrays) as hickle ``version`` (2 or 3)
    wrote it from Python 2: /data_0 the dict, a dict_item group per key holding data_0.
    Hickle 2 names a key group by the key and types nodes 'dict'; hickle 3 by repr(key)
    and str(type(obj))."""

    if version == 4:
        write_hickle4_by_hand(path, value)
        return

    def dump(obj, group: h5py.Group) -> None:
        if isinstance(obj, dict):
            sub = group.create_group("data_0")
            _type(sub, "dict" if version == 2 else "<type 'dict'>")
            for key, item in obj.items():
                entry = sub.create_group(key if version == 2 else repr(key))
                _type(entry, "dict_item")
                if version == 3:
                    entry.attrs["key_type"] = np.array([b"<type 'str'>"])
                dump(item, entry)
        elif isinstance(obj, bytes):  # what hickle's no_match wrote: a pickle
            dataset = group.create_dataset("data_0", data=np.array([obj]))
            _type(dataset, "pickle")
        else:
            dataset = group.create_dataset("data_0", data=obj)
            _type(dataset, "ndarray")

    with h5py.File(path, "w") as f:
        f.attrs["CLASS"] = b"hickle"
        f.attrs["VERSION"] = 3 if version == 2 else b"3.4.2"
        f.attrs["type"] = np.array([b"hickle"])
        dump(value, f)


def write_hickle4_by_hand(path: Path, value: dict) -> None:
    """``value`` as hickle 4 wrote it: /data the dict, 'key' dict_item groups holding
    data, kinds in base_type attributes, the Python class pickled in a type attribute."""

    def dump(obj, group: h5py.Group, name: str) -> None:
        if isinstance(obj, dict):
            sub = group.create_group(name)
            sub.attrs["base_type"] = b"dict"
            sub.attrs["type"] = np.void(pickle.dumps(dict))
            for key, item in obj.items():
                entry = sub.create_group(repr(key))
                entry.attrs["base_type"] = b"dict_item"
                entry.attrs["key_base_type"] = b"str"
                dump(item, entry, "data")
        else:
            dataset = group.create_dataset(name, data=obj)
            dataset.attrs["base_type"] = b"ndarray"
            dataset.attrs["type"] = np.void(pickle.dumps(np.ndarray))

    with h5py.File(path, "w") as f:
        f.attrs["HICKLE_VERSION"] = "4.0.1"
        dump(value, f, "data")


def write_release(root: Path, story_format: str = "hickle2", seed: int = 0) -> Path:
    """The release's download unpacked in ``root``: root/data/video_sub/story.hkl and
    root/data/video_sub/{train,val}/<imdb key>.h5 with the release's datasets."""
    rng = np.random.default_rng(seed + 1)
    src = root / "data" / "video_sub"
    value = stories(seed)
    for split, movies in MOVIES.items():
        (src / split).mkdir(parents=True)
        for movie in movies:
            with h5py.File(src / split / f"{movie}.h5", "w") as f:
                f["query"] = np.array([f"Why {i}?".encode() for i in range(Q)])
                f["answer"] = np.array([[f"because {j}".encode() for j in range(A)]] * Q)
                f["query_rep"] = rng.standard_normal((Q, DIM)).astype(np.float32)
                f["answer_rep"] = rng.standard_normal((Q, A, DIM)).astype(np.float32)
                f["cor_idx"] = rng.integers(A, size=Q)
                f["qid"] = np.array([f"{split}:{movie}:{i}".encode() for i in range(Q)])
                for i in range(Q):  # the per-question features the release skipped
                    f[f"video_rep_{i}"] = rng.standard_normal((2, 3)).astype(np.float32)
                    f[f"subtt_rep_{i}"] = np.array([b"a line"])
    path = src / "story.hkl"
    if story_format == "hickle5":
        hickle = pytest.importorskip("hickle")
        hickle.dump(value, str(path))
    else:
        write_hickle_by_hand(path, value, int(story_format[-1]))
    return root


def read(root: Path, split: str = "train") -> MovieQAData:
    return MovieQAData(root, "video_sub", split, dim_text=DIM, dim_rgb=RGB, dim_sub=DIM)


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------
# Reading the layouts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("story_format", ["hickle2", "hickle3", "hickle4", "hickle5"])
def test_hickle_stories_read_as_written(tmp_path, story_format):
    root = write_release(tmp_path, story_format)
    expected = stories()
    for split, movies in MOVIES.items():
        data = read(root, split)  # root/data/video_sub: found under data/
        assert data.movies == sorted(movies) and data.counts == [Q] * len(movies)
        for index, movie in enumerate(data.movies):
            rgb, sub = data.story(movie)
            np.testing.assert_array_equal(rgb.numpy(), expected[movie]["rgb"])
            np.testing.assert_array_equal(sub.numpy(), expected[movie]["sub"])
            arrays = data.decode_movie(index)
            assert arrays.qids[0] == f"{split}:{movie}:0" and arrays.query.shape == (Q, DIM)
        data.close()
    story = StoryFile(str(root / "data" / "video_sub" / "story.hkl"), str(root))
    assert story.format.startswith("hickle")
    story.close()


def test_text_story_h5_next_to_a_story_hkl(tmp_path):
    """A text source reads story.h5 (as the release did), video_sub story.hkl."""
    root = write_release(tmp_path)
    sub = root / "data" / "sub"
    (sub / "train").mkdir(parents=True)
    rng = np.random.default_rng(3)
    with h5py.File(sub / "story.h5", "w") as f:
        f["tt0109830"] = rng.standard_normal((N, DIM)).astype(np.float32)
    with h5py.File(sub / "story.hkl", "w") as f:
        f["tt0109830"] = np.zeros((N, DIM), np.float32)  # not the one read
    (sub / "train" / "tt0109830.h5").hardlink_to(
        root / "data" / "video_sub" / "train" / "tt0109830.h5"
    )
    data = MovieQAData(root / "data", "sub", "train", dim_text=DIM)
    assert data.story_path.endswith("story.h5")
    assert float(data.story("tt0109830").abs().sum()) > 0
    data.close()


# --------------------------------------------------------------------------------------
# train.py on the release's directory, with no manual step
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("story_format", ["hickle2", "hickle5"])
def test_train_and_eval_on_release_files(tmp_path, capsys, story_format):
    root = write_release(tmp_path / "release", story_format)
    out = tmp_path / "run"
    flags = ["--data_dir", str(root), "--data_source", "video_sub", "--out_dir", str(out)]
    assert main([*flags, *RUN_FLAGS]) == 0, capsys.readouterr().err
    assert (out / "checkpoints" / "last.pt").is_file()
    ckpt = str(out / "checkpoints" / "last.pt")
    assert main([*flags, "--eval_only", "--checkpoint_file", ckpt]) == 0
    lines = (out / "predictions_val.txt").read_text().splitlines()
    assert len(lines) == Q * len(MOVIES["val"])
    assert {line.split()[0].split(":")[1] for line in lines} == set(MOVIES["val"])


# --------------------------------------------------------------------------------------
# Untrusted files
# --------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates the directory ``path``: the stand-in for code a data file
    could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def _run_release(root: Path, out: Path, *extra: str) -> int:
    flags = ["--data_dir", str(root), "--data_source", "video_sub", "--out_dir", str(out)]
    return main([*flags, *RUN_FLAGS, *extra])


@pytest.mark.parametrize("story_format", ["hickle2", "hickle5"])
def test_pickled_payload_refused_and_not_run(tmp_path, capsys, story_format):
    root = write_release(tmp_path / "release", "hickle2")
    marker = tmp_path / "payload-ran"
    value = stories()
    path = root / "data" / "video_sub" / "story.hkl"
    if story_format == "hickle5":
        hickle = pytest.importorskip("hickle")
        value[MOVIES["train"][0]]["rgb"] = Payload(marker)
        with pytest.warns(Warning):  # hickle: "... pickled"
            hickle.dump(value, str(path))
        hickle.load(str(path))  # the payload is live: hickle's own loader runs it
    else:
        blob = pickle.dumps(Payload(marker), protocol=0)  # Python 2's cPickle default
        value[MOVIES["train"][0]]["rgb"] = blob
        write_hickle_by_hand(path, value, 2)
        pickle.loads(blob)  # the payload is live
    assert marker.exists()
    marker.rmdir()
    assert _run_release(root, tmp_path / "out") == 2
    line = _one_line_error(capsys, f"{path}:{MOVIES['train'][0]}/rgb", "refused", "unpickled")
    assert "pickle" in line
    assert not marker.exists()  # nothing ran
    assert not (tmp_path / "out").exists()


def _external_link(root: Path, outside: Path) -> str:
    with h5py.File(outside, "w") as f:
        f["x"] = np.zeros((Q, DIM), np.float32)
    qa = root / "data" / "video_sub" / "train" / f"{MOVIES['train'][0]}.h5"
    with h5py.File(qa, "a") as f:
        del f["query_rep"]
        f["query_rep"] = h5py.ExternalLink(str(outside), "x")
    return f"{qa}:query_rep is an HDF5 external link"


def _virtual_dataset(root: Path, outside: Path) -> str:
    with h5py.File(outside, "w") as f:
        f["x"] = np.zeros((N, RGB), np.float32)
    story = root / "data" / "video_sub" / "story.hkl"
    with h5py.File(story, "a") as f:
        node = f[f"data_0/{MOVIES['train'][0]}/data_0/rgb"]
        del node["data_0"]
        layout = h5py.VirtualLayout(shape=(N, RGB), dtype=np.float32)
        layout[:] = h5py.VirtualSource(str(outside), "x", shape=(N, RGB))
        node.create_virtual_dataset("data_0", layout)
        _type(node["data_0"], "ndarray")
    return f"{story}:{MOVIES['train'][0]}/rgb/data_0 is a virtual dataset"


def _external_storage(root: Path, outside: Path) -> str:
    values = np.zeros((Q, A, DIM), np.float32)
    outside.write_bytes(values.tobytes())
    qa = root / "data" / "video_sub" / "train" / f"{MOVIES['train'][0]}.h5"
    with h5py.File(qa, "a") as f:
        del f["answer_rep"]
        f.create_dataset(
            "answer_rep", shape=values.shape, dtype=np.float32,
            external=[(str(outside), 0, values.nbytes)],
        )  # fmt: skip
    return f"{qa}:answer_rep stores its data in the external file"


@pytest.mark.parametrize("plant", [_external_link, _virtual_dataset, _external_storage])
def test_links_leaving_the_data_directory_refused(tmp_path, capsys, plant):
    root = write_release(tmp_path / "release")
    needle = plant(root, tmp_path / "elsewhere.h5")
    assert _run_release(root, tmp_path / "out") == 2
    _one_line_error(capsys, needle, "outside the data directory")


def test_links_inside_the_data_directory_read(tmp_path):
    root = write_release(tmp_path / "release")
    _external_link(root, root / "data" / "inside.h5")
    assert read(root).counts == [Q] * 3


def _truncate(root: Path) -> str:
    path = root / "data" / "video_sub" / "story.hkl"
    path.write_bytes(path.read_bytes()[:1500])
    return f"{path}: cannot be read"


def _list_node(root: Path) -> str:
    path = root / "data" / "video_sub" / "story.hkl"
    with h5py.File(path, "a") as f:
        _type(f[f"data_0/{MOVIES['val'][0]}/data_0"], "<type 'list'>")
    return f"{path}:{MOVIES['val'][0]} is a hickle"


def _bad_root(root: Path) -> str:
    path = root / "data" / "video_sub" / "story.hkl"
    with h5py.File(path, "a") as f:
        f.move("data_0", "elsewhere")
    return f"{path}:data_0: missing"


def _link_cycle(root: Path) -> str:
    path = root / "data" / "video_sub" / "story.hkl"
    with h5py.File(path, "a") as f:
        item = f[f"data_0/{MOVIES['train'][1]}/data_0/sub"]
        del item["data_0"]
        item["data_0"] = f[f"data_0/{MOVIES['train'][1]}/data_0"]  # a hard link to its parent
    return f"{path}:{MOVIES['train'][1]}/sub/sub/sub"


@pytest.mark.parametrize("spoil", [_truncate, _list_node, _bad_root, _link_cycle])
def test_bad_story_files(tmp_path, capsys, spoil):
    root = write_release(tmp_path / "release")
    needle = spoil(root)
    assert _run_release(root, tmp_path / "out") == 2
    _one_line_error(capsys, needle)
    assert not (tmp_path / "out").exists()


def test_story_file_errors_are_data_errors(tmp_path):
    root = write_release(tmp_path)
    (root / "data" / "video_sub" / "story.hkl").unlink()
    with pytest.raises(DataError, match=r"story\.hkl' does not exist \(nor story\.h5\)"):
        read(root)


def test_read_progress_lines(tmp_path):
    """While a split is read: movies, MB, rate and time left, at most every interval."""
    from types import SimpleNamespace

    from rwmn.data.progress import ReadProgress, movie_nbytes

    data = read(write_release(tmp_path))
    assert movie_nbytes(data, 0) == 4 * (data.story_rows[0] * (RGB + DIM) + Q * DIM * (1 + A))
    data.close()
    # MovieQA-sized text movies: 300-wide stories of 10,000 to 30,000 elements.
    big = SimpleNamespace(
        video=False, dim_text=300, num_answer=5, story_rows=[10_000, 20_000, 30_000],
        counts=[50, 50, 50], movies=["a", "b", "c"], split="train", source="sub",
    )  # fmt: skip
    now = [0.0]
    lines: list[str] = []
    progress = ReadProgress(big, lines.append, interval=10.0, clock=lambda: now[0])
    for index, t in enumerate([4.0, 12.0, 30.0]):
        now[0] = t
        progress(index)
    assert lines == [  # none at 4 s, within the interval
        "reading train (sub): 2/3 movies, 37/73 MB, 3.1 MB/s, about 12 s left",
        "reading train (sub): 3/3 movies, 73/73 MB, 2.4 MB/s, done",
    ]
