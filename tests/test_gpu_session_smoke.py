"""bench.gpu_session: its --smoke CPU path end to end, as CI runs it, and its parts.

The smoke run is the GPU command on tiny shapes (kernels on the Triton interpreter), run
once per module with four cases made to fail (--inject-error): a check, a census step, an
op timing and a training step. Each must be reported in its own row while the run goes on
to the end. The parts that the smoke run cannot reach on a CPU (the summary of a full GPU
run, a timeout, a failing CUDA test, a missing matplotlib, the GPU census's kernel names)
are tested directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from user_env import user_env

from bench import cases as C
from bench import checks, timing
from bench.gpu_session import config as session_config
from bench.gpu_session import kernel_census
from bench.gpu_session import procs as session_procs
from bench.gpu_session import report as session_report
from bench.gpu_session import session as gpu_session
from bench.pipeline import LOADERS

REPO = Path(__file__).resolve().parent.parent
#: Cases the smoke run is told to fail, one per kind of section.
INJECTED = (
    "check-op/cbp/smoke-story/fp32",
    "census/video_sub/fp32/fused",
    "op/attention_read/smoke-read/fused/forward+backward/fp32",
    "step/sub/eager/fp32/reference",
)
#: Markdown sections every run writes.
MD_SECTIONS = (
    "## Provenance",
    "## Ceilings",
    "## CUDA-marked tests",
    "## Checks: fused vs reference vs float64",
    "## GPU census: the kernels of one training step against bench.census",
    "## Benchmark results",
    "## Input pipeline",
    "## Compile warm-up",
    "## Notes",
    "## Summary",
)
SMOKE_CASES = C.cases(("smoke",))
STEP_CONFIGS = ("video_sub", "sub")
#: The smoke run's step cases per mode (fp32 only): every mode at least once; cuda-graphs
#: (fused only) is skipped off CUDA, max-autotune (the reference, sub) runs as compiled.
STEP_ROWS = {"eager": 4, "cuda-graphs": 2, "max-autotune": 1, "compiled": 4, "reduce-overhead": 4}
# data generation, then each loader (train.py's cache modes among them) x cold/warm
PIPELINE_ROWS_PER_SOURCE = 1 + 2 * len(LOADERS)


def _session(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # As a user types it in the checkout: no TRITON_INTERPRET, no PYTHONPATH.
    return subprocess.run(
        [sys.executable, "-m", "bench", "gpu_session", *args], cwd=REPO, env=user_env(),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-session")
    logs = tmp_path_factory.mktemp("gpu-session-logs")
    injected = [a for case in INJECTED for a in ("--inject-error", case)]
    t0 = time.monotonic()
    proc = _session("--smoke", "--out", str(out), "--logs", str(logs), "--seed", "7", *injected)
    wall = time.monotonic() - t0
    found = sorted(out.glob("cpu-smoke-*.json"))
    assert len(found) == 1, (found, proc.stderr[-4000:])
    data = json.loads(found[0].read_text())
    return SimpleNamespace(
        proc=proc, out=out, wall=wall, data=data, md=found[0].with_suffix(".md").read_text()
    )


def _all_rows(data: dict) -> list[dict]:
    checks = data["checks"]["ops"] + data["checks"]["model"]
    return checks + data["census"] + data["rows"] + data["pipeline"]


def test_smoke_run_finishes_and_fails_only_for_the_injected_cases(smoke):
    # Exit status 1: four cases raised; everything else ran.
    assert smoke.proc.returncode == 1, smoke.proc.stderr[-4000:]
    # A hang guard, not a benchmark: the smoke run takes one to three minutes on 2 cores.
    assert smoke.wall < 600, f"the smoke run took {smoke.wall:.0f} s"
    errors = {r["case_id"] for r in _all_rows(smoke.data) if r["status"] == "error"}
    assert errors == set(INJECTED)
    for r in _all_rows(smoke.data):
        if r["case_id"] in INJECTED:
            assert r["reason"].startswith("InjectedError: --inject-error"), r
            assert "\n" not in r["reason"] and "InjectedError" in r["detail"]
        elif r["status"] == "skipped":
            # Only what the interpreter cannot do (compiled fused steps), and CUDA graphs.
            if r.get("mode") == "cuda-graphs":
                assert r["reason"] == "CUDA graphs need a CUDA device", r
            else:
                assert "interpreter" in r["reason"].lower(), r
        else:
            assert r["status"] == "ok", r
    # The run went on past each injected case: the cases after them were measured.
    ids = [r["case_id"] for r in smoke.data["rows"]]
    for case in INJECTED[2:]:
        later = ids[ids.index(case) + 1 :]
        assert later, case


def test_every_section_is_present(smoke):
    data = smoke.data
    meta = data["meta"]
    assert meta["label"] == "CPU" and meta["smoke"] and meta["device"] == "cpu"
    assert meta["torch"] == torch.__version__ and meta["source_digest"]
    if (REPO / ".git").exists():
        assert len(meta["git_commit"]) == 40
    ceilings = meta["ceilings"]
    assert ceilings["copy_bandwidth_Bps"] > 0
    assert set(ceilings["matmul_flops_per_s"]) == {"fp32", "bf16", "tf32"}
    assert set(meta["sections_s"]) >= {
        "ceilings", "checks", "census", "ops", "pipeline", "step", "plots",
    }  # fmt: skip
    assert meta["section_errors"] == {}

    tests = data["tests"]
    assert tests["tests"] and not tests["timed_out"]
    assert sum(tests["counts"].values()) == len(tests["tests"])
    if not torch.cuda.is_available():
        assert {t["outcome"] for t in tests["tests"]} == {"skipped"}

    check_ops = data["checks"]["ops"]
    assert [(r["op"], r["size"]) for r in check_ops] == [(c.op, c.size) for c in SMOKE_CASES]
    for r in check_ops:
        if r["status"] == "ok":
            assert r["verdict"] == "pass", r
            assert r["tensors"] and all(t["ok"] for t in r["tensors"])
    model = data["checks"]["model"]
    assert [(r["config"], r["verdict"]) for r in model] == [(c, "pass") for c in STEP_CONFIGS]
    assert any(t["tensor"].startswith("grad ") for t in model[0]["tensors"])

    census = {(r["config"], r["backend"]): r for r in data["census"]}
    assert list(census) == [("sub", "fused"), ("sub", "reference"), ("video_sub", "fused")]
    for key in (("sub", "fused"), ("sub", "reference")):
        row = census[key]
        assert row["status"] == "ok" and row["source"] == kernel_census.SOURCE_CPU_OPS, row
        assert row["within_tolerance"] is None and row["cpu_launches"] > 0 and row["kernels"]
        assert sum(k["cpu"] for k in row["by_kind"].values()) == row["cpu_launches"]
    assert census[("sub", "fused")]["by_kind"]["triton"]["cpu"] > 0
    # Without CUDA the reference step's CPU ops stand in for its kernels, and nearly match.
    assert 0.5 < census[("sub", "reference")]["ratio"] < 2

    ops = [r for r in data["rows"] if r["kind"] == "op"]
    assert len(ops) == len(SMOKE_CASES) * len(C.BACKENDS)
    compiled = [r for r in ops if r["backend"] == "compiled"]
    assert {r["compile_backend"] for r in compiled} == {"aot_eager"}
    steps = [r for r in data["rows"] if r["kind"] == "e2e"]
    modes = [r["mode"] for r in steps]
    assert {m: modes.count(m) for m in STEP_ROWS} == STEP_ROWS and len(steps) == 15
    graphs = [r for r in steps if r["mode"] == "cuda-graphs"]
    assert {(r["status"], r["backend"], r["padded_n"]) for r in graphs} == {
        ("skipped", "fused", 64)
    }
    autotuned = next(r for r in steps if r["mode"] == "max-autotune")
    assert autotuned["status"] == "ok" and "runs as compiled" in autotuned["note"]
    assert {r["label"] for r in ops + steps} == {"CPU"}
    pipeline = data["pipeline"]
    assert len(pipeline) == 2 * PIPELINE_ROWS_PER_SOURCE
    assert all(r["questions_per_s"] > 0 for r in pipeline if r.get("phase") == "warm")
    assert {"cache:none", "cache:host", "cache:device"} <= {r["loader"] for r in pipeline}

    warm = data["warm"]
    assert (warm["processes"], warm["done"], warm["counts"]["ok"]) == (1, 1, 1)

    for heading in MD_SECTIONS:
        assert heading in smoke.md, heading
    # The output folder holds the results alone (a lent GPU's tool returns at most 8 files);
    # the logs are elsewhere.
    files = sorted(p.name for p in smoke.out.iterdir())
    assert len(files) <= session_config.MAX_RESULT_FILES, files
    assert all(p.is_file() for p in smoke.out.iterdir()), files
    assert not Path(meta["logs"]).is_relative_to(smoke.out)
    assert (Path(meta["logs"]) / "pytest-cuda.log").is_file()
    assert "**CPU smoke run**" in smoke.md
    plots = meta["plots"]
    if plots:  # matplotlib is installed (the test extra): one PNG per op, one of the step
        assert len(plots) == len(C.OPS) + 1
        for path in plots:
            assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert any("matplotlib" in n for n in data["notes"])


def test_summary_is_last_and_short(smoke):
    summary = smoke.data["summary"]
    assert 0 < len(summary) <= session_report.SUMMARY_MAX_LINES
    assert smoke.md.rstrip().endswith(summary[-1])
    stdout = smoke.proc.stdout.rstrip().splitlines()
    assert stdout[-len(summary) :] == summary
    text = "\n".join(summary)
    for case in SMOKE_CASES:
        assert f"| {case.id} | fp32 |" in text
    # The injected fused op is reported in its own row of the summary, as an error.
    assert "| attention_read/smoke-read | fp32 | error: InjectedError |" in text
    assert "ops checks 6/6 pass, 1 error; model checks 2/2 pass" in text


def test_sweep_part(tmp_path):
    proc = _session(
        "--smoke", "--part", "sweep", "--ops", "attention_read", "--warm-processes", "0",
        "--out", str(tmp_path), "--logs", str(tmp_path / "logs"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(next(tmp_path.glob("cpu-smoke-*-sweep.json")).read_text())
    assert data["tests"] is None and not data["checks"]["ops"]
    assert {(r["op"], r["backend"]) for r in data["rows"]} == {
        ("attention_read", b) for b in C.BACKENDS
    }
    assert all(r["status"] == "ok" for r in data["rows"])
    assert len(data["summary"]) <= session_report.SUMMARY_MAX_LINES


# ----------------------------------------------------------------------------- parts


def _full_config(part: str) -> session_config.SessionConfig:
    args = session_config.parse_args(["--part", part])
    return session_config.build_config(args)


def _fake_results(cfg: session_config.SessionConfig) -> dict:
    """Results of a complete GPU run of ``cfg`` (every case measured), without running."""
    meta = {
        "label": "GPU", "device_name": "NVIDIA H200", "driver": "1", "torch": "2.11",
        "triton": "3.6", "cuda": "12.8", "git_commit": "f" * 40, "source_digest": "0",
        "date": "2026-01-01T00:00:00+00:00",
        "ceilings": {
            "copy_bandwidth_Bps": 4e12, "matmul_flops_per_s": {"fp32": 5e13, "bf16": 7e14},
        },
    }  # fmt: skip
    rows = []
    for case in C.cases(cfg.groups, cfg.ops):
        for dtype in cfg.time_dtypes:
            for backend in cfg.backends:
                for pass_ in cfg.passes:
                    row = {"kind": "op", "op": case.op, "size": case.size, "backend": backend}
                    row.update({"pass": pass_, "dtype": dtype, "status": "ok", "median_ms": 1.0})
                    row.update(bound="memory", bw_fraction=0.5, peak_mem_bytes=2**20)
                    rows.append(row)
    for config, mode, precision, backend in cfg.step.cases():
        rows.append(
            {"kind": "e2e", "config": config, "mode": mode, "precision": precision,
             "backend": backend, "status": "ok", "median_ms": 10.0}
        )  # fmt: skip
    pipeline = [
        {"source": s, "loader": "random_batch+to(device)", "phase": p, "status": "ok",
         "median_ms": 1.0}
        for s in cfg.pipeline_sources for p in ("cold", "warm")
    ]  # fmt: skip
    check = {"status": "ok", "verdict": "pass"}
    census = [
        {"config": config, "precision": precision, "backend": backend, "status": "ok",
         **kernel_census.compare({"triton": 50, "gemm": 10}, ["_k"] * 55 + ["nvjet_x"] * 10,
                                 {"_k"}, 0.1)}
        for config, precision, backend in cfg.census.cases
    ]  # fmt: skip
    return {
        "meta": meta, "rows": rows, "pipeline": pipeline, "census": census,
        "checks": {"ops": [check] * 21, "model": [check] * 4},
        "tests": {"counts": dict.fromkeys(session_procs.OUTCOMES, 1), "timed_out": False},
    }  # fmt: skip


@pytest.mark.parametrize("part", session_config.PARTS)
def test_summary_of_a_full_gpu_run_fits(part):
    """The smoke run has one dtype; a GPU run's summary must fit too, every case shown."""
    cfg = _full_config(part)
    summary = session_report.summary_lines(cfg, _fake_results(cfg))
    assert len(summary) <= session_report.SUMMARY_MAX_LINES, "\n".join(summary)
    text = "\n".join(summary)
    assert "more rows" not in text
    if part == "sweep":  # one line per op, size family and dtype
        for case in C.cases(cfg.groups, cfg.ops):
            for dtype in cfg.time_dtypes:
                assert f"| {case.op}/{case.family} | {dtype} | {case.sweep} " in text
    else:
        for case in C.cases(cfg.groups, cfg.ops):
            for dtype in cfg.time_dtypes:
                assert f"| {case.id} | {dtype} | 1 | 1x | 1x | 50.0% BW | 1.0/1.0 |" in text
        for config, mode, precision, backend in cfg.step.cases():
            if backend == "fused":
                assert f"| step {config} {mode} | {precision} | 10 | 1x | 1x |" in text
        assert "target >= 4x): 1x" in text
        assert "max-autotune (10 ms), fused: eager 1x, cuda-graphs 1x, compiled 1x" in text
        assert "video_sub bf16 65/60 = 1.08 (ok)" in text


def test_budget_fits_seven_minutes():
    """The session's limit is 7 minutes wall: the budget leaves room for start-up (imports)."""
    for part in session_config.PARTS:
        budget = _full_config(part).budget
        assert budget.total_s <= 7 * 60 - 30
        assert max(budget.warm_by, budget.tests_by, budget.ops_by, budget.step_by) < 1
    main = _full_config("main").budget
    sections = [
        main.checks_by, main.census_by, main.tests_by, main.ops_by, main.pipeline_by, main.step_by,
    ]  # fmt: skip
    assert sections == sorted(sections)


def test_time_limit_stops_a_case():
    t0 = time.monotonic()
    with pytest.raises(gpu_session.CaseTimeout), gpu_session.time_limit(0.2):
        time.sleep(5)
    assert time.monotonic() - t0 < 2
    with gpu_session.time_limit(5):  # the alarm is cancelled on the way out
        pass
    time.sleep(0.01)


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_a" name="test_ok" time="0.5"/>
<testcase classname="tests.test_a" name="test_bad[(1, 2)]" time="1.0">
  <failure message="AssertionError: fused error 3e-2&#10;second line">trace</failure></testcase>
<testcase classname="tests.test_b" name="test_setup" time="0.1"><error message="boom"/></testcase>
<testcase classname="tests.test_b" name="test_gpu" time="0"><skipped message="needs a CUDA device"/>
</testcase></testsuite></testsuites>"""


def test_parse_junit(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(JUNIT)
    tests = session_procs.parse_junit(path)
    assert [(t["test"], t["outcome"]) for t in tests] == [
        ("tests.test_a::test_ok", "passed"),
        ("tests.test_a::test_bad[(1, 2)]", "failed"),
        ("tests.test_b::test_setup", "error"),
        ("tests.test_b::test_gpu", "skipped"),
    ]
    assert tests[1]["message"] == "AssertionError: fused error 3e-2"
    assert tests[1]["detail"] == ["trace"] and tests[0]["detail"] is None


def test_parse_verbose_log_of_a_stopped_run():
    log = (
        "tests/test_a.py::test_ok PASSED                [ 10%]\n"
        "tests/test_a.py::test_bad[(1, 1, 3)-dtype0] FAILED  [ 20%]\n"
        "some other output\n"
        "tests/test_b.py::test_gpu SKIPPED (needs a CUDA device) [ 30%]\n"
    )
    tests = session_procs.parse_verbose_log(log)
    assert [(t["test"], t["outcome"]) for t in tests] == [
        ("tests/test_a.py::test_ok", "passed"),
        ("tests/test_a.py::test_bad[(1, 1, 3)-dtype0]", "failed"),
        ("tests/test_b.py::test_gpu", "skipped"),
    ]


def test_failing_tests_make_the_run_fail():
    results = {"checks": {"ops": [], "model": []}, "rows": [], "pipeline": [], "meta": {}}
    counts = dict.fromkeys(session_procs.OUTCOMES, 0)
    results["tests"] = {"counts": {**counts, "passed": 3}, "timed_out": False}
    assert gpu_session.exit_status(results) == 0
    results["tests"] = {"counts": {**counts, "failed": 1}, "timed_out": False}
    assert gpu_session.exit_status(results) == 1
    results["tests"] = {"counts": counts, "timed_out": True}
    assert gpu_session.exit_status(results) == 1


def _attention_case():
    return next(c for c in SMOKE_CASES if c.op == "attention_read")


def test_check_passes_the_reference_itself():
    from rwmn import reference

    result = checks.check_op(_attention_case(), "fp32", "cpu", 3, fused=reference.attention_read)
    assert result["verdict"] == "pass", result


def test_check_catches_an_unwritten_output():
    """The fused call's buffers start as NaN: a kernel that skips elements fails."""
    from rwmn import reference

    def leaves_a_gap(**kwargs):
        o, p = reference.attention_read(**kwargs)
        out = torch.empty_like(o)
        out[:, 1:] = o[:, 1:]  # column 0 never written
        return out, p

    result = checks.check_op(_attention_case(), "fp32", "cpu", 3, fused=leaves_a_gap)
    assert result["verdict"] == "FAIL"
    assert "output 0" in result["failed"] and "NaN" in result["worst_why"]
    assert torch.empty(3).dtype == torch.float32  # the patch is gone
    assert "new_empty" not in torch.Tensor.__dict__


def test_check_catches_a_small_error():
    from rwmn import reference

    def off_by_a_bit(**kwargs):
        o, p = reference.attention_read(**kwargs)
        return o * (1 + 1e-4), p

    result = checks.check_op(_attention_case(), "fp32", "cpu", 3, fused=off_by_a_bit)
    assert result["verdict"] == "FAIL" and "output 0" in result["failed"]


def test_plots_are_optional(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths, note = session_report.write_plots([], tmp_path, "x", "provenance")
    assert paths == [] and "matplotlib is not installed" in note
    assert not list(tmp_path.iterdir())


def test_git_commit_without_the_git_program(tmp_path):
    sha = "a" * 40
    repo = tmp_path / "repo"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".git" / "packed-refs").write_text(f"# pack-refs\n{sha} refs/heads/main\n")
    assert timing.git_head_from_files(repo) == sha
    (repo / ".git" / "refs" / "heads" / "main").write_text("b" * 40 + "\n")
    assert timing.git_head_from_files(repo) == "b" * 40
    # A worktree: .git is a file naming its own git dir, whose refs live in the common one.
    tree, own = tmp_path / "tree", repo / ".git" / "worktrees" / "tree"
    own.mkdir(parents=True)
    tree.mkdir()
    (tree / ".git").write_text(f"gitdir: {own}\n")
    (own / "HEAD").write_text("ref: refs/heads/main\n")
    (own / "commondir").write_text("../..\n")
    assert timing.git_head_from_files(tree) == "b" * 40
    assert timing.git_head_from_files(tmp_path / "copy-without-git") is None


# ------------------------------------------------------------------------ GPU census

#: Kernel names as torch.profiler gives them on a GPU (demangled), and their kinds.
KERNEL_NAMES = {
    "_read_fwd_kernel": "triton",
    "triton_poi_fused_add_mul_0": "triton",
    "nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNN": "gemm",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "gemm",
    "void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_64x64_16x6_tn_align4>(Params)": "gemm",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, float>(cublasLt::cublasSplitKParams)":
        "gemm",
    "void regular_fft_r2c<256u, EPT_8, 32u, 2u, float, float2>(unsigned int, float*)": "fft",
    "Memcpy DtoD (Device -> Device)": "copy",
    "Memset (Device)": "fill",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
    "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)":
        "fill",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda("
    "at::TensorIteratorBase&)::{lambda()#3}>(int)": "copy",
    "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<"
    "at::native::BinaryFunctor<float, float, float, at::native::binary_internal::MulFunctor"
    "<float> > >(at::TensorIteratorBase&)>(int)": "elementwise",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, "
    "at::native::func_wrapper_t<float, at::native::sum_functor<float, float, float>>, "
    "unsigned int, float, 4> >(at::native::ReduceOp<float>)": "reduction",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float>(float*)":
        "reduction",
    "void at::native::index_elementwise_kernel<128, 4>(long, at::native::gpu_index_kernel)":
        "index",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::"
    "FusedAdagradMathFunctor<float, 2> >(int)": "optimizer",
    "void at::native::(anonymous namespace)::masked_fill_kernel<bool>(int)": "elementwise",
    "something the rules do not name (it has spaces)": "other",
    "aten::mm": "gemm",
    "aten::fill_": "fill",
    "aten::_fused_adagrad_": "optimizer",
}  # fmt: skip


@pytest.mark.parametrize("name", list(KERNEL_NAMES))
def test_kernel_kind(name):
    assert kernel_census.kernel_kind(name, {"_read_fwd_kernel"}) == KERNEL_NAMES[name]
    assert KERNEL_NAMES[name] in kernel_census.KINDS


def test_kernel_kind_prefers_the_census_triton_names():
    """A Triton kernel is known by name first, whatever words its name contains."""
    name = "_scatter_gemm_copy_kernel"
    assert kernel_census.kernel_kind(name) == "gemm"
    assert kernel_census.kernel_kind(name, {name}) == "triton"


def test_short_name():
    long = next(n for n in KERNEL_NAMES if "FusedAdagrad" in n)
    assert kernel_census.short_name("void foo<int, (int)2>(int, float)") == "foo<int, (int)2>"
    assert kernel_census.short_name(long).startswith("at::native::(anonymous namespace)::")
    assert len(kernel_census.short_name(long, width=40)) == 40
    assert (
        kernel_census.short_name("Memcpy DtoD (Device -> Device)")
        == "Memcpy DtoD (Device -> Device)"
    )


def test_compare_a_kernel_list_with_the_cpu_count():
    cpu = {"triton": 20, "gemm": 4, "elementwise": 6}
    names = ["_a_kernel"] * 20 + ["nvjet_x"] * 4 + ["Memset (Device)"] * 2 + ["void f<4>(int)"]
    names += ["void at::native::vectorized_elementwise_kernel<4>(int)"] * 6
    out = kernel_census.compare(cpu, names, {"_a_kernel"}, tolerance=0.1)
    assert (out["cpu_launches"], out["device_kernels"], out["ratio"]) == (30, 33, 1.1)
    assert out["within_tolerance"]  # 10% more, at the edge
    assert out["by_kind"] == {
        "triton": {"cpu": 20, "device": 20},
        "gemm": {"cpu": 4, "device": 4},
        "elementwise": {"cpu": 6, "device": 6},
        "fill": {"cpu": 0, "device": 2},
        "other": {"cpu": 0, "device": 1},
    }
    assert out["kernels"][0] == ["_a_kernel", 20] and out["distinct_kernels"] == 5
    assert not kernel_census.compare(cpu, names + ["x"], (), tolerance=0.1)["within_tolerance"]
    empty = kernel_census.compare({}, [], (), tolerance=0.1)
    assert empty["ratio"] is None and empty["within_tolerance"] is None


def test_device_kernels_of_a_profile():
    """The CUDA events of a profile, in launch order; CPU events and the GPU-side copies
    of annotated ranges are left out."""
    from torch.autograd import DeviceType

    def event(name, device, start):
        return SimpleNamespace(
            name=name, device_type=device, time_range=SimpleNamespace(start=start)
        )

    events = [
        event("aten::mm", DeviceType.CPU, 0),
        event("nvjet_b", DeviceType.CUDA, 2),
        event("_a_kernel", DeviceType.CUDA, 1),
        event("Optimizer.step#Adagrad.step", DeviceType.CUDA, 3),
        event("Optimizer.zero_grad#Adagrad.zero_grad", DeviceType.CUDA, 4),
    ]
    events[3].is_user_annotation = True
    events[4].activity_type = "gpu_user_annotation"
    assert kernel_census.device_kernels(events) == ["_a_kernel", "nvjet_b"]
