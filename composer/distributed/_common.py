"""Helpers the all2all backends share: the group, token-count exchange, packing rows into bytes, stats."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from . import runtime
from ..layers.modular_kernel import PrepareFinalize, PreparedTokens
from .none import EPContext
from .runtime import DistributedError, collective


def resolve_group(ctx: EPContext) -> Any:
    """The backend's process group: the context's, else the default (world) group."""
    if ctx.ep_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            f"all2all with ep_size={ctx.ep_size} needs an initialized torch.distributed process group; launch "
            f"with `torchrun --nproc-per-node {ctx.ep_size} -m composer ...` (the CLI initializes it) or call "
            "composer.distributed.runtime.init_from_env(cfg) before building the model")
    group = ctx.group if ctx.group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    if size != ctx.ep_size:
        raise DistributedError(f"the process group has {size} ranks but parallel.ep_size = {ctx.ep_size}; "
                               f"launch {ctx.ep_size} processes or set parallel.ep_size={size}")
    return group


# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def gather_counts(group: Any, n: int, ep_size: int) -> list[int]:
    """Every rank's token count, exchanged over the host (gloo) metadata group: no GPU-host sync."""
    mine = torch.tensor([n], dtype=torch.int64)
    out = torch.empty(ep_size, dtype=torch.int64)
    with collective("exchanging token counts (all2all prepare)"):
        all_gather_single(out, mine, group=runtime.metadata_group(group))
    return out.tolist()


def global_rank(group: Any, r: int) -> int:
    return r if group is None or group is dist.group.WORLD else dist.get_global_rank(group, r)


def pack(cols: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[N, c_i]`` tensors of any dtypes -> one ``[N, sum(c_i * itemsize_i)]`` uint8 buffer (one collective)."""
    return torch.cat([c.contiguous().view(torch.uint8) for c in cols], dim=1)


def unpack(buf: torch.Tensor, specs: Sequence[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of ``pack``: ``specs`` lists (dtype, columns) in packing order."""
    out, at = [], 0
    for dtype, ncols in specs:
        nbytes = ncols * torch.empty((), dtype=dtype).element_size()
        out.append(buf[:, at:at + nbytes].contiguous().view(dtype))
        at += nbytes
    if at != buf.shape[1]:
        raise DistributedError(f"received rows of {buf.shape[1]} bytes, expected {at}: the ranks disagree on the "
                               "hidden size, dtype or top_k; run every rank with the same config")
    return out


def to_local(expert_map: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Global expert ids (-1 allowed) -> this rank's local ids, -1 where another rank owns the expert."""
    m = expert_map.to(device=ids.device)
    return torch.where(ids >= 0, m[ids.long().clamp_min(0)], torch.full_like(ids, -1, dtype=m.dtype)).to(torch.int32)


def row_bytes(H: int, dtype: torch.dtype, k: int) -> int:
    """Bytes of one packed (hidden, fp32 weights, int32 ids) row."""
    return H * torch.empty((), dtype=dtype).element_size() + 8 * k


class EPBackend(PrepareFinalize):
    """Base of the expert-parallel backends: the lazily resolved group, per-call ``stats`` (bytes moved),
    and a pass-through on one rank (``parallel.ep_size=1``), so any backend also runs without torchrun."""

    def __init__(self, ctx: EPContext):
        self.ctx = ctx
        self._group: Any = None
        self.stats: dict[str, int] = {}

    @property
    def group(self) -> Any:
        if self._group is None:
            self._group = resolve_group(self.ctx)
        return self._group

    def prepare(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> PreparedTokens:
        if self.ctx.ep_size == 1:
            self.stats = {"dispatch_bytes": 0, "combine_bytes": 0}
            ids = topk_ids if self.ctx.expert_map is None else to_local(self.ctx.expert_map, topk_ids)
            return PreparedTokens(x, topk_weights, ids, context=None)
        return self._prepare(x, topk_weights, topk_ids)

    def finalize(self, out: torch.Tensor, prepared: PreparedTokens) -> torch.Tensor:
        if self.ctx.ep_size == 1:
            return out
        return self._finalize(out, prepared)

    def _prepare(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> PreparedTokens:
        raise NotImplementedError

    def _finalize(self, out: torch.Tensor, prepared: PreparedTokens) -> torch.Tensor:
        raise NotImplementedError
