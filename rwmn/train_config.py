"""The run's configuration apart from the model: :class:`TrainConfig`, the --device rules,
and where a run's files go.

May import: torch, rwmn.config, rwmn.ops, rwmn.data.cache, rwmn.loop, rwmn.distributed
(nothing that imports it back: the command line, the resume rules and the trainer build
on this module).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from rwmn import ops
from rwmn.config import ConfigError, RWMNConfig, check_field_types, check_finite
from rwmn.data.cache import CACHE_MODES, DATA_DTYPES
from rwmn.distributed import Launch
from rwmn.loop import COMPILE_MODES

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    cuda_graphs: bool = False
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
        if self.cuda_graphs:
            check_cuda_graphs_flags(self)
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


def check_cuda_graphs_flags(cfg: TrainConfig) -> None:
    """What --cuda_graphs does not combine with (it captures one eager step of one movie
    with no host synchronisation in it)."""
    if cfg.compile:
        raise ConfigError(
            "--cuda_graphs captures the eager step and does not combine with --compile "
            "(for inductor's CUDA graphs use --compile --compile_mode reduce-overhead)"
        )
    if cfg.amp == "fp16":
        raise ConfigError(
            "--cuda_graphs does not combine with --amp fp16 (its gradient scaler reads an "
            "overflow flag on the host every step); use --amp bf16 or off"
        )
    if cfg.movies_per_step != 1:
        raise ConfigError(
            f"--cuda_graphs captures one movie per step; --movies_per_step must be 1, got "
            f"{cfg.movies_per_step}"
        )


def check_cuda_graphs_device(cfg: TrainConfig, device: torch.device, launch: Launch) -> None:
    """--cuda_graphs needs a CUDA device and one process."""
    if not cfg.cuda_graphs:
        return
    if device.type != "cuda":
        raise ConfigError(
            f"--cuda_graphs needs a CUDA device (this run's device is {device}); CUDA is "
            + ("not available on this machine" if not torch.cuda.is_available() else "not chosen")
        )
    if launch.distributed:
        raise ConfigError("--cuda_graphs runs in one process: not under torchrun")


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


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(RWMNConfig))
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
