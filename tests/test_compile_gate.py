"""The compile gate: every kernel configuration builds for real GPUs (bench.compile_report).

The Triton interpreter tests check the math; this checks the build. ``bench.compile_report``
runs the model (every data source, paper and legacy, 1 and 2 hops, fp32 and bf16/fp16
autocast, model and tiny sizes) and the bench cases at the model's sizes with launches
recorded instead of run, and compiles every distinct specialisation with Triton's real code
generator for sm_90a and sm_80 (no GPU needed). The bench sweep's sizes are left to
``python -m bench compile_report`` (its default), run before a GPU session. It runs in a
subprocess: this test session interprets the kernels (TRITON_INTERPRET=1,
tests/conftest.py), and interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compile_report as cr

ROOT = Path(__file__).resolve().parents[1]
#: A hang guard on the whole report: on CI's 2 cores, sharing them with the other test
#: worker, it takes 10-15 minutes.
REPORT_TIMEOUT_S = 2700
#: CBP output sizes the gate must cover: the model's (300, 4096), a prime (dense path),
#: a factorised size between them, and the largest fused one.
CBP_DIMS = {97, 300, 600, 4096, 16000}
KERNELS = {
    "_cbp_fwd_kernel", "_cbp_spectra_kernel", "_cbp_product_kernel", "_cbp_bwd_kernel",
    "_cbp_dense_fwd_kernel", "_cbp_dense_bwd_kernel", "_cbp_dense_spectra_kernel",
    "_read_fwd_kernel", "_read_conv_fwd_kernel",
    "_memconv_fwd_kernel", "_memconv_dx_kernel", "_memconv_dw_kernel",
    "_attn_fwd_kernel", "_attn_bwd_kernel", "_conv_attn_fwd_kernel", "_conv_attn_bwd_kernel",
    "_unit_norm_fwd_kernel", "_unit_norm_bwd_kernel",
    "_hop_update_fwd_kernel", "_hop_update_bwd_kernel", "_spectral_weights_kernel",
    "_answer_fwd_kernel", "_answer_bwd_kernel", "_broadcast_sums_kernel",
    "_embed_fwd_kernel", "_embed_dw_kernel", "_ce_fwd_kernel", "_ce_bwd_kernel",
    "_row_norms_kernel",
}  # fmt: skip

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "compile_report", "--groups", "model", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=REPORT_TIMEOUT_S,
    )  # fmt: skip
    reports = {}
    for arch in cr.ARCHS:
        path = out / f"compile-{arch}.json"
        assert path.exists(), f"no {path.name}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        reports[arch] = json.loads(path.read_text())
        assert (out / f"compile-{arch}.md").exists()
    return proc, reports


def test_gate_passes(gate):
    proc, reports = gate
    problems = [v for r in reports.values() for v in cr.violations(r)]
    assert not problems, "\n".join(problems)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("arch", list(cr.ARCHS))
def test_every_configuration_builds(gate, arch):
    report = gate[1][arch]
    assert not report["scenario_errors"]
    failed = [
        f"{r['kernel']} {r['constexprs']}: {r['error']}" for r in report["rows"] if r["error"]
    ]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("arch", list(cr.ARCHS))
def test_coverage(gate, arch):
    """Every kernel, both dtypes, every CBP size and the JIT's ==1 specialisations."""
    rows = gate[1][arch]["rows"]
    assert {r["kernel"] for r in rows} == KERNELS
    assert {r["dtype"] for r in rows} == {"fp32", "bf16", "fp16"}
    cbp_dims = {int(r["constexprs"]["D"]) for r in rows if "cbp" in r["kernel"]}
    assert cbp_dims == CBP_DIMS
    assert any("=1" in r["constexprs"] for r in rows)  # tiny sizes: ints the JIT fixes to 1
    big = [r for r in rows if r["constexprs"].get("D") == 16000]
    assert big and all(not r["spill_checked"] for r in big)  # compiled, spills reported


def test_hot_half_kernels_use_wgmma_on_hopper(gate):
    rows = gate[1]["sm_90a"]["rows"]
    for kernel in cr.WGMMA_KERNELS:
        half = [
            r for r in rows if r["kernel"] == kernel and r["dtype"] != "fp32" and r["model_size"]
        ]
        if "cbp" in kernel:
            half = [r for r in half if r["constexprs"].get("D") == cr.WGMMA_CBP_DIM]
        assert half and all(r["HGMMA"] > 0 for r in half), kernel


# --------------------------------------------------------------------------------------
# The rules themselves, on made-up rows (so a rule that cannot fail is caught here)
# --------------------------------------------------------------------------------------


def _row(**overrides):
    row = dict(
        arch="sm_90a", kernel="_memconv_fwd_kernel", dtype="bf16", constexprs={}, error=None,
        spill_store=0, spill_load=0, shared=1024, HGMMA=2, spill_checked=True, model_size=True,
    )  # fmt: skip
    row.update(overrides)
    return row


def _violations(*rows, arch="sm_90a"):
    report = dict(
        arch=arch, shared_limit=cr.SHARED_LIMIT[arch], scenario_errors=[], rows=list(rows)
    )
    return cr.violations(report)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (_row(error="CompilationError: loop-carried"), "does not compile"),
        (_row(spill_store=4), "spills"),
        (_row(spill_load=4), "spills"),
        (_row(shared=cr.SHARED_LIMIT["sm_90a"] + 1), "shared memory"),
        (_row(HGMMA=0), "wgmma"),
        (_row(kernel="_cbp_product_kernel", constexprs={"D": 4096, "R1": 16}, HGMMA=0), "wgmma"),
        (_row(kernel="_read_fwd_kernel", constexprs={"D": 300, "K": 151}, HGMMA=0), "wgmma"),
    ],
)
def test_rules_flag_bad_rows(row, match):
    bad = _violations(row)
    assert len(bad) == 1 and match in bad[0]


@pytest.mark.parametrize(
    "row",
    [
        _row(),
        _row(spill_store=900, spill_checked=False),  # CBP beyond the model's sizes
        _row(dtype="fp32", HGMMA=0),  # fp32 multiplies on CUDA cores
        _row(kernel="_conv_attn_bwd_kernel", HGMMA=0),  # not a wgmma kernel
        _row(kernel="_cbp_product_kernel", constexprs={"D": 300, "R1": 10}, HGMMA=0),
        _row(arch="sm_80", HGMMA=0),
        _row(model_size=False, HGMMA=None),  # tiny sizes: built, not disassembled
    ],
)
def test_rules_pass_good_rows(row):
    assert not _violations(row, arch=row["arch"])


def test_scenario_errors_are_violations():
    errors = [{"scenario": "model sub", "error": "RuntimeError: x"}]
    report = dict(arch="sm_80", shared_limit=1, rows=[], scenario_errors=errors)
    assert cr.violations(report) == ["scenario model sub: RuntimeError: x"]
