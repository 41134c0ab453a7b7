"""NVTX ranges (rwmn/profiling.py): the ``nvtx`` package's ``rwmn`` domain, the model's
stages and the training loop's phases with their categories, balanced pushes and pops,
nothing when off, nothing pushed while TorchDynamo traces, and the decorator form."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rwmn import profiling
from rwmn.data.synthetic import SyntheticConfig, generate
from rwmn.profiling import annotate, nvtx_enabled, nvtx_range
from rwmn.training import main


class Recorder:
    """Stands in for the nvtx package's domain, recording pushes and pops."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def get_event_attributes(self, message=None, color=None, category=None, payload=None):
        return (message, category, color)

    def push_range(self, attributes) -> None:
        self.events.append(("push", *attributes[:2]))

    def pop_range(self) -> None:
        self.events.append(("pop",))

    def ranges(self) -> set[tuple[str, str]]:
        return {(e[1], e[2]) for e in self.events if e[0] == "push"}

    def balanced(self) -> bool:
        depth = 0
        for event in self.events:
            depth += 1 if event[0] == "push" else -1
            if depth < 0:
                return False
        return depth == 0


@pytest.fixture
def recorder(monkeypatch):
    pytest.importorskip("nvtx")
    rec = Recorder()
    profiling._attributes.cache_clear()
    monkeypatch.setattr(profiling, "_domain", lambda: rec)
    yield rec
    profiling._attributes.cache_clear()


def test_the_package_domain():
    nvtx = pytest.importorskip("nvtx")
    assert profiling.available()
    profiling._attributes.cache_clear()
    with nvtx_enabled(), nvtx_range("write"):  # the real package, no profiler attached
        pass
    assert profiling._domain() is nvtx.get_domain(profiling.DOMAIN)


DIM = 12
FLAGS = [
    "--dim_text", str(DIM), "--dim_memory", str(DIM), "--write", "3-2-2", "--read", "3-1-2",
    "--batch_size", "4", "--validation_step", "2", "--full_validation_step", "2",
    "--max_steps", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvtx-data")
    generate(
        root,
        SyntheticConfig(
            source="sub", train_movies=2, val_movies=1, test_movies=1, questions_per_movie=3,
            min_scenes=2, max_scenes=2, scene_len=4, dim_text=DIM, dim_sub=DIM, dim_rgb=16,
        ),
    )  # fmt: skip
    return root


def test_train_py_nvtx_ranges(data, tmp_path, recorder):
    assert main(["--data_dir", str(data), "--out_dir", str(tmp_path / "off"), *FLAGS]) == 0
    assert recorder.events == []  # off by default
    assert main(["--data_dir", str(data), "--out_dir", str(tmp_path / "on"), "--nvtx", *FLAGS]) == 0
    ranges = recorder.ranges()
    train = {(name, "train") for name in ("data", "step", "validation", "checkpoint")}
    model = {(name, "model") for name in ("embedding", "write", "read/hop0", "answer")}
    assert train | model <= ranges, ranges
    assert recorder.balanced()
    assert not profiling.is_enabled()  # --nvtx does not outlive the run


def test_no_range_while_compiling(recorder):
    def f(x):
        with nvtx_range("a"):
            x = x.sin()
        with nvtx_range("b", "train"):
            return x.cos()

    with nvtx_enabled():
        compiled = torch.compile(f, fullgraph=True, backend="eager")  # no graph break
        x = torch.ones(3)
        torch.testing.assert_close(compiled(x), f(x))
    # Only the eager call pushed; tracing pushed nothing.
    assert [e for e in recorder.events if e[0] == "push"] == [("push", "a", "model"),
                                                             ("push", "b", "train")]  # fmt: skip
    assert recorder.balanced()


def test_decorator_and_categories(recorder):
    @annotate("fib", "bench")
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    with nvtx_enabled():
        assert fib(4) == 3
    assert recorder.ranges() == {("fib", "bench")}
    assert sum(e[0] == "push" for e in recorder.events) == 9  # one range per call
    assert recorder.balanced()
    with pytest.raises(ValueError, match="unknown NVTX category"), nvtx_enabled(), \
            nvtx_range("x", "nonsense"):  # fmt: skip
        pass


def test_switch_nests_and_env_var_sets_the_default():
    """``nvtx_enabled`` blocks nest and restore what was before; ``RWMN_NVTX=1`` turns the
    ranges on for a whole process (read when rwmn.profiling is imported)."""
    assert not profiling.is_enabled()
    with nvtx_enabled():
        assert profiling.is_enabled()
        with nvtx_enabled(False):
            assert not profiling.is_enabled()
        assert profiling.is_enabled()
    assert not profiling.is_enabled()
    code = "from rwmn import profiling; print(profiling.is_enabled())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = {**os.environ, "RWMN_NVTX": value}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == expected
