"""Hardening: untrusted checkpoints, run directories, resume, bad files and flags.

One test (or one parametrized test) per item of the issue, named after it; items 4, 7 and
8 (the data reader and the synthetic generator) are tested in tests/test_data.py as well.
The kill-and-resume test runs train.py in subprocesses and SIGKILLs them at random moments,
including in the middle of a checkpoint write; the hooks that kill live in a wrapper script
written by the test, not in the package.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from tiny_run import DIM, REPO, TINY_DATA, TINY_FLAGS

from rwmn import ops
from rwmn.data.synthetic import SyntheticConfig, generate
from rwmn.rundir import RunLock
from rwmn.training import UNUSED_RELEASE_FLAGS, build_parser, main


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    generate(root, SyntheticConfig(source="sub", **TINY_DATA))
    return str(root)


def _run(data_dir, out, *extra) -> int:
    return main(["--data_dir", str(data_dir), "--out_dir", str(out), *TINY_FLAGS, *extra])


def _state(out: Path, name: str = "last.pt") -> dict:
    return torch.load(out / "checkpoints" / name, weights_only=True)


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` and its bytes (to show nothing was written)."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "run.lock"
    }


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("train.py: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", **extra}


# --------------------------------------------------------------------------------------
# 1. Loading a checkpoint never runs code from it
# --------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this object runs a shell command (what an attacker would ship)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_checkpoint_is_not_run(data, tmp_path, capsys):
    """An rwmn-looking checkpoint with a code-running pickle inside, given as
    --checkpoint_file, --pretrain and as the last.pt of --resume: refused with one line
    naming the file, and the payload's side effect (a marker file) never appears."""
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    good_run = tmp_path / "good"
    assert _run(data, good_run, "--max_steps", "1") == 0
    state = _state(good_run)
    state["model_config"] = {**state["model_config"], "payload": _Payload(marker)}
    torch.save(state, evil)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(evil.read_bytes())

    for flags, path in (
        (["--eval_only", "--checkpoint_file", str(evil)], evil),
        (["--pretrain", str(evil)], evil),
        (["--resume"], run / "checkpoints" / "last.pt"),
    ):
        out = run if "--resume" in flags else tmp_path / "out"
        assert _run(data, out, "--max_steps", "2", *flags) == 2
        assert not marker.exists(), f"the pickle payload ran with {flags}"
        _one_line_error(capsys, f"{str(path)!r} cannot be loaded safely", "nothing in it was run")
        assert not (tmp_path / "out").exists()
    # The payload is live: an unsafe load runs it (so the checks above can fail).
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_unusable_checkpoints(data, tmp_path, capsys):
    """Safe to load but not a usable checkpoint, or truncated: one line naming file (and
    key); a dict without model_config was a KeyError traceback."""
    partial = tmp_path / "partial.pt"
    torch.save({"format": 1, "model": {}}, partial)
    assert _run(data, tmp_path / "out", "--eval_only", "--checkpoint_file", str(partial)) == 2
    _one_line_error(capsys, f"checkpoint {str(partial)!r} has no 'model_config'")
    typed = tmp_path / "typed.pt"
    torch.save({"format": 1, "model": {"w": "not a tensor"}, "model_config": {}}, typed)
    assert _run(data, tmp_path / "out", "--pretrain", str(typed)) == 2
    _one_line_error(capsys, str(typed), "'model' holds 'w', not a named tensor")
    assert _run(data, tmp_path / "run", "--max_steps", "1") == 0
    truncated = tmp_path / "truncated.pt"
    whole = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    assert _run(data, tmp_path / "out", "--eval_only", "--checkpoint_file", str(truncated)) == 2
    _one_line_error(capsys, f"checkpoint {str(truncated)!r} cannot be read (")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------
# 2. A run directory is not reused silently, and one live run owns it
# --------------------------------------------------------------------------------------


def test_run_directory_holding_a_run_is_refused(data, tmp_path, capsys):
    out = tmp_path / "A"
    assert _run(data, out, "--max_steps", "6") == 0
    before = _snapshot(out)
    assert {"config.json", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt"} <= set(
        before
    )
    capsys.readouterr()
    assert _run(data, out, "--max_steps", "2") == 2
    _one_line_error(capsys, "holds a run", "--resume", "--overwrite")
    assert _snapshot(out) == before  # last.pt still step 6, metrics not appended to

    (out / "notes.txt").write_text("mine")
    assert _run(data, out, "--max_steps", "4", "--overwrite") == 0
    assert _state(out)["step"] == 4
    assert not (out / "checkpoints" / "best.pt").exists()  # the old run's best is gone
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 3 and len(rows) == 2  # only the new run's rows
    assert (out / "notes.txt").read_text() == "mine"  # not a file of the run: kept


def test_second_live_run_is_refused_and_a_stale_lock_is_not(data, tmp_path, capsys):
    """A live process holding the run's lock keeps a second run out (exit 2, nothing
    written); once that process is killed (-9) its lock file is stale and ignored."""
    out = tmp_path / "A"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from rwmn.rundir import RunLock
            lock = RunLock({str(out)!r})
            lock.acquire()
            print("locked", flush=True)
            sys.stdin.read()
        """)],
        env=_subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _run(data, out, "--max_steps", "2") == 2
        _one_line_error(capsys, "in use by another run", f"pid {holder.pid}")
        assert sorted(os.listdir(out)) == ["run.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert (out / "run.lock").exists()  # left by the killed process: stale
    assert _run(data, out, "--max_steps", "2") == 0
    assert _state(out)["step"] == 2
    with RunLock(str(out)), pytest.raises(ValueError, match="in use"):
        RunLock(str(out)).acquire()  # a lock held in this process excludes too


# --------------------------------------------------------------------------------------
# 3. Resume restores the log: kills at random moments, metrics.jsonl equals an
#    uninterrupted run's
# --------------------------------------------------------------------------------------

#: Runs train.py's main with a kill planted by the test (json in argv[1]):
#: {"save": n} SIGKILL after writing half of the n-th checkpoint file of this process;
#: {"save_of": "best.pt"} the same on the first write of best.pt;
#: {"row": n} SIGKILL after writing half of the n-th metrics row (a torn line);
#: {"step": n} SIGKILL right after training step n; {"slow": s} sleep s per step.
KILL_WRAPPER = """
import io, json, os, signal, sys, time
import torch
from rwmn import training

spec = json.loads(sys.argv[1])


def die():
    os.kill(os.getpid(), signal.SIGKILL)


real_save, saves = torch.save, [0]


def save(obj, f, *args, **kwargs):
    saves[0] += 1
    name = os.path.basename(getattr(f, "name", ""))
    if saves[0] == spec.get("save") or name.startswith(spec.get("save_of", "-") + ".tmp"):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        die()
    return real_save(obj, f, *args, **kwargs)


torch.save = save
real_record, rows = training.Trainer.record, [0]


def record(self, split, acc, loss, **extra):
    rows[0] += 1
    if rows[0] == spec.get("row"):
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": self.step, "split": split, "acc": acc})[:20])
        die()
    return real_record(self, split, acc, loss, **extra)


training.Trainer.record = record
real_step = training.Trainer.train_step


def train_step(self, batch):
    result = real_step(self, batch)
    time.sleep(spec.get("slow", 0))
    if self.step == spec.get("step"):
        die()
    return result


training.Trainer.train_step = train_step
sys.exit(training.main(sys.argv[2:]))
"""

KILL_FLAGS = [*TINY_FLAGS, "--max_steps", "40", "--checkpoint_step", "4", "--init_lr", "0.05",
              "--early_stop", "30"]  # fmt: skip


def _train_process(wrapper: Path, spec: dict, data_dir: str, out: Path, *extra: str):
    args = [sys.executable, str(wrapper), json.dumps(spec), "--data_dir", data_dir]
    args += ["--out_dir", str(out), *KILL_FLAGS, *extra]
    # One thread: a tiny model's steps are 10x slower with two on a loaded machine. No
    # Triton interpreter: the reference ops on CPU, and the kernels are not imported.
    env = _subprocess_env(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "questions_per_second")}
            for r in rows]  # fmt: skip


def test_kill_and_resume_equals_an_uninterrupted_run(data, tmp_path):
    """SIGKILL a run again and again (during checkpoint writes of last.pt and best.pt,
    while a metrics row is half written, after a random step, and from outside at a random
    time), resume it each time: its metrics.jsonl (times aside), weights, optimizer state
    and best checkpoint equal an uninterrupted run's, time goes on, no temporary file is
    left."""
    wrapper = tmp_path / "kill_wrapper.py"
    wrapper.write_text(KILL_WRAPPER)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    done = _train_process(wrapper, {}, data, whole)
    rng = random.Random(9)
    kills = [
        {"save": 1},  # the first checkpoint (step 0): nothing to resume from yet
        {"save_of": "best.pt"},  # at the first full validation (step 5)
        {"step": rng.randint(6, 12)},
        {"save": rng.randint(2, 3)},
        {"row": rng.randint(2, 5)},  # a torn last line
        {"external": rng.uniform(0.0, 0.3)},
    ]
    for spec in kills:
        resume = (parts / "checkpoints" / "last.pt").exists()
        flags = ["--resume"] if resume else []
        if "external" in spec:  # from outside, at a random time into training
            proc = _train_process(wrapper, {"slow": 0.05}, data, parts, *flags)
            for line in proc.stdout:
                if line.startswith("training on"):
                    break
            time.sleep(spec["external"])
            proc.kill()
        else:
            proc = _train_process(wrapper, spec, data, parts, *flags)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, (spec, proc.returncode, err[-2000:])
        if "save" in spec or "save_of" in spec:  # the half-written file of the kill
            assert list((parts / "checkpoints").glob("*.pt.tmp-*")), spec
    final = _train_process(wrapper, {}, data, parts, "--resume")
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err[-2000:]
    assert "resumed from" in out
    _, err = done.communicate(timeout=120)
    assert done.returncode == 0, err[-2000:]

    assert not list(parts.rglob("*.tmp-*")), "temporary files of killed writes left behind"
    a, b = _rows(whole), _rows(parts)
    assert _timeless(a) == _timeless(b)
    seconds = [r["seconds"] for r in b]
    assert seconds == sorted(seconds), "time restarted after a resume"
    for name in ("last.pt", "best.pt"):
        sa, sb = _state(whole, name), _state(parts, name)
        assert sa["step"] == sb["step"]
        for key, value in sa["model"].items():
            assert torch.equal(value, sb["model"][key]), (name, key)
    sa, sb = _state(whole), _state(parts)
    assert sa["step"] == 40
    for va, vb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(),
                      strict=True):  # fmt: skip
        assert torch.equal(va["sum"], vb["sum"])
    assert sa["rng"]["numpy_sampler"] == sb["rng"]["numpy_sampler"]


# --------------------------------------------------------------------------------------
# 4. Unreadable HDF5 files: exit 2, one line naming the file, nothing written
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spoil", ["truncated story.h5", "random-byte QA file", "string story"])
def test_unreadable_data_files(data, tmp_path, capsys, spoil):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    story = root / "sub" / "story.h5"
    qa = sorted((root / "sub" / "val").iterdir())[0]
    if spoil == "truncated story.h5":
        story.write_bytes(story.read_bytes()[:1000])
        needle = f"{story}: cannot be read"
    elif spoil == "random-byte QA file":
        qa.write_bytes(np.random.default_rng(0).bytes(3000))
        needle = f"{qa}: cannot be read"
    else:
        with h5py.File(story, "a") as f:
            movie = sorted(f)[0]
            shape = f[movie].shape
            del f[movie]
            f[movie] = np.full(shape, b"x")
        needle = f"{story}:{movie} has dtype"
    out = tmp_path / "out"
    assert _run(root, out, "--max_steps", "2") == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


# --------------------------------------------------------------------------------------
# 5. Bad flags and values: exit 2, one line, before anything is written
# --------------------------------------------------------------------------------------

BAD_FLAGS = {
    "--device nonsense": (["--device", "nonsense"], "--device 'nonsense'"),
    "--device cuda:abc": (["--device", "cuda:abc"], "--device 'cuda:abc'"),
    "--device mps": (["--device", "mps"], "--device 'mps'"),
    "--seed -1": (["--seed", "-1"], "--seed"),
    "--init_lr -1": (["--init_lr", "-1"], "--init_lr"),
    "--init_lr inf": (["--init_lr", "inf"], "--init_lr"),
    "--init_accumulator_value -1": (["--init_accumulator_value", "-1"], "--init_accumulator"),
    "--learning_rate_decay_rate 0": (["--learning_rate_decay_rate", "0"], "--learning_rate"),
    "--sharp nan": (["--sharp", "nan"], "--sharp"),
    "--reg -1": (["--reg", "-1"], "--reg"),
    "--amp bogus": (["--amp", "bogus"], "--amp"),
    "--resume --overwrite": (["--resume", "--overwrite"], "--overwrite"),
    "--resume --eval_only": (["--resume", "--eval_only", "--checkpoint_file", "x"], "--resume"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flags(data, tmp_path, capsys, case):
    flags, needle = BAD_FLAGS[case]
    out = tmp_path / "out"
    try:
        status = _run(data, out, "--max_steps", "2", *flags)
    except SystemExit as exc:  # argparse (a choice): the same one line, exit 2
        status = exc.code
    assert status == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_bad_paths(data, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert _run(data, a_file, "--max_steps", "2") == 2
    _one_line_error(capsys, f"--out_dir {str(a_file)!r} is not a directory")
    assert _run(data, a_file / "sub", "--max_steps", "2") == 2
    _one_line_error(capsys, "is a file")
    assert _run(a_file, tmp_path / "out", "--max_steps", "2") == 2
    _one_line_error(capsys, f"--data_dir {str(a_file)!r} is a file, not a directory")
    assert a_file.read_text() == "x" and not (tmp_path / "out").exists()


def test_backend_triton_without_cuda(data, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs --backend triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "out"
    assert _run(data, out, "--max_steps", "2", "--backend", "triton") == 2
    _one_line_error(capsys, "--backend triton needs a CUDA device")
    assert not out.exists()  # config.json was written before the step-1 failure
    assert _run(data, out, "--max_steps", "2", "--device", "cuda") == 2
    _one_line_error(capsys, "--device cuda: CUDA is not available on this machine")
    assert not out.exists()


def test_bogus_rwmn_backend_variable(data, tmp_path):
    """Was a traceback at import time (exit 1)."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--data_dir", data, "--out_dir", str(out),
         *TINY_FLAGS, "--max_steps", "1"],
        env=_subprocess_env(RWMN_BACKEND="bogus"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "train.py: error: RWMN_BACKEND='bogus': unknown backend; expected one of "
        "reference, triton, auto"
    )
    assert not out.exists()


def test_config_mismatch_is_one_line(data, tmp_path, capsys):
    assert _run(data, tmp_path, "--max_steps", "1") == 0
    ckpt = str(tmp_path / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert _run(data, tmp_path, "--eval_only", "--checkpoint_file", ckpt,
                "--read", "3-1-3", "--dim_mcb", "24") == 2  # fmt: skip
    _one_line_error(capsys, "another model configuration", "--read '3-1-3' (checkpoint: "
                    "'3-1-2')", "--dim_mcb 24 (checkpoint: 20)")  # fmt: skip


def test_unknown_backend_is_reported_on_use(monkeypatch):
    monkeypatch.setattr(ops._STATE, "backend", "bogus")
    with pytest.raises(ops.BackendUnavailableError, match="RWMN_BACKEND='bogus'"):
        ops.get_backend()
    with pytest.raises(ops.BackendUnavailableError, match="RWMN_BACKEND='bogus'"):
        ops.resolve_backend("cbp", torch.zeros(1))


# --------------------------------------------------------------------------------------
# 6. --resume with flags that differ from the checkpoint; early-stopped and finished runs
# --------------------------------------------------------------------------------------


def test_resume_refuses_changed_flags_unless_allowed(data, tmp_path, capsys):
    out = tmp_path / "A"
    assert _run(data, out, "--max_steps", "6") == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert _run(data, out, "--max_steps", "12", "--resume", "--init_lr", "0.5",
                "--batch_size", "2") == 2  # fmt: skip
    _one_line_error(capsys, "--init_lr 0.5 (checkpoint: 0.003)", "--batch_size 2",
                    "--allow_resume_changes")  # fmt: skip
    for flags in (["--seed", "3"], ["--dim_memory", "16"], ["--init_accumulator_value", "1"]):
        assert _run(data, out, "--max_steps", "12", "--resume", "--allow_resume_changes",
                    *flags) == 2  # fmt: skip
        _one_line_error(capsys, "cannot change within a run", flags[0])
    assert _snapshot(out) == before

    # Flags not given are the checkpoint's: no model flags needed to continue.
    argv = ["--data_dir", data, "--out_dir", str(out), "--resume"]
    assert main([*argv, "--max_steps", "9"]) == 0
    assert _state(out)["step"] == 9
    assert main([*argv, "--max_steps", "12", "--init_lr", "0.5", "--allow_resume_changes"]) == 0
    state = _state(out)
    assert state["step"] == 12
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.5]
    assert state["scheduler"]["base_lrs"] == [0.5]
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["init_lr"] == 0.5 and config["train"]["max_steps"] == 12
    assert config["model"]["dim_text"] == DIM
    assert {"step": 9, "flag": "--init_lr", "from": 0.003, "to": 0.5} in config["changes"]
    assert "--resume: --init_lr 0.5 (checkpoint: 0.003)" in capsys.readouterr().out


def test_resume_of_stopped_runs_does_not_train(data, tmp_path, capsys):
    out = tmp_path / "A"
    # lr 0: no improvement after the first full validation (step 5); stops at step 10.
    assert _run(data, out, "--max_steps", "200", "--early_stop", "1", "--init_lr", "0") == 0
    assert _state(out)["step"] == 10
    before = _snapshot(out)
    capsys.readouterr()
    assert _run(data, out, "--max_steps", "200", "--resume") == 0
    printed = capsys.readouterr().out
    assert "stopped early at step 10" in printed and "not training" in printed
    assert _snapshot(out) == before
    assert _run(data, out, "--max_steps", "200", "--resume", "--early_stop", "3") == 0
    assert _state(out)["step"] == 20  # two more validations without gain: 3 in a row
    before = _snapshot(out)
    capsys.readouterr()
    assert _run(data, out, "--max_steps", "20", "--resume", "--early_stop", "9") == 0
    assert "complete at step 20" in capsys.readouterr().out
    assert _snapshot(out) == before


# --------------------------------------------------------------------------------------
# 9. --help, the summary line, the benchmark suites as plain tests
# --------------------------------------------------------------------------------------


def test_help_documents_every_flag():
    """Every flag of train.py --help has help text and shows its default; --max_steps and
    --early_stop say how they work with --resume."""
    parser = build_parser()
    text = parser.format_help()
    blocks: dict[str, str] = {}
    flag = None
    listed = text.split("options:", 1)[1].split("release flags its code never used:")[0]
    for line in listed.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            blocks[flag] = line
        elif line.startswith("    ") and flag:
            blocks[flag] += " " + line
        else:
            flag = None  # a group title or description
    blocks.pop("-h")
    unused = {f"--{name}" for name in UNUSED_RELEASE_FLAGS}
    expected = {f"--{dest}" for dest in vars(parser.parse_args([]))} - unused
    assert set(blocks) == expected
    for flag, block in blocks.items():
        body = " ".join(block.split()[1:])
        assert "default" in body, f"{flag}: no default shown: {body}"
        assert len(body.split("(default")[0].split()) >= 3, f"{flag}: no help text: {body}"
    flat = " ".join(text.split())
    assert all(name in flat for name in unused)  # the unused ones: listed in their group
    assert "with --resume it is the run's total, not a number of further steps" in flat
    assert "with --resume, raise it to train an early-stopped run on" in flat


def test_summary_without_full_validation(data, tmp_path, capsys):
    assert _run(data, tmp_path, "--max_steps", "2") == 0
    printed = capsys.readouterr().out
    assert "-inf" not in printed
    assert "no full validation ran (every --full_validation_step 5)" in printed


@pytest.mark.slow
def test_benchmark_suites_run_with_benchmark_disable():
    """`pytest bench --benchmark-disable` crashed reading benchmark.stats (None)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         "--bench-device", "cpu", "--bench-e2e-smoke", "bench/test_bench_e2e.py",
         "bench/test_bench_ops.py", "-k", "sub-eager-fp32-reference or "
         "memory_conv/smoke-write-fp32-reference-forward]"],
        cwd=REPO, env=_subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"\b3 passed", done.stdout), done.stdout[-2000:]


# --------------------------------------------------------------------------------------
# 10. The README and docs/ stay inside the repository
# --------------------------------------------------------------------------------------


def test_documentation_links_stay_in_the_repository():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) >= 2
    for page in pages:
        text = page.read_text()
        assert "../shared" not in text and "SPEC.md" not in text, page
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(REPO), (page, target)
            assert resolved.exists(), (page, target)
