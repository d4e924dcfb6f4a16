"""composer's kernels as ``torch.library`` custom ops, with fake (meta) implementations.

``torch.compile(fullgraph=True)`` sees each op as one opaque node whose output shape the fake
implementation gives, so a whole MoE block traces without a graph break; the real implementations
launch Triton kernels only and read nothing back to the host, so they capture into CUDA graphs.

Ops:
- ``composer::fused_experts(x, topk_weights, topk_ids, w13, w2, w13_bias?, w2_bias?, activation) -> [T, H]``
- ``composer::moe_align(topk_ids, num_experts, block_m) -> (sorted_ids, expert_ids, num_tokens_post_padded)``
- ``composer::fused_experts_quant(x, topk_weights, topk_ids, w13, w2, biases?, activation, method, scales,
  a13_scale?, a2_scale?, zeros?, granularity, block_n, block_k) -> [T, H]``
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

    sorted_ids, expert_ids, ntpp = impl(topk_ids, num_experts, block_m)
    # the slots past num_tokens_post_padded are left unwritten by the kernels (fused_experts never reads them); the
    # op fills them with the padding sentinel, so that every call of the op returns defined values (opcheck
    # compares eager with traced calls), without a host sync
    slot = torch.arange(sorted_ids.numel(), device=sorted_ids.device, dtype=torch.int32)
    return torch.where(slot < ntpp, sorted_ids, topk_ids.numel()).to(torch.int32), expert_ids, ntpp


@moe_align.register_fake
def _moe_align_fake(topk_ids, num_experts, block_m):
    P = topk_ids.numel()
    nb = (P + torch.sym_min(num_experts, P) * (block_m - 1) + block_m - 1) // block_m
    i32 = torch.int32
    return (topk_ids.new_empty(nb * block_m, dtype=i32), topk_ids.new_empty(nb, dtype=i32),
            topk_ids.new_empty(1, dtype=i32))


@torch.library.custom_op("composer::fused_experts_quant", mutates_args=())
def fused_experts_quant(
    x: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13: Tensor,
    w2: Tensor,
    w13_bias: Optional[Tensor],
    w2_bias: Optional[Tensor],
    activation: str,
    method: str,
    w13_scale: Tensor,
    w2_scale: Tensor,
    a13_scale: Optional[Tensor],
    a2_scale: Optional[Tensor],
    w13_zero: Optional[Tensor],
    w2_zero: Optional[Tensor],
    granularity: str,
    block_n: int,
    block_k: int,
) -> Tensor:
    """The quantized experts (``method``: int8_w8a16, int4_w4a16, int8_w8a8, fp8_w8a8); see triton/fused.py."""
    from .triton.fused import fused_experts_quant as impl

    return impl(x, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias, activation, method, w13_scale, w2_scale,
                a13_scale, a2_scale, w13_zero, w2_zero, granularity, block_n, block_k)


@fused_experts_quant.register_fake
def _fused_experts_quant_fake(x, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias, activation, method, w13_scale,
                              w2_scale, a13_scale, a2_scale, w13_zero, w2_zero, granularity, block_n, block_k):
    return x.new_empty(x.shape)
