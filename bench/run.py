"""Standalone op benchmark: every op x backend x pass x dtype x size, written as rows.

    python -m bench run --device cuda --out bench/results/h100.json
    python -m bench run --smoke --out bench/results/cpu-smoke.json   # CPU, tiny shapes

``--smoke`` runs the tiny shapes on the CPU; the fused backend then runs on the Triton
interpreter (TRITON_INTERPRET=1, fp32 only). The file holds ``meta`` (device, versions,
git commit, date, the run's measured copy bandwidth and matmul FLOP/s) and ``rows``; every
row repeats the identifying metadata so rows can be pooled across files. The exit status
is 1 when a case raised (its row says why), 0 otherwise; skipped cases are not errors.

May import: bench.cases, bench.harness and bench.timing, rwmn.profiling.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from pathlib import Path

from bench import cli

#: Metadata keys copied into every row.
ROW_META = ("label", "device", "device_name", "torch", "triton", "git_commit", "date")
RESULTS = Path(__file__).resolve().parent / "results"


def _csv(value: str, allowed) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad} not in {list(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    from bench import cases as C

    p = cli.parser("run", __doc__)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; CPU, Triton interpreter")
    p.add_argument("--sizes", default=None, help=f"size groups, comma-separated, of {C.GROUPS}")
    p.add_argument("--ops", default=",".join(C.OPS))
    p.add_argument("--backends", default=",".join(C.BACKENDS))
    p.add_argument("--passes", default=",".join(C.PASSES))
    p.add_argument("--dtypes", default=",".join(C.DTYPES))
    p.add_argument("--out", type=Path, default=None, help="result file (.json)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--nvtx", action="store_true", help="NVTX range per case and per op call")
    p.add_argument("--warmup-s", type=float, default=None, help="warm-up budget per case")
    p.add_argument("--measure-s", type=float, default=None, help="timing budget per case")
    p.add_argument("--min-warmup", type=int, default=None, help="fewest warm-up calls")
    p.add_argument("--min-reps", type=int, default=None, help="fewest timed calls")
    p.add_argument("--no-ceilings", action="store_true", help="skip the copy/matmul ceilings")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.sizes = _csv(args.sizes or ("smoke" if args.smoke else "model,sweep"), C.GROUPS)
    args.ops = _csv(args.ops, C.OPS)
    args.backends = _csv(args.backends, C.BACKENDS)
    args.passes = _csv(args.passes, C.PASSES)
    args.dtypes = _csv(args.dtypes, C.DTYPES)
    return args


def _write(path: Path, meta: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    tmp.replace(path)


def record(row: dict, meta: dict, rows: list[dict], out: Path) -> None:
    """Stamp ``row`` with the run's identifying metadata, keep it, and rewrite the file (a
    run cut short keeps what it measured)."""
    row.update({k: meta[k] for k in ROW_META})
    rows.append(row)
    _write(out, meta, rows)


def exit_status(rows: list[dict], out: Path) -> int:
    """Say what was written; 1 when a case raised, else 0."""
    errors = sum(r["status"] == "error" for r in rows)
    print(f"wrote {len(rows)} rows ({errors} errors) to {out}", file=sys.stderr)
    return 1 if errors else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        # Before anything imports triton: the fused ops run on the interpreter on CPU.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch

    from bench import cases as C
    from bench import harness, timing
    from rwmn.profiling import nvtx_enabled

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = timing.environment(device)
    meta["argv"] = sys.argv[1:] if argv is None else list(argv)
    if not args.no_ceilings:
        meta["ceilings"] = timing.measure_ceilings(device, {d: C.DTYPES[d] for d in args.dtypes})
    ceilings = meta.get("ceilings")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"ops-{meta['label'].lower()}-{stamp}.json"
    budget = {
        k: v
        for k, v in (
            ("warmup_s", args.warmup_s),
            ("measure_s", args.measure_s),
            ("min_warmup", args.min_warmup),
            ("min_reps", args.min_reps),
        )
        if v is not None
    }

    compiled = harness.CompiledOps()
    rows: list[dict] = []
    nvtx = nvtx_enabled() if args.nvtx else contextlib.nullcontext()
    with nvtx:
        for case in C.cases(args.sizes, args.ops):
            for dtype in args.dtypes:
                for backend in args.backends:
                    for pass_ in args.passes:
                        row = harness.measure(
                            case, backend, pass_, dtype, device, ceilings, compiled,
                            nvtx=args.nvtx, budget=budget,
                        )  # fmt: skip
                        record(row, meta, rows, out)
                        if not args.quiet:
                            _print_row(row)
    _write(out, meta, rows)
    return exit_status(rows, out)


def _print_row(row: dict) -> None:
    head = f"[{row['label']}] {row['op']:<20} {row['size']:<12} {row['backend']:<9} "
    head += f"{row['pass']:<16} {row['dtype']:<4} "
    if row["status"] == "ok":
        tail = f"{row['median_ms']:10.4f} ms  [{row['p20_ms']:.4f}, {row['p80_ms']:.4f}]"
    else:
        tail = f"{row['status']}: {row['reason']}"
    print(head + tail, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
