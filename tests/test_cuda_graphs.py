"""train.py --cuda_graphs: the buckets, the exact masks of a padded batch, what a capture
needs of the step (checked on the CPU), and the captured step itself (CUDA)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import census
from rwmn import RWMN, RWMNConfig, ops
from rwmn.data.movieqa import QABatch
from rwmn.graphs import StaticBatch, padded_step
from rwmn.padding import bucket_shape, conv_layouts, same_pad_top, story_bucket
from rwmn.training import main

SMALL = dict(dim_text=12, dim_memory=12, dim_rgb=16, dim_sub=12, dim_mcb=20)
#: (data_source, write, read, legacy, num_hop): strided and stride-1 layers, stacks of
#: two, the baseline (no write, no read), legacy rows, video_sub, two hops.
MODES = [
    ("sub", "40-30-3", "3-1-3", False, 1),
    ("sub", "5-3-2/3-2-2", "3-2-2/3-1-2", False, 2),
    ("sub", "3-1-2", "5-2-1", False, 1),
    ("sub", "5-3-2", "", False, 1),
    ("sub", "", "", False, 1),
    ("sub", "5-3-2", "3-2-2", True, 1),
    ("sub", "4-3-2", "", True, 2),
    ("video_sub", "5-3-2", "3-1-2", False, 1),
]
BATCH_SIZE = 8


def _config(source, write, read, legacy, hops) -> RWMNConfig:
    return RWMNConfig(data_source=source, write=write, read=read, legacy=legacy,
                      num_hop=hops, **SMALL)  # fmt: skip


def _batch(cfg: RWMNConfig, n: int, questions: int, dtype=torch.float32, seed=1) -> QABatch:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    story = (randn(n, cfg.dim_rgb), randn(n, cfg.dim_sub)) if cfg.video else randn(n, cfg.dim_text)
    return QABatch(
        "m", story, randn(questions, cfg.dim_text),
        randn(questions, cfg.num_answer, cfg.dim_text),
        torch.randint(cfg.num_answer, (questions,), generator=gen), ["q"] * questions,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------


def test_movieqa_lengths_capture_13_shapes():
    """Stories of 200 to 3000 elements, 1 to --batch_size questions (what a batch draws:
    min(batch_size, questions of the movie)): 13 padded shapes, at most 1.31 n long."""
    shapes = {bucket_shape(n, q, 32) for n in range(200, 3001) for q in range(1, 33)}
    assert len(shapes) == 13 <= 16
    assert {rows for _, rows in shapes} == {32}
    for n in range(1, 5000):
        assert n <= story_bucket(n) and story_bucket(n) % 16 == 0
        assert n < 200 or story_bucket(n) <= 1.31 * n


@pytest.mark.parametrize(("kernel", "stride"), [(40, 30), (3, 2), (2, 3), (5, 1), (1, 4)])
def test_conv_layouts_keep_the_windows(kernel, stride):
    """A strided layer's op length is a multiple of the stride and its SAME padding plus
    the offset is the unpadded one, for every valid length of a bucket."""
    from rwmn.config import LayerSpec

    for length in (64, 208):
        for valid in range(1, length + 1):
            (lay,) = conv_layouts([LayerSpec(kernel, stride, 1)], valid, length)
            assert lay.out_valid == -(-valid // stride) <= lay.out_length
            if stride == 1:
                assert lay.offset is None and lay.op_length == length
                continue
            assert lay.op_length % stride == 0 and lay.offset + valid <= lay.op_length
            op_top = same_pad_top(lay.op_length, kernel, stride)
            # window i starts at op row i*s - op_top = valid row i*s - op_top - offset
            assert op_top + lay.offset == same_pad_top(valid, kernel, stride)


# --------------------------------------------------------------------------------------
# Exact masks: a padded batch computes the unpadded one
# --------------------------------------------------------------------------------------


def _unpadded_and_padded(cfg, n, questions, dtype):
    torch.manual_seed(0)
    model = RWMN(cfg).to(dtype)
    batch = _batch(cfg, n, questions, dtype)
    static = StaticBatch.of(cfg, batch, BATCH_SIZE)
    stories = batch.story if cfg.video else (batch.story,)
    for t in (*stories, batch.query, batch.answers):
        t.requires_grad_(True)
    logits = model(batch.story, batch.query, batch.answers)
    loss = model.loss(logits, batch.target)
    loss.backward()
    want = {
        "logits": logits.detach(), "loss": loss.detach(),
        "correct": model.correct(logits, batch.target),
        **{name: p.grad.clone() for name, p in model.named_parameters()},
    }  # fmt: skip
    model.zero_grad(set_to_none=True)
    padded = static.story if cfg.video else (static.story,)
    for t in (*padded, static.query, static.answers):
        t.requires_grad_(True)
    keep = static.padding.questions
    logits = model(static.story, static.query, static.answers, padding=static.padding)
    loss = model.loss(logits, static.target, keep)
    loss.backward()
    got = {
        "logits": logits.detach()[:questions], "loss": loss.detach(),
        "correct": model.correct(logits, static.target, keep),
        **{name: p.grad.clone() for name, p in model.named_parameters()},
    }  # fmt: skip
    # Padded elements contribute nothing: their inputs' gradients are exactly zero.
    for full, t in zip((*padded, static.query, static.answers),
                       (*stories, batch.query, batch.answers), strict=True):  # fmt: skip
        rows = t.shape[0]
        assert full.grad[rows:].eq(0).all()
        torch.testing.assert_close(full.grad[:rows], t.grad, rtol=1e-5, atol=1e-6)
    return want, got


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(map(str, m)))
@pytest.mark.parametrize(("n", "questions"), [(37, 5), (61, 8), (200, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padded_batch_equals_unpadded(mode, n, questions, dtype):
    """Logits, loss, accuracy and every parameter's gradient (reference ops)."""
    cfg = _config(*mode)
    with ops.use_backend("reference"):
        want, got = _unpadded_and_padded(cfg, n, questions, dtype)
    # fp32: sums over other lengths round differently; fp64 shows the masks are exact.
    rel = 5e-5 if dtype == torch.float32 else 1e-12
    assert torch.equal(want["correct"], got["correct"])
    for name, value in want.items():
        scale = value.abs().max().item() or 1.0
        err = (got[name] - value).abs().max().item()
        # RWMN.loss computes the cross-entropy in float32 whatever the model's dtype.
        assert err <= (max(rel, 1e-6) if name == "loss" else rel) * scale, (name, err, scale)


@pytest.mark.parametrize(
    "mode", [MODES[1], MODES[5], MODES[7]], ids=lambda m: "-".join(map(str, m))
)
@pytest.mark.usefixtures("gpu_semantics")
def test_padded_batch_equals_unpadded_fused(mode):
    """The same on the fused backend (Triton interpreter, a GPU's semantics): the padded
    read runs the fused CBP, memory convolution and unit_norm, and a masked attention."""
    cfg = _config(*mode)
    with ops.use_backend("triton"):
        want, got = _unpadded_and_padded(cfg, 20, 3, torch.float32)
    for name, value in want.items():
        scale = value.abs().max().item() or 1.0
        err = (got[name].float() - value.float()).abs().max().item()
        assert err <= 1e-4 * scale, (name, err, scale)


# --------------------------------------------------------------------------------------
# What a capture needs of the step, checked on the CPU
# --------------------------------------------------------------------------------------

#: Ops whose output shape depends on tensor values.
DYNAMIC_SHAPES = {"nonzero", "masked_select", "unique", "_unique", "_unique2",
                  "unique_consecutive", "unique_dim", "repeat_interleave"}  # fmt: skip


class StepAudit(TorchDispatchMode):
    """Every aten op of a step: host synchronisations (bench.census's classification),
    ops of data-dependent output shape, tensors made on another device than ``device``,
    and the (op, output shapes) sequence."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.syncs, self.dynamic, self.foreign, self.trace = [], [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = census._base(func)
        if census.classify(func) == "sync":
            self.syncs.append(name)
        if name in DYNAMIC_SHAPES:
            self.dynamic.append(name)
        out = func(*args, **(kwargs or {}))
        outs = census._tensors(out)
        self.foreign += [name for t in outs if t.device != self.device]
        self.trace.append((name, tuple(tuple(t.shape) for t in outs)))
        return out


def _static_step(cfg, n, questions, device="cpu"):
    torch.manual_seed(0)
    model = RWMN(cfg).to(device)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.01, fused=True)
    opt.param_groups[0]["lr"] = torch.tensor(0.01, device=device)  # as GraphSteps captures
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    static = StaticBatch.of(cfg, _batch(cfg, n, questions), BATCH_SIZE)
    return model, opt, static


@pytest.mark.parametrize("mode", [MODES[0], MODES[5], MODES[7]], ids=lambda m: m[0] + m[1])
def test_step_has_no_sync_and_static_shapes(mode):
    """The padded step (forward, loss, backward, fused Adagrad with a tensor learning rate)
    reads nothing back to the host and runs the same ops on the same shapes for two
    stories of one bucket (n 37 and 61) and two question counts: no shape depends on
    the data."""
    cfg = _config(*mode)
    traces = []
    for n, questions in ((37, 3), (61, 8)):
        model, opt, static = _static_step(cfg, n, questions)
        padded_step(model, opt, static, contextlib.nullcontext)  # the optimizer's first step
        with ops.use_backend("reference"), StepAudit("cpu") as audit:
            padded_step(model, opt, static, contextlib.nullcontext)
        assert audit.syncs == [] and audit.dynamic == [], (audit.syncs, audit.dynamic)
        traces.append(audit.trace)
    assert traces[0] == traces[1]


@pytest.mark.parametrize("mode", [MODES[0], MODES[5], MODES[7]], ids=lambda m: m[0] + m[1])
def test_step_makes_no_host_tensor(mode):
    """Forward, loss and backward of the padded batch on the meta device: every tensor
    made in them is on that device (none on the CPU), and nothing is read back (a meta
    tensor has no value: .item() would raise)."""
    cfg = _config(*mode)
    model, _, static = _static_step(cfg, 37, 3)
    model = model.to("meta")
    static = StaticBatch(
        tuple(s.to("meta") for s in static.story) if cfg.video else static.story.to("meta"),
        static.query.to("meta"), static.answers.to("meta"), static.target.to("meta"),
        static.padding.to("meta"),
    )  # fmt: skip
    keep = static.padding.questions
    with ops.use_backend("reference"), StepAudit("meta") as audit:
        logits = model(static.story, static.query, static.answers, padding=static.padding)
        model.loss(logits, static.target, keep).backward()
        model.correct(logits, static.target, keep)
    assert audit.foreign == [] and audit.syncs == [], (audit.foreign, audit.syncs)


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--compile"], "does not combine with --compile"),
        (["--amp", "fp16"], "--amp fp16"),
        (["--movies_per_step", "2"], "--movies_per_step must be 1"),
        pytest.param([], "needs a CUDA device", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="the machine has CUDA")),
    ],
)  # fmt: skip
def test_cuda_graphs_errors(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    argv = ["--cuda_graphs", "--out_dir", str(out), "--max_steps", "1", "--data_dir",
            str(tmp_path / "none"), *flags]  # fmt: skip
    if not flags:  # the device check comes after the data directory's: give one
        from rwmn.data.synthetic import SyntheticConfig, generate

        generate(tmp_path / "data", SyntheticConfig(train_movies=1, val_movies=1,
                 test_movies=1, questions_per_movie=2, dim_text=12, scene_len=2))  # fmt: skip
        argv[argv.index("--data_dir") + 1] = str(tmp_path / "data")
        argv += ["--dim_text", "12", "--dim_memory", "12"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


# --------------------------------------------------------------------------------------
# The captured step (CUDA)
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", [MODES[0], MODES[7]], ids=lambda m: m[0])
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_graph_steps_follow_eager_steps(backend, mode, amp):
    _graph_vs_eager(backend, mode, amp)


def _graph_vs_eager(backend, mode, amp):
    """Steps across three buckets and back, replayed from graphs, against the eager
    unpadded steps (the trainer's) with the same batches: loss, accuracy and weights."""
    from rwmn.graphs import GraphSteps
    from rwmn.loop import make_adagrad

    cfg = _config(*mode)
    device = torch.device("cuda")
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = RWMN(cfg).to(device)
        opt, _ = make_adagrad(model.parameters(), device, lr=0.01, initial_accumulator_value=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s // 2))
        steps = GraphSteps(model, opt, BATCH_SIZE, amp, device) if graphs else None
        losses = []
        for i, n in enumerate((50, 61, 150, 300, 55, 140)):
            batch = _batch(cfg, n, 1 + i % BATCH_SIZE, seed=i).to(device)
            with ops.use_backend(backend):
                if graphs:
                    loss, correct = steps.step(batch)
                else:
                    opt.zero_grad(set_to_none=True)
                    amp_ctx = (torch.autocast("cuda", dtype=amp) if amp
                               else contextlib.nullcontext())  # fmt: skip
                    with amp_ctx:
                        logits = model(batch.story, batch.query, batch.answers)
                    loss = model.loss(logits, batch.target)
                    loss.backward()
                    opt.step()
                    correct = model.correct(logits, batch.target)
            sched.step()
            losses.append((loss.item(), correct.item()))
        if graphs:
            assert steps.shapes == [(64, BATCH_SIZE), (176, BATCH_SIZE), (336, BATCH_SIZE)]
        runs.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (eager, w_eager), (graph, w_graph) = runs
    tol = 1e-4 if amp is None else 3e-2
    for (le, ce), (lg, cg) in zip(eager, graph, strict=True):
        assert abs(le - lg) <= tol * max(1.0, abs(le)) and ce == cg
    for key, value in w_eager.items():
        torch.testing.assert_close(w_graph[key], value, rtol=tol, atol=tol)


@pytest.mark.cuda
def test_train_py_cuda_graphs_resume_is_exact(tmp_path):
    """train.py --cuda_graphs: a run stopped at step 7 and resumed equals the run of 12
    steps, bit for bit."""
    from rwmn.data.synthetic import SyntheticConfig, generate

    data = tmp_path / "data"
    generate(data, SyntheticConfig(train_movies=4, val_movies=2, test_movies=1,
                                   questions_per_movie=6, dim_text=12, scene_len=4,
                                   min_scenes=2, max_scenes=9))  # fmt: skip
    flags = ["--data_dir", str(data), "--dim_text", "12", "--dim_memory", "12", "--write",
             "3-2-2", "--read", "3-1-2", "--batch_size", "4", "--validation_step", "3",
             "--full_validation_step", "5", "--device", "cuda", "--cuda_graphs"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*flags, "--out_dir", str(whole), "--max_steps", "12"]) == 0
    assert main([*flags, "--out_dir", str(parts), "--max_steps", "7"]) == 0
    assert main([*flags, "--out_dir", str(parts), "--max_steps", "12", "--resume"]) == 0
    a, b = (torch.load(os.path.join(p, "checkpoints", "last.pt"), weights_only=True)
            for p in (whole, parts))  # fmt: skip
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
