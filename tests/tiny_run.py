"""The tiny synthetic dataset and model flags the training, pipeline, hardening and DDP
tests run with (a few movies of 12-wide features; seconds per run on the CPU)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIM = 12
#: rwmn.data.synthetic.SyntheticConfig fields (with source=...).
TINY_DATA = dict(
    train_movies=4, val_movies=2, test_movies=2, questions_per_movie=6,
    min_scenes=2, max_scenes=3, scene_len=4, dim_text=DIM, dim_sub=DIM, dim_rgb=16,
)  # fmt: skip
#: The model at DIM (train.py flags).
MODEL_FLAGS = [
    "--dim_text", str(DIM), "--dim_memory", str(DIM), "--dim_sub", str(DIM),
    "--dim_rgb", "16", "--dim_mcb", "20", "--write", "3-2-2", "--read", "3-1-2",
]  # fmt: skip
#: The model, small batches, and validations every few steps.
TINY_FLAGS = [*MODEL_FLAGS, "--batch_size", "4", "--validation_step", "3",
              "--full_validation_step", "5"]  # fmt: skip
