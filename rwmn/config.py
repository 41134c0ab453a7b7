"""Typed configuration of the RWMN model (docs/model.md sections 1-6).

May import: the standard library only.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass

TEXT_SOURCES = ("sub", "dvs", "script", "plot")
VIDEO_SOURCES = ("video_sub",)
DATA_SOURCES = TEXT_SOURCES + VIDEO_SOURCES
CBP_HASHES = ("random", "tensorflow")


class ConfigError(ValueError):
    """A configuration value (a flag) is malformed or inconsistent."""


def _has_type(value, kind) -> bool:
    if kind is type(None):
        return value is None
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def check_field_types(config) -> None:
    """Raise ConfigError unless every field of the dataclass ``config`` holds a value of its
    annotated type (a config read from a checkpoint is untrusted; argparse types flags)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        kind, value = hints[field.name], getattr(config, field.name)
        kinds = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
        if not any(_has_type(value, k) for k in kinds):
            names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise ConfigError(f"--{field.name}: expected {names}, got {value!r}")


def check_finite(config, *names: str, minimum: float | None = None) -> None:
    """Raise ConfigError unless the float fields ``names`` are finite (and >= minimum)."""
    for name in names:
        value = getattr(config, name)
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            bound = f" >= {minimum:g}" if minimum is not None else ""
            raise ConfigError(f"--{name} must be a finite number{bound}, got {value}")


@dataclass(frozen=True)
class LayerSpec:
    """One write/read conv layer: kernel height, stride height, output channels."""

    kernel: int
    stride: int
    channels: int

    def __str__(self) -> str:
        return f"{self.kernel}-{self.stride}-{self.channels}"


def parse_layer_spec(spec: str, flag: str = "--write") -> tuple[LayerSpec, ...]:
    """Parse "k-s-c/k-s-c/..." into layers; the empty string means no layer.

    >>> parse_layer_spec("40-30-3")
    (LayerSpec(kernel=40, stride=30, channels=3),)
    """
    spec = spec.strip()
    if not spec:
        return ()
    layers = []
    for part in spec.split("/"):
        fields = part.strip().split("-")
        try:
            values = [int(f) for f in fields]
        except ValueError:
            values = []
        if len(values) != 3 or min(values) < 1:
            raise ConfigError(
                f"{flag} {spec!r}: layer {part!r} is not of the form k-s-c with three positive "
                "integers (kernel height, stride height, channels), e.g. 40-30-3/3-1-3"
            )
        layers.append(LayerSpec(*values))
    return tuple(layers)


@dataclass(frozen=True)
class RWMNConfig:
    """Everything that determines the model's parameters and its forward pass.

    Defaults are the release's (docs/cli.md); ``legacy`` switches on the released
    TensorFlow code's quirks (docs/model.md section 6).
    """

    data_source: str = "sub"
    dim_text: int = 300
    dim_memory: int = 300
    dim_rgb: int = 2048
    dim_sub: int = 300
    dim_mcb: int = 4096
    num_answer: int = 5
    num_hop: int = 1
    sharp: float = 1.0
    alpha: float = 0.5
    write: str = "40-30-3"
    read: str = "3-1-3"
    reg: float = 0.0
    legacy: bool = False
    #: "random": hashes drawn from torch's generator at construction (seeded by the run's
    #: --seed); "tensorflow": the TF CBP layer's numpy draw with seeds 1, 3, 5, 7.
    cbp_hash: str = "random"

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.data_source not in DATA_SOURCES:
            raise ConfigError(
                f"--data_source {self.data_source!r}: expected one of {', '.join(DATA_SOURCES)}"
            )
        if self.cbp_hash not in CBP_HASHES:
            raise ConfigError(f"--cbp_hash {self.cbp_hash!r}: expected one of {CBP_HASHES}")
        for name in ("dim_text", "dim_memory", "dim_rgb", "dim_sub", "dim_mcb", "num_answer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.num_hop < 1:
            raise ConfigError(f"--num_hop must be at least 1, got {self.num_hop}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must be in [0, 1], got {self.alpha}")
        check_finite(self, "sharp")
        check_finite(self, "reg", minimum=0.0)
        parse_layer_spec(self.write, "--write")
        parse_layer_spec(self.read, "--read")

    @property
    def video(self) -> bool:
        return self.data_source in VIDEO_SOURCES

    @property
    def write_layers(self) -> tuple[LayerSpec, ...]:
        return parse_layer_spec(self.write, "--write")

    @property
    def read_layers(self) -> tuple[LayerSpec, ...]:
        return parse_layer_spec(self.read, "--read")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RWMNConfig:
        if not isinstance(values, dict):
            raise ConfigError(f"a model configuration must be a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown RWMNConfig fields: {', '.join(unknown)}")
        return cls(**values)
