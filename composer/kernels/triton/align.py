"""Align: (token, slot) pairs sorted by expert and padded to the GEMM's BLOCK_M, in Triton.

Three small launches, no host synchronization (so the whole thing captures into a CUDA graph):

1. ``_count_kernel``: one atomic increment per valid pair on ``counts[expert]``; the old value is the
   pair's rank inside its expert.
2. ``_scan_kernel`` (one program): per-expert padded sizes, their exclusive prefix sum (each expert's
   start), ``num_tokens_post_padded``, the expert of every BLOCK_M block (-1 past the end), and the
   sentinel ``num_pairs`` in every padding slot.
3. ``_scatter_kernel``: ``sorted_ids[start[e] + rank] = pair``.

Outputs (the layout of vLLM's ``moe_align_block_size``):
``sorted_ids [max_blocks * BLOCK_M]`` flat pair indices ``t * top_k + j``, the padding slots hold
``num_pairs``; entries at or past ``num_tokens_post_padded`` are left unwritten here and never read by the GEMMs
(the ``composer::moe_align`` op fills them with ``num_pairs`` too, so that the op's every output is defined).
``expert_ids [max_blocks]`` the expert of each block, -1 for blocks past the end.
``num_tokens_post_padded [1]``. Pairs whose id is -1 (or out of range) are left out.

The order of pairs inside one expert follows the atomics and may change between runs; every GEMM row
is independent of its position, so results do not depend on it.
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._jit import cdiv, lazy_jit, next_pow2

# Reductions and scans go through tl.reduce / tl.associative_scan with triton's own sum combiner: the
# interpreter patches those (tl.sum and tl.cumsum are @jit helpers, jitted for whichever mode was active
# when triton was imported).


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the number of BLOCK_M blocks: at most min(E, P) experts get a partial block."""
    return (num_pairs + min(num_experts, num_pairs) * (block_m - 1) + block_m - 1) // block_m


@lazy_jit
def _count_kernel(ids_ptr, counts_ptr, rank_ptr, num_pairs, num_experts, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1)
    valid = in_range & (ids >= 0) & (ids < num_experts)
    rank = tl.atomic_add(counts_ptr + ids, 1, mask=valid)
    tl.store(rank_ptr + offs, rank, mask=valid)


@lazy_jit
def _scan_kernel(counts_ptr, starts_ptr, expert_ids_ptr, ntpp_ptr, sorted_ids_ptr,
                 num_experts, num_blocks, num_pairs,
                 BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, PAD_CHUNK: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    e_ok = e < num_experts
    counts = tl.load(counts_ptr + e, mask=e_ok, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.associative_scan(padded, 0, tl.standard._sum_combine)
    starts = ends - padded
    total = tl.reduce(padded, 0, tl.standard._sum_combine)
    tl.store(starts_ptr + e, starts, mask=e_ok)
    tl.store(ntpp_ptr, total)
    # The expert owning each block: the number of experts that end at or before the block's start.
    ends_or_big = tl.where(e_ok, ends, 2147483647)
    for b0 in range(0, num_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        pos = b * BLOCK_M
        owner = tl.reduce((ends_or_big[None, :] <= pos[:, None]).to(tl.int32), 1, tl.standard._sum_combine)
        owner = tl.where(pos < total, owner, -1)
        tl.store(expert_ids_ptr + b, owner, mask=b < num_blocks)
    # Mark the padding slots of every expert with the sentinel num_pairs.
    used_end = starts + counts
    for j0 in range(0, BLOCK_M, PAD_CHUNK):
        j = j0 + tl.arange(0, PAD_CHUNK)
        slot = used_end[:, None] + j[None, :]
        pad = e_ok[:, None] & (slot < ends[:, None])
        tl.store(sorted_ids_ptr + slot, tl.full(slot.shape, 0, tl.int32) + num_pairs, mask=pad)


@lazy_jit
def _scatter_kernel(ids_ptr, rank_ptr, starts_ptr, sorted_ids_ptr, num_pairs, num_experts, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1)
    valid = in_range & (ids >= 0) & (ids < num_experts)
    rank = tl.load(rank_ptr + offs, mask=valid, other=0)
    start = tl.load(starts_ptr + ids, mask=valid, other=0)
    tl.store(sorted_ids_ptr + start + rank, offs.to(tl.int32), mask=valid)


def _check_args(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    """Integer ids (a float id would be truncated into some expert) and sizes the kernels can lay out."""
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor of expert ids (int32 or int64), got {topk_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be at least 1, got {num_experts}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a positive power of two (the GEMM's BLOCK_M), got {block_m}")


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_ids [T, k]`` integer (int32 read as is) -> ``(sorted_ids, expert_ids, num_tokens_post_padded)``; see
    the module doc."""
    _check_args(topk_ids, num_experts, block_m)
    dev = topk_ids.device
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:  # (an id outside [0, E) is left out: mark it -1 before the cast could wrap it in)
        ids = torch.where((ids >= 0) & (ids < num_experts), ids, -1).to(torch.int32)
    ids = ids.contiguous()
    P = ids.numel()
    nb = max_blocks(P, num_experts, block_m)
    sorted_ids = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(nb, dtype=torch.int32, device=dev)
    ntpp = torch.empty(1, dtype=torch.int32, device=dev)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    starts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    rank = torch.empty(max(P, 1), dtype=torch.int32, device=dev)
    BLOCK = 1024 if P > 1024 else max(16, next_pow2(max(P, 1)))
    if P > 0:
        _count_kernel[(cdiv(P, BLOCK),)](ids, counts, rank, P, num_experts, BLOCK=BLOCK)
    BLOCK_E = max(16, next_pow2(num_experts))
    BLOCK_B = 64 if BLOCK_E <= 256 else 16
    PAD_CHUNK = min(block_m, max(1, 4096 // BLOCK_E))
    _scan_kernel[(1,)](counts, starts, expert_ids, ntpp, sorted_ids, num_experts, nb, P,
                       BLOCK_M=block_m, BLOCK_E=BLOCK_E, BLOCK_B=BLOCK_B, PAD_CHUNK=PAD_CHUNK)
    if P > 0:
        _scatter_kernel[(cdiv(P, BLOCK),)](ids, rank, starts, sorted_ids, P, num_experts, BLOCK=BLOCK)
    return sorted_ids, expert_ids, ntpp
