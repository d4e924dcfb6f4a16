"""Decode GEMV (``"decode": "gemv"`` in a tile config): one (token, expert) pair per program, no tensor cores.

At T = 1 every pair is a matrix-vector product that only has to stream its expert's weights once. The
``tl.dot`` path pads the single row to an MMA tile, and for packed int4 it also has to move the dequantized
tile through shared memory into the MMA operand layout: on an H100 that round trip, not HBM, bounded int4
decode (0.9x-1.4x of bf16, docs/performance.md). Here each weight tile is loaded into registers, turned into
fp32 with integer ops, multiplied by the activation row with FMAs and reduced along K in registers:

* int4 (``WQ=2``), the "subnormal" read of the shipped tables: a nibble masked in place *is* the subnormal
  float ``q * 2^(4j - 149)``; activations scaled by powers of two make every product exact at one scale, so a
  nibble costs one LOP3 and one FFMA (the kernel has the range). The "words" read (the default without a config
  key): a nibble shifted into the top of an fp32 mantissa and OR-ed with 1.0's bits *is* ``1 + q/16``; per scale
  group, ``sum(x * (q - z)) = 16 * sum(x * (1 + q/16)) - (16 + z) * sum(x)``, times the group's scale. Neither
  converts int -> float. The "chain" read (the H200 tables) is the subnormal read laid out so that no value goes
  through shared memory in the K loop, with one sum per row over a thread's 32 nibbles (one zero-point and one
  scale FFMA per 32 nibbles).
* int8 / fp8 weights are converted and multiplied in fp32; w8a8 quantizes the activation row inside
  the kernel (FUSED_AQ, bit for bit ``quant_rows``' rule), so the products are those of the quantized
  values, exact in fp32, and the scales are applied once per output channel.

``mma: true`` in the tile config swaps the roles instead: the weight tile is the MMA's A operand ([rows, K], so
the tensor core's M is the channel count, not the single token) and the activation a 16-column B operand with
one live column; the products stay those of the quantized values (fp8 promoted per K tile, int8 into int32).

One kernel serves both GEMMs. ``GATED`` (GEMM1): the rows of a tile interleave gate and up channels
(row ``2j`` is gate channel ``n0 + j``, row ``2j + 1`` up channel ``N + n0 + j``), so both come from the same
loads and product code and are split apart for the activation. Otherwise (GEMM2) the tile is plain rows of
``w2``, times the routing weight, and ``SPLIT_K`` programs per tile add their partial sums atomically into
the fp32 ``[T, H]`` output (GEMM2's K = I is long and its N = H short: without splitting, too few programs
stream the weights).
"""
from __future__ import annotations

import functools
import re
from typing import Any

import torch
import triton
import triton.language as tl

from ._jit import cdiv, interpreting, lazy_helper, lazy_jit, next_pow2
from .configs import INT4_READ_NAMES
from .gemm import _activate, _quant_act, _row_quant_scale, aq_meta

try:  # grid dependency control (programmatic dependent launch, sm_90+): the "pdl" tile-config key
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # (an older Triton: "pdl" is then not used)
    gdc_launch_dependents = gdc_wait = None

# int4 -> fp32 in the kernel: (q << 19) & 0x780000 puts the nibble in mantissa bits 19..22, | 0x3F800000 (1.0f)
# makes the float 1 + q / 16.


@lazy_helper
def _pow2(E: tl.constexpr):
    """The fp32 number 2^E (-126 <= E <= 127), from its bits: an exact power-of-two scale."""
    return tl.full((), (E + 127) << 23, tl.int32).to(tl.float32, bitcast=True)


@lazy_helper
def _prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at ``ptrs`` (the int32 result is a dummy: prefetch writes no register)."""
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                     is_pure=False, pack=1)


@lazy_helper
def _x_load(ptrs, x_row, offs, mask, X_PARTS: tl.constexpr, stride_xp, ACT: tl.constexpr, ALPHA: tl.constexpr,
            LIMIT: tl.constexpr, RND: tl.constexpr):
    """The activation values at ``offs`` of the row (fp32). X_PARTS = 0: a plain row, read at ``ptrs`` (= x_row +
    offs, written out by the caller so that constant offsets fold into the loads). X_PARTS = S (GEMM2 after a GEMM1
    split over K): S fp32 partial rows of interleaved (gate, up) sums ``stride_xp`` apart are added, activated and
    rounded to the model dtype (RND: 1 fp16, 2 bf16) here, as GEMM1's epilogue would have done."""
    if X_PARTS == 0:
        if mask is None:
            v = tl.load(ptrs).to(tl.float32)
        else:
            v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        if mask is None:
            ok = offs >= 0  # (all true: one masked load form serves both callers)
        else:
            ok = mask
        g = tl.full(offs.shape, 0.0, tl.float32)
        u = tl.full(offs.shape, 0.0, tl.float32)
        for s in tl.static_range(X_PARTS):
            g += tl.load(x_row + s * stride_xp + 2 * offs, mask=ok, other=0.0)
            u += tl.load(x_row + s * stride_xp + 2 * offs + 1, mask=ok, other=0.0)
        v = _activate(g, u, ACT, ALPHA, LIMIT)
        if RND == 1:
            v = v.to(tl.float16).to(tl.float32)
        elif RND == 2:
            v = v.to(tl.bfloat16).to(tl.float32)
    return v


@lazy_helper
def _eight(x):
    """The eight activations of a word, split out of ``x`` [..., 2, 2, 2] (element 4a + 2b + l at [a, b, l]) in
    registers: a tuple, element m first."""
    e_, o_ = tl.split(x)
    e0, e1 = tl.split(e_)
    o0, o1 = tl.split(o_)
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@lazy_helper
def _gather_rc(row_ptrs, col_offs, shift, NIBBLE: tl.constexpr, TRANS: tl.constexpr):
    """The [rows, C] gather ``row_ptrs[r] + col_offs[c]``; NIBBLE: int4 zero points, ``>> shift[r] & 0xF`` (shift a
    [rows] tensor). TRANS loads it as [C, rows] and transposes: the orientation whose layout is the chain read's
    split words under the installed Triton (chain_scales_transposed)."""
    if TRANS:
        v = tl.load(row_ptrs[None, :] + col_offs[:, None])
        if NIBBLE:
            v = (v >> shift[None, :]) & 0xF
        v = tl.trans(v)
    else:
        v = tl.load(row_ptrs[:, None] + col_offs[None, :])
        if NIBBLE:
            v = (v >> shift[:, None]) & 0xF
    return v


@lazy_helper
def _int4_tile(w_ptrs, x_row, ws_base, ch, z_ptrs, z_shift, kw, k, k_hi, stride_wsn, stride_wsk, stride_wzk,
               BLOCK_K: tl.constexpr, QBK: tl.constexpr, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr,
               X_VEC: tl.constexpr):
    """The loads of the planes / subnormal read's K tile at ``k``: (int32 words [ROWS, words], fp32 scales and zero
    points per (row, word column) or per row, the raw [words, 8] activations with X_VEC). Without zero points the
    zero point is 8 (symmetric int4); without X_VEC the activations are a dummy 0.0."""
    ke = k + 8 * kw
    k_ok = ke < k_hi
    if EVEN_K:  # whole tiles: no mask, so the word loads can be 128-bit vectors
        wu = tl.load(w_ptrs + k // 8)
    else:
        wu = tl.load(w_ptrs + k // 8, mask=k_ok[None, :], other=0)
    z = 8.0
    if QBK % BLOCK_K != 0 and BLOCK_K % QBK != 0:  # the tile cuts groups: a [ROWS, words] gather
        grp = (ke // QBK)[None, :]
        s = tl.load(ws_base + ch[:, None] * stride_wsn + grp * stride_wsk, mask=k_ok[None, :],
                    other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = ((tl.load(z_ptrs[:, None] + grp * stride_wzk, mask=k_ok[None, :], other=0)
                  >> z_shift[:, None]) & 0xF).to(tl.float32)
    else:  # the tile inside one group, or whole groups: a [ROWS] load per group, selected per word column
        g0 = k // QBK
        s = tl.load(ws_base + ch * stride_wsn + g0 * stride_wsk).to(tl.float32)[:, None]
        if HAS_ZERO:
            z = ((tl.load(z_ptrs + g0 * stride_wzk) >> z_shift) & 0xF).to(tl.float32)[:, None]
        for g in tl.static_range(1, BLOCK_K // QBK):  # (none when the tile lies inside one group)
            in_g = (kw >= g * (QBK // 8))[None, :]
            g_ok = ch * 0 + (k + g * QBK) < k_hi  # (the group lies in K; a [ROWS] mask)
            sg = tl.load(ws_base + ch * stride_wsn + (g0 + g) * stride_wsk, mask=g_ok,
                         other=0.0).to(tl.float32)[:, None]
            s = tl.where(in_g, sg, s)
            if HAS_ZERO:
                zg = ((tl.load(z_ptrs + (g0 + g) * stride_wzk, mask=g_ok, other=0) >> z_shift)
                      & 0xF).to(tl.float32)[:, None]
                z = tl.where(in_g, zg, z)
    xr = 0.0
    if X_VEC:  # a word column's eight activations in one 16-byte load (EVEN_K only: no mask)
        xr = tl.load(x_row + ke[:, None] + tl.arange(0, 8)[None, :])
    return wu, s, z, xr


@lazy_jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, tw_ptr, out_ptr, ids_ptr, as_ptr, ws_ptr, wz_ptr, cnt_ptr, acc_ptr, y_ptr,
    N, K, top_k, num_experts, k_split, zero_numel, cnt_numel, n_tiles_out, arrivals,
    stride_xm, stride_we, stride_wn, stride_be, stride_om,
    stride_wse, stride_wsn, stride_wsk, stride_wze, stride_wzn, stride_wzk, stride_xp,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr, ROWS: tl.constexpr, GK: tl.constexpr,
    INT4_MODE: tl.constexpr, MMA: tl.constexpr, ACC_INT: tl.constexpr, PRECISION: tl.constexpr,
    GATED: tl.constexpr, X_PER_TOKEN: tl.constexpr,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr, ATOMIC: tl.constexpr,
    WQ: tl.constexpr, WS: tl.constexpr, QBK: tl.constexpr, HAS_ZERO: tl.constexpr,
    AQ: tl.constexpr, QMAX: tl.constexpr, AQ_INT8: tl.constexpr, EPS: tl.constexpr, RNE: tl.constexpr,
    AMAX_BLOCK: tl.constexpr, UNROLL: tl.constexpr, LOOP_STAGES: tl.constexpr, EVEN_K: tl.constexpr,
    FUSE_EPI: tl.constexpr, ZBLOCK: tl.constexpr, SUB_X: tl.constexpr, X_VEC: tl.constexpr,
    X_PARTS: tl.constexpr, RND: tl.constexpr, PARTS_OUT: tl.constexpr, X_PAIRS: tl.constexpr, ONCE: tl.constexpr,
    SCALES_T: tl.constexpr,
    PDL: tl.constexpr, PF_N: tl.constexpr, PF_STEP: tl.constexpr, EPW: tl.constexpr, AHEAD: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if PDL == 1:  # GEMM1 of a "pdl" decode: GEMM2's programs may start once every GEMM1 program got here
        gdc_launch_dependents()
    if FUSE_EPI and GATED:  # GEMM1 zeroes GEMM2's fp32 sums and arrival counters (GEMM2 runs after it; a GEMM1
        # split over K has each split write the same zeros)
        nprog = tl.num_programs(0) * tl.num_programs(1)
        lin = pair * tl.num_programs(1) + pid_n
        zc = (zero_numel + nprog - 1) // nprog
        z_end = tl.minimum(zero_numel, lin * zc + zc)
        for z0 in range(lin * zc, z_end, ZBLOCK):
            offs_z = z0 + tl.arange(0, ZBLOCK)
            tl.store(acc_ptr + offs_z, tl.full((ZBLOCK,), 0.0, tl.float32), mask=offs_z < z_end)
        cc = (cnt_numel + nprog - 1) // nprog
        c_end = tl.minimum(cnt_numel, lin * cc + cc)
        for c0 in range(lin * cc, c_end, ZBLOCK):
            offs_c = c0 + tl.arange(0, ZBLOCK)
            tl.store(cnt_ptr + offs_c, tl.full((ZBLOCK,), 0, tl.int32), mask=offs_c < c_end)
    expert = tl.load(ids_ptr + pair)
    live = (expert >= 0) & (expert < num_experts)  # else dropped (-1: another rank's expert) or out of range
    if FUSE_EPI and not GATED:  # a dropped pair reads nothing but still arrives at its token's tiles
        expert = tl.where(live, expert, 0)
    elif (expert < 0) | (expert >= num_experts):
        return
    if X_PER_TOKEN:  # GEMM1 reads the token's row of x, GEMM2 the pair's row of the intermediate
        x_row = x_ptr + (pair // top_k).to(tl.int64) * stride_xm
    else:
        x_row = x_ptr + pair.to(tl.int64) * stride_xm
    k_lo = tl.multiple_of(pid_s * k_split, BLOCK_K)  # (k_split is whole K tiles: aligned tile loads)
    k_hi = tl.minimum(K, k_lo + k_split)
    if FUSE_EPI and not GATED:
        k_hi = tl.where(live, k_hi, k_lo)  # dropped: an empty K loop

    r = tl.arange(0, ROWS)  # ROWS = 2 * BLOCK_N when GATED
    if GATED:
        n = pid_n * BLOCK_N + r // 2
        ch = (n % N) + (r % 2) * N  # interleaved gate / up channels (n % N: in-bounds loads past the edge)
    else:
        n = pid_n * BLOCK_N + r
        ch = n % N
    w_rows = w_ptr + expert.to(tl.int64) * stride_we + ch.to(tl.int64) * stride_wn
    ws_base = ws_ptr + expert.to(tl.int64) * stride_wse
    if PDL == 2:  # GEMM2 launched as GEMM1's programmatic dependent, running while GEMM1 still computes: ask L2 for
        # this program's weight slice (PF_N lines of 128 bytes per row, PF_STEP pointer units apart, EPW elements
        # per unit), then wait until GEMM1 is done and its writes are visible. (ids, weights and routing were
        # written before GEMM1 started.)
        if PF_N > 0:
            pf_last = tl.maximum((k_hi + EPW - 1) // EPW - 1, 0)
            pf = tl.minimum(k_lo // EPW + tl.arange(0, PF_N) * PF_STEP, pf_last)
            _prefetch_l2(w_rows[:, None] + pf[None, :])
        gdc_wait()

    if AQ != 0:  # FUSED_AQ: the row's quantization scale (amax pass over the whole row, or static)
        if X_PARTS == 0 or AQ == 2:
            a_scale = _row_quant_scale(x_row, K, 1, as_ptr, AMAX_BLOCK, AQ, QMAX, EPS)
        else:  # the amax of the activated row, built from GEMM1's partial sums as the K loop will load it
            offs_a = tl.arange(0, AMAX_BLOCK)
            amax = tl.full((AMAX_BLOCK,), 0.0, tl.float32)
            for a0 in range(0, K, AMAX_BLOCK):
                v = _x_load(x_row + a0 + offs_a, x_row, a0 + offs_a, a0 + offs_a < K, X_PARTS, stride_xp, ACT, ALPHA,
                            LIMIT, RND)
                amax = tl.maximum(amax, tl.abs(v))
            a_scale = tl.maximum(tl.reduce(amax, 0, tl.standard._elementwise_max), EPS) / QMAX

    z_ptrs = wz_ptr + expert.to(tl.int64) * stride_wze + (ch // 2) * stride_wzn  # int4 zero points, packed two
    z_shift = (ch % 2) * 4  # per byte along the channel dim (unused without them)

    if WQ == 2 and (INT4_MODE == 3 or INT4_MODE == 4):  # "planes" (3) / "subnormal" (4): words [ROWS, BLOCK_K / 8]
        # nibble j of a 16-bit half sits at bits 4j..4j+3 (one shift per word brings the high half down).
        # planes: masked and OR-ed with the bits of 2^(23 - 4j) (whose mantissa bit b weighs 2^(b - 4j)), it reads
        # as the float 2^(23 - 4j) + q exactly; subtracting 2^(23 - 4j) + z leaves q - z exactly (LOP3 + FADD +
        # FFMA per nibble, but the LOP3's second constant takes a register move about every other nibble).
        # subnormal: masked only, the bits read as the subnormal float q * 2^(4j - 149) (exact: fp32 math here
        # keeps subnormals, no .ftz); each activation is scaled once by the power of two 2^(SUB_X - 4j), so every
        # product is q * x * 2^(SUB_X - 149), exact and normal for 2^-62 <= |q x| and |x| < 2^43 (LOP3 with one
        # immediate + FFMA per nibble); z * sum(x) is taken off per word and 2^(149 - SUB_X) put back at the end.
        # The group scale multiplies a [ROWS, words] accumulator, reduced across threads once after the loop. K
        # tiles may span several groups (a word never straddles one: the group is a multiple of 8).
        kw = tl.arange(0, BLOCK_K // 8)
        w_ptrs = w_rows[:, None] + kw[None, :]
        acc2 = tl.full((ROWS, BLOCK_K // 8), 0.0, tl.float32)
        # AHEAD > 0: the tiles AHEAD steps on are loaded into registers before this one is multiplied, so their
        # latency overlaps this step's arithmetic (a load past the last tile reads the last tile again)
        k_last = tl.multiple_of(tl.maximum((k_hi - 1) // BLOCK_K * BLOCK_K, k_lo), BLOCK_K)
        if AHEAD >= 1:
            wu_a, s_a, z_a, x_a = _int4_tile(w_ptrs, x_row, ws_base, ch, z_ptrs, z_shift, kw, k_lo, k_hi,
                                             stride_wsn, stride_wsk, stride_wzk, BLOCK_K, QBK, HAS_ZERO, EVEN_K,
                                             X_VEC)
        if AHEAD >= 2:
            wu_b, s_b, z_b, x_b = _int4_tile(w_ptrs, x_row, ws_base, ch, z_ptrs, z_shift, kw,
                                             tl.minimum(k_lo + BLOCK_K, k_last), k_hi, stride_wsn, stride_wsk,
                                             stride_wzk, BLOCK_K, QBK, HAS_ZERO, EVEN_K, X_VEC)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL):
            ke = k0 + 8 * kw
            k_ok = ke < k_hi
            # this step's loads (AHEAD 0), or those of the tile AHEAD steps on, the current tile's coming from the
            # registers they were loaded into AHEAD steps ago
            if AHEAD == 0:
                kn = k0
            else:
                kn = tl.minimum(k0 + AHEAD * BLOCK_K, k_last)
            wu_n, s_n, z_n, x_n = _int4_tile(w_ptrs, x_row, ws_base, ch, z_ptrs, z_shift, kw, kn, k_hi, stride_wsn,
                                             stride_wsk, stride_wzk, BLOCK_K, QBK, HAS_ZERO, EVEN_K, X_VEC)
            if AHEAD == 0:
                wu, s, z, xr = wu_n, s_n, z_n, x_n
            elif AHEAD == 1:
                wu, s, z, xr = wu_a, s_a, z_a, x_a
                wu_a, s_a, z_a, x_a = wu_n, s_n, z_n, x_n
            else:
                wu, s, z, xr = wu_a, s_a, z_a, x_a
                wu_a, s_a, z_a, x_a = wu_b, s_b, z_b, x_b
                wu_b, s_b, z_b, x_b = wu_n, s_n, z_n, x_n
            wh = (wu.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)  # nibbles 4..7 to bits 0..15
            p2 = tl.full((ROWS, BLOCK_K // 8), 0.0, tl.float32)
            sxv = tl.full((BLOCK_K // 8,), 0.0, tl.float32)
            if X_VEC:  # one 16-byte load of a word column's eight activations (_int4_tile), split in registers
                xs = _eight(tl.reshape(xr.to(tl.float32), (BLOCK_K // 8, 2, 2, 2)))
            for m in tl.static_range(8):
                if X_VEC:
                    xm = xs[m]
                elif EVEN_K:
                    xm = _x_load(x_row + ke + m, x_row, ke + m, None, X_PARTS, stride_xp, ACT, ALPHA, LIMIT, RND)
                else:
                    xm = _x_load(x_row + ke + m, x_row, ke + m, k_ok, X_PARTS, stride_xp, ACT, ALPHA, LIMIT, RND)
                j = m % 4
                if m < 4:
                    t = wu & (0xF << (4 * j))
                else:
                    t = wh & (0xF << (4 * j))
                if INT4_MODE == 4:
                    sxv += xm
                    p2 += t.to(tl.float32, bitcast=True) * (xm * _pow2(SUB_X - 4 * j))[None, :]
                else:
                    f = (t | ((150 - 4 * j) << 23)).to(tl.float32, bitcast=True)  # OR-ed with 2^(23 - 4j)'s bits
                    p2 += (f - (_pow2(23 - 4 * j) + z)) * xm[None, :]
            if INT4_MODE == 4:  # take z * sum(x) off, at the products' scale 2^(SUB_X - 149)
                p2 -= z * (sxv * _pow2(SUB_X - 149))[None, :]
            acc2 += s * p2
        acc = tl.reduce(acc2, 1, tl.standard._sum_combine)
        if INT4_MODE == 4:
            acc = acc * _pow2(149 - SUB_X)
    elif WQ == 2 and INT4_MODE == 5:  # "chain": the subnormal read with no layout conversion and per-row sums
        # The tile is [ROWS, C, 4] int32 words (C = BLOCK_K / 32): a thread's 4 words of a row are one 16-byte load,
        # K elements k0 + 32c .. +32, inside one scale group (QBK % 32 == 0). The products of those 32 nibbles go into
        # one sum per (row, c), so the zero point and the group scale cost one FFMA each per 32 nibbles, not per word;
        # the activations and the scales are loaded laid out as the words are once split (no round trip through
        # shared memory, no barrier in the loop).
        C: tl.constexpr = BLOCK_K // 32
        cc = tl.arange(0, C)
        w_ptrs = w_rows[:, None] + tl.arange(0, 4 * C)[None, :]  # (2D: contiguous along K, 16-byte loads)
        # activations as [1, C, 8] (or [1, C, 4] int32 pairs): laid out like the words' [rows, C] once split, where a
        # [C] vector would get a layout of its own under some Triton versions (a conversion in every K step)
        x_off = (32 * cc)[None, :, None] + tl.arange(0, 8)[None, None, :]  # word i's activations at x_off + 8 i
        xw_off = (16 * cc)[None, :, None] + tl.arange(0, 4)[None, None, :]  # the same as int32 pairs (X_PAIRS)
        acc2 = tl.full((ROWS, C), 0.0, tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL):
            wq3 = tl.load(w_ptrs + k0 // 8)  # (whole K tiles only: _read_mode)
            we, wo = tl.split(tl.reshape(wq3, (ROWS, C, 2, 2)))  # [row, c, a, b]: word 2a + b
            w_0, w_2 = tl.split(we)
            w_1, w_3 = tl.split(wo)
            # the scales (and zero points) as a [ROWS, C] gather, laid out as the words are only if Triton spreads
            # this load's threads along C: with no contiguous dimension, which one it takes first differs between
            # Triton versions, so SCALES_T gathers [C, ROWS] and transposes it where the first one is taken
            # (chain_scales_transposed())
            grp = (k0 + 32 * cc) // QBK
            s = _gather_rc(ws_base + ch * stride_wsn, grp * stride_wsk, z_shift, False, SCALES_T).to(tl.float32)
            if HAS_ZERO:
                z = _gather_rc(z_ptrs, grp * stride_wzk, z_shift, True, SCALES_T).to(tl.float32)
            else:
                z = 8.0
            p = tl.full((ROWS, C), 0.0, tl.float32)
            sx = tl.full((1, C), 0.0, tl.float32)
            for i in tl.static_range(4):
                if i == 0:
                    wi = w_0
                elif i == 1:
                    wi = w_1
                elif i == 2:
                    wi = w_2
                else:
                    wi = w_3
                # nibbles 0..4 are read in place (bits 0..19), 5..7 after one shift by 12 (to bits 8..19): a nibble
                # at bits b..b+3 (b <= 19) is the subnormal q * 2^(b - 149), so its activation is scaled by
                # 2^(SUB_X - b) (no nibble is taken from the low bits of a shifted word: that compiles to a bit-field
                # extract)
                wh = (wi.to(tl.uint32, bitcast=True) >> 12).to(tl.int32, bitcast=True)
                if X_PAIRS:  # bf16 activations as int32 pairs: one shift or one AND makes each an fp32
                    xw = tl.load(x_row.to(tl.pointer_type(tl.int32)) + (k0 + 8 * i) // 2 + xw_off)
                    pa, pb = tl.split(tl.reshape(xw, (1, C, 2, 2)))  # [1, c, u, v]: pair 2u + v
                    q0, q2 = tl.split(pa)
                    q1, q3 = tl.split(pb)
                    xs = ((q0 << 16).to(tl.float32, bitcast=True), (q0 & -65536).to(tl.float32, bitcast=True),
                          (q1 << 16).to(tl.float32, bitcast=True), (q1 & -65536).to(tl.float32, bitcast=True),
                          (q2 << 16).to(tl.float32, bitcast=True), (q2 & -65536).to(tl.float32, bitcast=True),
                          (q3 << 16).to(tl.float32, bitcast=True), (q3 & -65536).to(tl.float32, bitcast=True))
                else:
                    xo = k0 + 8 * i + x_off
                    x8 = _x_load(x_row + xo, x_row, xo, None, X_PARTS, stride_xp, ACT, ALPHA, LIMIT, RND)
                    xs = _eight(tl.reshape(x8, (1, C, 2, 2, 2)))
                for m in tl.static_range(8):
                    if m <= 4:
                        b = 4 * m
                        t = wi & (0xF << b)
                    else:
                        b = 4 * m - 12
                        t = wh & (0xF << b)
                    sx += xs[m]
                    p += t.to(tl.float32, bitcast=True) * (xs[m] * _pow2(SUB_X - b))
            acc2 += s * (p - z * (sx * _pow2(SUB_X - 149)))
        acc = tl.reduce(acc2, 1, tl.standard._sum_combine) * _pow2(149 - SUB_X)
    elif WQ == 2 and INT4_MODE == 2:  # int32 words [ROWS, BLOCK_K / 8], the tile inside one group (NG = 1)
        kw = tl.arange(0, BLOCK_K // 8)
        w_ptrs = w_rows[:, None] + kw[None, :]
        acc = tl.full((ROWS,), 0.0, tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL):
            ke = k0 + 8 * kw
            k_ok = ke < k_hi
            wu = tl.load(w_ptrs + k0 // 8, mask=k_ok[None, :], other=0)
            p2 = tl.full((ROWS, BLOCK_K // 8), 0.0, tl.float32)
            sxv = tl.full((BLOCK_K // 8,), 0.0, tl.float32)
            for m in tl.static_range(8):  # nibble m of every word: elements ke + m
                xm = _x_load(x_row + ke + m, x_row, ke + m, k_ok, X_PARTS, stride_xp, ACT, ALPHA, LIMIT, RND)
                # nibble m (bits 4m..4m+3) moved to mantissa bits 19..22 in one shift, masked and OR-ed with 1.0f
                # (one LOP3): 1 + q / 16
                if 4 * m <= 19:
                    t = wu << (19 - 4 * m)
                else:
                    t = wu >> (4 * m - 19)
                f = ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                p2 += f * xm[None, :]
                sxv += xm
            p = tl.reduce(p2, 1, tl.standard._sum_combine)
            sx = tl.reduce(sxv, 0, tl.standard._sum_combine)
            grp = k0 // QBK
            s = tl.load(ws_base + ch * stride_wsn + grp * stride_wsk).to(tl.float32)
            if HAS_ZERO:
                z = ((tl.load(z_ptrs + grp * stride_wzk) >> z_shift) & 0xF).to(tl.float32)
            else:
                z = 8.0
            acc += s * (16.0 * p - (16.0 + z) * sx)
    elif WQ == 2:  # packed int4, low nibble first: bytes (INT4_MODE 0) or int32 words (1); NG groups per tile
        # GK = BLOCK_K // NG: elements of one scale group inside the tile
        if INT4_MODE == 0:
            kb = tl.arange(0, NG)[:, None] * (GK // 2) + tl.arange(0, GK // 2)[None, :]  # [NG, GK/2] byte offsets
            w_ptrs = w_rows[:, None, None] + kb[None, :, :]
        else:
            ku = tl.arange(0, NG)[:, None] * (GK // 8) + tl.arange(0, GK // 8)[None, :]  # [NG, GK/8] words
            w_ptrs = w_rows[:, None, None] + ku[None, :, :]
            shifts = tl.arange(0, 8) * 4
        acc = tl.full((ROWS, NG), 0.0, tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL):
            if INT4_MODE == 0:
                ke = k0 + 2 * kb  # element index of each byte's low nibble
                k_ok = ke < k_hi
                xe = _x_load(x_row + ke, x_row, ke, k_ok, X_PARTS, stride_xp, ACT, ALPHA, LIMIT, RND)
                xo = _x_load(x_row + ke + 1, x_row, ke + 1, k_ok, X_PARTS, stride_xp, ACT, ALPHA, LIMIT, RND)
                wb = tl.load(w_ptrs + k0 // 2, mask=k_ok[None, :, :], other=0).to(tl.int32)
                f_lo = (((wb << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q_lo / 16
                f_hi = (((wb << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q_hi / 16
                p = tl.reduce(f_lo * xe[None, :, :] + f_hi * xo[None, :, :], 2, tl.standard._sum_combine)
                sx = tl.reduce(xe + xo, 1, tl.standard._sum_combine)  # [NG]
            else:
                ke = k0 + 8 * ku
                kx = ke[:, :, None] + tl.arange(0, 8)[None, None, :]  # [NG, GK/8, 8], contiguous along K
                xv = _x_load(x_row + kx, x_row, kx, kx < k_hi, X_PARTS, stride_xp, ACT, ALPHA, LIMIT, RND)
                wu = tl.load(w_ptrs + k0 // 8, mask=(ke < k_hi)[None, :, :], other=0)
                q = (wu[:, :, :, None] >> shifts[None, None, None, :]) & 0xF
                f = ((q << 19) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q / 16
                p = tl.reduce(tl.reduce(f * xv[None, :, :, :], 3, tl.standard._sum_combine), 2,
                              tl.standard._sum_combine)  # [ROWS, NG]
                sx = tl.reduce(tl.reduce(xv, 2, tl.standard._sum_combine), 1, tl.standard._sum_combine)
            grp = (k0 + tl.arange(0, NG) * GK) // QBK
            g_ok = k0 + tl.arange(0, NG) * GK < k_hi
            s = tl.load(ws_base + ch[:, None] * stride_wsn + grp[None, :] * stride_wsk, mask=g_ok[None, :],
                        other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = ((tl.load(z_ptrs[:, None] + grp[None, :] * stride_wzk, mask=g_ok[None, :], other=0)
                      >> z_shift[:, None]) & 0xF).to(tl.float32)
            else:
                z = 8.0
            acc += s * (16.0 * p - (16.0 + z) * sx[None, :])
        acc = tl.reduce(acc, 1, tl.standard._sum_combine)
    else:  # bf16/fp16/fp32 (WQ=0), int8 (WQ=1), or w8a8 int8/fp8 (WQ=3) weights [.., K]
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = w_rows[:, None] + offs_k[None, :]
        acc = tl.full((ROWS,), 0.0, tl.float32)
        if ONCE:  # "reduce_once": products summed in registers per 8 K columns, reduced across threads after the loop
            acc3 = tl.full((ROWS, BLOCK_K // 8), 0.0, tl.float32)
        if MMA:  # swapped operands: weights [ROWS, K] x activation column [K, 16] (column 0 live) on tensor cores
            col0 = tl.arange(0, 16)[None, :] == 0
            if ACC_INT:
                acc2 = tl.full((ROWS, 16), 0, tl.int32)
            else:
                acc2 = tl.full((ROWS, 16), 0.0, tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL):
            k_ok = k0 + offs_k < k_hi
            xv = _x_load(x_row + k0 + offs_k, x_row, k0 + offs_k, k_ok, X_PARTS, stride_xp, ACT, ALPHA, LIMIT, RND)
            if AQ != 0:  # quantize the activations (quant_rows: x / scale, clamp, int8: round half to even)
                xv = _quant_act(xv, a_scale + offs_k * 0.0, QMAX, AQ_INT8, RNE)
                if not AQ_INT8:
                    xv = xv.to(w_ptr.dtype.element_ty).to(tl.float32)
            if MMA:
                wv = tl.load(w_ptrs + k0, mask=k_ok[None, :], other=0.0)  # (a float other: fp8 takes no int)
                if WQ == 3:  # the quantized values on both sides (fp8 / int8)
                    xt = tl.where(col0, xv[:, None], 0.0).to(w_ptr.dtype.element_ty)
                else:  # the activations' dtype on both sides (int8 weights are exact in bf16 / fp16)
                    xt = tl.where(col0, xv[:, None], 0.0).to(x_ptr.dtype.element_ty)
                    wv = wv.to(x_ptr.dtype.element_ty)
                if ACC_INT:
                    acc2 = tl.dot(wv, xt, acc2, out_dtype=tl.int32)
                elif WQ == 3:  # fp8: promoted to fp32 after every K tile (gemm.py, FP8_PROMOTE)
                    acc2 = tl.dot(wv, xt, acc2, max_num_imprecise_acc=BLOCK_K)
                else:
                    acc2 = tl.dot(wv, xt, acc2, input_precision=PRECISION)
            else:
                wv = tl.load(w_ptrs + k0, mask=k_ok[None, :], other=0.0).to(tl.float32)
                if ONCE:
                    acc3 += tl.reduce(tl.reshape(wv * xv[None, :], (ROWS, BLOCK_K // 8, 8)), 2,
                                      tl.standard._sum_combine)
                else:
                    acc += tl.reduce(wv * xv[None, :], 1, tl.standard._sum_combine)
        if ONCE and not MMA:
            acc = tl.reduce(acc3, 1, tl.standard._sum_combine)
        if MMA:
            acc = tl.reduce(acc2.to(tl.float32), 1, tl.standard._sum_combine)
        if WQ == 1:  # int8 w8a16: per-channel scale
            acc = acc * tl.load(ws_base + ch * stride_wsn).to(tl.float32)
        if WQ == 3:  # w8a8: activation scale x weight scale (per expert or per channel)
            if WS == 0:
                acc = acc * (a_scale * tl.load(ws_base).to(tl.float32))
            else:
                acc = acc * a_scale * tl.load(ws_base + ch * stride_wsn).to(tl.float32)

    if HAS_BIAS:
        bias = tl.load(b_ptr + expert.to(tl.int64) * stride_be + ch).to(tl.float32)
        if GATED and not PARTS_OUT:
            acc += bias
        else:
            acc += tl.where(pid_s == 0, bias, 0.0)  # once, by the first K split
    if PARTS_OUT:  # GEMM1 split over K: this split's fp32 (gate, up) sums, interleaved; GEMM2 activates on load
        offs_p = pid_n * ROWS + r
        tl.store(out_ptr + pid_s.to(tl.int64) * stride_xp + pair.to(tl.int64) * stride_om + offs_p, acc,
                 mask=n < N)
    elif GATED:
        g, u = tl.split(tl.reshape(acc, (BLOCK_N, 2)))
        h = _activate(g, u, ACT, ALPHA, LIMIT)
        offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + pair.to(tl.int64) * stride_om + offs, h.to(out_ptr.dtype.element_ty), mask=offs < N)
    else:
        # a dropped pair adds exact zeros: its row of the intermediate was never written (its garbage may reach acc
        # through w8a8's amax pass even though its K loop is empty, and 0 * inf is NaN)
        acc = tl.where(live, acc * tl.load(tw_ptr + pair), 0.0)
        if ATOMIC:
            token = (pair // top_k).to(tl.int64)
            o_ptrs = out_ptr + token * stride_om + n
            tl.atomic_add(o_ptrs, acc, mask=n < N, sem="relaxed")  # (a dropped pair adds its zeros)
            if FUSE_EPI:  # the last of the token's k x SPLIT_K programs for this tile writes y = sum, cast
                tl.debug_barrier()
                c = tl.atomic_add(cnt_ptr + token * n_tiles_out + pid_n, 1, sem="acq_rel")
                if c == arrivals - 1:
                    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                    v = tl.load(out_ptr + token * stride_om + offs, mask=offs < N, other=0.0, cache_modifier=".cg")
                    tl.store(y_ptr + token * stride_om + offs, v.to(y_ptr.dtype.element_ty), mask=offs < N)
        else:
            tl.store(out_ptr + pair.to(tl.int64) * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=n < N)


# How the GEMV reads int4 (all are tested; a tile config picks one with "int4_read", else INT4_MODE). "words" (2):
# int32 words with an unrolled loop over the 8 nibbles (shift + LOP3 each, 1 + q/16), the K tile inside one scale
# group; "planes" (3): int32 words, LOP3 + FADD per nibble giving q - z directly (see the kernel), K tiles across
# groups; "subnormal" (4): as planes, the nibbles read as subnormal floats (LOP3 + FFMA per nibble, one power-of-two
# scale per activation; see the kernel); "chain" (5): the subnormal read with [rows, C, 4] word tiles, one sum per row
# over a thread's 32 nibbles and no layout conversion in the loop (groups a multiple of 32, whole K tiles, else it
# runs as subnormal); "bytes" (0): bytes with the even / odd activations loaded apart;
# "words_4d" (1): int32 words as a 4D [rows, groups, words, 8] tile. H100, mixtral T = 1 GEMM1 (bench timing,
# 2026-11-27): 81 us (2), 115 us (0), 224 us (1, layout conversions through shared memory in every iteration).
INT4_READS = {name: code for code, name in enumerate(INT4_READ_NAMES)}  # bytes 0 .. subnormal 4, chain 5
INT4_MODE = 2
# whole K tiles (K a multiple of BLOCK_K): the planes / subnormal reads load without masks, so Triton makes its word
# loads 128-bit (with a mask it stops at 64-bit); False for A/B runs
GEMV_EVEN_K = True
# planes / subnormal reads: the eight activations of a word column in one 16-byte load, split in registers, instead of
# eight 2-byte loads (80 of the 88 loads of mixtral's gemm1 loop on sm_90). The default where a tile config has no
# "x_vec" key; it pays for some tiles and costs for others (docs/quantization.md), so the tables say per GEMM
GEMV_X_VEC = False
# "chain" read: bf16 activations loaded as int32 pairs, each made an fp32 by one shift or AND (False: loaded as bf16 and
# converted, for A/B runs)
CHAIN_X_PAIRS = True
# "chain" read: gather the scales [C, rows] and transpose (True) or [rows, C] (False); None: by the Triton version
# (chain_scales_transposed)
CHAIN_SCALES_T: bool | None = None
# "pdl" decodes: GEMM2's programs prefetch their weight slice into L2 before waiting for GEMM1 (False: wait only)
GEMV_PDL_PREFETCH = True
# "subnormal": activations are scaled by 2^(SUBNORMAL_X_EXP - 4j), so products are q x 2^(SUBNORMAL_X_EXP - 149) =
# q x 2^-64, exact and normal (fp32: 2^-126 .. 2^128) for 2^-62 <= |q x| and |x| < 2^43, every fp16 value included
SUBNORMAL_X_EXP = 85


def chain_scales_transposed() -> bool:
    """Whether the chain read gathers its scales as [C, rows] and transposes them (gemv.CHAIN_SCALES_T if set, else
    by the installed Triton): triton 3.6 lays out a gather with no contiguous dimension along its first dimension,
    triton 3.9 along its last, and the words' layout spreads C over the threads. Checked on both in the sm_90 TTGIR
    (tests/kernels/test_compile_sm90.py): either way the K loop has no layout conversion."""
    if CHAIN_SCALES_T is not None:
        return CHAIN_SCALES_T
    return _triton_before(3, 9)


@functools.lru_cache(maxsize=None)
def _triton_before(major: int, minor: int) -> bool:
    """Whether the installed Triton is older than major.minor ("3.6.0", "3.8a0", "3.10.0+git..."); an unreadable
    version counts as new (the choice it feeds costs speed, never correctness)."""
    m = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return bool(m) and (int(m.group(1)), int(m.group(2))) < (major, minor)


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n (a K tile that lies inside a scale group)."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def gemv_tile(g: dict[str, Any], wq: int, group: int) -> tuple[int, int]:
    """(BLOCK_K, NG) for a GEMV: int4 tiles hold whole scale groups (NG of them) or lie inside one."""
    bk = g["BLOCK_K"]
    if wq != 2:
        return bk, 1
    if group >= bk:
        bk = max(2, _pow2_divisor(group, bk))  # inside one group (an odd-sized group would fail the packing)
        return bk, 1
    if group & (group - 1) == 0:
        return bk, bk // group  # several power-of-two groups per tile
    gk = max(2, _pow2_divisor(group, bk))
    return gk, 1


def _read_mode(cfg: dict[str, Any], wq: int, group: int, w: torch.Tensor) -> tuple[int, int, int]:
    """(INT4_MODE, BLOCK_K, NG) of a GEMV launch: how int4 is read (gemv.INT4_READS) and the K tile it reads."""
    bk, ng = gemv_tile(cfg, wq, group)
    mode = (INT4_READS[cfg["int4_read"]] if "int4_read" in cfg else INT4_MODE) if wq == 2 else 0
    if mode == 5 and (group % 32 or cfg["BLOCK_K"] % 32 or w.shape[2] * 2 % cfg["BLOCK_K"]):
        mode = 4  # chain: a thread's 32 elements inside one group, whole K tiles (else the subnormal read)
    if mode >= 3 and group % 8:
        mode = 2  # planes / subnormal need words that never straddle a group
    if mode >= 3:
        bk, ng = cfg["BLOCK_K"], 1  # any power-of-two tile, across groups
    elif mode == 2:
        bk, ng = bk // ng, 1  # the tile inside one group
    # (the strides, not is_contiguous(): PyTorch ignores a size-1 dimension's stride there, but view(int32) does not)
    if mode and ((bk // ng) % 8 or w.shape[2] % 4 or w.stride(2) != 1 or w.stride(1) % 4 or w.stride(0) % 4
                 or w.data_ptr() % 4):
        mode, (bk, ng) = 0, gemv_tile(cfg, wq, group)  # words need whole words per group slice, 4-byte aligned rows
    return mode, bk, ng


def _k_split(K: int, split: int, bk: int) -> tuple[int, int]:
    """(K per split, number of splits): ranges of whole K tiles, so fewer than asked where K is short."""
    k_split = cdiv(cdiv(K, split), bk) * bk
    return k_split, cdiv(K, k_split)


def gemm1_parts(cfg: dict[str, Any], K: int, w13: torch.Tensor, wq: int = 0, group: int = 1) -> int:
    """How many fp32 partial rows per pair a GEMM1 GEMV with ``SPLIT_K`` leaves (1: not split, the activation is
    applied in its epilogue). GEMM2 adds them up and applies the activation where it loads its input."""
    split = max(1, int(cfg.get("SPLIT_K", 1)))
    return 1 if split == 1 else _k_split(K, split, _read_mode(cfg, wq, group, w13)[1])[1]


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, ids_flat: torch.Tensor,
         top_k: int, cfg: dict[str, Any], *, gated: bool, activation_code: int = 0, tw: torch.Tensor | None = None,
         atomic: bool = True, wq: int = 0, ws: int = 1, group: int = 1, a_scale: torch.Tensor | None = None,
         w_scale: torch.Tensor | None = None, w_zero: torch.Tensor | None = None, aq: int = 0,
         acc_int8: bool = False, alpha: float = 1.702, limit: float = 7.0,
         epilogue: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, x_parts: int = 0,
         h_dtype: torch.dtype | None = None, pdl: int = 0) -> Any:
    """One GEMM of the decode path as GEMVs. ``gated``: GEMM1 (``out[P, N]`` in the model dtype, activation
    applied); otherwise GEMM2 (``out`` fp32 ``[T, H]`` with ``atomic``, else the per-pair buffer ``[P, H]``).

    ``epilogue = (sums, counters, y)`` fuses the top-k epilogue into the two launches: GEMM1 zeroes the fp32
    ``sums [T, H]`` and the int32 ``counters [T, cdiv(H, gemm2 BLOCK_N)]``; GEMM2 (``out`` = ``sums``) adds into
    them atomically and the last program to arrive at a (token, tile) writes ``y`` in the model dtype, so no
    memset and no cast launch remain.

    ``SPLIT_K`` > 1 in GEMM1's tile: ``out`` is fp32 ``[S, P, 2N]`` (S from ``gemm1_parts``), each K split's
    (gate, up) sums interleaved, no activation; GEMM2 then takes ``x_parts=S`` with ``x`` = those sums and
    ``h_dtype`` = the model dtype, adds the parts, applies the activation and rounds to ``h_dtype`` as it loads.
    ``pdl`` (``pdl_supported``): 1 on GEMM1, which lets its programmatic dependent start early; 2 on GEMM2, launched
    as that dependent: it prefetches its weights into L2, then waits for GEMM1's results.
    Returns Triton's launch handle (``n_regs``, ``n_spills``, ``asm``)."""
    P = ids_flat.numel()
    N = w.shape[1] // 2 if gated else w.shape[1]
    stride_xp = out.stride(0) if gated and out.dim() == 3 else 0
    if x_parts:  # GEMM2 on GEMM1's fp32 partial sums [S, P, 2K]: activated where loaded
        if gated or x.dim() != 3 or x.shape[0] != x_parts or x.dtype != torch.float32 or x.stride(2) != 1:
            raise ValueError(f"x_parts={x_parts} needs GEMM2 on fp32 partial sums [{x_parts}, P, 2K], got "
                             f"{x.dtype} {tuple(x.shape)}")
        stride_xp, x = x.stride(0), x[0]
        K = x.shape[1] // 2
    else:
        K = x.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    if w.stride(2) != 1:
        raise ValueError("the GEMV decode path reads weight rows contiguous along K")
    if bias is not None and bias.stride(1) != 1:
        bias = bias.contiguous()
    bn = cfg["BLOCK_N"]
    mode, bk, ng = _read_mode(cfg, wq, group, w)
    if mode:
        w = w.view(torch.int32)
    mma = bool(cfg.get("mma", False)) and wq != 2  # (int4 keeps the FMA GEMV)
    if mma and (2 * bn if gated else bn) < 16 or mma and bk < 32:
        raise ValueError(f"a GEMV with mma=true needs at least 16 rows (gemm1: BLOCK_N >= 8, gemm2: BLOCK_N >= 16) "
                         f"and BLOCK_K >= 32, got BLOCK_N={bn}, BLOCK_K={bk}")
    split = max(1, int(cfg.get("SPLIT_K", 1))) if (gated or atomic) else 1
    k_split, split = _k_split(K, split, bk)
    parts_out = gated and split > 1
    if parts_out and (out.dim() != 3 or tuple(out.shape) != (split, P, 2 * N) or out.dtype != torch.float32):
        raise ValueError(f"a GEMM1 GEMV split {split} ways over K writes fp32 partial sums [{split}, {P}, {2 * N}] "
                         f"(gemm1_parts tells the count), got {out.dtype} {tuple(out.shape)}")
    even_k = GEMV_EVEN_K and K % bk == 0
    fb = w
    wss = list(w_scale.stride()) + [0] * 3 if w_scale is not None else [0, 0, 0]
    wzs = list(w_zero.stride()) + [0] * 3 if w_zero is not None else [0, 0, 0]
    grid = (P, cdiv(N, bn), split)
    fuse = epilogue is not None
    if fuse and not gated and not atomic:
        raise ValueError("the fused epilogue adds GEMM2's results atomically; it needs reduce='atomic'")
    sums, counters, y = epilogue if fuse else (fb, fb, fb)
    unit = w.element_size()  # pointer unit of the weight rows; EPW elements of K per unit
    epw = (8 if mode else 2) if wq == 2 else 1
    pf_n = (next_pow2(cdiv(cdiv(k_split, epw) * unit, 128))
            if pdl == 2 and GEMV_PDL_PREFETCH else 0)
    extra = {"launch_pdl": True} if pdl == 2 else {}
    return _gemv_kernel[grid](
        x, w, bias if bias is not None else fb, tw if tw is not None else fb, out, ids_flat,
        a_scale if a_scale is not None else fb, w_scale if w_scale is not None else fb,
        w_zero if w_zero is not None else fb, counters, sums, y,
        N, K, top_k, w.shape[0], k_split, sums.numel() if fuse else 0, counters.numel() if fuse else 0, grid[1],
        top_k * split,
        x.stride(0), w.stride(0), w.stride(1), bias.stride(0) if bias is not None else 0,
        out.stride(1) if parts_out else out.stride(0),
        wss[0], wss[1], wss[2], wzs[0], wzs[1], wzs[2], stride_xp,
        BLOCK_N=bn, BLOCK_K=bk, NG=ng, ROWS=2 * bn if gated else bn, GK=bk // ng, INT4_MODE=mode, MMA=mma, ACC_INT=mma and wq == 3 and acc_int8,
        PRECISION="ieee" if x.dtype == torch.float32 else None, GATED=gated, X_PER_TOKEN=gated, ACT=activation_code,
        HAS_BIAS=bias is not None, ALPHA=alpha, LIMIT=limit, ATOMIC=atomic,
        WQ=wq, WS=ws, QBK=group, HAS_ZERO=w_zero is not None,
        **aq_meta(aq, acc_int8, K), UNROLL=int(cfg.get("unroll", 1)), LOOP_STAGES=cfg.get("loop_stages"),
        EVEN_K=even_k, FUSE_EPI=fuse, ZBLOCK=256, SUB_X=SUBNORMAL_X_EXP,
        X_VEC=bool(cfg.get("x_vec", GEMV_X_VEC)) and mode in (3, 4) and not x_parts and even_k,
        X_PARTS=x_parts, PARTS_OUT=parts_out, SCALES_T=mode == 5 and chain_scales_transposed(),
        ONCE=bool(cfg.get("reduce_once", False)) and wq != 2 and not mma,
        X_PAIRS=(mode == 5 and CHAIN_X_PAIRS and not x_parts and x.dtype == torch.bfloat16 and x.stride(0) % 2 == 0
                 and x.data_ptr() % 4 == 0),
        RND={torch.float16: 1, torch.bfloat16: 2}.get(h_dtype, 0) if x_parts else 0,
        PDL=pdl, PF_N=pf_n, PF_STEP=128 // unit, EPW=epw,
        AHEAD=int(cfg.get("prefetch", 0)) if mode >= 3 else 0,  # (follows its read where _read_mode falls back)
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2), **extra,
    )


def pdl_supported(device: torch.device) -> bool:
    """Whether a "pdl" tile config can launch GEMM2 as a programmatic dependent here: compiled (not interpreted)
    kernels on an sm_90+ GPU, with a Triton that has grid dependency control. Elsewhere the two launches simply run
    in order; the results are the same."""
    return (device.type == "cuda" and not interpreting() and gdc_wait is not None
            and torch.cuda.get_device_capability(device)[0] >= 9)
