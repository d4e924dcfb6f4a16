"""Which rank owns which expert. The map is global id -> local id, -1 where another rank owns it."""
from __future__ import annotations

import torch


def local_experts(num_experts: int, ep_size: int, ep_rank: int, placement: str = "linear") -> range:
    """Global ids of the experts that rank ``ep_rank`` owns, in local order (a ``range``: membership and
    ``index`` take constant time whatever the expert count)."""
    if num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide num_experts={num_experts}")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank} must be in [0, {ep_size})")
    n = num_experts // ep_size
    if placement == "linear":
        return range(ep_rank * n, (ep_rank + 1) * n)
    if placement == "round_robin":
        return range(ep_rank, num_experts, ep_size)
    raise ValueError(f"unknown placement '{placement}'; choose linear or round_robin")


def expert_map(num_experts: int, ep_size: int, ep_rank: int, placement: str = "linear") -> torch.Tensor:
    """``[E]`` int32: the local id of each global expert on this rank, -1 where it is not local."""
    local = local_experts(num_experts, ep_size, ep_rank, placement)
    m = torch.full((num_experts,), -1, dtype=torch.int32)
    m[local.start:local.stop:local.step] = torch.arange(len(local), dtype=torch.int32)
    return m
