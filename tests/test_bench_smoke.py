"""Smoke test of the benchmark harness (bench/): the CPU runner, the e2e bench, the report.

Runs the CLIs as CI would (subprocesses, tiny shapes, tmp dir) and checks what they wrote;
checks the FLOP and byte models of bench/cases.py against torch's own counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from user_env import user_env

from bench import cases as C
from bench import timing

REPO = Path(__file__).resolve().parent.parent
#: Keys every op row carries, whatever its status.
OP_KEYS = {
    "kind", "op", "size", "family", "group", "shapes", "backend", "pass", "dtype", "flops",
    "bytes", "status", "reason", "label", "device", "device_name", "torch", "triton",
    "git_commit", "date",
}  # fmt: skip
#: Keys a measured (status "ok") row adds.
TIMED_KEYS = {"median_ms", "p20_ms", "p80_ms", "min_ms", "reps", "timer", "peak_mem_bytes"}
ROOFLINE_KEYS = {"achieved_GBps", "achieved_TFLOPs", "bw_fraction", "flop_fraction", "bound"}


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # As a user types it (--smoke sets TRITON_INTERPRET itself); no PYTHONPATH in cwd=REPO.
    env = user_env() if cwd == REPO else user_env(PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_one_entry_point():
    """``python -m bench --help`` lists every command with one line; ``python -m bench
    <command>`` and the module form ``python -m bench.<command>`` run the same ``main``."""
    from bench.cli import COMMANDS

    listing = _run("bench", "--help")
    assert listing.returncode == 0, listing.stderr[-4000:]
    lines = listing.stdout.splitlines()
    for command in COMMANDS:
        (line,) = [x for x in lines if x.split()[:1] == [command]]
        assert len(line.split()) > 2, line  # a description follows the name
    unknown = _run("bench", "no-such-command")
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr
    for args in (("bench", "report", "--help"), ("bench.report", "--help")):
        proc = _run(*args)
        assert proc.returncode == 0 and "python -m bench report" in proc.stdout, args


@pytest.fixture(scope="module")
def op_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "ops-smoke.json"
    proc = _run(
        "bench", "run", "--smoke", "--device", "cpu", "--backends", "reference,fused",
        "--dtypes", "fp32,bf16", "--warmup-s", "0", "--measure-s", "0", "--min-warmup", "0",
        "--min-reps", "2", "--threads", "1", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_runner_rows(op_results):
    data = json.loads(op_results.read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["label"] == "CPU" and meta["device"] == "cpu"
    assert meta["date"] and meta["torch"] == torch.__version__
    if (REPO / ".git").exists():  # a checkout (CI); an exported tree has no commit to record
        assert len(meta["git_commit"]) == 40, meta["git_commit"]
    assert meta["ceilings"]["copy_bandwidth_Bps"] > 0
    assert set(meta["ceilings"]["matmul_flops_per_s"]) == {"fp32", "bf16"}
    smoke = C.cases(("smoke",))
    assert len(rows) == len(smoke) * 2 * 2 * len(C.PASSES)
    assert {r["op"] for r in rows} == set(C.OPS)
    for r in rows:
        assert r.keys() >= OP_KEYS, OP_KEYS - r.keys()
        assert r["label"] == "CPU"
        assert r["status"] in ("ok", "skipped"), r
        if r["backend"] == "reference":
            assert r["status"] == "ok", r
        if r["status"] == "skipped":
            assert r["reason"], r
        else:
            assert r.keys() >= TIMED_KEYS | ROOFLINE_KEYS
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["reps"] >= 2 and r["timer"] == "cpu perf_counter"
            assert r["peak_mem_bytes"] is None  # CPU: not measured, not invented
        if r["backend"] == "fused" and r["dtype"] == "bf16":
            assert r["status"] == "skipped" and "interpreter" in r["reason"]


def test_report(op_results, tmp_path):
    e2e = tmp_path / "e2e-smoke.json"
    proc = _run(
        "bench", "e2e", "--smoke", "--device", "cpu", "--modes", "eager", "--precisions", "fp32",
        "--backends", "reference", "--threads", "1", "--measure-s", "0.1", "--out", str(e2e),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    e2e_rows = json.loads(e2e.read_text())["rows"]
    assert [r["config"] for r in e2e_rows] == ["sub", "video_sub"]
    for r in e2e_rows:
        assert r["status"] == "ok", r
        assert r["questions_per_s"] == pytest.approx(r["batch"] * r["steps_per_s"])
        assert r["steps_per_s"] == pytest.approx(1e3 / r["median_ms"])

    out = tmp_path / "report"
    proc = _run("bench", "report", str(op_results), str(e2e), "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    md = (out / "ops-smoke.md").read_text()
    assert "CPU figures (not GPU)" in md
    for op in C.OPS:
        assert f"### {op} (CPU)" in md
        png = out / f"ops-smoke-{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### Training step (CPU)" in md and "video_sub" in md
    assert "### Skipped and failed cases" in md


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


@pytest.mark.parametrize("case", C.cases(("smoke",)), ids=lambda c: c.id)
def test_byte_model_matches_tensors(case):
    """Forward bytes = every input tensor + every output tensor, read or written once."""
    from rwmn import reference

    kwargs, _ = C.make_inputs(case, "cpu", torch.float32)
    out = getattr(reference, case.op)(**kwargs)
    assert C.bytes_moved(case, "forward", torch.float32) == _nbytes(
        list(kwargs.values())
    ) + _nbytes(out)
    half = C.bytes_moved(case, "forward", torch.bfloat16)
    assert half < C.bytes_moved(case, "forward", torch.float32)


def _attention_extras(b: int, r: int, d: int) -> float:
    return C.UNIT_NORM_FLOPS * b * r * d + C.SOFTMAX_FLOPS * b * r


@pytest.mark.parametrize("op", ["memory_conv", "attention_read", "conv_attention_read"])
def test_flop_model_matches_flop_counter(op):
    """The dense conv and matmul terms are exactly torch's FLOP counter's; the model adds
    unit_norm and softmax, which the counter does not count."""
    from rwmn import reference

    case = next(c for c in C.cases(("smoke",)) if c.op == op)
    kwargs, _ = C.make_inputs(case, "cpu", torch.float32)
    with FlopCounterMode(display=False) as counter:
        out = getattr(reference, op)(**kwargs)
    counted = counter.get_total_flops()
    assert counted > 0
    extras = 0
    if op == "attention_read":
        extras = _attention_extras(*kwargs["rows"].shape)
    elif op == "conv_attention_read":
        (b, d), (_, r) = out[0].shape, out[1].shape
        extras = _attention_extras(b, r, d)
    assert C.flops(case, "forward") == counted + extras
    assert C.flops(case, "backward") == C.BACKWARD_FLOP_FACTOR * C.flops(case, "forward")


def test_quantiles():
    t = timing._summarise([5.0, 1.0, 3.0, 2.0, 4.0], "t")
    assert (t.min_ms, t.median_ms, t.reps) == (1.0, 3.0, 5)
    assert 1.0 < t.p20_ms < t.median_ms < t.p80_ms < 5.0


def test_census_command(tmp_path):
    """``python -m bench census`` as a user types it, on a tiny step: both backends, one
    file of each kind, fused launches recorded (no interpreter needed)."""
    proc = _run(
        "bench", "census", "--configs", "sub", "--precisions", "fp32", "--n", "40",
        "--batch", "2", "--out", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "census-cpu.json").read_text())
    steps = {s["config"]["backend"]: s for s in data["steps"]}
    assert set(steps) == {"reference", "fused"}
    assert steps["fused"]["totals"]["triton"] > 0 and steps["reference"]["totals"]["triton"] == 0
    assert "sub-fp32-fused" in (tmp_path / "census-cpu.md").read_text()
