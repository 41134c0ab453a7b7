"""The Trainer: one process's part of a run (its steps, evaluations, checkpoints and the
fit loop) behind ``train.py`` (docs/cli.md).

The run directory (--out_dir, see rwmn.rundir) holds config.json, metrics.jsonl (one JSON
row per evaluation), checkpoints/last.pt (for --resume) and checkpoints/best.pt (best full
validation accuracy); run.lock keeps a second live run out. Checkpoints (rwmn.checkpoint)
hold the model, optimizer, scheduler, grad scaler, step, early-stopping state, elapsed time,
config and every RNG state; they are written atomically and read with weights_only=True.
last.pt is written at step 0, so a run can be resumed from its first moment; a resumed run
cuts metrics.jsonl back to the checkpoint's step, so after any number of kills and resumes
the log, the weights and the checkpoints equal an uninterrupted run's.

The input pipeline: every movie of the train and val splits is read and checked
before the first step and served from memory (rwmn.data.cache, --data_cache); the next
batch is prepared while a step runs (rwmn.data.prefetch); a step queues device work only:
the loss and accuracy are summed on the device and read, with the check for a non-finite
loss, at each --validation_step (rwmn.loop), so the host never waits on the device
between progress lines.

Under torchrun (rwmn.distributed) each rank runs this loop on its own movies
(--movies_per_step of them per step, from per-slot streams), DDP averages the gradients,
and rank 0 alone logs and writes the run directory; a checkpoint also holds the world
size and every rank's running sums and random states, and full validation is sharded.

May import: torch, rwmn's config, model, ops, data, loop, distributed, profiling,
checkpoint, rundir, cli (one_line), visualize (lazily), rwmn.train_config and rwmn.resume;
not train.py's command line (rwmn.train_cli, rwmn.training), which builds on it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from rwmn import checkpoint, ops, rundir
from rwmn.checkpoint import CheckpointError, atomic_save, atomic_write_text
from rwmn.cli import one_line
from rwmn.config import ConfigError, RWMNConfig
from rwmn.data.cache import (
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
from rwmn.distributed import Comm, Launch, slot_sampler
from rwmn.graphs import GraphSteps
from rwmn.loop import RunningMetrics, backward, combine_windows, compile_model, make_adagrad
from rwmn.model import RWMN
from rwmn.profiling import nvtx_range
from rwmn.resume import (
    ResumePoint,
    check_model_config,
    check_world_size,
    file_stamp,
    load_checkpoint,
    read_run_checkpoint,
    show_value,
)
from rwmn.rundir import RunDirError, RunLock
from rwmn.train_config import (
    AMP_DTYPES,
    TrainConfig,
    check_cuda_graphs_device,
    resolve_device,
    run_paths,
)

CHECKPOINT_FORMAT = checkpoint.FORMAT
#: The errors train.py reports as one line (exit status 2); every rank stops at them.
ERRORS = (ConfigError, DataError, CheckpointError, RunDirError, ops.BackendUnavailableError)


def _quiet(_message: str) -> None:
    """The log of ranks other than 0: rank 0 alone reports."""


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
        # --cuda_graphs: each training step replayed from a CUDA graph (rwmn.graphs).
        self.graphs: GraphSteps | None = None
        if cfg.cuda_graphs:
            check_cuda_graphs_device(cfg, self.device, self.comm.launch)
            try:
                self.graphs = GraphSteps(
                    self.model, self.optimizer, cfg.batch_size, self.amp_dtype, self.device
                )
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
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
        if self.graphs is not None:  # the optimizer's state tensors are replaced
            self.graphs.reset()
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
        if self.graphs is not None:  # one movie per step (TrainConfig checks it)
            (batch,) = batches
            loss, correct = self.graphs.step(batch.to(self.device))
            self.running.add(self.step + 1, loss, correct, len(batch.qids))
            self.scheduler.step()
            self.step += 1
            return loss, correct
        self.optimizer.zero_grad(set_to_none=True)
        for k, batch in enumerate(batches):
            accumulate = self.ddp is not None and k < count - 1
            with self.ddp.no_sync() if accumulate else contextlib.nullcontext():
                logits, loss = self._run(batch, self.forward)
                backward(self.scaler.scale(loss), 1.0 / count)
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
        """last.pt of a Trainer built with ``cfg.resume`` (train.py reads it before building
        the Trainer): read and checked by resume.read_run_checkpoint as train.py does, with
        no flags given, and checked against this Trainer's model configuration."""
        _, _, _, resume = read_run_checkpoint(
            self.model_cfg, self.cfg, self.ckpt_dir, self.comm.world_size, {}, set()
        )
        check_model_config(resume.state, resume.path, self.model_cfg)
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
                if resume is not None and file_stamp(resume.path) != resume.stamp:
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
                f"--resume: {change['flag']} {show_value(change['to'])} "
                f"(checkpoint: {show_value(change['from'])})"
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
