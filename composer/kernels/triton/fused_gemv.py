"""One-launch int4 decode (``"decode": "fused_gemv"`` in a tile config): both GEMMs in one grid, no program waits.

The two-launch GEMV decode (gemv.py) cannot start GEMM2 before GEMM1 is done: GEMM2 reduces over the whole
intermediate row. Split GEMM2's K (= I) the way GEMM1's N is split and the dependency is gone: the program of
(pair, chunk c of C intermediate channels) computes its C gate and C up rows of w13 (the "chain" int4 read of
gemv.py), activates them into h[c], and at once adds ``w2[:, c] @ h[c]``, all H outputs, into the token's fp32
sums with atomic adds. GEMM2's weights are read along I in slices of C nibbles per row (C / 8 words); the rows'
sectors are shared by the neighbouring chunks, which read them at about the same time (from L2).

The top-k epilogue rides along as in the two-launch decode: the last program to arrive at a token (top_k * I / C
arrivals) casts its sums to the model dtype. The sums and arrival counters are zeroed by one memset before the
launch (no program can zero what another may already be adding into).

Only for w4a16 (int4): its activations stay in the model dtype, so a chunk of h needs nothing from the rest of
the row. w8a8 quantizes the intermediate by whole rows (amax over I), which would need every chunk first.
"""
from __future__ import annotations

from typing import Any

import torch
import triton.language as tl

from ._jit import cdiv, lazy_jit
from .gemm import _activate
from .gemv import CHAIN_X_PAIRS, SUBNORMAL_X_EXP, _chain_rows, _eight, _pow2, chain_scales_transposed


@lazy_jit
def _fused_gemv_kernel(
    x_ptr, w13_ptr, w2_ptr, b13_ptr, b2_ptr, tw_ptr, ids_ptr, s13_ptr, s2_ptr, z13_ptr, z2_ptr, sums_ptr, cnt_ptr,
    y_ptr,
    I, H, top_k, num_experts, arrivals,
    stride_xm, stride_w13e, stride_w13n, stride_w2e, stride_w2n, stride_b13e, stride_b2e, stride_ym,
    stride_s13e, stride_s13n, stride_s13k, stride_s2e, stride_s2n, stride_s2k,
    stride_z13e, stride_z13n, stride_z13k, stride_z2e, stride_z2n, stride_z2k,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, QBK1: tl.constexpr, QBK2: tl.constexpr,
    HAS_ZERO: tl.constexpr, HAS_B13: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
    SUB_X: tl.constexpr, X_PAIRS: tl.constexpr, SCALES_T: tl.constexpr, UNROLL: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    token = (pair // top_k).to(tl.int64)
    expert = tl.load(ids_ptr + pair)
    if (expert >= 0) & (expert < num_experts):  # else dropped (another rank's expert): it only arrives
        e = expert.to(tl.int64)
        # GEMM1 part: rows 2j / 2j + 1 are gate / up channel n0 + j (gemv.py's GATED tile)
        r = tl.arange(0, 2 * BLOCK_N)
        ch = pid_n * BLOCK_N + r // 2 + (r % 2) * I
        x_row = x_ptr + token * stride_xm
        acc = _chain_rows(w13_ptr + e * stride_w13e + ch.to(tl.int64) * stride_w13n, x_row, s13_ptr + e * stride_s13e,
                          ch, z13_ptr + e * stride_z13e + (ch // 2) * stride_z13n, (ch % 2) * 4, 0, H, stride_s13n,
                          stride_s13k, stride_z13k, 0, 2 * BLOCK_N, BLOCK_K, QBK1, HAS_ZERO, 0, ACT, ALPHA, LIMIT, 0,
                          SUB_X, X_PAIRS, SCALES_T, UNROLL, LOOP_STAGES)
        if HAS_B13:
            acc += tl.load(b13_ptr + e * stride_b13e + ch).to(tl.float32)
        g, u = tl.split(tl.reshape(acc, (BLOCK_N, 2)))
        h = _activate(g, u, ACT, ALPHA, LIMIT).to(x_ptr.dtype.element_ty).to(tl.float32)  # (the reference's rounding)
        # GEMM2 part: out[n] += tw * sum_j w2[n, c0 + j] h[j] for every n, the C = BLOCK_N nibbles of a row being
        # BLOCK_N / 8 words inside one scale group. Nibble m of word i (h[8 i + m]) is read in place as the subnormal
        # q * 2^(b - 149) as in the chain read, its h pre-scaled by 2^(SUB_X - b).
        hs = _eight(tl.reshape(h, (BLOCK_N // 8, 2, 2, 2)))
        sh = tl.sum(h, 0)
        tw = tl.load(tw_ptr + pair)
        grp = (pid_n * BLOCK_N) // QBK2
        kw = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        w2_base = w2_ptr + e * stride_w2e
        for h0 in tl.range(0, H, BLOCK_H):
            n = h0 + tl.arange(0, BLOCK_H)
            n_ok = n < H
            nc = tl.minimum(n, H - 1)  # (in-bounds loads past the edge)
            wt = tl.load(w2_base + nc.to(tl.int64)[:, None] * stride_w2n + kw[None, :])
            wh = (wt.to(tl.uint32, bitcast=True) >> 12).to(tl.int32, bitcast=True)
            p = tl.full((BLOCK_H, BLOCK_N // 8), 0.0, tl.float32)
            for m in tl.static_range(8):
                if m <= 4:
                    b = 4 * m
                    t = wt & (0xF << b)
                else:
                    b = 4 * m - 12
                    t = wh & (0xF << b)
                p += t.to(tl.float32, bitcast=True) * (hs[m] * _pow2(SUB_X - b))[None, :]
            q = tl.sum(p, 1) * _pow2(149 - SUB_X)
            s = tl.load(s2_ptr + e * stride_s2e + nc * stride_s2n + grp * stride_s2k).to(tl.float32)
            if HAS_ZERO:
                z = ((tl.load(z2_ptr + e * stride_z2e + (nc // 2) * stride_z2n + grp * stride_z2k) >> ((nc % 2) * 4))
                     & 0xF).to(tl.float32)
            else:
                z = 8.0
            o = s * (q - z * sh)
            if HAS_B2:
                o += tl.where(pid_n == 0, tl.load(b2_ptr + e * stride_b2e + nc).to(tl.float32), 0.0)
            tl.atomic_add(sums_ptr + token * H + n, o * tw, mask=n_ok, sem="relaxed")
    # the last of the token's top_k * I / C programs writes y = its sums, cast
    tl.debug_barrier()
    c = tl.atomic_add(cnt_ptr + token, 1, sem="acq_rel")
    if c == arrivals - 1:
        for h0 in tl.range(0, H, BLOCK_H):
            n = h0 + tl.arange(0, BLOCK_H)
            v = tl.load(sums_ptr + token * H + n, mask=n < H, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + token * stride_ym + n, v.to(y_ptr.dtype.element_ty), mask=n < H)


def fused_gemv_fits(cfg: dict[str, Any], I: int, H: int, group1: int, group2: int) -> str | None:
    """Why a "fused_gemv" entry cannot run this shape (None: it can): GEMM1's chain read wants whole 32-element
    words per thread inside a scale group and whole K tiles; each chunk of BLOCK_N channels lies inside one of
    GEMM2's scale groups and inside I."""
    bn, bk = cfg["gemm1"]["BLOCK_N"], cfg["gemm1"]["BLOCK_K"]
    if bn % 8 or bn & (bn - 1):
        return f"gemm1.BLOCK_N={bn} must be a power of two >= 8"
    if I % bn or group2 % bn:
        return f"gemm1.BLOCK_N={bn} must divide I={I} and the w2 scale group {group2}"
    if group1 % 32 or bk % 32 or H % bk:
        return f"the chain read needs the w13 scale group ({group1}) and BLOCK_K ({bk}) multiples of 32 dividing H={H}"
    return None


def fused_gemv(x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, top_k: int, activation_code: int, cfg: dict,
               w13: torch.Tensor, w2: torch.Tensor, w13_bias: torch.Tensor | None, w2_bias: torch.Tensor | None,
               w13_scale: torch.Tensor, w2_scale: torch.Tensor, w13_zero: torch.Tensor | None,
               w2_zero: torch.Tensor | None, group1: int, group2: int, alpha: float, limit: float) -> torch.Tensor:
    """The experts' output [T, H] in x's dtype, in one memset and one launch (int4_w4a16 weights, packed two per
    byte along K, as composer.quant lays them out)."""
    T, H = x.shape
    I = w13.shape[1] // 2
    why = fused_gemv_fits(cfg, I, H, group1, group2)
    if why is not None:
        raise ValueError(f"decode 'fused_gemv' cannot run this shape: {why}")
    g1 = cfg["gemm1"]
    bn = g1["BLOCK_N"]
    ws = torch.zeros(T * H + T, dtype=torch.float32, device=x.device)  # fp32 sums, then int32 arrival counters
    sums, counters = ws[:T * H], ws[T * H:].view(torch.int32)
    y = torch.empty_like(x)
    w13i, w2i = w13.view(torch.int32), w2.view(torch.int32)
    z1 = list(w13_zero.stride()) if w13_zero is not None else [0, 0, 0]
    z2 = list(w2_zero.stride()) if w2_zero is not None else [0, 0, 0]
    fb = w13i
    grid = (ids.numel(), I // bn)
    _fused_gemv_kernel[grid](
        x, w13i, w2i, w13_bias if w13_bias is not None else fb, w2_bias if w2_bias is not None else fb, tw, ids,
        w13_scale, w2_scale, w13_zero if w13_zero is not None else fb, w2_zero if w2_zero is not None else fb,
        sums, counters, y,
        I, H, top_k, w13.shape[0], top_k * (I // bn),
        x.stride(0), w13i.stride(0), w13i.stride(1), w2i.stride(0), w2i.stride(1),
        w13_bias.stride(0) if w13_bias is not None else 0, w2_bias.stride(0) if w2_bias is not None else 0,
        y.stride(0),
        *w13_scale.stride(), *w2_scale.stride(), *z1, *z2,
        BLOCK_N=bn, BLOCK_K=g1["BLOCK_K"], BLOCK_H=cfg["gemm2"]["BLOCK_N"], QBK1=group1, QBK2=group2,
        HAS_ZERO=w13_zero is not None, HAS_B13=w13_bias is not None, HAS_B2=w2_bias is not None, ACT=activation_code, ALPHA=alpha, LIMIT=limit,
        SUB_X=SUBNORMAL_X_EXP,
        X_PAIRS=CHAIN_X_PAIRS and x.dtype == torch.bfloat16 and x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0,
        SCALES_T=chain_scales_transposed(), UNROLL=int(g1.get("unroll", 1)), LOOP_STAGES=g1.get("loop_stages"),
        num_warps=g1.get("num_warps", 4), num_stages=g1.get("num_stages", 2),
    )
    return y
