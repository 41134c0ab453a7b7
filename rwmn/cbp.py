"""CompactBilinearPooling: the nn.Module around ``rwmn.ops.cbp``.

May import: numpy, torch, rwmn.ops.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rwmn import ops

#: numpy seeds of the TensorFlow CBP layer's hash draw: h1, s1, h2, s2.
TENSORFLOW_SEEDS = (1, 3, 5, 7)


def tensorflow_hashes(n1: int, n2: int, out_dim: int) -> tuple[torch.Tensor, ...]:
    """The TF layer's draw: np.random.seed(k); randint(D, size=n) for h, 2*randint(2)-1 for s."""
    draws = []
    for seed, (size, is_sign) in zip(
        TENSORFLOW_SEEDS, ((n1, False), (n1, True), (n2, False), (n2, True)), strict=True
    ):
        np.random.seed(seed)
        if is_sign:
            draws.append(torch.from_numpy(2 * np.random.randint(2, size=size) - 1).float())
        else:
            draws.append(torch.from_numpy(np.random.randint(out_dim, size=size)).long())
    return tuple(draws)


def random_hashes(
    n1: int, n2: int, out_dim: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, ...]:
    """h uniform in [0, out_dim), s uniform in {-1, +1}, from torch's generator."""

    def hash_(n: int) -> torch.Tensor:
        return torch.randint(out_dim, (n,), generator=generator)

    def sign(n: int) -> torch.Tensor:
        return torch.randint(2, (n,), generator=generator).float() * 2 - 1

    return hash_(n1), sign(n1), hash_(n2), sign(n2)


class CompactBilinearPooling(nn.Module):
    """CBP(x, y) of x [..., n1] and y [..., n2] into out_dim; hashes are buffers h1, s1, h2, s2."""

    def __init__(self, n1: int, n2: int, out_dim: int, hashes: str = "random") -> None:
        super().__init__()
        self.n1, self.n2, self.out_dim = n1, n2, out_dim
        if hashes == "tensorflow":
            h1, s1, h2, s2 = tensorflow_hashes(n1, n2, out_dim)
        elif hashes == "random":
            h1, s1, h2, s2 = random_hashes(n1, n2, out_dim)
        else:
            raise ValueError(f"hashes must be 'random' or 'tensorflow', got {hashes!r}")
        self.register_buffer("h1", h1)
        self.register_buffer("s1", s1)
        self.register_buffer("h2", h2)
        self.register_buffer("s2", s2)

    @property
    def hashes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.h1, self.s1, self.h2, self.s2

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, sum_pool: bool = False, normalize: bool = False
    ) -> torch.Tensor:
        if x.shape[-1] != self.n1 or y.shape[-1] != self.n2:
            raise ValueError(
                f"CompactBilinearPooling({self.n1}, {self.n2} -> {self.out_dim}): got inputs "
                f"of shapes {tuple(x.shape)} and {tuple(y.shape)}"
            )
        return ops.cbp(x, y, *self.hashes, self.out_dim, sum_pool, normalize)

    def extra_repr(self) -> str:
        return f"n1={self.n1}, n2={self.n2}, out_dim={self.out_dim}"
