"""The run directory (``--out_dir``): what holds a run, its lock, and its metrics log.

    <out_dir>/run.lock            held (flock) by the live run; a file left by a killed run
                                  holds no lock (the kernel drops it when the process dies)
    <out_dir>/config.json         the run's configuration
    <out_dir>/metrics.jsonl       one JSON row per evaluation
    <out_dir>/tensorboard/        with --tensorboard
    <checkpoint_dir>/last.pt      (default <out_dir>/checkpoints) for --resume
    <checkpoint_dir>/best.pt      best full validation accuracy

A directory holds a run when any of config.json, metrics.jsonl, tensorboard/, last.pt or
best.pt exists. The lock uses ``fcntl.flock``: POSIX systems (Linux, macOS; elsewhere runs
are not locked); on a network file system it is as reliable as that file system's locks.

May import: rwmn.checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time

from rwmn.checkpoint import atomic_write_text

LOCK = "run.lock"
RUN_FILES = ("config.json", "metrics.jsonl", "tensorboard")
CHECKPOINTS = ("last.pt", "best.pt")
#: Temporary files of rwmn.checkpoint.atomic_write (suffix .tmp-<pid>) a kill can leave.
_TEMP = re.compile(r"^(last\.pt|best\.pt|config\.json|metrics\.jsonl)\.tmp-\d+$")


class RunDirError(ValueError):
    """The run directory cannot be used as asked (in use, holds a run, not a directory)."""


def check_directory_flag(path: str, flag: str) -> None:
    """Refuse a directory flag naming a file (or a path below a file) before anything runs."""
    probe = os.path.abspath(path)
    while True:
        if os.path.exists(probe):
            if not os.path.isdir(probe):
                where = "" if probe == os.path.abspath(path) else f" ({probe!r} is a file)"
                raise RunDirError(f"{flag} {path!r} is not a directory{where}")
            return
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent


def run_files(out_dir: str, ckpt_dir: str) -> list[str]:
    """The files and directories of a run present in ``out_dir`` and ``ckpt_dir``."""
    paths = [os.path.join(out_dir, name) for name in RUN_FILES]
    paths += [os.path.join(ckpt_dir, name) for name in CHECKPOINTS]
    return [p for p in paths if os.path.lexists(p)]


def remove_run(out_dir: str, ckpt_dir: str) -> list[str]:
    """Delete a run's files (for --overwrite); other files in the directory are kept."""
    removed = run_files(out_dir, ckpt_dir)
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed


def remove_temp_files(*directories: str) -> list[str]:
    """Delete the temporary files that a run killed while writing left behind. Only under
    the lock: no live run is writing them."""
    removed = []
    for directory in dict.fromkeys(directories):
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            if _TEMP.match(name):
                os.remove(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
    return removed


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<directory>/run.lock`` for the run's life.

    The lock file stays after the run (removing it would race with a run starting); its
    text names the pid that last held it, for the error message of a refused second run.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl  # POSIX only; imported here so that importing rwmn works anywhere
        except ImportError:  # no flock (Windows): runs are not locked there
            return
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: a live process holds it
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown pid"
            os.close(fd)
            raise RunDirError(
                f"run directory {self.directory!r} is in use by another run ({holder}); "
                "wait for it to end or choose another --out_dir"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def truncate_metrics(path: str, step: int) -> int:
    """Cut ``metrics.jsonl`` back to the rows of steps up to ``step`` (a checkpoint's): the
    resumed run logs the later ones again. A torn last line (a kill mid-write) is dropped.
    Returns how many lines were dropped; rewrites the file atomically if any were."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    kept, dropped = [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = number == len(lines)  # no newline after it: written in part
        try:
            row = json.loads(line)
            row_step = row["step"]
            if not isinstance(row_step, int):
                raise TypeError(row_step)
        except (ValueError, KeyError, TypeError) as exc:
            if last:
                dropped += 1
                continue
            raise RunDirError(
                f"{path}: line {number} is not a metrics row ({type(exc).__name__}); "
                "repair or remove the file to resume"
            ) from None
        if row_step <= step:
            kept.append(line.decode("utf-8"))
        else:
            dropped += 1
    if dropped or (data and not data.endswith(b"\n")):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped
