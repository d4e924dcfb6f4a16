"""all2all=naive: every rank sees every token; each computes its own experts' share; all-reduce.

prepare: the ranks exchange their token counts (host metadata group), then each rank broadcasts its
tokens and routing (packed into one byte row per token) to all others, so every rank holds the
concatenation of all ranks' tokens. The experts kernel runs on all of them with local expert ids
(-1 for experts of other ranks, which it skips). finalize: all-reduce the partial outputs (a token's
slots on other ranks are added there) and keep this rank's rows.

Simple and robust (vLLM's naive backend), but moves every token to every rank and all-reduces the full
output: O(ep_size) more traffic than ``all_to_all``. Uneven token counts (T = 0 included) are fine.
"""
from __future__ import annotations


import torch
import torch.distributed as dist

from ..layers.modular_kernel import PreparedTokens
from ..registry import ALL2ALL
from ._common import EPBackend, gather_counts, global_rank, pack, row_bytes, to_local, unpack
from .runtime import collective


@ALL2ALL.register("naive")
class NaiveAll2All(EPBackend):
    name = "naive"

    def _prepare(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> PreparedTokens:
        ep, me, group = self.ctx.ep_size, self.ctx.ep_rank, self.group
        T, k = topk_ids.shape
        H = x.shape[1]
        counts = gather_counts(group, T, ep)
        offsets = [sum(counts[:r]) for r in range(ep + 1)]
        total = offsets[-1]
        B = row_bytes(H, x.dtype, k)
        buf = torch.empty(total, B, dtype=torch.uint8, device=x.device)
        buf[offsets[me]:offsets[me + 1]] = pack([x, topk_weights.float(), topk_ids.to(torch.int32)])
        with collective("naive dispatch (broadcast of every rank's tokens)"):
            for r in range(ep):
                if counts[r]:
                    dist.broadcast(buf[offsets[r]:offsets[r + 1]], src=global_rank(group, r), group=group)
        xs, ws, ids = unpack(buf, [(x.dtype, H), (torch.float32, k), (torch.int32, k)])
        self.stats = {"dispatch_bytes": (total - T) * B}
        return PreparedTokens(xs, ws, to_local(self.ctx.expert_map, ids), context=(offsets[me], T, total))

    def _finalize(self, out: torch.Tensor, prepared: PreparedTokens) -> torch.Tensor:
        start, T, total = prepared.context
        if total:
            out = out.contiguous()
            with collective("naive combine (all-reduce of the partial outputs)"):
                dist.all_reduce(out, group=self.group)
        ep = self.ctx.ep_size
        self.stats["combine_bytes"] = 2 * (ep - 1) * out.numel() * out.element_size() // ep
        return out[start:start + T]
