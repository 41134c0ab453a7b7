"""The GPU session itself: the guarded case runner, the sections in order, and ``main``.

``python -m bench gpu_session`` (and ``python -m bench.gpu_session``) run :func:`main`; the
package docstring says what a run does. May import: bench.gpu_session.config, .procs,
.kernel_census, .report, bench's measuring modules (cases, checks, harness, pipeline,
e2e, timing, run), rwmn and torch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from bench.gpu_session import procs
from bench.gpu_session import report as rep
from bench.gpu_session.config import (
    CEILING_DTYPES,
    RESULTS,
    SessionConfig,
    build_config,
    parse_args,
)

# --------------------------------------------------------------------------------------
# Guards: time limits, injected errors
# --------------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """A case ran past its share of the budget. A BaseException so that no ``except
    Exception`` inside torch (compile fallbacks) swallows it on its way out."""


class InjectedError(RuntimeError):
    """Raised in place of a case named by --inject-error (how CI proves that a failing
    case is reported in its row and the run goes on)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`CaseTimeout` in the block after ``seconds`` (SIGALRM; main thread on
    POSIX only, elsewhere no limit)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or seconds <= 0:
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout(f"ran past its {seconds:.0f} s share of the time budget")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class Session:
    """One run: its clock, results, output files, and the guarded case runner."""

    def __init__(
        self, cfg: SessionConfig, meta: dict, out_dir: Path, stem: str, start: float
    ) -> None:
        self.cfg = cfg
        #: time.monotonic() when the process started work: imports count against the budget.
        self.start = start
        self.out_dir, self.stem = out_dir, stem
        self.json_path = out_dir / f"{stem}.json"
        self.md_path = out_dir / f"{stem}.md"
        self.results: dict = {
            "meta": meta,
            "tests": None,
            "checks": {"ops": [], "model": []},
            "census": [],
            "warm": None,
            "rows": [],
            "pipeline": [],
            "notes": [],
            "summary": [],
        }

    # -- clock --------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def deadline(self, fraction: float) -> float:
        """time.monotonic() of a budget fraction."""
        return self.start + self.cfg.budget.at(fraction)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time a section into meta["sections_s"] (where a run's budget went). A section
        that crashes outside its cases (a bug here, not in what it measures) is recorded
        in meta["section_errors"] and the run goes on to the next."""
        from bench.harness import error_detail

        t0 = time.monotonic()
        print(f"== {name} (at {self.elapsed():.0f} s)", file=sys.stderr, flush=True)
        try:
            yield
        except Exception as exc:
            detail = error_detail(exc)
            self.results["meta"]["section_errors"][name] = detail
            self.note(f"section {name} crashed: {detail['reason']}")
        finally:
            self.results["meta"]["sections_s"][name] = round(time.monotonic() - t0, 1)

    def note(self, text: str) -> None:
        self.results["notes"].append(text)
        print(f"note: {text}", file=sys.stderr, flush=True)

    # -- cases --------------------------------------------------------------------------
    def run_case(self, case_id: str, base: dict, fn: Callable[[], dict], by: float) -> dict:
        """``fn()``'s row, or ``base`` marked skipped (no time left before budget fraction
        ``by``) or error (whatever it raised, a timeout included)."""
        import torch

        from bench.harness import error_detail

        left = self.deadline(by) - time.monotonic()
        t0 = time.monotonic()
        if left < self.cfg.budget.min_case_s:
            row = {
                **base,
                "status": "skipped",
                "reason": f"time budget: section deadline at {self.cfg.budget.at(by):.0f} s "
                f"of {self.cfg.budget.total_s:.0f} s reached",
            }
        else:
            try:
                with time_limit(min(self.cfg.budget.case_s, left)):
                    for pattern in self.cfg.inject_errors:
                        if fnmatch.fnmatchcase(case_id, pattern):
                            raise InjectedError(f"--inject-error {pattern!r} matched {case_id}")
                    row = fn()
            except CaseTimeout as exc:
                row = {**base, "status": "error", **error_detail(exc)}
                torch._dynamo.reset()  # a compile may have been cut off half-way
            except Exception as exc:
                row = {**base, "status": "error", **error_detail(exc)}
        row = {**row, "case_id": case_id, "case_s": round(time.monotonic() - t0, 3)}
        _print_row(row)
        return row

    def timed_row(self, case_id: str, base: dict, fn: Callable[[], dict], by: float) -> None:
        """:meth:`run_case`, its row stamped with the run's metadata (as bench.run's rows
        are) and kept among the timing rows, and the JSON rewritten."""
        from bench.run import ROW_META

        row = self.run_case(case_id, base, fn, by)
        row.update({k: self.results["meta"][k] for k in ROW_META})
        self.results["rows"].append(row)
        self.write()

    # -- output -------------------------------------------------------------------------
    def write(self) -> None:
        """The JSON, rewritten after every case: a run cut short keeps what it measured.
        ``meta`` and ``rows`` are what bench.report reads; the other keys are the session's
        own sections."""
        self.results["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(self.json_path)

    def write_markdown(self) -> None:
        self.md_path.write_text(rep.markdown(self.cfg, self.results))


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def section_ceilings(s: Session) -> None:
    from bench import cases as C
    from bench import timing
    from bench.harness import error_detail

    try:
        dtypes = {d: C.DTYPES[d] for d in CEILING_DTYPES}
        s.results["meta"]["ceilings"] = timing.measure_ceilings(s.cfg.device, dtypes, tf32=True)
    except Exception as exc:
        s.results["meta"]["ceilings"] = None
        s.note(f"ceilings not measured ({error_detail(exc)['reason']}): no roofline columns")
    c = s.results["meta"]["ceilings"]
    if c:
        rates = ", ".join(f"{k} {v / 1e12:.3g}" for k, v in c["matmul_flops_per_s"].items())
        print(
            f"ceilings: copy {c['copy_bandwidth_Bps'] / 1e9:.4g} GB/s; matmul {c['matmul_n']}^3 "
            f"TFLOP/s: {rates}",
            flush=True,
        )


def section_checks(s: Session) -> None:
    from bench import cases as C
    from bench import checks, e2e, harness

    cfg = s.cfg
    for case in C.cases(cfg.groups, cfg.ops):
        for dtype in cfg.check_dtypes:
            seed = cfg.seed + len(s.results["checks"]["ops"])
            base = {
                "kind": "check-op", "op": case.op, "size": case.size, "shapes": case.shapes(),
                "dtype": dtype, "seed": seed,
            }  # fmt: skip

            def run(case=case, dtype=dtype, base=base, seed=seed):
                try:
                    harness.check_runnable(case, "fused", dtype, cfg.device)
                except harness.Skip as exc:
                    return {**base, "status": "skipped", "reason": str(exc)}
                result = checks.check_op(case, dtype, cfg.device, seed)
                return {**base, "status": "ok", "reason": None, **result}

            row = s.run_case(f"check-op/{case.id}/{dtype}", base, run, cfg.budget.checks_by)
            s.results["checks"]["ops"].append(row)
            s.write()
    dims = dict(cfg.step.dims)
    for config in cfg.step.configs:
        for precision in cfg.model_precisions:
            seed = cfg.seed + 1000 + len(s.results["checks"]["model"])
            base = {"kind": "check-model", "config": config, "precision": precision, "seed": seed}

            def run(config=config, precision=precision, base=base, seed=seed):
                try:
                    e2e._check_runnable("fused", precision, cfg.device, cfg.smoke)
                except harness.Skip as exc:
                    return {**base, "status": "skipped", "reason": str(exc)}
                result = checks.check_model(
                    config, precision, cfg.device, seed, dims, cfg.step.n, cfg.step.batch
                )
                return {**base, "status": "ok", "reason": None, **result}

            row = s.run_case(f"check-model/{config}/{precision}", base, run, cfg.budget.checks_by)
            s.results["checks"]["model"].append(row)
            s.write()


def section_census(s: Session) -> None:
    """Per configuration, the kernels of one profiled training step against bench.census's
    CPU count (bench.gpu_session.kernel_census); each configuration in its own guard."""
    from bench import harness
    from bench.gpu_session import kernel_census

    cfg, cc = s.cfg, s.cfg.census
    dims = dict(cfg.step.dims)
    for config, precision, backend in cc.cases:
        base = {
            "kind": "census", "config": config, "precision": precision, "backend": backend,
            "n": cc.n, "batch": cc.batch,
        }  # fmt: skip

        def run(config=config, precision=precision, backend=backend, base=base):
            try:
                row = kernel_census.census_row(
                    cc, config, precision, backend, cfg.device, dims, cfg.smoke
                )
            except harness.Skip as exc:
                return {**base, "status": "skipped", "reason": str(exc)}
            return {**base, **row}

        case_id = f"census/{config}/{precision}/{backend}"
        s.results["census"].append(s.run_case(case_id, base, run, cfg.budget.census_by))
        s.write()


def section_ops(s: Session) -> None:
    from bench import cases as C
    from bench import harness

    cfg, meta = s.cfg, s.results["meta"]
    compiled = harness.CompiledOps(cfg.compile_backend)
    # Eager and fused first, torch.compile (the costly compiles) last: when time runs out
    # it is the compiled column that is missing, not whole ops.
    groups = [
        [b for b in cfg.backends if b != "compiled"],
        [b for b in cfg.backends if b == "compiled"],
    ]
    for backends in groups:
        for case in C.cases(cfg.groups, cfg.ops):
            for dtype in cfg.time_dtypes:
                for backend in backends:
                    for pass_ in cfg.passes:
                        base = harness.base_row(case, backend, pass_, dtype)
                        if backend == "compiled":
                            base["compile_backend"] = cfg.compile_backend

                        def run(case=case, backend=backend, pass_=pass_, dtype=dtype, base=base):
                            row = harness.measure(
                                case, backend, pass_, dtype, cfg.device, meta.get("ceilings"),
                                compiled, budget=cfg.op_bounds.kwargs(),
                            )  # fmt: skip
                            return {**base, **row}

                        case_id = f"op/{case.id}/{backend}/{pass_}/{dtype}"
                        s.timed_row(case_id, base, run, cfg.budget.ops_by)


def section_pipeline(s: Session) -> None:
    import torch

    from bench import pipeline

    cfg = s.cfg
    pcfg = pipeline.PipelineConfig(
        sources=cfg.pipeline_sources,
        batch=cfg.step.batch,
        train_movies=cfg.pipeline_movies,
        dims=cfg.pipeline_dims,
        cold_reps=cfg.pipeline_cold_reps,
        warm_measure_s=cfg.pipeline_warm_s,
    )
    with tempfile.TemporaryDirectory(prefix="rwmn-pipeline-") as tmp:
        for source in pcfg.sources:
            root = Path(tmp) / source
            base = {"kind": "pipeline", "source": source, "batch": pcfg.batch}
            gen_base = {**base, "loader": "synthetic data", "phase": "generate"}

            def generate(root=root, source=source, gen_base=gen_base):
                path = pipeline.make_data(source, root, pcfg)
                return {**gen_base, "status": "ok", "reason": None, "path": str(path)}

            made = s.run_case(
                f"pipeline/{source}/generate", gen_base, generate, cfg.budget.pipeline_by
            )
            s.results["pipeline"].append(made)
            if made["status"] != "ok":
                continue
            for loader in pipeline.LOADERS:
                for phase in pipeline.PHASES:
                    row = s.run_case(
                        f"pipeline/{source}/{loader.name}/{phase}",
                        {**base, "loader": loader.name, "phase": phase},
                        lambda loader=loader, phase=phase, root=root, source=source: (
                            pipeline.measure(loader, phase, source, root, pcfg, cfg.device)
                        ),
                        cfg.budget.pipeline_by,
                    )
                    s.results["pipeline"].append(row)
                    s.write()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def section_step(s: Session) -> None:
    from bench import e2e

    cfg, st = s.cfg, s.cfg.step
    for config, mode, precision, backend in st.cases():
        base = e2e.base_row(config, mode, precision, backend, st.n, st.batch, cfg.smoke)

        def run(config=config, mode=mode, precision=precision, backend=backend):
            return e2e.measure_step(
                config, mode, precision, backend, cfg.device, st.n, st.batch, cfg.smoke,
                measure_s=st.measure_s or None, warmup_steps=st.warmup_steps,
                compile_backend=cfg.compile_backend, budget=st.bounds.kwargs(),
            )  # fmt: skip

        case_id = f"step/{config}/{mode}/{precision}/{backend}"
        s.timed_row(case_id, base, run, cfg.budget.step_by)


def section_plots(s: Session) -> None:
    footer = rep.provenance(s.results["meta"])
    paths, note = rep.write_plots(s.results["rows"], s.out_dir, s.stem, footer)
    s.results["meta"]["plots"] = [str(p) for p in paths]
    if note:
        s.note(note)


def _print_row(row: dict) -> None:
    what = row.get("case_id", "?")
    if row["status"] == "ok":
        if "verdict" in row:
            tail = f"{row['verdict']} (worst {row['worst']}, rel err {row['worst_rel_err']:.2e})"
        elif row.get("kind") == "census":
            tail = (
                f"{row['device_kernels']} kernels / {row['cpu_launches']} CPU-counted "
                f"launches = {row['ratio']}"
            )
        else:
            tail = f"{row.get('median_ms', 0):.4g} ms"
    else:
        tail = f"{row['status']}: {row['reason']}"
    print(f"  {what:<60} {tail}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.smoke:
        # Before anything imports triton: the fused kernels run on the interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    cfg = build_config(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if args.warmer:
        index, count = (int(v) for v in args.warmer.split("/"))
        return procs.run_warmer(cfg, index, count, args.warm_log)
    if not cfg.smoke and not torch.cuda.is_available():
        print("bench gpu_session: no CUDA device here; --smoke runs the CPU path", file=sys.stderr)
        return 2
    return run_session(cfg, args, argv, start)


def _inductor_caches() -> dict:
    out = {}
    with contextlib.suppress(Exception):
        import torch._inductor.config as inductor_config

        out["fx_graph_cache"] = inductor_config.fx_graph_cache
    with contextlib.suppress(Exception):
        import torch._functorch.config as functorch_config

        out["autograd_cache"] = getattr(functorch_config, "enable_autograd_cache", None)
    return out


def run_session(cfg: SessionConfig, args: argparse.Namespace, argv: list[str], start: float) -> int:
    from bench import timing

    meta = timing.environment(cfg.device)
    meta["git_commit_source"] = "git" if meta["git_commit"] else None
    if args.git_commit:
        meta["git_commit"], meta["git_commit_source"] = args.git_commit, "--git-commit"
    meta.update(
        label=meta["label"] if not cfg.smoke else "CPU",
        part=cfg.part,
        smoke=cfg.smoke,
        command="python -m bench gpu_session " + " ".join(argv),
        seed=cfg.seed,
        sections_s={},
        section_errors={},
        compile_backend=cfg.compile_backend,
        compile_caches=_inductor_caches(),
        config=json.loads(json.dumps(asdict(cfg), default=str)),
    )
    day = meta["date"][:10]
    name = "cpu-smoke" if cfg.smoke else _slug(meta["device_name"])
    stem = f"{name}-{day}" + ("-sweep" if cfg.part == "sweep" else "")
    out_dir = args.out or (
        Path(tempfile.mkdtemp(prefix="rwmn-gpu-session-smoke-")) if cfg.smoke else RESULTS
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / f"{stem}.json").exists():
        stem += "-" + datetime.datetime.now(datetime.UTC).strftime("%H%M%S")
    meta["json"] = str(out_dir / f"{stem}.json")
    # The subprocesses' logs (tests, warmers) outside the output folder, which holds the
    # results alone (at most MAX_RESULT_FILES files); the JSON keeps what they say.
    logs = args.logs or Path(tempfile.mkdtemp(prefix=f"rwmn-{stem}-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    meta["logs"] = str(logs)
    s = Session(cfg, meta, out_dir, stem, start)
    print(rep.provenance(meta), flush=True)
    if not meta["git_commit"]:
        s.note("git commit unknown (no git program and no .git here): pass --git-commit SHA")
    s.write()

    with s.section("ceilings"):
        section_ceilings(s)
    s.write()
    tests = procs.start_tests(logs) if "tests" in cfg.sections else None
    warmers = procs.start_warmers(cfg, argv, logs) if cfg.warm_processes else []
    try:
        return _run_sections(s, tests, warmers)
    finally:  # whatever happened, no subprocess of this run outlives it
        started = [w["proc"] for w in warmers] + ([tests[0]] if tests else [])
        for proc in started:
            procs.stop(proc)


def _run_sections(s: Session, tests: tuple | None, warmers: list[dict]) -> int:
    cfg = s.cfg
    if "checks" in cfg.sections:
        with s.section("checks"):
            section_checks(s)
        s.write_markdown()
    if "census" in cfg.sections:
        with s.section("census"):
            section_census(s)
        s.write_markdown()
    if tests:
        with s.section("tests (waiting)"):
            s.results["tests"] = procs.finish_tests(*tests, s.deadline(cfg.budget.tests_by))
            if s.results["tests"]["timed_out"]:
                s.note("the CUDA-marked tests were stopped at their deadline (verdicts so far)")
    if warmers:
        with s.section("compile warm-up (waiting)"):
            planned = len(procs.compile_jobs(cfg))
            warm = procs.finish_warmers(warmers, s.deadline(cfg.budget.warm_by), planned)
            s.results["warm"] = warm
            if warm["stopped_at_deadline"]:
                s.note(f"{warm['stopped_at_deadline']} compile warmers stopped at the deadline")
    s.write()
    for name, run in (("ops", section_ops), ("pipeline", section_pipeline), ("step", section_step)):
        if name in cfg.sections:
            with s.section(name):
                run(s)
            s.write_markdown()
    s.results["rows"].sort(key=_row_order(cfg))
    with s.section("plots"):
        section_plots(s)
    s.results["summary"] = rep.summary_lines(cfg, s.results)
    s.write()
    s.write_markdown()
    print("\n".join(s.results["summary"]), flush=True)
    print(f"wrote {s.json_path} and {s.md_path}", file=sys.stderr)
    return exit_status(s.results)


def _row_order(cfg: SessionConfig):
    """Rows in the tables' order: case, dtype, backend, pass; steps after the ops."""
    from bench import cases as C
    from bench.e2e import MODES

    case_ix = {c.id: i for i, c in enumerate(C.cases(cfg.groups, cfg.ops))}

    def key(r):
        if r.get("kind") == "op":
            return (0, case_ix.get(f"{r['op']}/{r['size']}", 0), r["dtype"],
                    C.BACKENDS.index(r["backend"]), C.PASSES.index(r["pass"]))  # fmt: skip
        return (1, r["config"], MODES.index(r["mode"]), r["precision"], r["backend"])

    return key


def exit_status(results: dict) -> int:
    """1 when a case errored (a census case too), a check failed or a CUDA test failed;
    else 0. A census ratio outside its tolerance is a finding, not a failure."""
    checks = results["checks"]["ops"] + results["checks"]["model"]
    everything = results["rows"] + results["pipeline"] + results.get("census", []) + checks
    bad = any(r["status"] == "error" for r in everything)
    bad |= any(r.get("verdict") == "FAIL" for r in checks)
    bad |= bool(results["meta"].get("section_errors"))
    tests = results["tests"]
    if tests:
        bad |= tests["timed_out"] or bool(tests["counts"]["failed"] + tests["counts"]["error"])
    return 1 if bad else 0
