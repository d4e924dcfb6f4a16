"""task=check / task=run under tensor parallelism: compare the TP graph with the single-rank graph.

Every rank builds, beside its tensor-parallel model, the single-rank model of the same config
(``parallel.tp_size=1``) from the same seed: each expert's full weights are seeded per (seed, layer, global
expert id) and a TP rank keeps its slice of them, so the sum over the ranks equals that model. All ranks
run the same tokens. On them:

* ``tp_vs_single_rel_err`` per FusedMoE: the TP layer's (all-reduced) output vs the single-rank layer run on
  the very inputs (hidden states and routing) the TP layer received. Routing-independent. For quant methods
  whose dynamic activation scales span the intermediate dim (per-token w8a8: ``tp_splits_activation_scales``)
  each rank scales its own slice, so this is reported as ``tp_vs_single_rel_err_info`` (quantization noise,
  not checked) and the float64 oracle below quantizes the intermediate per token and rank, as the TP run does.
* ``experts_rel_err`` per layer and ``output_rel_err``: the float64 oracle on the *full* (single-rank)
  weights replaying the TP run's routing, as for one rank.
* ``model_tp_vs_single_rel_err``: the whole TP output vs the single-rank output (informational: in low
  precision a later layer may route a near-tie differently).
"""
from __future__ import annotations

from typing import Any

import torch

from ..checking import capture_experts, oracle_layer, oracle_model, rel_error
from ..config import ComposerConfig, validate_config


def single_rank_config(cfg: ComposerConfig) -> ComposerConfig:
    """The same config on one rank: ``parallel.tp_size=1`` (derived keys dropped)."""
    d = cfg.to_dict()
    d["parallel"] = {**d["parallel"], "tp_size": 1, "sequence_parallel": False}
    d["kernel"] = {k: v for k, v in d["kernel"].items() if k != "resolved"}
    return validate_config(d)


def _split_oracles(ref: torch.nn.Module, cfg: ComposerConfig) -> bool:
    """Quant methods whose per-token activation scales span the intermediate dim: make the single-rank
    model's float64 oracle quantize the intermediate activation per token and TP rank (chunks of I / tp_size),
    as the TP run does. Returns True when it did."""
    from ..layers.fused_moe import FusedMoE

    tp = cfg.parallel.tp_size
    done = False
    for m in ref.modules():
        if not isinstance(m, FusedMoE):
            continue
        qm = m.quant_method
        splits = getattr(type(qm), "tp_splits_activation_scales", lambda params: False)
        if not splits(getattr(qm, "params", None)) or not hasattr(qm, "oracle_quantizer"):
            continue
        inner = qm.oracle_quantizer

        def per_rank(layer, inner=inner):
            f = inner(layer)
            if f is None:
                return None
            return lambda t, stage: f(t, stage) if stage != "a2" else torch.cat(
                [f(c, stage) for c in t.chunk(tp, dim=-1)], dim=-1)

        qm.oracle_quantizer = per_rank  # this throw-away reference model only
        done = True
    return done


@torch.no_grad()
def compare_tp(model: torch.nn.Module, x: torch.Tensor, cfg: ComposerConfig) -> dict[str, Any]:
    """Like ``tasks.common.compare`` for a tensor-parallel model (collective: every rank must call it)."""
    from ..factory import build
    from ..tasks.common import checksum

    ref = build(single_rank_config(cfg))
    out, caps = capture_experts(model, x)
    ref_out = ref(x)
    result: dict[str, Any] = {"output_checksum": checksum(out), "layers": {}}
    split = cfg.parallel.tp_size > 1 and _split_oracles(ref, cfg)
    for name, cap in caps.items():
        ref_layer = ref.get_submodule(name)
        single = ref_layer(cap.x, cap.topk_weights, cap.topk_ids)
        result["layers"][name] = {
            "experts_rel_err": rel_error(cap.out, oracle_layer(ref_layer, cap)),
            "tp_vs_single_rel_err" + ("_info" if split else ""): rel_error(cap.out, single),
        }
    if hasattr(model, "layers") and all(f"layers.{i}.mlp.experts" in caps for i in range(len(model.layers))):
        oracle, stats = oracle_model(ref, x, caps)
        result["output_rel_err"] = rel_error(out, oracle)
        for i, s in enumerate(stats):
            result["layers"][f"layers.{i}.mlp.experts"].update(s)
    result["model_tp_vs_single_rel_err"] = rel_error(out, ref_out)
    from ..quant.checking import compare_unquantized, wants_unquantized

    if wants_unquantized(cfg):  # also vs the unquantized float64 oracle (the single-rank model's, quant=none)
        compare_unquantized(result, x, caps, out, single_rank_config(cfg))
    return result
