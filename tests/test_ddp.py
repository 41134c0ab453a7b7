"""Data-parallel training under torchrun (2 CPU processes, gloo, loopback only),
and --movies_per_step.

Every torchrun launch runs ``python -m torch.distributed.run --nproc_per_node 2`` on
127.0.0.1 and a free port, with one thread per process, through a wrapper script written
by the test: it records (with a Python audit hook) every file a rank opens for writing,
creates, renames or removes below the test's directory, and can SIGKILL rank 0 after a
given step. The wrapper is not part of the package.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tiny_run import DIM, REPO, TINY_FLAGS

from rwmn import RWMNConfig
from rwmn.data.synthetic import SyntheticConfig, generate
from rwmn.distributed import slot_sampler
from rwmn.training import TrainConfig, Trainer, main

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

# Seven val movies of 7 questions (14 batches of 4 and 3): the two ranks' shares of a full
# validation differ in size.
TINY_DATA = dict(
    train_movies=5, val_movies=7, test_movies=1, questions_per_movie=7,
    min_scenes=2, max_scenes=3, scene_len=4, dim_text=DIM, dim_sub=DIM, dim_rgb=16,
)  # fmt: skip
MODEL = dict(dim_text=DIM, dim_memory=DIM, dim_sub=DIM, dim_rgb=16, dim_mcb=20,
             write="3-2-2", read="3-1-2")  # fmt: skip
FLAGS = [*TINY_FLAGS, "--checkpoint_step", "4", "--max_steps", "10", "--init_lr", "0.05",
         "--device", "cpu"]  # fmt: skip

WRAPPER = """
import atexit, json, os, signal, sys
from rwmn import training

spec = json.loads(sys.argv[1])
rank = int(os.environ.get("RANK", "0"))
watched = os.path.realpath(spec["watch"])
writes = []


def under(path):
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False  # a file descriptor
    path = os.path.realpath(os.fsdecode(path))
    return path == watched or path.startswith(watched + os.sep)


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = mode is not None and any(c in mode for c in "wax+")
        writing = writing or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and under(path):
            writes.append(os.path.basename(os.fsdecode(path)))
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate",
                   "shutil.rmtree", "os.chmod"):
        if under(args[0]):
            writes.append(f"{event} {os.path.basename(os.fsdecode(args[0]))}")


sys.addaudithook(hook)
# One write() per line: the ranks share the pipe, and print() writes the newline apart,
# which let another rank's line land in between.
atexit.register(lambda: os.write(1, f"WRITES {rank} {json.dumps(writes)}\\n".encode()))
real_step = training.Trainer.train_step


def train_step(self, batches):
    result = real_step(self, batches)
    if rank == 0 and self.step == spec.get("kill_at"):
        os.kill(os.getpid(), signal.SIGKILL)
    return result


training.Trainer.train_step = train_step
sys.exit(training.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ddp-data")
    generate(root, SyntheticConfig(source="sub", **TINY_DATA))
    return str(root)


def _torchrun(tmp: Path, spec: dict, *argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    wrapper = tmp / "ddp_wrapper.py"
    if not wrapper.exists():
        wrapper.write_text(WRAPPER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("TRITON_INTERPRET", None)  # the reference ops on CPU; no kernels imported
    args = [
        # --standalone: torchrun binds a free loopback port itself (a port chosen here could
        # be taken by another process before the launch binds it).
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc), "--monitor_interval", "0.1",
        str(wrapper), json.dumps({"watch": str(tmp), **spec}), *argv,
    ]  # fmt: skip
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)


def _writes(done: subprocess.CompletedProcess) -> dict[int, list[str]]:
    out = {}
    for line in done.stdout.splitlines():
        if line.startswith("WRITES "):
            _, rank, names = line.split(" ", 2)
            out[int(rank)] = json.loads(names)
    return out


def _state(out: Path, name: str = "last.pt") -> dict:
    return torch.load(out / "checkpoints" / name, weights_only=True)


def _timeless(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "questions_per_second")}
            for r in rows]  # fmt: skip


@contextlib.contextmanager
def _one_thread():
    """As the torchrun ranks run (OMP_NUM_THREADS=1): a CPU reduction's rounding depends
    on how many threads share it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _one_process(data: str, out: Path, *extra: str) -> int:
    with _one_thread():
        return main(["--data_dir", data, "--out_dir", str(out), *FLAGS, *extra])


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted run of 2 ranks x 1 movie per step (10 steps)."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    out = tmp / "run"
    done = _torchrun(tmp, {}, "--data_dir", data, "--out_dir", str(out), *FLAGS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


def _assert_close_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):  # fmt: skip
        torch.testing.assert_close(sa["sum"], sb["sum"], rtol=1e-4, atol=1e-5)


def test_two_ranks_equal_one_process_with_two_movies_per_step(data, two_ranks, tmp_path):
    """Rank r's movie of a step is slot r's; one process with --movies_per_step 2 draws
    slots 0 and 1 each step: the same batches, the same update up to rounding."""
    out, _ = two_ranks
    single = tmp_path / "single"
    assert _one_process(data, single, "--movies_per_step", "2") == 0
    a, b = _state(out), _state(single)
    _assert_close_weights(a, b)
    assert a["world_size"] == 2 and b["world_size"] == 1
    # The streams line up exactly: rank r's sampler is the single process's slot r.
    for rank in range(2):
        assert a["ranks"][rank]["rng"]["numpy_samplers"] == [b["rng"]["numpy_samplers"][rank]]
    assert a["scheduler"] == b["scheduler"]  # the schedule counts optimizer steps


def test_two_ranks_with_two_movies_each_equal_one_process_with_four(data, tmp_path):
    """With DDP and --movies_per_step 2, each rank accumulates two movies (the first
    without synchronising): the update of one process with four."""
    out = tmp_path / "run"
    done = _torchrun(tmp_path, {}, "--data_dir", data, "--out_dir", str(out), *FLAGS,
                     "--movies_per_step", "2", "--max_steps", "6")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single = tmp_path / "single"
    assert _one_process(data, single, "--movies_per_step", "4", "--max_steps", "6") == 0
    _assert_close_weights(_state(out), _state(single))


def test_sharded_full_validation_equals_one_process(data, two_ranks, tmp_path):
    """The full validations of the 2-rank run (each rank evaluated its share of the 7 val
    movies) equal one process's evaluation of the same weights, accuracy and loss exactly."""
    out, _ = two_ranks
    model_cfg = RWMNConfig(**MODEL)
    cfg = TrainConfig(data_dir=data, out_dir=str(tmp_path), batch_size=4, device="cpu")
    trainer = Trainer(model_cfg, cfg, log=lambda _: None)
    (val,) = trainer.sources("val")
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "val"}  # fmt: skip
    assert sorted(rows) == [5, 10]
    for name in ("best.pt", "last.pt"):
        state = _state(out, name)
        trainer.model.load_state_dict(state["model"])
        with _one_thread():
            result = trainer.evaluate_split(val)
        row = rows[state["step"]]
        assert (result.acc, result.loss) == (row["acc"], row["loss"]), name


def test_only_rank_0_writes_files(two_ranks):
    _, done = two_ranks
    writes = _writes(done)
    assert set(writes) == {0, 1}, done.stdout[-2000:]
    assert writes[1] == [], writes[1]
    # The hook does see rank 0's writes (atomic ones through <name>.tmp-<pid>).
    names = {re.sub(r"\.tmp-\d+$", "", name) for name in writes[0]}
    assert {"metrics.jsonl", "config.json", "last.pt", "best.pt", "run.lock"} <= names, names


def test_kill_and_resume_under_torchrun_is_exact(data, two_ranks, tmp_path):
    """Rank 0 is SIGKILLed after step 7 (last checkpoint: step 4, with both ranks'
    samplers and running sums); torchrun stops rank 1; the run resumed under torchrun
    ends equal to the uninterrupted one: weights, optimizer, every rank's random state,
    metrics.jsonl."""
    whole, _ = two_ranks
    parts = tmp_path / "run"
    argv = ["--data_dir", data, "--out_dir", str(parts), *FLAGS]
    killed = _torchrun(tmp_path, {"kill_at": 7}, *argv)
    assert killed.returncode != 0, killed.stdout[-2000:]
    assert _state(parts)["step"] == 4
    resumed = _torchrun(tmp_path, {}, *argv, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = _state(whole), _state(parts)
    assert a["step"] == b["step"] == 10
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):  # fmt: skip
        assert torch.equal(sa["sum"], sb["sum"])
    for ra, rb in zip(a["ranks"], b["ranks"], strict=True):
        assert ra["window"] == rb["window"]
        assert ra["rng"]["numpy_samplers"] == rb["rng"]["numpy_samplers"]
        assert ra["rng"]["numpy_val_sampler"] == rb["rng"]["numpy_val_sampler"]
        assert torch.equal(ra["rng"]["torch"], rb["rng"]["torch"])
    assert _timeless(whole) == _timeless(parts)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "run.lock"}  # fmt: skip


def test_world_size_change_is_refused(data, two_ranks, tmp_path, capsys):
    """A 2-rank run resumed by one process, and a 1-process run resumed by 2 ranks: one
    line, exit 2, nothing written."""
    run = tmp_path / "two"
    shutil.copytree(two_ranks[0], run)
    before = _snapshot(run)
    argv = ["--data_dir", data, "--out_dir", str(run), *FLAGS, "--max_steps", "12"]
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: --resume: "), lines
    assert "world size 2) and this launch has 1" in lines[0], lines[0]
    assert _snapshot(run) == before

    single = tmp_path / "single"
    assert _one_process(data, single, "--max_steps", "4") == 0
    before = _snapshot(single)
    done = _torchrun(tmp_path, {}, "--data_dir", data, "--out_dir", str(single), *FLAGS,
                     "--resume")  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "train.py: error:" in line]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "world size 1) and this launch has 2" in errors[0], errors[0]
    assert _snapshot(single) == before
    assert _writes(done) == {0: [], 1: []}  # refused before the lock


def test_slot_streams():
    """Slot 0 is the stream of a single-movie, single-process run (default_rng(seed)), so
    such runs draw what they drew before data parallelism; other slots are distinct."""
    import numpy as np

    assert slot_sampler(7, 0).bit_generator.state == np.random.default_rng(7).bit_generator.state
    draws = {tuple(slot_sampler(7, j).integers(1 << 30, size=4)) for j in range(4)}
    assert len(draws) == 4


def test_bench_ddp_smoke(tmp_path):
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "ddp", "--smoke", "--steps", "10", "--window", "5",
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["processes"], r["movies_per_step"]) for r in rows] == [(1, 1), (2, 1), (1, 2)]
    failed = [r.get("detail") for r in rows if r["status"] != "ok"]
    assert not failed, "\n".join("\n".join(d or []) for d in failed)
    assert all(r["steps_per_s"] > 0 for r in rows), rows
    assert out.with_suffix(".md").read_text().startswith("# ")
