"""Padded shapes with exact masks: what lets one captured CUDA graph serve every movie of
a bucket (docs/model.md section 7, ``train.py --cuda_graphs``).

A movie's story has n elements and a batch B <= --batch_size questions; both vary. A CUDA
graph replays fixed shapes, so a step runs on a story padded to a bucket length N
(:func:`story_bucket`, a geometric grid) and on --batch_size question rows
(:func:`bucket_shape`). The padded computation must equal the unpadded one, which the
plan of :func:`padding_plan` makes exact:

* story rows n..N-1 (after the embedding, unit_norm(bias): not zero) are zeroed where
  the first write layer reads them, or get weight 0 in the attention without one;
* a write or read convolution's SAME padding depends on its input length, so a strided
  layer gets its valid rows re-placed (a gather with a precomputed index) into a buffer
  whose own SAME padding puts every window where the unpadded one has it; a stride-1
  layer's padding does not depend on the length and only needs the rows past the valid
  ones zeroed (:class:`ConvLayout`). The number of memory slots m = ceil(n / s) is kept:
  the slots past m are zeroed (their CBP with the question is then zero too) and get
  weight 0 in the attention softmax (logit -inf);
* padded questions are weighted 0 in the loss, whose mean divides by the true count, and
  in the accuracy.

Every mask and index is a tensor whose shape depends on the bucket only; its values
depend on n and are computed on the host (:func:`padding_plan`) and copied into the
captured graph's input buffers before a replay.

May import: torch, rwmn.config, rwmn.ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rwmn import ops
from rwmn.config import LayerSpec, RWMNConfig

#: The grid of story lengths: round_up(BASE * 2 ** (j / PER_OCTAVE), ROUND) for j >= 0.
BUCKET_BASE, BUCKETS_PER_OCTAVE, BUCKET_ROUND = 64, 3, 16


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def story_bucket(n: int) -> int:
    """The padded story length of a story of ``n`` elements: the smallest length of the
    geometric grid (3 per octave from 64, multiples of 16: 64, 96, 112, 128, 176, ...)
    that holds n. For n >= 200 the padded length is at most 1.31 n (1.26 from the grid,
    the rest from rounding); n in [200, 3000] falls into 13 buckets."""
    if n < 1:
        raise ValueError(f"a story needs at least one element, got n = {n}")
    j = 0
    while True:
        size = _round_up(math.ceil(BUCKET_BASE * 2 ** (j / BUCKETS_PER_OCTAVE)), BUCKET_ROUND)
        if size >= n:
            return size
        j += 1


def bucket_shape(n: int, questions: int, batch_size: int) -> tuple[int, int]:
    """(padded story length, padded question count) of a batch of ``questions`` questions
    about a story of ``n`` elements: the question rows are always padded to
    ``batch_size``, so the shapes a run captures are its story buckets."""
    if not 1 <= questions <= batch_size:
        raise ValueError(f"a batch holds 1 to {batch_size} questions, got {questions}")
    return story_bucket(n), batch_size


def same_pad_top(size: int, kernel: int, stride: int) -> int:
    """Rows TensorFlow SAME padding adds above an input of ``size`` rows."""
    out = -(-size // stride)
    return max((out - 1) * stride + kernel - size, 0) // 2


@dataclass(frozen=True)
class ConvLayout:
    """How one memory convolution runs on a padded input of ``length`` rows whose first
    ``valid`` rows are the data.

    Stride 1: SAME pads (k - 1) // 2 rows above whatever the length, so the op runs on
    the input with its rows past ``valid`` zeroed (``offset`` None). Stride s > 1: the op
    gets ``op_length`` rows, a multiple of s, so that its SAME padding is the least there
    is, P = max(k - s, 0) // 2, with the valid rows re-placed at ``offset`` =
    same_pad_top(valid) - P >= 0 and zeros around them: its window i then starts at valid
    row i * s - same_pad_top(valid), as unpadded. Either way output rows [0, out_valid)
    are the unpadded output."""

    length: int
    valid: int
    op_length: int
    offset: int | None
    out_length: int
    out_valid: int


def conv_layouts(layers: Sequence[LayerSpec], valid: int, length: int) -> list[ConvLayout]:
    """The layouts of a conv stack over ``valid`` rows padded to ``length``."""
    if not 1 <= valid <= length:
        raise ValueError(f"valid rows {valid} must be in [1, {length}]")
    layouts = []
    for layer in layers:
        k, s = layer.kernel, layer.stride
        if s == 1:
            op_length, offset = length, None
        else:
            least = max(k - s, 0) // 2  # the SAME padding of a length that s divides
            op_length = _round_up(length + (k - 1) // 2 - least, s)
            offset = same_pad_top(valid, k, s) - least
        out_length, out_valid = -(-op_length // s), -(-valid // s)
        layouts.append(ConvLayout(length, valid, op_length, offset, out_length, out_valid))
        length, valid = out_length, out_valid
    return layouts


def _stack_tensors(layouts: list[ConvLayout]) -> tuple[tuple[torch.Tensor | None, ...], ...]:
    """Per layer: (gather index or None, keep mask over the op's input rows)."""
    out = []
    for lay in layouts:
        rows = torch.arange(lay.op_length)
        if lay.offset is None:
            out.append((None, rows < lay.valid))
        else:
            src = rows - lay.offset
            keep = (src >= 0) & (src < lay.valid)
            out.append((src.clamp(0, lay.length - 1), keep))
    return tuple(out)


@dataclass
class Padding:
    """The masks and indices of one padded batch (see :func:`padding_plan`): tensors
    whose shapes depend on the bucket only. ``story`` [N] and ``questions`` [Bp] keep the
    valid rows; ``write``/``read``: per conv layer (index or None, keep over the op's
    input rows); ``memory`` [M] keeps the write network's valid slots; ``attention`` [R]
    the rows the read attends over."""

    story: torch.Tensor
    questions: torch.Tensor
    write: tuple[tuple[torch.Tensor | None, torch.Tensor], ...]
    memory: torch.Tensor
    read: tuple[tuple[torch.Tensor | None, torch.Tensor], ...]
    attention: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in a fixed order."""
        layers = [t for pair in (*self.write, *self.read) for t in pair if t is not None]
        return [self.story, self.questions, *layers, self.memory, self.attention]

    def map(self, fn) -> Padding:
        """The same structure with ``fn`` applied to every tensor."""

        def pairs(stack):
            return tuple((None if i is None else fn(i), fn(k)) for i, k in stack)

        return Padding(
            fn(self.story), fn(self.questions), pairs(self.write), fn(self.memory),
            pairs(self.read), fn(self.attention),
        )  # fmt: skip

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Padding:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def copy_(self, other: Padding, non_blocking: bool = False) -> None:
        """Copy ``other`` (a plan of the same bucket) into these tensors in place."""
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine.copy_(theirs, non_blocking=non_blocking)


def padding_plan(cfg: RWMNConfig, n: int, questions: int, length: int, rows: int) -> Padding:
    """The host tensors that make a story of ``n`` elements padded to ``length`` rows and
    ``questions`` questions padded to ``rows`` compute exactly what the unpadded batch
    computes (model.RWMN.forward(..., padding=...), RWMN.loss(..., keep=...))."""
    if not 1 <= questions <= rows:
        raise ValueError(f"questions {questions} must be in [1, {rows}]")
    write = conv_layouts(cfg.write_layers, n, length)
    m, slots = (write[-1].out_valid, write[-1].out_length) if write else (n, length)
    channels = cfg.write_layers[-1].channels if write else 1
    read_layers = cfg.read_layers
    if cfg.legacy:
        # The release's rows: [slots, d, channels] row-major, slot i's rows first.
        read = conv_layouts(read_layers, m * channels, slots * channels)
        if read:
            out = read[-1]
            rows_valid, rows_total = out.out_valid * read_layers[-1].channels, out.out_length
            rows_total *= read_layers[-1].channels
        else:
            rows_valid, rows_total = m * channels, slots * channels
        attention = torch.arange(rows_total) < rows_valid
    else:
        read = conv_layouts(read_layers, m, slots)
        if read:
            out = read[-1]
            per_channel = torch.arange(out.out_length) < out.out_valid
            attention = per_channel.repeat(read_layers[-1].channels)
        else:
            attention = (torch.arange(slots) < m).repeat(channels)
    return Padding(
        story=torch.arange(length) < n,
        questions=torch.arange(rows) < questions,
        write=_stack_tensors(write),
        memory=torch.arange(slots) < m,
        read=_stack_tensors(read),
        attention=attention,
    )


def padded_conv_stack(convs, x: torch.Tensor, layers) -> torch.Tensor:
    """``convs`` (MemoryConv modules) over x [..., c, L, d] laid out as ``layers`` (a
    Padding's write or read pairs) says; rows past the valid output are not zeroed."""
    for conv, (index, keep) in zip(convs, layers, strict=True):
        if index is not None:
            x = x.index_select(-2, index)
        x = conv(torch.where(keep[:, None], x, 0.0))
    return x


def masked_attention_read(
    rows: torch.Tensor, u: torch.Tensor, sharp: float, normalize: bool, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """rwmn.reference.attention_read over the rows ``keep`` marks: the others get logit
    -inf, so weight exactly 0 and gradient exactly 0."""
    if normalize:
        rows = ops.unit_norm(rows)
    if rows.dim() == 2:
        logits = u @ rows.transpose(0, 1)
    else:
        logits = torch.einsum("brd,bd->br", rows, u)
    p = torch.softmax(torch.where(keep, sharp * logits, float("-inf")), dim=-1)
    if rows.dim() == 2:
        o = p @ rows
    else:
        o = torch.einsum("br,brd->bd", p, rows)
    return o, p


__all__ = [
    "ConvLayout",
    "Padding",
    "bucket_shape",
    "conv_layouts",
    "masked_attention_read",
    "padded_conv_stack",
    "padding_plan",
    "same_pad_top",
    "story_bucket",
]
