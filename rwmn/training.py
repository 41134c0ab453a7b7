"""Training and evaluation loop behind ``train.py`` (SPEC section 8).

The run directory (--out_dir) holds config.json, metrics.jsonl (one JSON object per
evaluation), checkpoints/last.pt (for --resume) and checkpoints/best.pt (best full
validation accuracy). Checkpoints hold the model, optimizer, scheduler, grad scaler, step,
early-stopping state, config and every RNG state, and are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from rwmn import ops
from rwmn.config import DATA_SOURCES, ConfigError, RWMNConfig
from rwmn.data.movieqa import DataError, MovieQAData, QABatch
from rwmn.model import RWMN
from rwmn.profiling import nvtx_enabled

CHECKPOINT_FORMAT = 1
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Release flags its code never used: accepted so old command lines run, reported as unused.
UNUSED_RELEASE_FLAGS = (
    "sub_with_video_features", "novideo_features", "bn_decay", "summary_step", "summary_dir",
    "summary_name", "model", "dropout", "num_val_examples", "num_test_examples",
    "dim_context", "num_memory_channel", "kernel_height", "dim_mcb_output",
    "num_params_level", "wconv_h", "wconv_w", "wstride_h", "wstride_w", "rconv_h",
    "rconv_w", "rstride_h", "rstride_w", "checkpoint_threshold", "init_acc",
)  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or from another configuration."""


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
    backend: str | None = None
    seed: int = 0
    resume: bool = False
    tensorboard: bool = False
    nvtx: bool = False
    eval_only: bool = False
    split: str = "val"

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "validation_step", "full_validation_step",
                     "checkpoint_step", "early_stop", "learning_rate_decay_examples"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.amp not in AMP_DTYPES:
            raise ConfigError(f"--amp {self.amp!r}: expected one of {tuple(AMP_DTYPES)}")
        if self.backend is not None and self.backend not in ops.BACKENDS:
            raise ConfigError(f"--backend {self.backend!r}: expected one of {ops.BACKENDS}")
        if self.eval_only and not self.checkpoint_file:
            raise ConfigError("--eval_only needs --checkpoint_file")
        if self.split not in ("val", "test"):
            raise ConfigError(f"--split {self.split!r}: expected val or test")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y", "t"):
        return True
    if value.lower() in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train or evaluate a Read-Write Memory Network on MovieQA features "
        "(or, with no --data_dir, on a default synthetic data set).",
    )
    model_defaults, train_defaults = RWMNConfig(), TrainConfig()
    m = parser.add_argument_group("model (release flags)")
    m.add_argument("--data_source", default=model_defaults.data_source, choices=DATA_SOURCES)
    for name in ("dim_text", "dim_memory", "dim_mcb", "dim_rgb", "dim_sub", "num_answer",
                 "num_hop"):  # fmt: skip
        m.add_argument(f"--{name}", type=int, default=getattr(model_defaults, name))
    m.add_argument("--sharp", type=float, default=model_defaults.sharp, help="softmax sharpening")
    m.add_argument("--reg", type=float, default=model_defaults.reg, help="L2 strength")
    m.add_argument("--write", default=model_defaults.write, help='"k-s-c/..."; "" = none')
    m.add_argument("--read", default=model_defaults.read, help='"k-s-c/..."; "" = none')
    m.add_argument(
        "--video_features", type=_bool, nargs="?", const=True, default=None,
        help="the release's Video+Sub switch: must agree with --data_source video_sub",
    )  # fmt: skip
    x = parser.add_argument_group("model (this implementation)")
    x.add_argument("--alpha", type=float, default=model_defaults.alpha)
    x.add_argument("--legacy", action="store_true", help="the released TF code's quirks")
    x.add_argument("--cbp_hash", default=model_defaults.cbp_hash, choices=("random", "tensorflow"))

    t = parser.add_argument_group("training (release flags)")
    for name in ("batch_size", "max_steps", "learning_rate_decay_examples", "validation_step",
                 "full_validation_step", "checkpoint_step", "early_stop"):  # fmt: skip
        t.add_argument(f"--{name}", type=int, default=getattr(train_defaults, name))
    for name in ("init_lr", "init_accumulator_value", "learning_rate_decay_rate",
                 "save_threshold"):  # fmt: skip
        t.add_argument(f"--{name}", type=float, default=getattr(train_defaults, name))
    for name in ("name", "checkpoint_dir", "pretrain", "checkpoint_file"):
        t.add_argument(f"--{name}", default=None)

    r = parser.add_argument_group("run (this implementation)")
    r.add_argument("--data_dir", default=None, help="release layout; default: synthetic data")
    r.add_argument("--out_dir", default=None, help="run directory (default runs/<name>)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    r.add_argument("--amp", default="off", choices=tuple(AMP_DTYPES))
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--backend", default=None, choices=ops.BACKENDS, help="default $RWMN_BACKEND")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoints")
    r.add_argument("--tensorboard", action="store_true")
    r.add_argument("--nvtx", action="store_true", help="NVTX ranges for nsys (CUDA only)")
    r.add_argument("--eval_only", action="store_true")
    r.add_argument("--split", default="val", choices=("val", "test"), help="with --eval_only")

    u = parser.add_argument_group("release flags its code never used (reported, no effect)")
    for name in UNUSED_RELEASE_FLAGS:
        u.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[RWMNConfig, TrainConfig, list[str]]:
    values = vars(args)
    unused = [f"--{name}" for name in UNUSED_RELEASE_FLAGS if values.get(name) is not None]
    if args.video_features is not None and args.video_features != (args.data_source == "video_sub"):
        raise ConfigError(
            f"--video_features {args.video_features} disagrees with --data_source "
            f"{args.data_source}: the data source selects video+subtitle mode"
        )
    model_fields = {f.name for f in dataclasses.fields(RWMNConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_cfg = RWMNConfig(**{k: v for k, v in values.items() if k in model_fields})
    train_cfg = TrainConfig(**{k: v for k, v in values.items() if k in train_fields})
    return model_cfg, train_cfg, unused


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, model_cfg: RWMNConfig | None = None) -> dict:
    """Read a checkpoint; with ``model_cfg``, check it was written for that configuration."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path!r} is not an rwmn checkpoint (format {CHECKPOINT_FORMAT})")
    if model_cfg is not None:
        saved = state["model_config"]
        ours = model_cfg.to_dict()
        diff = [
            f"--{k}: checkpoint {saved.get(k)!r}, this run {ours[k]!r}"
            for k in ours
            if saved.get(k) != ours[k]
        ]
        if diff:
            raise CheckpointError(
                f"checkpoint {path!r} was written for another model configuration:\n  "
                + "\n  ".join(diff)
            )
    return state


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


@dataclass
class EvalResult:
    acc: float | None
    loss: float | None
    predictions: list[tuple[str, int]]


class Trainer:
    def __init__(self, model_cfg: RWMNConfig, cfg: TrainConfig, log=print) -> None:
        self.model_cfg, self.cfg, self.log = model_cfg, cfg, log
        self.device = resolve_device(cfg.device)
        name = cfg.name or f"rwmn_{model_cfg.data_source}"
        self.out_dir = cfg.out_dir or os.path.join("runs", name)
        self.ckpt_dir = cfg.checkpoint_dir or os.path.join(self.out_dir, "checkpoints")
        if cfg.data_dir is None:
            from rwmn.data.synthetic import ensure_default

            self.data_dir = ensure_default(model_cfg.data_source)
        else:
            self.data_dir = cfg.data_dir

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = RWMN(model_cfg).to(self.device)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = torch.optim.Adagrad(
            self.model.parameters(),
            lr=cfg.init_lr,
            initial_accumulator_value=cfg.init_accumulator_value,
        )
        decay, rate = cfg.learning_rate_decay_examples, cfg.learning_rate_decay_rate
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: rate ** (step // decay)
        )
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.sampler = np.random.default_rng(cfg.seed)
        self.val_sampler = np.random.default_rng(cfg.seed + 1)
        self.step = 0
        self.best_acc = -math.inf
        self.bad_evals = 0
        # Running sums of the training loss, accuracy and questions since the last progress
        # line; checkpointed so a resumed run logs what the uninterrupted one would.
        self.window = {"loss": 0.0, "acc": 0.0, "questions": 0}
        self.start = time.perf_counter()
        self.writer = None  # a tensorboard SummaryWriter with --tensorboard

    # -- data ----------------------------------------------------------------------------
    def data(self, split: str) -> MovieQAData:
        c = self.model_cfg
        return MovieQAData(
            self.data_dir, c.data_source, split, c.dim_text, c.dim_rgb, c.dim_sub, c.num_answer
        )

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
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
            "window": dict(self.window),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy_sampler": self.sampler.bit_generator.state,
                "numpy_val_sampler": self.val_sampler.bit_generator.state,
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_acc, self.bad_evals = (
            state["step"], state["best_acc"], state["bad_evals"],
        )  # fmt: skip
        self.window = dict(state["window"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.sampler.bit_generator.state = rng["numpy_sampler"]
        self.val_sampler.bit_generator.state = rng["numpy_val_sampler"]
        random.setstate(rng["python"])

    def save(self, name: str) -> str:
        path = os.path.join(self.ckpt_dir, name)
        atomic_save(self.state_dict(), path)
        return path

    def load_weights(self, path: str) -> None:
        state = load_checkpoint(path, self.model_cfg)
        self.model.load_state_dict(state["model"])

    # -- steps ---------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _run(self, batch: QABatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch = batch.to(self.device)
        with self._autocast():
            logits = self.forward(batch.story, batch.query, batch.answers)
        loss = None if batch.target is None else self.model.loss(logits, batch.target)
        return logits, loss

    def train_step(self, batch: QABatch) -> tuple[float, float]:
        self.model.train()
        logits, loss = self._run(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {self.step}: the loss is {loss.item()}")
        acc = (logits.argmax(-1) == batch.target.to(logits.device)).float().mean()
        return loss.item(), acc.item()

    @torch.no_grad()
    def evaluate(self, batches: Iterator[QABatch]) -> EvalResult:
        self.model.eval()
        correct = total = 0
        loss_sum, predictions, has_targets = 0.0, [], True
        for batch in batches:
            logits, loss = self._run(batch)
            pred = logits.argmax(-1).cpu()
            predictions.extend(zip(batch.qids, pred.tolist(), strict=True))
            if batch.target is None:
                has_targets = False
                continue
            correct += int((pred == batch.target).sum())
            total += len(pred)
            loss_sum += loss.item() * len(pred)
        if not has_targets or total == 0:
            return EvalResult(None, None, predictions)
        return EvalResult(correct / total, loss_sum / total, predictions)

    # -- logging -------------------------------------------------------------------------
    def record(self, split: str, acc: float | None, loss: float | None, **extra) -> None:
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

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        train, val = self.data("train"), self.data("val")
        os.makedirs(self.out_dir, exist_ok=True)
        last = os.path.join(self.ckpt_dir, "last.pt")
        if cfg.resume:
            if not os.path.isfile(last):
                raise CheckpointError(f"--resume: no checkpoint {last!r} to resume from")
            self.load_state_dict(load_checkpoint(last, self.model_cfg))
            self.log(f"resumed from {last} at step {self.step}")
        elif cfg.pretrain:
            self.load_weights(cfg.pretrain)
            self.log(f"initialised from --pretrain {cfg.pretrain}")
        with open(os.path.join(self.out_dir, "config.json"), "w") as f:
            json.dump(
                {"model": self.model_cfg.to_dict(), "train": dataclasses.asdict(cfg),
                 "data_dir": self.data_dir, "device": str(self.device),
                 "backend": ops.get_backend()}, f, indent=2)  # fmt: skip
        self.log(
            f"training on {train.num_questions} questions ({len(train.movies)} movies), "
            f"validating on {val.num_questions}; {self.device}, backend {ops.get_backend()}, "
            f"amp {cfg.amp}, {sum(p.numel() for p in self.model.parameters())} parameters; "
            f"run directory {self.out_dir}"
        )
        window, window_t = self.window, time.perf_counter()
        stopped = "max_steps"
        while self.step < cfg.max_steps:
            batch = train.random_batch(self.sampler, cfg.batch_size)
            loss, acc = self.train_step(batch)
            n = len(batch.qids)
            window["loss"] += loss * n
            window["acc"] += acc * n
            window["questions"] += n
            if self.step % cfg.validation_step == 0:
                elapsed = time.perf_counter() - window_t
                q = window["questions"]
                tl, ta = window["loss"] / q, window["acc"] / q
                self.record("train", ta, tl, questions_per_second=round(q / elapsed, 1))
                v = self.evaluate(iter([val.random_batch(self.val_sampler, cfg.batch_size)]))
                self.record("val_batch", v.acc, v.loss)
                self.log(
                    f"step {self.step:5d}/{cfg.max_steps} | loss {tl:.4f} | acc {ta:.3f} | "
                    f"val batch acc {v.acc:.3f} | {q / elapsed:7.1f} q/s | "
                    f"{cfg.validation_step / elapsed:5.2f} steps/s | "
                    f"lr {self.scheduler.get_last_lr()[0]:.2e}"
                )
                window.update(loss=0.0, acc=0.0, questions=0)
                window_t = time.perf_counter()
            if self.step % cfg.full_validation_step == 0:
                v = self.evaluate(val.iter_batches(cfg.batch_size))
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
        self.log(
            f"done at step {self.step} ({stopped}) in {seconds:.1f} s; "
            f"best full validation accuracy {self.best_acc:.4f}"
        )
        return {"step": self.step, "best_acc": self.best_acc, "seconds": seconds}

    def run_eval(self) -> EvalResult:
        cfg = self.cfg
        self.load_weights(cfg.checkpoint_file)
        data = self.data(cfg.split)
        result = self.evaluate(data.iter_batches(cfg.batch_size))
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"predictions_{cfg.split}.txt")
        with open(path, "w") as f:
            f.writelines(f"{qid} {answer}\n" for qid, answer in result.predictions)
        acc = "n/a (no cor_idx)" if result.acc is None else f"{result.acc:.4f}"
        self.log(f"{cfg.split}: {len(result.predictions)} questions, accuracy {acc}; wrote {path}")
        return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model_cfg, cfg, unused = configs_from_args(args)
        if unused:
            print(
                "warning: release flags accepted for compatibility but unused: "
                + ", ".join(unused),
                file=sys.stderr,
            )
        backend = ops.use_backend(cfg.backend) if cfg.backend else contextlib.nullcontext()
        nvtx = nvtx_enabled() if cfg.nvtx else contextlib.nullcontext()
        with backend, nvtx:
            trainer = Trainer(model_cfg, cfg)
            if cfg.eval_only:
                trainer.run_eval()
                return 0
            if cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:
                    raise ConfigError(
                        "--tensorboard needs the tensorboard package: pip install tensorboard"
                    ) from exc
                trainer.writer = SummaryWriter(os.path.join(trainer.out_dir, "tensorboard"))
            trainer.fit()
    except (ConfigError, DataError, CheckpointError, ops.BackendUnavailableError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    return 0
