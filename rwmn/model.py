"""The Read-Write Memory Network (docs/model.md sections 1-6).

May import: torch, rwmn.cbp, rwmn.config, rwmn.memconv, rwmn.ops, rwmn.padding,
rwmn.profiling, rwmn.read_network.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from rwmn import ops
from rwmn.cbp import CompactBilinearPooling
from rwmn.config import RWMNConfig
from rwmn.memconv import MemoryConvStack
from rwmn.padding import Padding, padded_conv_stack
from rwmn.profiling import nvtx_range
from rwmn.read_network import ReadNetwork

Story = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RWMNOutput(NamedTuple):
    """What ``RWMN.forward(..., return_attention=True)`` returns."""

    logits: torch.Tensor  # [B, A]
    attention: tuple[torch.Tensor, ...]  # one [B, R] per hop


class RWMN(nn.Module):
    """RWMN(cfg)(story, query, answers) -> logits [B, A].

    story: [n, dim_text] for the text sources, or (rgb [n, dim_rgb], sub [n, dim_sub]) for
    video_sub; query [B, dim_text]; answers [B, A, dim_text]; all B questions are about
    this one story. ``forward(..., return_attention=True)`` returns an
    :class:`RWMNOutput` holding the attention weights of every hop as well.

    ``forward(..., padding=rwmn.padding.padding_plan(...))`` runs a story and questions
    padded to a bucket's shape and gives, in the valid question rows, the logits of the
    unpadded batch (docs/model.md section 7); ``loss(..., keep=padding.questions)`` and
    :meth:`correct` then count the valid questions only.
    """

    def __init__(self, cfg: RWMNConfig) -> None:
        super().__init__()
        ops.preload_kernels()
        self.cfg = cfg
        d = cfg.dim_memory
        # One linear map for question and answers, and for the story in text mode
        # (docs/model.md section 1).
        self.embed = nn.Linear(cfg.dim_text, d)
        if cfg.video:
            self.story_cbp = CompactBilinearPooling(
                cfg.dim_rgb, cfg.dim_sub, cfg.dim_mcb, cfg.cbp_hash
            )
            self.story_embed = nn.Linear(cfg.dim_mcb, d)
        self.write = MemoryConvStack(cfg.write_layers, 1, d)
        memory_channels = self.write.out_channels
        self.read = ReadNetwork(
            cfg.read_layers, memory_channels, d, cfg.sharp, cfg.legacy, cfg.cbp_hash
        )

    # ----------------------------------------------------------------------------------
    def _check_inputs(self, story: Story, query: torch.Tensor, answers: torch.Tensor) -> None:
        cfg = self.cfg
        if cfg.video:
            if not isinstance(story, tuple | list) or len(story) != 2:
                raise ValueError(
                    "video_sub story must be a pair (rgb [n, dim_rgb], sub [n, dim_sub])"
                )
            rgb, sub = story
            expect = ((rgb, cfg.dim_rgb, "rgb"), (sub, cfg.dim_sub, "sub"))
            if rgb.dim() != 2 or sub.dim() != 2 or rgb.shape[0] != sub.shape[0]:
                raise ValueError(
                    f"video_sub story: rgb {tuple(rgb.shape)} and sub {tuple(sub.shape)} must be "
                    "[n, dim] with the same n"
                )
        else:
            if not isinstance(story, torch.Tensor):
                raise ValueError(f"{cfg.data_source} story must be one tensor [n, dim_text]")
            expect = ((story, cfg.dim_text, "story"),)
        for tensor, dim, name in expect:
            if tensor.dim() != 2 or tensor.shape[-1] != dim:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected [n, {dim}]")
            if tensor.shape[0] == 0:
                raise ValueError(f"{name} is empty: a story needs at least one element")
        if query.dim() != 2 or query.shape[-1] != cfg.dim_text:
            raise ValueError(f"query has shape {tuple(query.shape)}, expected [B, {cfg.dim_text}]")
        if answers.shape != (query.shape[0], cfg.num_answer, cfg.dim_text):
            raise ValueError(
                f"answers has shape {tuple(answers.shape)}, expected "
                f"[{query.shape[0]}, {cfg.num_answer}, {cfg.dim_text}]"
            )

    def embed_story(self, story: Story) -> torch.Tensor:
        """E' = unit_norm(E W_e + b_e), [n, d]."""
        if self.cfg.video:
            rgb, sub = story
            # CBP of the unit-normalised features (fused: no normalised copies under autocast).
            elements = self.story_cbp(rgb, sub, normalize=True)
            # The CBP's output goes into the linear map as it is (no unit_norm of it).
            return ops.embed(
                elements, self.story_embed.weight, self.story_embed.bias, normalize_input=False
            )
        return self._embed_text(story)[0]

    def _embed_text(self, *rows: torch.Tensor) -> list[torch.Tensor]:
        """unit_norm(unit_norm(x) W + b) of each of ``rows`` ([..., dim_text] each), as one
        batch: one normalisation, one GEMM and one normalisation for all of them, and a
        single split in the backward."""
        flat = [x.reshape(-1, x.shape[-1]) for x in rows]
        out = ops.embed(torch.cat(flat), self.embed.weight, self.embed.bias)
        parts = out.split([x.shape[0] for x in flat])
        return [y.view(*x.shape[:-1], y.shape[-1]) for x, y in zip(rows, parts, strict=True)]

    def forward(
        self,
        story: Story,
        query: torch.Tensor,
        answers: torch.Tensor,
        return_attention: bool = False,
        padding: Padding | None = None,
    ) -> torch.Tensor | RWMNOutput:
        self._check_inputs(story, query, answers)
        if padding is not None:
            self._check_padding(story, query, padding)
        with nvtx_range("embedding"):
            # Every row that goes through the shared text map goes through it at once. With
            # padding, the padded rows (unit_norm(bias), not zero) are zeroed where the
            # write layers (rwmn.padding.padded_conv_stack) or the attention read them.
            if self.cfg.video:
                memory = self.embed_story(story)
                u, g = self._embed_text(query, answers)
            else:
                memory, u, g = self._embed_text(story, query, answers)
        with nvtx_range("write"):
            if padding is None:
                memory = self.write(memory.unsqueeze(0))  # [C, m, d]
            else:  # [C, M, d], the slots past m zeroed
                memory = padded_conv_stack(self.write.convs, memory.unsqueeze(0), padding.write)
                memory = torch.where(padding.memory[:, None], memory, 0.0)
        attention = []
        # The question-independent part of the read (the fused path's memory spectra), once.
        with nvtx_range("read/prepare"):
            prepared = self.read.prepare(memory) if padding is None else None
        # Each hop's update is unit_norm(a unit_norm(o) + b u): the release adds (a = b = 1),
        # the paper blends (a = alpha, b = 1 - alpha).
        blend = (1.0, 1.0) if self.cfg.legacy else (self.cfg.alpha, 1.0 - self.cfg.alpha)
        for hop in range(self.cfg.num_hop):
            with nvtx_range(f"read/hop{hop}"):
                o, p = self.read(memory, u, prepared, padding)
                attention.append(p)
                if hop < self.cfg.num_hop - 1:
                    u = ops.hop_update(o, u, *blend)
        with nvtx_range("answer"):
            # The last hop's update and the answers' scores against it, as one op.
            logits = ops.answer_scores(o, u, g, *blend)
        if return_attention:
            return RWMNOutput(logits, tuple(attention))
        return logits

    def _check_padding(self, story: Story, query: torch.Tensor, padding: Padding) -> None:
        rows = (story[0] if self.cfg.video else story).shape[0]
        if padding.story.shape != (rows,) or padding.questions.shape != (query.shape[0],):
            raise ValueError(
                f"padding of a story of {tuple(padding.story.shape)} rows and "
                f"{tuple(padding.questions.shape)} questions given for {rows} rows and "
                f"{query.shape[0]} questions"
            )

    # ----------------------------------------------------------------------------------
    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Softmax cross-entropy (of softmax(scores) in legacy mode) + reg * sum ||p||^2 / 2;
        with ``keep`` (a padded batch's question mask) the mean over the kept questions."""
        loss = ops.cross_entropy(logits, target, keep, self.cfg.legacy)
        if self.cfg.reg:
            loss = loss + self.cfg.reg * 0.5 * sum(
                p.float().pow(2).sum() for p in self.parameters()
            )
        return loss

    @staticmethod
    def correct(
        logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """How many questions (of those ``keep`` marks) the logits answer right: a 0-d
        device tensor (no host synchronisation)."""
        right = logits.detach().argmax(-1) == target
        return (right if keep is None else right & keep).sum()
