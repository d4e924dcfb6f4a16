"""The MoE block and the model stack: RMSNorm -> gate -> router -> FusedMoE (+ shared) -> residual.

Module names follow Hugging Face's (``layers.{i}.mlp.gate``, ``.mlp.experts``, ``.mlp.shared_experts``)
so checkpoints map onto them by name.
"""
from __future__ import annotations

import torch
from torch import nn

from .fused_moe import FusedMoE, check_on_device
from .router import GateLinear, Router
from .shared_experts import SharedExperts


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class SparseMoEBlock(nn.Module):
    """gate -> router -> experts, plus shared experts."""

    def __init__(self, gate: GateLinear, router: Router, experts: FusedMoE, shared_experts: SharedExperts | None):
        super().__init__()
        self.gate = gate
        self.router = router
        self.experts = experts
        self.shared_experts = shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        topk_weights, topk_ids = self.router(self.gate(x))
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class DecoderBlock(nn.Module):
    def __init__(self, norm: RMSNorm, mlp: SparseMoEBlock):
        super().__init__()
        self.norm = norm
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class MoEModel(nn.Module):
    """A stack of MoE decoder blocks over hidden states ``[T, H]`` (no attention: composer composes MoE)."""

    def __init__(self, layers: list[DecoderBlock]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "composer_needs_weights", False):  # (uninitialized memory would run: NaN or garbage, silently)
            from ..errors import WeightLoadError

            raise WeightLoadError("this model was built with init=False and holds no weights yet: load them with "
                                  "composer.loading.load_checkpoint(model, path) or model.load_state_dict(...) (or, "
                                  "after copying them in yourself, call composer.factory.finish_loading(model)), or "
                                  "build with init=True for seeded random weights")
        if self.layers:
            check_hidden_states(x, self.layers[0].norm.weight)
        for layer in self.layers:
            x = layer(x)
        return x


def check_hidden_states(x: object, w: torch.Tensor) -> None:
    """The model's input against its first norm weight ``w``, metadata only: a user's mistake is named here, not
    deep inside a norm or a matmul."""
    check_on_device(x, "hidden states", "x", w.device, "MoEModel")
    if x.dim() != 2 or x.shape[1] != w.shape[0] or x.dtype != w.dtype:
        raise ValueError(f"MoEModel takes hidden states [T, H={w.shape[0]}] in {w.dtype} (the config's "
                         f"model.hidden_size and model.dtype), got {list(x.shape)} in {x.dtype}")
