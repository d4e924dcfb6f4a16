"""The quant-method contract: a strategy that owns how a FusedMoE layer's expert weights are stored.

``create_weights`` registers parameters on the layer; ``process_weights_after_loading`` quantizes or
repacks once; ``apply`` runs the experts through the layer's modular kernel. A method is attached to
the layer as a plain attribute: it is not a submodule and owns no parameters.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..layers.modular_kernel import ExpertWeights
from ..params import Params
from ..registry import QUANT_METHODS

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..layers.fused_moe import FusedMoE


class QuantParams(Params):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # (inf / nan: never a setting)


class QuantMethod:
    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = QuantParams

    def __init__(self, params: BaseModel | None = None):
        self.params = params if params is not None else self.Params()

    @classmethod
    def check_config(cls, params: BaseModel, model: "ModelConfig", device: str) -> list[tuple[str, Any, str]]:
        """(key under quant., value, message) for each problem; empty when the method can run."""
        return []

    @classmethod
    def check_tp(cls, params: BaseModel, model: "ModelConfig", tp_size: int) -> list[tuple[str, Any, str]]:
        """Tensor parallelism (``parallel.tp_size > 1``): (key under quant., value, message) for each reason the
        weights and scales cannot be sharded along the intermediate dim at ``tp_size`` (the caller checked that
        tp_size divides model.intermediate_size). A method that does not override this cannot be sharded."""
        return [("", cls.name, f"quant method '{cls.name}' cannot shard its scales across tensor-parallel ranks; "
                 "use parallel.tp_size=1 or a method that can (none, int8_w8a16, int8_w8a8, fp8_w8a8, int4_w4a16)")]

    @classmethod
    def tp_splits_activation_scales(cls, params: BaseModel) -> bool:
        """True when a dynamic activation scale spans the intermediate dim (per token over all of it): under
        tensor parallelism each rank then scales its own slice, so the result equals the single-rank one only
        to quantization noise (it is exactly per-token-group quantization with groups of I / tp_size)."""
        return False

    def create_weights(self, layer: "FusedMoE", num_experts: int, hidden_size: int, intermediate_size: int,
                       dtype: torch.dtype, has_bias: bool, device: Any) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: "FusedMoE") -> None:
        """Called once after the weights are initialized or loaded."""

    def expert_weights(self, layer: "FusedMoE") -> ExpertWeights:
        raise NotImplementedError

    @staticmethod
    def dequantize(weights: ExpertWeights, dtype: torch.dtype) -> ExpertWeights:
        """Unquantized weights equal to what the kernels compute with (for the torch backend and checks)."""
        return weights

    def apply(self, layer: "FusedMoE", x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return layer.kernel(x, topk_weights, topk_ids, self.expert_weights(layer), layer.activation)


def register_quant(name: str):
    def deco(cls: type[QuantMethod]) -> type[QuantMethod]:
        cls.name = name
        QUANT_METHODS.register(name, cls)
        return cls

    return deco


def new_param(*shape: int, dtype: torch.dtype, device: Any, loader: Any = None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
    if loader is not None:
        p.weight_loader = loader  # type: ignore[attr-defined]
    return p
