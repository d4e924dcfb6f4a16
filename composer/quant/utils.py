"""Shared pieces of the quantized methods: the number formats, (de)quantizers, int4 packing, and the
base class that handles online quantization, pre-quantized checkpoint layouts and size checks.

Conventions (the Triton kernels must follow them to match the torch backend "to kernel rounding"):

* every scale is a *dequantization* multiplier: ``w = q * scale`` (``(q - zero) * scale`` for int4);
* weights are quantized from the model-dtype values in float32; scales are computed in float32 as
  ``amax / qmax`` with ``amax`` clamped to at least ``AMAX_EPS``;
* activations are quantized in float32: ``q = round_or_cast(clamp(t / scale))``; fp8 rounds to nearest
  even (torch's cast), int8 rounds half to even (``torch.round``) and clamps to [-127, 127].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..errors import WeightLoadError
from ..layers.modular_kernel import ExpertWeights
from .base import QuantMethod, new_param

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT8_MAX = 127.0
AMAX_EPS = 1e-10


def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) of the current CUDA device, or None without CUDA. Tests monkeypatch this."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# Weight quantizers. ``w`` is ``[E, N, K]`` (output rows N, reduction dim K), any float dtype.

def _amax(t: torch.Tensor, dims: Any, keepdim: bool = True) -> torch.Tensor:
    return t.abs().amax(dim=dims, keepdim=keepdim).clamp_min(AMAX_EPS)


def fp8_cast(t32: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (t32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _reduced(amax: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Tensor parallelism: ``reduce`` takes the maximum of a per-rank amax over the ranks (None: as is)."""
    return amax if reduce is None else reduce(amax)


def quant_fp8_per_tensor(w: torch.Tensor, reduce: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per expert: ``q [E, N, K]`` fp8, ``scale [E]`` fp32."""
    w32 = w.float()
    scale = _reduced(_amax(w32, (1, 2)), reduce) / FP8_MAX
    return fp8_cast(w32, scale), scale.reshape(-1)


def quant_fp8_per_channel(w: torch.Tensor, reduce: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per output row: ``q [E, N, K]`` fp8, ``scale [E, N, 1]`` fp32."""
    w32 = w.float()
    scale = _reduced(_amax(w32, 2), reduce) / FP8_MAX
    return fp8_cast(w32, scale), scale


def quant_fp8_block(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per ``bn x bk`` block: ``q [E, N, K]`` fp8, ``scale [E, N/bn, K/bk]`` fp32."""
    E, N, K = w.shape
    blocks = w.float().reshape(E, N // bn, bn, K // bk, bk)
    scale = _amax(blocks, (2, 4)) / FP8_MAX  # [E, N/bn, 1, K/bk, 1]
    q = fp8_cast(blocks, scale).reshape(E, N, K)
    return q, scale.reshape(E, N // bn, K // bk)


def expand_block_scale(scale: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    return scale.repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)


def quant_int8_per_channel(w: torch.Tensor, reduce: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output row: ``q [E, N, K]`` int8, ``scale [E, N, 1]`` fp32."""
    w32 = w.float()
    scale = _reduced(_amax(w32, 2), reduce) / INT8_MAX
    q = torch.round(w32 / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


# ------------------------------------------------------------------------------------------------
# int4: two 4-bit values per byte along the last dim, element 2j in the low nibble, 2j+1 in the high.

INT4_SYM_ZERO = 8  # symmetric int4 is stored unsigned with an implicit zero point of 8 (GPTQ's uint4b8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``q [..., K]`` with values in [0, 15] (any integer dtype), K even -> ``uint8 [..., K/2]``."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(q.shape)}")
    if q.numel() and not q.is_meta and (int(q.min()) < 0 or int(q.max()) > 15):  # (meta: shapes only)
        raise ValueError("pack_int4 needs values in [0, 15]")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., K/2]`` -> ``uint8 [..., K]`` values in [0, 15] (inverse of ``pack_int4``)."""
    lo, hi = p & 0xF, p >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def quant_int4(w: torch.Tensor, group_size: int, zero_point: bool, scale_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group-wise int4 along K. Returns packed ``q [E, N, K/2]`` uint8, ``scales [E, N, K/g]`` in
    ``scale_dtype`` and, with ``zero_point``, packed zeros ``[E, N/2, K/g]`` uint8 (packed along N, as
    vLLM's moe_wna16 ``qzeros``). Symmetric: ``scale = amax / 7``, ``q = round(w / scale) + 8``.
    Asymmetric: ``scale = (max - min) / 15``, ``zero = round(-min / scale)``, ``q = round(w / scale) + zero``.
    The scale is rounded to ``scale_dtype`` before the weights are quantized, so the stored scale is exact."""
    E, N, K = w.shape
    g = K if group_size == -1 else group_size
    wg = w.float().reshape(E, N, K // g, g)
    if zero_point:
        lo = wg.amin(-1, keepdim=True).clamp_max(0)
        hi = wg.amax(-1, keepdim=True).clamp_min(0)
        scale = ((hi - lo).clamp_min(AMAX_EPS) / 15).to(scale_dtype).float()
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = (torch.round(wg / scale) + zero).clamp(0, 15)
        zeros = pack_int4(zero.reshape(E, N, K // g).transpose(1, 2).to(torch.uint8)).transpose(1, 2).contiguous()
    else:
        scale = (_amax(wg, -1) / 7).to(scale_dtype).float()
        q = (torch.round(wg / scale) + INT4_SYM_ZERO).clamp(0, 15)
        zeros = None
    packed = pack_int4(q.reshape(E, N, K).to(torch.uint8))
    return packed, scale.reshape(E, N, K // g).to(scale_dtype), zeros


def dequant_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """Float32 ``[E, N, K]`` from packed int4 ``[E, N, K/2]``, ``scales [E, N, K/g]``, zeros ``[E, N/2, K/g]``."""
    q = unpack_int4(packed).float()
    E, N, K = q.shape
    groups = scales.shape[-1]
    g = K // groups
    if zeros is None:
        z = torch.full((), float(INT4_SYM_ZERO), device=q.device)
    else:
        z = unpack_int4(zeros.transpose(1, 2)).transpose(1, 2).float()  # [E, N, K/g]
        z = z.repeat_interleave(g, dim=-1)
    return (q - z) * scales.float().repeat_interleave(g, dim=-1)


# ------------------------------------------------------------------------------------------------
# Activation quantize-dequantize, exactly as a w8a8 kernel quantizes the input of each GEMM.

# The activation quantize-dequantizers return float32: the w8a8 kernels multiply the quantized values and
# apply the scales to the fp32 accumulator, so the dequantized activation ``q * scale`` is never rounded to
# the model dtype. Rounding it (as an earlier version did) moved the intermediate by ~1e-3 relative, enough
# to flip the second quantization of a few percent of its elements and to put the oracle 1e-2 away from a
# correct kernel (H100, 2026-11-27).

def qdq_fp8_per_token(t: torch.Tensor) -> torch.Tensor:
    t32 = t.float()
    scale = _amax(t32, -1) / FP8_MAX
    return fp8_cast(t32, scale).float() * scale


def qdq_fp8_static(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.float().reshape(())
    return fp8_cast(t.float(), s).float() * s


def qdq_fp8_per_token_group(t: torch.Tensor, group: int) -> torch.Tensor:
    T, K = t.shape
    t32 = t.float().reshape(T, K // group, group)
    scale = _amax(t32, -1) / FP8_MAX
    return (fp8_cast(t32, scale).float() * scale).reshape(T, K)


def qdq_int8_per_token(t: torch.Tensor) -> torch.Tensor:
    t32 = t.float()
    scale = _amax(t32, -1) / INT8_MAX
    return torch.round(t32 / scale).clamp(-INT8_MAX, INT8_MAX) * scale


def qdq_int8_static(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.float().reshape(())
    return torch.round(t.float() / s).clamp(-INT8_MAX, INT8_MAX) * s


def static_or(weights: ExpertWeights, dynamic: Callable, static: Callable) -> Callable:
    """The w8a8 activation quantizer ``(t, stage) -> t`` the Triton kernels apply: a stage whose static per-tensor
    scale the weights carry (``a13_scale`` / ``a2_scale``) uses it, the other stage ``dynamic(t)``."""
    scales = {"a13": weights.a13_scale, "a2": weights.a2_scale}
    return lambda t, stage: dynamic(t) if scales[stage] is None else static(t, scales[stage])


# ------------------------------------------------------------------------------------------------
# The shared base of the quantized methods.

@dataclass(frozen=True)
class CkptTensor:
    """One tensor of a pre-quantized checkpoint layout, under ``P.<name>`` for a FusedMoE at path ``P``.

    ``attr``: the layer attribute it becomes; ``shapes``: the accepted shapes, global expert count first;
    ``dtypes``: accepted dtypes (the first is what the layer stores); ``slice_experts``: under expert
    parallelism a rank keeps only its experts' rows (False: every rank keeps all, e.g. static input
    scales, whose maximum over all experts is the one activation scale). ``tp_dim``: under tensor parallelism
    the dim along the intermediate size that each rank keeps a slice of (None: replicated, e.g. per-tensor or
    w2's per-row scales), ``tp_halves``: that dim stacks the gate and up halves, each sliced (w13)."""

    attr: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    slice_experts: bool = True
    required: bool = True
    tp_dim: int | None = None
    tp_halves: bool = False


class QuantizedMethod(QuantMethod):
    """Online quantization from model-dtype weights, or pre-quantized tensors from a checkpoint.

    ``create_weights`` registers model-dtype ``w13``/``w2`` (so seeded init and Hugging Face loaders work
    unchanged); ``process_weights_after_loading`` replaces them with the quantized tensors and scales.
    A checkpoint holding the quantized names (``checkpoint_layout``) switches the layer to pre-quantized
    loading instead (``composer.quant.loading``).
    """

    # Measured and written in docs/quantization.md. OUTPUT_TOL: the model output vs the dequantized oracle
    # per model dtype (only methods that quantize activations need more than the dtype's tolerance; each
    # layer's experts always match to the dtype's tolerance). UNQUANT_BOUND: the documented bound of the
    # error vs the unquantized float64 oracle, per layer and for the output, per model dtype.
    OUTPUT_TOL: ClassVar[dict[str, float]] = {"float32": 0.0, "float16": 0.0, "bfloat16": 0.0}
    LAYER_TOL: ClassVar[dict[str, float]] = {}  # per-layer experts vs the dequantized oracle, beyond the dtype's
    UNQUANT_BOUND: ClassVar[dict[str, float]] = {}

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size: int,
                       dtype: torch.dtype, has_bias: bool, device: Any) -> None:
        E, H, I = num_experts, hidden_size, intermediate_size
        layer.w13 = new_param(E, 2 * I, H, dtype=dtype, device=device, loader=layer.weight_loader)
        layer.w2 = new_param(E, H, I, dtype=dtype, device=device, loader=layer.weight_loader)
        if has_bias:
            layer.w13_bias = new_param(E, 2 * I, dtype=dtype, device=device, loader=layer.weight_loader)
            layer.w2_bias = new_param(E, H, dtype=dtype, device=device, loader=layer.weight_loader)
        else:
            layer.register_parameter("w13_bias", None)
            layer.register_parameter("w2_bias", None)
        layer.quant_dtype = dtype  # the model dtype the weights came in
        layer.quant_state = "unprocessed"  # -> "prequantized" (checkpoint) -> "ready"

    # --- what subclasses define -----------------------------------------------------------------
    def checkpoint_layout(self, layer) -> dict[str, CkptTensor]:
        """Checkpoint name (under the layer path) -> how it is stored on the layer."""
        raise NotImplementedError

    def quantize_weights(self, layer, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Online quantization: layer attribute -> tensor (``w13``/``w2`` replaced by quantized ones)."""
        raise NotImplementedError

    def post_load(self, layer) -> None:
        """After a pre-quantized checkpoint was loaded: convert checkpoint variants to the layer's form."""

    @staticmethod
    def activation_quantizer(weights: ExpertWeights) -> Callable[[torch.Tensor, str], torch.Tensor] | None:
        """``f(t, stage)`` quantize-dequantizing a GEMM input (stage ``a13`` or ``a2``), or None (w*a16)."""
        return None

    def oracle_quantizer(self, layer) -> Callable[[torch.Tensor, str], torch.Tensor] | None:
        """The activation quantizer for the float64 oracle: a kernel quantizes a tensor it holds in the model
        dtype (the input, the intermediate it wrote), so the oracle rounds to that dtype before quantizing."""
        f = self.activation_quantizer(self.expert_weights(layer))
        if f is None:
            return None
        dt = layer.quant_dtype
        return lambda t, stage: f(t.to(dt), stage).to(t.dtype)  # f returns the exact float32 q * scale

    @classmethod
    def tolerances(cls, params: Any, dtype: str) -> tuple[float, float | None]:
        """(model-output tolerance vs the dequantized oracle, bound vs the unquantized oracle). A method that does not
        document a dtype (a plugin's, with no UNQUANT_BOUND) gets no output slack and no bound: task=check then
        reports its unquantized error without judging it (quant.checking.failures)."""
        return cls.OUTPUT_TOL.get(dtype, 0.0), cls.UNQUANT_BOUND.get(dtype)

    # --- the machinery --------------------------------------------------------------------------
    def process_weights_after_loading(self, layer) -> None:
        if layer.quant_state == "ready":
            return
        if layer.quant_state == "prequantized":
            self.post_load(layer)
        else:
            tensors = self.quantize_weights(layer, layer.w13.data, layer.w2.data)
            for attr, t in tensors.items():
                set_param(layer, attr, t)
        layer.quant_state = "ready"

    def checkpoint_tensors(self, layer) -> dict[str, torch.Tensor]:
        """The layer's quantized tensors under their checkpoint names (for ``save_checkpoint``)."""
        if layer.quant_state != "ready":
            raise ValueError("save the model after finish_loading (the weights are not quantized yet)")
        out = {}
        for name, spec in self.checkpoint_layout(layer).items():
            t = getattr(layer, spec.attr, None)
            if t is not None:
                out[name] = t.detach()
        return out


def set_param(layer, attr: str, t: torch.Tensor) -> None:
    """Replace (or add) a parameter on the layer, keeping the weight loader convention."""
    if attr in layer._parameters:
        del layer._parameters[attr]
    p = torch.nn.Parameter(t.contiguous(), requires_grad=False)
    layer.register_parameter(attr, p)


def check_multiple(key: str, value: Any, sizes: dict[str, int], of: int, what: str, advice: str
                   ) -> list[tuple[str, Any, str]]:
    bad = [f"{n} = {s}" for n, s in sizes.items() if s % of]
    if not bad:
        return []
    return [(key, value, f"{what} {of} must divide {' and '.join(bad)}; {advice}")]


def largest_pow2_divisor(*sizes: int, cap: int = 128) -> int:
    g = math.gcd(*sizes)
    p = 1
    while p * 2 <= cap and g % (p * 2) == 0:
        p *= 2
    return p


def check_shape(name: str, t: torch.Tensor, shapes: tuple[tuple[int, ...], ...], dtypes: tuple[torch.dtype, ...],
                method: str) -> None:
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise WeightLoadError(f"{name}: checkpoint tensor has shape {tuple(t.shape)}, {method} expects {want}")
    if t.dtype not in dtypes:
        raise WeightLoadError(f"{name}: checkpoint tensor has dtype {t.dtype}, {method} expects "
                              f"{' or '.join(str(d) for d in dtypes)}")
