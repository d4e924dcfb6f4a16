"""int4 GEMVs over expert-sorted blocks (``"fma": true`` in a GEMM tile config): each weight tile read once for
the up to ``BLOCK_M`` pairs its expert's block holds, multiplied with FMAs in registers, no tensor cores.

Between T = 1 and prefill the int4 experts had two kernels, neither good: the one-pair GEMVs (gemv.py) read an
expert's weights once per pair, and the expert-sorted ``tl.dot`` blocks are bound by dequantizing every weight
tile into a 16-row MMA operand (about 1.2x bf16 on an H200 at T = 2-96, docs/performance.md, twelfth session).
Here a program takes one block of BLOCK_M pairs of one expert (the align of gemm.py's sorted path) and one tile
of ``BLOCK_N`` channels, and walks K: a nibble costs one LOP3 (masked in place it reads as the subnormal float
``q * 2^(4j - 149)``, no int -> float conversion), one FMUL by the group scale times ``2^(149 - 4j - E0)``
(which makes it ``q * s * 2^-E0``, a normal float), and one FMA per pair of the block. The zero point comes off
once per group and row: ``sum(x * (q - z) * s) = sum(x * q * s) - z * s * sum(x)``.

The K tile lies inside one scale group (so a group's scale is one ``[rows]`` vector per tile), BLOCK_K a power
of two dividing the group size. GEMM1 (``gated``) interleaves the gate and up rows of a tile as gemv.py does and
writes the activated intermediate row of each pair; GEMM2 multiplies by the routing weight and adds into the fp32
``[T, H]`` sums (``SPLIT_K`` programs per tile along K) or writes the pair's row for ``reduce: "buffer"``.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._jit import lazy_jit
from .gemm import _activate
from .gemv import _pow2, _pow2_divisor

# products are q * s * x * 2^-E0: normal floats for |q s x| >= 2^(E0 - 126) and scales s < 2^(E0 - 21)
SCALE_EXP = 40


@lazy_jit
def _group_gemv_kernel(
    x_ptr, w_ptr, b_ptr, tw_ptr, out_ptr, sorted_ids_ptr, expert_ids_ptr, ntpp_ptr, ws_ptr, wz_ptr,
    num_pairs, N, K, top_k, num_experts, k_split,
    stride_xm, stride_we, stride_wn, stride_be, stride_om,
    stride_wse, stride_wsn, stride_wsk, stride_wze, stride_wzn, stride_wzk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
    GATED: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr, QBK: tl.constexpr, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr, E0: tl.constexpr,
    UNROLL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(ntpp_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m)
    if (expert < 0) | (expert >= num_experts):
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs  # padding slots hold num_pairs
    pairs = tl.where(row_ok, pairs, 0)
    if GATED:  # GEMM1 reads each pair's token row of x, GEMM2 the pair's row of the intermediate
        x_rows = x_ptr + (pairs // top_k).to(tl.int64) * stride_xm
    else:
        x_rows = x_ptr + pairs.to(tl.int64) * stride_xm
    k_lo = tl.multiple_of(pid_s * k_split, BLOCK_K)
    k_hi = tl.minimum(K, k_lo + k_split)

    r = tl.arange(0, ROWS)  # ROWS = 2 * BLOCK_N when GATED: row 2j gate channel n0 + j, row 2j + 1 its up channel
    if GATED:
        n = pid_n * BLOCK_N + r // 2
        ch = (n % N) + (r % 2) * N
    else:
        n = pid_n * BLOCK_N + r
        ch = n % N  # (in-bounds loads past the edge; masked at the store)
    w_rows = w_ptr + expert.to(tl.int64) * stride_we + ch.to(tl.int64) * stride_wn  # int32 words
    s_rows = ws_ptr + expert.to(tl.int64) * stride_wse + ch * stride_wsn
    z_rows = wz_ptr + expert.to(tl.int64) * stride_wze + (ch // 2) * stride_wzn  # zero points: two per byte
    z_shift = (ch % 2) * 4
    kw = tl.arange(0, BLOCK_K // 8)
    # weights, scales and zero points load as [1, ROWS, words] and the activations as [BLOCK_M, 1, words]: the weight
    # values then sit in the accumulator's own layout (a [ROWS, words] tile broadcast into it was converted through
    # shared memory once per nibble)
    w_ptrs = w_rows[None, :, None] + kw[None, None, :]
    acc3 = tl.full((BLOCK_M, ROWS, BLOCK_K // 8), 0.0, tl.float32)
    zsx = tl.full((BLOCK_M, ROWS), 0.0, tl.float32)  # sum over groups of z * s * sum(x)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, loop_unroll_factor=UNROLL):
        ke = k0 + 8 * kw
        k_ok = ke < k_hi
        if EVEN_K:
            wu = tl.load(w_ptrs + k0 // 8)
        else:
            wu = tl.load(w_ptrs + k0 // 8, mask=k_ok[None, None, :], other=0)
        wh = (wu.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)  # nibbles 4..7 to bits 0..15
        grp = k0 // QBK
        s = tl.load(s_rows[None, :, None] + grp * stride_wsk).to(tl.float32)  # [1, ROWS, 1]
        if HAS_ZERO:
            z = ((tl.load(z_rows[None, :, None] + grp * stride_wzk) >> z_shift[None, :, None]) & 0xF).to(tl.float32)
        else:
            z = tl.full((1, ROWS, 1), 8.0, tl.float32)
        # a word column's eight activations in one 16-byte load per pair, split into the eight nibble planes
        kx = ke[:, None] + tl.arange(0, 8)[None, :]  # [words, 8]
        x8 = tl.load(x_rows[:, None, None, None] + kx[None, None, :, :],
                     mask=row_ok[:, None, None, None] & (kx < k_hi)[None, None, :, :], other=0.0).to(tl.float32)
        e_, o_ = tl.split(tl.reshape(x8, (BLOCK_M, 1, BLOCK_K // 8, 2, 2, 2)))  # [.., i, j, l]: element 4i + 2j + l
        e0, e1 = tl.split(e_)
        o0, o1 = tl.split(o_)
        x0, x4 = tl.split(e0)
        x2, x6 = tl.split(e1)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o1)
        xs = (x0, x1, x2, x3, x4, x5, x6, x7)
        sx = tl.full((BLOCK_M, 1, BLOCK_K // 8), 0.0, tl.float32)
        for m in tl.static_range(8):  # nibble m of every word: elements ke + m
            j = m % 4
            if m < 4:
                t = wu & (0xF << (4 * j))
            else:
                t = wh & (0xF << (4 * j))
            wq = t.to(tl.float32, bitcast=True) * (s * _pow2(149 - 4 * j - E0))  # q * s * 2^-E0, [1, ROWS, words]
            xm = xs[m]
            acc3 += wq * xm
            sx += xm
        zs = tl.reduce(z * s, 2, tl.standard._sum_combine)  # [1, ROWS] (a sum over one element)
        zsx += tl.reduce(sx, 2, tl.standard._sum_combine) * zs  # [BLOCK_M, 1] x [1, ROWS]
    acc = tl.reduce(acc3, 2, tl.standard._sum_combine) * _pow2(E0) - zsx  # [BLOCK_M, ROWS]

    if HAS_BIAS:
        bias = tl.load(b_ptr + expert.to(tl.int64) * stride_be + ch).to(tl.float32)
        if GATED:
            acc += bias[None, :]
        else:
            acc += tl.where(pid_s == 0, bias, 0.0)[None, :]  # once, by the first K split
    if GATED:
        g, u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
        h = _activate(g, u, ACT, ALPHA, LIMIT)
        offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        o_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs[None, :]
        tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs < N)[None, :])
    else:
        acc = acc * tl.load(tw_ptr + pairs, mask=row_ok, other=0.0)[:, None]
        mask = row_ok[:, None] & (n < N)[None, :]
        if ATOMIC:
            o_ptrs = out_ptr + (pairs // top_k).to(tl.int64)[:, None] * stride_om + n[None, :]
            tl.atomic_add(o_ptrs, acc, mask=mask, sem="relaxed")
        else:
            o_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + n[None, :]
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def group_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
               sorted_ids: torch.Tensor, expert_ids: torch.Tensor, ntpp: torch.Tensor, num_pid_m: int,
               num_pairs: int, top_k: int, block_m: int, cfg: dict[str, Any], *, gated: bool, group: int, w_scale: torch.Tensor,
               w_zero: torch.Tensor | None = None, activation_code: int = 0, tw: torch.Tensor | None = None,
               atomic: bool = True, alpha: float = 1.702, limit: float = 7.0) -> Any:
    """One GEMM of the int4 experts over expert-sorted blocks, as GEMVs (module doc). ``gated``: GEMM1, ``out``
    ``[P, I]`` in the model dtype (activated); else GEMM2: fp32 ``[T, H]`` sums with ``atomic`` (the K range split
    over ``cfg["SPLIT_K"]`` programs), or one row per pair ``[P, H]``. ``w`` packed int4 ``[E, rows, K / 2]``
    uint8, ``w_scale [E, rows, K / group]``, ``w_zero`` packed two per byte along the rows."""
    N = w.shape[1] // 2 if gated else w.shape[1]
    K = x.shape[1]
    bk = _pow2_divisor(group, cfg["BLOCK_K"])
    if bk < 8 or K % 8 or w.shape[2] * 2 != K or not w.is_contiguous():
        raise ValueError(f"an int4 GEMM with \"fma\": true reads whole 32-bit words of 8 nibbles inside one scale "
                         f"group: it needs K (= {K}) and the group size (= {group}) to be multiples of 8 and "
                         f"contiguous packed weights [E, rows, K / 2]; use \"fma\": false (tl.dot) for this shape")
    split = max(1, int(cfg.get("SPLIT_K", 1)))
    if split > 1 and (gated or not atomic):
        raise ValueError("\"fma\": true with SPLIT_K > 1 is for GEMM2 with reduce 'atomic' (its partial sums are "
                         "added atomically); use SPLIT_K = 1")
    k_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_split)
    if x.stride(1) != 1:
        x = x.contiguous()
    w = w.view(torch.int32)
    wz = w_zero if w_zero is not None else w_scale
    bn = cfg["BLOCK_N"]
    grid = (num_pid_m, triton.cdiv(N, bn), split)
    return _group_gemv_kernel[grid](
        x, w, bias if bias is not None else w_scale, tw if tw is not None else w_scale, out, sorted_ids, expert_ids,
        ntpp, w_scale, wz,
        num_pairs, N, K, top_k, w.shape[0], k_split,
        x.stride(0), w.stride(0), w.stride(1), bias.stride(0) if bias is not None else 0, out.stride(0),
        w_scale.stride(0), w_scale.stride(1), w_scale.stride(2), wz.stride(0), wz.stride(1), wz.stride(2),
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, ROWS=2 * bn if gated else bn, GATED=gated, ACT=activation_code,
        ALPHA=alpha, LIMIT=limit, HAS_BIAS=bias is not None, ATOMIC=atomic, QBK=group, HAS_ZERO=w_zero is not None,
        EVEN_K=K % bk == 0, E0=SCALE_EXP, UNROLL=int(cfg.get("unroll", 1)),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
