"""The GPU session's subprocesses: the CUDA-marked tests, and the compile warmers.

Both run beside the correctness checks of the session, which time nothing, and are
over (finished, or stopped at their deadline) before anything is timed.

* ``pytest -m cuda`` over tests/, with a JUnit XML for the verdict per test (the ``-v`` log
  gives the verdicts so far when the run is stopped at its deadline).
* Compile warmers: ``python -m bench gpu_session ... --warmer k/n`` processes that run
  every n-th torch.compile the timing sections will do. Inductor keeps compiled graphs and
  kernels in on-disk caches (the FX graph and AOTAutograd caches), so the timed process
  then mostly loads them instead of compiling: on a 16-core host n warmers compile about n
  times as fast as the one timed process would, and the compiling overlaps the checks.

May import: bench.gpu_session.config, bench.cases, bench.e2e and bench.harness.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.gpu_session.config import REPO, SessionConfig

#: Seconds a subprocess gets to exit after SIGTERM before SIGKILL.
KILL_GRACE_S = 10
#: Lines of a test run's log kept in the results when it produced no verdicts.
LOG_TAIL_LINES = 30

#: A `pytest -v` result line: "tests/test_x.py::test_y[id] PASSED  [ 50%]".
VERBOSE_LINE = re.compile(r"^(tests/\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
OUTCOMES = ("passed", "failed", "error", "skipped")


def start_tests(out_dir: Path) -> tuple[subprocess.Popen, dict]:
    """``pytest -m cuda`` over tests/ in a subprocess; its log and JUnit XML go to out_dir."""
    xml, log = out_dir / "pytest-cuda.xml", out_dir / "pytest-cuda.log"
    cmd = [
        sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider",
        f"--junitxml={xml}", "tests",
    ]  # fmt: skip
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": path}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    info = {
        "command": "python " + " ".join(cmd[1:]),
        "xml": str(xml),
        "log": str(log),
        "started": time.time(),
    }
    return proc, info


def stop(proc: subprocess.Popen) -> None:
    """End a subprocess this run started, and its children (its own process group)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _first_line(text: str | None) -> str | None:
    text = (text or "").strip()
    return text.splitlines()[0] if text else None


#: Lines of a failing test's report kept in the results (its log stays outside them).
DETAIL_LINES = 25


def parse_junit(path: Path) -> list[dict]:
    """Per test: name, outcome (passed, failed, error, skipped), seconds, first line of
    the message, and for a failure or an error the last DETAIL_LINES of its report."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message, detail = "passed", None, None
        for child in case:
            tag = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(child.tag)
            if tag:
                outcome = tag
                message = _first_line(child.get("message") or child.text)
                if tag in ("failed", "error") and child.text:
                    detail = child.text.strip().splitlines()[-DETAIL_LINES:]
                break
        tests.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "time_s": float(case.get("time") or 0.0),
                "message": message,
                "detail": detail,
            }
        )
    return tests


def parse_verbose_log(text: str) -> list[dict]:
    """Per test from ``pytest -v`` output: what finished before a run was stopped."""
    tests = []
    for line in text.splitlines():
        m = VERBOSE_LINE.match(line)
        if m:
            outcome = {"XFAIL": "skipped", "XPASS": "passed"}.get(m.group(2), m.group(2).lower())
            tests.append({"test": m.group(1), "outcome": outcome, "time_s": None, "message": None})
    return tests


def finish_tests(proc: subprocess.Popen, info: dict, deadline: float) -> dict:
    """Wait for the tests until ``deadline`` (time.monotonic), then stop them; the verdict
    per test comes from the JUnit XML, or from the -v log when they were stopped."""
    timed_out = False
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        stop(proc)
    xml, log = Path(info["xml"]), Path(info["log"])
    if not timed_out and xml.is_file():
        tests = parse_junit(xml)
    else:
        tests = parse_verbose_log(log.read_text(errors="replace") if log.is_file() else "")
    counts = {o: sum(t["outcome"] == o for t in tests) for o in OUTCOMES}
    tail = None
    if not tests and log.is_file():  # pytest missing, a collection crash: say what it said
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return {
        "command": info["command"],
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "elapsed_s": time.time() - info["started"],
        "counts": counts,
        "tests": tests,
        "log": info["log"],
        "log_tail": tail,
    }


# --------------------------------------------------------------------------------------
# Compile warmers
# --------------------------------------------------------------------------------------


def compile_jobs(cfg: SessionConfig) -> list[dict]:
    """Every torch.compile the timing sections will do, in their order, except that the
    longest compiles (max-autotune: inductor benchmarks its choices) go first."""
    from bench import cases as C
    from bench.e2e import COMPILE_MODES

    jobs = []
    if "ops" in cfg.sections and "compiled" in cfg.backends:
        for case in C.cases(cfg.groups, cfg.ops):
            for dtype in cfg.time_dtypes:
                jobs.append({"kind": "op", "case": case.id, "dtype": dtype})
    if "step" in cfg.sections:
        for config, mode, precision, backend in cfg.step.cases():
            if mode in COMPILE_MODES:  # not eager, nor cuda-graphs (captured, not compiled)
                jobs.append(
                    {
                        "kind": "step", "config": config, "mode": mode,
                        "precision": precision, "backend": backend,
                    }
                )  # fmt: skip
    jobs.sort(key=lambda job: job.get("mode") != "max-autotune")
    return jobs[: cfg.warm_jobs]


def run_warmer(cfg: SessionConfig, index: int, count: int, log: Path) -> int:
    """Compile jobs index, index + count, ... (see :func:`compile_jobs`), one JSON line per
    job in ``log``. Populates inductor's on-disk caches; times nothing."""
    import torch

    from bench import cases as C
    from bench import e2e, harness

    by_id = {case.id: case for case in C.cases(cfg.groups, cfg.ops)}
    compiled = harness.CompiledOps(cfg.compile_backend)
    with open(log, "a") as out:
        for job in compile_jobs(cfg)[index::count]:
            t0 = time.monotonic()
            status, reason = "ok", None
            try:
                if job["kind"] == "op":
                    harness.prepare(
                        by_id[job["case"]], "compiled", "forward+backward", job["dtype"],
                        cfg.device, compiled,
                    )  # fmt: skip
                else:
                    s = cfg.step
                    e2e.build_step(
                        job["config"], job["mode"], job["precision"], job["backend"],
                        cfg.device, s.n, s.batch, cfg.smoke, warmup_steps=1,
                        compile_backend=cfg.compile_backend,
                    )  # fmt: skip
            except harness.Skip as exc:
                status, reason = "skipped", str(exc)
            except Exception as exc:  # the timed run meets it again and reports it there
                status, reason = "error", harness.error_detail(exc)["reason"]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            seconds = time.monotonic() - t0
            out.write(json.dumps({**job, "status": status, "reason": reason, "s": seconds}))
            out.write("\n")
            out.flush()
    return 0


def start_warmers(cfg: SessionConfig, argv: list[str], out_dir: Path) -> list[dict]:
    """``cfg.warm_processes`` warmer subprocesses (none when nothing is compiled)."""
    jobs = compile_jobs(cfg)
    count = min(cfg.warm_processes, len(jobs))
    # Each warmer's inductor compiles in a pool of worker processes: share the cores.
    threads = str(max(1, (os.cpu_count() or 1) // (count + 2)))
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": threads}
    env.setdefault("PYTHONPATH", str(REPO))
    warmers = []
    for k in range(count):
        log = out_dir / f"warm-{k}.jsonl"
        log.write_text("")
        cmd = [
            sys.executable, "-m", "bench", "gpu_session", *argv, "--warmer", f"{k}/{count}",
            "--warm-log", str(log),
        ]  # fmt: skip
        with open(out_dir / f"warm-{k}.log", "w") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        warmers.append({"proc": proc, "log": log})
    return warmers


def finish_warmers(warmers: list[dict], deadline: float, planned: int) -> dict:
    """Wait for the warmers until ``deadline``, stop the rest; what each compiled."""
    stopped = 0
    for w in warmers:
        try:
            w["proc"].wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop(w["proc"])
            stopped += 1
    jobs = []
    for w in warmers:
        for line in w["log"].read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                jobs.append(json.loads(line))
    return {
        "processes": len(warmers),
        "planned": planned,
        "done": len(jobs),
        "stopped_at_deadline": stopped,
        "counts": {s: sum(j["status"] == s for j in jobs) for s in ("ok", "skipped", "error")},
        "compile_s": sum(j["s"] for j in jobs),
        "jobs": jobs,
    }
