"""Shared experts: a dense gated MLP every token goes through, with an optional sigmoid gate (Qwen2-MoE).

Under tensor parallelism (``tp_size > 1``, composer.distributed.tp) each rank keeps ``intermediate_size /
tp_size`` rows of ``gate_proj``/``up_proj`` and the same columns of ``down_proj`` (each parameter carries its
``tp_shard``); the partial outputs are all-reduced before the replicated sigmoid gate is applied."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .activation import ACTIVATION_OPS


class SharedExperts(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, gated: bool,
                 dtype: torch.dtype, device: Any = None, *, tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None,
                 sequence_parallel: bool = False):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        if intermediate_size % tp_size:
            raise ValueError(f"tp_size {tp_size} must divide the shared experts' intermediate size {intermediate_size}")
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.sequence_parallel = sequence_parallel and tp_size > 1
        local = intermediate_size // tp_size
        self.gate_proj = nn.Linear(hidden_size, local, **kw)
        self.up_proj = nn.Linear(hidden_size, local, **kw)
        self.down_proj = nn.Linear(local, hidden_size, **kw)
        if tp_size > 1:
            from ..distributed.tp import TPShard

            for lin, dim in ((self.gate_proj, 0), (self.up_proj, 0), (self.down_proj, 1)):
                lin.weight.tp_shard = TPShard(dim, intermediate_size, tp_rank, tp_size)  # type: ignore[attr-defined]
        self.act = ACTIVATION_OPS[activation]()
        self.gate = nn.Linear(hidden_size, 1, **kw) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # this rank's tokens: gather the group's, reduce-scatter the partial outputs
            from ..distributed.tp import sp_gather, sp_scatter

            (xs,), ctx = sp_gather([x], self.tp_group, self.tp_size)
            out = sp_scatter(self.down_proj(self.act(torch.cat([self.gate_proj(xs), self.up_proj(xs)], dim=-1))),
                             ctx, self.tp_group)
            return out if self.gate is None else torch.sigmoid(self.gate(x)) * out
        h = self.act(torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1))
        out = self.down_proj(h)
        if self.tp_size > 1:
            from ..distributed.tp import all_reduce

            out = all_reduce(out, self.tp_group)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out
