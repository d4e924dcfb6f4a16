"""kernel=torch: the exact reference on any device; quantized methods dequantize, then compute."""
from __future__ import annotations

import torch

from ..layers.modular_kernel import Experts, ExpertWeights
from ..registry import KERNELS, QUANT_METHODS
from .reference import check_activation_dtype, check_float_weights, check_ids_dtype, torch_experts


@KERNELS.register("torch")
class TorchExperts(Experts):
    name = "torch"

    @classmethod
    def check(cls, *, quant: str, dtype: str, device: str) -> list[str]:
        # Every registered quant method can dequantize, so the reference serves them all.
        return [] if quant in QUANT_METHODS else [f"unknown quant method '{quant}'"]

    def apply(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              weights: ExpertWeights, activation: str) -> torch.Tensor:
        _check_dtypes(x, topk_ids, weights)
        quant_act = None
        if weights.quant != "none":
            weights, topk_ids = _touched(weights, topk_ids)  # dequantize only the experts this call routes to
            method = QUANT_METHODS.get(weights.quant)
            act_q = getattr(method, "activation_quantizer", lambda w: None)(weights)
            if act_q is None:
                weights = method.dequantize(weights, x.dtype)
            else:
                # w8a8: the kernel multiplies exactly the quantized values with fp32 accumulation, and
                # quantizes each GEMM input as it holds it: in x.dtype. Same here, in float32.
                dt = x.dtype
                quant_act = lambda t, stage: act_q(t.to(dt), stage).to(t.dtype)  # noqa: E731
                weights = method.dequantize(weights, torch.float32)
        return torch_experts(x, topk_weights, topk_ids, weights.w13, weights.w2, activation,
                             weights.w13_bias, weights.w2_bias, quant_act=quant_act)


def _check_dtypes(x: torch.Tensor, topk_ids: torch.Tensor, weights: ExpertWeights) -> None:
    """Before any dequantization: floating hidden states, integer ids (``_touched`` casts them to int64, which
    would truncate float ids silently), and for unquantized weights their own dtype (as the Triton experts require;
    otherwise an fp16 x would be computed in the weights' bf16 and returned as fp16). Quantized weights are
    dequantized to x.dtype, so any floating x fits them."""
    check_activation_dtype(x)
    check_ids_dtype(topk_ids)
    if weights.quant == "none":
        check_float_weights(x, weights.w13, weights.w2)


def _touched(weights: ExpertWeights, topk_ids: torch.Tensor) -> tuple[ExpertWeights, torch.Tensor]:
    """The weights of the experts ``topk_ids`` names, in id order, and the ids renumbered to them (an id outside
    [0, E), which contributes nothing, stays outside): the same products in the same order as with all the
    experts, without dequantizing the ones no token uses (a decode step of deepseek_v3 touches 8 of 256).
    Computed on int64 ids: any integer dtype is accepted (as by every backend), and a uint8 index tensor would be
    read as a mask, a uint8 -1 wrap to 255."""
    E = weights.num_experts
    ids = topk_ids.to(torch.int64)
    valid = (ids >= 0) & (ids < E)
    used = torch.unique(ids[valid])
    if used.numel() == E:
        return weights, ids
    local = torch.full((E,), -1, dtype=torch.int64, device=ids.device)
    local[used] = torch.arange(used.numel(), dtype=torch.int64, device=ids.device)
    return weights.select(used), torch.where(valid, local[ids.clamp(0, E - 1)], -1)
