"""Plain-PyTorch reference implementations of RWMN's hot operations.

These are the ground truth that the fused Triton kernels beside this module are tested and
benchmarked against, what the kernels' public entry points fall back to for inputs they do
not fuse, and what the model runs under the ``"reference"`` backend (``rwmn.ops``). This
module needs only torch: the layering runs rwmn -> kernels -> torch/triton, never back.
Every function here is differentiable with ordinary autograd and works for any floating
dtype; half-precision inputs are upcast where PyTorch requires it (FFT) and the result is
cast back to the inputs' dtype.

Shapes follow the model (docs/model.md): d is the memory width, C memory channels, m slots.

May import: torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: eps of unit_norm(x) = x / sqrt(eps + sum(x^2)), as in the released TensorFlow code.
UNIT_NORM_EPS = 1e-12


def unit_norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(eps + sum(x^2)) along the last axis, eps = UNIT_NORM_EPS.

    Half-precision inputs are normalised in fp32: eps = 1e-12 underflows to 0 in fp16, so
    an all-zero row (a dead ReLU row) would give 0 * inf = NaN, and the sum of squares of a
    300-wide row can overflow fp16. The result has the input's dtype.
    """
    acc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (acc * torch.rsqrt(UNIT_NORM_EPS + (acc * acc).sum(-1, keepdim=True))).to(x.dtype)


def embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    normalize_input: bool = True,
) -> torch.Tensor:
    """unit_norm(unit_norm(x) W^T + b): the embedding of story rows, questions and answers;
    unit_norm(x W^T + b) without ``normalize_input`` (the video story's CBP output)
    (docs/model.md section 1)."""
    return unit_norm(F.linear(unit_norm(x) if normalize_input else x, weight, bias))


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    keep: torch.Tensor | None = None,
    legacy: bool = False,
) -> torch.Tensor:
    """Mean softmax cross-entropy of logits [B, A] against target [B]; of softmax(logits)
    in the release's legacy form; with ``keep`` (a padded batch's question mask) the mean
    over the kept questions (docs/model.md section 6). Half-precision logits are scored in
    fp32; float64 stays float64 (the tests' ground truth)."""
    scores = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if legacy:
        scores = torch.softmax(scores, dim=-1)
    if keep is None:
        return F.cross_entropy(scores, target)
    per_question = F.cross_entropy(scores, target, reduction="none")
    return torch.where(keep, per_question, 0.0).sum() / keep.sum()


def hop_update(o: torch.Tensor, u: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The controller's update between hops, unit_norm(a unit_norm(o) + b u) (docs/model.md
    section 5: a = alpha, b = 1 - alpha; the release's legacy form: a = b = 1)."""
    return unit_norm(a * unit_norm(o) + b * u)


def answer_scores(o: torch.Tensor, u: torch.Tensor, g: torch.Tensor, a: float, b: float):
    """The answer scores [B, A], <g[b, i], u'[b]>, of the answers g [B, A, d] against the
    last hop's update u' = hop_update(o, u, a, b) [B, d]."""
    return torch.einsum("bad,bd->ba", g, hop_update(o, u, a, b))


# --------------------------------------------------------------------------------------
# Compact bilinear pooling
# --------------------------------------------------------------------------------------


def _fft_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # torch.fft in half precision only accepts power-of-two sizes, and CBP sizes such as
    # 300 or 16000 are not: compute in fp32 (fp64 when asked for it) and cast back.
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def count_sketch(x: torch.Tensor, h: torch.Tensor, s: torch.Tensor, out_dim: int) -> torch.Tensor:
    """psi(x)_j = sum_{i: h(i) = j} s(i) x_i over the last axis of x.

    x [..., n], h [n] integer in [0, out_dim), s [n] in {-1, +1}. Returns [..., out_dim].
    """
    out = x.new_zeros(*x.shape[:-1], out_dim)
    return out.index_add(-1, h, x * s.to(x.dtype))


def cbp(
    x: torch.Tensor,
    y: torch.Tensor,
    h1: torch.Tensor,
    s1: torch.Tensor,
    h2: torch.Tensor,
    s2: torch.Tensor,
    out_dim: int,
    sum_pool: bool = False,
    normalize: bool = False,
) -> torch.Tensor:
    """Compact bilinear pooling, CBP(x, y) = IFFT(FFT(psi_1(x)) * FFT(psi_2(y))).

    x [..., n1] and y [..., n2]; their leading axes broadcast against each other, so one
    question vector y [B, 1, 1, n2] pools every row of a memory x [C, m, n1] without being
    tiled: each operand is sketched and transformed once. The result is the circular
    convolution (mod out_dim) of the two sketches, shape [broadcast(...), out_dim].
    With ``sum_pool`` the result is summed over every leading axis but the first (the
    spatial positions of an [batch, H, W, C] input), giving [batch, out_dim].
    With ``normalize``, CBP(unit_norm(x), unit_norm(y)) (the video story's pooling).
    """
    if normalize:
        x, y = unit_norm(x), unit_norm(y)
    out_dtype = torch.promote_types(x.dtype, y.dtype)
    compute = _fft_dtype(x, y)
    px = count_sketch(x.to(compute), h1, s1, out_dim)
    py = count_sketch(y.to(compute), h2, s2, out_dim)
    spec = torch.fft.rfft(px, n=out_dim) * torch.fft.rfft(py, n=out_dim)
    out = torch.fft.irfft(spec, n=out_dim)
    if sum_pool and out.dim() > 2:
        out = out.sum(dim=tuple(range(1, out.dim() - 1)))
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------
# Strided full-width memory convolution
# --------------------------------------------------------------------------------------


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow SAME padding: (out, pad_before, pad_after) along one axis."""
    out = -(-size // stride)
    pad_total = (out - 1) * stride + kernel - size
    if kernel < stride:
        # Only then can the total be negative ((out - 1) * stride >= size - stride); skipping
        # the max otherwise keeps the expression free of Max() for dynamic-shape compiles.
        pad_total = max(pad_total, 0)
    return out, pad_total // 2, pad_total - pad_total // 2


def reversed_toeplitz(weight: torch.Tensor, pad_left: int) -> torch.Tensor:
    """R[..., t, j] = weight[..., d - 1 - t - j + pad_left] (zero outside [0, d)).

    A SAME correlation along the width, out[j] = sum_t x[t] w[t - j + pad_left], is the
    product of the width-reversed input with R: out = x[::-1] @ R. R is a sliding window
    (unfold) over the zero-padded reversed kernel, so it costs no gather, and its backward
    is a cheap fold; reversing x instead of R keeps the big d x d tiles un-copied.
    """
    d = weight.shape[-1]
    wide = F.pad(weight.flip(-1), (d - 1, d - 1))
    return wide.unfold(-1, d, 1)[..., d - 1 - pad_left : 2 * d - 1 - pad_left, :]


def memory_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    relu: bool = True,
) -> torch.Tensor:
    """One write/read layer: SAME conv with a kernel spanning the full width, bias, ReLU.

    x [..., c_in, n, d], weight [c_out, c_in, k, d], bias [c_out] or None, stride (s, 1).
    With T_{o,c,a}[t, j] = w[o, c, a, t - j + p_left] the d x d Toeplitz matrix of kernel
    row (o, c, a),
    out[..., o, i, :] = relu(b_o + sum_{c,a} x[..., c, i*s + a - p_top, :] T_{o,c,a}),
    rows outside [0, n) being zero. Returns [..., c_out, ceil(n/s), d].

    Computed as one GEMM [rows, c_in*k*d] @ [c_in*k*d, c_out*d] over the strided row
    windows: on CPU this is an order of magnitude faster than F.conv2d with a d-wide
    kernel, whose backward has no fast path for it.
    """
    c_out, c_in, k, d = weight.shape
    if x.dim() < 3 or x.shape[-3] != c_in or x.shape[-1] != d:
        raise ValueError(
            f"memory_conv: input of shape {tuple(x.shape)} does not match a kernel of shape "
            f"{tuple(weight.shape)} (expected [..., {c_in}, n, {d}])"
        )
    lead, n = x.shape[:-3], x.shape[-2]
    _, top, bottom = same_padding(n, k, stride)
    _, left, _ = same_padding(d, d, 1)
    rows = F.pad(x.reshape(-1, c_in, n, d), (0, 0, top, bottom))
    windows = rows.unfold(2, k, stride)  # [N, c_in, m, d, k]
    # Sizes from the unfolded tensor itself (not -1 or same_padding's ceil): under
    # torch.compile with dynamic shapes, one symbolic expression for m keeps inductor's
    # shape reasoning consistent.
    batch, m = windows.shape[0], windows.shape[2]
    windows = windows.flip(-2).permute(0, 2, 1, 4, 3).reshape(batch * m, c_in * k * d)
    taps = reversed_toeplitz(weight, left).permute(1, 2, 3, 0, 4).reshape(c_in * k * d, c_out * d)
    out = (windows @ taps).view(batch, m, c_out, d).transpose(1, 2)
    if bias is not None:
        out = out + bias[:, None, None].to(out.dtype)
    if relu:
        out = F.relu(out)
    return out.reshape(*lead, c_out, m, d)


# --------------------------------------------------------------------------------------
# Attention readout
# --------------------------------------------------------------------------------------


def attention_read(
    rows: torch.Tensor, u: torch.Tensor, sharp: float, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """p = softmax(sharp * <u, r>) over the rows r, o = sum_r p_r r.

    rows [B, R, d] (one memory per question) or [R, d] (one memory shared by all
    questions), u [B, d]. With ``normalize`` every row is unit-normalised first (r is then
    the normalised row in both formulas). Returns o [B, d] and p [B, R].
    """
    if normalize:
        rows = unit_norm(rows)
    if rows.dim() == 2:
        logits = u @ rows.transpose(0, 1)
    else:
        logits = torch.einsum("brd,bd->br", rows, u)
    p = torch.softmax(sharp * logits, dim=-1)
    if rows.dim() == 2:
        o = p @ rows
    else:
        o = torch.einsum("br,brd->bd", p, rows)
    return o, p


def conv_attention_read(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    u: torch.Tensor,
    sharp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last read layer fused with the readout: attention_read over the rows of
    memory_conv(x) (ReLU included), rows in (channel, slot) order.

    x [B, c_in, n, d], u [B, d]. Returns o [B, d] and p [B, c_out * ceil(n/s)].
    """
    mr = memory_conv(x, weight, bias, stride)
    return attention_read(mr.flatten(-3, -2), u, sharp, normalize=True)


def read_network(
    memory: torch.Tensor,
    u: torch.Tensor,
    hashes: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    strides: Sequence[int],
    sharp: float,
    prepared: object = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's read network for B questions over one write memory.

    memory [C, m, d] (the write network's output), u [B, d], hashes (h1, s1, h2, s2) of
    the read CBP (output size d). Mq[b, c, i] = CBP(memory[c, i], u[b]); the read
    convolutions run over Mq [B, C, m, d]; the readout attends over every (channel, slot)
    row of the last one (at least one read layer). Returns o [B, d] and p [B, R].
    ``prepared``: what the fused read shares between the hops over one memory
    (rwmn.ops.prepare_read); the reference has nothing to share and ignores it.
    """
    if not weights:
        raise ValueError("read_network needs at least one read layer")
    h1, s1, h2, s2 = hashes
    d = memory.shape[-1]
    mq = cbp(memory.unsqueeze(0), u[:, None, None, :], h1, s1, h2, s2, d)
    layers = list(zip(weights, biases, strides, strict=True))
    for w, b, s in layers[:-1]:
        mq = memory_conv(mq, w, b, s)
    w, b, s = layers[-1]
    return conv_attention_read(mq, w, b, s, u, sharp)


__all__ = [
    "UNIT_NORM_EPS",
    "answer_scores",
    "attention_read",
    "cbp",
    "conv_attention_read",
    "count_sketch",
    "cross_entropy",
    "embed",
    "hop_update",
    "memory_conv",
    "read_network",
    "reversed_toeplitz",
    "same_padding",
    "unit_norm",
]
