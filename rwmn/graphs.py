"""One CUDA graph per training step: ``train.py --cuda_graphs`` (docs/cli.md).

The whole step (gradients zeroed, forward, loss, backward, fused Adagrad step) is
captured with ``torch.cuda.graph`` once per padded shape and replayed. A batch is padded
to its bucket (rwmn.padding: the story to a geometric grid of lengths, the questions to
--batch_size) with exact masks, so a replay computes the unpadded step's loss, accuracy
and update. Each shape's graph has its own static input buffers and memory pool; before
a replay the batch, its masks (computed on the host, cached per story length) and the
learning rate (a device tensor the captured Adagrad step reads) are copied in.

The pieces that do not need CUDA are separate, so the CPU tests check them:
:class:`StaticBatch` (a padded batch) and :func:`padded_step` (what is captured).

May import: torch, rwmn.config, rwmn.data.movieqa, rwmn.loop, rwmn.padding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from rwmn.config import RWMNConfig
from rwmn.data.movieqa import QABatch
from rwmn.loop import backward
from rwmn.padding import Padding, bucket_shape, padding_plan

#: Eager steps run (and undone) before a capture: kernels compiled, libraries initialised.
WARMUP_STEPS = 2


def story_rows(story: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    return (story[0] if isinstance(story, tuple) else story).shape[0]


@dataclass
class StaticBatch:
    """A batch padded to (``length`` story rows, ``rows`` questions), with its masks."""

    story: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    query: torch.Tensor
    answers: torch.Tensor
    target: torch.Tensor
    padding: Padding

    @classmethod
    def empty(
        cls,
        cfg: RWMNConfig,
        length: int,
        rows: int,
        device: torch.device | str,
        features: torch.dtype = torch.float32,
    ) -> StaticBatch:
        """Zero buffers of a bucket's shapes (features in the model's dtype)."""

        def zeros(*shape, dtype=features):
            return torch.zeros(shape, dtype=dtype, device=device)

        story = (
            (zeros(length, cfg.dim_rgb), zeros(length, cfg.dim_sub))
            if cfg.video
            else zeros(length, cfg.dim_text)
        )
        plan = padding_plan(cfg, length, rows, length, rows).to(device)
        return cls(
            story, zeros(rows, cfg.dim_text), zeros(rows, cfg.num_answer, cfg.dim_text),
            zeros(rows, dtype=torch.int64), plan,
        )  # fmt: skip

    def fill(self, batch: QABatch, plan: Padding, non_blocking: bool = False) -> None:
        """Copy ``batch`` (its padding ``plan``) in; the rows past it are zeroed."""
        stories = batch.story if isinstance(batch.story, tuple) else (batch.story,)
        mine = self.story if isinstance(self.story, tuple) else (self.story,)
        pairs = [*zip(mine, stories, strict=True), (self.query, batch.query),
                 (self.answers, batch.answers), (self.target, batch.target)]  # fmt: skip
        for buffer, value in pairs:
            count = value.shape[0]
            buffer[:count].copy_(value, non_blocking=non_blocking)
            buffer[count:].zero_()
        self.padding.copy_(plan, non_blocking=non_blocking)

    @classmethod
    def of(cls, cfg: RWMNConfig, batch: QABatch, batch_size: int) -> StaticBatch:
        """``batch`` padded to its bucket, on the batch's device (eager use, tests)."""
        n, questions = story_rows(batch.story), batch.query.shape[0]
        length, rows = bucket_shape(n, questions, batch_size)
        static = cls.empty(cfg, length, rows, batch.query.device, batch.query.dtype)
        static.fill(batch, padding_plan(cfg, n, questions, length, rows))
        return static


def padded_step(
    model, optimizer: torch.optim.Optimizer, static: StaticBatch, autocast: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step on a padded batch, what a graph captures: the gradients (which
    must exist) zeroed in place, forward under ``autocast()``, the masked loss, backward,
    ``optimizer.step()``. Returns the loss (a mean over the valid questions) and the
    count of valid questions answered right, as device tensors."""
    torch._foreach_zero_([p.grad for p in model.parameters()])
    keep = static.padding.questions
    with autocast():
        logits = model(static.story, static.query, static.answers, padding=static.padding)
    loss = model.loss(logits, static.target, keep)
    backward(loss)
    optimizer.step()
    return loss.detach(), model.correct(logits, static.target, keep)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static: StaticBatch
    loss: torch.Tensor
    correct: torch.Tensor


class GraphSteps:
    """Training steps of ``model`` and a fused Adagrad ``optimizer`` replayed from CUDA
    graphs, one per padded shape, captured when a shape is first met."""

    def __init__(
        self,
        model,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        amp_dtype: torch.dtype | None,
        device: torch.device,
    ) -> None:
        if not all(group.get("fused") for group in optimizer.param_groups):
            raise ValueError(
                "--cuda_graphs needs torch's fused Adagrad on CUDA (its step keeps its "
                "state on the device); this torch has none"
            )
        self.model, self.optimizer, self.batch_size = model, optimizer, batch_size
        self.amp_dtype, self.device = amp_dtype, torch.device(device)
        self.lrs = [
            torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device)
            for group in optimizer.param_groups
        ]
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self._plans: dict[tuple[int, int, int, int], Padding] = {}

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The padded shapes captured so far."""
        return sorted(self.graphs)

    def reset(self) -> None:
        """Forget the graphs (after the optimizer's state tensors were replaced)."""
        self.graphs.clear()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # No cast cache: cached casts would outlive the capture that allocated them.
        return torch.autocast("cuda", dtype=self.amp_dtype, cache_enabled=False)

    @contextlib.contextmanager
    def _tensor_lr(self) -> Iterator[None]:
        """The param groups' learning rates as the device tensors a captured step reads."""
        groups = self.optimizer.param_groups
        saved = [group["lr"] for group in groups]
        for group, lr in zip(groups, self.lrs, strict=True):
            group["lr"] = lr
        try:
            yield
        finally:
            for group, lr in zip(groups, saved, strict=True):
                group["lr"] = lr

    def _plan(self, n: int, questions: int, shape: tuple[int, int]) -> Padding:
        key = (n, questions, *shape)
        if key not in self._plans:
            plan = padding_plan(self.model.cfg, n, questions, *shape)
            self._plans[key] = plan.map(lambda t: t.pin_memory())
        return self._plans[key]

    def _state(self) -> list[torch.Tensor]:
        params = list(self.model.parameters())
        state = [t for p in params for t in self.optimizer.state[p].values()]
        return [*params, *(t for t in state if isinstance(t, torch.Tensor))]

    def _capture(self, shape: tuple[int, int], batch: QABatch, plan: Padding) -> _Captured:
        static = StaticBatch.empty(self.model.cfg, *shape, self.device)
        static.fill(batch, plan)
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # The warm-up steps change the weights and Adagrad's state: undone after them.
        saved = [t.clone() for t in self._state()]
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side), self._tensor_lr():
            for _ in range(WARMUP_STEPS):
                padded_step(self.model, self.optimizer, static, self._autocast)
        current.wait_stream(side)
        for tensor, value in zip(self._state(), saved, strict=True):
            tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with self._tensor_lr(), torch.cuda.graph(graph):
            loss, correct = padded_step(self.model, self.optimizer, static, self._autocast)
        return _Captured(graph, static, loss, correct)

    def step(self, batch: QABatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step on ``batch`` (on the device): its mean loss and correct
        answers (0-d device tensors). Queues device work only, except for a capture."""
        n, questions = story_rows(batch.story), batch.query.shape[0]
        shape = bucket_shape(n, questions, self.batch_size)
        plan = self._plan(n, questions, shape)
        captured = self.graphs.get(shape)
        if captured is None:
            captured = self.graphs[shape] = self._capture(shape, batch, plan)
        captured.static.fill(batch, plan, non_blocking=True)
        for lr, group in zip(self.lrs, self.optimizer.param_groups, strict=True):
            lr.fill_(group["lr"])
        captured.graph.replay()
        # Copies: the next replay of this shape overwrites the graph's outputs.
        return captured.loss.clone(), captured.correct.clone()
