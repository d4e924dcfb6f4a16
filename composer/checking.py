"""Compare a built graph with a float64 oracle on the same inputs.

Routing is discrete: a bf16 run and a float64 run can pick different experts on near-ties, which says
nothing about kernel accuracy. So the oracle replays the tested run's expert choice (captured with
hooks), recomputes everything else in float64, and checks the choice itself separately: every chosen
expert's float64 score must be within a small margin of the k-th best.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layers.activation import act_and_mul
from .layers.block import DecoderBlock, MoEModel
from .layers.fused_moe import FusedMoE
from .layers.router import Router, route_weights
from .kernels.reference import oracle_experts

# Default tolerance on the relative Frobenius error of the output vs the float64 oracle.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}

log = logging.getLogger(__name__)


def add_warning(metrics: dict[str, Any], text: str) -> None:
    """Logged as a warning (the console and the run's log) and recorded as ``metrics["warning"]`` (several joined by
    '; '), so a run that succeeded does not hide it."""
    metrics["warning"] = f"{metrics['warning']}; {text}" if metrics.get("warning") else text
    log.warning(text)


def exceeds(err: float | None, tol: float) -> bool:
    """Whether a measured error fails its tolerance: NaN fails (``nan > tol`` is False, so a check written that way
    passed an all-NaN output); None means not measured."""
    return err is not None and not err <= tol


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref||_F / ||ref||_F in float64 (0 for two empty tensors)."""
    ref64 = ref.double()
    num = (got.double() - ref64).norm()
    den = ref64.norm()
    if den == 0:
        return float(num)
    return float(num / den)


@dataclass
class Capture:
    x: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    out: torch.Tensor | None = None


@dataclass
class ModuleTiming:
    seconds: list[float] = field(default_factory=list)
    out: torch.Tensor | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_experts(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Capture]]:
    """Run ``model(x)`` once, recording each FusedMoE's inputs (routing included) and output."""
    caps: dict[str, Capture] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, FusedMoE):
            cap = caps.setdefault(name, Capture())

            def hook(m, args, out, cap=cap):
                cap.x, cap.topk_weights, cap.topk_ids = (a.detach().clone() for a in args[:3])
                cap.out = out.detach().clone()

            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, caps


def record_experts(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Capture], list[Any]]:
    """Hooks that copy each FusedMoE's inputs, routing and output into buffers allocated here.

    Unlike ``capture_experts`` they allocate nothing per call, so ``torch.compile(fullgraph=True)`` traces
    them and a CUDA graph captures the copies: after a compiled or replayed forward the buffers hold *that*
    run's routing, and the oracle can replay it. Remove the returned handles when done.
    """
    caps: dict[str, Capture] = {}
    handles = []
    T = x.shape[0]
    for name, mod in model.named_modules():
        if isinstance(mod, FusedMoE):
            kw = dict(device=x.device)
            cap = caps[name] = Capture(
                x=torch.empty(T, mod.hidden_size, dtype=x.dtype, **kw),
                topk_weights=torch.empty(T, mod.top_k, dtype=torch.float32, **kw),
                topk_ids=torch.empty(T, mod.top_k, dtype=torch.int32, **kw),
                out=torch.empty(T, mod.hidden_size, dtype=x.dtype, **kw),
            )

            def hook(m, args, out, cap=cap):
                cap.x.copy_(args[0])
                cap.topk_weights.copy_(args[1])
                cap.topk_ids.copy_(args[2])
                cap.out.copy_(out)

            handles.append(mod.register_forward_hook(hook))
    return caps, handles


def time_modules(model: nn.Module, x: torch.Tensor, iters: int = 3, warmup: int = 1) -> tuple[dict[str, ModuleTiming], list[float]]:
    """Wall time of every named submodule's forward (device-synchronized) and of the whole model."""
    timings: dict[str, ModuleTiming] = {}
    handles = []
    starts: dict[str, float] = {}
    for name, mod in model.named_modules():
        if not name:
            continue
        t = timings.setdefault(name, ModuleTiming())

        def pre(m, args, name=name):
            _sync(x.device)
            starts[name] = time.perf_counter()

        def post(m, args, out, name=name, t=t):
            _sync(x.device)
            t.seconds.append(time.perf_counter() - starts[name])
            t.out = out[0] if isinstance(out, tuple) else out

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    totals = []
    try:
        with torch.no_grad():
            for i in range(warmup + iters):
                if i == warmup:
                    for t in timings.values():
                        t.seconds.clear()
                _sync(x.device)
                t0 = time.perf_counter()
                model(x)
                _sync(x.device)
                if i >= warmup:
                    totals.append(time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
    return timings, totals


def oracle_layer(layer: FusedMoE, cap: Capture, x: torch.Tensor | None = None,
                 topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's experts in float64, with its dequantized weights, on the captured routing."""
    qm = layer.quant_method
    quant_act = getattr(qm, "oracle_quantizer", lambda layer: None)(layer)  # w8a8: the kernel's activation rounding
    w = qm.dequantize(qm.expert_weights(layer), torch.float64)
    ids = cap.topk_ids
    if layer.ep_size > 1:
        ids = torch.where(ids >= 0, layer.expert_map[ids.long().clamp_min(0)], ids)
    x = cap.x if x is None else x
    tw = cap.topk_weights if topk_weights is None else topk_weights
    return oracle_experts(x, tw, ids, w.w13, w.w2, layer.activation, w.w13_bias, w.w2_bias, quant_act=quant_act)


def _linear64(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ lin.weight.double().t()


def oracle_block(block: DecoderBlock, x: torch.Tensor, cap: Capture) -> tuple[torch.Tensor, dict[str, float]]:
    """One decoder block in float64, replaying the captured expert choice. Returns (out, stats)."""
    norm = block.norm
    xf = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    h = norm.weight.double() * xf
    mlp = block.mlp
    logits = h @ mlp.gate.weight.double().t()
    r: Router = mlp.router
    tw = route_weights(logits, cap.topk_ids, r.scoring, r.renormalize, r.routed_scaling_factor)
    out = oracle_layer(mlp.experts, cap, x=h, topk_weights=tw)
    if mlp.shared_experts is not None:
        se = mlp.shared_experts
        hs = act_and_mul(mlp.experts.activation, torch.cat([_linear64(se.gate_proj, h), _linear64(se.up_proj, h)], -1))
        s = _linear64(se.down_proj, hs)
        if se.gate is not None:
            s = torch.sigmoid(_linear64(se.gate, h)) * s
        out = out + s
    stats = {
        "router_weight_err": float((cap.topk_weights.double() - tw).abs().max()) if tw.numel() else 0.0,
        "router_choice_gap": choice_gap(r, logits, cap.topk_ids),
    }
    return x + out, stats


def choice_gap(r: Router, logits: torch.Tensor, ids: torch.Tensor) -> float:
    """How far the chosen experts fall below the float64 k-th best choice score (0 = a true top-k).

    Grouped routing restricts the candidates; the bound is checked on the ungrouped choice scores
    only when there is no grouping (with grouping the group choice itself may tie).
    """
    if ids.numel() == 0 or r.num_expert_group not in (None, 1):
        return 0.0
    scores = torch.softmax(logits, -1) if r.scoring == "softmax" else torch.sigmoid(logits)
    if r.e_score_correction_bias is not None:
        scores = scores + r.e_score_correction_bias.double()
    kth = scores.topk(ids.shape[1], dim=-1).values[:, -1]
    chosen_min = scores.gather(1, ids.long()).min(dim=-1).values
    return float((kth - chosen_min).clamp_min(0).max())


def oracle_model(model: MoEModel, x: torch.Tensor, caps: dict[str, Capture]) -> tuple[torch.Tensor, list[dict[str, float]]]:
    h = x.double()
    stats = []
    for i, block in enumerate(model.layers):
        h, s = oracle_block(block, h, caps[f"layers.{i}.mlp.experts"])
        stats.append(s)
    return h, stats
