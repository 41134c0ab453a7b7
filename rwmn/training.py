"""Training and evaluation loop behind ``train.py`` (docs/cli.md).

The run directory (--out_dir, see rwmn.rundir) holds config.json, metrics.jsonl (one JSON
row per evaluation), checkpoints/last.pt (for --resume) and checkpoints/best.pt (best full
validation accuracy); run.lock keeps a second live run out. Checkpoints (rwmn.checkpoint)
hold the model, optimizer, scheduler, grad scaler, step, early-stopping state, elapsed time,
config and every RNG state; they are written atomically and read with weights_only=True.
last.pt is written at step 0, so a run can be resumed from its first moment; a resumed run
cuts metrics.jsonl back to the checkpoint's step, so after any number of kills and resumes
the log, the weights and the checkpoints equal an uninterrupted run's.

The input pipeline (issue 11): every movie of the train and val splits is read and checked
before the first step and served from memory (rwmn.data.cache, --data_cache); the next
batch is prepared while a step runs (rwmn.data.prefetch); a step queues device work only:
the loss and accuracy are summed on the device and read, with the check for a non-finite
loss, at each --validation_step (rwmn.loop), so the host never waits on the device
between progress lines.

Every check that can fail on a flag, a data file or a checkpoint runs before the run
directory is written; the command line reports it as one line (exit status 2).

Under torchrun (issue 10, rwmn.distributed) each rank runs this loop on its own movies
(--movies_per_step of them per step, from per-slot streams), DDP averages the gradients,
and rank 0 alone logs and writes the run directory; a checkpoint also holds the world
size and every rank's running sums and random states, and full validation is sharded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from rwmn import checkpoint, ops, rundir
from rwmn.checkpoint import CheckpointError, atomic_save, atomic_write_text
from rwmn.cli import HelpFormatter, OneLineParser, one_line
from rwmn.config import (
    DATA_SOURCES,
    ConfigError,
    RWMNConfig,
    check_field_types,
    check_finite,
)
from rwmn.data.cache import (
    CACHE_MODES,
    DATA_DTYPES,
    BatchSource,
    ReadPerBatch,
    build_source,
    plan_cache,
    split_nbytes,
)
from rwmn.data.movieqa import DataError, MovieQAData, QABatch
from rwmn.data.prefetch import NoPrefetch, Prefetcher
from rwmn.data.progress import ReadProgress
from rwmn.distributed import Comm, Launch, PeerError, slot_sampler
from rwmn.loop import (
    COMPILE_MODES,
    RunningMetrics,
    combine_windows,
    compile_model,
    make_adagrad,
)
from rwmn.model import RWMN
from rwmn.profiling import nvtx_enabled, nvtx_range
from rwmn.rundir import RunDirError, RunLock

__all__ = [
    "CheckpointError", "RunDirError", "TrainConfig", "Trainer", "atomic_save",
    "build_parser", "load_checkpoint", "main",
]  # fmt: skip

CHECKPOINT_FORMAT = checkpoint.FORMAT
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Release flags its code never used: accepted so old command lines run, reported as unused.
UNUSED_RELEASE_FLAGS = (
    "sub_with_video_features", "novideo_features", "bn_decay", "summary_step", "summary_dir",
    "summary_name", "model", "dropout", "num_val_examples", "num_test_examples",
    "dim_context", "num_memory_channel", "kernel_height", "dim_mcb_output",
    "num_params_level", "wconv_h", "wconv_w", "wstride_h", "wstride_w", "rconv_h",
    "rconv_w", "rstride_h", "rstride_w", "checkpoint_threshold", "init_acc",
)  # fmt: skip

#: TrainConfig fields that belong to one invocation of train.py: never taken from a
#: checkpoint's configuration on --resume.
INVOCATION_FIELDS = frozenset({
    "out_dir", "name", "checkpoint_dir", "resume", "overwrite", "allow_resume_changes",
    "eval_only", "split", "checkpoint_file", "attention_out", "attention_limit",
})  # fmt: skip
#: Flags --resume accepts with a value other than the checkpoint's: where and how fast the
#: run computes, and how long it goes on. Each change is logged.
FREE_ON_RESUME = frozenset({
    "max_steps", "early_stop", "device", "backend", "compile", "compile_mode", "tensorboard",
    "nvtx", "data_cache", "prefetch",
})  # fmt: skip
#: Flags --resume applies only with --allow_resume_changes (each logged); any other flag
#: (the seed, Adagrad's initial accumulator, --pretrain, the model's architecture) cannot
#: change within a run.
CHANGEABLE_ON_RESUME = frozenset({
    "batch_size", "init_lr", "learning_rate_decay_examples", "learning_rate_decay_rate",
    "validation_step", "full_validation_step", "checkpoint_step", "save_threshold",
    "data_dir", "amp", "data_dtype", "sharp", "alpha", "reg",
})  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run that is not the model."""

    data_dir: str | None = None
    out_dir: str | None = None
    name: str | None = None
    checkpoint_dir: str | None = None
    batch_size: int = 32
    max_steps: int = 2500
    init_lr: float = 0.003
    init_accumulator_value: float = 0.1
    learning_rate_decay_examples: int = 200
    learning_rate_decay_rate: float = 0.95
    validation_step: int = 30
    full_validation_step: int = 100
    checkpoint_step: int = 1000
    early_stop: int = 4
    save_threshold: float = 0.0
    pretrain: str | None = None
    checkpoint_file: str | None = None
    device: str = "auto"
    amp: str = "off"
    compile: bool = False
    compile_mode: str = "default"
    data_cache: str = "auto"
    data_dtype: str = "fp32"
    prefetch: bool = True
    backend: str | None = None
    seed: int = 0
    movies_per_step: int = 1
    resume: bool = False
    overwrite: bool = False
    allow_resume_changes: bool = False
    tensorboard: bool = False
    nvtx: bool = False
    eval_only: bool = False
    split: str = "val"
    attention_out: str | None = None
    attention_limit: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("batch_size", "max_steps", "validation_step", "full_validation_step",
                     "checkpoint_step", "early_stop", "learning_rate_decay_examples",
                     "movies_per_step"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be in [0, 2**63), got {self.seed}")
        check_finite(self, "init_lr", "init_accumulator_value", minimum=0.0)
        check_finite(self, "save_threshold")
        check_finite(self, "learning_rate_decay_rate")
        if self.learning_rate_decay_rate <= 0:
            raise ConfigError(
                f"--learning_rate_decay_rate must be positive, got {self.learning_rate_decay_rate}"
            )
        parse_device(self.device)
        if self.amp not in AMP_DTYPES:
            raise ConfigError(f"--amp {self.amp!r}: expected one of {tuple(AMP_DTYPES)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"--compile_mode {self.compile_mode!r}: expected one of {COMPILE_MODES}"
            )
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"--compile_mode {self.compile_mode} applies only with --compile")
        if self.data_cache not in CACHE_MODES:
            raise ConfigError(f"--data_cache {self.data_cache!r}: expected one of {CACHE_MODES}")
        if self.data_dtype not in DATA_DTYPES:
            raise ConfigError(
                f"--data_dtype {self.data_dtype!r}: expected one of {tuple(DATA_DTYPES)}"
            )
        if self.backend is not None and self.backend not in ops.BACKENDS:
            raise ConfigError(f"--backend {self.backend!r}: expected one of {ops.BACKENDS}")
        if self.split not in ("val", "test"):
            raise ConfigError(f"--split {self.split!r}: expected val or test")
        if self.attention_out is not None and not self.eval_only:
            raise ConfigError("--attention_out applies with --eval_only")
        if self.attention_limit < 0:
            raise ConfigError(f"--attention_limit must be >= 0, got {self.attention_limit}")
        if self.eval_only and not self.checkpoint_file:
            raise ConfigError("--eval_only needs --checkpoint_file")
        if self.eval_only and (self.resume or self.overwrite):
            flag = "--resume" if self.resume else "--overwrite"
            raise ConfigError(f"--eval_only does not train: {flag} does not apply to it")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out_dir, --overwrite replaces it")
        if self.allow_resume_changes and not self.resume:
            raise ConfigError("--allow_resume_changes applies only with --resume")


def parse_device(name: str) -> torch.device | None:
    """The device a --device value names (None for auto); ConfigError if it names none."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:<index>") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: this project runs on cpu or cuda")
    return device


def resolve_device(name: str, launch: Launch | None = None) -> torch.device:
    """The device of --device ``name`` on this machine; ConfigError if it is not here.
    Under torchrun (``launch`` of several ranks) a CUDA run uses cuda:<LOCAL_RANK>: one
    GPU per rank, as torchrun's --nproc_per_node counts them."""
    device = parse_device(name)
    launch = launch or Launch()
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if launch.distributed and device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"--device {name}: under torchrun each rank uses cuda:<LOCAL_RANK>; "
                "pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES"
            )
        device = torch.device("cuda", launch.local_rank)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def run_paths(model_cfg: RWMNConfig, cfg: TrainConfig) -> tuple[str, str]:
    """The run directory and the checkpoint directory."""
    out_dir = cfg.out_dir or os.path.join("runs", cfg.name or f"rwmn_{model_cfg.data_source}")
    return out_dir, cfg.checkpoint_dir or os.path.join(out_dir, "checkpoints")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y", "t"):
        return True
    if value.lower() in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


MODEL_HELP = {
    "data_source": "story source: text (sub, dvs, script, plot) or video_sub (rgb + subtitles)",
    "dim_text": "dimension of the text features (questions, answers, text stories)",
    "dim_memory": "memory dimension d (output of the shared embedding)",
    "dim_mcb": "video_sub: CBP output dimension of the rgb x subtitle story embedding",
    "dim_rgb": "video_sub: rgb feature dimension (ResNet-152 2048, Inception 1536)",
    "dim_sub": "video_sub: subtitle feature dimension",
    "num_answer": "answer candidates per question",
    "num_hop": "read hops (the query becomes u' between hops)",
    "sharp": "sharpening of the read attention's softmax (finite)",
    "reg": "L2 regularisation strength: reg * sum of ||param||^2 / 2 (>= 0)",
    "write": 'write network: "k-s-c/k-s-c/..." (kernel height, stride, channels); "" = none',
    "read": 'read network: "k-s-c/k-s-c/..." (kernel height, stride, channels); "" = none',
    "alpha": "weight of the read output in the answer query u' (1 - alpha on the question)",
    "legacy": "reproduce the released TensorFlow code's quirks (docs/model.md)",
    "cbp_hash": "CBP hashes: random (torch's generator, seeded by --seed) or tensorflow (the "
    "TF CBP layer's numpy draw, seeds 1, 3, 5, 7)",
}
TRAIN_HELP = {
    "batch_size": "questions per step: up to this many, about one random movie",
    "max_steps": "train until the run's step count reaches this; with --resume it is the "
    "run's total, not a number of further steps, so raise it to train a finished run on",
    "learning_rate_decay_examples": "multiply the learning rate by --learning_rate_decay_rate "
    "every this many steps (staircase)",
    "validation_step": "every this many steps: a progress line, a validation batch",
    "full_validation_step": "every this many steps: evaluate the whole val split, keep "
    "checkpoints/best.pt, count early stopping",
    "checkpoint_step": "every this many steps: write checkpoints/last.pt (also at step 0 "
    "and at the end)",
    "early_stop": "stop after this many full validations in a row without improvement; "
    "with --resume, raise it to train an early-stopped run on",
    "init_lr": "Adagrad learning rate (>= 0)",
    "init_accumulator_value": "Adagrad initial accumulator value (>= 0)",
    "learning_rate_decay_rate": "learning-rate decay factor (> 0)",
    "save_threshold": "write checkpoints/best.pt only when the full validation accuracy "
    "reaches this",
    "name": "run name (default: rwmn_<data_source>); the run directory is runs/<name> "
    "unless --out_dir is given",
    "checkpoint_dir": "checkpoint directory (default: <out_dir>/checkpoints)",
    "pretrain": "initialise a new run's weights from this checkpoint (default: none)",
    "checkpoint_file": "the checkpoint --eval_only evaluates (default: none)",
}
MOVIES_PER_STEP_HELP = (
    "movies each process trains on per optimizer step: gradient accumulation over K "
    "batches of --batch_size questions (loss / K each), the same update as K torchrun "
    "ranks; a step is world size x K movies (docs/cli.md#several-processes-torchrun)"
)


def build_parser(quiet: bool = False) -> argparse.ArgumentParser:
    """train.py's parser; ``quiet``: errors exit 2 without a message (ranks other than 0)."""
    parser = OneLineParser(
        prog="train.py",
        quiet=quiet,
        description="Train or evaluate a Read-Write Memory Network on MovieQA features "
        "(or, with no --data_dir, on a default synthetic data set). Documentation: "
        "docs/cli.md.",
        formatter_class=HelpFormatter,
    )
    model_defaults, train_defaults = RWMNConfig(), TrainConfig()
    m = parser.add_argument_group("model (release flags)")
    m.add_argument(
        "--data_source",
        default=model_defaults.data_source,
        choices=DATA_SOURCES,
        help=MODEL_HELP["data_source"],
    )
    for name in ("dim_text", "dim_memory", "dim_mcb", "dim_rgb", "dim_sub", "num_answer",
                 "num_hop"):  # fmt: skip
        m.add_argument(
            f"--{name}", type=int, default=getattr(model_defaults, name), help=MODEL_HELP[name]
        )
    for name in ("sharp", "reg"):
        m.add_argument(
            f"--{name}", type=float, default=getattr(model_defaults, name), help=MODEL_HELP[name]
        )
    for name in ("write", "read"):
        m.add_argument(f"--{name}", default=getattr(model_defaults, name), help=MODEL_HELP[name])
    m.add_argument(
        "--video_features", type=_bool, nargs="?", const=True, default=None,
        help="the release's Video+Sub switch; must agree with --data_source video_sub "
        "(default: implied by --data_source)",
    )  # fmt: skip
    x = parser.add_argument_group("model (this implementation)")
    x.add_argument("--alpha", type=float, default=model_defaults.alpha, help=MODEL_HELP["alpha"])
    x.add_argument("--legacy", action="store_true", help=MODEL_HELP["legacy"])
    x.add_argument(
        "--cbp_hash",
        default=model_defaults.cbp_hash,
        choices=("random", "tensorflow"),
        help=MODEL_HELP["cbp_hash"],
    )

    t = parser.add_argument_group("training (release flags)")
    for name in ("batch_size", "max_steps", "learning_rate_decay_examples", "validation_step",
                 "full_validation_step", "checkpoint_step", "early_stop"):  # fmt: skip
        t.add_argument(
            f"--{name}", type=int, default=getattr(train_defaults, name), help=TRAIN_HELP[name]
        )
    for name in ("init_lr", "init_accumulator_value", "learning_rate_decay_rate",
                 "save_threshold"):  # fmt: skip
        t.add_argument(
            f"--{name}", type=float, default=getattr(train_defaults, name), help=TRAIN_HELP[name]
        )
    for name in ("name", "checkpoint_dir", "pretrain", "checkpoint_file"):
        t.add_argument(f"--{name}", default=None, help=TRAIN_HELP[name])

    r = parser.add_argument_group("run (this implementation)")
    r.add_argument(
        "--data_dir", default=None,
        help="data in the release layout, docs/data.md (default: a synthetic data set, "
        "generated once into $RWMN_CACHE or ~/.cache/rwmn)",
    )  # fmt: skip
    r.add_argument(
        "--out_dir", default=None,
        help="run directory: config.json, metrics.jsonl, checkpoints/ (default: runs/<name>); "
        "a new run refuses a directory that holds a run (see --resume, --overwrite)",
    )  # fmt: skip
    r.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out_dir from checkpoints/last.pt, bit-exactly. Flags "
        "not given take the checkpoint's values; a given flag that differs is refused (see "
        "--allow_resume_changes) unless it is --max_steps, --early_stop, --device, "
        "--backend, --compile, --tensorboard or --nvtx. A run that reached --max_steps or "
        "stopped early is reported and not trained on (raise the flag to go on)",
    )  # fmt: skip
    r.add_argument(
        "--allow_resume_changes", action="store_true",
        help="with --resume: apply the given flags that differ from the checkpoint's "
        "(--batch_size, --init_lr, the decay, the step intervals, --save_threshold, "
        "--data_dir, --amp, --sharp, --alpha, --reg), each logged and recorded in "
        "config.json, instead of refusing them",
    )  # fmt: skip
    r.add_argument(
        "--overwrite", action="store_true",
        help="start a new run in an --out_dir that holds one, deleting its config.json, "
        "metrics.jsonl, tensorboard/ and checkpoints (other files are kept)",
    )  # fmt: skip
    r.add_argument(
        "--device",
        default="auto",
        help="auto (cuda if available, else cpu), cpu, cuda or cuda:<index>",
    )
    r.add_argument(
        "--amp",
        default="off",
        choices=tuple(AMP_DTYPES),
        help="mixed precision of the forward pass (fp16 uses a gradient scaler)",
    )
    r.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    r.add_argument(
        "--compile_mode", default="default", choices=COMPILE_MODES,
        help="torch.compile mode with --compile: default, reduce-overhead (CUDA graphs on "
        "CUDA) or max-autotune",
    )  # fmt: skip
    r.add_argument(
        "--data_cache", default="auto", choices=CACHE_MODES,
        help="where the train and val data are served from after being read and checked "
        "once before the first step: device (GPU memory; on a CPU run, memory), host "
        "(pinned host memory), none (read from HDF5 per batch) or auto (device if it fits "
        "in half the free GPU memory, else host if in half the available RAM, else none; "
        "the first log line says which and why)",
    )  # fmt: skip
    r.add_argument(
        "--data_dtype", default="fp32", choices=tuple(DATA_DTYPES),
        help="dtype the story, question and answer features are stored and copied in "
        "(bf16, fp16: half the memory; upcast to fp32 on the device)",
    )  # fmt: skip
    r.add_argument(
        "--prefetch", type=_bool, default=True, metavar="{true,false}",
        help="prepare the next batch (draw, gather, copy to the device on a side CUDA "
        "stream) while the current step runs; the batches are the same either way",
    )  # fmt: skip
    r.add_argument(
        "--backend", default=None, choices=ops.BACKENDS,
        help="reference (plain PyTorch), triton (fused kernels, CUDA) or auto (triton on "
        "CUDA where installed) (default: $RWMN_BACKEND, else auto)",
    )  # fmt: skip
    r.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initialisation and the batch samplers, in [0, 2**63)",
    )
    r.add_argument(
        "--movies_per_step", type=int, default=train_defaults.movies_per_step,
        help=MOVIES_PER_STEP_HELP,
    )  # fmt: skip
    r.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write tensorboard events to <out_dir>/tensorboard",
    )
    r.add_argument(
        "--nvtx", action="store_true",
        help="NVTX ranges (domain rwmn: model stages, data/step/validation/checkpoint) for nsys",
    )  # fmt: skip
    r.add_argument(
        "--eval_only", action="store_true",
        help="evaluate --checkpoint_file on --split and write "
        "<out_dir>/predictions_<split>.txt; no training. Model flags not given take the "
        "checkpoint's values",
    )  # fmt: skip
    r.add_argument(
        "--split", default="val", choices=("val", "test"), help="the split --eval_only evaluates"
    )
    r.add_argument(
        "--attention_out", default=None, metavar="DIR",
        help="with --eval_only: a PNG per question of what the model reads (attention per "
        "hop over memory slots and story elements, candidate scores) and DIR/index.html "
        "(default: none)",
    )  # fmt: skip
    r.add_argument(
        "--attention_limit", type=int, default=0, metavar="N",
        help="--attention_out: pictures of the first N questions only (0: every question)",
    )  # fmt: skip

    u = parser.add_argument_group(
        "release flags its code never used",
        "Accepted so that old command lines run, reported as unused, no effect: "
        + ", ".join(f"--{name}" for name in UNUSED_RELEASE_FLAGS)
        + ".",
    )
    for name in UNUSED_RELEASE_FLAGS:
        u.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    return parser


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the flags given on the command line (the others are defaults)."""
    unset = object()
    dests = vars(parser.parse_args(argv))
    namespace = argparse.Namespace(**dict.fromkeys(dests, unset))
    parser.parse_args(argv, namespace=namespace)  # defaults are not set over present names
    return {name for name, value in vars(namespace).items() if value is not unset}


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(RWMNConfig))
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def configs_from_args(args: argparse.Namespace) -> tuple[RWMNConfig, TrainConfig, list[str]]:
    values = vars(args)
    unused = [f"--{name}" for name in UNUSED_RELEASE_FLAGS if values.get(name) is not None]
    model_cfg = RWMNConfig(**{k: values[k] for k in MODEL_FIELDS})
    train_cfg = TrainConfig(**{k: values[k] for k in TRAIN_FIELDS})
    return model_cfg, train_cfg, unused


def check_video_features(video_features: bool | None, model_cfg: RWMNConfig) -> None:
    if video_features is not None and video_features != model_cfg.video:
        raise ConfigError(
            f"--video_features {video_features} disagrees with --data_source "
            f"{model_cfg.data_source}: the data source selects video+subtitle mode"
        )


def _show(value) -> str:
    return repr(value) if isinstance(value, str) or value is None else str(value)


def _saved_model_config(state: dict, path: str) -> RWMNConfig:
    try:
        return RWMNConfig.from_dict(state["model_config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path!r} holds an invalid model_config: {exc}") from exc


def checkpoint_model_config(state: dict, path: str, values: dict, given: set[str]) -> RWMNConfig:
    """The checkpoint's model configuration; model flags given must agree with it."""
    saved = _saved_model_config(state, path)
    diff = [
        f"--{name} {_show(values[name])} (checkpoint: {_show(getattr(saved, name))})"
        for name in MODEL_FIELDS
        if name in given and values[name] != getattr(saved, name)
    ]
    if diff:
        raise CheckpointError(
            f"checkpoint {path!r} was written for another model configuration: " + ", ".join(diff)
        )
    return saved


def load_checkpoint(path: str, model_cfg: RWMNConfig | None = None) -> dict:
    """Read a checkpoint safely; with ``model_cfg``, check it was written for that model."""
    state = checkpoint.read(path)
    if model_cfg is not None:
        _check_model_config(state, path, model_cfg)
    return state


def _check_model_config(state: dict, path: str, model_cfg: RWMNConfig) -> None:
    saved, ours = state["model_config"], model_cfg.to_dict()
    diff = [
        f"--{k} {_show(ours[k])} (checkpoint: {_show(saved.get(k))})"
        for k in ours
        if saved.get(k) != ours[k]
    ]
    if diff:
        raise CheckpointError(
            f"checkpoint {path!r} was written for another model configuration: " + ", ".join(diff)
        )


@dataclass
class ResumePoint:
    """A validated last.pt, how it looked on disk when read, and the flags that change."""

    path: str
    state: dict
    stamp: tuple[int, int, int]
    changes: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, path: str) -> ResumePoint:
        stamp = _stamp(path)
        state = checkpoint.read(path)
        checkpoint.check_resumable(state, path)
        return cls(path, state, stamp)


def check_world_size(state: dict, path: str, world_size: int) -> None:
    """Refuse to resume a run with another number of processes: each rank's batch streams
    and running sums are in the checkpoint, one per rank of the run that wrote it."""
    saved = state.get("world_size", 1)
    if saved != world_size:
        raise CheckpointError(
            f"--resume: {path!r} was written by a run of {saved} process(es) (world size "
            f"{saved}) and this launch has {world_size}; resume it with the same world size "
            "(torchrun --nnodes x --nproc_per_node), or start a new run"
        )


def _stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def resume_configs(
    point: ResumePoint, values: dict, given: set[str], flags: TrainConfig
) -> tuple[RWMNConfig, TrainConfig, list[dict]]:
    """The configuration a resumed run continues with: the checkpoint's, with the flags
    given applied as FREE_ON_RESUME and CHANGEABLE_ON_RESUME allow, and the changes made.
    ``flags`` is this invocation's configuration, for the INVOCATION_FIELDS."""
    path, state = point.path, point.state
    saved_model = _saved_model_config(state, path)
    saved = state["train_config"]
    unknown = sorted(set(saved) - set(TRAIN_FIELDS))
    if unknown:
        raise CheckpointError(f"checkpoint {path!r}: unknown train_config fields {unknown}")
    try:
        saved_train = TrainConfig(**{k: v for k, v in saved.items() if k not in INVOCATION_FIELDS})
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path!r} holds an invalid train_config: {exc}") from exc
    step = state["step"]
    model_updates, train_updates = {}, {}
    changes, refused, never = [], [], []
    allow = flags.allow_resume_changes
    for name in sorted(given):
        if name in MODEL_FIELDS:
            old, updates = getattr(saved_model, name), model_updates
        elif name in TRAIN_FIELDS and name not in INVOCATION_FIELDS:
            old, updates = getattr(saved_train, name), train_updates
        else:
            continue
        new = values[name]
        if new == old:
            continue
        change = {"step": step, "flag": f"--{name}", "from": old, "to": new}
        text = f"--{name} {_show(new)} (checkpoint: {_show(old)})"
        if name in FREE_ON_RESUME or (name in CHANGEABLE_ON_RESUME and allow):
            updates[name] = new
            changes.append(change)
        elif name in CHANGEABLE_ON_RESUME:
            refused.append(text)
        else:
            never.append(text)
    if never:
        raise ConfigError(
            f"--resume: these flags cannot change within a run: {', '.join(never)} "
            f"(checkpoint {path!r}); drop them to continue the run, or start a new one "
            "(--overwrite or another --out_dir)"
        )
    if refused:
        raise ConfigError(
            f"--resume: these flags differ from the checkpoint {path!r}: {', '.join(refused)}; "
            "drop them to continue as the run began, or add --allow_resume_changes to apply them"
        )
    invocation = {k: getattr(flags, k) for k in INVOCATION_FIELDS}
    model_cfg = dataclasses.replace(saved_model, **model_updates)
    train_cfg = dataclasses.replace(saved_train, **train_updates, **invocation)
    return model_cfg, train_cfg, changes


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    acc: float | None
    loss: float | None
    predictions: list[tuple[str, int]]


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from exc
    return SummaryWriter


def _no_forward_buffer_sync() -> dict:
    """DDP's flag for not broadcasting buffers before each forward: forward_sync_buffers
    where this torch has it (2.13 deprecates broadcast_buffers), else broadcast_buffers."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class Trainer:
    """One process's part of a run: the whole run with one process, one rank's under
    torchrun (``comm``; rank 0 alone logs and writes files, see rwmn.distributed)."""

    def __init__(
        self, model_cfg: RWMNConfig, cfg: TrainConfig, log=print, comm: Comm | None = None
    ) -> None:
        self.model_cfg, self.cfg = model_cfg, cfg
        self.comm = comm if comm is not None else Comm(Launch())
        self.is_main = self.comm.is_main
        self.log = log if self.is_main else _quiet
        self.device = resolve_device(cfg.device, self.comm.launch)
        self.out_dir, self.ckpt_dir = run_paths(model_cfg, cfg)
        if cfg.data_dir is None:
            from rwmn.data.synthetic import ensure_default

            # Rank 0 generates the default data set first; the others then find it.
            self.comm.on_main((DataError,), lambda: ensure_default(model_cfg.data_source))
            self.data_dir = ensure_default(model_cfg.data_source)
        else:
            self.data_dir = cfg.data_dir

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = RWMN(model_cfg).to(self.device)
        # torch.compile on the model, DDP around the compiled model, as PyTorch's "where to
        # apply torch.compile" documents; evaluations call the compiled model directly.
        self.compiled = compile_model(self.model, cfg.compile_mode) if cfg.compile else self.model
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.forward = self.compiled
        if self.comm.distributed:
            # broadcast_buffers=False: the buffers (CBP hashes) are equal on every rank from
            # the seed, and an evaluation on rank 0 alone must not wait for a broadcast.
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.compiled,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **_no_forward_buffer_sync(),
            )
            self.forward = self.ddp
        # CUDA graphs replay into the same output buffers: each step starts a new generation.
        self.mark_step = cfg.compile and cfg.compile_mode == "reduce-overhead"
        self.mark_step = self.mark_step and self.device.type == "cuda"
        self.optimizer, self.optimizer_impl = make_adagrad(
            self.model.parameters(),
            self.device,
            lr=cfg.init_lr,
            initial_accumulator_value=cfg.init_accumulator_value,
        )
        decay, rate = cfg.learning_rate_decay_examples, cfg.learning_rate_decay_rate
        # One scheduler step per optimizer update: the schedule counts global steps.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: rate ** (step // decay)
        )
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        # Movie k of this rank's step comes from slot rank * K + k (rwmn.distributed).
        first = self.comm.rank * cfg.movies_per_step
        self.samplers = [slot_sampler(cfg.seed, first + k) for k in range(cfg.movies_per_step)]
        self.val_sampler = np.random.default_rng(cfg.seed + 1)
        self.step = 0
        self.best_acc = -math.inf
        self.bad_evals = 0
        # Running sums of the training loss, accuracy and questions since the last progress
        # line, on the device; checkpointed so a resumed run logs what the uninterrupted
        # one would.
        self.running = RunningMetrics(self.device)
        self.data_dtype = DATA_DTYPES[cfg.data_dtype]
        self.batches: list[Prefetcher | NoPrefetch] | None = None  # one feed per slot
        # Training time: `start` and `window_t` are perf_counter origins, moved back on
        # resume by the seconds the checkpoint recorded, so time continues across resumes.
        self.start = self.window_t = time.perf_counter()
        self.changes: list[dict] = []  # flags changed on --resume, with the step
        self.writer = None  # a tensorboard SummaryWriter with --tensorboard

    @property
    def sampler(self) -> np.random.Generator:
        """The first slot's sampler (the only one of a single-movie, single-process run)."""
        return self.samplers[0]

    # -- data ----------------------------------------------------------------------------
    def data(self, split: str) -> MovieQAData:
        c = self.model_cfg
        return MovieQAData(
            self.data_dir, c.data_source, split, c.dim_text, c.dim_rgb, c.dim_sub, c.num_answer
        )

    def sources(self, *splits: str) -> list[BatchSource]:
        """The batch sources of ``splits``: every movie read and checked now (a bad one is
        a DataError before the first step), cached as --data_cache says, which the first
        log line reports."""
        datas = [self.data(split) for split in splits]
        nbytes = sum(split_nbytes(d, self.data_dtype) for d in datas)
        plan = plan_cache(self.cfg.data_cache, nbytes, self.device)
        self.log(plan.line(self.cfg.data_dtype))
        return [
            build_source(d, plan, self.data_dtype, self.device, ReadProgress(d, self.log))
            for d in datas
        ]

    # -- state ---------------------------------------------------------------------------
    def window(self) -> dict:
        """The running sums of every rank (summed in rank order: a single process's
        exactly); raises FloatingPointError if a step's loss was not finite on any rank.
        One host synchronisation (and, under torchrun, one all-gather)."""
        rows = self.comm.all_gather(self.running.vector()).tolist()
        loss, correct, bad_step, bad_loss, questions = combine_windows(rows)
        if bad_step is not None:
            raise FloatingPointError(
                f"step {bad_step}: the loss is {bad_loss} (found at step {self.step})"
            )
        return {"loss": loss, "acc": correct, "questions": questions}

    def check_finite(self) -> None:
        """Raise FloatingPointError naming the first step since the last progress line
        whose loss was not finite (one host synchronisation)."""
        self.window()

    def sampler_state(self) -> list[dict]:
        """Each slot's sampler state, before any batch drawn ahead by the prefetchers."""
        if self.batches is not None:
            return [feed.sampler_state() for feed in self.batches]
        return [copy.deepcopy(s.bit_generator.state) for s in self.samplers]

    def rank_state(self) -> dict:
        """What differs between ranks: the running sums and the random states."""
        samplers = self.sampler_state()
        return {
            "window": self.running.state(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy_sampler": samplers[0],
                "numpy_samplers": samplers,
                "numpy_val_sampler": self.val_sampler.bit_generator.state,
                "python": random.getstate(),
            },
        }

    def state_dict(self) -> dict | None:
        """The checkpoint (on rank 0; None on the others). Every rank must call it: the
        ranks' running sums and random states are gathered to rank 0."""
        self.window()  # a non-finite loss on any rank: no checkpoint
        ranks = self.comm.gather(self.rank_state())
        if not self.is_main:
            return None
        now = time.perf_counter()
        state = {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model_cfg.to_dict(),
            "train_config": dataclasses.asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_acc": self.best_acc,
            "bad_evals": self.bad_evals,
            "window": ranks[0]["window"],
            "seconds": now - self.start,
            "window_seconds": now - self.window_t,
            "changes": list(self.changes),
            "rng": ranks[0]["rng"],
            "world_size": self.comm.world_size,
        }
        if self.comm.distributed:
            state["ranks"] = ranks
        return state

    def load_state_dict(self, state: dict, path: str = "checkpoint") -> None:
        """Restore a checkpoint's training state (checked by checkpoint.check_resumable);
        under torchrun this rank's part of it."""

        def restore(part: str, apply: Callable[[], object]) -> None:
            try:
                apply()
            except Exception as exc:  # an untrusted file: name it and the part
                raise CheckpointError(
                    f"checkpoint {path!r}: cannot restore {part} ({one_line(exc)})"
                ) from exc

        check_world_size(state, path, self.comm.world_size)
        mine = state["ranks"][self.comm.rank] if self.comm.distributed else state
        restore("model", lambda: self.model.load_state_dict(state["model"]))
        restore("optimizer", lambda: self.optimizer.load_state_dict(state["optimizer"]))
        restore("scheduler", lambda: self.scheduler.load_state_dict(state["scheduler"]))
        if self.scaler.is_enabled() and state["scaler"]:  # empty: saved without fp16
            restore("scaler", lambda: self.scaler.load_state_dict(state["scaler"]))
        self.step, self.best_acc, self.bad_evals = (
            state["step"], float(state["best_acc"]), state["bad_evals"],
        )  # fmt: skip
        self.running.load(mine["window"])
        now = time.perf_counter()
        self.start = now - state.get("seconds", 0.0)
        self.window_t = now - state.get("window_seconds", 0.0)
        self.changes = list(state.get("changes", []))
        rng = mine["rng"]
        restore("rng/torch", lambda: torch.set_rng_state(rng["torch"]))
        if rng.get("cuda") is not None and torch.cuda.is_available():
            restore("rng/cuda", lambda: torch.cuda.set_rng_state_all(rng["cuda"]))

        def numpy_states() -> None:
            samplers = rng.get("numpy_samplers", [rng["numpy_sampler"]])
            if len(samplers) != len(self.samplers):
                raise ValueError(
                    f"{len(samplers)} sampler state(s) for --movies_per_step {len(self.samplers)}"
                )
            for sampler, saved in zip(self.samplers, samplers, strict=True):
                sampler.bit_generator.state = saved
            self.val_sampler.bit_generator.state = rng["numpy_val_sampler"]

        restore("rng/numpy", numpy_states)
        restore("rng/python", lambda: random.setstate(rng["python"]))

    def _follow_schedule_flags(self) -> None:
        """After a checkpoint with another --init_lr or decay was restored (resume with
        --allow_resume_changes): the learning rate from this run's flags, from now on."""
        lr_at = self.scheduler.lr_lambdas[0]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.init_lr
            group["lr"] = self.cfg.init_lr * lr_at(self.scheduler.last_epoch)
        self.scheduler.base_lrs = [self.cfg.init_lr] * len(self.optimizer.param_groups)

    @nvtx_range("checkpoint", "train")
    def save(self, name: str) -> str:
        """Write checkpoints/``name`` atomically (rank 0; every rank must call it)."""
        path = os.path.join(self.ckpt_dir, name)
        state = self.state_dict()
        if state is not None:
            atomic_save(state, path)
        return path

    def load_weights(self, path: str) -> None:
        state = load_checkpoint(path, self.model_cfg)
        self.model.load_state_dict(state["model"])

    # -- steps ---------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _run(self, batch: QABatch, forward: Callable | None = None):
        """Logits and loss of ``batch`` through ``forward`` (default: the compiled model,
        without DDP: evaluations)."""
        # Features stored in bf16 or fp16 (--data_dtype) are upcast here, on the device.
        batch = batch.to(self.device).features(torch.float32)
        if self.mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast():
            forward = self.compiled if forward is None else forward
            logits = forward(batch.story, batch.query, batch.answers)
        loss = None if batch.target is None else self.model.loss(logits, batch.target)
        return logits, loss

    def train_step(self, batches: QABatch | list[QABatch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on ``batches`` (--movies_per_step of them, or one batch):
        the gradient of the mean of their losses (each backward of loss / K; under DDP,
        which averages the ranks' gradients, the first K - 1 without synchronising), then
        one Adagrad and scheduler step. Each batch's loss and correct answers are added to
        the running sums. Queues device work only: nothing here waits for the device
        (with --amp fp16, torch's GradScaler reads its overflow check every step)."""
        batches = [batches] if isinstance(batches, QABatch) else list(batches)
        count = len(batches)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for k, batch in enumerate(batches):
            accumulate = self.ddp is not None and k < count - 1
            with self.ddp.no_sync() if accumulate else contextlib.nullcontext():
                logits, loss = self._run(batch, self.forward)
                self.scaler.scale(loss / count if count > 1 else loss).backward()
            correct = (logits.detach().argmax(-1) == batch.target.to(logits.device)).sum()
            self.running.add(self.step + 1, loss, correct, len(batch.qids))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return loss.detach(), correct

    def _sum(self, rows: torch.Tensor, total: int) -> tuple[float, float]:
        """Accuracy and mean loss from per-batch rows (correct answers, loss * questions):
        one host read; the same sum in every process count (see evaluate_split)."""
        correct, loss = rows.sum(0).tolist()
        return correct / total, loss / total

    @torch.no_grad()
    def evaluate(self, batches: Iterator[QABatch]) -> EvalResult:
        """Accuracy and loss over ``batches`` (in this process), summed on the device and
        read once at the end (evaluations run at progress lines, not inside steps)."""
        self.model.eval()
        predictions, qids, rows, has_targets = [], [], [], True
        for batch in batches:
            logits, loss = self._run(batch)
            pred = logits.argmax(-1)
            predictions.append(pred)
            qids.extend(batch.qids)
            if batch.target is None:
                has_targets = False
                continue
            rows.append(self._row(pred, loss, batch))
        answers = torch.cat(predictions).tolist() if predictions else []
        pairs = list(zip(qids, answers, strict=True))
        if not has_targets or not rows:
            return EvalResult(None, None, pairs)
        acc, loss = self._sum(torch.stack(rows), len(qids))
        return EvalResult(acc, loss, pairs)

    @staticmethod
    def _row(pred: torch.Tensor, loss: torch.Tensor, batch: QABatch) -> torch.Tensor:
        correct = (pred == batch.target.to(pred.device)).sum().to(torch.float64)
        return torch.stack([correct, loss.detach().to(torch.float64) * len(pred)])

    @torch.no_grad()
    def evaluate_split(self, source: BatchSource) -> EvalResult:
        """Every question of ``source`` once (full validation), sharded over the ranks:
        rank r evaluates the movies i with i % world_size == r. Each batch's (correct,
        loss * questions) goes to its row of a table of all the split's batches in their
        single-process order; the table is all-reduced (each row is non-zero on one rank,
        so the sum is exact) and summed as one process sums it: the same accuracy and loss,
        bit for bit, for any number of processes."""
        self.model.eval()
        size = self.cfg.batch_size
        per_movie = [math.ceil(count / size) for count in source.counts]
        first = np.concatenate([[0], np.cumsum(per_movie)]).astype(np.int64)
        mine = range(self.comm.rank, len(source.counts), self.comm.world_size)
        rows = torch.zeros((int(first[-1]), 2), dtype=torch.float64, device=self.device)
        index = [int(first[m]) + j for m in mine for j in range(per_movie[m])]
        values = []
        for batch in source.iter_batches(size, movies=mine):
            logits, loss = self._run(batch)
            values.append(self._row(logits.argmax(-1), loss, batch))
        if values:
            where = torch.tensor(index, dtype=torch.int64).to(self.device)
            rows.index_copy_(0, where, torch.stack(values))
        self.comm.all_reduce_sum(rows)
        acc, loss = self._sum(rows, source.num_questions)
        return EvalResult(acc, loss, [])

    # -- logging -------------------------------------------------------------------------
    def record(self, split: str, acc: float | None, loss: float | None, **extra) -> None:
        """A metrics.jsonl row (and tensorboard scalars): rank 0 only."""
        if not self.is_main:
            return
        row = {
            "step": self.step,
            "split": split,
            "acc": acc,
            "loss": loss,
            "seconds": round(time.perf_counter() - self.start, 3),
            **extra,
        }
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None and acc is not None:
            self.writer.add_scalar(f"{split}/acc", acc, self.step)
            self.writer.add_scalar(f"{split}/loss", loss, self.step)

    def _write_config(self) -> None:
        config = {
            "model": self.model_cfg.to_dict(),
            "train": dataclasses.asdict(self.cfg),
            "data_dir": self.data_dir,
            "out_dir": self.out_dir,
            "checkpoint_dir": self.ckpt_dir,
            "device": str(self.device),
            "backend": ops.get_backend(),
            "world_size": self.comm.world_size,
            "changes": self.changes,
        }
        atomic_write_text(os.path.join(self.out_dir, "config.json"), json.dumps(config, indent=2))

    # -- the loop ------------------------------------------------------------------------
    def _not_training(self, state: dict) -> str | None:
        """Why a resumed run has nothing to do (it stopped early or reached --max_steps)."""
        cfg, step, bad = self.cfg, state["step"], state["bad_evals"]
        if bad >= cfg.early_stop:
            return (
                f"the run in {self.out_dir} stopped early at step {step}: {bad} full "
                f"validations without improvement (--early_stop {cfg.early_stop}); not "
                f"training. Raise --early_stop above {bad} to train it on."
            )
        if step >= cfg.max_steps:
            return (
                f"the run in {self.out_dir} is complete at step {step} (--max_steps "
                f"{cfg.max_steps}); not training. Raise --max_steps to train it on."
            )
        return None

    def _lock(self, stack: contextlib.ExitStack) -> None:
        stack.enter_context(RunLock(self.out_dir))
        out, ckpt = os.path.abspath(self.out_dir), os.path.abspath(self.ckpt_dir)
        if os.path.commonpath([out, ckpt]) != out:  # --checkpoint_dir outside the run dir
            stack.enter_context(RunLock(self.ckpt_dir))

    def _read_resume_point(self) -> ResumePoint:
        last = os.path.join(self.ckpt_dir, "last.pt")
        if not os.path.isfile(last):
            raise CheckpointError(f"--resume: no checkpoint {last!r} to resume from")
        resume = ResumePoint.read(last)
        _check_model_config(resume.state, last, self.model_cfg)
        check_world_size(resume.state, last, self.comm.world_size)
        return resume

    def fit(self, resume: ResumePoint | None = None) -> dict:
        """Train a new run, or continue ``resume`` (read from last.pt by the caller, or
        here when ``cfg.resume`` is set). Everything that can be refused is checked before
        the run directory is written; under torchrun rank 0 alone reads and writes the
        run directory and every rank stops at the same check (rwmn.distributed)."""
        cfg, comm = self.cfg, self.comm
        if cfg.resume and resume is None:
            resume = comm.on_main(ERRORS, self._read_resume_point)
        if resume is not None:
            reason = self._not_training(resume.state)
            if reason is not None:
                self.log(reason)
                state = resume.state
                return {"step": state["step"], "best_acc": state["best_acc"], "trained": False}
        writer_class = None

        def check_run_dir() -> dict | None:
            nonlocal writer_class
            rundir.check_directory_flag(self.out_dir, "--out_dir")
            rundir.check_directory_flag(self.ckpt_dir, "--checkpoint_dir")
            if resume is None and not cfg.overwrite:
                self._refuse_existing_run()
            writer_class = _summary_writer_class() if cfg.tensorboard else None
            if resume is None and cfg.pretrain:
                return load_checkpoint(cfg.pretrain, self.model_cfg)
            return None

        pretrained = comm.on_main(ERRORS, check_run_dir)
        train, val = comm.phase(ERRORS, lambda: self.sources("train", "val"))  # every movie
        if pretrained is not None:
            self.log(f"initialising from --pretrain {cfg.pretrain}")
        with contextlib.ExitStack() as locks:

            def lock() -> None:
                self._lock(locks)
                if resume is not None and _stamp(resume.path) != resume.stamp:
                    raise CheckpointError(
                        f"{resume.path!r} changed while this run started (another run?); run again"
                    )
                if resume is None and not cfg.overwrite:
                    self._refuse_existing_run()  # again, under the lock

            comm.on_main(ERRORS, lock)
            if resume is not None:
                comm.phase(ERRORS, lambda: self._continue(resume))
            else:
                comm.phase(ERRORS, lambda: self._load_pretrained(pretrained))
            comm.on_main(ERRORS, lambda: self._prepare_run_dir(resume))
            if resume is None:
                self.save("last.pt")  # resumable from its first moment
            if self.is_main:
                self._write_config()
                if writer_class is not None:
                    # Events after the checkpoint's step were logged by the killed process.
                    purge = self.step + 1 if resume is not None else None
                    self.writer = writer_class(os.path.join(self.out_dir, "tensorboard"),
                                               purge_step=purge)  # fmt: skip
            try:
                return self._train(train, val)
            finally:
                if self.writer is not None:
                    self.writer.close()

    def _refuse_existing_run(self) -> None:
        existing = rundir.run_files(self.out_dir, self.ckpt_dir)
        if existing:
            names = ", ".join(os.path.relpath(p, self.out_dir) for p in existing)
            raise RunDirError(
                f"--out_dir {self.out_dir!r} holds a run ({names}): add --resume to continue "
                "it or --overwrite to replace it, or choose another --out_dir"
            )

    def _load_pretrained(self, pretrained: dict | None) -> None:
        """--pretrain's weights (read by rank 0, on every rank), before --overwrite deletes
        anything."""
        if pretrained is None:
            return
        try:
            self.model.load_state_dict(pretrained["model"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"--pretrain {self.cfg.pretrain!r}: cannot load its weights ({one_line(exc)})"
            ) from exc

    def _prepare_run_dir(self, resume: ResumePoint | None) -> None:
        """Rank 0, under the lock, once the state is loaded: --overwrite's deletions, a
        resumed run's metrics.jsonl cut back to its checkpoint, temporary files of a
        killed run removed."""
        if resume is None and self.cfg.overwrite:
            removed = rundir.remove_run(self.out_dir, self.ckpt_dir)
            if removed:
                names = ", ".join(os.path.relpath(p, self.out_dir) for p in removed)
                self.log(f"--overwrite: removed the previous run's {names}")
        if resume is not None:
            dropped = rundir.truncate_metrics(
                os.path.join(self.out_dir, "metrics.jsonl"), self.step
            )
            self.log(
                f"resumed from {resume.path} at step {self.step}"
                + (f"; dropped {dropped} metrics.jsonl line(s) logged after it" if dropped else "")
            )
        removed = rundir.remove_temp_files(self.out_dir, self.ckpt_dir)
        if removed:
            self.log(f"removed {len(removed)} temporary file(s) of a killed run")

    def _continue(self, resume: ResumePoint) -> None:
        self.load_state_dict(resume.state, resume.path)
        self.changes += resume.changes
        for change in resume.changes:
            self.log(
                f"--resume: {change['flag']} {_show(change['to'])} "
                f"(checkpoint: {_show(change['from'])})"
            )
        if {c["flag"] for c in resume.changes} & {"--init_lr", "--learning_rate_decay_examples",
                                                   "--learning_rate_decay_rate"}:  # fmt: skip
            self._follow_schedule_flags()

    def _train(self, train: BatchSource, val: BatchSource) -> dict:
        cfg, comm = self.cfg, self.comm
        processes = (
            f"{comm.world_size} processes x {cfg.movies_per_step} movie(s) per step"
            if comm.distributed or cfg.movies_per_step > 1
            else "1 process"
        )
        self.log(
            f"training on {train.num_questions} questions ({len(train.movies)} movies), "
            f"validating on {val.num_questions}; {self.device}, backend {ops.get_backend()}, "
            f"amp {cfg.amp}, Adagrad {self.optimizer_impl}, "
            f"{sum(p.numel() for p in self.model.parameters())} parameters; {processes}; "
            f"run directory {self.out_dir}"
        )
        feed = Prefetcher if cfg.prefetch else NoPrefetch
        self.batches = [feed(train, s, cfg.batch_size, self.device) for s in self.samplers]
        try:
            return self._steps(val)
        finally:
            self.batches = None

    def _steps(self, val: BatchSource) -> dict:
        cfg = self.cfg
        stopped = "max_steps"
        while self.step < cfg.max_steps:
            ahead = self.step + 1 < cfg.max_steps
            with nvtx_range("data", "train"):
                batches = [feed.next(draw_ahead=ahead) for feed in self.batches]
            with nvtx_range("step", "train"):
                self.train_step(batches)
            if self.step % cfg.validation_step == 0:
                window = self.window()  # the one synchronisation between progress lines
                elapsed = time.perf_counter() - self.window_t
                q = window["questions"]
                tl, ta = window["loss"] / q, window["acc"] / q
                self.record("train", ta, tl, questions_per_second=round(q / elapsed, 1))
                if self.is_main:  # one validation batch, on rank 0 (no collective)
                    batch = val.random_batch(self.val_sampler, cfg.batch_size)
                    with nvtx_range("validation", "train"):
                        v = self.evaluate(iter([batch]))
                    self.record("val_batch", v.acc, v.loss)
                    if self.writer is not None:
                        from rwmn.visualize import tensorboard_summaries

                        tensorboard_summaries(self.writer, self.model, batch, self.step,
                                              self.device)  # fmt: skip
                    self.log(
                        f"step {self.step:5d}/{cfg.max_steps} | loss {tl:.4f} | acc {ta:.3f} | "
                        f"val batch acc {v.acc:.3f} | {q / elapsed:7.1f} q/s | "
                        f"{cfg.validation_step / elapsed:5.2f} steps/s | "
                        f"lr {self.scheduler.get_last_lr()[0]:.2e}"
                    )
                self.running.reset()
                self.window_t = time.perf_counter()
            if self.step % cfg.full_validation_step == 0:
                with nvtx_range("validation", "train"):
                    v = self.evaluate_split(val)  # sharded; the same result on every rank
                self.record("val", v.acc, v.loss)
                improved = v.acc > self.best_acc
                self.log(
                    f"step {self.step:5d} | full validation acc {v.acc:.4f} loss {v.loss:.4f}"
                    + (" (best)" if improved else "")
                )
                if improved:
                    self.best_acc, self.bad_evals = v.acc, 0
                    if v.acc >= cfg.save_threshold:
                        self.save("best.pt")
                else:
                    self.bad_evals += 1
                if self.bad_evals >= cfg.early_stop:
                    stopped = f"early stop after {self.bad_evals} full validations without gain"
                    break
            if self.step % cfg.checkpoint_step == 0:
                self.save("last.pt")
        self.save("last.pt")
        seconds = time.perf_counter() - self.start
        best = (
            f"best full validation accuracy {self.best_acc:.4f}"
            if math.isfinite(self.best_acc)
            else f"no full validation ran (every --full_validation_step {cfg.full_validation_step})"
        )
        self.log(f"done at step {self.step} ({stopped}) in {seconds:.1f} s; {best}")
        return {"step": self.step, "best_acc": self.best_acc, "seconds": seconds, "trained": True}

    def run_eval(self, state: dict | None = None, path: str | None = None) -> EvalResult:
        """Evaluate a checkpoint (``state``, read from ``path``; by default
        ``--checkpoint_file``) on ``--split`` and write predictions_<split>.txt."""
        cfg = self.cfg
        path = path or cfg.checkpoint_file
        state = state if state is not None else load_checkpoint(path, self.model_cfg)
        rundir.check_directory_flag(self.out_dir, "--out_dir")
        if cfg.attention_out is not None:
            from rwmn.visualize import check_can_draw

            rundir.check_directory_flag(cfg.attention_out, "--attention_out")
            check_can_draw()
        data = ReadPerBatch(self.data(cfg.split), self.data_dtype, check=False)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path!r}: cannot load ({one_line(exc)})") from exc
        result = self.evaluate(data.iter_batches(cfg.batch_size))
        if cfg.attention_out is not None:
            from rwmn import visualize

            records = visualize.attention_records(
                self.model, data.iter_batches(cfg.batch_size), self.device, self._autocast
            )
            pictures = visualize.write_attention_pictures(
                records, self.model_cfg, cfg.attention_out, cfg.attention_limit
            )
            self.log(f"wrote {len(pictures)} attention pictures and index.html to "
                     f"{cfg.attention_out}")  # fmt: skip
        out = os.path.join(self.out_dir, f"predictions_{cfg.split}.txt")
        atomic_write_text(out, "".join(f"{qid} {answer}\n" for qid, answer in result.predictions))
        acc = "n/a (no cor_idx)" if result.acc is None else f"{result.acc:.4f}"
        self.log(f"{cfg.split}: {len(result.predictions)} questions, accuracy {acc}; wrote {out}")
        return result


# --------------------------------------------------------------------------------------
# train.py
# --------------------------------------------------------------------------------------

ERRORS = (ConfigError, DataError, CheckpointError, RunDirError, ops.BackendUnavailableError)


def _quiet(_message: str) -> None:
    """The log of ranks other than 0: rank 0 alone reports."""


def main(argv: list[str] | None = None) -> int:
    """train.py: 0 on success, 2 with one line ``train.py: error: ...`` on bad input.
    Under torchrun every rank runs this; the line comes from one rank only."""
    try:
        launch = Launch.from_environment()
    except ConfigError as exc:
        print(f"train.py: error: {one_line(exc)}", file=sys.stderr)
        return 2
    parser = build_parser(quiet=not launch.is_main)
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    values = vars(args)
    try:
        # Checks of the command line alone: the same on every rank, reported by rank 0.
        model_cfg, cfg, unused = configs_from_args(args)
        if cfg.eval_only and launch.distributed:
            raise ConfigError(
                "--eval_only evaluates in one process: run python train.py, not torchrun"
            )
    except ERRORS as exc:
        if launch.is_main:
            print(f"train.py: error: {one_line(exc)}", file=sys.stderr)
        return 2
    if unused and launch.is_main:
        print(
            "warning: release flags accepted for compatibility but unused: " + ", ".join(unused),
            file=sys.stderr,
        )
    try:
        with Comm(launch) as comm:
            _main(comm, model_cfg, cfg, args, values, given)
    except PeerError:  # another rank failed and said why
        return 2
    except ERRORS as exc:
        print(f"train.py: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def _main(
    comm: Comm,
    model_cfg: RWMNConfig,
    cfg: TrainConfig,
    args: argparse.Namespace,
    values: dict,
    given: set[str],
) -> None:
    out_dir, ckpt_dir = run_paths(model_cfg, cfg)
    cfg = dataclasses.replace(cfg, out_dir=out_dir)  # fixed before a resume's merge

    def read_checkpoint() -> tuple[RWMNConfig, TrainConfig, dict | None, ResumePoint | None]:
        """Rank 0: the checkpoint to evaluate or resume, and the configuration it gives."""
        state, resume, model, train = None, None, model_cfg, cfg
        if cfg.eval_only:
            state = checkpoint.read(cfg.checkpoint_file)
            model = checkpoint_model_config(state, cfg.checkpoint_file, values, given)
        elif cfg.resume:
            last = os.path.join(ckpt_dir, "last.pt")
            if not os.path.isfile(last):
                hint = (
                    " (it was killed before its first checkpoint: start it again with --overwrite)"
                    if rundir.run_files(out_dir, ckpt_dir)
                    else ""
                )
                raise CheckpointError(f"--resume: no checkpoint {last!r} to resume from{hint}")
            resume = ResumePoint.read(last)
            check_world_size(resume.state, last, comm.world_size)
            model, train, resume.changes = resume_configs(resume, values, given, cfg)
        rundir.check_directory_flag(out_dir, "--out_dir")
        rundir.check_directory_flag(ckpt_dir, "--checkpoint_dir")
        return model, train, state, resume

    model_cfg, cfg, state, resume = comm.on_main(ERRORS, read_checkpoint)

    def check() -> None:
        check_video_features(args.video_features, model_cfg)
        ops.check_device(resolve_device(cfg.device, comm.launch), cfg.backend)

    comm.phase(ERRORS, check)
    backend = ops.use_backend(cfg.backend) if cfg.backend else contextlib.nullcontext()
    nvtx = nvtx_enabled() if cfg.nvtx else contextlib.nullcontext()
    with backend, nvtx:
        trainer = comm.phase(ERRORS, lambda: Trainer(model_cfg, cfg, comm=comm))
        if cfg.eval_only:
            trainer.run_eval(state, cfg.checkpoint_file)
        else:
            trainer.fit(resume)
