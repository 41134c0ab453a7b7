"""Training loop, command line, checkpoints and the memory signal of the synthetic data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from tiny_run import DIM, TINY_DATA, TINY_FLAGS

from rwmn import RWMNConfig
from rwmn.data.movieqa import MovieQAData
from rwmn.data.synthetic import SyntheticConfig, generate
from rwmn.training import CheckpointError, TrainConfig, Trainer, atomic_save, main


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module", params=["sub", "video_sub"])
def tiny_data(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"data-{request.param}")
    generate(root, SyntheticConfig(source=request.param, **TINY_DATA))
    return str(root), request.param


def _run(data, out, *extra):
    root, source = data
    argv = ["--data_dir", root, "--data_source", source, "--out_dir", str(out), *TINY_FLAGS]
    return main([*argv, *extra])


def _state(out):
    return torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)


def test_run_directory(tiny_data, tmp_path):
    assert _run(tiny_data, tmp_path, "--max_steps", "10") == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["data_source"] == tiny_data[1]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "val_batch", "val"} <= {r["split"] for r in rows}
    for row in rows:
        assert {"step", "split", "acc", "loss", "seconds"} <= set(row)
        assert 0.0 <= row["acc"] <= 1.0 and np.isfinite(row["loss"])
    assert [r["step"] for r in rows if r["split"] == "val"] == [5, 10]
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    assert _state(tmp_path)["step"] == 10
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp" in p.name]


def test_resume_is_exact(tiny_data, tmp_path):
    """An interrupted run resumed gives bit-identical weights and optimizer state."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _run(tiny_data, whole, "--max_steps", "12") == 0
    assert _run(tiny_data, parts, "--max_steps", "7") == 0
    assert _run(tiny_data, parts, "--max_steps", "12", "--resume") == 0
    a, b = _state(whole), _state(parts)
    assert a["step"] == b["step"] == 12
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["sum"], sb["sum"])
    assert a["scheduler"] == b["scheduler"]
    # The resumed run also logged the same metrics (seconds aside).
    strip = lambda path: [
        {k: v for k, v in json.loads(line).items() if k not in ("seconds", "questions_per_second")}
        for line in (path / "metrics.jsonl").read_text().splitlines()
    ]  # fmt: skip
    assert strip(whole) == strip(parts)


def test_early_stop(tiny_data, tmp_path, capsys):
    assert _run(tiny_data, tmp_path, "--max_steps", "200", "--early_stop", "1",
                "--init_lr", "0") == 0  # fmt: skip
    # lr 0: accuracy never improves after the first full validation (step 5).
    assert _state(tmp_path)["step"] == 10
    assert "early stop" in capsys.readouterr().out


def test_eval_only_writes_predictions(tiny_data, tmp_path):
    root, source = tiny_data
    assert _run(tiny_data, tmp_path, "--max_steps", "5") == 0
    ckpt = str(tmp_path / "checkpoints" / "last.pt")
    for split in ("val", "test"):
        assert _run(tiny_data, tmp_path, "--eval_only", "--checkpoint_file", ckpt,
                    "--split", split) == 0  # fmt: skip
        lines = (tmp_path / f"predictions_{split}.txt").read_text().splitlines()
        data = MovieQAData(root, source, split, DIM, 16, DIM)
        assert len(lines) == data.num_questions
        for line in lines:
            qid, answer = line.split()
            assert ":" in qid and 0 <= int(answer) < 5


def test_fp16_amp_with_grad_scaler(tiny_data, tmp_path):
    assert _run(tiny_data, tmp_path, "--max_steps", "4", "--amp", "fp16") == 0
    assert _state(tmp_path)["scaler"]["scale"] > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--write", "40-30"], "--write"),
        (["--read", "3-x-1"], "--read"),
        (["--dim_text", "13"], "--dim_text"),
        (["--resume"], "no checkpoint"),
        (["--eval_only"], "--checkpoint_file"),
        (["--video_features", "true", "--data_source", "sub"], "--video_features"),
    ],
)
def test_command_line_errors(tiny_data, tmp_path, capsys, flags, message):
    if "--data_source" in flags and tiny_data[1] != "sub":
        pytest.skip("one source is enough")
    assert _run(tiny_data, tmp_path, "--max_steps", "2", *flags) == 2
    err = capsys.readouterr().err
    assert "train.py: error:" in err and message in err
    assert "Traceback" not in err


def test_missing_data_dir(tmp_path, capsys):
    assert main(["--data_dir", str(tmp_path / "nope"), "--max_steps", "1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_checkpoint_from_another_config(tiny_data, tmp_path, capsys):
    assert _run(tiny_data, tmp_path, "--max_steps", "2") == 0
    ckpt = str(tmp_path / "checkpoints" / "last.pt")
    assert _run(tiny_data, tmp_path, "--eval_only", "--checkpoint_file", ckpt,
                "--read", "3-1-3") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "another model configuration" in err and "--read" in err


def test_foreign_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="x.pt' cannot be loaded safely"):
        from rwmn.training import load_checkpoint

        load_checkpoint(str(path))


def test_unused_release_flags_reported(tiny_data, tmp_path, capsys):
    assert _run(tiny_data, tmp_path, "--max_steps", "1", "--dropout", "0.5",
                "--wconv_h", "40") == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "unused" in err and "--dropout" in err and "--wconv_h" in err


def test_atomic_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    atomic_save({"v": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


# --------------------------------------------------------------------------------------
# The synthetic data's signal lives in the story: a trained model needs it.
# --------------------------------------------------------------------------------------

SIGNAL_DATA = dict(train_movies=48, val_movies=8, test_movies=1, questions_per_movie=32, seed=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The baseline memory network (attention over the story) trained for 300 steps."""
    root = tmp_path_factory.mktemp("signal")
    generate(root, SyntheticConfig(**SIGNAL_DATA))
    torch.manual_seed(0)
    model_cfg = RWMNConfig(write="", read="")
    cfg = TrainConfig(
        data_dir=str(root), out_dir=str(root / "run"), max_steps=300, validation_step=100,
        full_validation_step=100, early_stop=10, device="cpu",
    )  # fmt: skip
    trainer = Trainer(model_cfg, cfg, log=_quiet)
    trainer.fit()
    return trainer


def _accuracy(trainer, story_of) -> float:
    val = trainer.data("val")
    correct = total = 0
    trainer.model.eval()
    with torch.no_grad():
        for batch in val.iter_batches(32):
            story = story_of(val, batch)
            pred = trainer.model(story, batch.query, batch.answers).argmax(-1)
            correct += int((pred == batch.target).sum())
            total += len(pred)
    return correct / total


def test_training_beats_chance_by_reading_memory(trained):
    own = _accuracy(trained, lambda val, batch: batch.story)

    def another_movie(val, batch):
        return val.story(val.movies[(val.movies.index(batch.movie) + 1) % len(val.movies)])

    other = _accuracy(trained, another_movie)
    zeroed = _accuracy(trained, lambda val, batch: torch.zeros_like(batch.story))
    assert own > 0.6, own  # chance is 0.2
    assert other < 0.35, other  # another movie's story
    assert zeroed < 0.35, zeroed


@pytest.mark.slow
def test_tensorboard_and_compile_flags(tiny_data, tmp_path):
    """--tensorboard writes event files; --compile trains through torch.compile."""
    if tiny_data[1] != "sub":
        pytest.skip("one source is enough")
    assert _run(tiny_data, tmp_path, "--max_steps", "3", "--tensorboard", "--compile",
                "--backend", "reference") == 0  # fmt: skip
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert _state(tmp_path)["step"] == 3
