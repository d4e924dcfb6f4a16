"""The whole experts computation on Triton: align -> GEMM1 (+activation) -> GEMM2 (x weight, top-k sum)."""
from __future__ import annotations

from typing import Any

import torch

from .align import max_blocks, moe_align
from .configs import fit_smem, get_config
from .gemm import ACT_CODES, gemm1, gemm2, zero_dropped_rows


def fused_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: str = "silu",
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])`` -> ``[T, H]`` in x.dtype; ids of -1 skipped.

    ``config`` overrides the tile config (see ``configs.py``); by default the tuned file or heuristic.
    """
    if activation not in ACT_CODES:
        raise ValueError(f"unknown activation '{activation}'; choose one of {', '.join(ACT_CODES)}")
    T, H = x.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    k = topk_ids.shape[1]
    if T == 0 or k == 0:
        return torch.zeros_like(x)
    if config is None:
        config = get_config(T, E, I, H, k, x.dtype, x.device)
    if x.element_size() > 2:
        config = fit_smem(config, x.element_size())
    P = T * k
    block_m = config["BLOCK_M"]
    direct = bool(config.get("decode", False))
    atomic = config.get("reduce", "atomic") == "atomic"
    if x.stride(1) != 1:
        x = x.contiguous()
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"weights ({w13.dtype}, {w2.dtype}) must have the activations' dtype {x.dtype}")
    ids_flat = topk_ids.reshape(-1)
    if ids_flat.dtype != torch.int32:
        ids_flat = ids_flat.to(torch.int32)
    ids_flat = ids_flat.contiguous()
    tw_flat = topk_weights.reshape(-1).to(torch.float32).contiguous()

    if direct:
        num_pid_m = P
        sorted_ids = expert_ids = ntpp = ids_flat  # unused by the DIRECT kernels
    else:
        sorted_ids, expert_ids, ntpp = moe_align(ids_flat.view(T, k), E, block_m)
        num_pid_m = max_blocks(P, E, block_m)

    inter = torch.empty(P, I, dtype=x.dtype, device=x.device)
    gemm1(x, w13, w13_bias, inter, sorted_ids, expert_ids, ntpp, ids_flat, num_pid_m, k,
          activation, direct, block_m, config["gemm1"])
    if atomic:
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    else:
        # one row per pair in the activations' dtype (as vLLM's moe_sum), summed over top-k by torch
        out = torch.empty(P, H, dtype=x.dtype, device=x.device)
        zero_dropped_rows(ids_flat, out)
    gemm2(inter, w2, w2_bias, tw_flat, out, sorted_ids, expert_ids, ntpp, ids_flat, num_pid_m, k,
          direct, atomic, block_m, config["gemm2"])
    if not atomic:
        out = out.view(T, k, H).sum(dim=1)  # one pass; torch accumulates bf16/fp16 sums in fp32
    return out if out.dtype == x.dtype else out.to(x.dtype)
