"""all2all=all_to_all: each (token, slot) pair travels only to the rank that owns its expert.

prepare: the destination of every pair is the owner of its expert (the owners are learned once, on the
first forward, by all-gathering every rank's expert map, so any placement works). Pairs are sorted by
destination; their counts are exchanged with a small ``all_to_all_single``, then the hidden rows and
the *global* expert ids, packed into one byte row per pair, go out with ``all_to_all_single`` and
variable splits. The receiver maps global ids to its local ids with its expert map and runs the
experts kernel with routing weight 1 (one slot per row). finalize: the unweighted outputs return along
the reverse splits, and the source multiplies each by its routing weight and sums over the slots.

Host synchronization: variable splits must be Python ints, so the send/receive counts are copied to the
host once per prepare (one device-to-host sync per layer). This is the only sync on the path; it is
why ``all_to_all`` (like every EP backend here) cannot run under CUDA graphs or torch.compile(fullgraph).
Pairs, not tokens, are sent: a token with two slots on one rank travels twice (no deduplication).
"""
from __future__ import annotations


import torch
import torch.distributed as dist

from ..layers.modular_kernel import PreparedTokens
from ..registry import ALL2ALL
from ._common import EPBackend, all_gather_single, pack, unpack
from .none import EPContext
from .runtime import DistributedError, collective


@ALL2ALL.register("all_to_all")
class AllToAll(EPBackend):
    name = "all_to_all"

    def __init__(self, ctx: EPContext):
        super().__init__(ctx)
        self._owner: torch.Tensor | None = None

    def owner(self, device: torch.device) -> torch.Tensor:
        """``[E]`` int64: the group rank owning each global expert (learned once, collectively)."""
        if self._owner is None or self._owner.device != device:
            m = self.ctx.expert_map.to(device=device, dtype=torch.int32).contiguous()
            maps = torch.empty(self.ctx.ep_size * m.numel(), dtype=torch.int32, device=device)
            with collective("all_to_all: exchanging expert maps"):
                all_gather_single(maps, m, group=self.group)
            maps = maps.view(self.ctx.ep_size, -1)
            owned = maps >= 0
            bad = (owned.sum(0) != 1).nonzero().flatten().tolist()  # once per layer, at the first forward
            if bad:
                raise DistributedError(f"expert placement differs between ranks: expert(s) {bad[:8]} are owned by "
                                       "no rank or by several; build every rank with the same parallel.placement")
            self._owner = owned.to(torch.int8).argmax(0)
        return self._owner

    def _prepare(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> PreparedTokens:
        ep, group = self.ctx.ep_size, self.group
        T, k = topk_ids.shape
        H = x.shape[1]
        flat_ids = topk_ids.reshape(-1).long()
        dest = self.owner(x.device)[flat_ids.clamp_min(0)]
        order = torch.argsort(dest, stable=True)
        send = torch.bincount(dest, minlength=ep)
        recv = torch.empty_like(send)
        with collective("all_to_all dispatch (exchanging pair counts)"):
            dist.all_to_all_single(recv, send, group=group)
        send_splits, recv_splits = torch.stack([send, recv]).tolist()  # the one host sync (see module doc)
        token_of = order // k
        buf = pack([x[token_of], flat_ids[order].to(torch.int32)[:, None]])
        B = buf.shape[1]
        got = torch.empty(sum(recv_splits), B, dtype=torch.uint8, device=x.device)
        with collective("all_to_all dispatch (all_to_all_single of tokens)"):
            dist.all_to_all_single(got, buf, recv_splits, send_splits, group=group)
        xs, ids = unpack(got, [(x.dtype, H), (torch.int32, 1)])
        local = self.ctx.expert_map.to(device=ids.device)[ids.long()].to(torch.int32)
        ones = torch.ones(local.shape[0], 1, dtype=torch.float32, device=x.device)
        me = self.ctx.ep_rank
        self.stats = {"dispatch_bytes": (sum(send_splits) - send_splits[me]) * B}
        w = topk_weights.reshape(-1)[order].float()
        return PreparedTokens(xs, ones, local, context=(token_of, w, send_splits, recv_splits, T, x.dtype))

    def _finalize(self, out: torch.Tensor, prepared: PreparedTokens) -> torch.Tensor:
        token_of, w, send_splits, recv_splits, T, dtype = prepared.context
        H = out.shape[1]
        back = torch.empty(sum(send_splits), H, dtype=out.dtype, device=out.device)
        with collective("all_to_all combine (all_to_all_single of expert outputs)"):
            dist.all_to_all_single(back, out.contiguous(), send_splits, recv_splits, group=self.group)
        me = self.ctx.ep_rank
        self.stats["combine_bytes"] = (sum(recv_splits) - recv_splits[me]) * H * out.element_size()
        res = torch.zeros(T, H, dtype=torch.float32, device=out.device)
        res.index_add_(0, token_of, back.float() * w[:, None])
        return res.to(dtype)
