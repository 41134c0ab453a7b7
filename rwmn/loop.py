"""Pieces of the training step that keep the host from waiting on the device.

* :class:`RunningMetrics`: the training loss and accuracy summed on the device, and the
  first non-finite loss remembered there, read once per ``--validation_step`` (one host
  synchronisation per progress line instead of three per step).
* :func:`backward`: ``loss.backward()`` from a cached seed (no fill launched a step).
* :func:`make_adagrad`: torch's Adagrad with its fused or foreach implementation where
  this torch has one for the device; the update rule (and so the schedule) is Adagrad's.
* :func:`compile_model`: ``torch.compile`` with ``--compile_mode``.

May import: torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
#: Adagrad implementations, fastest first: one kernel for all parameters (fused), a few
#: multi-tensor kernels (foreach), one small loop of kernels per parameter (for-loop).
ADAGRAD_IMPLEMENTATIONS = ({"fused": True}, {"foreach": True}, {})
#: Step of no non-finite loss yet (steps count from 1).
NO_BAD_STEP = -1


class RunningMetrics:
    """Sums of the training loss (times questions) and of correct answers since the last
    progress line, kept on ``device`` in float64 (exact counts; the sums round-trip
    exactly through a checkpoint's Python floats), and the first step whose loss was not
    finite. ``add`` queues device work only; ``read`` synchronises once."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.questions = 0
        self._zero()

    def _zero(self) -> None:
        f64 = dict(dtype=torch.float64, device=self.device)
        self.loss = torch.zeros((), **f64)
        self.correct = torch.zeros((), **f64)
        self.bad_step = torch.full((), NO_BAD_STEP, **f64)
        self.bad_loss = torch.zeros((), **f64)

    def add(self, step: int, loss: torch.Tensor, correct: torch.Tensor, questions: int) -> None:
        """Step ``step``'s mean ``loss`` over ``questions`` questions, ``correct`` of them
        answered right (both 0-d device tensors). No host synchronisation."""
        loss = loss.detach().to(torch.float64)
        self.loss += loss * questions
        self.correct += correct.to(torch.float64)
        first = torch.logical_and(~torch.isfinite(loss), self.bad_step == NO_BAD_STEP)
        self.bad_step = torch.where(first, float(step), self.bad_step)
        self.bad_loss = torch.where(first, loss, self.bad_loss)
        self.questions += questions

    def read(self) -> tuple[float, float, int | None, float]:
        """(loss sum, correct answers, first non-finite step or None, its loss): one
        device-to-host copy."""
        loss, correct, bad_step, bad_loss = torch.stack(
            [self.loss, self.correct, self.bad_step, self.bad_loss]
        ).tolist()
        return loss, correct, None if bad_step == NO_BAD_STEP else int(bad_step), bad_loss

    def vector(self) -> torch.Tensor:
        """(loss sum, correct, first bad step, its loss, questions) as one float64 device
        tensor: what the ranks of a data-parallel run gather at a progress line. No
        synchronisation (the question count is known on the host)."""
        questions = torch.full((), float(self.questions), dtype=torch.float64, device=self.device)
        return torch.stack([self.loss, self.correct, self.bad_step, self.bad_loss, questions])

    def reset(self) -> None:
        self.questions = 0
        self._zero()

    def state(self) -> dict:
        """The window a checkpoint records (loss and acc are sums over questions)."""
        loss, correct, _, _ = self.read()
        return {"loss": loss, "acc": correct, "questions": self.questions}

    def load(self, window: dict) -> None:
        self.reset()
        self.loss.fill_(float(window["loss"]))
        self.correct.fill_(float(window["acc"]))
        self.questions = int(window["questions"])


def combine_windows(rows: list[list[float]]) -> tuple[float, float, int | None, float, int]:
    """The windows of every rank (rows of :meth:`RunningMetrics.vector`, in rank order)
    as one: sums in rank order (one row: its values exactly), and the earliest non-finite
    step of any rank with its loss."""
    loss = correct = 0.0
    questions = 0
    bad_step, bad_loss = None, 0.0
    for row_loss, row_correct, row_bad, row_bad_loss, row_questions in rows:
        loss += row_loss
        correct += row_correct
        questions += int(row_questions)
        if row_bad != NO_BAD_STEP and (bad_step is None or row_bad < bad_step):
            bad_step, bad_loss = int(row_bad), row_bad_loss
    return loss, correct, bad_step, bad_loss, questions


_SEEDS: dict[tuple, torch.Tensor] = {}


def backward(loss: torch.Tensor, scale: float = 1.0) -> None:
    """The gradients of ``scale * loss`` (``scale``: 1 / the batches a step accumulates):
    ``loss.backward`` from a seed kept per device, dtype and scale, where a bare
    ``backward()`` launches a fill of ones (and the scaling a multiply) every step."""
    key = (loss.device, loss.dtype, float(scale))
    seed = _SEEDS.get(key)
    if seed is None:
        seed = _SEEDS[key] = torch.full((), float(scale), device=loss.device, dtype=loss.dtype)
    loss.backward(seed)


def make_adagrad(
    params: Iterable[torch.nn.Parameter], device: torch.device, **kwargs
) -> tuple[torch.optim.Adagrad, str]:
    """Adagrad over ``params`` with the first implementation of
    :data:`ADAGRAD_IMPLEMENTATIONS` this torch runs on ``device``, and its name. Whether
    ``fused`` works depends on the torch version and the device (torch 2.13 has it on CPU
    and CUDA, older versions on CPU only) and torch only checks at the first step, so each
    is probed with one step on a one-element parameter."""
    params = list(params)
    for impl in ADAGRAD_IMPLEMENTATIONS:
        try:
            probe = torch.zeros(1, device=device, requires_grad=True)
            probe.grad = torch.zeros(1, device=device)
            torch.optim.Adagrad([probe], **kwargs, **impl).step()
        except (TypeError, RuntimeError, ValueError):  # unknown flag or unsupported here
            continue
        name = next(iter(impl), "for-loop")
        return torch.optim.Adagrad(params, **kwargs, **impl), name
    raise AssertionError("unreachable: the for-loop Adagrad runs everywhere")


def compile_model(model: torch.nn.Module, mode: str) -> Callable:
    """``torch.compile(model)`` in ``mode`` (``default``: torch.compile's default)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile_mode {mode!r}: expected one of {COMPILE_MODES}")
    return torch.compile(model, mode=None if mode == "default" else mode)
