"""The whole experts computation on Triton: align -> GEMM1 (+activation) -> GEMM2 (x weight, top-k sum)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..reference import check_float_weights, check_inputs
from ._jit import cdiv
from .align import max_blocks, moe_align
from .configs import fit_smem, get_config, heuristic_config
from .gemm import ACT_CODES, SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT, QuantSpec, gemm1, gemm2, moe_sum
from .gemv import _pow2_divisor, gemm1_parts, gemv, pdl_supported


@dataclass
class _Routing:
    """Where the (token, slot) pairs go, shared by both GEMMs: flat ids and weights, and the expert-sorted blocks
    (``decode``: one pair per program, the expert read from ``ids``; no align launch)."""

    ids: torch.Tensor
    tw: torch.Tensor
    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    ntpp: torch.Tensor
    num_pid_m: int
    direct: bool
    atomic: bool
    block_m: int


def _check_activation(activation: str) -> None:
    if activation not in ACT_CODES:
        raise ValueError(f"unknown activation '{activation}'; choose one of {', '.join(ACT_CODES)}")


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                  w2: torch.Tensor, w13_bias: torch.Tensor | None, w2_bias: torch.Tensor | None,
                  per_byte: int = 1) -> None:
    """Every backend's input checks (``reference.check_inputs``), and the activation dtypes the kernels take."""
    check_inputs(x, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias, per_byte)
    if x.dtype not in _DTYPES:
        raise ValueError(f"the Triton experts take float16, bfloat16 or float32 activations, got {x.dtype} "
                         "(kernel=torch computes in any floating dtype)")


def _route(topk_weights: torch.Tensor, topk_ids: torch.Tensor, E: int, config: dict[str, Any]) -> _Routing:
    T, k = topk_ids.shape
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:  # (an id outside [0, E) contributes nothing: mark it -1 before it could wrap)
        ids = torch.where((ids >= 0) & (ids < E), ids, -1).to(torch.int32)
    ids = ids.contiguous()
    tw = topk_weights.reshape(-1).to(torch.float32).contiguous()
    block_m = config["BLOCK_M"]
    direct = bool(config.get("decode", False))
    if direct:
        sorted_ids = expert_ids = ntpp = ids  # unused by the DIRECT kernels
        num_pid_m = T * k
    else:
        sorted_ids, expert_ids, ntpp = moe_align(ids.view(T, k), E, block_m)
        num_pid_m = max_blocks(T * k, E, block_m)
    # reduce "atomic" adds GEMM2's fp32 results (and a GEMV GEMM2's split-K partials) in whatever order they land, so
    # two calls can differ in the last bits; under torch.use_deterministic_algorithms(True) every config reduces as
    # "buffer" instead: one row per pair, added by moe_sum in top-k order, a GEMV GEMM2 unsplit (GEMM1's split-K
    # partials are added in a fixed order already, and every GEMM row is computed alike wherever the align kernel's
    # atomics placed it)
    atomic = config.get("reduce", "atomic") == "atomic" and not torch.are_deterministic_algorithms_enabled()
    return _Routing(ids, tw, sorted_ids, expert_ids, ntpp, num_pid_m, direct, atomic, block_m)


def _out_buffer(r: _Routing, x: torch.Tensor, H: int) -> torch.Tensor:
    """GEMM2's output: fp32 ``[T, H]`` for atomic adds, or one row per pair in the activations' dtype (as vLLM's
    moe_sum; rows of dropped pairs are left unwritten), summed over top-k by ``_reduce``."""
    if r.atomic:
        return torch.zeros(x.shape[0], H, dtype=torch.float32, device=x.device)
    return torch.empty(r.ids.numel(), H, dtype=x.dtype, device=x.device)


def _reduce(out: torch.Tensor, r: _Routing, x: torch.Tensor, num_experts: int) -> torch.Tensor:
    if not r.atomic:
        return moe_sum(out, r.ids, r.ids.numel() // x.shape[0] if x.shape[0] else 1, num_experts)
    return out if out.dtype == x.dtype else out.to(x.dtype)


# GEMV decode with reduce="atomic": zero the sums in GEMM1 and cast in GEMM2's last-arriving program (two launches
# instead of four); False: a memset and a cast launch around them (kept for A/B runs and tests)
GEMV_FUSED_EPILOGUE = True


def _decode_gemv(x, r: _Routing, k: int, activation: str, config: dict[str, Any], w13, w2, w13_bias, w2_bias,
                 inter: torch.Tensor, wq: int = 0, ws: int = 1, groups: tuple[int, int] = (1, 1),
                 scales: tuple = (None, None), act_scales: tuple = (None, None), zeros: tuple = (None, None),
                 aq: tuple[int, int] = (0, 0), acc_int8: bool = False) -> torch.Tensor:
    """``"decode": "gemv"`` (T = 1, or a table's small-T key): both GEMMs as GEMVs, one pair per program (gemv.py).
    With atomic reduction the top-k epilogue (zeroing the fp32 sums, the final cast) rides in the two GEMV launches
    (``GEMV_FUSED_EPILOGUE``)."""
    T, H = x.shape
    epi = None
    if r.atomic and GEMV_FUSED_EPILOGUE:
        sums = torch.empty(T, H, dtype=torch.float32, device=x.device)
        counters = torch.empty(T * cdiv(H, config["gemm2"]["BLOCK_N"]), dtype=torch.int32, device=x.device)
        epi = (sums, counters, torch.empty_like(x))
    parts = gemm1_parts(config["gemm1"], H, w13, wq, groups[0])
    if parts > 1 and config["gemm2"].get("mma") and wq not in (2, 3):  # (before any launch; int4 ignores mma)
        raise ValueError("gemm1.SPLIT_K > 1 (GEMM2 activating GEMM1's partial sums) combines with gemm2.mma=true "
                         "only for w8a8 methods; use gemm1.SPLIT_K = 1 or gemm2.mma = false")
    if parts > 1:  # GEMM1 split over K leaves fp32 partial (gate, up) sums; GEMM2 activates them as it loads
        inter = torch.empty(parts, r.ids.numel(), w13.shape[1], dtype=torch.float32, device=x.device)
    act = dict(activation_code=ACT_CODES[activation], alpha=SWIGLUOAI_ALPHA, limit=SWIGLUOAI_LIMIT)
    out = epi[0] if epi else _out_buffer(r, x, H)  # (before GEMM1: nothing may launch between a "pdl" pair)
    pdl = bool(config.get("pdl")) and pdl_supported(x.device)
    gemv(x, w13, w13_bias, inter, r.ids, k, config["gemm1"], gated=True, wq=wq, ws=ws, group=groups[0],
         a_scale=act_scales[0], w_scale=scales[0], w_zero=zeros[0], aq=aq[0], acc_int8=acc_int8, epilogue=epi,
         pdl=1 if pdl else 0, **act)
    gemv(inter, w2, w2_bias, out, r.ids, k, config["gemm2"], gated=False, tw=r.tw, atomic=r.atomic, wq=wq, ws=ws,
         group=groups[1], a_scale=act_scales[1], w_scale=scales[1], w_zero=zeros[1], aq=aq[1], acc_int8=acc_int8,
         epilogue=epi, x_parts=parts if parts > 1 else 0, h_dtype=x.dtype, pdl=2 if pdl else 0, **act)
    return epi[2] if epi else _reduce(out, r, x, w2.shape[0])


def _gemv_reads_rows(config: dict[str, Any], w13: torch.Tensor, w2: torch.Tensor, E: int, I: int, H: int,
                     k: int) -> dict[str, Any]:
    """A "gemv" decode entry where it can run: the GEMVs read weight rows contiguous along K, so weights stored
    otherwise (a transposed view) take the tl.dot decode, which reads any strides (the same result)."""
    if config.get("decode") == "gemv" and (w13.stride(2) != 1 or w2.stride(2) != 1):
        return heuristic_config(1, E, I, H, k)
    return config


def fused_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: str = "silu",
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])`` -> ``[T, H]`` in x.dtype; ids outside
    ``[0, E)`` (the -1 of dropped pairs) are skipped.

    ``config`` overrides the tile config (see ``configs.py``); by default the tuned file or heuristic.
    """
    _check_activation(activation)
    _check_inputs(x, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias)
    T, H = x.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    k = topk_ids.shape[1]
    if T == 0 or k == 0:
        return torch.zeros_like(x)
    check_float_weights(x, w13, w2)
    if config is None:
        config = get_config(T, E, I, H, k, x.dtype, x.device)
    config = _gemv_reads_rows(config, w13, w2, E, I, H, k)
    if x.element_size() > 2:
        config = fit_smem(config, x.element_size())
    if x.stride(1) != 1:
        x = x.contiguous()
    r = _route(topk_weights, topk_ids, E, config)
    inter = torch.empty(T * k, I, dtype=x.dtype, device=x.device)
    if config.get("decode") == "gemv":
        return _decode_gemv(x, r, k, activation, config, w13, w2, w13_bias, w2_bias, inter)
    gemm1(x, w13, w13_bias, inter, r.sorted_ids, r.expert_ids, r.ntpp, r.ids, r.num_pid_m, k,
          activation, r.direct, r.block_m, config["gemm1"])
    out = _out_buffer(r, x, H)
    gemm2(inter, w2, w2_bias, r.tw, out, r.sorted_ids, r.expert_ids, r.ntpp, r.ids, r.num_pid_m, k,
          r.direct, r.atomic, r.block_m, config["gemm2"])
    return _reduce(out, r, x, w2.shape[0])


# ------------------------------------------------------------------------------------------------
# Quantized experts (docs/quantization.md, "For the Triton backend").

QUANT_METHODS = ("int8_w8a16", "int4_w4a16", "int8_w8a8", "fp8_w8a8")
WS_CODES = {"per_tensor": 0, "per_token_channel": 1, "block": 2}


def _shape_gemm(g: dict[str, Any], q: QuantSpec) -> dict[str, Any]:
    g = dict(g)
    if q.wq == 2:  # int4: keep the K tile inside one scale group where that leaves a sane tile (GROUP_TILE);
        # the even and odd halves of the tile are two dots of K = BLOCK_K / 2 >= 16
        g["BLOCK_K"] = max(g["BLOCK_K"], 32)
        d = _pow2_divisor(q.qbk, g["BLOCK_K"])
        if d >= 32:
            g["BLOCK_K"] = d
    elif q.wq == 3 and q.ws == 2:  # block fp8: the K tile must lie inside one scale block
        d = _pow2_divisor(q.qbk, g["BLOCK_K"])
        if d < 16:
            raise ValueError(f"block fp8 on Triton needs a block K of a multiple of 16, got {q.qbk}")
        g["BLOCK_K"] = d
    elif q.wq == 3:  # fp8 / int8 tensor-core dots take K tiles of 32
        g["BLOCK_K"] = max(g["BLOCK_K"], 32)
    return g


W8A8_MIN_BLOCK_K = 128


def w8a8_tiles(cfg: dict[str, Any]) -> dict[str, Any]:
    """A model-dtype tile config adapted to w8a8 weights: K tiles of at least 128 one-byte elements, the bytes per
    pipeline stage of a 64-wide bf16 tile, and half the fp32 promotions of the fp8 dots (FP8_PROMOTE). On an
    H100 at T = 4096 (bf16 tiles of K 64 -> 128, promotion every tile): mixtral 6637 -> 4697 us, qwen3 951 -> 800,
    deepseek_v3 11122 -> 7588, errors unchanged (5e-3 vs kernel=torch)."""
    if cfg.get("decode") == "gemv":
        return cfg
    out = dict(cfg)
    for name in ("gemm1", "gemm2"):
        out[name] = {**cfg[name], "BLOCK_K": max(cfg[name]["BLOCK_K"], W8A8_MIN_BLOCK_K)}
    return out


def quant_config(T: int, E: int, I: int, H: int, k: int, method: str, dtype: torch.dtype, device: Any
                 ) -> dict[str, Any]:
    """A tuned file for the method (``dtype=<method>``) if one exists, else the model dtype's tuned tiles (for
    w8a8 with the K tile widened, ``w8a8_tiles``)."""
    cfg = get_config(T, E, I, H, k, method, device)
    if cfg.get("source") == "heuristic":
        cfg = get_config(T, E, I, H, k, dtype, device)
        if method in ("fp8_w8a8", "int8_w8a8"):
            cfg = w8a8_tiles(cfg)
    return cfg


def _check_scales(method: str, E: int, I: int, H: int, w13_scale, w2_scale, w13_zero, w2_zero, granularity: str,
                  block_n: int, block_k: int) -> None:
    """The scale (and zero-point) layouts ``composer.quant`` gives each method, checked against the weights."""
    def want(name, t, shape):
        if t is None or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{method}: {name} must be {list(shape)} for these weights (E={E}, I={I}, H={H}), got "
                             f"{None if t is None else tuple(t.shape)}")

    if method == "int4_w4a16":
        for name, t, rows, K in (("w13_scale", w13_scale, 2 * I, H), ("w2_scale", w2_scale, H, I)):
            groups = t.shape[-1] if t is not None and t.dim() == 3 else 0
            if not groups or K % groups or (K // groups) % 2:
                raise ValueError(f"int4_w4a16: {name} must be [E, {rows}, K / group] with an even group dividing "
                                 f"K = {K}, got {None if t is None else tuple(t.shape)}")
            want(name, t, (E, rows, groups))
        for name, z, s in (("w13_zero", w13_zero, w13_scale), ("w2_zero", w2_zero, w2_scale)):
            if z is not None:
                want(name, z, (E, (s.shape[1] + 1) // 2, s.shape[2]))
    elif method in ("int8_w8a16", "int8_w8a8") or granularity == "per_token_channel":
        want("w13_scale", w13_scale, (E, 2 * I, 1))
        want("w2_scale", w2_scale, (E, H, 1))
    elif granularity == "per_tensor":
        want("w13_scale", w13_scale, (E,))
        want("w2_scale", w2_scale, (E,))
    else:
        want("w13_scale", w13_scale, (E, -(-2 * I // block_n), -(-H // block_k)))
        want("w2_scale", w2_scale, (E, -(-H // block_n), -(-I // block_k)))


# what composer.quant stores for each method (quant/int8.py, int4.py, fp8.py): the kernels reinterpret these bytes
_WEIGHT_DTYPES = {"int8_w8a16": torch.int8, "int8_w8a8": torch.int8, "int4_w4a16": torch.uint8,
                  "fp8_w8a8": torch.float8_e4m3fn}
_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_quant_dtypes(method: str, granularity: str, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                        scales: dict[str, torch.Tensor | None]) -> None:
    """The dtypes (and devices) of a quantized call: the kernels read the weights as the method's integer / fp8 codes
    and the scales as floats, whatever the tensors hold, so another dtype gives a silent wrong answer; an activation
    or zero-point tensor the method does not use would be ignored just as silently."""
    if method == "fp8_w8a8" and granularity not in WS_CODES:
        raise ValueError(f"fp8_w8a8: unknown granularity '{granularity}'; choose one of {', '.join(WS_CODES)}")
    want = _WEIGHT_DTYPES[method]
    for name, w in (("w13", w13), ("w2", w2)):
        if w.dtype != want:
            raise ValueError(f"{method}: {name} must hold the quantized weights as {want} (what composer.quant "
                             f"stores for {method}), got {w.dtype}; quantize them with the method, or call "
                             "fused_experts for unquantized weights")
    static_ok = method == "int8_w8a8" or (method == "fp8_w8a8" and granularity != "block")
    for name, t in scales.items():
        if t is None:
            continue
        if name.startswith("a") and not static_ok:
            raise ValueError(f"{method}{' (block)' if method == 'fp8_w8a8' else ''}: {name} is not used (static "
                             "activation scales are for int8_w8a8 and fp8_w8a8 per_tensor / per_token_channel); "
                             "pass None")
        if name.endswith("zero"):
            if method != "int4_w4a16":
                raise ValueError(f"{method}: {name} is not used (zero points are for int4_w4a16); pass None")
            if t.dtype != torch.uint8:
                raise ValueError(f"int4_w4a16: {name} must be the packed uint8 zero points, got {t.dtype}")
        elif t.dtype not in _SCALE_DTYPES:
            raise ValueError(f"{method}: {name} must be a float32, float16 or bfloat16 tensor of dequantization "
                             f"multipliers, got {t.dtype}; convert it, e.g. {name}.float()")
        if name.startswith("a") and t.numel() != 1:
            raise ValueError(f"{method}: {name} is one static per-tensor scale and must have one element, got shape "
                             f"{tuple(t.shape)}; reduce it, e.g. {name}.amax()")
        if t.device != x.device:
            raise ValueError(f"{method}: {name} is on {t.device}, the hidden states on {x.device}: put them on one "
                             "device")


def fused_experts_quant(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    activation: str,
    method: str,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    a13_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    w13_zero: torch.Tensor | None = None,
    w2_zero: torch.Tensor | None = None,
    granularity: str = "per_token_channel",
    block_n: int = 128,
    block_k: int = 128,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The quantized experts: ``method`` in QUANT_METHODS with the layouts of ``composer.quant``.

    w*a16 dequantize the weights tile by tile inside the GEMMs (exactly as ``kernel=torch`` dequantizes them,
    rounded to the model dtype); w8a8 quantize each GEMM input by rows (``quant.quant_rows``: the input once,
    the model-dtype intermediate once) and multiply the quantized values, fp32 (fp8) or int32 (int8)
    accumulation, with the scales applied per K tile (block fp8) or in the epilogue.
    """
    from .quant import quant_rows

    _check_activation(activation)
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quant method '{method}' for the Triton experts; choose one of {QUANT_METHODS}")
    _check_quant_dtypes(method, granularity, x, w13, w2,
                        {"w13_scale": w13_scale, "w2_scale": w2_scale, "a13_scale": a13_scale, "a2_scale": a2_scale,
                         "w13_zero": w13_zero, "w2_zero": w2_zero})
    _check_inputs(x, topk_weights, topk_ids, w13, w2, w13_bias, w2_bias, 2 if method == "int4_w4a16" else 1)
    T, H = x.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    k = topk_ids.shape[1]
    _check_scales(method, E, I, H, w13_scale, w2_scale, w13_zero, w2_zero, granularity, block_n, block_k)
    if T == 0 or k == 0:
        return torch.zeros_like(x)
    if config is None:
        config = quant_config(T, E, I, H, k, method, x.dtype, x.device)
    act_q = None
    if method == "int8_w8a16":
        q1 = q2 = QuantSpec(wq=1)
    elif method == "int4_w4a16":
        q1 = QuantSpec(wq=2, qbk=H // w13_scale.shape[-1])
        q2 = QuantSpec(wq=2, qbk=I // w2_scale.shape[-1])
    elif method == "int8_w8a8":
        q1 = q2 = QuantSpec(wq=3, ws=1, acc_int=True)
        act_q = (torch.int8, None)
    else:
        ws = WS_CODES[granularity]
        q1 = q2 = QuantSpec(wq=3, ws=ws, qbn=block_n if ws == 2 else 1, qbk=block_k if ws == 2 else 1)
        act_q = (torch.float8_e4m3fn, block_k if ws == 2 else None)
    if config.get("decode") == "gemv" and q1.wq == 3 and q1.ws == 2:  # block fp8: the tl.dot decode path
        config = heuristic_config(1, E, I, H, k)
    config = _gemv_reads_rows(config, w13, w2, E, I, H, k)
    if x.element_size() > 2:  # (after the entry is final)
        config = fit_smem(config, x.element_size())
    c1 = _shape_gemm(config["gemm1"], q1)
    c2 = _shape_gemm(config["gemm2"], q2)
    if x.stride(1) != 1:
        x = x.contiguous()
    r = _route(topk_weights, topk_ids, E, config)
    if config.get("decode") == "gemv":  # (block fp8 was moved to the tl.dot decode above)
        aq = (2 if a13_scale is not None else 1, 2 if a2_scale is not None else 1) if act_q is not None else (0, 0)
        inter = torch.empty(T * k, I, dtype=x.dtype, device=x.device)
        return _decode_gemv(x, r, k, activation, config, w13, w2, w13_bias, w2_bias, inter, wq=q1.wq, ws=q1.ws,
                            groups=(q1.qbk, q2.qbk), scales=(w13_scale, w2_scale),
                            act_scales=(a13_scale if a13_scale is None else a13_scale.reshape(1).float(),
                                        a2_scale if a2_scale is None else a2_scale.reshape(1).float()),
                            zeros=(w13_zero, w2_zero), aq=aq, acc_int8=q1.acc_int)

    # FUSED_AQ: at decode (one pair per program) each program quantizes its own row (amax pre-pass, the cast in
    # registers; bit for bit quant_rows' rule), saving two launches; 2: a static per-tensor scale
    fuse = r.direct and act_q is not None and act_q[1] is None
    aq1 = (2 if a13_scale is not None else 1) if fuse else 0
    aq2 = (2 if a2_scale is not None else 1) if fuse else 0
    a1, s1 = x, (a13_scale.reshape(1).float() if aq1 == 2 else None)
    if act_q is not None and not fuse:
        a1, s1 = quant_rows(x, act_q[0], act_q[1], a13_scale)
    inter = torch.empty(T * k, I, dtype=x.dtype, device=x.device)
    gemm1(a1, w13, w13_bias, inter, r.sorted_ids, r.expert_ids, r.ntpp, r.ids, r.num_pid_m, k,
          activation, r.direct, r.block_m, c1, q1, s1, w13_scale, w13_zero, aq=aq1)
    a2, s2 = inter, (a2_scale.reshape(1).float() if aq2 == 2 else None)
    if act_q is not None and not fuse:
        a2, s2 = quant_rows(inter, act_q[0], act_q[1], a2_scale)
    out = _out_buffer(r, x, H)
    gemm2(a2, w2, w2_bias, r.tw, out, r.sorted_ids, r.expert_ids, r.ntpp, r.ids, r.num_pid_m, k,
          r.direct, r.atomic, r.block_m, c2, q2, s2, w2_scale, w2_zero, aq=aq2)
    return _reduce(out, r, x, w2.shape[0])
