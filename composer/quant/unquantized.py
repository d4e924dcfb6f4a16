"""quant=none: weights stored in the model dtype, as Hugging Face checkpoints ship them."""
from __future__ import annotations

from typing import Any

import torch

from ..layers.modular_kernel import ExpertWeights
from .base import QuantMethod, new_param, register_quant


@register_quant("none")
class Unquantized(QuantMethod):
    @classmethod
    def check_tp(cls, params: Any, model: Any, tp_size: int) -> list[tuple[str, Any, str]]:
        return []

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size: int,
                       dtype: torch.dtype, has_bias: bool, device: Any) -> None:
        E, H, I = num_experts, hidden_size, intermediate_size
        layer.w13 = new_param(E, 2 * I, H, dtype=dtype, device=device, loader=layer.weight_loader)
        layer.w2 = new_param(E, H, I, dtype=dtype, device=device, loader=layer.weight_loader)
        if has_bias:
            layer.w13_bias = new_param(E, 2 * I, dtype=dtype, device=device, loader=layer.weight_loader)
            layer.w2_bias = new_param(E, H, dtype=dtype, device=device, loader=layer.weight_loader)
        else:
            layer.register_parameter("w13_bias", None)
            layer.register_parameter("w2_bias", None)

    def expert_weights(self, layer) -> ExpertWeights:
        return ExpertWeights(w13=layer.w13, w2=layer.w2, w13_bias=layer.w13_bias, w2_bias=layer.w2_bias)
