"""composer's kernels as ``torch.library`` custom ops, with fake (meta) implementations.

``torch.compile(fullgraph=True)`` sees each op as one opaque node whose output shape the fake
implementation gives, so a whole MoE block traces without a graph break; the real implementations
launch Triton kernels only and read nothing back to the host, so they capture into CUDA graphs.

Ops:
- ``composer::fused_experts(x, topk_weights, topk_ids, w13, w2, w13_bias?, w2_bias?, activation) -> [T, H]``
- ``composer::moe_align(topk_ids, num_experts, block_m) -> (sorted_ids, expert_ids, num_tokens_post_padded)``
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


@torch.library.custom_op("composer::fused_experts", mutates_args=())
def fused_experts(
    x: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13: Tensor,
    w2: Tensor,
    w13_bias: Optional[Tensor],
    w2_bias: Optional[Tensor],
    activation: str,
) -> Tensor:
    from .triton.fused import fused_experts as impl

    return impl(x, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias, activation)


@fused_experts.register_fake
def _fused_experts_fake(x, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias, activation):
    return x.new_empty(x.shape)


@torch.library.custom_op("composer::moe_align", mutates_args=())
def moe_align(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    from .triton.align import moe_align as impl

    return impl(topk_ids, num_experts, block_m)


@moe_align.register_fake
def _moe_align_fake(topk_ids, num_experts, block_m):
    P = topk_ids.numel()
    nb = (P + torch.sym_min(num_experts, P) * (block_m - 1) + block_m - 1) // block_m
    i32 = torch.int32
    return (topk_ids.new_empty(nb * block_m, dtype=i32), topk_ids.new_empty(nb, dtype=i32),
            topk_ids.new_empty(1, dtype=i32))
