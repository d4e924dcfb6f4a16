"""all2all=allgather_reducescatter: each rank owns its tokens; all-gather them, compute local experts,
reduce-scatter back (vLLM's default expert-parallel backend).

prepare: the ranks exchange token counts (host metadata group); each pads its tokens and routing to
the largest count (padding rows carry expert id -1, which the experts kernel skips) and one
``all_gather_into_tensor`` of packed byte rows gives every rank all tokens. The experts kernel runs
with local expert ids. finalize: ``reduce_scatter_tensor`` sums the partial outputs and returns each
rank its own (padded) rows. Uneven counts and T = 0 on a rank are handled by the padding.
"""
from __future__ import annotations


import torch

from ..layers.modular_kernel import PreparedTokens
from ..registry import ALL2ALL
from ._common import EPBackend, all_gather_single, gather_counts, reduce_scatter_single, pack, row_bytes, to_local, unpack
from .runtime import collective


@ALL2ALL.register("allgather_reducescatter")
class AllGatherReduceScatter(EPBackend):
    name = "allgather_reducescatter"

    def _prepare(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> PreparedTokens:
        ep, group = self.ctx.ep_size, self.group
        T, k = topk_ids.shape
        H = x.shape[1]
        tmax = max(gather_counts(group, T, ep))
        B = row_bytes(H, x.dtype, k)
        rows = torch.zeros(tmax, B, dtype=torch.uint8, device=x.device)
        if tmax:
            pad = tmax - T
            ids = topk_ids.to(torch.int32)
            if pad:
                ids = torch.cat([ids, ids.new_full((pad, k), -1)])
                x = torch.cat([x, x.new_zeros(pad, H)])
                topk_weights = torch.cat([topk_weights.float(), topk_weights.new_zeros(pad, k, dtype=torch.float32)])
            rows = pack([x, topk_weights.float(), ids])
        gathered = torch.empty(ep * tmax, B, dtype=torch.uint8, device=x.device)
        if tmax:
            with collective("allgather_reducescatter dispatch (all-gather of tokens)"):
                all_gather_single(gathered, rows, group=group)
        xs, ws, ids = unpack(gathered, [(x.dtype, H), (torch.float32, k), (torch.int32, k)])
        self.stats = {"dispatch_bytes": (ep - 1) * tmax * B}
        return PreparedTokens(xs, ws, to_local(self.ctx.expert_map, ids), context=(T, tmax))

    def _finalize(self, out: torch.Tensor, prepared: PreparedTokens) -> torch.Tensor:
        T, tmax = prepared.context
        ep = self.ctx.ep_size
        mine = torch.empty(tmax, out.shape[1], dtype=out.dtype, device=out.device)
        if tmax:
            with collective("allgather_reducescatter combine (reduce-scatter of the partial outputs)"):
                reduce_scatter_single(mine, out.contiguous(), group=self.group)
        self.stats["combine_bytes"] = (ep - 1) * tmax * out.shape[1] * out.element_size()
        return mine[:T]
