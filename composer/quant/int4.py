"""quant=int4_w4a16: group-wise int4 weights, two per byte, computed in the model dtype (GPTQ/AWQ style).

Layout (vLLM's moe_wna16): ``w13_qweight uint8 [E, 2I, H/2]`` (element 2j in the low nibble, 2j+1 in the
high), ``w13_scales [E, 2I, H/g]`` in the model dtype, and with ``quant.zero_point=true``
``w13_qzeros uint8 [E, I, H/g]`` (zero points packed two per byte along the output dim); ``w2_*`` alike
with ``[E, H, I/2]``, ``[E, H, I/g]``, ``[E, H/2, I/g]``. Without zero points the weights are symmetric and
stored with an implicit zero of 8: ``w = (q - 8) * scale``; with them ``w = (q - zero) * scale``.
``quant.group_size`` is the number of K elements sharing a scale (-1: one group per row).
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator

from ..layers.modular_kernel import ExpertWeights
from .base import QuantParams, register_quant
from .utils import CkptTensor, QuantizedMethod, dequant_int4, largest_pow2_divisor, quant_int4


OTHER_METHODS = "pick another method, e.g. quant=int8_w8a16 or quant=fp8_w8a8"
# (an odd size fits no group: int4 packs two values per byte along K, so even -1, one group per row, is refused)
ODD_SIZES_HINT = ("int4 needs model.hidden_size and model.intermediate_size even (it packs two values per byte along "
                  f"K), so no group_size fits, -1 neither; {OTHER_METHODS}")


class Int4Params(QuantParams):
    group_size: int = Field(128, description="K elements per scale; -1 for one scale per output row")
    zero_point: bool = False

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and (v < 2 or v % 2):
            raise ValueError("must be -1 (one group per row) or a positive even number such as 32, 64, 128")
        return v


def _group_divides(group: int, sizes: tuple[tuple, ...], also: str, otherwise: str) -> list[tuple[str, Any, str]]:
    """The group_size problem when ``group`` does not divide each K size (``(name, size[, note])``), with the largest
    power of two that divides them all as the hint (``also``: another way out; ``otherwise``: when none exists)."""
    bad = [f"{s[0]} = {s[1]}{s[2] if len(s) > 2 else ''}" for s in sizes if s[1] % group]
    if not bad:
        return []
    g = largest_pow2_divisor(*(s[1] for s in sizes))
    hint = f"pick quant.group_size={g} (divides both sizes){' ' + also if also else ''}" if g >= 2 else otherwise
    return [("group_size", group, f"group_size {group} must divide {' and '.join(bad)}; {hint}")]


@register_quant("int4_w4a16")
class Int4W4A16(QuantizedMethod):
    Params = Int4Params
    UNQUANT_BOUND = {"float32": 0.3, "float16": 0.3, "bfloat16": 0.3}
    UNQUANT_BOUND_PER_ROW = 0.45  # group_size=-1: one scale per row is much coarser

    @classmethod
    def tolerances(cls, params: Int4Params, dtype: str) -> tuple[float, float]:
        bound = cls.UNQUANT_BOUND_PER_ROW if params.group_size == -1 else cls.UNQUANT_BOUND[dtype]
        return cls.OUTPUT_TOL[dtype], bound

    @classmethod
    def check_config(cls, params: Int4Params, model: Any, device: str) -> list[tuple[str, Any, str]]:
        H, I = model.hidden_size, model.intermediate_size
        problems = []
        if params.group_size == -1:
            bad = [f"{n} = {s}" for n, s in (("model.hidden_size", H), ("model.intermediate_size", I)) if s % 2]
            if bad:
                problems.append(("group_size", -1, f"int4 packs two values per byte along K, so "
                                 f"{' and '.join(bad)} must be even; no group_size fits it: {OTHER_METHODS}"))
        else:
            problems += _group_divides(params.group_size, (("model.hidden_size", H), ("model.intermediate_size", I)),
                                       "or -1 (one group per row)", ODD_SIZES_HINT)
        if params.zero_point and H % 2:
            problems.append(("zero_point", True, f"zero points are packed two per byte along the output dim, so "
                             f"model.hidden_size = {H} must be even; use quant.zero_point=false"))
        return problems

    @classmethod
    def check_tp(cls, params: Int4Params, model: Any, tp_size: int) -> list[tuple[str, Any, str]]:
        """Groups run along K; w2's K is the sharded intermediate dim, so each rank needs whole groups."""
        local = model.intermediate_size // tp_size
        if params.group_size == -1:
            return [("group_size", -1, f"one group per row spans w2's whole intermediate dim, which "
                     f"parallel.tp_size = {tp_size} shards; pick a group_size dividing "
                     f"model.intermediate_size / tp_size = {local}")]
        # (this rule, not check_config's, speaks under TP: its hint must fit the sharded size too)
        return _group_divides(params.group_size, (
            ("model.hidden_size", model.hidden_size),
            ("model.intermediate_size / parallel.tp_size", local, " (each rank keeps whole groups)")),
            "", "use a smaller parallel.tp_size")

    def _groups(self, K: int) -> int:
        return 1 if self.params.group_size == -1 else K // self.params.group_size

    def checkpoint_layout(self, layer) -> dict[str, CkptTensor]:
        E, H, I = layer.global_num_experts, layer.hidden_size, layer.intermediate_size
        sd = (layer.quant_dtype, *(d for d in (torch.float32, torch.bfloat16, torch.float16) if d != layer.quant_dtype))
        u8 = (torch.uint8,)
        out = {
            "w13_qweight": CkptTensor("w13", ((E, 2 * I, H // 2),), u8, tp_dim=1, tp_halves=True),
            "w2_qweight": CkptTensor("w2", ((E, H, I // 2),), u8, tp_dim=2),
            "w13_scales": CkptTensor("w13_scales", ((E, 2 * I, self._groups(H)),), sd, tp_dim=1, tp_halves=True),
            "w2_scales": CkptTensor("w2_scales", ((E, H, self._groups(I)),), sd, tp_dim=2),
        }
        if self.params.zero_point:
            out["w13_qzeros"] = CkptTensor("w13_qzeros", ((E, I, self._groups(H)),), u8, tp_dim=1, tp_halves=True)
            out["w2_qzeros"] = CkptTensor("w2_qzeros", ((E, H // 2, self._groups(I)),), u8, tp_dim=2)
        return out

    def quantize_weights(self, layer, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, w in (("w13", w13), ("w2", w2)):
            q, s, z = quant_int4(w, self.params.group_size, self.params.zero_point, layer.quant_dtype)
            out[name], out[f"{name}_scales"] = q, s
            if z is not None:
                out[f"{name}_qzeros"] = z
        return out

    def expert_weights(self, layer) -> ExpertWeights:
        zp = self.params.zero_point
        return ExpertWeights(
            w13=layer.w13, w2=layer.w2, w13_bias=layer.w13_bias, w2_bias=layer.w2_bias, quant=self.name,
            w13_scale=layer.w13_scales, w2_scale=layer.w2_scales,
            w13_zero=layer.w13_qzeros if zp else None, w2_zero=layer.w2_qzeros if zp else None,
            extra={"group_size": self.params.group_size, "zero_point": zp, "pack": "uint8x2_low_first"},
        )

    @staticmethod
    def dequantize(weights: ExpertWeights, dtype: torch.dtype) -> ExpertWeights:
        return ExpertWeights(
            w13=dequant_int4(weights.w13, weights.w13_scale, weights.w13_zero).to(dtype),
            w2=dequant_int4(weights.w2, weights.w2_scale, weights.w2_zero).to(dtype),
            w13_bias=weights.w13_bias, w2_bias=weights.w2_bias,
        )
