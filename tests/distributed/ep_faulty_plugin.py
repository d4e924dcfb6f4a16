"""A test plugin: all2all backend ``faulty`` that fails on one rank (raise, or hang without communicating)."""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict

from composer.distributed.all_to_all import AllToAll
from composer.registry import ALL2ALL


class FaultyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["raise", "hang"] = "raise"
    rank: int = 1


@ALL2ALL.register("faulty")
class Faulty(AllToAll):
    name = "faulty"
    Params = FaultyParams

    def prepare(self, x, topk_weights, topk_ids):
        p = self.ctx.params
        if self.ctx.ep_rank == p.rank:
            if p.mode == "raise":
                raise RuntimeError(f"injected fault on rank {p.rank}")
            time.sleep(600)
        return super().prepare(x, topk_weights, topk_ids)
