"""``kernel=triton``: the experts computed by composer's fused Triton kernels (composer::fused_experts)."""
from __future__ import annotations

import torch

import triton  # noqa: F401  (absent triton: composer.builtin skips this backend)

from ..layers.modular_kernel import Experts, ExpertWeights
from ..registry import KERNELS
from . import ops  # noqa: F401  (registers composer::fused_experts)
from .triton._jit import interpreting


@KERNELS.register("triton")
class TritonExperts(Experts):
    name = "triton"
    supported_quant = frozenset({"none"})
    supported_dtypes = frozenset({"float32", "float16", "bfloat16"})
    needs_cuda = False  # the interpreter runs it on CPU; check() says when that is allowed

    @classmethod
    def check(cls, *, quant: str, dtype: str, device: str) -> list[str]:
        problems = super().check(quant=quant, dtype=dtype, device=device)
        if device != "cuda":
            if not interpreting():
                problems.append(
                    f"experts kernel 'triton' needs a CUDA device, got device={device}: use kernel=torch, "
                    "or set TRITON_INTERPRET=1 to run the Triton kernels in the (slow) interpreter"
                )
            elif dtype == "bfloat16":
                problems.append(
                    "experts kernel 'triton' under TRITON_INTERPRET=1 on CPU gives wrong bfloat16 results "
                    "(the interpreter's bf16 loads are unreliable): use model.dtype=float32 or float16, or kernel=torch"
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
        if weights.quant != "none":
            raise ValueError(f"experts kernel 'triton' does not support quant method '{weights.quant}' yet")
        return torch.ops.composer.fused_experts(
            x, topk_weights, topk_ids, weights.w13, weights.w2, weights.w13_bias, weights.w2_bias, activation
        )
