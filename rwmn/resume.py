"""The rules of --resume and --eval_only's checkpoint: which flags a resumed run may
change, the configuration it continues with, the checkpoint it continues from
(:class:`ResumePoint`) and the checks that it fits this launch (model, world size).

May import: rwmn.checkpoint, rwmn.config, rwmn.rundir, rwmn.train_config.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from rwmn import checkpoint, rundir
from rwmn.checkpoint import CheckpointError
from rwmn.config import ConfigError, RWMNConfig
from rwmn.train_config import MODEL_FIELDS, TRAIN_FIELDS, TrainConfig

#: TrainConfig fields that belong to one invocation of train.py: never taken from a
#: checkpoint's configuration on --resume.
INVOCATION_FIELDS = frozenset({
    "out_dir", "name", "checkpoint_dir", "resume", "overwrite", "allow_resume_changes",
    "eval_only", "split", "checkpoint_file", "attention_out", "attention_limit",
})  # fmt: skip
#: Flags --resume accepts with a value other than the checkpoint's: where and how fast the
#: run computes, and how long it goes on. Each change is logged.
FREE_ON_RESUME = frozenset({
    "max_steps", "early_stop", "device", "backend", "compile", "compile_mode", "cuda_graphs",
    "tensorboard", "nvtx", "data_cache", "prefetch",
})  # fmt: skip
#: Flags --resume applies only with --allow_resume_changes (each logged); any other flag
#: (the seed, Adagrad's initial accumulator, --pretrain, the model's architecture) cannot
#: change within a run.
CHANGEABLE_ON_RESUME = frozenset({
    "batch_size", "init_lr", "learning_rate_decay_examples", "learning_rate_decay_rate",
    "validation_step", "full_validation_step", "checkpoint_step", "save_threshold",
    "data_dir", "amp", "data_dtype", "sharp", "alpha", "reg",
})  # fmt: skip


def show_value(value) -> str:
    """A flag's value as the messages show it (strings and None quoted as Python does)."""
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
        f"--{name} {show_value(values[name])} (checkpoint: {show_value(getattr(saved, name))})"
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
        check_model_config(state, path, model_cfg)
    return state


def check_model_config(state: dict, path: str, model_cfg: RWMNConfig) -> None:
    saved, ours = state["model_config"], model_cfg.to_dict()
    diff = [
        f"--{k} {show_value(ours[k])} (checkpoint: {show_value(saved.get(k))})"
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
        stamp = file_stamp(path)
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


def file_stamp(path: str) -> tuple[int, int, int]:
    """Inode, size and modification time: whether the file changed since it was read."""
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
        text = f"--{name} {show_value(new)} (checkpoint: {show_value(old)})"
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


def read_run_checkpoint(
    model_cfg: RWMNConfig,
    cfg: TrainConfig,
    ckpt_dir: str,
    world_size: int,
    values: dict,
    given: set[str],
) -> tuple[RWMNConfig, TrainConfig, dict | None, ResumePoint | None]:
    """The checkpoint to evaluate (--eval_only) or resume (--resume) and the configuration
    it gives, with the state read and the ResumePoint (None when it does not apply);
    without either flag, ``model_cfg`` and ``cfg`` as they are."""
    state, resume, model, train = None, None, model_cfg, cfg
    if cfg.eval_only:
        state = checkpoint.read(cfg.checkpoint_file)
        model = checkpoint_model_config(state, cfg.checkpoint_file, values, given)
    elif cfg.resume:
        last = os.path.join(ckpt_dir, "last.pt")
        if not os.path.isfile(last):
            hint = (
                " (it was killed before its first checkpoint: start it again with --overwrite)"
                if rundir.run_files(cfg.out_dir, ckpt_dir)
                else ""
            )
            raise CheckpointError(f"--resume: no checkpoint {last!r} to resume from{hint}")
        resume = ResumePoint.read(last)
        check_world_size(resume.state, last, world_size)
        model, train, resume.changes = resume_configs(resume, values, given, cfg)
    return model, train, state, resume
