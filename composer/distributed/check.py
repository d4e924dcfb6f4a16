"""task=check / task=run under expert parallelism: compare the EP graph with the single-rank graph.

Every rank builds, beside its expert-parallel model, the single-rank model of the same config
(``parallel.ep_size=1``, ``all2all=none``) from the same seed: weights are seeded per global expert, so
a rank's local experts equal the same experts of that model. On the same inputs:

* ``ep_vs_single_rel_err`` per FusedMoE: the EP layer's output vs the single-rank layer run on the very
  inputs (hidden states and routing) the EP layer received. Routing-independent, so it isolates the
  all2all backend (prepare/finalize) from near-tie routing flips.
* ``experts_rel_err`` per layer and ``output_rel_err``: the float64 oracle on the *full* (single-rank)
  weights replaying the EP run's routing, as for one rank.
* ``model_ep_vs_single_rel_err``: the whole EP output vs the single-rank output (informational: in low
  precision a later layer may route a near-tie differently).
"""
from __future__ import annotations

from typing import Any

import torch

from ..checking import capture_experts, oracle_layer, oracle_model, rel_error
from ..config import ComposerConfig, validate_config


def single_rank_config(cfg: ComposerConfig) -> ComposerConfig:
    """The same config on one rank: ``parallel.ep_size=1``, ``all2all=none`` (derived keys dropped)."""
    d = cfg.to_dict()
    d["parallel"] = {**d["parallel"], "ep_size": 1}
    d["all2all"] = {"name": "none"}
    d["kernel"] = {k: v for k, v in d["kernel"].items() if k != "resolved"}
    return validate_config(d)


def is_expert_parallel(model: torch.nn.Module) -> bool:
    from ..layers.fused_moe import FusedMoE

    return any(isinstance(m, FusedMoE) and m.ep_size > 1 for m in model.modules())


@torch.no_grad()
def compare_ep(model: torch.nn.Module, x: torch.Tensor, cfg: ComposerConfig) -> dict[str, Any]:
    """Like ``tasks.common.compare`` for an expert-parallel model (collective: every rank must call it)."""
    from ..factory import build
    from ..tasks.common import checksum

    ref_cfg = single_rank_config(cfg)
    ref = build(ref_cfg, ep_rank=0, group=None)
    out, caps = capture_experts(model, x)
    ref_out = ref(x)
    result: dict[str, Any] = {"output_checksum": checksum(out), "layers": {}}
    for name, cap in caps.items():
        ref_layer = ref.get_submodule(name)
        single = ref_layer(cap.x, cap.topk_weights, cap.topk_ids)
        result["layers"][name] = {
            "experts_rel_err": rel_error(cap.out, oracle_layer(ref_layer, cap)),
            "ep_vs_single_rel_err": rel_error(cap.out, single),
        }
    if hasattr(model, "layers") and all(f"layers.{i}.mlp.experts" in caps for i in range(len(model.layers))):
        oracle, stats = oracle_model(ref, x, caps)
        result["output_rel_err"] = rel_error(out, oracle)
        for i, s in enumerate(stats):
            result["layers"][f"layers.{i}.mlp.experts"].update(s)
    result["model_ep_vs_single_rel_err"] = rel_error(out, ref_out)
    from ..quant.checking import compare_unquantized, wants_unquantized

    if wants_unquantized(cfg):  # also vs the unquantized float64 oracle (the single-rank model's, quant=none)
        compare_unquantized(result, x, caps, out, ref_cfg, {"ep_rank": 0, "group": None})
    return result
