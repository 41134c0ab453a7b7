"""kernels/read_network.py: the read network composed of the fused kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_helpers import (
    ERROR_RATIO,
    LOW_PRECISION_RATIO,
    LOW_PRECISION_REL_ATOL,
    autocast,
    cbp_fft_threshold,
    check_against_float64,
    cuda,
)

import rwmn.ops
from kernels import read_network as fused_read
from kernels import spectral_weights
from kernels._common import record_launches
from kernels.cbp import ops as cbp_ops
from kernels.cbp import plan as cbp_plan
from kernels.work import executed_work
from rwmn import reference

pytestmark = pytest.mark.filterwarnings("ignore:kernels. read_network computes its CBP")

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


def check_read_network_against_float64(case, fused=fused_read.read_network, dtype=None):
    """Fused vs reference vs float64 read network: the output, p and every gradient; in
    ``dtype`` (bf16/fp16) under CPU autocast when given, else fp32."""
    c, m, d, batch, spec = case
    hashes = _hashes(d, d)
    weights, biases, strides = _layers(c, spec, d)
    n_layers = len(spec)

    def call(fn):
        def run(memory, u, *params):
            ws, bs = list(params[:n_layers]), list(params[n_layers:])
            return fn(memory, u, hashes, ws, bs, strides, SHARP)

        return run if dtype is None else autocast(run, dtype, "cpu")

    inputs = [torch.randn(c, m, d), torch.randn(batch, d), *weights, *biases]
    # Three fused stages (CBP, conv, conv-attention) each stay within their ratio of their
    # reference stage (their own tests); composed, their errors add, so the end-to-end
    # gradients get twice the headroom (a 4x bound failed 1 run in about 15 here; in half
    # precision the bias gradients, sums over every position, reached 3.9-5.7x a reference
    # error that happened to be small, at 1-3 half ulps of their scale).
    if dtype is None:
        tol = dict(ratio=2 * ERROR_RATIO)
    else:
        tol = dict(ratio=2 * LOW_PRECISION_RATIO, rel_atol=LOW_PRECISION_REL_ATOL[dtype])
    check_against_float64(call(fused), call(reference.read_network), inputs, **tol)


# (C, m, d, batch, read layers). One read layer takes the one-launch path; d = 45 and 97
# run several bin chunks, m = 20 two slot blocks of the fp32 tile.
CASES = [
    (3, 10, 13, 2, [(3, 1, 3)]),
    (2, 20, 45, 3, [(3, 1, 2)]),
    (1, 7, 7, 2, [(4, 3, 2)]),
    (2, 9, 12, 3, [(3, 2, 2), (2, 1, 3)]),
    (2, 5, 97, 2, [(2, 2, 3)]),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64(case):
    check_read_network_against_float64(case)


# (C, m, d, batch, read layers): one, two and three read layers with the CBP (the backward's
# recompute, and the several-layer path) on the FFT path.
FFT_CASES = [
    (2, 9, 12, 2, [(3, 1, 3)]),
    (2, 9, 15, 3, [(3, 2, 2), (2, 1, 3)]),
    (1, 8, 16, 2, [(3, 1, 2), (2, 2, 2), (3, 1, 1)]),
]


def read_on(path: str, monkeypatch):
    """fused_read.read_network with its CBP on ``path`` for the rest of the test: "fft"
    lowers the CBP's FFT threshold to 1 (the FFT kernels at these tiny d, in the forward
    and the backward's recompute), "dense" keeps the default (dense below 256)."""
    if path == "fft":
        cbp_fft_threshold(monkeypatch, 1)
    return fused_read.read_network


@pytest.mark.parametrize("case", FFT_CASES, ids=str)
def test_fft_path_matches_float64(case, monkeypatch):
    check_read_network_against_float64(case, read_on("fft", monkeypatch))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("case", "path"),
    [((1, 7, 7, 2, [(4, 3, 2)]), "dense"), ((2, 5, 12, 2, [(3, 1, 2), (2, 2, 1)]), "fft")],
    ids=["dense", "fft-two-layers"],
)
def test_low_precision_autocast_cpu(case, path, dtype, monkeypatch):
    """bf16/fp16 under autocast, every output and gradient, on both CBP paths (on the
    interpreter with the gpu_semantics fixture: bf16 tiles reach tl.dot as values, the
    CBP's fp32 scratch is truncated to tf32 as the tensor cores read it)."""
    torch.manual_seed(0)
    check_read_network_against_float64(case, read_on(path, monkeypatch), dtype)


def _hops(read, prepare, memory, u, hashes, weights, biases, strides, hops=2):
    """The model's hop loop (paper mode): u <- unit_norm(o / 2 + u / 2) after each read."""
    prepared = prepare(memory, hashes, weights, biases)
    outputs = []
    for _ in range(hops):
        o, p = read(memory, u, hashes, weights, biases, strides, SHARP, prepared)
        outputs += [o, p]
        u = reference.unit_norm(0.5 * reference.unit_norm(o) + 0.5 * u)
    return (*outputs, u)


HOP_CASES = [
    (2, 11, 12, 3, [(3, 1, 2)]),
    (2, 9, 15, 2, [(3, 2, 2)]),
    (2, 7, 13, 2, [(3, 1, 2), (2, 2, 2)]),
]


@pytest.mark.parametrize("path", ["dense", "fft"])
@pytest.mark.parametrize("case", HOP_CASES, ids=str)
def test_two_hops_match_float64(case, path, monkeypatch):
    """Two hops sharing one prepare (the memory spectra and spectral weights): every output
    and every gradient, the memory's summed over both hops."""
    c, m, d, batch, spec = case
    hashes = _hashes(d, d)
    weights, biases, strides = _layers(c, spec, d)

    def ref_read(memory, u, hashes, weights, biases, strides, sharp, _prepared):
        return reference.read_network(memory, u, hashes, weights, biases, strides, sharp)

    n_layers = len(spec)

    def run(read_fn, prepare_fn):
        def fn(memory, u, *params):
            ws, bs = list(params[:n_layers]), list(params[n_layers:])
            return _hops(read_fn, prepare_fn, memory, u, hashes, ws, bs, strides)

        return fn

    inputs = [torch.randn(c, m, d), torch.randn(batch, d), *weights, *biases]
    check_against_float64(
        run(read_on(path, monkeypatch), fused_read.prepare), run(ref_read, lambda *a: None), inputs,
        ratio=2 * ERROR_RATIO,
    )  # fmt: skip


def _ban_torch_fft(monkeypatch):
    for name in ("fft", "ifft", "rfft", "irfft", "fftn", "ifftn", "rfftn", "irfftn"):

        def banned(*args, _name=name, **kwargs):
            raise AssertionError(f"torch.fft.{_name} called by the fused read path")

        monkeypatch.setattr(torch.fft, name, banned)


@pytest.mark.parametrize("case", FFT_CASES, ids=str)
def test_launches_and_no_torch_fft(case, monkeypatch):
    """What the fused read path launches forward: the memory spectra and the first layer's
    spectral weights, then with one read layer ONE launch (_read_fwd_kernel); with several,
    the first layer from the spectra (_read_conv_fwd_kernel, stored), one memory_conv per
    further layer but the last, the conv-attention kernel; then the merge of the blocks'
    softmax partials. Mq is never materialised. The backward runs too. torch.fft is never
    called."""
    _ban_torch_fft(monkeypatch)
    fft_read_network = read_on("fft", monkeypatch)
    c, m, d, batch, spec = case
    hashes = _hashes(d, d)
    weights, biases, strides = _layers(c, spec, d)
    memory = torch.randn(c, m, d, requires_grad=True)
    u = torch.randn(batch, d)
    with record_launches() as launches:
        fft_read_network(memory, u, hashes, weights, biases, strides, SHARP)
    expected = ["_cbp_dense_spectra_kernel", "_spectral_weights_kernel"]
    if len(spec) == 1:
        expected += ["_read_fwd_kernel"]
    else:
        expected += ["_read_conv_fwd_kernel"]
        expected += ["_memconv_fwd_kernel"] * (len(spec) - 2) + ["_conv_attn_fwd_kernel"]
    assert [launch.name for launch in launches] == expected
    # The same path run for real (interpreter): outputs and a backward, still no torch.fft.
    o, p = fft_read_network(memory, u, hashes, weights, biases, strides, SHARP)
    (o.sum() + p.sum()).backward()
    assert torch.isfinite(memory.grad).all()


def test_hops_share_the_memory_spectra(monkeypatch):
    """Three hops: the memory spectra and the spectral weights once, then one read launch a
    hop (its blocks merged by the question's last block)."""
    _ban_torch_fft(monkeypatch)
    c, m, d, batch, spec = FFT_CASES[0]
    hashes = _hashes(d, d)
    weights, biases, strides = _layers(c, spec, d)
    memory, u = torch.randn(c, m, d), torch.randn(batch, d)
    with record_launches() as launches:
        _hops(fused_read.read_network, fused_read.prepare, memory, u, hashes, weights, biases,
              strides, hops=3)  # fmt: skip
    shared = ["_cbp_dense_spectra_kernel", "_spectral_weights_kernel"]
    assert [launch.name for launch in launches] == shared + ["_read_fwd_kernel"] * 3


def test_prepare_declines_an_unfused_dtype():
    c, m, d, batch, spec = FFT_CASES[1]
    hashes = _hashes(d, d)
    weights, biases, _ = _layers(c, spec, d)
    assert fused_read.prepare(torch.randn(c, m, d), hashes, weights, biases) is not None
    w64 = [w.double() for w in weights]
    assert fused_read.prepare(torch.randn(c, m, d), hashes, w64, biases) is None


def test_prepared_for_another_memory_raises():
    c, m, d, batch, spec = CASES[0]
    hashes = _hashes(d, d)
    weights, biases, strides = _layers(c, spec, d)
    prepared = fused_read.prepare(torch.randn(c, m, d), hashes, weights, biases)
    with pytest.raises(ValueError, match="prepared for a memory of shape"):
        fused_read.read_network(torch.randn(c, m + 1, d), torch.randn(batch, d), hashes,
                                weights, biases, strides, SHARP, prepared)  # fmt: skip


def test_dynamo_fullgraph_two_hops():
    """Dynamo captures prepare and two one-launch reads in one graph; values and gradients
    match eager. (backend="eager": the interpreter cannot be lowered by Inductor; the
    Inductor path is test_compile_fullgraph_read_path, CUDA.)"""
    torch._dynamo.reset()
    c, m, d, batch, spec = FFT_CASES[0]
    hashes = _hashes(d, d)
    weights, biases, strides = _layers(c, spec, d)

    def net(memory, u, w, b):
        return _hops(fused_read.read_network, fused_read.prepare, memory, u, hashes, [w], [b],
                     strides)  # fmt: skip

    inputs = [torch.randn(c, m, d), torch.randn(batch, d), weights[0], biases[0]]
    compiled_leaves = [t.clone().requires_grad_() for t in inputs]
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    got = torch.compile(net, backend="eager", fullgraph=True)(*compiled_leaves)
    want = net(*eager_leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    sum(t.square().sum() for t in got).backward()
    sum(t.square().sum() for t in want).backward()
    for g, w in zip(compiled_leaves, eager_leaves, strict=True):
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("d", [7, 12, 45, 97, 300])
def test_inverse_dft_matrix_is_irfft(d):
    spectrum = torch.randn(5, d // 2 + 1, dtype=torch.complex128)
    finv = spectral_weights.inverse_dft_matrix(d, "cpu").double()
    got = torch.cat((spectrum.real, spectrum.imag), dim=-1) @ finv
    torch.testing.assert_close(got, torch.fft.irfft(spectrum, n=d), rtol=0, atol=1e-6)


def _spectral_weights_float64(weight):
    """Finv T in float64 by the dense product (module docstring of kernels.read_network)."""
    d = weight.shape[-1]
    finv = spectral_weights.inverse_dft_matrix(d, weight.device, torch.float64)
    pad_left = fused_read.same_padding(d, d, 1)[1]
    return finv.flip(-1) @ reference.reversed_toeplitz(weight.double(), pad_left)


@pytest.mark.parametrize("d", [7, 12, 45, 64])
def test_spectral_weights_match_the_dense_product_in_float64(d):
    """The prefix-sum kernel against the dense float64 product Finv T (odd and even
    widths: even ones have a Nyquist bin), to float64 rounding."""
    weight = torch.randn(2, 3, 2, d)
    got = spectral_weights.spectral_weights(weight, torch.float64)
    torch.testing.assert_close(got, _spectral_weights_float64(weight), rtol=0, atol=1e-13)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_spectral_weights_are_correctly_rounded_under_tf32_matmul(device):
    """G is the float64 value rounded once to fp32, whatever the global matmul precision
    ("high" lets an fp32 matmul run in TF32 on a GPU, 2^-11 relative)."""
    weight = torch.randn(2, 3, 3, 45, device=device)
    want = _spectral_weights_float64(weight)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        g = spectral_weights.spectral_weights(weight, torch.float32)
    finally:
        torch.set_float32_matmul_precision(before)
    torch.testing.assert_close(g.double(), want, rtol=2.0**-24, atol=1e-15)


@pytest.mark.parametrize("d", [7, 12, 45])
def test_spectral_weights_fold_the_inverse_dft_into_the_conv(d):
    """[Re P | Im P] @ G = memory_conv(irfft(P)) before bias and ReLU, in float64."""
    weight = torch.randn(2, 3, 3, d)
    g = spectral_weights.spectral_weights(weight, torch.float32).double()
    spectrum = torch.randn(3, 4, d // 2 + 1, dtype=torch.complex128)  # [c_in, rows, K]
    ri = torch.cat((spectrum.real, spectrum.imag), dim=-1)
    mq = torch.fft.irfft(spectrum, n=d)
    want = reference.memory_conv(mq, weight.double(), None, 1, relu=False)  # [2, 4, d]
    # Tap a of output row i reads input row i + a - 1 (k = 3, stride 1, SAME).
    rows = torch.arange(4)
    got = torch.zeros(2, 4, d, dtype=torch.float64)
    for a in range(3):
        src = rows + a - 1
        ok = (src >= 0) & (src < 4)
        contrib = torch.einsum("crk,ockj->orj", ri[:, src.clamp(0, 3)], g[:, :, a])
        got += contrib * ok[None, :, None]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows,n,d", [(1, 7, 7), (17, 40, 12), (5, 300, 300), (3, 33, 97)])
def test_dense_spectra_match_numpy(rows, n, d):
    """The memory spectra kernel vs numpy's float64 rfft of the sketches; 17 rows run two
    row blocks, n = 40 and 300 several input chunks, d = 97 and 300 several bin chunks."""
    x = torch.randn(rows, n)
    h1, s1, _, _ = _hashes(n, d)
    spec = cbp_ops.cbp_dense_spectra(x, h1, s1, cbp_plan.twiddle_table(d, "cpu"))
    sketch = np.zeros((rows, d))
    np.add.at(sketch.T, h1.numpy(), (x.double() * s1.double()).numpy().T)
    want = np.fft.rfft(sketch, axis=-1)
    k = d // 2 + 1
    np.testing.assert_allclose(spec[:, :k].numpy(), want.real, rtol=0, atol=2e-5 * np.sqrt(n))
    np.testing.assert_allclose(spec[:, k:].numpy(), want.imag, rtol=0, atol=2e-5 * np.sqrt(n))


def test_executed_work_at_the_model_size():
    """The one-launch read at B = 32, C = 3, m = 50, d = 300, 3-1-3, bf16, priced by
    kernels.work from its recorded launches: its GEMM is the Toeplitz conv-attention tile's
    over 2K = 302 spectral rows instead of 320 input columns, the row held in 256 + 64
    columns (96 programs x 9 taps x 19 steps of [64, 16] x [16, 320]), plus the memory
    spectra, the spectral weights (prefix sums: 6 multiply-adds per kernel row, bin and
    column) and the per-program question spectra."""
    gemm = 96 * 9 * 19 * 64 * 16 * (256 + 64)
    spectra = 2 * 160 * 160 * 320  # 150 rows, 151 bins, 300 inputs padded to the tiles
    weights_g = 27 * 151 * 300 * 6
    question = 96 * 2 * 19 * 16 * 320
    hashes = _hashes(300, 300)
    weights, biases, strides = _layers(3, [(3, 1, 3)], 300)
    memory, u = torch.randn(3, 50, 300), torch.randn(32, 300)

    def read():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused_read.read_network(memory, u, hashes, weights, biases, strides, SHARP)

    work, launches = executed_work(read)
    names = [x.name for x in launches]
    assert names == [
        "_cbp_dense_spectra_kernel", "_spectral_weights_kernel", "_read_fwd_kernel",
    ]  # fmt: skip
    assert work.macs == gemm + spectra + weights_g + question
    assert work.flops < 11.0e9


def test_read_ops_pass_opcheck():
    c, m, d, batch, spec = CASES[1]
    hashes = _hashes(d, d)
    weights, biases, strides = _layers(c, spec, d)
    memory, u = torch.randn(c, m, d, requires_grad=True), torch.randn(batch, d, requires_grad=True)
    prepared = fused_read.prepare(memory, hashes, weights, biases)
    h1, s1, h2, s2 = hashes
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(
        torch.ops.rwmn.cbp_dense_spectra.default,
        (memory.detach().view(-1, d), h1, s1, prepared.twiddles),
        test_utils=("test_schema", "test_faketensor"),
    )
    args = (prepared.memory, prepared.spectra, u, weights[0].requires_grad_(),
            prepared.spectral_weight, biases[0].requires_grad_(), strides[0], h1, s1, h2, s2,
            prepared.twiddles, SHARP)  # fmt: skip
    torch.library.opcheck(torch.ops.rwmn.read_conv_attention.default, args, test_utils=tests)


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


def _model_size_read():
    """fn(memory, u, weight, bias) of the model's read (C = 3, m = 50, d = 300, 3-1-3), two
    hops, for fused and reference, and its inputs."""
    c, m, d, batch = 3, 50, 300, 32
    hashes = [t.cuda() for t in _hashes(d, d)]
    weights, biases, strides = _layers(c, [(3, 1, 3)], d)

    def run(read, prepare):
        def fn(memory, u, w, b):
            return _hops(read, prepare, memory, u, hashes, [w], [b], strides)

        return fn

    def ref_read(memory, u, hashes, weights, biases, strides, sharp, _prepared):
        return reference.read_network(memory, u, hashes, weights, biases, strides, sharp)

    fused = run(fused_read.read_network, fused_read.prepare)
    ref = run(ref_read, lambda *a: None)
    return fused, ref, [torch.randn(c, m, d), torch.randn(batch, d), weights[0], biases[0]]


@pytest.mark.cuda
@cuda[1]
def test_model_size_fp32_cuda():
    fused, ref, inputs = _model_size_read()
    check_against_float64(fused, ref, inputs, device="cuda", ratio=2 * ERROR_RATIO)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.cuda
@cuda[1]
def test_model_size_low_precision_autocast(dtype):
    """bf16/fp16 autocast at the model's size, two hops: within LOW_PRECISION_RATIO of the
    reference's own error against float64 (the spectral GEMM rounds P = X Q and G once each
    to the autocast dtype, the reference rounds Mq and T)."""
    fused, ref, inputs = _model_size_read()
    check_against_float64(
        autocast(fused, dtype), autocast(ref, dtype), inputs, device="cuda",
        ratio=LOW_PRECISION_RATIO, rel_atol=LOW_PRECISION_REL_ATOL[dtype],
    )  # fmt: skip


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
