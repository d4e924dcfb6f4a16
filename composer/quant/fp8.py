"""quant=fp8_w8a8: fp8 (e4m3fn) weights and activations, fp32 accumulation.

``quant.granularity``:

* ``per_tensor``        one weight scale per expert (``w13_weight_scale [E]``, ``w2_weight_scale [E]``);
                        activations: dynamic per-token scales, or static per-tensor input scales
                        (``quant.activation_scheme=static``: ``w13_input_scale``/``w2_input_scale`` from the
                        checkpoint, the maximum over all experts, or ``quant.static_input_scale`` online).
* ``per_token_channel`` one weight scale per output channel (``w13_weight_scale [E, 2I, 1]``), dynamic
                        per-token activation scales (compressed-tensors' channel strategy).
* ``block``             one weight scale per ``block_shape = [bn, bk]`` block (``w13_weight_scale_inv
                        [E, 2I/bn, H/bk]``, DeepSeek-V3's layout), dynamic activation scales per token and
                        group of ``bk`` along the reduction dim.

Dynamic activation scales are per token (or token group), never per tensor, so a token's result does not
depend on the other tokens of the batch or on how expert parallelism dispatched them.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import PositiveInt, field_validator

from ..errors import ConfigError, Problem
from ..layers.modular_kernel import ExpertWeights
from .base import QuantParams, register_quant
from .utils import (FP8_DTYPE, CkptTensor, QuantizedMethod, check_multiple, cuda_capability, expand_block_scale,
                    fp8_cast, largest_pow2_divisor, qdq_fp8_per_token, qdq_fp8_per_token_group, qdq_fp8_static,
                    quant_fp8_block, quant_fp8_per_channel, quant_fp8_per_tensor, set_param, static_or)

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
F32_TINY, F32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
FP8_MIN_CAPABILITY = (8, 9)


class Fp8Params(QuantParams):
    granularity: Literal["per_tensor", "per_token_channel", "block"] = "per_tensor"
    block_shape: tuple[PositiveInt, PositiveInt] = (128, 128)
    activation_scheme: Literal["dynamic", "static"] = "dynamic"
    static_input_scale: float | None = None

    @field_validator("block_shape", mode="before")
    @classmethod
    def _two_sizes(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)) and len(v) != 2:
            raise ValueError(f"must be two sizes [block_n, block_k] (rows and columns of a scale block), got "
                             f"{len(v)}: {list(v)}")
        return v

    @field_validator("static_input_scale")
    @classmethod
    def _float32_scale(cls, v: float | None) -> float | None:
        """The scale is stored in float32: below its smallest normal it rounds to (near) 0 and every activation
        divided by it is inf or NaN; above its max it does not fit at all."""
        if v is not None and not F32_TINY <= v <= F32_MAX:
            raise ValueError(f"must be a float32 scale in [{F32_TINY:.4g}, {F32_MAX:.4g}] (it is stored in float32 "
                             f"and divides the activations); a useful one is max |activation| / 448, e.g. 0.02")
        return v


@register_quant("fp8_w8a8")
class Fp8W8A8(QuantizedMethod):
    Params = Fp8Params
    # Measured in docs/quantization.md (tiny model, fresh random inputs).
    OUTPUT_TOL = {"float32": 5e-3, "float16": 1.5e-2, "bfloat16": 4e-2}
    # float32 layers: a one-quantum activation flip (fp32-vs-fp64 last bits across a rounding boundary) costs up to
    # 2.6e-3 (per_tensor), 1.5e-3 (block), 1.3e-3 (static), 8.5e-4 (per_token_channel) in 1000 input draws of
    # tests/quant/test_methods.py's layer; 5e-4 failed 0.1-0.3% of them
    LAYER_TOL = {"float32": 5e-3}
    UNQUANT_BOUND = {"per_tensor": 0.15, "per_token_channel": 0.15, "block": 0.15}

    @classmethod
    def tolerances(cls, params: Any, dtype: str) -> tuple[float, float]:
        return cls.OUTPUT_TOL[dtype], cls.UNQUANT_BOUND[params.granularity]

    @classmethod
    def check_config(cls, params: Fp8Params, model: Any, device: str) -> list[tuple[str, Any, str]]:
        problems: list[tuple[str, Any, str]] = []
        if device == "cuda":
            cap = cuda_capability()
            if cap is not None and tuple(cap) < FP8_MIN_CAPABILITY:
                problems.append(("", "fp8_w8a8",
                                 f"fp8 needs compute capability >= 8.9 (sm89: Ada, Hopper or newer); this GPU is "
                                 f"sm{cap[0]}{cap[1]}. Pick quant=int8_w8a16, quant=int8_w8a8 or quant=int4_w4a16 "
                                 f"(or quant=none), or run on CPU with kernel=torch"))
        H, I = model.hidden_size, model.intermediate_size
        if params.granularity == "block":
            bn, bk = params.block_shape
            g = largest_pow2_divisor(H, I)
            advice = (f"pick quant.block_shape=[{g},{g}] (divides both sizes) or "
                      f"quant.granularity=per_token_channel")
            sizes = {"model.hidden_size": H, "model.intermediate_size": I}
            problems += check_multiple("block_shape", list(params.block_shape), sizes, bn, "block_shape[0] =", advice)
            if bk != bn:
                problems += check_multiple("block_shape", list(params.block_shape), sizes, bk, "block_shape[1] =", advice)
        if params.activation_scheme == "static" and params.granularity != "per_tensor":
            problems.append(("activation_scheme", "static",
                             f"static activation scales are per tensor and need quant.granularity=per_tensor; "
                             f"granularity '{params.granularity}' uses dynamic scales (activation_scheme=dynamic)"))
        if params.static_input_scale is not None and params.activation_scheme != "static":
            problems.append(("static_input_scale", params.static_input_scale,
                             "only used with quant.activation_scheme=static; remove it or set activation_scheme=static"))
        return problems

    @classmethod
    def check_tp(cls, params: Fp8Params, model: Any, tp_size: int) -> list[tuple[str, Any, str]]:
        """Block scales are narrowed with their weights, so each rank needs whole blocks of its I / tp_size rows
        (w13) and columns (w2). Per-channel and per-tensor scales that span the sharded dim are computed from the
        maximum over the ranks. Static input scales are replicated."""
        if params.granularity != "block":
            return []
        bn, bk = params.block_shape
        local = model.intermediate_size // tp_size
        bad = [f"block_shape[{i}] = {b}" for i, b in ((0, bn), (1, bk)) if local % b]
        if not bad:
            return []
        return [("block_shape", list(params.block_shape),
                 f"{' and '.join(bad)} must divide model.intermediate_size / parallel.tp_size = {local} (each rank "
                 f"keeps whole scale blocks); pick a smaller block_shape, a smaller tp_size or "
                 f"quant.granularity=per_token_channel")]

    @classmethod
    def tp_splits_activation_scales(cls, params: Fp8Params) -> bool:
        return params.activation_scheme == "dynamic" and params.granularity != "block"  # block: groups of bk stay whole

    # --- layout -----------------------------------------------------------------------------------
    def checkpoint_layout(self, layer) -> dict[str, CkptTensor]:
        E, H, I = layer.global_num_experts, layer.hidden_size, layer.intermediate_size
        p: Fp8Params = self.params
        w = (FP8_DTYPE,)
        out = {"w13_weight": CkptTensor("w13", ((E, 2 * I, H),), w, tp_dim=1, tp_halves=True),
               "w2_weight": CkptTensor("w2", ((E, H, I),), w, tp_dim=2)}
        if p.granularity == "per_tensor":
            out["w13_weight_scale"] = CkptTensor("w13_weight_scale", ((E,), (E, 2)), SCALE_DTYPES)
            out["w2_weight_scale"] = CkptTensor("w2_weight_scale", ((E,),), SCALE_DTYPES)
            if p.activation_scheme == "static":
                out["w13_input_scale"] = CkptTensor("w13_input_scale", ((E,),), SCALE_DTYPES, slice_experts=False)
                out["w2_input_scale"] = CkptTensor("w2_input_scale", ((E,),), SCALE_DTYPES, slice_experts=False)
        elif p.granularity == "per_token_channel":
            out["w13_weight_scale"] = CkptTensor("w13_weight_scale", ((E, 2 * I, 1), (E, 2 * I)), SCALE_DTYPES,
                                                 tp_dim=1, tp_halves=True)
            out["w2_weight_scale"] = CkptTensor("w2_weight_scale", ((E, H, 1), (E, H)), SCALE_DTYPES)
        else:
            bn, bk = p.block_shape
            out["w13_weight_scale_inv"] = CkptTensor("w13_weight_scale_inv", ((E, 2 * I // bn, H // bk),), SCALE_DTYPES,
                                                     tp_dim=1, tp_halves=True)
            out["w2_weight_scale_inv"] = CkptTensor("w2_weight_scale_inv", ((E, H // bn, I // bk),), SCALE_DTYPES,
                                                    tp_dim=2)
        return out

    def quantize_weights(self, layer, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        p: Fp8Params = self.params
        out: dict[str, torch.Tensor] = {}
        for name, w in (("w13", w13), ("w2", w2)):
            reduce = getattr(layer, "tp_amax_reduce", None)  # tensor parallelism: scales spanning the sharded dim
            if p.granularity == "per_tensor":
                out[name], out[f"{name}_weight_scale"] = quant_fp8_per_tensor(w, reduce)
            elif p.granularity == "per_token_channel":
                out[name], out[f"{name}_weight_scale"] = quant_fp8_per_channel(w, reduce if name == "w2" else None)
            else:
                out[name], out[f"{name}_weight_scale_inv"] = quant_fp8_block(w, *p.block_shape)
        if p.activation_scheme == "static":
            if p.static_input_scale is None:
                raise ConfigError([Problem(  # (a config problem: online quantization has no input scale to use)
                    "quant.static_input_scale", None, "fp8_w8a8 with activation_scheme=static takes its input "
                    "scales from a pre-quantized checkpoint (w13_input_scale, w2_input_scale); to quantize online "
                    "set quant.static_input_scale (e.g. max |activation| / 448) or use activation_scheme=dynamic")])
            E = layer.global_num_experts
            for name in ("w13_input_scale", "w2_input_scale"):
                out[name] = torch.full((E,), p.static_input_scale, dtype=torch.float32, device=w13.device)
        return out

    def post_load(self, layer) -> None:
        p: Fp8Params = self.params
        if p.granularity == "per_tensor" and layer.w13_weight_scale.dim() == 2:
            w13, smax = requantize_shards(layer.w13.data, layer.w13_weight_scale.float(), layer.intermediate_size)
            set_param(layer, "w13", w13)
            set_param(layer, "w13_weight_scale", smax)
        if p.granularity == "per_token_channel":
            for name in ("w13_weight_scale", "w2_weight_scale"):
                s = getattr(layer, name)
                if s.dim() == 2:
                    set_param(layer, name, s.data.unsqueeze(-1))

    # --- running ----------------------------------------------------------------------------------
    def expert_weights(self, layer) -> ExpertWeights:
        p: Fp8Params = self.params
        if p.granularity == "block":
            s13, s2 = layer.w13_weight_scale_inv, layer.w2_weight_scale_inv
        else:
            s13, s2 = layer.w13_weight_scale, layer.w2_weight_scale
        a13 = a2 = None
        if p.activation_scheme == "static":
            a13, a2 = layer.w13_input_scale.amax(), layer.w2_input_scale.amax()
        return ExpertWeights(
            w13=layer.w13, w2=layer.w2, w13_bias=layer.w13_bias, w2_bias=layer.w2_bias, quant=self.name,
            w13_scale=s13, w2_scale=s2, a13_scale=a13, a2_scale=a2,
            extra={"granularity": p.granularity, "block_shape": tuple(p.block_shape),
                   "activation_scheme": p.activation_scheme},
        )

    @staticmethod
    def dequantize(weights: ExpertWeights, dtype: torch.dtype) -> ExpertWeights:
        g = weights.extra["granularity"]
        ws = []
        for w, s in ((weights.w13, weights.w13_scale), (weights.w2, weights.w2_scale)):
            w32 = w.float()
            if g == "per_tensor":
                w32 = w32 * s.float()[:, None, None]
            elif g == "per_token_channel":
                w32 = w32 * s.float()
            else:
                bn, bk = weights.extra["block_shape"]
                w32 = w32 * expand_block_scale(s.float(), bn, bk)
            ws.append(w32.to(dtype))
        return ExpertWeights(w13=ws[0], w2=ws[1], w13_bias=weights.w13_bias, w2_bias=weights.w2_bias)

    @staticmethod
    def activation_quantizer(weights: ExpertWeights):
        # activation_scheme=static sets both scales; a stage given one uses it, as the Triton kernels do
        if weights.extra["granularity"] == "block":
            bk = weights.extra["block_shape"][1]
            return static_or(weights, lambda t: qdq_fp8_per_token_group(t, bk), qdq_fp8_static)
        return static_or(weights, qdq_fp8_per_token, qdq_fp8_static)


def requantize_shards(w13: torch.Tensor, scales: torch.Tensor, I: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoints with one scale per shard (``scales [E, 2]``: w1, w3): both halves of ``w13 [E, 2I, H]``
    requantized to their maximum (as vLLM). An expert whose scales are both 0 (a pruned expert saved with zero
    scales) dequantizes to exactly zero: it keeps a zero scale and zero weights instead of dividing 0 by 0 (NaN)."""
    smax = scales.amax(dim=1)
    w = w13.float()
    halves = torch.cat([w[:, :I] * scales[:, 0, None, None], w[:, I:] * scales[:, 1, None, None]], dim=1)
    divisor = torch.where(smax > 0, smax, torch.ones_like(smax))  # (zero scale: the halves are 0 * q = 0 already)
    return fp8_cast(halves, divisor[:, None, None]), smax
