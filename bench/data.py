"""Input pipeline and loop benchmark: is train.py waiting for data?

    python -m bench data                       # CPU: writes bench/results/data-cpu.{json,md}
    python -m bench data --device cuda --out bench/results/data-gpu.json
    python -m bench data --smoke --out /tmp/data.json   # tiny, seconds (the test suite)

Two parts, on synthetic data in the release layout (rwmn.data.synthetic) with stories of
n = 1500 elements (50 scenes of 30), the MovieQA average:

1. **Loaders** (bench.pipeline.LOADERS): ms per batch of B = 32 questions, ``cold`` (the
   first batch of a freshly opened data set; for a cache, its build: every movie read,
   checked and stored, plus one batch) and ``warm`` (a later batch, median), for
   ``random_batch`` (the reader alone), ``random_batch+to(device)`` (train.py without a
   cache) and ``cache:none|host|device`` (train.py's --data_cache), for video_sub and sub.
2. **Training**: train.py's own steps/s (its progress lines, the first window left out as
   warm-up) against bench.e2e's model-only step (a fixed batch, no data, no loop) at the
   same configuration: ``TRAIN_CONFIG`` below. On the CPU that is the sub model at its
   default size (d = 300, write 40-30-3, read 3-1-3), n = 1500, B = 32, fp32, eager,
   reference ops, one thread: about 0.4 s a step on this project's CPU machine (150 steps,
   about a minute), the size the targets below are stated at. train.py's Adagrad is
   torch's fused one where torch has it, bench.e2e's torch's default (on the CPU the
   per-parameter loop), so train.py may come out slightly faster than the model-only step.

On the CPU the "device" of ``cache:device`` is the CPU: the cache is ordinary tensors in
memory and moving a batch "to the device" is free; ``cache:host`` has nothing to pin for
(no CUDA) and keeps ordinary memory, so it serves the same way. Both are written so.

May import: bench.pipeline, bench.e2e, bench.timing and bench.run, rwmn (its synthetic data
and train.py's main).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench import cli

#: Story length of the measurements: MovieQA's average (scenes x elements per scene).
SCENES, SCENE_LEN = 50, 30
BATCH = 32
#: The input pipeline's targets: warm ms per batch at video_sub n = 1500 B = 32 (CPU machine), and
#: train.py's steps/s as a fraction of the model-only step's.
TARGET_WARM_MS = {"cache:device": 0.1, "cache:host": 0.5}
TARGET_TRAIN_RATIO = 0.95


@dataclass(frozen=True)
class TrainBench:
    """The train.py-against-model-only comparison."""

    source: str = "sub"
    model: dict = field(default_factory=dict)  # RWMNConfig overrides (none: the defaults)
    n: int = SCENES * SCENE_LEN
    batch: int = BATCH
    movies: int = 8
    questions_per_movie: int = 40  # >= batch: every batch holds exactly `batch` questions
    max_steps: int = 150
    validation_step: int = 25  # the progress window train.py's steps/s is measured over
    scenes: int = SCENES
    scene_len: int = SCENE_LEN


TRAIN_CONFIG = TrainBench()
SMOKE_DIMS = dict(dim_text=24, dim_memory=24, dim_rgb=32, dim_sub=24, dim_mcb=64)
SMOKE_TRAIN = TrainBench(
    model=dict(SMOKE_DIMS, write="4-3-2", read="3-1-2"), n=40, batch=4, movies=2,
    questions_per_movie=6, max_steps=12, validation_step=4, scenes=4, scene_len=10,
)  # fmt: skip


def loader_rows(device: str, smoke: bool) -> list[dict]:
    from bench import pipeline

    dims = (("min_scenes", SCENES), ("max_scenes", SCENES), ("scene_len", SCENE_LEN))
    if smoke:
        widths = ("dim_text", "dim_rgb", "dim_sub")
        dims = (("min_scenes", 2), ("max_scenes", 2), ("scene_len", 5),
                *((k, v) for k, v in SMOKE_DIMS.items() if k in widths))  # fmt: skip
    cfg = pipeline.PipelineConfig(
        sources=("video_sub", "sub"), batch=4 if smoke else BATCH,
        train_movies=2 if smoke else 8, dims=dims, cold_reps=2 if smoke else 3,
        warm_measure_s=0.02 if smoke else 0.5,
    )  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="rwmn-bench-data-") as tmp:
        for source in cfg.sources:
            root = pipeline.make_data(source, Path(tmp) / source, cfg)
            for loader in pipeline.LOADERS:
                for phase in pipeline.PHASES:
                    row = pipeline.measure(loader, phase, source, root, cfg, device)
                    row["n"] = 10 if smoke else SCENES * SCENE_LEN
                    rows.append(row)
                    print(
                        f"loader {source:<9} {loader.name:<24} {phase:<4} "
                        f"{row['median_ms']:9.3f} ms/batch",
                        file=sys.stderr,
                        flush=True,
                    )
    return rows


def train_comparison(device: str, tb: TrainBench) -> dict:
    """train.py's steps/s and bench.e2e's model-only steps/s at configuration ``tb``."""
    from bench import e2e
    from rwmn.data.synthetic import SyntheticConfig, generate
    from rwmn.training import main

    dims = {k: v for k, v in tb.model.items() if k in ("dim_text", "dim_sub", "dim_rgb")}
    model_flags = [x for k, v in tb.model.items() for x in (f"--{k}", str(v))]
    with tempfile.TemporaryDirectory(prefix="rwmn-bench-train-") as tmp:
        generate(tmp, SyntheticConfig(
            source=tb.source, train_movies=tb.movies, val_movies=1, test_movies=1,
            questions_per_movie=tb.questions_per_movie, min_scenes=tb.scenes,
            max_scenes=tb.scenes, scene_len=tb.scene_len, **dims,
        ))  # fmt: skip
        out = Path(tmp) / "run"
        argv = [
            "--data_dir", tmp, "--data_source", tb.source, "--out_dir", str(out),
            "--device", device, "--backend", "reference", "--batch_size", str(tb.batch),
            "--max_steps", str(tb.max_steps), "--validation_step", str(tb.validation_step),
            "--full_validation_step", str(10 * tb.max_steps),
            "--checkpoint_step", str(10 * tb.max_steps), *model_flags,
        ]  # fmt: skip
        if main(argv) != 0:
            raise RuntimeError(f"train.py {' '.join(argv)} failed")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r["questions_per_second"] / tb.batch for r in rows if r["split"] == "train"]
    measured = windows[1:] or windows  # the first window holds the warm-up
    train_py = statistics.median(measured)
    # bench.e2e builds its model from RWMNConfig(data_source) plus SMOKE_DIMS when smoke.
    smoke = bool(tb.model)
    step = e2e.measure_step(
        tb.source, "eager", "fp32", "reference", device, tb.n, tb.batch, smoke,
        measure_s=0.3 if smoke else 2.0,
    )  # fmt: skip
    if step["status"] != "ok":
        raise RuntimeError(f"bench.e2e step: {step['status']}: {step.get('reason')}")
    return {
        "config": {**tb.__dict__, "precision": "fp32", "mode": "eager", "backend": "reference"},
        "train_py_steps_per_s": train_py,
        "train_py_windows_steps_per_s": windows,
        "model_only_steps_per_s": step["steps_per_s"],
        "model_only_median_ms": step["median_ms"],
        "ratio": train_py / step["steps_per_s"],
    }


def markdown(meta: dict, loaders: list[dict], train: dict) -> str:
    label = meta["label"]
    lines = [
        f"# Input pipeline and loop ({label}): `python -m bench data`",
        "",
        f"{meta.get('device_name') or meta['device']}, torch {meta['torch']}, "
        f"{meta.get('threads')} thread(s), commit {meta.get('git_commit')}, {meta['date']}.",
    ]
    if meta["device"] == "cpu":
        lines += [
            "",
            "**CPU figures.** The device is the CPU: `cache:device` is ordinary tensors in "
            "memory and the copy to the device is a no-op; `cache:host` has no CUDA to pin "
            "for and serves from ordinary memory the same way. No GPU figure is claimed.",
        ]
    lines += [
        "",
        f"## Loader: ms per batch (synthetic data, n = {loaders[0]['n']}, "
        f"B = {loaders[0]['batch']})",
        "",
        "| source | loader | cold ms | warm ms (p20-p80) | target (warm) |",
        "|---|---|---:|---:|---|",
    ]
    by = {(r["source"], r["loader"], r["phase"]): r for r in loaders}
    for source, loader, phase in by:
        if phase != "cold":
            continue
        cold, warm = by[(source, loader, "cold")], by[(source, loader, "warm")]
        target = ""
        if source == "video_sub" and loader in TARGET_WARM_MS:
            goal = TARGET_WARM_MS[loader]
            met = "met" if warm["median_ms"] <= goal else "MISSED"
            target = f"<= {goal} ms: {met}"
        spread = f" ({warm['p20_ms']:.4f}-{warm['p80_ms']:.4f})" if "p20_ms" in warm else ""
        lines.append(
            f"| {source} | {loader} | {cold['median_ms']:.2f} | "
            f"{warm['median_ms']:.4f}{spread} | {target} |"
        )
    cfg = train["config"]
    ratio = train["ratio"]
    windows = train["train_py_windows_steps_per_s"]
    model = cfg["model"] or "defaults (d 300, write 40-30-3, read 3-1-3)"
    lines += [
        "",
        "Cold: the first batch of a freshly opened data set; for a cache, its build (every "
        "movie of the split read, checked and stored) plus that batch.",
        "",
        "## train.py against the model-only step",
        "",
        f"Configuration: {cfg['source']}, model {model}, n = {cfg['n']}, "
        f"B = {cfg['batch']}, fp32, eager, reference "
        f"ops, --data_cache auto, prefetch on; train.py steps/s is the median of its "
        f"progress windows of {cfg['validation_step']} steps, the first left out.",
        "",
        "| | steps/s |",
        "|---|---:|",
        f"| bench.e2e model-only step | {train['model_only_steps_per_s']:.2f} |",
        f"| train.py | {train['train_py_steps_per_s']:.2f} |",
        f"| ratio | {ratio:.1%} (target >= {TARGET_TRAIN_RATIO:.0%}: "
        f"{'met' if ratio >= TARGET_TRAIN_RATIO else 'MISSED'}) |",
        "",
        f"train.py per window: {', '.join(f'{w:.2f}' for w in windows)} steps/s."
        " train.py's Adagrad is torch's fused one where torch has it (CPU here), the "
        "model-only step's torch's default (the per-parameter loop on the CPU): a ratio above "
        "100% comes from that and from noise, not from the loop being faster than no loop.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = cli.parser("data", __doc__)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--smoke", action="store_true", help="tiny data and model, seconds (CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (a .md is written beside)")
    args = p.parse_args(argv)

    import torch

    from bench import timing
    from bench.run import RESULTS

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.set_num_threads(args.threads)
    meta = timing.environment(device)
    meta["threads"] = args.threads
    meta["smoke"] = args.smoke
    meta["argv"] = sys.argv[1:] if argv is None else list(argv)
    meta.setdefault("date", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    out = args.out or RESULTS / f"data-{meta['label'].lower()}.json"
    loaders = loader_rows(device, args.smoke)
    train = train_comparison(device, SMOKE_TRAIN if args.smoke else TRAIN_CONFIG)
    print(
        f"train.py {train['train_py_steps_per_s']:.2f} steps/s, model-only "
        f"{train['model_only_steps_per_s']:.2f} steps/s ({train['ratio']:.1%})",
        file=sys.stderr,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "loaders": loaders, "train": train}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, loaders, train))
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
