"""all2all=none: one rank owns every expert; prepare and finalize move nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..layers.modular_kernel import PrepareFinalize, PreparedTokens
from ..registry import ALL2ALL


@dataclass
class EPContext:
    """What an all2all backend is built with: this rank's place and its experts."""

    ep_rank: int = 0
    ep_size: int = 1
    expert_map: torch.Tensor | None = None  # [E] global -> local id, -1 when not local
    group: Any = None  # torch.distributed process group
    params: Any = None


@ALL2ALL.register("none")
class NoAll2All(PrepareFinalize):
    name = "none"

    def __init__(self, ctx: EPContext | None = None):
        self.ctx = ctx or EPContext()

    def prepare(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> PreparedTokens:
        return PreparedTokens(x, topk_weights, topk_ids)

    def finalize(self, out: torch.Tensor, prepared: PreparedTokens) -> torch.Tensor:
        return out
