"""The torch reference experts computation and the float64 oracle.

``torch_experts`` is exact and sort-based: (token, slot) pairs are grouped by expert and each expert
that received tokens runs one GEMM pair. It reads ``.tolist()`` of the per-expert counts, so it is
not graph-capturable; compile and CUDA graphs use the Triton or grouped_mm kernels.

``oracle_experts`` is an independent, deliberately plain formulation (per-expert masks, float64) that
``task=check`` and the tests compare everything against.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..layers.activation import act_and_mul


def check_inputs(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor, w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
                 per_byte: int = 1) -> None:
    """Shapes, id dtype and devices of an experts call, for every backend (the Triton kernels index with them
    unchecked: a mismatch would read and write out of bounds). ``per_byte``: weight elements per stored element
    along K (2 for packed int4). Metadata only (no host sync), so it holds under torch.compile and CUDA graphs."""
    if x.dim() != 2:
        raise ValueError(f"hidden states must be [T, H], got shape {tuple(x.shape)}")
    check_activation_dtype(x)
    T, H = x.shape
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be "
                         f"[T={T}, k] (x is {tuple(x.shape)})")
    check_ids_dtype(topk_ids)
    if not topk_weights.dtype.is_floating_point:
        raise ValueError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 and w2 must be [E, 2I, H] and [E, H, I], got {tuple(w13.shape)} and {tuple(w2.shape)}")
    E, two_i = w13.shape[0], w13.shape[1]
    I = two_i // 2
    want13, want2 = (E, 2 * I, H // per_byte), (E, H, I // per_byte)
    packed = f" ({per_byte} weights per stored element along K)" if per_byte > 1 else ""
    if two_i % 2 or H % per_byte or I % per_byte or tuple(w13.shape) != want13 or tuple(w2.shape) != want2:
        raise ValueError(f"weights do not fit x {tuple(x.shape)}: w13 {tuple(w13.shape)} (want [E, 2I, H] = "
                         f"{list(want13)}), w2 {tuple(w2.shape)} (want [E, H, I] = {list(want2)}){packed}")
    for name, b, want in (("w13_bias", w13_bias, (E, 2 * I)), ("w2_bias", w2_bias, (E, H))):
        if b is not None and tuple(b.shape) != want:
            raise ValueError(f"{name} must be {list(want)}, got {tuple(b.shape)}")
    for name, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids), ("w13", w13), ("w2", w2),
                    ("w13_bias", w13_bias), ("w2_bias", w2_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, the hidden states on {x.device}: put them on one device")


def check_ids_dtype(topk_ids: torch.Tensor) -> None:
    """Integer expert ids, of any integer dtype: every backend reads them as int64 or int32 values (ids outside
    [0, E) skipped). A float id would be truncated into some expert, a bool one read as a mask."""
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor of expert ids (e.g. int32 or int64), got "
                         f"{topk_ids.dtype}; pass integer ids, e.g. topk_ids.to(torch.int32)")


def check_float_weights(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """Unquantized weights in the hidden states' dtype, for every backend: otherwise one side is cast silently (an
    fp16 x computed in the weights' bf16 and returned as fp16)."""
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"weights ({w13.dtype}, {w2.dtype}) must have the activations' dtype {x.dtype}; cast the "
                         f"hidden states to the model dtype, x.to({w13.dtype})")


def check_activation_dtype(x: torch.Tensor) -> None:
    """Floating hidden states only: integer ones would be multiplied and returned in their integer dtype, a silent
    wrong answer."""
    if not x.dtype.is_floating_point:
        raise ValueError(f"hidden states must be floating point (the model dtype), got {x.dtype}; "
                         "cast them, e.g. x.to(torch.bfloat16)")


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Token, slot) pairs grouped by expert, without a host sync: ``(keys_sorted, order, counts)``.

    ``order`` indexes the flattened ``[T*k]`` pairs (``order // k`` is the token); ids outside
    ``[0, E)`` (the -1 of other ranks' experts) get the key E and sort last; ``counts [E+1]`` int32
    counts each key, the last entry those skipped pairs.
    """
    ids = topk_ids.reshape(-1).to(torch.int64)
    keys = torch.where((ids >= 0) & (ids < num_experts), ids, torch.full_like(ids, num_experts))
    keys_sorted, order = torch.sort(keys, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_ids.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))
    return keys_sorted, order, counts


def torch_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    quant_act: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{ids[t,k]}(x[t]); ids outside [0, E) (-1: dropped) are skipped.
    Returns ``[T, H]`` in x.dtype.

    The GEMMs multiply the weights' values in float32 (products of bf16 / fp16 values are exact there) with
    float32 sums; the gated activation runs on GEMM1's float32 result and is rounded to the activations' dtype
    once, as a fused kernel writing its intermediate does (composer's Triton GEMM1 epilogue); GEMM2's result
    and the sum over top-k stay float32 until the output is cast. (Rounding GEMM1's output and the activation
    separately, as a chain of model-dtype ops would, put ~1e-2 of bf16 error on tiny layers.)
    ``quant_act(t, stage)`` (w8a8 methods) quantize-dequantizes the input of GEMM1 (stage ``a13``) and of GEMM2
    (stage ``a2``) as the quantized kernel does.
    """
    check_inputs(x, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias)
    T, H = x.shape
    E = w13.shape[0]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    if T == 0:
        return out.to(x.dtype)
    _, order, counts = sort_by_expert(topk_ids, E)
    counts = counts[:E].tolist()
    token_of = order // topk_ids.shape[1]
    weight_of = topk_weights.reshape(-1)[order].to(torch.float32)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of[start:start + n]
        xe = x[rows].to(w13.dtype)
        if quant_act is not None:
            xe = quant_act(xe, "a13")
        h = xe.float() @ w13[e].float().t()
        if w13_bias is not None:
            h = h + w13_bias[e].float()
        a = act_and_mul(activation, h).to(x.dtype)  # the intermediate as the kernel writes it
        if quant_act is not None:
            a = quant_act(a.float(), "a2")  # (the dequantized activation stays float32, never rounded)
        o = a.float() @ w2[e].float().t()
        if w2_bias is not None:
            o = o + w2_bias[e].float()
        out.index_add_(0, rows, o * weight_of[start:start + n, None])
        start += n
    return out.to(x.dtype)


def oracle_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    quant_act: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The float64 oracle: for every expert, every (token, slot) routed to it, in float64. Returns float64."""
    check_inputs(x, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias)
    d = torch.float64
    x64, w64 = x.to(d), topk_weights.to(d)
    out = torch.zeros(x.shape, dtype=d, device=x.device)
    for e in range(w13.shape[0]):
        hit = topk_ids == e  # [T, k]
        if not bool(hit.any()):
            continue
        tok, slot = hit.nonzero(as_tuple=True)
        xe = x64[tok] if quant_act is None else quant_act(x64[tok], "a13")
        h = xe @ w13[e].to(d).t()
        if w13_bias is not None:
            h = h + w13_bias[e].to(d)
        a = act_and_mul(activation, h)
        if quant_act is not None:
            a = quant_act(a, "a2")
        o = a @ w2[e].to(d).t()
        if w2_bias is not None:
            o = o + w2_bias[e].to(d)
        out.index_add_(0, tok, o * w64[tok, slot, None])
    return out
