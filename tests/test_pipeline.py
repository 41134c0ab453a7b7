"""The input pipeline and the loop (rwmn.data.cache, rwmn.data.prefetch,
rwmn.loop): cache modes serve the batches `none` serves and train identically, resume stays
exact with every mode and with the prefetcher, a bad movie anywhere stops the run before
its first step, a step never waits on the device, and the bench runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from tiny_run import DIM, REPO, TINY_DATA, TINY_FLAGS
from torch.overrides import TorchFunctionMode

from rwmn import RWMNConfig
from rwmn.data.cache import (
    DATA_DTYPES,
    CachedSplit,
    ReadPerBatch,
    build_source,
    plan_cache,
    split_nbytes,
)
from rwmn.data.movieqa import MovieQAData
from rwmn.data.synthetic import SyntheticConfig, generate
from rwmn.loop import make_adagrad
from rwmn.model import RWMN
from rwmn.training import TrainConfig, Trainer, main

TINY_FLAGS = [*TINY_FLAGS, "--init_lr", "0.05"]
CACHED = ("device", "host")
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["sub", "video_sub"])
def tiny(request, tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp(f"pipeline-{request.param}")
    generate(root, SyntheticConfig(source=request.param, **TINY_DATA))
    return str(root), request.param


def _open(data: tuple[str, str], split: str = "train") -> MovieQAData:
    return MovieQAData(data[0], data[1], split, DIM, 16, DIM)


def _run(data, out, *extra) -> int:
    root, source = data
    argv = ["--data_dir", root, "--data_source", source, "--out_dir", str(out), *TINY_FLAGS]
    return main([*argv, *extra])


def _state(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


def _timeless(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "questions_per_second")}
            for r in rows]  # fmt: skip


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa["step"] == sb["step"]
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    for va, vb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(),
                      strict=True):  # fmt: skip
        assert torch.equal(va["sum"], vb["sum"])
    assert sa["rng"]["numpy_sampler"] == sb["rng"]["numpy_sampler"]
    assert sa["window"] == sb["window"]
    assert _timeless(a) == _timeless(b)


def _assert_same_batch(a, b) -> None:
    assert a.movie == b.movie and a.qids == b.qids
    pairs = list(zip(a.tensors(), b.tensors(), strict=True))
    for x, y in pairs:
        assert x.dtype == y.dtype and torch.equal(x, y)


# --------------------------------------------------------------------------------------
# Cache modes: the same batches as reading per batch, the same training
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", CACHED)
def test_cached_batches_equal_read_per_batch(tiny, mode, dtype):
    data = _open(tiny)
    torch_dtype = DATA_DTYPES[dtype]
    reference = ReadPerBatch(data, torch_dtype)
    cached = CachedSplit(data, torch_dtype, CPU, pinned=False)
    if mode == "host":  # no CUDA here: host memory is ordinary memory, served the same way
        plan = plan_cache("host", 0, CPU)
        assert not plan.pinned and "ordinary memory" in plan.reason
        cached = build_source(data, plan, torch_dtype, CPU)
    assert cached.nbytes == split_nbytes(data, torch_dtype)
    ra, rb = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(20):
        _assert_same_batch(reference.random_batch(ra, 4), cached.random_batch(rb, 4))
    assert ra.bit_generator.state == rb.bit_generator.state
    for a, b in zip(reference.iter_batches(4), cached.iter_batches(4), strict=True):
        _assert_same_batch(a, b)
    if dtype == "bf16":
        batch = cached.random_batch(rb, 4)
        assert batch.query.dtype == torch.bfloat16
    data.close()


def test_cache_modes_and_prefetch_train_identically(tiny, tmp_path):
    """--data_cache none, host and device, with and without the prefetcher: the same
    weights, optimizer state, sampler state and metrics."""
    flags = ["--max_steps", "8"]
    base = tmp_path / "none"
    assert _run(tiny, base, *flags, "--data_cache", "none", "--prefetch", "false") == 0
    for mode in ("none", *CACHED):
        for prefetch in ("true", "false"):
            if (mode, prefetch) == ("none", "false"):
                continue
            out = tmp_path / f"{mode}-{prefetch}"
            assert _run(tiny, out, *flags, "--data_cache", mode, "--prefetch", prefetch) == 0
            _assert_same_run(base, out)


def test_bf16_data_trains_from_every_mode_alike(tiny, tmp_path):
    flags = ["--max_steps", "4", "--data_dtype", "bf16"]
    assert _run(tiny, tmp_path / "none", *flags, "--data_cache", "none") == 0
    assert _run(tiny, tmp_path / "device", *flags, "--data_cache", "device") == 0
    _assert_same_run(tmp_path / "none", tmp_path / "device")


# --------------------------------------------------------------------------------------
# Resume stays exact with each mode and with the prefetcher
# --------------------------------------------------------------------------------------


class _Interrupt(Exception):
    """Stands in for a kill after a step (the run's last checkpoint is on disk)."""


@pytest.mark.parametrize("mode", ["none", *CACHED])
def test_resume_is_exact_with_each_mode_and_the_prefetcher(tiny, tmp_path, monkeypatch, mode):
    """The run is interrupted at step 6; its last checkpoint (step 4) was written while the
    prefetcher held step 5's batch, drawn but unused. Resumed (here with another cache
    mode, which --resume accepts), it ends equal to an uninterrupted run."""
    flags = ["--max_steps", "10", "--checkpoint_step", "4", "--data_cache", mode]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _run(tiny, whole, *flags) == 0
    real_step = Trainer.train_step

    def interrupted(self, batch):
        result = real_step(self, batch)
        if self.step == 6:
            raise _Interrupt
        return result

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(_Interrupt):
        _run(tiny, parts, *flags)
    monkeypatch.undo()
    assert _state(parts)["step"] == 4
    other = "device" if mode != "device" else "none"
    assert _run(tiny, parts, "--max_steps", "10", "--resume", "--data_cache", other) == 0
    _assert_same_run(whole, parts)


# --------------------------------------------------------------------------------------
# A bad movie anywhere in the split stops the run before its first step
# --------------------------------------------------------------------------------------


def _spoil(root: Path, source: str, where: str) -> str:
    """Write a NaN into the last movie of a split: its story (rgb for video_sub) or a QA
    file's answer_rep; the text the error must name."""
    split = "val" if where == "val story" else "train"
    movie = sorted((root / source / split).iterdir())[-1].stem
    if where == "train answers":
        path = root / source / split / f"{movie}.h5"
        with h5py.File(path, "a") as f:
            f["answer_rep"][-1, 0, 0] = np.nan
        return f"{path}:answer_rep: holds NaN or inf"
    path = root / source / "story.h5"
    with h5py.File(path, "a") as f:
        node = f[movie]["rgb"] if source == "video_sub" else f[movie]
        node[-1, 0] = np.inf
    return f"{path}:{movie}{'/rgb' if source == 'video_sub' else ''}: holds NaN or inf"


@pytest.mark.parametrize("where", ["train story", "val story", "train answers"])
@pytest.mark.parametrize("mode", ["none", *CACHED])
def test_bad_movie_is_reported_before_the_first_step(tiny, tmp_path, capsys, mode, where):
    root = tmp_path / "data"
    shutil.copytree(tiny[0], root)
    needle = _spoil(root, tiny[1], where)
    out = tmp_path / "out"
    capsys.readouterr()
    assert _run((str(root), tiny[1]), out, "--max_steps", "2", "--data_cache", mode) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), captured.err
    assert needle in lines[0], (needle, lines[0])
    assert "training on" not in captured.out and not out.exists()


# --------------------------------------------------------------------------------------
# --data_cache auto: the choice and its reason
# --------------------------------------------------------------------------------------

GIB = 2**30


def test_auto_plan():
    cuda = torch.device("cuda")
    device = plan_cache("auto", 2 * GIB, cuda, free_device=60 * GIB, ram=100 * GIB)
    assert device.mode == "device" and "50% of the free memory of cuda" in device.reason
    host = plan_cache("auto", 40 * GIB, cuda, free_device=60 * GIB, ram=100 * GIB)
    assert host.mode == "host" and "fits in 50% of the available RAM" in host.reason
    if not torch.cuda.is_available():
        assert not host.pinned and "ordinary memory" in host.reason
    none = plan_cache("auto", 60 * GIB, cuda, free_device=60 * GIB, ram=100 * GIB)
    assert none.mode == "none" and "exceeds" in none.reason
    assert plan_cache("auto", GIB, CPU, ram=100 * GIB).mode == "device"
    assert plan_cache("auto", 80 * GIB, CPU, ram=100 * GIB).mode == "none"
    line = device.line("bf16")
    assert line.startswith("data cache: device (2.00 GiB of bf16 features")


def test_first_log_line_says_the_cache_and_why(tiny, tmp_path):
    lines = []
    model_cfg = RWMNConfig(
        data_source=tiny[1], dim_text=DIM, dim_memory=DIM, dim_sub=DIM, dim_rgb=16,
        dim_mcb=20, write="3-2-2", read="3-1-2",
    )  # fmt: skip
    cfg = TrainConfig(data_dir=tiny[0], out_dir=str(tmp_path), max_steps=1, device="cpu")
    Trainer(model_cfg, cfg, log=lines.append).fit()
    assert lines[0].startswith("data cache: device (") and "auto: the device is the CPU" in lines[0]


def test_compile_mode_needs_compile(tiny, tmp_path, capsys):
    assert _run(tiny, tmp_path / "o", "--compile_mode", "max-autotune") == 2
    assert "--compile_mode max-autotune applies only with --compile" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# No host synchronisation inside a step
# --------------------------------------------------------------------------------------

T = torch.Tensor
#: Tensor methods that copy a value to the host (on a GPU: wait for the device).
SYNCS = frozenset({T.item, T.tolist, T.cpu, T.numpy, T.__bool__, T.__float__, T.__int__,
                   T.__index__})  # fmt: skip


class SyncCounter(TorchFunctionMode):
    """Records (trainer step, inside a step?, method) for every reading of a tensor's
    value on the host. Adagrad's step counters are left out: torch keeps them on the host
    (unless fused) precisely so that reading them never waits for the device."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.trainer, self.inside, self.calls = trainer, False, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            steps = {id(s["step"]) for s in self.trainer.optimizer.state.values()}
            if not (args and id(args[0]) in steps):
                self.calls.append((self.trainer.step, self.inside, func.__name__))
        return func(*args, **(kwargs or {}))


def _instrumented(tiny, out, monkeypatch, **train):
    model_cfg = RWMNConfig(
        data_source=tiny[1], dim_text=DIM, dim_memory=DIM, dim_sub=DIM, dim_rgb=16,
        dim_mcb=20, write="3-2-2", read="3-1-2",
    )  # fmt: skip
    cfg = TrainConfig(data_dir=tiny[0], out_dir=str(out), device="cpu", batch_size=4, **train)
    trainer = Trainer(model_cfg, cfg, log=lambda _: None)
    counter = SyncCounter(trainer)
    real_step = Trainer.train_step

    def step(self, batch):
        counter.inside = True
        try:
            return real_step(self, batch)
        finally:
            counter.inside = False

    monkeypatch.setattr(Trainer, "train_step", step)
    return trainer, counter


def test_no_host_sync_between_progress_lines(tiny, tmp_path, monkeypatch):
    """Syncs happen only at steps 0 (setup), 4, 8, 12 (progress lines; the end), none
    inside a step, for every cache mode (the CPU stands in for the GPU: each counted call
    is one that waits for a GPU)."""
    for mode in ("none", *CACHED):
        trainer, counter = _instrumented(
            tiny, tmp_path / mode, monkeypatch, max_steps=12, validation_step=4,
            full_validation_step=100, checkpoint_step=100, data_cache=mode,
        )  # fmt: skip
        with counter:
            trainer.fit()
        inside = [c for c in counter.calls if c[1]]
        assert not inside, inside
        steps = {step for step, _, _ in counter.calls}
        assert steps <= {0, 4, 8, 12}, sorted(counter.calls)
        assert {4, 8, 12} <= steps  # the counter does see the reads at progress lines


def test_non_finite_loss_reported_at_the_progress_line(tiny, tmp_path, monkeypatch):
    """A NaN loss at step 6 is reported at the next progress line (step 8) as the first
    bad step, with no per-step sync to find it."""
    real_loss = RWMN.loss
    trainer, counter = _instrumented(
        tiny, tmp_path, monkeypatch, max_steps=12, validation_step=4,
        full_validation_step=100, checkpoint_step=100,
    )  # fmt: skip

    def loss(self, logits, target):
        value = real_loss(self, logits, target)
        return value * float("nan") if trainer.step >= 5 else value

    monkeypatch.setattr(RWMN, "loss", loss)
    with (
        counter,
        pytest.raises(FloatingPointError, match=r"step 6: the loss is nan \(found at step 8\)"),
    ):
        trainer.fit()
    assert not [c for c in counter.calls if c[1]]
    assert _state(tmp_path)["step"] == 0  # no checkpoint holds the NaN weights


# --------------------------------------------------------------------------------------
# The optimizer: fused or foreach where torch has it, the same rule
# --------------------------------------------------------------------------------------


def test_adagrad_implementation_falls_back(monkeypatch):
    real = torch.optim.Adagrad

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires ... supported devices")
        return real(params, **kwargs)

    weights = [torch.nn.Parameter(torch.randn(5, 3))]
    opt, name = make_adagrad(weights, CPU, lr=0.1, initial_accumulator_value=0.1)
    assert name == "fused" and opt.defaults["fused"]  # torch 2.13 on the CPU
    monkeypatch.setattr(torch.optim, "Adagrad", no_fused)
    opt, name = make_adagrad(weights, CPU, lr=0.1, initial_accumulator_value=0.1)
    assert name == "foreach" and opt.defaults["foreach"]


def test_adagrad_implementations_agree():
    """The fused update is Adagrad's: it matches the for-loop one to rounding."""
    torch.manual_seed(0)
    grads = [torch.randn(7, 4) for _ in range(3)]
    results = []
    for impl in ({"fused": True}, {}):
        w = torch.nn.Parameter(torch.ones(7, 4))
        opt = torch.optim.Adagrad([w], lr=0.05, initial_accumulator_value=0.1, **impl)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        results.append(w.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------


def test_bench_data_smoke(tmp_path):
    out = tmp_path / "data.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "data", "--smoke", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    loaders = {(r["source"], r["loader"], r["phase"]) for r in result["loaders"]}
    for source in ("sub", "video_sub"):
        for mode in ("cache:none", "cache:host", "cache:device"):
            for phase in ("cold", "warm"):
                assert (source, mode, phase) in loaders
    assert all(r["status"] == "ok" for r in result["loaders"]), result["loaders"]
    train = result["train"]
    assert train["train_py_steps_per_s"] > 0 and train["model_only_steps_per_s"] > 0
    assert out.with_suffix(".md").read_text().startswith("# ")
