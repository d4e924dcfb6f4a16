"""Gated activations on ``[..., 2I]`` inputs (gate half first, then up): ``act(gate) * up``.

The functional forms are the reference every kernel is checked against; the CustomOps wrap them
so a platform can plug a fused implementation in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import CustomOp

ACTIVATIONS = ("silu", "gelu", "swigluoai")

# GPT-OSS's clamped SwiGLU: published constants.
SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_LIMIT = 7.0


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate) * up


def swigluoai_and_mul(x: torch.Tensor, alpha: float = SWIGLUOAI_ALPHA, limit: float = SWIGLUOAI_LIMIT) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


_FUNCTIONS = {"silu": silu_and_mul, "gelu": gelu_and_mul, "swigluoai": swigluoai_and_mul}


def act_and_mul(name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply the gated activation ``name`` to ``x [..., 2I]`` and return ``[..., I]``."""
    try:
        fn = _FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation '{name}'; choose one of {', '.join(ACTIVATIONS)}") from None
    return fn(x)


@CustomOp.register("silu_and_mul")
class SiluAndMul(CustomOp):
    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


@CustomOp.register("gelu_and_mul")
class GeluAndMul(CustomOp):
    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_and_mul(x)


@CustomOp.register("swigluoai_and_mul")
class SwigluOAIAndMul(CustomOp):
    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return swigluoai_and_mul(x)


ACTIVATION_OPS = {"silu": SiluAndMul, "gelu": GeluAndMul, "swigluoai": SwigluOAIAndMul}
