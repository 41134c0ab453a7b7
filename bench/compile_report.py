"""The compile gate: every kernel configuration, built for real GPU targets without a GPU.

Every configuration the model and the benches launch is built with Triton's real code
generator for real GPU targets.

    python -m bench compile_report [--arch sm_90a,sm_80] [--out DIR] [--groups model,sweep]

The Triton interpreter (the CPU kernel tests) checks the math, not the build: it never runs
the type checks, layouts, register allocation or ptxas. This module closes that gap.

1. **Collect** (:func:`collect_launches`): the model (every data source, paper and legacy,
   one and two hops, fp32 and bf16/fp16 autocast, at the model's sizes and at tiny sizes that
   trigger Triton's ``== 1`` integer specialisations) and every bench case of the chosen size
   groups run forward and backward on CPU under ``kernels._common.record_launches``: each
   launch is recorded, with its real arguments and the configuration its launcher computed,
   instead of run. Nothing here repeats a block size: the configurations come from the
   launchers themselves.
2. **Specialise** each launch exactly as ``JITFunction.run`` would (Triton's own binder: int
   arguments equal to 1 become constants, 16-divisible ints and aligned pointers get
   divisibility attributes), then de-duplicate.
3. **Compile** each distinct specialisation for each target with ``triton.compile`` and
   read the cubin back: registers, spill stores/loads (ptxas ``-v``), shared memory
   (Triton's dynamic plus the cubin's static), local memory, and for configurations at the
   model's sizes the SASS instruction mix (HGMMA = Hopper wgmma, HMMA = mma.sync, FFMA =
   CUDA-core fp32 FMA; tiny-size configurations are built and checked, not disassembled).
4. **Report** ``compile-<arch>.json`` and ``.md`` (default ``bench/results/``).

The gate's rules (:func:`violations`, checked by tests/test_compile_gate.py): every
configuration compiles; nothing spills, except CBP beyond the model's sizes (output D >
4096, whose spills are reported); shared memory within the per-block limit of the target;
and wgmma (HGMMA) on sm_90a in the bf16/fp16 hot kernels (WGMMA_KERNELS) at the model's
sizes.

Run with ``TRITON_INTERPRET`` unset: interpreted kernels cannot be compiled.

May import: bench.cases, rwmn and kernels, Triton's compiler.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import cli

#: Compute capabilities of the supported targets; sm_90 builds as sm_90a (wgmma, TMA).
ARCHS = {"sm_90a": 90, "sm_80": 80}
#: Largest dynamic + static shared memory one block may use (opt-in maximum).
SHARED_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}
#: CBP output sizes at or below this are the model's (story 4096, read 300): no spill allowed.
MODEL_MAX_CBP_DIM = 4096
#: CBP output sizes compiled beyond what the model and the benches launch: a prime (the
#: dense path), a factorised size between the model's, and the largest fused one.
EXTRA_CBP_DIMS = (97, 600, 16000)
#: Kernels whose bf16/fp16 configurations must emit wgmma (HGMMA) on sm_90a: CBP at the story
#: size, the one-launch read, the conv-attention forward, and the memory convolution
#: (forward, dx, dw).
WGMMA_KERNELS = (
    "_cbp_fwd_kernel", "_cbp_spectra_kernel", "_cbp_product_kernel", "_cbp_bwd_kernel",
    "_read_fwd_kernel", "_read_conv_fwd_kernel", "_conv_attn_fwd_kernel", "_memconv_fwd_kernel",
    "_memconv_dx_kernel", "_memconv_dw_kernel",
)  # fmt: skip
#: CBP sizes whose bf16 kernels are held to WGMMA_KERNELS (the story size).
WGMMA_CBP_DIM = 4096
#: SASS opcodes counted in the instruction mix.
SASS_OPS = ("HGMMA", "HMMA", "FFMA")
RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------
# 1. Collect the launches
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One recorded run: its label, whether it is at the model's sizes, and a thunk."""

    label: str
    model_size: bool
    run: object


def _model_scenarios(tiny: bool) -> list[Scenario]:
    from rwmn.config import RWMNConfig
    from rwmn.model import RWMN

    out = []
    n, batch = (7, 1) if tiny else (1500, 32)
    for source in ("sub", "video_sub"):
        for legacy in (False, True):
            for hops in (1, 2):
                for amp in (None, torch.bfloat16, torch.float16):
                    cfg = RWMNConfig(data_source=source, legacy=legacy, num_hop=hops)
                    label = (
                        f"model {source} {'legacy' if legacy else 'paper'} hops={hops} "
                        f"{'fp32' if amp is None else str(amp).split('.')[-1]} n={n} B={batch}"
                    )
                    out.append(Scenario(label, not tiny, _model_thunk(RWMN, cfg, n, batch, amp)))
    return out


def _model_thunk(model_cls, cfg, n: int, batch: int, amp):
    def run():
        torch.manual_seed(0)
        model = model_cls(cfg)
        if cfg.video:
            story = (torch.randn(n, cfg.dim_rgb), torch.randn(n, cfg.dim_sub))
        else:
            story = torch.randn(n, cfg.dim_text)
        query = torch.randn(batch, cfg.dim_text)
        answers = torch.randn(batch, cfg.num_answer, cfg.dim_text)
        ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            logits = model(story, query, answers)
            loss = model.loss(logits, torch.zeros(batch, dtype=torch.long))
        loss.backward()

    return run


def _case_thunk(case, dtype):
    from bench import cases as C
    from rwmn import ops

    def run():
        kwargs, diff = C.make_inputs(case, "cpu", dtype)
        out = getattr(ops, case.op)(**kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return run


def _bench_scenarios(groups: Iterable[str]) -> list[Scenario]:
    from bench import cases as C

    out = []
    for case in C.cases(groups=tuple(groups)):
        for name in ("fp32", "bf16"):
            out.append(
                Scenario(f"bench {case.id} {name}", case.group == "model",
                         _case_thunk(case, C.DTYPES[name]))
            )  # fmt: skip
    for d in EXTRA_CBP_DIMS:
        case = C.Case("cbp", f"D{d}", "extra", {"x": (64, C.D_RGB), "y": (64, C.D_MEM), "D": d})
        for name in ("fp32", "bf16"):
            out.append(
                Scenario(f"cbp D={d} {name}", d <= MODEL_MAX_CBP_DIM,
                         _case_thunk(case, C.DTYPES[name]))
            )  # fmt: skip
    return out


def scenarios(groups: Iterable[str] = ("model", "sweep")) -> list[Scenario]:
    """Everything the gate runs: the model at its sizes and tiny, and the bench cases."""
    return _model_scenarios(tiny=False) + _model_scenarios(tiny=True) + _bench_scenarios(groups)


def collect_launches(scenario_list: list[Scenario]):
    """Run every scenario on CPU under the triton backend, recording its launches.

    Returns [(scenario, [KernelLaunch, ...])]; a scenario that raises is returned with the
    exception instead (it is a gate failure).
    """
    from kernels._common import record_launches
    from rwmn import ops

    results = []
    for sc in scenario_list:
        with record_launches() as launches, ops.use_backend("triton"):
            try:
                sc.run()
            except Exception as exc:  # reported as a failed row, the run goes on
                results.append((sc, exc))
                continue
        results.append((sc, list(launches)))
    return results


# --------------------------------------------------------------------------------------
# 2. Specialise as the JIT would
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileJob:
    """One distinct kernel specialisation, picklable for a worker process."""

    module: str
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int
    #: The constants by parameter name, for the report.
    named: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return json.dumps(
            [self.module, self.name, self.signature, _jsonable(self.constexprs),
             _jsonable(self.attrs), self.num_warps, self.num_stages],
            sort_keys=True,
        )  # fmt: skip


def _jsonable(mapping: dict) -> dict:
    return {str(k): repr(getattr(v, "value", v)) for k, v in mapping.items()}


def specialise(launch, target) -> CompileJob:
    """The signature, constants and attributes JITFunction.run would compile this launch
    with, from Triton's own binder (so 1-valued ints and divisibility match a real call)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.config.constexprs)
    kwargs.update(num_warps=launch.config.num_warps, num_stages=launch.config.num_stages)
    bound, spec, options = binder(*launch.args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return CompileJob(
        module=kernel.fn.__module__,
        name=kernel.fn.__name__,
        signature=dict(signature),
        constexprs={k: getattr(v, "value", v) for k, v in constexprs.items()},
        attrs=dict(attrs),
        num_warps=launch.config.num_warps,
        num_stages=launch.config.num_stages,
        named=_named_constants(kernel, constexprs),
    )


def _named_constants(kernel, constexprs: dict) -> dict:
    """Declared constexprs by name, then the int arguments the JIT fixed to 1 (as "=1")."""
    named, ones = {}, []
    for path, value in constexprs.items():
        param = kernel.params[path[0]]
        if param.is_constexpr:
            named[param.name] = getattr(value, "value", value)
        else:
            ones.append(param.name)
    if ones:
        named["=1"] = ",".join(ones)
    return named


# --------------------------------------------------------------------------------------
# 3. Compile and read the cubin back
# --------------------------------------------------------------------------------------


def _nvidia_bin(tool: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if not path.exists():
        raise FileNotFoundError(f"{path} (triton's bundled CUDA tools) is missing")
    return str(path)


_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _ptxas_path(capability: int) -> str:
    """The ptxas Triton itself runs for this target."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return _nvidia_bin("ptxas")
    try:
        return get_ptxas(capability).path
    except TypeError:  # older Triton: one ptxas for every target
        return get_ptxas().path


def _parse_ptxas_log(log: str) -> tuple[int, int, int] | None:
    """(registers, spill store bytes, spill load bytes) from a ptxas -v log, or None."""
    regs, spill = _REGS.search(log), _SPILL.search(log)
    if regs is None or spill is None:
        return None
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


def _ptxas_info(ptx: str, arch: str) -> tuple[int, int, int]:
    """ptxas -v figures from a separate run of Triton's ptxas on Triton's PTX (used when
    Triton's own log was not captured)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [_ptxas_path(ARCHS[arch]), "-lineinfo", "-v", f"--gpu-name={arch}", str(src),
               "-o", str(Path(tmp) / "k.cubin")]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    parsed = _parse_ptxas_log(log)
    if parsed is None:
        raise RuntimeError(f"ptxas -v printed no register/spill line: {log[:200]}")
    return parsed


def _cubin_info(cubin: bytes, sass: bool) -> dict:
    """Static shared memory and local bytes; with ``sass`` the counts of SASS_OPS in the
    disassembly (most of a job's time after the build itself: ~0.6 s a kernel), else None."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run(
            [_nvidia_bin("cuobjdump"), "--dump-resource-usage", str(path)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        code = ""
        if sass:
            code = subprocess.run(
                [_nvidia_bin("cuobjdump"), "--dump-sass", str(path)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
    m = _RESOURCE.search(res)
    info = {"static_shared": int(m.group(3)), "local_bytes": int(m.group(4))} if m else {}
    for op in SASS_OPS:
        info[op] = len(re.findall(rf"\b{op}\b", code)) if sass else None
    return info


def compile_job(job: CompileJob, arch: str, sass: bool = True) -> dict:
    """Compile one job for one arch; the row of the report (``error`` set on failure). With
    ``sass`` (the model's sizes) its instruction mix is counted too."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"arch": arch, "error": None}
    start = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(job.module), job.name)
        src = ASTSource(kernel, job.signature, job.constexprs, job.attrs)
        target = GPUTarget("cuda", ARCHS[arch], 32)
        options = {"num_warps": job.num_warps, "num_stages": job.num_stages}
        # TRITON_DUMP_PTXAS_LOG (set by build) makes Triton print its ptxas -v log.
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options)
        row["compile_s"] = round(time.perf_counter() - start, 2)
        parsed = _parse_ptxas_log(log.getvalue()) or _ptxas_info(compiled.asm["ptx"], arch)
        regs, spill_st, spill_ld = parsed
        row.update(registers=regs, spill_store=spill_st, spill_load=spill_ld)
        info = _cubin_info(compiled.asm["cubin"], sass)
        row.update(info)
        row["shared"] = int(compiled.metadata.shared) + info.get("static_shared", 0)
    except Exception as exc:  # a failed build is a row of the report, not a crash
        row["compile_s"] = round(time.perf_counter() - start, 2)
        # A Triton CompilationError says where on its first line and what on its last.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        what = lines[0] if lines else ""
        if len(lines) > 1:
            what += f" ... {lines[-1]}"
        row["error"] = f"{type(exc).__name__}: {what}"[:400]
    return row


# --------------------------------------------------------------------------------------
# 4. The report
# --------------------------------------------------------------------------------------


def _dtype_of(job: CompileJob) -> str:
    ptr_types = [t[1:] for t in job.signature.values() if isinstance(t, str) and t[0] == "*"]
    for half in ("bf16", "fp16"):
        if half in ptr_types:
            return half
    return "fp32"


def build(
    arches: list[str], groups: Iterable[str], workers: int, kernels: Iterable[str] = ()
) -> dict:
    """Collect, specialise, compile: the report as a dict {arch: {...}}."""
    import triton
    from triton.backends.compiler import GPUTarget

    collected = collect_launches(scenarios(groups))
    scenario_errors = [
        {"scenario": sc.label, "error": f"{type(r).__name__}: {r}"[:300]}
        for sc, r in collected
        if isinstance(r, Exception)
    ]
    report = {}
    for arch in arches:
        target = GPUTarget("cuda", ARCHS[arch], 32)
        jobs: dict[str, tuple[CompileJob, set, bool]] = {}
        for sc, launches in collected:
            if isinstance(launches, Exception):
                continue
            for launch in launches:
                if kernels and not any(k in launch.name for k in kernels):
                    continue
                job = specialise(launch, target)
                entry = jobs.setdefault(job.key, (job, set(), False))
                jobs[job.key] = (job, entry[1] | {sc.label}, entry[2] or sc.model_size)
        ordered = sorted(jobs.values(), key=lambda e: (e[0].name, e[0].key))
        # Workers compile afresh (no cache hit hides the ptxas log) and print that log.
        os.environ.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            rows = list(
                pool.map(compile_job, [e[0] for e in ordered], [arch] * len(ordered),
                         [e[2] for e in ordered])
            )  # fmt: skip
        out_rows = []
        for (job, labels, model_size), row in zip(ordered, rows, strict=True):
            row.update(
                kernel=job.name,
                module=job.module,
                dtype=_dtype_of(job),
                constexprs=job.named,
                num_warps=job.num_warps,
                num_stages=job.num_stages,
                model_size=model_size,
                spill_checked=_model_cbp_size(job),
                launched_by=sorted(labels)[:4]
                + ([f"+{len(labels) - 4} more"] if len(labels) > 4 else []),
            )
            out_rows.append(row)
        report[arch] = {
            "arch": arch,
            "shared_limit": SHARED_LIMIT[arch],
            "triton": triton.__version__,
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "commit": _git_commit(),
            "scenarios": len(collected),
            "scenario_errors": scenario_errors,
            "rows": out_rows,
        }
    return report


def _model_cbp_size(job: CompileJob) -> bool:
    """CBP kernels count as model-sized only up to the model's largest output size."""
    d = job.named.get("D")
    return d is None or int(d) <= MODEL_MAX_CBP_DIM


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parent)  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, cwd=Path(__file__).parent,
        )  # fmt: skip
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def violations(arch_report: dict) -> list[str]:
    """The gate's failures for one arch: scenarios that did not run, build errors, spills
    where the no-spill rule applies, shared memory over the limit, hot bf16/fp16 kernels
    without wgmma on sm_90a."""
    out = [f"scenario {e['scenario']}: {e['error']}" for e in arch_report["scenario_errors"]]
    arch, limit = arch_report["arch"], arch_report["shared_limit"]
    for row in arch_report["rows"]:
        what = f"{arch} {row['kernel']} [{row['dtype']}] {_short(row['constexprs'])}"
        if row["error"]:
            out.append(f"{what}: does not compile: {row['error']}")
            continue
        if row["spill_checked"] and (row["spill_store"] or row["spill_load"]):
            out.append(
                f"{what}: spills {row['spill_store']} B stores / {row['spill_load']} B loads"
            )
        if row["shared"] > limit:
            out.append(f"{what}: {row['shared']} B of shared memory > {limit}")
        if _needs_wgmma(row) and not row["HGMMA"]:
            out.append(f"{what}: no wgmma (HGMMA) in a bf16/fp16 hot kernel")
    return out


def _needs_wgmma(row: dict) -> bool:
    hot = row["arch"] == "sm_90a" and row["model_size"] and row["dtype"] != "fp32"
    if not hot or row["kernel"] not in WGMMA_KERNELS:
        return False
    if not row["kernel"].startswith("_cbp"):
        return True
    return int(row["constexprs"]["D"]) == WGMMA_CBP_DIM and "R1" in row["constexprs"]


def _short(constexprs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in constexprs.items())


def to_markdown(arch_report: dict) -> str:
    rows = arch_report["rows"]
    bad = violations(arch_report)
    failed = sum(1 for r in rows if r["error"])
    spilling = [r for r in rows if not r["error"] and (r["spill_store"] or r["spill_load"])]
    lines = [
        f"# Compile report: {arch_report['arch']}",
        "",
        f"Triton {arch_report['triton']}, torch {arch_report['torch']}, commit "
        f"{arch_report['commit']}, {arch_report['date']}. Generated by "
        "`python -m bench compile_report` (real code generation, no GPU): every distinct "
        "kernel specialisation that the model (sub and video_sub, paper and legacy, 1 and 2 "
        "hops, fp32 and bf16/fp16 autocast, model sizes and tiny sizes) and the bench cases "
        "launch, compiled for this target.",
        "",
        f"- configurations: **{len(rows)}**, compile failures: **{failed}**, "
        f"with spills: **{len(spilling)}** "
        f"(where the no-spill rule applies: **{sum(1 for r in spilling if r['spill_checked'])}**)",
        f"- gate violations: **{len(bad)}**; shared-memory limit {arch_report['shared_limit']} B",
        "",
    ]
    if bad:
        lines += ["## Violations", ""] + [f"- {v}" for v in bad] + [""]
    lines += [
        "## Configurations",
        "",
        "| kernel | dtype | constexprs | warps/stages | model size | regs | spill st/ld B | "
        "shared B | HGMMA | HMMA | FFMA | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cfg = _short(r["constexprs"]).replace("|", "/")
        if r["error"]:
            lines.append(
                f"| {r['kernel']} | {r['dtype']} | {cfg} | {r['num_warps']}/{r['num_stages']} | "
                f"{'yes' if r['model_size'] else 'no'} | FAILED: {r['error']} |||||||"
            )
            continue
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {cfg} | {r['num_warps']}/{r['num_stages']} | "
            f"{'yes' if r['model_size'] else 'no'} | {r['registers']} | "
            f"{r['spill_store']}/{r['spill_load']} | {r['shared']} | "
            + " | ".join("-" if r[op] is None else str(r[op]) for op in SASS_OPS)
            + f" | {r['compile_s']} |"
        )
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for arch, arch_report in report.items():
        base = out_dir / f"compile-{arch}"
        base.with_suffix(".json").write_text(json.dumps(arch_report, indent=1, default=str) + "\n")
        base.with_suffix(".md").write_text(to_markdown(arch_report))
        paths += [base.with_suffix(".json"), base.with_suffix(".md")]
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("compile_report", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        default="sm_90a,sm_80",
        help=f"comma-separated targets among {', '.join(ARCHS)} (default %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="output folder (default bench/results)"
    )
    parser.add_argument(
        "--groups", default="model,sweep", help="bench size groups to include (default %(default)s)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel compile processes (default: one per core)",
    )
    parser.add_argument(
        "--kernels", default="", help="only kernels whose name contains one of these (comma list)"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_report: unset TRITON_INTERPRET: interpreted kernels cannot be compiled",
              file=sys.stderr)  # fmt: skip
        return 2
    arches = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in arches if a not in ARCHS]
    if unknown:
        print(f"compile_report: --arch {','.join(unknown)} unknown; expected {', '.join(ARCHS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    start = time.perf_counter()
    groups = [g for g in args.groups.split(",") if g]
    kernels = [k for k in args.kernels.split(",") if k]
    report = build(arches, groups, args.workers, kernels)
    for path in write(report, args.out):
        print(f"wrote {path}")
    status = 0
    for arch, arch_report in report.items():
        bad = violations(arch_report)
        print(f"{arch}: {len(arch_report['rows'])} configurations, {len(bad)} gate violations")
        for v in bad:
            print(f"  {v}")
        status |= bool(bad)
    print(f"compile_report: {time.perf_counter() - start:.0f} s")
    return 1 if status else 0


if __name__ == "__main__":
    raise SystemExit(main())
