"""What the benchmarks measure: the ops, their sizes, inputs, FLOP and byte counts.

The pytest-benchmark suites (bench/test_bench_ops.py), the standalone runner (bench/run.py)
and the roofline columns of the report all read this one module, so a size or a formula is
written once.

Every op is an ``rwmn.ops`` function with the signature of ``rwmn.reference``. A
:class:`Case` is one op at one size; :func:`make_inputs` builds its keyword arguments.

Counting conventions (they are models, stated so the roofline can be read):

* FLOPs (algorithmic, the roofline's): a multiply-add counts 2; a real FFT of length N costs
  2.5 N log2 N; a complex
  product 6; exp/max/sum of a softmax 5 per logit; the convolutions are counted dense, SAME
  padding taps included (as cuDNN and fvcore do). Backward is counted as twice the forward
  (one product per input gradient, the usual convention); forward+backward as three times.
* Executed FLOPs (:func:`executed_flops`, the ``executed_flops`` column): what the fused
  kernels' products execute, tile padding included: the op's launches recorded on the CPU
  and priced by ``kernels.work``, the one cost model of the kernels (bench.census uses it
  for the whole training step).
* Bytes: the compulsory traffic of a perfectly fused kernel. Forward reads every input once
  and writes every output once. Backward reads the output gradients and every input again
  (nothing saved beyond the inputs) and writes a gradient per differentiable input.
  Intermediates (sketches, spectra, Mq, Mr) are never counted: a kernel that spills them
  pays for it in the measured time, which is the point of the comparison.

May import: torch, rwmn.ops and kernels (their launch recorder and cost model); nothing else
of bench, which all reads this.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

OPS = ("cbp", "memory_conv", "attention_read", "conv_attention_read", "read_network")
BACKENDS = ("reference", "fused", "compiled")
PASSES = ("forward", "backward", "forward+backward")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: The size groups: the model's own sizes, a sweep around them, tiny shapes for CPU CI.
GROUPS = ("model", "sweep", "smoke")

#: FLOPs of one multiply-add.
FMA_FLOPS = 2
#: FLOPs of a real FFT of length N, per N log2 N (the usual split-radix estimate).
RFFT_FLOPS_PER_NLOGN = 2.5
#: FLOPs of one complex multiplication.
COMPLEX_MUL_FLOPS = 6
#: FLOPs per logit of a softmax (max, subtract, exp, sum, divide).
SOFTMAX_FLOPS = 5
#: FLOPs per element of unit_norm (square, add, scale).
UNIT_NORM_FLOPS = 3
#: Backward FLOPs as a multiple of forward FLOPs.
BACKWARD_FLOP_FACTOR = 2
#: Bytes of an int64 hash index and of a float32 sign.
HASH_BYTES = 8
SIGN_BYTES = 4
#: Attention temperature of the model (--sharp).
SHARP = 1.0


@dataclass(frozen=True)
class Case:
    """One op at one size. ``params`` holds the shapes; ``sweep`` names the swept one."""

    op: str
    family: str
    group: str
    params: dict = field(hash=False)
    sweep: str | None = None

    @property
    def size(self) -> str:
        """The size label: the family ("story", "read", ...), with the swept value in the
        sweep group ("read-B64")."""
        if self.group != "sweep":
            return self.family
        return f"{self.family}-{self.sweep}{self.sweep_value}"

    @property
    def id(self) -> str:
        return f"{self.op}/{self.size}"

    @property
    def sweep_value(self) -> int | None:
        return self.params[self.sweep] if self.sweep else None

    def shapes(self) -> str:
        """The input shapes, as written in the report."""
        return SPECS[self.op].describe(self.params)


def _prod(shape) -> int:
    return math.prod(shape)


def _rfft_flops(n: int) -> float:
    return RFFT_FLOPS_PER_NLOGN * n * math.log2(n)


# --------------------------------------------------------------------------------------
# Per-op shapes, FLOPs and bytes (forward). All take the case's params.
# --------------------------------------------------------------------------------------


def _conv_out_rows(n: int, stride: int) -> int:
    return -(-n // stride)


def _cbp_rows(p):
    xs, ys = p["x"], p["y"]
    out = torch.broadcast_shapes(tuple(xs[:-1]), tuple(ys[:-1]))
    return _prod(xs[:-1]), _prod(ys[:-1]), _prod(out)


def cbp_flops(p) -> float:
    rx, ry, ro = _cbp_rows(p)
    d = p["D"]
    sketch = FMA_FLOPS * (rx * p["x"][-1] + ry * p["y"][-1])
    ffts = _rfft_flops(d) * (rx + ry + ro)
    product = COMPLEX_MUL_FLOPS * (d // 2 + 1) * ro
    return sketch + ffts + product


def _cbp_io(p, esize):
    rx, ry, ro = _cbp_rows(p)
    n1, n2 = p["x"][-1], p["y"][-1]
    inputs = esize * (rx * n1 + ry * n2)
    hashes = (HASH_BYTES + SIGN_BYTES) * (n1 + n2)
    return inputs, hashes, esize * ro * p["D"]


def _conv_flops(x, w, stride) -> float:
    c_out, c_in, k, d = w
    batch = _prod(x[:-3])
    m = _conv_out_rows(x[-2], stride)
    return FMA_FLOPS * batch * c_out * m * d * c_in * k * d


def memory_conv_flops(p) -> float:
    return _conv_flops(p["x"], p["w"], p["stride"])


def _memory_conv_io(p, esize):
    x, w = p["x"], p["w"]
    out = _prod(x[:-3]) * w[0] * _conv_out_rows(x[-2], p["stride"]) * x[-1]
    return esize * (_prod(x) + _prod(w) + w[0]), 0, esize * out


def _attention_flops(b, r, d, norm_rows) -> float:
    return (
        UNIT_NORM_FLOPS * norm_rows * d
        + 2 * FMA_FLOPS * b * r * d  # logits and the weighted sum
        + SOFTMAX_FLOPS * b * r
    )


def attention_read_flops(p) -> float:
    b, r, d = p["B"], p["R"], p["d"]
    return _attention_flops(b, r, d, b * r)


def _attention_read_io(p, esize):
    b, r, d = p["B"], p["R"], p["d"]
    return esize * (b * r * d + b * d), 0, esize * (b * d + b * r)


def conv_attention_read_flops(p) -> float:
    x, w = p["x"], p["w"]
    b, r, d = x[0], w[0] * _conv_out_rows(x[-2], p["stride"]), x[-1]
    return _conv_flops(x, w, p["stride"]) + _attention_flops(b, r, d, b * r)


def _conv_attention_read_io(p, esize):
    x, w = p["x"], p["w"]
    b, r, d = x[0], w[0] * _conv_out_rows(x[-2], p["stride"]), x[-1]
    inputs = esize * (_prod(x) + _prod(w) + w[0] + b * d)
    return inputs, 0, esize * (b * d + b * r)


def _read_layers(p):
    """(x shape, w shape, stride) of each read layer of read_network."""
    b, c, m, d = p["B"], p["C"], p["m"], p["d"]
    layers = []
    for k, s, c_out in p["read"]:
        layers.append(((b, c, m, d), (c_out, c, k, d), s))
        c, m = c_out, _conv_out_rows(m, s)
    return layers, c * m


def read_network_flops(p) -> float:
    b, c, m, d = p["B"], p["C"], p["m"], p["d"]
    cbp = cbp_flops({"x": (1, c, m, d), "y": (b, 1, 1, d), "D": d})
    layers, r = _read_layers(p)
    convs = sum(_conv_flops(x, w, s) for x, w, s in layers)
    return cbp + convs + _attention_flops(b, r, d, b * r)


def _read_network_io(p, esize):
    b, c, m, d = p["B"], p["C"], p["m"], p["d"]
    layers, r = _read_layers(p)
    weights = sum(_prod(w) + w[0] for _, w, _ in layers)
    inputs = esize * (c * m * d + b * d + weights)
    hashes = 2 * (HASH_BYTES + SIGN_BYTES) * d
    return inputs, hashes, esize * (b * d + b * r)


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def _hashes(n: int, out_dim: int, gen: torch.Generator, device) -> tuple:
    h = torch.randint(out_dim, (n,), generator=gen).to(device)
    s = (2 * torch.randint(2, (n,), generator=gen) - 1).float().to(device)
    return h, s


def _randn(shape, gen, device, dtype, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(tuple(shape), generator=gen)).to(device=device, dtype=dtype)


def _conv_weight(w, gen, device, dtype):
    c_out, c_in, k, d = w
    # He-like scale keeps the ReLU activations O(1) in every dtype.
    scale = (2.0 / (c_in * k * d)) ** 0.5
    return _randn(w, gen, device, dtype, scale), _randn((c_out,), gen, device, dtype, 0.1)


def _cbp_inputs(p, gen, device, dtype):
    h1, s1 = _hashes(p["x"][-1], p["D"], gen, device)
    h2, s2 = _hashes(p["y"][-1], p["D"], gen, device)
    x, y = _randn(p["x"], gen, device, dtype), _randn(p["y"], gen, device, dtype)
    kwargs = dict(x=x, y=y, h1=h1, s1=s1, h2=h2, s2=s2, out_dim=p["D"], sum_pool=False)
    return kwargs, [x, y]


def _memory_conv_inputs(p, gen, device, dtype):
    x = _randn(p["x"], gen, device, dtype)
    w, b = _conv_weight(p["w"], gen, device, dtype)
    return dict(x=x, weight=w, bias=b, stride=p["stride"], relu=True), [x, w, b]


def _attention_read_inputs(p, gen, device, dtype):
    rows = _randn((p["B"], p["R"], p["d"]), gen, device, dtype)
    u = _randn((p["B"], p["d"]), gen, device, dtype)
    return dict(rows=rows, u=u, sharp=SHARP, normalize=True), [rows, u]


def _conv_attention_read_inputs(p, gen, device, dtype):
    x = _randn(p["x"], gen, device, dtype)
    w, b = _conv_weight(p["w"], gen, device, dtype)
    u = _randn((p["x"][0], p["x"][-1]), gen, device, dtype)
    kwargs = dict(x=x, weight=w, bias=b, stride=p["stride"], u=u, sharp=SHARP)
    return kwargs, [x, w, b, u]


def _read_network_inputs(p, gen, device, dtype):
    b, c, m, d = p["B"], p["C"], p["m"], p["d"]
    memory = _randn((c, m, d), gen, device, dtype)
    u = _randn((b, d), gen, device, dtype)
    hashes = (*_hashes(d, d, gen, device), *_hashes(d, d, gen, device))
    layers, _ = _read_layers(p)
    weights, biases = zip(*(_conv_weight(w, gen, device, dtype) for _, w, _ in layers), strict=True)
    strides = [s for _, _, s in layers]
    kwargs = dict(
        memory=memory,
        u=u,
        hashes=hashes,
        weights=list(weights),
        biases=list(biases),
        strides=strides,
        sharp=SHARP,
    )
    return kwargs, [memory, u, *weights, *biases]


@dataclass(frozen=True)
class OpSpec:
    """How to build, count and describe one op."""

    name: str
    inputs: Callable
    flops: Callable[[dict], float]
    io: Callable  # (params, element size) -> (input bytes, hash bytes, output bytes)
    describe: Callable[[dict], str]


def _fmt(shape) -> str:
    return "x".join(str(s) for s in shape)


SPECS = {
    "cbp": OpSpec(
        "cbp",
        _cbp_inputs,
        cbp_flops,
        _cbp_io,
        lambda p: f"x {_fmt(p['x'])}, y {_fmt(p['y'])}, D {p['D']}",
    ),
    "memory_conv": OpSpec(
        "memory_conv",
        _memory_conv_inputs,
        memory_conv_flops,
        _memory_conv_io,
        lambda p: f"x {_fmt(p['x'])}, w {_fmt(p['w'])}, stride {p['stride']}",
    ),
    "attention_read": OpSpec(
        "attention_read",
        _attention_read_inputs,
        attention_read_flops,
        _attention_read_io,
        lambda p: f"rows {p['B']}x{p['R']}x{p['d']}, u {p['B']}x{p['d']}",
    ),
    "conv_attention_read": OpSpec(
        "conv_attention_read",
        _conv_attention_read_inputs,
        conv_attention_read_flops,
        _conv_attention_read_io,
        lambda p: (
            f"x {_fmt(p['x'])}, w {_fmt(p['w'])}, stride {p['stride']}, u {p['x'][0]}x{p['x'][-1]}"
        ),
    ),
    "read_network": OpSpec(
        "read_network",
        _read_network_inputs,
        read_network_flops,
        _read_network_io,
        lambda p: (
            f"memory {p['C']}x{p['m']}x{p['d']}, u {p['B']}x{p['d']}, read "
            + "/".join("-".join(map(str, layer)) for layer in p["read"])
        ),
    ),
}


def make_inputs(case: Case, device, dtype: torch.dtype, seed: int = 0):
    """The op's keyword arguments and the list of its differentiable tensors (leaves with
    ``requires_grad`` set). Hashes stay int64 and signs float32 in every dtype, as the
    model's buffers are."""
    gen = torch.Generator().manual_seed(seed)
    kwargs, diff = SPECS[case.op].inputs(case.params, gen, torch.device(device), dtype)
    for t in diff:
        t.requires_grad_(True)
    return kwargs, diff


def flops(case: Case, pass_: str) -> float:
    """FLOPs of one call of the given pass."""
    fwd = SPECS[case.op].flops(case.params)
    factor = {"forward": 1, "backward": BACKWARD_FLOP_FACTOR}
    return fwd * factor.get(pass_, 1 + BACKWARD_FLOP_FACTOR)


def executed_work(case: Case, dtype: torch.dtype) -> dict:
    """What the fused kernels of one call execute, per pass ("forward", "backward",
    "forward+backward"): the call's launches recorded on the CPU (nothing runs) and priced
    by kernels.work, the one cost model (tile padding included)."""
    return _executed_work(case, dtype)


@functools.cache
def _executed_work(case: Case, dtype: torch.dtype) -> dict:
    from kernels._common import record_launches
    from kernels.work import Work, launch_work, total
    from rwmn import ops

    kwargs, diff = make_inputs(case, "cpu", dtype)
    with ops.use_backend("triton"), record_launches() as forward:
        out = getattr(ops, case.op)(**kwargs)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    with record_launches() as backward:
        torch.autograd.backward(outs, [torch.zeros_like(o) for o in outs], inputs=diff)
    fwd = total(launch_work(x) for x in forward)
    bwd = total(launch_work(x) for x in backward)
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd, "none": Work()}


def executed_flops(case: Case, pass_: str, dtype: torch.dtype) -> float:
    """FLOPs the fused kernels execute in one call of the given pass (2 per multiply-add,
    tile padding included; kernels.work)."""
    return float(executed_work(case, dtype)[pass_].flops)


def bytes_moved(case: Case, pass_: str, dtype: torch.dtype) -> float:
    """Compulsory bytes of one call of the given pass (see the module docstring)."""
    esize = torch.empty((), dtype=dtype).element_size()
    inputs, hashes, outputs = SPECS[case.op].io(case.params, esize)
    forward = inputs + hashes + outputs
    # grad_out read, inputs re-read, one gradient written per differentiable input (the
    # differentiable inputs are exactly the float inputs counted in ``inputs``).
    backward = outputs + inputs + hashes + inputs
    return {"forward": forward, "backward": backward}.get(pass_, forward + backward)


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------

#: The model's sizes (SPEC.md): n = 1500 story elements, B = 32 questions, d = 300,
#: dim_rgb 2048, dim_mcb 4096, write "40-30-3" (m = 50 slots, C = 3), read "3-1-3".
N_STORY, BATCH, D_MEM, D_RGB, D_MCB = 1500, 32, 300, 2048, 4096
WRITE_K, WRITE_S, CHANNELS = 40, 30, 3
SLOTS = -(-N_STORY // WRITE_S)
READ = ((3, 1, 3),)

#: Swept values: story length n for the write-side ops, batch B for the read-side ones.
SWEEP_N = (256, 512, 1024, 2048, 4096, 8192)
SWEEP_B = (1, 4, 8, 16, 64, 128)


def _cbp_story(n):
    return {"n": n, "x": (n, D_RGB), "y": (n, D_MEM), "D": D_MCB}


def _cbp_read(b):
    return {"B": b, "x": (1, CHANNELS, SLOTS, D_MEM), "y": (b, 1, 1, D_MEM), "D": D_MEM}


def _conv_write(n):
    return {"n": n, "x": (1, 1, n, D_MEM), "w": (CHANNELS, 1, WRITE_K, D_MEM), "stride": WRITE_S}


def _conv_read(b):
    w = (CHANNELS, CHANNELS, READ[0][0], D_MEM)
    return {"B": b, "x": (b, CHANNELS, SLOTS, D_MEM), "w": w, "stride": READ[0][1]}


def _attention(b):
    return {"B": b, "R": CHANNELS * SLOTS, "d": D_MEM}


def _read_net(b):
    return {"B": b, "C": CHANNELS, "m": SLOTS, "d": D_MEM, "read": READ}


def _read_net2(b):
    return {**_read_net(b), "read": READ + READ}


def _model_cases() -> list[Case]:
    return [
        Case("cbp", "story", "model", _cbp_story(N_STORY), "n"),
        Case("cbp", "read", "model", _cbp_read(BATCH), "B"),
        Case("memory_conv", "write", "model", _conv_write(N_STORY), "n"),
        Case("memory_conv", "read", "model", _conv_read(BATCH), "B"),
        Case("attention_read", "read", "model", _attention(BATCH), "B"),
        Case("conv_attention_read", "read", "model", _conv_read(BATCH), "B"),
        Case("read_network", "read", "model", _read_net(BATCH), "B"),
        # Two read layers: the first runs from the spectra and is stored (not the default
        # 3-1-3, but the read path a deeper --read takes at the model's sizes).
        Case("read_network", "read-2-layers", "model", _read_net2(BATCH), "B"),
    ]


def _sweep_cases() -> list[Case]:
    cases = []
    for n in SWEEP_N:
        cases.append(Case("cbp", "story", "sweep", _cbp_story(n), "n"))
        cases.append(Case("memory_conv", "write", "sweep", _conv_write(n), "n"))
    for b in SWEEP_B:
        cases.append(Case("cbp", "read", "sweep", _cbp_read(b), "B"))
        cases.append(Case("memory_conv", "read", "sweep", _conv_read(b), "B"))
        cases.append(Case("attention_read", "read", "sweep", _attention(b), "B"))
        cases.append(Case("conv_attention_read", "read", "sweep", _conv_read(b), "B"))
        cases.append(Case("read_network", "read", "sweep", _read_net(b), "B"))
    return cases


def _smoke_cases() -> list[Case]:
    """Tiny shapes (odd sizes on purpose) for CPU CI and the Triton interpreter."""
    d, c, m, b = 12, 2, 5, 3
    return [
        Case("cbp", "smoke-story", "smoke", {"x": (9, 20), "y": (9, d), "D": 32}),
        Case("cbp", "smoke-read", "smoke", {"x": (1, c, m, d), "y": (b, 1, 1, d), "D": d}),
        Case(
            "memory_conv",
            "smoke-write",
            "smoke",
            {"x": (1, 1, 17, d), "w": (c, 1, 4, d), "stride": 3},
        ),
        Case(
            "memory_conv",
            "smoke-read",
            "smoke",
            {"x": (b, c, m, d), "w": (c, c, 3, d), "stride": 1},
        ),
        Case("attention_read", "smoke-read", "smoke", {"B": b, "R": c * m, "d": d}),
        Case(
            "conv_attention_read",
            "smoke-read",
            "smoke",
            {"x": (b, c, m, d), "w": (c, c, 3, d), "stride": 1},
        ),
        Case(
            "read_network",
            "smoke-read",
            "smoke",
            {"B": b, "C": c, "m": m, "d": d, "read": ((3, 1, c),)},
        ),
    ]


def cases(groups=("model", "sweep"), ops=OPS) -> list[Case]:
    """The cases of the given size groups and ops, in a stable order."""
    builders = {"model": _model_cases, "sweep": _sweep_cases, "smoke": _smoke_cases}
    unknown = set(groups) - set(builders)
    if unknown:
        raise ValueError(f"unknown size groups {sorted(unknown)}; expected some of {GROUPS}")
    bad_ops = set(ops) - set(OPS)
    if bad_ops:
        raise ValueError(f"unknown ops {sorted(bad_ops)}; expected some of {OPS}")
    return [c for g in groups for c in builders[g]() if c.op in ops]
