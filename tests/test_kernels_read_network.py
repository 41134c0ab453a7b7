"""kernels/read_network.py: the read network composed of the fused kernels."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from kernel_helpers import (
    ERROR_RATIO,
    check_against_float64,
    cuda,
    poisoned,  # noqa: F401  (fixture)
)

import kernels.cbp as kcbp
import rwmn.ops
from kernels import read_network as fused_read
from kernels._common import record_launches
from rwmn import reference

# Every kernel output buffer starts NaN-filled (see kernel_helpers.poisoned).
pytestmark = [
    pytest.mark.usefixtures("poisoned"),
    pytest.mark.filterwarnings("ignore:kernels. read_network computes its CBP"),
]

SHARP = 1.3


def _hashes(d_in: int, d_out: int, seed: int = 0):
    """CBP hashes drawn as docs/model.md section 2 describes (fixed seeds)."""
    out = []
    for k in (seed + 1, seed + 3):
        rng = np.random.RandomState(k)
        out.append(torch.from_numpy(rng.randint(d_out, size=d_in)))
        rng = np.random.RandomState(k + 1)
        out.append(torch.from_numpy(2 * rng.randint(2, size=d_in) - 1).float())
    return out


def _layers(channels, spec, d):
    """Weights and biases of read layers 'k-s-c' over ``channels`` input channels."""
    weights, biases, strides = [], [], []
    for k, s, c in spec:
        weights.append(torch.randn(c, channels, k, d) / (channels * k * d) ** 0.5)
        biases.append(0.1 * torch.randn(c))
        strides.append(s)
        channels = c
    return weights, biases, strides


# (C, m, d, batch, read layers)
CASES = [
    (3, 10, 13, 2, [(3, 1, 3)]),
    (2, 9, 12, 3, [(3, 2, 2), (2, 1, 3)]),
    (1, 7, 7, 2, [(4, 3, 2)]),
]


def check_read_network_against_float64(case):
    """Fused vs reference vs float64 read network: the output, p and every gradient."""
    c, m, d, batch, spec = case
    hashes = _hashes(d, d)
    weights, biases, strides = _layers(c, spec, d)
    n_layers = len(spec)

    def call(fn):
        def run(memory, u, *params):
            ws, bs = list(params[:n_layers]), list(params[n_layers:])
            return fn(memory, u, hashes, ws, bs, strides, SHARP)

        return run

    inputs = [torch.randn(c, m, d), torch.randn(batch, d), *weights, *biases]
    # Three fused stages (CBP, conv, conv-attention) each stay within ERROR_RATIO of their
    # reference stage (their own tests); composed, their errors add, so the end-to-end
    # gradients get twice the headroom (a 4x bound failed 1 run in about 15 here).
    check_against_float64(
        call(fused_read.read_network), call(reference.read_network), inputs, ratio=2 * ERROR_RATIO
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64(case):
    check_read_network_against_float64(case)


# (C, m, d, batch, read layers): one, two and three read layers on the FFT-path CBP.
FFT_CASES = [
    (2, 9, 12, 2, [(3, 1, 3)]),
    (2, 9, 15, 3, [(3, 2, 2), (2, 1, 3)]),
    (1, 8, 16, 2, [(3, 1, 2), (2, 2, 2), (3, 1, 1)]),
]


@pytest.fixture
def fft_cbp(monkeypatch):
    """The read network's CBP on the FFT path at these tiny d (below FACTORISED_MIN_DIM)."""
    monkeypatch.setattr(fused_read, "cbp", functools.partial(kcbp.cbp, factorised_min_dim=1))


@pytest.mark.parametrize("case", FFT_CASES, ids=str)
def test_fft_path_matches_float64(case, fft_cbp):
    check_read_network_against_float64(case)


@pytest.mark.parametrize("case", FFT_CASES, ids=str)
def test_launches_and_no_torch_fft(case, fft_cbp, monkeypatch):
    """What the fused read path launches today: the CBP's spectra kernel (once for the
    memory, once for the questions) and product kernel, one memory_conv per read layer but
    the last, the conv-attention kernel (3 + L launches forward); the backward adds the CBP
    backward. torch.fft is never called."""
    for name in ("fft", "ifft", "rfft", "irfft", "fftn", "ifftn", "rfftn", "irfftn"):

        def banned(*args, _name=name, **kwargs):
            raise AssertionError(f"torch.fft.{_name} called by the fused read path")

        monkeypatch.setattr(torch.fft, name, banned)
    c, m, d, batch, spec = case
    hashes = _hashes(d, d)
    weights, biases, strides = _layers(c, spec, d)
    memory = torch.randn(c, m, d, requires_grad=True)
    u = torch.randn(batch, d)
    with record_launches() as launches:
        o, p = fused_read.read_network(memory, u, hashes, weights, biases, strides, SHARP)
    expected = ["_cbp_spectra_kernel", "_cbp_spectra_kernel", "_cbp_product_kernel"]
    expected += ["_memconv_fwd_kernel"] * (len(spec) - 1) + ["_conv_attn_fwd_kernel"]
    assert [launch.name for launch in launches] == expected
    # The same path run for real (interpreter): outputs and a backward, still no torch.fft.
    o, p = fused_read.read_network(memory, u, hashes, weights, biases, strides, SHARP)
    (o.sum() + p.sum()).backward()
    assert torch.isfinite(memory.grad).all()


def test_dispatch_runs_the_kernels(monkeypatch):
    calls = []
    fn = fused_read.read_network
    monkeypatch.setattr(fused_read, "read_network", lambda *a: calls.append(1) or fn(*a))
    c, m, d, batch, spec = CASES[0]
    hashes = _hashes(d, d)
    weights, biases, strides = _layers(c, spec, d)
    memory, u = torch.randn(c, m, d), torch.randn(batch, d)
    with rwmn.ops.use_backend("triton"):
        got = rwmn.ops.read_network(memory, u, hashes, weights, biases, strides, SHARP)
    assert calls
    expected = reference.read_network(memory, u, hashes, weights, biases, strides, SHARP)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_no_read_layer_raises():
    with pytest.raises(ValueError, match="at least one read layer"):
        fused_read.read_network(torch.randn(1, 4, 7), torch.randn(1, 7), _hashes(7, 7), [], [],
                                [], SHARP)  # fmt: skip


# ----------------------------------------------------------------------------- GPU


class _ReadPath(torch.nn.Module):
    """Write conv 40-30-3 over a story, read 3-1-3, readout scored against answers: the
    read path of RWMN with the model's sizes, dispatched through rwmn.ops."""

    def __init__(self, d: int = 300):
        super().__init__()
        self.embed = torch.nn.Linear(d, d)
        self.write_w = torch.nn.Parameter(torch.randn(3, 1, 40, d) / (40 * d) ** 0.5)
        self.write_b = torch.nn.Parameter(torch.zeros(3))
        self.read_w = torch.nn.Parameter(torch.randn(3, 3, 3, d) / (9 * d) ** 0.5)
        self.read_b = torch.nn.Parameter(torch.zeros(3))
        for i, h in enumerate(_hashes(d, d)):
            self.register_buffer(f"h{i}", h)

    def forward(self, story, question, answers):
        e = reference.unit_norm(self.embed(story))[None]  # [1, n, d]
        memory = rwmn.ops.memory_conv(e, self.write_w, self.write_b, 30)  # [3, m, d]
        u = reference.unit_norm(self.embed(question))
        hashes = (self.h0, self.h1, self.h2, self.h3)
        o, _ = rwmn.ops.read_network(memory, u, hashes, [self.read_w], [self.read_b], [1], 1.0)
        u2 = reference.unit_norm(0.5 * reference.unit_norm(o) + 0.5 * u)
        g = reference.unit_norm(self.embed(answers))  # [B, A, d]
        return torch.einsum("bd,bad->ba", u2, g)


STEPS = 50


@pytest.mark.cuda
@cuda[1]
def test_convergence_matches_reference(monkeypatch):
    """Fused and reference read paths trained from one seed give matching losses."""
    # The fused fp32 path multiplies in full fp32; keep the reference off TF32 likewise.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(1500, 300, generator=gen), torch.randn(32, 300, generator=gen),
         torch.randn(32, 5, 300, generator=gen), torch.randint(5, (32,), generator=gen))
        for _ in range(4)
    ]  # fmt: skip
    losses = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = _ReadPath().cuda()
        opt = torch.optim.Adagrad(model.parameters(), lr=0.003, initial_accumulator_value=0.1)
        losses[backend] = []
        with rwmn.ops.use_backend(backend):
            for step in range(STEPS):
                story, q, a, y = (t.cuda() for t in data[step % len(data)])
                loss = torch.nn.functional.cross_entropy(model(story, q, a), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[backend].append(loss.item())
    np.testing.assert_allclose(losses["triton"], losses["reference"], rtol=1e-3, atol=1e-4)
    assert losses["triton"][-1] < losses["triton"][0]


@pytest.mark.cuda
@cuda[1]
def test_compile_fullgraph_read_path():
    model = _ReadPath().cuda()
    story, q, a = torch.randn(1500, 300), torch.randn(32, 300), torch.randn(32, 5, 300)
    story, q, a = story.cuda(), q.cuda(), a.cuda()
    with rwmn.ops.use_backend("triton"):
        compiled = torch.compile(model, fullgraph=True)
        logits = compiled(story, q, a)
        logits.sum().backward()
        expected = model(story, q, a)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
