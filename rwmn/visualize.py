"""Pictures of what the model reads: the attention of every hop over the memory slots and
over the story elements each slot covers, and the candidates' scores.

``train.py --eval_only --checkpoint_file C --attention_out DIR`` writes, per question of
``--split``, ``DIR/<n>_<qid>.png`` and one ``DIR/index.html`` listing them with their qid,
the predicted and correct answer and the predicted answer's probability.

The slot-to-story mapping (:func:`row_spans`) follows the write and read stacks' geometry:
a layer with kernel k and stride s over m positions has ceil(m / s) outputs with
TensorFlow SAME padding (``pad_before = ((out - 1) s + k - m) // 2``), output j reading
inputs ``[j s - pad_before, j s - pad_before + k)`` clipped to the input. The attended rows
are the (channel, slot) rows of the last layer, channel-major (``c * m + j``); in
``--legacy`` mode the release's row-major NHWC reshape makes row i of a layer with C
channels belong to slot ``i // C`` (docs/model.md section 6).

May import: matplotlib, numpy, torch, rwmn.checkpoint, rwmn.config, rwmn.reference.
"""

from __future__ import annotations

import html
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rwmn.config import LayerSpec, RWMNConfig
from rwmn.reference import same_padding

__all__ = [
    "QuestionAttention",
    "check_can_draw",
    "element_attention",
    "layer_spans",
    "render",
    "row_spans",
    "slot_attention",
    "tensorboard_summaries",
    "write_attention_pictures",
]


def check_can_draw() -> None:
    """Raise ConfigError unless matplotlib can be imported (the ``visualize`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        from rwmn.config import ConfigError

        raise ConfigError(
            "--attention_out needs matplotlib: pip install matplotlib (or -e '.[visualize]')"
        ) from exc


def layer_spans(spans: np.ndarray, layer: LayerSpec) -> np.ndarray:
    """Story spans [out, 2] (start, end) of a SAME conv layer's outputs, from the spans
    [m, 2] of its input positions."""
    m = len(spans)
    out, top, _ = same_padding(m, layer.kernel, layer.stride)
    result = np.empty((out, 2), dtype=np.int64)
    for j in range(out):
        lo = max(j * layer.stride - top, 0)
        hi = min(j * layer.stride - top + layer.kernel, m) - 1
        result[j] = spans[lo, 0], spans[hi, 1]
    return result


def _stack(spans: np.ndarray, layers: Sequence[LayerSpec]) -> np.ndarray:
    for layer in layers:
        spans = layer_spans(spans, layer)
    return spans


def _legacy_rows(spans: np.ndarray, channels: int) -> np.ndarray:
    """Spans of the release's reshape [m, d, C] -> [m C, d]: row i is slot i // C."""
    return np.repeat(spans, channels, axis=0)


def row_spans(cfg: RWMNConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For a story of ``n`` elements: the story span [R, 2] (start, end) of every attended
    row and the memory slot [R] each row belongs to (the position along the last layer),
    in the order of the model's attention ``p [B, R]``."""
    spans = np.stack([np.arange(n), np.arange(n) + 1], axis=1).astype(np.int64)
    write, read = cfg.write_layers, cfg.read_layers
    channels = 1
    spans = _stack(spans, write)
    if write:
        channels = write[-1].channels
    if cfg.legacy:
        spans, channels = _legacy_rows(spans, channels), 1
        if read:
            spans = _stack(spans, read)
            channels = read[-1].channels
            spans = _legacy_rows(spans, channels)
        return spans, np.arange(len(spans)) // max(channels, 1)
    spans = _stack(spans, read)
    if read:
        channels = read[-1].channels
    slots = len(spans)
    return np.tile(spans, (channels, 1)), np.tile(np.arange(slots), channels)


def slot_attention(p: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Attention [R] summed over the rows of each memory slot: [num_slots]."""
    return np.bincount(slots, weights=p, minlength=int(slots.max()) + 1)


def element_attention(p: np.ndarray, spans: np.ndarray, n: int) -> np.ndarray:
    """Attention [R] spread evenly over the story elements each row covers: [n], summing
    to the attention's sum."""
    out = np.zeros(n + 1)
    width = (spans[:, 1] - spans[:, 0]).astype(np.float64)
    np.add.at(out, spans[:, 0], p / width)
    np.add.at(out, spans[:, 1], -p / width)
    return np.cumsum(out)[:n]


@dataclass
class QuestionAttention:
    """One question's read: the attention of every hop [hops, R] and the scores [A]."""

    qid: str
    movie: str
    n: int  # story elements
    attention: np.ndarray  # [hops, R]
    scores: np.ndarray  # [A] logits
    target: int | None

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.scores))

    @property
    def probability(self) -> float:
        e = np.exp(self.scores - self.scores.max())
        return float(e[self.predicted] / e.sum())


def _story_length(story) -> int:
    return int((story[0] if isinstance(story, tuple | list) else story).shape[0])


@torch.no_grad()
def attention_records(
    model: torch.nn.Module, batches: Iterable, device: torch.device, autocast=None
) -> Iterator[QuestionAttention]:
    """Run ``model`` (an RWMN) over ``batches`` (QABatch) with ``return_attention`` and
    yield one record per question."""
    import contextlib

    model.eval()
    for batch in batches:
        batch = batch.to(device).features(torch.float32)
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = model(batch.story, batch.query, batch.answers, return_attention=True)
        attention = torch.stack([p.float() for p in out.attention], 1).cpu().numpy()
        scores = out.logits.float().cpu().numpy()
        target = None if batch.target is None else batch.target.cpu().tolist()
        n = _story_length(batch.story)
        for i, qid in enumerate(batch.qids):
            yield QuestionAttention(
                qid, batch.movie, n, attention[i], scores[i], None if target is None else target[i]
            )


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "question"


def render(record: QuestionAttention, cfg: RWMNConfig, path: str) -> None:
    """One question's picture, written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    spans, slots = row_spans(cfg, record.n)
    hops = record.attention.shape[0]
    fig, axes = plt.subplots(
        hops + 1, 2, figsize=(12, 2.2 * (hops + 1) + 0.6), squeeze=False,
        gridspec_kw={"width_ratios": [3, 2]},
    )  # fmt: skip
    for hop in range(hops):
        p = record.attention[hop]
        per_slot = slot_attention(p, slots)
        ax = axes[hop, 0]
        ax.bar(np.arange(len(per_slot)), per_slot, width=0.9, color="tab:blue")
        ax.set_xlim(-0.5, len(per_slot) - 0.5)
        ax.set_title(f"hop {hop + 1}: attention over the {len(per_slot)} memory slots")
        widest = int((spans[:, 1] - spans[:, 0]).max())
        ax.set_xlabel(f"memory slot (each covers up to {widest} story elements)")
        ax.set_ylabel("attention")
        ax = axes[hop, 1]
        per_element = element_attention(p, spans, record.n)
        ax.stairs(per_element, np.arange(record.n + 1), fill=True, color="tab:orange")
        ax.set_xlim(0, record.n)
        ax.set_ylim(bottom=0)
        ax.set_title(f"hop {hop + 1}: over the {record.n} story elements")
        ax.set_xlabel("story element (subshot / sentence)")
        ax.set_ylabel("attention / element")
    ax = axes[hops, 0]
    A = len(record.scores)
    colors = ["tab:gray"] * A
    if record.target is not None:
        colors[record.target] = "tab:green"
    bars = ax.bar(np.arange(A), record.scores, color=colors)
    bars[record.predicted].set_edgecolor("black")
    bars[record.predicted].set_linewidth(2.5)
    bars[record.predicted].set_hatch("//")
    ax.set_xticks(
        np.arange(A),
        [
            f"{a}"
            + ("\ncorrect" if a == record.target else "")
            + ("\npredicted" if a == record.predicted else "")
            for a in range(A)
        ],
    )
    ax.set_xlabel("candidate answer")
    ax.set_ylabel("score (cosine)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title("candidate scores: green = correct, hatched = predicted")
    axes[hops, 1].axis("off")
    verdict = (
        ""
        if record.target is None
        else ("  right" if record.predicted == record.target else "  wrong")  # fmt: skip
    )
    axes[hops, 1].text(
        0.0, 0.5,
        f"qid {record.qid}\nmovie {record.movie}\npredicted {record.predicted} "
        f"(p = {record.probability:.2f})\ncorrect "
        f"{'n/a' if record.target is None else record.target}{verdict}\n"
        f"write {cfg.write or '-'}  read {cfg.read or '-'}  hops {hops}",
        va="center", family="monospace",
    )  # fmt: skip
    fig.suptitle(f"{record.qid}: what the model reads", fontsize=13)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=80)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def _index_html(rows: list[tuple[str, QuestionAttention]]) -> str:
    lines = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>RWMN attention</title>',
        "<style>td,th{padding:2px 8px;text-align:left}img{height:90px}</style></head><body>",
        "<h1>What the model reads</h1>",
        f"<p>{len(rows)} questions. score: the predicted answer's softmax probability.</p>",
        "<table><tr><th>qid</th><th>movie</th><th>predicted</th><th>correct</th>"
        "<th>score</th><th>picture</th></tr>",
    ]
    for name, r in rows:
        correct = "n/a" if r.target is None else str(r.target)
        mark = "" if r.target is None else (" &#10003;" if r.predicted == r.target else " &#10007;")
        link = html.escape(name, quote=True)
        lines.append(
            f"<tr><td>{html.escape(r.qid)}</td><td>{html.escape(r.movie)}</td>"
            f"<td>{r.predicted}{mark}</td><td>{correct}</td><td>{r.probability:.3f}</td>"
            f'<td><a href="{link}"><img src="{link}" alt="{html.escape(r.qid)}"></a></td></tr>'
        )
    lines += ["</table></body></html>", ""]
    return "\n".join(lines)


def write_attention_pictures(
    records: Iterable[QuestionAttention], cfg: RWMNConfig, out_dir: str, limit: int = 0
) -> list[str]:
    """A PNG per record (the first ``limit``; 0: all) and ``index.html`` in ``out_dir``
    (created), each written atomically. Returns the PNG paths."""
    from rwmn.checkpoint import atomic_write_text

    os.makedirs(out_dir, exist_ok=True)
    rows: list[tuple[str, QuestionAttention]] = []
    for i, record in enumerate(records):
        if limit and i >= limit:
            break
        name = f"{i:05d}_{_safe_name(record.qid)}.png"
        render(record, cfg, os.path.join(out_dir, name))
        rows.append((name, record))
    atomic_write_text(os.path.join(out_dir, "index.html"), _index_html(rows))
    return [os.path.join(out_dir, name) for name, _ in rows]


def tensorboard_summaries(writer, model: torch.nn.Module, batch, step: int, device) -> None:
    """The validation batch's attention, one image per hop (questions x rows, each row
    scaled to its maximum), and a histogram of every weight."""
    records = list(attention_records(model, [batch], device))
    if records:
        attention = np.stack([r.attention for r in records])  # [B, hops, R]
        for hop in range(attention.shape[1]):
            image = attention[:, hop]
            image = image / np.maximum(image.max(axis=1, keepdims=True), 1e-12)
            writer.add_image(f"val_batch/attention_hop{hop + 1}", image[None], step)
    for name, param in model.named_parameters():
        writer.add_histogram(f"weights/{name}", param.detach().float().cpu(), step)
