"""Turn result files into a markdown table and PNG plots.

    python -m bench report bench/results/ops-gpu-X.json [more.json ...] [--out-dir DIR]

Writes ``<stem>.md`` (the run's metadata and ceilings, one table per op, the end-to-end
table, the skipped and failed cases with their reasons) and ``<stem>-<op>.png`` (median
time and speedup over the reference backend against size, one panel pair per size family)
next to the first input, or in ``--out-dir``. CPU runs are labelled CPU in the title of
every table and plot.

May import: the standard library and matplotlib (for the plots); it reads result files, not
bench's modules.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from bench import cli

MIB = 1024**2


def load(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    metas, rows = [], []
    for path in paths:
        data = json.loads(path.read_text())
        metas.append({**data["meta"], "file": str(path)})
        rows.extend(data["rows"])
    return metas, rows


def _fmt(value, spec: str = ".3g", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _label(rows: list[dict]) -> str:
    labels = sorted({r["label"] for r in rows})
    return "/".join(labels)


def _key(row: dict) -> tuple:
    return (row["git_commit"], row["date"], row["op"], row["size"], row["pass"], row["dtype"])


def speedups(rows: list[dict]) -> dict[int, float]:
    """reference median / this row's median, for ok op rows of the same run and case."""
    reference = {
        _key(r): r["median_ms"]
        for r in rows
        if r.get("kind") == "op" and r["status"] == "ok" and r["backend"] == "reference"
    }
    out = {}
    for i, r in enumerate(rows):
        if r.get("kind") == "op" and r["status"] == "ok" and _key(r) in reference:
            out[i] = reference[_key(r)] / r["median_ms"]
    return out


def _meta_section(metas: list[dict]) -> list[str]:
    lines = []
    for m in metas:
        what = "CPU figures (not GPU)" if m["label"] == "CPU" else "GPU figures"
        lines += [
            f"### {what}: {m['device_name']}",
            "",
            f"- file `{m['file']}`; date {m['date']}; git {m['git_commit']}"
            + (" (dirty tree)" if m.get("git_dirty") else ""),
            f"- torch {m['torch']}, triton {m['triton']}, CUDA {m.get('cuda')}, "
            f"python {m.get('python')}; Triton interpreter: {m.get('triton_interpret')}; "
            f"torch threads {m.get('threads')}; load average at start {m.get('load_average_1m')}",
        ]
        ceilings = m.get("ceilings")
        if ceilings:
            flops = ", ".join(
                f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in ceilings["matmul_flops_per_s"].items()
            )
            lines.append(
                f"- ceilings measured in this run: copy {ceilings['copy_bandwidth_Bps'] / 1e9:.3g}"
                f" GB/s ({ceilings['copy_bytes'] // MIB} MiB device-to-device, read+write "
                f"counted); matmul {ceilings['matmul_n']}^3: {flops} (fp32 matmul precision "
                f"{ceilings['fp32_matmul_precision']})"
            )
        lines.append("")
    return lines


OP_HEADER = (
    "| size | pass | dtype | backend | median ms | p20-p80 ms | reps | peak MiB | GB/s | "
    "% BW | GFLOP | exec GFLOP | TFLOP/s | % FLOP | bound | % roofline | speedup |"
)


def _op_tables(rows: list[dict]) -> list[str]:
    ups = speedups(rows)
    ok = [(i, r) for i, r in enumerate(rows) if r.get("kind") == "op" and r["status"] == "ok"]
    lines = []
    for op in dict.fromkeys(r["op"] for _, r in ok):
        mine = [(i, r) for i, r in ok if r["op"] == op]
        lines += [f"### {op} ({_label([r for _, r in mine])})", ""]
        shapes = dict.fromkeys((r["size"], r["shapes"]) for _, r in mine)
        lines += [f"- `{size}`: {shape}" for size, shape in shapes] + ["", OP_HEADER]
        lines.append(_rule(OP_HEADER))
        for i, r in mine:
            lines.append(
                f"| {r['size']} | {r['pass']} | {r['dtype']} | {r['backend']} | "
                f"{r['median_ms']:.4g} | {r['p20_ms']:.4g}-{r['p80_ms']:.4g} | {r['reps']} | "
                f"{_fmt(r.get('peak_mem_bytes'), '.1f', 1 / MIB)} | "
                f"{_fmt(r.get('achieved_GBps'))} | {_pct(r.get('bw_fraction'))} | "
                f"{_fmt(r.get('flops'), '.3g', 1e-9)} | {_exec(r)} | "
                f"{_fmt(r.get('achieved_TFLOPs'))} | {_pct(r.get('flop_fraction'))} | "
                f"{r.get('bound') or '-'} | {_pct(r.get('roofline_fraction'))} | "
                f"{_fmt(ups.get(i), '.2f')}x |"
            )
        lines.append("")
    return lines


def _exec(row: dict) -> str:
    # Executed FLOPs describe the fused kernels; other backends run other algorithms.
    if row["backend"] != "fused" or row.get("executed_flops") is None:
        return "-"
    return _fmt(row["executed_flops"], ".3g", 1e-9)


def _rule(header: str) -> str:
    return "|" + "---|" * (header.count("|") - 1)


E2E_HEADER = (
    "| config | n | B | mode | precision | backend | median ms/step | p20-p80 ms | steps/s | "
    "questions/s | peak MiB |"
)


def _e2e_table(rows: list[dict]) -> list[str]:
    mine = [r for r in rows if r.get("kind") == "e2e" and r["status"] == "ok"]
    if not mine:
        return []
    lines = [f"### Training step ({_label(mine)})", "", E2E_HEADER, _rule(E2E_HEADER)]
    for r in mine:
        lines.append(
            f"| {r['config']} | {r['n']} | {r['batch']} | {r['mode']} | {r['precision']} | "
            f"{r['backend']} | {r['median_ms']:.4g} | {r['p20_ms']:.4g}-{r['p80_ms']:.4g} | "
            f"{r['steps_per_s']:.3g} | {r['questions_per_s']:.3g} | "
            f"{_fmt(r.get('peak_mem_bytes'), '.1f', 1 / MIB)} |"
        )
    return [*lines, ""]


def _not_run(rows: list[dict]) -> list[str]:
    reasons: dict[tuple, list[str]] = defaultdict(list)
    for r in rows:
        if r["status"] != "ok":
            what = r.get("op") or r.get("config")
            reasons[(r["status"], r["reason"])].append(
                f"{what}/{r.get('size', '')}/{r['backend']}/{r.get('pass', r.get('mode'))}/"
                f"{r.get('dtype', r.get('precision'))}"
            )
    if not reasons:
        return []
    lines = ["### Skipped and failed cases", ""]
    for (status, reason), which in reasons.items():
        lines.append(f"- **{status}** ({len(which)} cases, e.g. `{which[0]}`): {reason}")
    return [*lines, ""]


def markdown(metas: list[dict], rows: list[dict]) -> str:
    lines = ["## Benchmark results", ""]
    lines += _meta_section(metas)
    lines += _op_tables(rows) + _e2e_table(rows) + _not_run(rows)
    lines += [
        "Speedup = reference median / this median, same run, case, pass and dtype. FLOPs and "
        "bytes are the models of bench/cases.py; % BW and % FLOP are fractions of the "
        "ceilings measured in the same run; % roofline = max(bytes/BW, FLOPs/peak) / time.",
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: Path, stem: str, provenance: str | None = None) -> list[Path]:
    """One PNG per op: median time and speedup over reference against size.

    ``provenance`` (device, versions, commit, date) is written along the bottom of every
    figure, so a PNG separated from its JSON still says where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ups = speedups(rows)
    ok = [(i, r) for i, r in enumerate(rows) if r.get("kind") == "op" and r["status"] == "ok"]
    written = []
    for op in dict.fromkeys(r["op"] for _, r in ok):
        mine = [(i, r) for i, r in ok if r["op"] == op]
        families = list(dict.fromkeys(r["family"] for _, r in mine))
        fig, axes = plt.subplots(2, len(families), figsize=(6 * len(families), 8), squeeze=False)
        for col, family in enumerate(families):
            fam = [(i, r) for i, r in mine if r["family"] == family]
            categorical = any(r["sweep_value"] is None for _, r in fam)
            sizes = list(dict.fromkeys(r["size"] for _, r in fam))
            lines = defaultdict(list)
            for i, r in fam:
                x = sizes.index(r["size"]) if categorical else r["sweep_value"]
                lines[(r["backend"], r["pass"], r["dtype"])].append((x, r["median_ms"], ups.get(i)))
            for (backend, pass_, dtype), pts in sorted(lines.items()):
                pts.sort()
                xs = [p[0] for p in pts]
                label = f"{backend} {pass_} {dtype}"
                style = "--" if backend == "reference" else "-"
                axes[0][col].plot(xs, [p[1] for p in pts], style, marker="o", label=label)
                sp = [(x, s) for x, _, s in pts if s is not None]
                if sp:
                    axes[1][col].plot(*zip(*sp, strict=True), style, marker="o", label=label)
            sweep = fam[0][1]["sweep"]
            for ax, ylabel in ((axes[0][col], "median ms"), (axes[1][col], "speedup vs ref")):
                ax.set_ylabel(ylabel)
                ax.set_yscale("log")
                ax.grid(True, which="both", alpha=0.3)
                if categorical:
                    ax.set_xticks(range(len(sizes)), sizes, rotation=20)
                else:
                    ax.set_xscale("log", base=2)
                    ax.set_xlabel(sweep)
            axes[0][col].set_title(f"{op} / {family} [{_label([r for _, r in fam])}]")
            axes[0][col].legend(fontsize=6)
        _footer(fig, provenance)
        path = out_dir / f"{stem}-{op}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


#: Height (inches) kept free at the bottom for the provenance footer (two lines).
FOOTER_INCHES = 0.35


def _footer(fig, provenance: str | None) -> None:
    if provenance:
        fig.tight_layout(rect=(0, FOOTER_INCHES / fig.get_figheight(), 1, 1))
        fig.text(0.01, 0.01, provenance, fontsize=6, family="monospace", wrap=True)
    else:
        fig.tight_layout()


def plot_steps(
    rows: list[dict], out_dir: Path, stem: str, provenance: str | None = None
) -> list[Path]:
    """One PNG of the training step: median ms per step of every measured case, one bar
    each, grouped by config (the bars' labels say mode, precision and backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r.get("kind") == "e2e" and r["status"] == "ok"]
    if not mine:
        return []
    labels = [f"{r['config']} {r['mode']} {r['precision']} {r['backend']}" for r in mine]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(mine) + 1.5))
    colors = ["tab:gray" if r["backend"] == "reference" else "tab:blue" for r in mine]
    ax.barh(range(len(mine)), [r["median_ms"] for r in mine], color=colors)
    ax.set_yticks(range(len(mine)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median ms per training step (grey: reference, blue: fused)")
    ax.set_title(f"Training step [{_label(mine)}] n={mine[0]['n']} B={mine[0]['batch']}")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    _footer(fig, provenance)
    path = out_dir / f"{stem}-step.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    p = cli.parser("report", __doc__)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    metas, rows = load(args.files)
    out_dir = args.out_dir or args.files[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.files[0].stem
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(metas, rows))
    written = [md] if args.no_plots else [md, *plot(rows, out_dir, stem)]
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
