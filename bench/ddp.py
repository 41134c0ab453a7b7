"""Data-parallel training throughput: train.py under torchrun with 1 and N processes.

    python -m bench ddp --out bench/results/ddp-cpu.json            # CPU, gloo, 1 and 2
    python -m bench ddp --device cuda --nproc 1 2 4 8 --out bench/results/ddp-gpu.json

Each row is one ``python -m torch.distributed.run --nproc_per_node N train.py`` launch
(loopback rendezvous) on a synthetic data set generated once into a temporary directory,
plus one single-process row with ``--movies_per_step N``: the same optimisation as N
ranks, on one device. The figures are read from the run's metrics.jsonl: steps/s from the
training time between the first and the last progress line (the first window, which
holds warm-up, is left out) and questions/s summed over the ranks. A step is one
optimizer update: world size x --movies_per_step movies of up to --batch_size questions.

On the CPU the processes share the machine's cores (one thread each: OMP_NUM_THREADS=1),
so the 2-process row measures DDP's overhead and the scaling the cores allow, not a GPU
figure.

May import: rwmn.data.synthetic; train.py runs in subprocesses.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import cli

REPO = Path(__file__).resolve().parent.parent
DATA = dict(
    train_movies=16, val_movies=4, test_movies=1, questions_per_movie=32, min_scenes=4,
    max_scenes=6, scene_len=10, dim_text=64, dim_sub=64, dim_rgb=64,
)  # fmt: skip
MODEL_FLAGS = ["--dim_text", "64", "--dim_memory", "64", "--dim_sub", "64", "--dim_rgb", "64",
               "--write", "4-3-2", "--read", "3-1-2", "--batch_size", "32"]  # fmt: skip
SMOKE_DATA = {**DATA, "train_movies": 4, "questions_per_movie": 8, "dim_text": 16,
              "dim_sub": 16, "dim_rgb": 16}  # fmt: skip
SMOKE_FLAGS = ["--dim_text", "16", "--dim_memory", "16", "--dim_sub", "16", "--dim_rgb", "16",
               "--write", "3-2-2", "--read", "3-1-2", "--batch_size", "8"]  # fmt: skip


def measure(data: str, out: Path, nproc: int, movies: int, device: str, steps: int,
            window: int, model_flags: list[str]) -> dict:  # fmt: skip
    """One launch; its steps/s and questions/s from metrics.jsonl."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    args = [
        # --standalone: torchrun binds its own free loopback port, so no port chosen here
        # can be taken by another process between the choice and the bind.
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc), "train.py",
        "--data_dir", data, "--out_dir", str(out), *model_flags, "--device", device,
        "--max_steps", str(steps), "--validation_step", str(window),
        "--full_validation_step", str(10 * steps), "--checkpoint_step", str(10 * steps),
        "--movies_per_step", str(movies),
    ]  # fmt: skip
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    row = {"processes": nproc, "movies_per_step": movies, "movies_per_update": nproc * movies}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {**row, "status": "error", "error": lines[-1:], "detail": lines[-120:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    first, last = train[0], train[-1]
    seconds = last["seconds"] - first["seconds"]
    later = train[1:]
    return {
        **row,
        "status": "ok",
        "steps": last["step"] - first["step"],
        "steps_per_s": round((last["step"] - first["step"]) / seconds, 2),
        "questions_per_s": round(sum(r["questions_per_second"] for r in later) / len(later), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("ddp", __doc__)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2],
                        help="process counts to launch (default: 1 2)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=120, help="steps per launch (default: 120)")
    parser.add_argument("--window", type=int, default=20,
                        help="steps per progress line (default: 20)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a tiny model and data set")
    parser.add_argument("--out", required=True, help="JSON results; a .md table beside it")
    args = parser.parse_args(argv)
    from rwmn.data.synthetic import SyntheticConfig, generate

    flags = SMOKE_FLAGS if args.smoke else MODEL_FLAGS
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate(data, SyntheticConfig(source="sub", **(SMOKE_DATA if args.smoke else DATA)))
        launches = [(n, 1) for n in args.nproc] + [(1, n) for n in args.nproc if n > 1]
        for nproc, movies in launches:
            out = Path(tmp) / f"run-{nproc}x{movies}"
            row = measure(str(data), out, nproc, movies, args.device, args.steps, args.window,
                          flags)  # fmt: skip
            print(json.dumps(row), flush=True)
            results.append(row)
    result = {
        "label": f"{args.device.upper()}{' smoke' if args.smoke else ''}",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "device": args.device,
        "model_flags": flags,
        "steps": args.steps,
        "window": args.window,
        "rows": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Data-parallel training throughput ({result['label']}, {result['date']})",
        "",
        f"`python -m bench ddp` on {result['machine']}; train.py under torchrun "
        f"(`{args.device}`, one thread per process), {args.steps} steps, the first "
        f"{args.window}-step window left out. A step is one optimizer update of "
        "processes x movies_per_step movies.",
        "",
        "| processes | movies/step per process | movies per update | steps/s | questions/s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        figures = (
            f"{r['steps_per_s']} | {r['questions_per_s']}" if r["status"] == "ok"
            else f"error: {r['error']} |"
        )  # fmt: skip
        lines.append(
            f"| {r['processes']} | {r['movies_per_step']} | {r['movies_per_update']} | {figures} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
