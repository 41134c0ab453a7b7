"""bench.census and kernels.work: the launch and work census of a training step, pinned.

A change that adds a launch to the fused step, or executes more work or moves more bytes,
fails here; lower the pins in the same commit that lowers the counts (and regenerate
bench/results/census-cpu.*: ``python -m bench census --out bench/results``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from bench import census
from kernels import work

KERNELS = Path(__file__).resolve().parent.parent / "kernels"

#: The fused step's launches at n 1500, B 32 (forward + loss + backward + fused Adagrad).
FUSED_LAUNCHES = {("video_sub", "bf16"): 37, ("sub", "bf16"): 30}
#: Multiply-adds the fused video_sub bf16 step executes (tile padding included).
FUSED_VIDEO_MACS = 23_124_220_520
#: Bytes its launches move to and from global memory (scratch included).
FUSED_VIDEO_BYTES = 2_362_390_676


@pytest.fixture(scope="module")
def video_bf16() -> census.Census:
    return census.count_step(census.StepConfig("video_sub", precision="bf16", backend="fused"))


def test_fused_video_sub_step_is_pinned(video_bf16):
    totals = video_bf16.totals
    assert totals["launches"] == FUSED_LAUNCHES[("video_sub", "bf16")]
    assert totals["macs"] == FUSED_VIDEO_MACS
    assert totals["bytes"] == FUSED_VIDEO_BYTES
    assert totals["syncs"] == 0, video_bf16.syncs


def test_fused_sub_step_is_pinned():
    c = census.count_step(census.StepConfig("sub", n=300, batch=8, precision="bf16"))
    # The launch count does not depend on the story length or the batch.
    assert c.totals["launches"] == FUSED_LAUNCHES[("sub", "bf16")]
    assert c.totals["syncs"] == 0, c.syncs


def test_nothing_rebuilt_from_buffers(video_bf16):
    """No hash check, inverse hash, twiddle or DFT table is rebuilt in a step: no sort,
    search, trigonometry or range test of the hashes runs."""
    names = {x.name for x in video_bf16.launches}
    assert not names & {"sort", "searchsorted", "cos", "sin", "min", "max", "arange"}


def test_stages_and_kinds(video_bf16):
    stages = video_bf16.by("stage")
    for stage in ("embedding", "write", "read/prepare", "read/hop0", "loss", "optimizer"):
        assert stage in stages
    assert "read/hop0/backward" in stages and "write/backward" in stages
    assert set(video_bf16.by("kind")) <= set(census.KINDS)
    triton = [x for x in video_bf16.launches if x.kind == "triton"]
    assert {x.stage for x in triton if x.name == "_read_fwd_kernel"} == {"read/hop0"}
    assert {x.stage for x in triton if x.name == "_memconv_dw_kernel"} == {
        "read/hop0/backward",
        "write/backward",
    }
    optimizer = [x.name for x in video_bf16.launches if x.stage == "optimizer"]
    assert "_fused_adagrad_" in optimizer and len(optimizer) <= 2


def test_host_syncs_are_counted():
    """A value read back inside the step is reported as a host synchronisation."""
    c = census.Census(census.StepConfig())
    mode = census._CensusMode(c, census._Stages(), [])
    with mode:
        x = torch.ones(3)
        float(x.sum())
    assert [op for _, op in c.syncs] == ["_local_scalar_dense"]
    assert [x.kind for x in c.launches] == ["fill", "reduction"]


def test_aliasing_ops_that_copy_are_counted():
    """``to`` a new dtype and ``reshape`` of a non-contiguous tensor copy; the same ops
    returning their input (or a view) launch nothing. (Inside a custom op's body the mode
    sees ``aten::to`` itself, as called here, not the ``_to_copy`` it decomposes into.)"""
    c = census.Census(census.StepConfig())
    mode = census._CensusMode(c, census._Stages(), [])
    x = torch.ones(4, 3)
    aten = torch.ops.aten
    mode.__torch_dispatch__(aten.to.dtype, (), (x, torch.float32))
    mode.__torch_dispatch__(aten.reshape.default, (), (x, [12]))
    mode.__torch_dispatch__(aten.to.dtype, (), (x, torch.bfloat16))
    mode.__torch_dispatch__(aten.reshape.default, (), (x.t(), [12]))
    assert [(x.kind, x.name) for x in c.launches] == [("copy", "to"), ("copy", "reshape")]


def _jit_kernels() -> set[str]:
    names = set()
    for path in KERNELS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                decorators = {ast.unparse(d) for d in node.decorator_list}
                if "triton.jit" in decorators:
                    names.add(node.name)
    return names


def test_every_kernel_has_a_cost_formula():
    assert set(work.formulas()) == _jit_kernels()


def test_fft_cost_is_the_planners():
    """kernels.work prices a transform as the radix planner does (kernels.cbp.plan)."""
    from kernels.cbp import plan

    for d in (300, 600, 4096, 16000):
        radices = plan.fft_plan(d)
        constexprs = plan.cbp_config("product", d, "tf32", 2, radices=radices).constexprs
        expected = plan.transform_macs(d, radices, constexprs["BLOCK_J"])
        assert work.fft_work(constexprs).macs == expected


def test_markdown_and_json(video_bf16, tmp_path):
    text = census.markdown([video_bf16], census._meta())
    assert "video_sub-bf16-fused" in text and "_read_fwd_kernel" in text
    row = video_bf16.to_json()
    assert row["totals"]["launches"] == len(row["launches"])
