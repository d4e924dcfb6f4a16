"""quant=int8_w8a16 and quant=int8_w8a8: symmetric int8 weights with one scale per output channel.

Weights ``w13_weight int8 [E, 2I, H]`` with ``w13_weight_scale fp32 [E, 2I, 1]`` (and ``w2_*``), the
compressed-tensors channel layout (``[E, N]`` scales load too). ``int8_w8a16`` computes in the model dtype
with the weights dequantized; ``int8_w8a8`` also quantizes each GEMM input to int8 with a dynamic per-token
scale (``amax / 127``) and accumulates in int32.
"""
from __future__ import annotations

from typing import Any

import torch

from ..layers.modular_kernel import ExpertWeights
from .base import register_quant
from .utils import (CkptTensor, QuantizedMethod, qdq_int8_per_token, qdq_int8_static, quant_int8_per_channel, set_param,
                    static_or)

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Int8(QuantizedMethod):
    def checkpoint_layout(self, layer) -> dict[str, CkptTensor]:
        E, H, I = layer.global_num_experts, layer.hidden_size, layer.intermediate_size
        return {
            "w13_weight": CkptTensor("w13", ((E, 2 * I, H),), (torch.int8,), tp_dim=1, tp_halves=True),
            "w2_weight": CkptTensor("w2", ((E, H, I),), (torch.int8,), tp_dim=2),
            "w13_weight_scale": CkptTensor("w13_weight_scale", ((E, 2 * I, 1), (E, 2 * I)), SCALE_DTYPES,
                                           tp_dim=1, tp_halves=True),
            "w2_weight_scale": CkptTensor("w2_weight_scale", ((E, H, 1), (E, H)), SCALE_DTYPES),
        }

    @classmethod
    def check_tp(cls, params: Any, model: Any, tp_size: int) -> list[tuple[str, Any, str]]:
        return []  # per-output-channel scales: w13's rows are narrowed with them; w2's rows span the sharded dim
        # and take the maximum over the ranks (FusedMoE.tp_amax_reduce), exactly the single-rank scales

    def quantize_weights(self, layer, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        out["w13"], out["w13_weight_scale"] = quant_int8_per_channel(w13)
        out["w2"], out["w2_weight_scale"] = quant_int8_per_channel(w2, reduce=getattr(layer, "tp_amax_reduce", None))
        return out

    def post_load(self, layer) -> None:
        for name in ("w13_weight_scale", "w2_weight_scale"):
            s = getattr(layer, name)
            if s.dim() == 2:
                set_param(layer, name, s.data.unsqueeze(-1))

    def expert_weights(self, layer) -> ExpertWeights:
        return ExpertWeights(w13=layer.w13, w2=layer.w2, w13_bias=layer.w13_bias, w2_bias=layer.w2_bias,
                             quant=self.name, w13_scale=layer.w13_weight_scale, w2_scale=layer.w2_weight_scale)

    @staticmethod
    def dequantize(weights: ExpertWeights, dtype: torch.dtype) -> ExpertWeights:
        return ExpertWeights(w13=(weights.w13.float() * weights.w13_scale.float()).to(dtype),
                             w2=(weights.w2.float() * weights.w2_scale.float()).to(dtype),
                             w13_bias=weights.w13_bias, w2_bias=weights.w2_bias)


@register_quant("int8_w8a16")
class Int8W8A16(_Int8):
    UNQUANT_BOUND = {"float32": 2.5e-2, "float16": 2.5e-2, "bfloat16": 2.5e-2}


@register_quant("int8_w8a8")
class Int8W8A8(_Int8):
    OUTPUT_TOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 2e-2}
    LAYER_TOL = {"float32": 1e-3}  # (one-quantum flips: up to 6.8e-4 in 1000 input draws; 5e-4 failed 0.4% of them)
    UNQUANT_BOUND = {"float32": 4e-2, "float16": 4e-2, "bfloat16": 4e-2}

    @staticmethod
    def activation_quantizer(weights: ExpertWeights):
        # (the method's own weights are dynamic; ExpertWeights given static scales, as the Triton kernels take them)
        return static_or(weights, qdq_int8_per_token, qdq_int8_static)

    @classmethod
    def tp_splits_activation_scales(cls, params: Any) -> bool:
        return True  # per-token int8 scales of the intermediate activation
