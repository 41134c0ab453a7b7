"""train.py's entry point (also the ``rwmn-train`` console script): :func:`main` parses the
command line, reads the checkpoint a --resume or --eval_only run starts from, and runs the
Trainer (docs/cli.md).

Every check that can fail on a flag, a data file or a checkpoint runs before the run
directory is written; the command line reports it as one line (exit status 2).

The parts, each in its module: the run's configuration and device (rwmn.train_config),
the command line (rwmn.train_cli), the resume rules (rwmn.resume) and the Trainer with
its steps, evaluations, checkpoints and loop (rwmn.trainer). This module imports them and
re-exports the names code outside the package imports from it; nothing in rwmn imports it.

May import: rwmn.checkpoint, rwmn.cli, rwmn.config, rwmn.distributed, rwmn.ops,
rwmn.profiling, rwmn.resume, rwmn.rundir, rwmn.train_cli, rwmn.train_config, rwmn.trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys

from rwmn import ops, rundir
from rwmn.checkpoint import CheckpointError, atomic_save
from rwmn.cli import one_line
from rwmn.config import ConfigError, RWMNConfig
from rwmn.distributed import Comm, Launch, PeerError
from rwmn.profiling import nvtx_enabled
from rwmn.resume import ResumePoint, load_checkpoint, read_run_checkpoint
from rwmn.rundir import RunDirError
from rwmn.train_cli import (
    UNUSED_RELEASE_FLAGS,
    build_parser,
    check_video_features,
    configs_from_args,
    given_flags,
)
from rwmn.train_config import TrainConfig, check_cuda_graphs_device, resolve_device, run_paths
from rwmn.trainer import ERRORS, Trainer

__all__ = [
    "CheckpointError", "RunDirError", "TrainConfig", "Trainer", "UNUSED_RELEASE_FLAGS",
    "atomic_save", "build_parser", "load_checkpoint", "main",
]  # fmt: skip


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
        found = read_run_checkpoint(model_cfg, cfg, ckpt_dir, comm.world_size, values, given)
        rundir.check_directory_flag(out_dir, "--out_dir")
        rundir.check_directory_flag(ckpt_dir, "--checkpoint_dir")
        return found

    model_cfg, cfg, state, resume = comm.on_main(ERRORS, read_checkpoint)

    def check() -> None:
        check_video_features(args.video_features, model_cfg)
        device = resolve_device(cfg.device, comm.launch)
        ops.check_device(device, cfg.backend)
        check_cuda_graphs_device(cfg, device, comm.launch)

    comm.phase(ERRORS, check)
    backend = ops.use_backend(cfg.backend) if cfg.backend else contextlib.nullcontext()
    nvtx = nvtx_enabled() if cfg.nvtx else contextlib.nullcontext()
    with backend, nvtx:
        trainer = comm.phase(ERRORS, lambda: Trainer(model_cfg, cfg, comm=comm))
        if cfg.eval_only:
            trainer.run_eval(state, cfg.checkpoint_file)
        else:
            trainer.fit(resume)
