"""Attention pictures (rwmn/visualize.py): the slot-to-story mapping against the write and
read stacks' own receptive fields (gradients through the convolutions), attention that
sums to one per hop, the pictures and index of ``train.py --eval_only --attention_out``,
and the TensorBoard attention images and weight histograms."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rwmn.config import RWMNConfig
from rwmn.data.synthetic import SyntheticConfig, generate
from rwmn.memconv import MemoryConvStack
from rwmn.read_network import legacy_rows
from rwmn.training import main
from rwmn.visualize import element_attention, row_spans, slot_attention

GEOMETRIES = {
    "release 40-30-3 / 3-1-3": dict(write="40-30-3", read="3-1-3", n=100),
    "two layers each": dict(write="3-2-2/5-3-4", read="3-1-2/2-2-3", n=23),
    "kernel below stride": dict(write="2-3-2", read="1-2-1", n=17),
    "write only": dict(write="4-2-3", read="", n=11),
    "baseline": dict(write="", read="", n=7),
}


def _ones(stack: MemoryConvStack) -> MemoryConvStack:
    for conv in stack.convs:
        torch.nn.init.ones_(conv.weight)
        torch.nn.init.ones_(conv.bias)
    return stack


def receptive_fields(cfg: RWMNConfig, n: int, d: int = 2) -> list[tuple[int, int]]:
    """Each attended row's story elements, from the gradients of the model's own layers
    (all-ones weights and inputs, so every ReLU passes): the rows the model attends over,
    built as RWMN builds them."""
    x = torch.ones(1, n, d, dtype=torch.float64, requires_grad=True)
    write = _ones(MemoryConvStack(cfg.write_layers, 1, d)).double()
    memory = write(x)  # [C, m, d]
    if cfg.legacy:
        rows = legacy_rows(memory)
        if cfg.read_layers:
            read = _ones(MemoryConvStack(cfg.read_layers, 1, d)).double()
            rows = legacy_rows(read(rows.unsqueeze(0)))
    else:
        if cfg.read_layers:
            memory = _ones(MemoryConvStack(cfg.read_layers, memory.shape[0], d)).double()(memory)
        rows = memory.flatten(0, 1)
    fields = []
    for r in range(rows.shape[0]):
        (grad,) = torch.autograd.grad(rows[r].sum(), x, retain_graph=True)
        hit = np.flatnonzero(grad[0].abs().sum(-1).numpy())
        assert (np.diff(hit) == 1).all()  # contiguous
        fields.append((int(hit[0]), int(hit[-1]) + 1))
    return fields


@pytest.mark.parametrize("legacy", [False, True], ids=["paper", "legacy"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_slot_spans_match_the_stacks(name, legacy):
    geometry = dict(GEOMETRIES[name])
    n = geometry.pop("n")
    cfg = RWMNConfig(dim_text=4, dim_memory=4, legacy=legacy, **geometry)
    spans, slots = row_spans(cfg, n)
    assert [tuple(s) for s in spans.tolist()] == receptive_fields(cfg, n)
    # Rows of one slot cover the same elements (channels of one position).
    for slot in np.unique(slots):
        assert len({tuple(s) for s in spans[slots == slot].tolist()}) == 1
    assert slots.max() + 1 == len(np.unique(slots))


def test_spread_attention_sums_to_one():
    cfg = RWMNConfig(write="3-2-2/5-3-4", read="3-1-2/2-2-3")
    spans, slots = row_spans(cfg, 23)
    p = np.random.default_rng(0).dirichlet(np.ones(len(spans)))
    assert element_attention(p, spans, 23).sum() == pytest.approx(1.0)
    assert slot_attention(p, slots).sum() == pytest.approx(1.0)
    one = np.zeros(len(spans))
    one[3] = 1.0
    per_element = element_attention(one, spans, 23)
    start, end = spans[3]
    assert np.flatnonzero(per_element).tolist() == list(range(start, end))


# --------------------------------------------------------------------------------------
# train.py --eval_only --attention_out, --tensorboard
# --------------------------------------------------------------------------------------

DIM = 12
FLAGS = [
    "--dim_text", str(DIM), "--dim_memory", str(DIM), "--write", "3-2-2", "--read", "3-1-2",
    "--num_hop", "2", "--batch_size", "4", "--validation_step", "2",
    "--full_validation_step", "2", "--max_steps", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vis")
    data = root / "data"
    generate(
        data,
        SyntheticConfig(
            source="sub", train_movies=2, val_movies=2, test_movies=1, questions_per_movie=3,
            min_scenes=2, max_scenes=2, scene_len=4, dim_text=DIM, dim_sub=DIM, dim_rgb=16,
        ),
    )  # fmt: skip
    out = root / "run"
    assert main(["--data_dir", str(data), "--out_dir", str(out), "--tensorboard", *FLAGS]) == 0
    return data, out


def test_attention_pictures_and_index(trained):
    data, out = trained
    pictures = out / "attention"
    argv = ["--data_dir", str(data), "--out_dir", str(out), "--eval_only",
            "--checkpoint_file", str(out / "checkpoints" / "last.pt"),
            "--attention_out", str(pictures), "--attention_limit", "3"]  # fmt: skip
    assert main(argv) == 0
    pngs = sorted(pictures.glob("*.png"))
    assert len(pngs) == 3
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    index = (pictures / "index.html").read_text()
    predictions = (out / "predictions_val.txt").read_text().split("\n")
    for png, line in zip(pngs, predictions, strict=False):
        qid, answer = line.split()
        assert f'href="{png.name}"' in index and f"<td>{qid}</td>" in index
        row = re.search(rf"<td>{re.escape(qid)}</td><td>[^<]*</td><td>(\d)", index)
        assert row and row.group(1) == answer  # the index's prediction is the eval's
    assert not list(pictures.glob(".tmp-*"))


def test_attention_records_sum_to_one_per_hop(trained):
    from rwmn.data import MovieQAData
    from rwmn.model import RWMN
    from rwmn.visualize import attention_records

    data, out = trained
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    cfg = RWMNConfig.from_dict(state["model_config"])
    model = RWMN(cfg)
    model.load_state_dict(state["model"])
    split = MovieQAData(data, "sub", "val", dim_text=DIM)
    records = list(attention_records(model, split.iter_batches(4), torch.device("cpu")))
    assert len(records) == split.num_questions
    for record in records:
        assert record.attention.shape[0] == 2  # hops
        np.testing.assert_allclose(record.attention.sum(-1), 1.0, rtol=1e-5)
        spans, _ = row_spans(cfg, record.n)
        assert record.attention.shape[1] == len(spans)
    split.close()


def test_attention_out_needs_eval_only(trained, capsys):
    data, out = trained
    assert main(["--data_dir", str(data), "--attention_out", str(out / "x"), *FLAGS]) == 2
    assert "--attention_out applies with --eval_only" in capsys.readouterr().err


def test_tensorboard_attention_and_histograms(trained):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    _, out = trained
    acc = event_accumulator.EventAccumulator(
        str(out / "tensorboard"), size_guidance={"images": 0, "histograms": 0}
    )
    acc.Reload()
    tags = acc.Tags()
    assert {"val_batch/attention_hop1", "val_batch/attention_hop2"} <= set(tags["images"])
    assert "weights/embed.weight" in tags["histograms"]
    assert "weights/write.convs.0.weight" in tags["histograms"]
