"""train.py's command line: the parser and its help, the flags given, the configurations
they make, and the release flags that are accepted but unused.

The small helpers every command line here shares (one-line errors, the help format) are
in rwmn.cli, which imports nothing of rwmn so that the data modules can use it.
May import: rwmn.cli, rwmn.config, rwmn.ops, rwmn.data.cache, rwmn.loop,
rwmn.train_config.
"""

from __future__ import annotations

import argparse

from rwmn import ops
from rwmn.cli import HelpFormatter, OneLineParser
from rwmn.config import DATA_SOURCES, ConfigError, RWMNConfig
from rwmn.data.cache import CACHE_MODES, DATA_DTYPES
from rwmn.loop import COMPILE_MODES
from rwmn.train_config import AMP_DTYPES, MODEL_FIELDS, TRAIN_FIELDS, TrainConfig

# Release flags its code never used: accepted so old command lines run, reported as unused.
UNUSED_RELEASE_FLAGS = (
    "sub_with_video_features", "novideo_features", "bn_decay", "summary_step", "summary_dir",
    "summary_name", "model", "dropout", "num_val_examples", "num_test_examples",
    "dim_context", "num_memory_channel", "kernel_height", "dim_mcb_output",
    "num_params_level", "wconv_h", "wconv_w", "wstride_h", "wstride_w", "rconv_h",
    "rconv_w", "rstride_h", "rstride_w", "checkpoint_threshold", "init_acc",
)  # fmt: skip


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
        "--backend, --compile, --cuda_graphs, --tensorboard or --nvtx. A run that reached "
        "--max_steps or stopped early is reported and not trained on (raise the flag to go on)",
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
        "--cuda_graphs", action="store_true",
        help="capture each training step (forward, backward, Adagrad step) as a CUDA graph "
        "and replay it: batches padded to a few bucket shapes with exact masks, one graph "
        "per shape (docs/cli.md#cuda-graphs). Needs CUDA; not with --compile, --amp fp16, "
        "--movies_per_step > 1 or torchrun",
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
