"""``kernel=grouped_mm``: the experts on ``torch._grouped_mm`` (CUTLASS grouped GEMM; bf16, sm90+).

Pairs are sorted by expert with torch ops (no host synchronization: counts by ``scatter_add``), the
rows of ``x`` gathered, two grouped GEMMs run over the per-expert row ranges, and the weighted rows
are added back to their tokens in fp32. Pairs whose id is -1 sort past the last expert's range; the
grouped GEMM leaves those rows unwritten and they are masked out.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..layers.activation import act_and_mul
from ..layers.modular_kernel import Experts, ExpertWeights
from ..registry import KERNELS
from .reference import sort_by_expert

GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def torch_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch._grouped_mm; use kernel=triton or kernel=torch")
    return fn(a, b, offs=offs)


def loop_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The same contract as ``torch._grouped_mm`` for 2D x 3D, one matmul per group (tests, CPU)."""
    out = torch.zeros(a.shape[0], b.shape[2], dtype=a.dtype, device=a.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ b[g]
        start = end
    return out


def grouped_mm_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    gmm: GroupedMM = torch_grouped_mm,
) -> torch.Tensor:
    T, H = x.shape
    E = w13.shape[0]
    k = topk_ids.shape[1]
    if T == 0:
        return torch.zeros_like(x)
    keys_sorted, order, counts = sort_by_expert(topk_ids, E)
    offs = torch.cumsum(counts[:E], 0, dtype=torch.int32)
    token_of = order // k
    xs = x[token_of]
    h = gmm(xs, w13.transpose(1, 2), offs)
    in_range = (keys_sorted < E)[:, None]
    e_safe = keys_sorted.clamp(max=E - 1)
    if w13_bias is not None:
        h = h + w13_bias[e_safe]
    a = act_and_mul(activation, h)
    a = torch.where(in_range, a, torch.zeros((), dtype=a.dtype, device=a.device))
    o = gmm(a, w2.transpose(1, 2), offs)
    if w2_bias is not None:
        o = o + w2_bias[e_safe]
    w = topk_weights.reshape(-1)[order].to(torch.float32)[:, None]
    contrib = torch.where(in_range, o.to(torch.float32) * w, torch.zeros((), dtype=torch.float32, device=x.device))
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of, contrib)
    return out.to(x.dtype)


@KERNELS.register("grouped_mm")
class GroupedMMExperts(Experts):
    name = "grouped_mm"
    supported_quant = frozenset({"none"})
    supported_dtypes = frozenset({"bfloat16"})
    needs_cuda = True

    @classmethod
    def check(cls, *, quant: str, dtype: str, device: str) -> list[str]:
        problems = super().check(quant=quant, dtype=dtype, device=device)
        if not hasattr(torch, "_grouped_mm"):
            problems.append(
                f"experts kernel 'grouped_mm' needs torch._grouped_mm, which torch {torch.__version__} lacks: "
                "use kernel=triton or kernel=torch"
            )
        if device == "cuda" and torch.cuda.is_available():
            cap = torch.cuda.get_device_capability()
            if cap < (9, 0):
                problems.append(
                    f"experts kernel 'grouped_mm' needs compute capability 9.0 or newer (Hopper); this GPU has "
                    f"{cap[0]}.{cap[1]}: use kernel=triton"
                )
        return problems

    def apply(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        weights: ExpertWeights,
        activation: str,
    ) -> torch.Tensor:
        self.refuse_unsupported(weights)
        return grouped_mm_experts(x, topk_weights, topk_ids, weights.w13, weights.w2, activation,
                                  weights.w13_bias, weights.w2_bias)
