"""The GPU session's report: the closing summary (at most 40 lines), the markdown, plots.

The summary is what a reader of a run's output sees first (the tool that runs a command on
a lent GPU returns the end of its output): per op at the model's sizes and for the
training step, the fused time, its speedup over the eager and the torch.compile'd
reference, the fraction of the run's own copy bandwidth or matmul ceiling, and peak
memory. The markdown holds everything else; bench.report renders its timing tables.

May import: bench.gpu_session.config, .kernel_census (its KINDS), bench.cases and
bench.report.
"""

from __future__ import annotations

from pathlib import Path

from bench.gpu_session.config import SessionConfig

#: The summary printed last (and written at the end of the .md) is at most this long, well
#: inside the device tool's 12,000-character output tail (a full run's: 41 lines, 2.8 KB).
SUMMARY_MAX_LINES = 44


def write_plots(
    rows: list[dict], out_dir: Path, stem: str, footer: str
) -> tuple[list[Path], str | None]:
    """PNG plots of the op and step rows; without matplotlib, none and a note saying so."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], (
            "matplotlib is not installed here: no PNG plots (render them elsewhere with "
            "python -m bench report <json> --out-dir <another dir>)"
        )
    from bench import report

    paths = report.plot(rows, out_dir, stem, footer)
    return paths + report.plot_steps(rows, out_dir, stem, footer), None


def provenance(meta: dict) -> str:
    """One line: what measured this, where and when."""
    commit = (meta.get("git_commit") or "unknown")[:10]
    return (
        f"[{meta['label']}] {meta['device_name']} | driver {meta.get('driver')} | torch "
        f"{meta['torch']} triton {meta['triton']} CUDA {meta.get('cuda')} | git {commit} "
        f"src {meta.get('source_digest')} | {meta['date']}"
    )


def _ms(row: dict | None) -> float | None:
    return row["median_ms"] if row and row.get("status") == "ok" else None


def _ratio(base: float | None, this: float | None) -> str:
    return f"{base / this:.3g}x" if base and this else "-"


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row.get("status") == "ok":
        return f"{row['median_ms']:.4g}"
    if row.get("status") == "error":
        return f"error: {row['reason'].split(':')[0]}"
    return "skipped"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 1024**2:.1f}"


def _peaks(fused: dict | None, eager: dict | None) -> str:
    return (
        f"{_mib((fused or {}).get('peak_mem_bytes'))}/{_mib((eager or {}).get('peak_mem_bytes'))}"
    )


def _ceiling(row: dict | None) -> str:
    if not row or row.get("status") != "ok" or not row.get("bound"):
        return "-"
    if row["bound"] == "memory":
        return f"{100 * row['bw_fraction']:.1f}% BW"
    return f"{100 * row['flop_fraction']:.1f}% FLOP"


def _op_index(rows: list[dict]) -> dict:
    return {
        (r["op"], r["size"], r["backend"], r["pass"], r["dtype"]): r
        for r in rows
        if r.get("kind") == "op"
    }


def _step_index(rows: list[dict]) -> dict:
    return {
        (r["config"], r["mode"], r["precision"], r["backend"]): r
        for r in rows
        if r.get("kind") == "e2e"
    }


SUMMARY_HEADER = (
    "| case | dtype | fused ms | x eager | x compiled | % ceiling | peak MiB fused/eager |"
)
#: The op pass the summary shows (all passes are in the tables above it).
SUMMARY_PASS = "forward+backward"
#: The step target: (config, mode, precision, backend) vs the eager fp32 reference.
STEP_TARGET = ("video_sub", "compiled", "bf16", "fused")
STEP_BASELINE = ("video_sub", "eager", "fp32", "reference")
#: The baseline the fused step is to beat: the reference compiled with max-autotune, bf16.
STEP_AUTOTUNED = ("video_sub", "max-autotune", "bf16", "reference")


def summary_lines(cfg: SessionConfig, results: dict) -> list[str]:
    """The closing table (at most SUMMARY_MAX_LINES lines): per op at the shown pass and
    for the step, the fused time, its speedup over the eager and the compiled reference,
    the fraction of the run's copy bandwidth or matmul ceiling, and peak memory. The sweep
    part gives one line per op, size family and dtype, the swept sizes joined by "/"."""
    meta, rows = results["meta"], results["rows"]
    commit = (meta.get("git_commit") or "unknown")[:10]
    head = [f"Summary [{cfg.label}] {meta['device_name']}, git {commit}, {meta['date']}"]
    c = meta.get("ceilings")
    if c:
        rates = ", ".join(f"{k} {v / 1e12:.3g}" for k, v in c["matmul_flops_per_s"].items())
        head.append(
            f"ceilings: copy {c['copy_bandwidth_Bps'] / 1e9:.4g} GB/s; matmul TFLOP/s {rates}"
        )
    head.append(_status_line(results))
    ops, steps = _op_index(rows), _step_index(rows)
    if cfg.part == "sweep":
        header, table = SWEEP_HEADER, _sweep_rows(cfg, ops)
    else:
        header, table = SUMMARY_HEADER, _op_rows(cfg, ops)
    tail = []
    if "step" in cfg.sections:
        table += _step_rows(cfg, steps)
        target, baseline = steps.get(STEP_TARGET), steps.get(STEP_BASELINE)
        tail.append(
            "step target (video_sub bf16 fused compiled vs eager fp32 reference, target >= 4x): "
            + _ratio(_ms(baseline), _ms(target))
        )
        if STEP_AUTOTUNED[1] in cfg.step.mode_names:
            tail.append(_baseline_line(steps))
    if results.get("census"):
        tail.append(_census_line(results["census"], cfg.census.tolerance))
    if results["pipeline"]:
        tail.append(_pipeline_line(results["pipeline"]))
    rule = "|" + "---|" * (header.count("|") - 1)
    room = SUMMARY_MAX_LINES - len(head) - len(tail) - 2
    if len(table) > room:
        cut = len(table) - room + 1
        table = table[: room - 1] + [f"| ... {cut} more rows in the tables above |"]
    return [*head, header, rule, *table, *tail]


def _op_rows(cfg: SessionConfig, ops: dict) -> list[str]:
    from bench import cases as C

    lines = []
    for case in C.cases(cfg.groups, cfg.ops):
        for dtype in cfg.time_dtypes:
            key = (case.op, case.size)
            fused = ops.get((*key, "fused", SUMMARY_PASS, dtype))
            eager = ops.get((*key, "reference", SUMMARY_PASS, dtype))
            comp = ops.get((*key, "compiled", SUMMARY_PASS, dtype))
            if fused is None and eager is None:
                continue
            lines.append(
                f"| {case.id} | {dtype} | {_cell(fused)} | {_ratio(_ms(eager), _ms(fused))} | "
                f"{_ratio(_ms(comp), _ms(fused))} | {_ceiling(fused)} | {_peaks(fused, eager)} |"
            )
    return lines


def _step_rows(cfg: SessionConfig, steps: dict) -> list[str]:
    """One line per fused step case (modes that run the reference only, max-autotune,
    appear in the baseline line instead)."""
    lines = []
    st = cfg.step
    for config, mode, precision, backend in st.cases():
        if backend != "fused":
            continue
        fused = steps.get((config, mode, precision, "fused"))
        eager = steps.get((config, "eager", precision, "reference"))
        comp = steps.get((config, "compiled", precision, "reference"))
        lines.append(
            f"| step {config} {mode} | {precision} | {_cell(fused)} | "
            f"{_ratio(_ms(eager), _ms(fused))} | {_ratio(_ms(comp), _ms(fused))} | - "
            f"| {_peaks(fused, eager)} |"
        )
    return lines


def _baseline_line(steps: dict) -> str:
    """The fused step's modes against the max-autotune reference (STEP_AUTOTUNED)."""
    config, mode, precision, backend = STEP_AUTOTUNED
    base = _ms(steps.get(STEP_AUTOTUNED))
    cells = [
        f"{m} {_ratio(base, _ms(steps.get((config, m, precision, 'fused'))))}"
        for m in ("eager", "cuda-graphs", "compiled")
    ]
    return (
        f"step vs {config} {precision} {backend} {mode} "
        f"({_cell(steps.get(STEP_AUTOTUNED))} ms), fused: " + ", ".join(cells)
    )


def _census_line(rows: list[dict], tolerance: float) -> str:
    """The fused steps' census ratios (device kernels over the CPU count)."""
    cells = []
    for r in rows:
        if r["backend"] != "fused":
            continue
        what = f"{r['config']} {r['precision']}"
        if r["status"] != "ok":
            cells.append(f"{what} {r['status']}")
            continue
        verdict = {True: "ok", False: "OFF", None: "CPU stand-in"}[r["within_tolerance"]]
        cells.append(
            f"{what} {r['device_kernels']}/{r['cpu_launches']} = {r['ratio']:.3g} ({verdict})"
        )
    return f"census, fused step kernels/CPU count (target within {tolerance:.0%}): " + (
        ", ".join(cells) or "-"
    )


SWEEP_HEADER = "| op/family | dtype | swept | fused ms | x eager | x compiled |"


def _short(row: dict | None) -> str:
    if row is None or row.get("status") == "skipped":
        return "-"
    return f"{row['median_ms']:.3g}" if row.get("status") == "ok" else "err"


def _sweep_rows(cfg: SessionConfig, ops: dict) -> list[str]:
    from bench import cases as C

    families: dict[tuple[str, str], list] = {}
    for case in C.cases(cfg.groups, cfg.ops):
        families.setdefault((case.op, case.family), []).append(case)
    lines = []
    for (op, family), cases in families.items():
        swept = "-"
        if cases[0].sweep:
            swept = f"{cases[0].sweep} " + "/".join(str(c.sweep_value) for c in cases)
        for dtype in cfg.time_dtypes:
            fused, eager, comp = (
                [ops.get((op, c.size, backend, SUMMARY_PASS, dtype)) for c in cases]
                for backend in ("fused", "reference", "compiled")
            )
            lines.append(
                f"| {op}/{family} | {dtype} | {swept} | {'/'.join(map(_short, fused))} | "
                + "/".join(_ratio(_ms(e), _ms(f)) for e, f in zip(eager, fused, strict=True))
                + " | "
                + "/".join(_ratio(_ms(k), _ms(f)) for k, f in zip(comp, fused, strict=True))
                + " |"
            )
    return lines


def _status_line(results: dict) -> str:
    parts = []
    for kind in ("ops", "model"):
        checks = results["checks"][kind]
        if checks:
            passed = sum(r.get("verdict") == "pass" for r in checks)
            ran = sum(r["status"] == "ok" for r in checks)
            errors = sum(r["status"] == "error" for r in checks)
            parts.append(
                f"{kind} checks {passed}/{ran} pass" + (f", {errors} error" if errors else "")
            )
    tests = results["tests"]
    if tests:
        n = tests["counts"]
        parts.append(
            f"CUDA tests {n['passed']} passed, {n['failed']} failed, {n['error']} error, "
            f"{n['skipped']} skipped" + (" (TIMED OUT)" if tests["timed_out"] else "")
        )
    everything = results["rows"] + results["pipeline"]
    errors = [r for r in everything if r["status"] == "error"]
    budget = [
        r for r in everything if r["status"] == "skipped" and "time budget" in (r["reason"] or "")
    ]
    parts.append(f"{len(errors)} timing errors, {len(budget)} cut by the time budget")
    return "; ".join(parts)


def _pipeline_line(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        if r.get("phase") in ("cold", "warm") and r["status"] == "ok" and "to(" in r["loader"]:
            cells.append(f"{r['source']} {r['phase']} {r['median_ms']:.3g}")
    return "input pipeline, ms per batch (random_batch + to(device)): " + (", ".join(cells) or "-")


def _first(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _check_table(rows: list[dict], what: tuple[str, ...]) -> list[str]:
    header = (
        "| "
        + " | ".join(what)
        + " | verdict | worst tensor | fused rel err | ref rel err | err/allowed | reason |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        ident = " | ".join(str(r.get(k)) for k in what)
        if r["status"] != "ok":
            lines.append(f"| {ident} | {r['status']} | | | | | {_first(r['reason'])} |")
            continue
        lines.append(
            f"| {ident} | {r['verdict']} | {r['worst']} | {r['worst_rel_err']:.2e} | "
            f"{r['worst_ref_rel_err']:.2e} | {r['worst_err_over_allowed']:.3g} | "
            f"{r['worst_why'] or ''} |"
        )
    return lines


def census_markdown(cfg: SessionConfig, rows: list[dict]) -> list[str]:
    """The GPU census section: per configuration the kernel count against bench.census's,
    then both counts per kind."""
    from bench.gpu_session.kernel_census import KINDS

    lines = [
        "## GPU census: the kernels of one training step against bench.census",
        "",
        f"One steady-state step (n {cfg.census.n}, B {cfg.census.batch}; after "
        f"{cfg.census.warmup_steps} untimed) under torch.profiler: its device kernels "
        "(copies and fills by the driver included), classified by name, against "
        "`python -m bench census`'s CPU count of the same step (one launch per aten op, "
        f"the fused kernels' launches recorded). Ratio = kernels / CPU count; the fused "
        f"step's target is within {cfg.census.tolerance:.0%}.",
        "",
        "| step | source | CPU count | kernels | ratio | within | distinct | status |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        step = f"{r['config']}-{r['precision']}-{r['backend']}"
        if r["status"] != "ok":
            lines.append(f"| {step} | | | | | | | {r['status']}: {_first(r['reason'])} |")
            continue
        within = {True: "yes", False: "**no**", None: "-"}[r["within_tolerance"]]
        lines.append(
            f"| {step} | {r['source']} | {r['cpu_launches']} | {r['device_kernels']} | "
            f"{r['ratio']:.3g} | {within} | {r['distinct_kernels']} | ok |"
        )
    measured = [r for r in rows if r["status"] == "ok"]
    if measured:
        kinds = [k for k in KINDS if any(k in r["by_kind"] for r in measured)]
        lines += [
            "",
            "Per kind, CPU count / kernels:",
            "",
            "| step | " + " | ".join(kinds) + " |",
            "|---|" + "---:|" * len(kinds),
        ]
        for r in measured:
            cells = [r["by_kind"].get(k, {"cpu": 0, "device": 0}) for k in kinds]
            lines.append(
                f"| {r['config']}-{r['precision']}-{r['backend']} | "
                + " | ".join(f"{c['cpu']}/{c['device']}" for c in cells)
                + " |"
            )
        lines += ["", "The JSON's `census` rows list the most launched kernels by name."]
    if not rows:
        lines.append("- not run")
    return [*lines, ""]


def markdown(cfg: SessionConfig, results: dict) -> str:
    """The run's report: provenance, ceilings, tests, checks, timing tables, notes, and the
    summary last."""
    from bench import report

    meta = results["meta"]
    lines = [f"# RWMN session ({cfg.part}): {meta['device_name']} [{cfg.label}]", ""]
    if cfg.smoke:
        lines += [
            "> **CPU smoke run**: tiny shapes, fused kernels on the Triton interpreter, "
            f"torch.compile backend `{cfg.compile_backend}`. These are CPU figures; they say "
            "nothing about a GPU.",
            "",
        ]
    props = meta.get("device_properties") or {}
    lines += [
        "## Provenance",
        "",
        f"- device: {meta['device_name']}; driver {meta.get('driver')}"
        + "".join(f"; {k} {v}" for k, v in props.items()),
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta.get('cuda')}, python "
        f"{meta.get('python')}; TRITON_INTERPRET {meta.get('triton_interpret')}",
        f"- git {meta.get('git_commit')} ({meta.get('git_commit_source')})"
        + (" dirty tree" if meta.get("git_dirty") else "")
        + f"; source digest {meta.get('source_digest')}",
        f"- date {meta['date']}; command `{meta.get('command')}`; seed {meta.get('seed')}; "
        f"torch threads {meta.get('threads')}; load average at start {meta.get('load_average_1m')}",
        f"- budget {cfg.budget.total_s:.0f} s; elapsed {meta.get('elapsed_s')} s; compile "
        f"backend {cfg.compile_backend}; inductor caches {meta.get('compile_caches')}",
        "",
        "## Ceilings",
        "",
    ]
    c = meta.get("ceilings")
    if c:
        lines.append(
            f"- copy {c['copy_bandwidth_Bps'] / 1e9:.4g} GB/s ({c['copy_bytes'] // 1024**2} MiB "
            "device-to-device, read + write counted)"
        )
        for k, v in c["matmul_flops_per_s"].items():
            lines.append(f"- matmul {c['matmul_n']}^3 {k}: {v / 1e12:.4g} TFLOP/s")
        lines.append(f"- fp32 matmul precision for `fp32`: {c['fp32_matmul_precision']}")
    else:
        lines.append("- not measured (see the notes)")
    lines += ["", "## CUDA-marked tests (`pytest -m cuda`)", ""]
    tests = results["tests"]
    if tests:
        n = tests["counts"]
        lines += [
            f"`{tests['command']}`: exit {tests['returncode']}, {tests['elapsed_s']:.0f} s"
            + (", STOPPED at its deadline" if tests["timed_out"] else "")
            + f"; {n['passed']} passed, {n['failed']} failed, {n['error']} error, "
            f"{n['skipped']} skipped. Log: `{tests['log']}`",
            "",
            "| test | outcome | s | message |",
            "|---|---|---|---|",
        ]
        for t in tests["tests"]:
            secs = "-" if t["time_s"] is None else f"{t['time_s']:.1f}"
            lines.append(f"| `{t['test']}` | {t['outcome']} | {secs} | {t['message'] or ''} |")
        if tests.get("log_tail"):
            lines += ["", "No verdicts; the end of its log:", "", "```", *tests["log_tail"], "```"]
    else:
        lines.append("- not run")
    lines += ["", "## Checks: fused vs reference vs float64", ""]
    lines += _check_table(results["checks"]["ops"], ("op", "size", "dtype"))
    lines += ["", "Whole model (logits and every parameter gradient of the loss):", ""]
    lines += _check_table(results["checks"]["model"], ("config", "precision"))
    lines += [
        "",
        "err/allowed: the worst tensor's max |fused - float64| over ratio x the reference's "
        "own error + rel_atol x max |float64| (pass <= 1); rel err = ||x - float64|| / "
        "||float64||. Every buffer the fused call allocates starts as NaN.",
        "",
    ]
    lines += census_markdown(cfg, results.get("census", []))
    lines.append(report.markdown([{**meta, "file": meta.get("json")}], results["rows"]))
    lines += [
        "## Input pipeline",
        "",
        "| source | loader | phase | median ms | reps | questions/s | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["pipeline"]:
        measured = r["status"] == "ok" and "median_ms" in r
        status = " ".join(x for x in (r["status"], _first(r.get("reason"))) if x)
        lines.append(
            f"| {r['source']} | {r.get('loader')} | {r.get('phase')} | "
            f"{format(r['median_ms'], '.4g') if measured else '-'} | {r.get('reps', '-')} | "
            f"{format(r['questions_per_s'], '.4g') if measured else '-'} | {status} |"
        )
    warm = results["warm"]
    lines += ["", "## Compile warm-up", ""]
    if warm:
        lines.append(
            f"{warm['processes']} warmer processes, {warm['done']}/{warm['planned']} compile "
            f"jobs done ({warm['counts']}) in {warm['compile_s']:.0f} s of compiling; "
            f"{warm['stopped_at_deadline']} stopped at their deadline."
        )
    else:
        lines.append("- none")
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in results["notes"]] or ["- none"]
    lines += ["", "## Summary", "", *results["summary"], ""]
    return "\n".join(lines)
