"""End-to-end training-step benchmark: steps/s and questions/s of the whole model.

    python -m bench e2e --device cuda --out bench/results/e2e-gpu.json
    python -m bench e2e --smoke --out /tmp/e2e.json        # CPU, tiny model

One step is what train.py does for one batch: forward (embedding, write, read, answer),
``model.loss``, backward, Adagrad step (lr 0.003, initial accumulator 0.1), gradients set
to None. Each case is a fresh model (seed 0) and a synthetic batch of B questions about one
story of n elements, crossed over

* config: the default ``sub`` and ``video_sub`` RWMNConfig (write "40-30-3", read "3-1-3");
* mode: ``eager``, ``compiled`` (``torch.compile(model)``; the optimiser step stays
  eager; compilation happens in the untimed warm-up steps), ``reduce-overhead``
  (``torch.compile(model, mode="reduce-overhead")``: inductor with CUDA graphs, each step
  marked with ``torch.compiler.cudagraph_mark_step_begin``; on the CPU there are no CUDA
  graphs and it runs as ``compiled``, which its row notes), ``max-autotune``
  (``torch.compile(model, mode="max-autotune")``: inductor benchmarks its matmul and
  kernel choices while compiling, and uses CUDA graphs as ``reduce-overhead`` does; off
  CUDA without them, and with another backend than inductor as ``compiled``: its row
  notes either) or ``cuda-graphs`` (train.py --cuda_graphs: the whole eager step, fused
  Adagrad included, replayed from a CUDA graph of the padded batch, rwmn.graphs; CUDA
  only, skipped elsewhere);
* precision: ``fp32``, or ``bf16`` (``torch.autocast`` bf16 around forward and loss; the
  parameters and the optimiser stay fp32);
* backend: ``reference`` or ``fused`` (``rwmn.ops.use_backend("triton")``; skipped with
  the reason where a fused op cannot run).

``--smoke`` shrinks the model (dims 24-64, n 40, B 4) so the CPU can run it in seconds.

May import: bench.harness, bench.timing and bench.run, rwmn.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from pathlib import Path

from bench import cli

CONFIGS = ("sub", "video_sub")
MODES = ("eager", "compiled", "reduce-overhead", "max-autotune", "cuda-graphs")
#: torch.compile modes of the compiled MODES (None: torch.compile's default).
COMPILE_MODES = {
    "compiled": None,
    "reduce-overhead": "reduce-overhead",
    "max-autotune": "max-autotune",
}
#: The compiled MODES in which inductor captures CUDA graphs (on CUDA, with inductor).
GRAPHED_COMPILE_MODES = ("reduce-overhead", "max-autotune")
PRECISIONS = ("fp32", "bf16")
BACKENDS = ("reference", "fused")
#: Optimiser of the release (SPEC section 5).
LR, INITIAL_ACCUMULATOR = 0.003, 0.1
#: The model's default batch: one story of n elements, B questions, A candidates.
N_STORY, BATCH = 1500, 32
#: Untimed steps before measuring (they include torch.compile's compilation).
WARMUP_STEPS = 3
#: A tiny model for CPU smoke runs (and the Triton interpreter).
SMOKE_DIMS = dict(
    dim_text=24, dim_memory=24, dim_rgb=32, dim_sub=24, dim_mcb=64, write="4-3-2", read="3-1-2"
)
SMOKE_N, SMOKE_BATCH = 40, 4
#: Timing budgets (seconds): a step is much longer than an op call.
MEASURE_S = {"cuda": 1.0, "cpu": 0.5}


def make_batch(cfg, n: int, batch: int, device, seed: int = 0):
    """A synthetic story, questions, candidates and targets with the model's shapes."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    if cfg.video:
        story = (randn(n, cfg.dim_rgb), randn(n, cfg.dim_sub))
    else:
        story = randn(n, cfg.dim_text)
    query = randn(batch, cfg.dim_text)
    answers = randn(batch, cfg.num_answer, cfg.dim_text)
    targets = torch.randint(cfg.num_answer, (batch,), generator=gen).to(device)
    return story, query, answers, targets


def _check_runnable(backend: str, precision: str, device: str, smoke: bool) -> None:
    from bench.harness import INTERPRETER_DTYPES, Skip

    if backend == "fused" and device == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise Skip("fused kernels need CUDA, or TRITON_INTERPRET=1 on CPU (--smoke)")
        if precision not in INTERPRETER_DTYPES:
            raise Skip(f"the Triton interpreter has no {precision}")
        if not smoke:
            raise Skip("the Triton interpreter runs the smoke model only")


def build_step(
    config,
    mode,
    precision,
    backend,
    device,
    n,
    batch,
    smoke,
    warmup_steps=WARMUP_STEPS,
    compile_backend="inductor",
):
    """A fresh model, optimiser and batch; returns the training-step callable after
    ``warmup_steps`` untimed steps (at least one in a compiled mode: that is where
    torch.compile compiles). Raises ``bench.harness.Skip`` where the backend cannot run."""
    import torch

    from bench.harness import Skip
    from rwmn import RWMN, RWMNConfig, ops
    from rwmn.loop import backward
    from rwmn.ops import BackendUnavailableError

    kind = torch.device(device).type
    _check_runnable(backend, precision, kind, smoke)
    cfg = RWMNConfig(data_source=config, **(SMOKE_DIMS if smoke else {}))
    torch.manual_seed(0)
    model = RWMN(cfg).to(device)
    opt = torch.optim.Adagrad(
        model.parameters(), lr=LR, initial_accumulator_value=INITIAL_ACCUMULATOR
    )
    story, query, answers, targets = make_batch(cfg, n, batch, device)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if mode == "cuda-graphs":
        return _graph_step(cfg, model, precision, backend, device, kind, batch,
                           (story, query, answers, targets), warmup_steps)  # fmt: skip
    forward = model
    if mode != "eager":
        torch._dynamo.reset()
        compile_mode = COMPILE_MODES[mode] if compile_backend == "inductor" else None
        forward = torch.compile(model, backend=compile_backend, mode=compile_mode)
    # CUDA graphs replay into the same output buffers: each step starts a new generation so
    # that the previous step's outputs (already consumed) may be overwritten.
    mark_step = mode in GRAPHED_COMPILE_MODES and kind == "cuda"
    autocast = (
        torch.autocast(kind, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    ops_backend = "triton" if backend == "fused" else "reference"

    def step():
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        with ops.use_backend(ops_backend):
            with autocast:
                loss = model.loss(forward(story, query, answers), targets)
            backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)

    if backend == "fused" and mode != "eager" and os.environ.get("TRITON_INTERPRET") == "1":
        # Interpreted kernels run eagerly in Python: inductor cannot trace them (the
        # kernels refuse it with a clear error), so this case needs a GPU.
        raise Skip("torch.compile of the fused model needs a GPU (Triton interpreter)")
    if backend == "fused":
        # Eager probe first: inside torch.compile the error would come back wrapped.
        try:
            with ops.use_backend("triton"):
                model(story, query, answers)
        except BackendUnavailableError as exc:
            raise Skip(str(exc)) from exc
    # A compiled mode compiles in its first step: at least that one stays untimed.
    for _ in range(warmup_steps if mode == "eager" else max(warmup_steps, 1)):
        step()
    step.cfg = cfg
    return step


def _graph_step(cfg, model, precision, backend, device, kind, batch, tensors, warmup_steps):
    """build_step's ``cuda-graphs`` mode: rwmn.graphs.GraphSteps on the batch."""
    import torch

    from bench.harness import Skip
    from rwmn import ops
    from rwmn.data.movieqa import QABatch
    from rwmn.graphs import GraphSteps

    if kind != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    story, query, answers, targets = tensors
    opt = torch.optim.Adagrad(
        model.parameters(), lr=LR, initial_accumulator_value=INITIAL_ACCUMULATOR, fused=True
    )
    amp = torch.bfloat16 if precision == "bf16" else None
    steps = GraphSteps(model, opt, batch, amp, torch.device(device))
    qa = QABatch("bench", story, query, answers, targets, ["q"] * batch)
    ops_backend = "triton" if backend == "fused" else "reference"

    def step():
        with ops.use_backend(ops_backend):
            steps.step(qa)

    for _ in range(max(warmup_steps, 1)):  # the first step captures
        step()
    step.cfg = cfg
    return step


def base_row(config, mode, precision, backend, n, batch, smoke) -> dict:
    """The identifying columns of a training-step row, before anything runs."""
    return {
        "kind": "e2e",
        "config": config,
        "mode": mode,
        "precision": precision,
        "backend": backend,
        "n": n,
        "batch": batch,
        "smoke": smoke,
        "status": "ok",
        "reason": None,
    }


def measure_step(
    config,
    mode,
    precision,
    backend,
    device,
    n,
    batch,
    smoke,
    nvtx=False,
    measure_s=None,
    warmup_steps=WARMUP_STEPS,
    compile_backend="inductor",
    budget=None,
) -> dict:
    """One e2e row: time per training step, steps/s, questions/s, peak memory.

    ``budget`` passes ``timing.time_fn``'s other bounds (fewest warm-up calls, fewest
    repetitions) for runs that must be short, such as a CPU smoke run."""
    import torch

    from bench import timing
    from bench.harness import Skip, error_detail
    from rwmn.profiling import nvtx_range

    row = base_row(config, mode, precision, backend, n, batch, smoke)
    kind = torch.device(device).type
    if mode == "cuda-graphs":  # the story length the captured step runs on
        from rwmn.padding import story_bucket

        row["padded_n"] = story_bucket(n)
    if mode in COMPILE_MODES:
        row["compile_backend"] = compile_backend
    if mode in GRAPHED_COMPILE_MODES and compile_backend != "inductor":
        row["note"] = f"{mode} is an inductor mode: with {compile_backend} it runs as compiled"
    elif mode in GRAPHED_COMPILE_MODES and kind != "cuda":
        row["note"] = "no CUDA graphs off CUDA" + (
            ": runs as compiled" if mode == "reduce-overhead" else ""
        )
    try:
        step = build_step(
            config, mode, precision, backend, device, n, batch, smoke,
            warmup_steps=warmup_steps, compile_backend=compile_backend,
        )  # fmt: skip
        cfg = step.cfg
        row["model"] = {"write": cfg.write, "read": cfg.read, "dim_memory": cfg.dim_memory}
        ctx = nvtx_range(f"bench/e2e/{config}/{mode}/{precision}/{backend}", "bench")
        with ctx if nvtx else contextlib.nullcontext():
            t = timing.time_fn(
                device, step, measure_s=measure_s or MEASURE_S[kind], **(budget or {})
            )
            peak, extra = timing.peak_memory(device, step)
    except Skip as exc:
        return {**row, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # recorded; the script exits non-zero
        return {**row, "status": "error", **error_detail(exc)}
    row.update(t.as_row())
    row["steps_per_s"] = 1e3 / t.median_ms
    row["questions_per_s"] = batch * row["steps_per_s"]
    row["peak_mem_bytes"], row["extra_mem_bytes"] = peak, extra
    return row


def _csv(value: str, allowed) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"{bad} not in {list(allowed)}")
    return items


def main(argv=None) -> int:
    p = cli.parser("e2e", __doc__)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--n", type=int, default=None, help=f"story length (default {N_STORY})")
    p.add_argument("--batch", type=int, default=None, help=f"questions (default {BATCH})")
    p.add_argument("--measure-s", type=float, default=None, help="timing budget per case")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--nvtx", action="store_true", help="NVTX ranges (model stages, per case)")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch

    from bench import timing
    from bench.run import RESULTS, exit_status, record
    from rwmn.profiling import nvtx_enabled

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    n = args.n or (SMOKE_N if args.smoke else N_STORY)
    batch = args.batch or (SMOKE_BATCH if args.smoke else BATCH)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = timing.environment(device)
    meta["argv"] = sys.argv[1:] if argv is None else list(argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"e2e-{meta['label'].lower()}-{stamp}.json"

    rows = []
    with nvtx_enabled() if args.nvtx else contextlib.nullcontext():
        for config in _csv(args.configs, CONFIGS):
            for backend in _csv(args.backends, BACKENDS):
                for precision in _csv(args.precisions, PRECISIONS):
                    for mode in _csv(args.modes, MODES):
                        row = measure_step(
                            config, mode, precision, backend, device, n, batch, args.smoke,
                            nvtx=args.nvtx, measure_s=args.measure_s,
                        )  # fmt: skip
                        record(row, meta, rows, out)
                        _print_e2e(row)
    return exit_status(rows, out)


def _print_e2e(row: dict) -> None:
    head = f"[{row['label']}] e2e {row['config']:<9} {row['backend']:<9} {row['precision']:<4} "
    head += f"{row['mode']:<8} n={row['n']} B={row['batch']} "
    if row["status"] == "ok":
        tail = (
            f"{row['median_ms']:9.3f} ms/step [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}]  "
            f"{row['steps_per_s']:.3g} steps/s  {row['questions_per_s']:.3g} questions/s"
        )
    else:
        tail = f"{row['status']}: {row['reason']}"
    print(head + tail, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
