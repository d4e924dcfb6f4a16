"""GateLinear (router logits) and the top-k Router (softmax|sigmoid, renormalize, grouped top-k).

Routing follows the published models: Mixtral/Qwen (softmax, top-k, renormalize), DeepSeek-V3
(sigmoid scores, score-correction bias used only to *choose* experts, grouped top-k whose group
score is the sum of each group's two best biased scores, routed scaling factor).
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import CustomOp


class GateLinear(nn.Module):
    """``[T, H] -> [T, E]`` router logits, returned in float32."""

    def __init__(self, hidden_size: int, num_experts: int, dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight).float()


def route(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference routing function: logits ``[T, E]`` -> (weights ``[T, k]`` fp32, ids ``[T, k]`` int32)."""
    logits = logits.float()
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"unknown router scoring '{scoring}'; choose softmax or sigmoid")
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if num_expert_group is not None and num_expert_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, num_expert_group, E // num_expert_group)
        if correction_bias is not None:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(E // num_expert_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


@CustomOp.register("topk_router")
class Router(CustomOp):
    """Top-k routing as a CustomOp: platforms may plug a fused top-k kernel in."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        scoring: str = "softmax",
        renormalize: bool = True,
        num_expert_group: int | None = None,
        topk_group: int | None = None,
        score_correction_bias: bool = False,
        routed_scaling_factor: float = 1.0,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring, self.renormalize = scoring, renormalize
        self.num_expert_group, self.topk_group = num_expert_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        if score_correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32, device=device))
        else:
            self.register_parameter("e_score_correction_bias", None)

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.dim() != 2 or logits.shape[1] != self.num_experts:  # (metadata only; else ids past E, silently)
            raise ValueError(f"the router takes logits [T, num_experts={self.num_experts}], got {list(logits.shape)}")
        return super().forward(logits)

    def forward_native(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(
            logits, self.top_k, self.scoring, self.renormalize, self.num_expert_group, self.topk_group,
            self.e_score_correction_bias, self.routed_scaling_factor,
        )

    def extra_repr(self) -> str:
        return (f"E={self.num_experts}, top_k={self.top_k}, scoring={self.scoring}, renormalize={self.renormalize}, "
                f"groups={self.num_expert_group}/{self.topk_group}, scale={self.routed_scaling_factor}")


def route_weights(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    scoring: str = "softmax",
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> torch.Tensor:
    """Routing weights for *given* expert ids, in the logits' dtype: the oracle's half of ``route``."""
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    w = scores.gather(1, topk_ids.long())
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return w * routed_scaling_factor
