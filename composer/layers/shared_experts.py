"""Shared experts: a dense gated MLP every token goes through, with an optional sigmoid gate (Qwen2-MoE)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .activation import ACTIVATION_OPS


class SharedExperts(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, gated: bool,
                 dtype: torch.dtype, device: Any = None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.act = ACTIVATION_OPS[activation]()
        self.gate = nn.Linear(hidden_size, 1, **kw) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1))
        out = self.down_proj(h)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out
