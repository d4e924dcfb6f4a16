"""Grouped GEMMs over expert-sorted (token, slot) pairs, vLLM ``fused_moe_kernel`` style.

GEMM1: ``act(x[token] @ w13[e, :I]^T + b) * (x[token] @ w13[e, I:]^T + b)`` -> ``inter [P, I]``.
  Rows of ``x`` are gathered by token index inside the kernel (no permuted copy); the gate and up
  tiles are two accumulators of one program, so the activation is applied in the epilogue and the
  ``[P, 2I]`` pre-activation never exists in memory.
GEMM2: ``(inter[pair] @ w2[e]^T + b) * topk_weight[pair]``, reduced over top-k straight into an fp32
  ``[T, H]`` output with atomic adds (``reduce="atomic"``), or written per pair to a ``[P, H]`` buffer
  in the activations' dtype and summed over top-k by ``moe_sum`` (``reduce="buffer"``, deterministic).

Both take ``DIRECT=True`` for decode: one pair per program (BLOCK_M rows, only the first one live), the
expert read straight from ``topk_ids``, so no align launch is needed.
Accumulation is fp32 (``tl.dot``). FP8_PROMOTE: on sm90 Triton's fp8 dot by default accumulates the whole K
loop in the tensor core's reduced-precision accumulator (``max_num_imprecise_acc`` = 2^30; DeepSeek-V3's report
measured about 14 bits), which put fp8 per-channel experts 1.4e-2 from the oracle on an H100; the fp8 dots here
promote after every K tile (``max_num_imprecise_acc=BLOCK_K``), as DeepGEMM does every 128. Pointers to weights use 64-bit offsets (w13 of DeepSeek-V3 holds
more than 2^31 elements).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._jit import cdiv, interpreting, lazy_helper, lazy_jit, next_pow2
from .quant import _RNE_MAGIC, AMAX_EPS, FP8_MAX, INT8_MAX

# Only builtins and @lazy_helper functions inside kernels: triton.language's own @jit helpers (tl.cdiv, tl.zeros,
# tl.sum, tl.cumsum) are jitted when triton is imported, so they break the interpreter when TRITON_INTERPRET=1 is set
# after that import; lazy helpers are bound per mode with the kernel (_jit.py).

ACT_CODES = {"silu": 0, "gelu": 1, "swigluoai": 2}
SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_LIMIT = 7.0


@lazy_helper
def _grouped_pids(pid, num_pid_m, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a program, GROUP_M row blocks walked together along N (L2 reuse of the weight tiles)."""
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@lazy_helper
def _row_quant_scale(row_ptr, K, stride, as_ptr, AMAX_BLOCK: tl.constexpr, AQ: tl.constexpr, QMAX: tl.constexpr,
                     EPS: tl.constexpr):
    """FUSED_AQ: the quantization scale of one activation row, quant_rows' rule (AQ=1: max(amax, eps) / qmax over
    the whole row; AQ=2: the static per-tensor scale). The pass reads AMAX_BLOCK (``amax_block``) elements per
    step, not a K tile: it runs before the weights stream, so its dependent steps are latency the program waits."""
    if AQ == 1:
        offs = tl.arange(0, AMAX_BLOCK)
        amax = tl.full((AMAX_BLOCK,), 0.0, tl.float32)
        for k0 in range(0, K, AMAX_BLOCK):
            v = tl.load(row_ptr + (k0 + offs) * stride, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.reduce(amax, 0, tl.standard._elementwise_max), EPS) / QMAX
    else:
        scale = tl.load(as_ptr).to(tl.float32)
    return scale


@lazy_helper
def _int4_minus_zero(q, z):
    """``q - z`` in fp32 for nibbles q (0..15, any integer type), exactly: q OR-ed into the bits of 2^23 is the float
    2^23 + q, less 2^23 + z. An int -> float conversion would run at a quarter of the integer rate on sm90."""
    return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)


@lazy_helper
def _interleave_k(lo, hi, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_K / 2, BLOCK_N] tiles of the even and odd K rows as one [BLOCK_K, BLOCK_N] tile (row 2j + i)."""
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_K, BLOCK_N))


@lazy_helper
def _pair_bits(v, DT: tl.constexpr):
    """The 16 bits of v (fp32, exactly representable in DT) in both halves of an int32: a bf16x2 / f16x2 operand."""
    b = v.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


def _pairs_asm(magic: int, one: int, packed: str, neg: int | None = None) -> str:
    """The PTX of INT4_PAIRS and INT4_QPAIRS, four bytes per call (one 32-bit register, $4); $0-$3 one byte's (low,
    high) nibble pair each. The byte and the byte shifted right by 4 are permuted into the two halves (PRMT), the
    two nibbles OR-ed into the bits of M, M (LOP3: the numbers M + q), then a packed FMA adds -(M + zero).
    INT4_PAIRS (``neg`` None): $5-$8 the bytes' scales and $9-$12 their -(M + zero), each as a pair in both halves,
    and a second FMA multiplies by the scale (adding -0.0 keeps the product's sign of zero). INT4_QPAIRS: one
    operand; ``neg`` holds the bits of -(M + off), off 8 (symmetric int4) or 0 (zero points, taken off after the
    dot), and the pair stays q - off, exact. (PTX takes no immediates in packed FMAs: constants sit in registers.)"""
    lines = [".reg .b32 u, t, one, c;", f"mov.b32 one, 0x{one:04X}{one:04X};",
             "mov.b32 c, 0x80008000;" if neg is None else f"mov.b32 c, 0x{neg:04X}{neg:04X};", "shr.u32 u, $4, 4;"]
    for b in range(4):  # output b: byte b of $4 (low nibble) into the low half, byte b of u (high) into the high
        lines += [f"prmt.b32 t, $4, u, {0x4400 + 0x1111 * b:#06x};",
                  f"lop3.b32 t, t, 0x000F000F, 0x{magic:04X}{magic:04X}, 0xEA;"]
        if neg is None:
            lines += [f"fma.rn.{packed} t, t, one, ${9 + b};", f"fma.rn.{packed} ${b}, t, ${5 + b}, c;"]
        else:
            lines += [f"fma.rn.{packed} ${b}, t, one, c;"]
    return "{\n" + "\n".join(lines) + "\n}"


_PAIRS_BF16 = tl.constexpr(_pairs_asm(0x4300, 0x3F80, "bf16x2"))  # M = 128
_PAIRS_F16 = tl.constexpr(_pairs_asm(0x6400, 0x3C00, "f16x2"))  # M = 1024
_PAIRS_IO = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 9))
_QPAIRS_BF16_SYM = tl.constexpr(_pairs_asm(0x4300, 0x3F80, "bf16x2", 0xC308))  # q - 8: -(128 + 8)
_QPAIRS_BF16_Q = tl.constexpr(_pairs_asm(0x4300, 0x3F80, "bf16x2", 0xC300))  # q
_QPAIRS_F16_SYM = tl.constexpr(_pairs_asm(0x6400, 0x3C00, "f16x2", 0xE408))  # -(1024 + 8)
_QPAIRS_F16_Q = tl.constexpr(_pairs_asm(0x6400, 0x3C00, "f16x2", 0xE400))
_QPAIRS_IO = tl.constexpr("=r,=r,=r,=r,r")


def _int8_asm(dtype: str, pack: int) -> str:
    """The PTX of INT8_Q: ``pack`` int8 weights (4: one 32-bit register, 2: a 16-bit one, after the outputs) as
    bf16x2 / f16x2 registers ($0: weights 0 and 1, $1: 2 and 3), each value exactly the integer q. fp16: q + 128 (the
    byte XOR 0x80) permuted under the bits 0x64 is the number 1024 + q + 128 (fp16's ulp at 1024 is 1), and one
    packed FMA takes 1152 off. bf16 has 7 mantissa bits, so q = m - 128 s (m its low 7 bits, s its sign bit) comes
    from two halves: 0x43 over the byte masked to m is 128 + m, masked to its sign bit 128 + 128 s (0x4380 is 256),
    and one packed FMA subtracts the second from the first. (PTX takes no immediates in packed FMAs: constants sit
    in registers.)"""
    outs = pack // 2
    src = f"${outs}"
    lines = [".reg .b32 c, k, one, w, t, s;"]
    if pack == 2:
        lines += [f"cvt.u32.u16 w, {src};"]
        src = "w"
    if dtype == "bf16x2":
        lines += ["mov.b32 c, 0x43434343;", "mov.b32 k, 0xBF80BF80;"]  # k: -1.0 pairs
    else:
        lines += ["mov.b32 c, 0x64646464;", "mov.b32 k, 0xE480E480;", "mov.b32 one, 0x3C003C00;",  # k: -1152
                  f"xor.b32 w, {src}, {'0x8080' if pack == 2 else '0x80808080'};"]
        src = "w"
    for out, sel in ((0, 0x4140), (1, 0x4342))[:outs]:  # weights (0, 1) / (2, 3) into the two halves' low bytes
        lines += [f"prmt.b32 t, {src}, c, {sel:#06x};"]
        if dtype == "bf16x2":
            lines += ["and.b32 s, t, 0xFF80FF80;", "and.b32 t, t, 0xFF7FFF7F;", f"fma.rn.bf16x2 ${out}, s, k, t;"]
        else:
            lines += [f"fma.rn.f16x2 ${out}, t, one, k;"]
    return "{\n" + "\n".join(lines) + "\n}"


_INT8_BF16 = tl.constexpr(_int8_asm("bf16x2", 4))
_INT8_F16 = tl.constexpr(_int8_asm("f16x2", 4))
_INT8_BF16_2 = tl.constexpr(_int8_asm("bf16x2", 2))
_INT8_F16_2 = tl.constexpr(_int8_asm("f16x2", 2))


@lazy_helper
def _int8_q_tile(w, DT: tl.constexpr, I8Q: tl.constexpr, PACK: tl.constexpr):
    """INT8_Q: the int8 weight tile as the integers q in the model dtype (exact: |q| <= 128 needs 8 bits), for a dot
    whose result the channel scales then multiply. I8Q 1 / 2: inline PTX (bf16 / fp16) at 1.5 (fp16: 0.75) integer
    ops and half a packed FMA per weight, where Triton's int -> float conversion runs at a quarter of the integer
    rate on sm90; PACK weights per call: 4 in mma.sync's operand layout, 2 in a swapped wgmma's register operand
    (whose weight pairs come from separate 16-bit loads: four per call cost three PRMTs per pair to pack). 3: that
    conversion (the interpreter runs no PTX)."""
    if I8Q == 1 and PACK == 2:
        return tl.inline_asm_elementwise(_INT8_BF16_2, "=r,h", [w], tl.bfloat16, True, 2)
    elif I8Q == 2 and PACK == 2:
        return tl.inline_asm_elementwise(_INT8_F16_2, "=r,h", [w], tl.float16, True, 2)
    elif I8Q == 1:
        return tl.inline_asm_elementwise(_INT8_BF16, "=r,=r,r", [w], tl.bfloat16, True, 4)
    elif I8Q == 2:
        return tl.inline_asm_elementwise(_INT8_F16, "=r,=r,r", [w], tl.float16, True, 4)
    else:
        return w.to(DT)


@lazy_helper
def _int8_w_tile(w, s, DT: tl.constexpr, I8Q: tl.constexpr, SWAP: tl.constexpr):
    """The int8_w8a16 weight tile as the dot takes it: INT8_Q's integers q (I8Q != 0; the caller scales the dot's
    result), else kernel=torch's dequantization, (q * s) in fp32 rounded to DT. ``s``: the tile's channel scales;
    SWAP: the tile is [BLOCK_N, BLOCK_K] (channels down the rows) and the PTX takes two weights per call."""
    if I8Q != 0:
        t = _int8_q_tile(w, DT, I8Q, 2 if SWAP else 4)
    elif SWAP:
        t = (w.to(tl.float32) * s[:, None]).to(DT)
    else:
        t = (w.to(tl.float32) * s[None, :]).to(DT)
    return t


@lazy_helper
def _int4_q_tile(wb, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, PAIRS: tl.constexpr,
                 HAS_ZERO: tl.constexpr):
    """INT4_QPAIRS (PAIRS 3: bf16, 4: fp16): the [BLOCK_K, BLOCK_N] tile of q - 8 (symmetric) or q (zero points) of
    the bytes ``wb``, exact in the model dtype, from one-operand inline PTX that Triton runs in the MMA's register
    layout; the caller applies zero points and scales to the dot's result. PAIRS 5 / 6: the same values from plain
    integer ops, for the interpreter (which cannot run PTX), so that CPU tests run the rest of the path."""
    if PAIRS >= 5:
        off = 0 if HAS_ZERO else 8
        lo = ((wb & 0xF).to(tl.int32) - off).to(DT)
        hi = ((wb >> 4).to(tl.int32) - off).to(DT)
        return _interleave_k(lo, hi, BLOCK_K, BLOCK_N)
    if PAIRS == 3:
        if HAS_ZERO:
            p = tl.inline_asm_elementwise(_QPAIRS_BF16_Q, _QPAIRS_IO, [wb], tl.int32, True, 4)
        else:
            p = tl.inline_asm_elementwise(_QPAIRS_BF16_SYM, _QPAIRS_IO, [wb], tl.int32, True, 4)
    else:
        if HAS_ZERO:
            p = tl.inline_asm_elementwise(_QPAIRS_F16_Q, _QPAIRS_IO, [wb], tl.int32, True, 4)
        else:
            p = tl.inline_asm_elementwise(_QPAIRS_F16_SYM, _QPAIRS_IO, [wb], tl.int32, True, 4)
    return _pairs_tile(p, BLOCK_K, BLOCK_N, DT)


@lazy_helper
def _pairs_tile(p, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile of int32 nibble pairs ``p [BLOCK_K / 2, BLOCK_N]`` (low half k = 2j, high 2j + 1)."""
    lo = p.to(tl.int16).to(DT, bitcast=True)
    hi = (p >> 16).to(tl.int16).to(DT, bitcast=True)
    return _interleave_k(lo, hi, BLOCK_K, BLOCK_N)


@lazy_helper
def _int4_tile(wb, s, z, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, PAIRS: tl.constexpr):
    """The dequantized [BLOCK_K, BLOCK_N] tile of bytes ``wb [BLOCK_K / 2, BLOCK_N]`` (k = 2j low nibble, 2j + 1
    high), scales s and zeros z (fp32, broadcast to wb), rounded as kernel=torch rounds ``(q - z) * s``.

    PAIRS (INT4_PAIRS): both nibbles of a byte become one bf16x2 (1) or f16x2 (2) register, the pair the MMA
    operand holds: one LOP3 sets them into the mantissa of M = 128 (fp16 1024) with its ulp of 1, one packed FMA
    subtracts M + z (exact) and one multiplies by the scale, rounding once as the fp32 product rounded to the
    model dtype does (``q - z`` has 5 bits, the scale 8 or 11: the product is exact before rounding). Needs the
    scales stored in the model dtype. Otherwise: ``q - z`` from the bits of the float 2^23 + q, times s in fp32."""
    if PAIRS != 0:
        s2 = _pair_bits(s, DT)
        if PAIRS == 1:
            p = tl.inline_asm_elementwise(_PAIRS_BF16, _PAIRS_IO, [wb, s2, _pair_bits(-(128.0 + z), DT)], tl.int32,
                                          True, 4)
        else:
            p = tl.inline_asm_elementwise(_PAIRS_F16, _PAIRS_IO, [wb, s2, _pair_bits(-(1024.0 + z), DT)], tl.int32,
                                          True, 4)
        return _pairs_tile(p, BLOCK_K, BLOCK_N, DT)
    lo = (_int4_minus_zero(wb & 0xF, z) * s).to(DT)
    hi = (_int4_minus_zero(wb >> 4, z) * s).to(DT)
    return _interleave_k(lo, hi, BLOCK_K, BLOCK_N)


@lazy_helper
def _quant_act(v, scale, QMAX: tl.constexpr, AQ_INT8: tl.constexpr, RNE: tl.constexpr):
    """Activation values (fp32) divided by their row's ``scale`` (broadcast to v's shape) with a correctly rounded
    division, clamped to +-QMAX; int8 also rounded half to even (the 1.5 * 2^23 trick). fp8 callers cast."""
    r = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -QMAX), QMAX)
    if AQ_INT8:
        r = (r + RNE) - RNE
    return r


@lazy_helper
def _activate(g, u, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    """The gated activation of GEMM1's epilogue (fp32): silu(g) * u, gelu(g) * u, or GPT-OSS's clamped swigluoai."""
    if ACT == 0:
        h = g / (1.0 + tl.exp(-g)) * u
    elif ACT == 1:
        h = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)) * u
    else:
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        h = (uc + 1.0) * (gc / (1.0 + tl.exp(-ALPHA * gc)))
    return h


@lazy_jit
def _gemm1_kernel(
    x_ptr, w_ptr, w_desc, b_ptr, out_ptr,
    sorted_ids_ptr, expert_ids_ptr, ntpp_ptr, topk_ids_ptr,
    as_ptr, ws_ptr, wz_ptr,
    num_pairs, N, K, top_k, num_pid_m, num_experts,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_om, stride_on,
    stride_asm, stride_ask, stride_wse, stride_wsn, stride_wsk, stride_wze, stride_wzn, stride_wzk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, EVEN_K: tl.constexpr,
    ALPHA: tl.constexpr, LIMIT: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    WQ: tl.constexpr, WS: tl.constexpr, QBN: tl.constexpr, QBK: tl.constexpr, GROUP_TILE: tl.constexpr,
    HAS_ZERO: tl.constexpr, ACC_INT: tl.constexpr, MAGIC: tl.constexpr, MOFF: tl.constexpr, PAIRS: tl.constexpr,
    AQ: tl.constexpr, QMAX: tl.constexpr, AQ_INT8: tl.constexpr, EPS: tl.constexpr, RNE: tl.constexpr,
    AMAX_BLOCK: tl.constexpr, PROMOTE: tl.constexpr, I8Q: tl.constexpr, SWAP: tl.constexpr,
):
    pid_m, pid_n = _grouped_pids(tl.program_id(0), num_pid_m, N, BLOCK_N, GROUP_M)

    offs_m = tl.arange(0, BLOCK_M)
    if DIRECT:
        expert = tl.load(topk_ids_ptr + pid_m)
        pairs = pid_m + offs_m * 0
        row_mask = offs_m == 0
    else:
        ntpp = tl.load(ntpp_ptr)
        if pid_m * BLOCK_M >= ntpp:
            return
        expert = tl.load(expert_ids_ptr + pid_m)
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + offs_m)
        row_mask = pairs < num_pairs
    if (expert < 0) | (expert >= num_experts):  # dropped (-1, another rank's expert) or out of range: skipped
        return
    tokens = (pairs // top_k).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n_safe = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    if WQ == 2:  # int4: byte j of a row holds k = 2j (low nibble) and 2j + 1 (high)
        offs_kh = tl.arange(0, BLOCK_K // 2)
        if MAGIC != 0:  # INT4_MAGIC: even/odd halves of A against the low/high nibbles
            a_ptrs = x_ptr + tokens[:, None] * stride_xm + (2 * offs_kh)[None, :] * stride_xk
        g_ptrs = w_base + offs_n_safe[None, :].to(tl.int64) * stride_wn + offs_kh[:, None] * stride_wk
    else:
        g_ptrs = w_base + offs_n_safe[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    if SWAP:  # the weight tile as the dot's A operand, [BLOCK_N, BLOCK_K] (SWAP_AB)
        g_ptrs = w_base + offs_n_safe[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
    u_ptrs = g_ptrs + N * stride_wn
    ws_base = ws_ptr + expert.to(tl.int64) * stride_wse
    offs_nu = offs_n_safe + N
    if WQ == 1 or (WQ == 3 and WS == 1):  # one scale per output channel [E, 2N, 1]
        sg = tl.load(ws_base + offs_n_safe * stride_wsn).to(tl.float32)
        su = tl.load(ws_base + offs_nu * stride_wsn).to(tl.float32)
    if WQ == 2:
        if HAS_ZERO:  # zero points [E, N, K/g] packed two per byte along the output dim
            wz_base = wz_ptr + expert.to(tl.int64) * stride_wze
            zg_ptrs = wz_base + (offs_n_safe // 2) * stride_wzn
            zu_ptrs = wz_base + (offs_nu // 2) * stride_wzn
            zg_shift = (offs_n_safe % 2) * 4
            zu_shift = (offs_nu % 2) * 4
    a_row_ok = row_mask
    if AQ != 0:  # FUSED_AQ (decode): this pair's row of x quantized here, as quant_rows would (one live row)
        x_row = x_ptr + (pid_m // top_k).to(tl.int64) * stride_xm
        a_scale = _row_quant_scale(x_row, K, stride_xk, as_ptr, AMAX_BLOCK, AQ, QMAX, EPS)

    if SWAP:  # (transposed: [BLOCK_N, BLOCK_M] until after the K loop)
        acc_g = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
        acc_u = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    elif ACC_INT:
        acc_g = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        acc_u = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    else:
        acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if PROMOTE > 1:  # fp8: the tensor core accumulates PROMOTE tiles, then they are added in fp32
        part_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        part_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # TMA: the weights of expert e are rows [e * 2N, (e + 1) * 2N) of w13 viewed as [E * 2N, K]; a tile that
    # runs past N reads the next rows (or zeros past the end), and those columns are masked at the store.
    row_g = expert * (2 * N) + pid_n * BLOCK_N
    for kk in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if WQ == 2:
            if EVEN_K:
                gb = tl.load(g_ptrs)
                ub = tl.load(u_ptrs)
                if MAGIC != 0:
                    ae = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
                    ao = tl.load(a_ptrs + stride_xk, mask=row_mask[:, None], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            else:
                kh_ok = offs_kh < (K - kk * BLOCK_K) // 2
                gb = tl.load(g_ptrs, mask=kh_ok[:, None], other=0)
                ub = tl.load(u_ptrs, mask=kh_ok[:, None], other=0)
                if MAGIC != 0:
                    ae = tl.load(a_ptrs, mask=row_mask[:, None] & kh_ok[None, :], other=0.0)
                    ao = tl.load(a_ptrs + stride_xk, mask=row_mask[:, None] & kh_ok[None, :], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k < K - kk * BLOCK_K)[None, :], other=0.0)
            if GROUP_TILE:  # the whole K tile lies in one group
                grp = (kk * BLOCK_K) // QBK
                s_g = tl.load(ws_base + offs_n_safe * stride_wsn + grp * stride_wsk).to(tl.float32)[None, :]
                s_u = tl.load(ws_base + offs_nu * stride_wsn + grp * stride_wsk).to(tl.float32)[None, :]
                if HAS_ZERO:
                    z_g = ((tl.load(zg_ptrs + grp * stride_wzk) >> zg_shift) & 0xF).to(tl.float32)[None, :]
                    z_u = ((tl.load(zu_ptrs + grp * stride_wzk) >> zu_shift) & 0xF).to(tl.float32)[None, :]
                else:
                    z_g = 8.0
                    z_u = 8.0
            else:  # groups (even sizes) change inside the tile: one scale per (k pair, n)
                grp = ((kk * BLOCK_K + 2 * offs_kh) // QBK)[:, None]
                k_in = (offs_kh < (K - kk * BLOCK_K) // 2)[:, None]
                s_g = tl.load(ws_base + offs_n_safe[None, :] * stride_wsn + grp * stride_wsk, mask=k_in, other=0.0).to(tl.float32)
                s_u = tl.load(ws_base + offs_nu[None, :] * stride_wsn + grp * stride_wsk, mask=k_in, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z_g = ((tl.load(zg_ptrs[None, :] + grp * stride_wzk, mask=k_in, other=0) >> zg_shift[None, :]) & 0xF).to(tl.float32)
                    z_u = ((tl.load(zu_ptrs[None, :] + grp * stride_wzk, mask=k_in, other=0) >> zu_shift[None, :]) & 0xF).to(tl.float32)
                else:
                    z_g = 8.0
                    z_u = 8.0
            if MAGIC != 0:  # INT4_MAGIC: M + q from the bits, scale and zero after the dot
                g_lo = ((gb & 0xF).to(tl.int16) | MAGIC).to(x_ptr.dtype.element_ty, bitcast=True)
                g_hi = ((gb >> 4).to(tl.int16) | MAGIC).to(x_ptr.dtype.element_ty, bitcast=True)
                u_lo = ((ub & 0xF).to(tl.int16) | MAGIC).to(x_ptr.dtype.element_ty, bitcast=True)
                u_hi = ((ub >> 4).to(tl.int16) | MAGIC).to(x_ptr.dtype.element_ty, bitcast=True)
                rs = (tl.reduce(ae.to(tl.float32), 1, tl.standard._sum_combine)
                      + tl.reduce(ao.to(tl.float32), 1, tl.standard._sum_combine))[:, None]
                pg = tl.dot(ae, g_lo)
                pg = tl.dot(ao, g_hi, pg)
                pu = tl.dot(ae, u_lo)
                pu = tl.dot(ao, u_hi, pu)
                acc_g += (pg - (MOFF + z_g) * rs) * s_g
                acc_u += (pu - (MOFF + z_u) * rs) * s_u
            else:
                # The low / high nibbles interleave back into [BLOCK_K, BLOCK_N] (row 2j + i), so A stays one
                # contiguous tile (vector loads the pipeline can stage) and each dot is BLOCK_K deep. The tile is
                # q - 8 (or q) under INT4_QPAIRS (_int4_q_tile); else kernel=torch's dequantization, (q - zero) *
                # scale rounded once to the model dtype (_int4_tile: fp32, or INT4_PAIRS' packed pairs).
                if PAIRS >= 3:  # INT4_QPAIRS: the dot of q - 8 (or q), then zero points and the group scale
                    pg = tl.dot(a, _int4_q_tile(gb, BLOCK_K, BLOCK_N, x_ptr.dtype.element_ty, PAIRS, HAS_ZERO))
                    pu = tl.dot(a, _int4_q_tile(ub, BLOCK_K, BLOCK_N, x_ptr.dtype.element_ty, PAIRS, HAS_ZERO))
                    if HAS_ZERO:
                        rs = tl.reduce(a.to(tl.float32), 1, tl.standard._sum_combine)[:, None]
                        pg -= z_g * rs
                        pu -= z_u * rs
                    acc_g += pg * s_g
                    acc_u += pu * s_u
                else:
                    g = _int4_tile(gb, s_g, z_g, BLOCK_K, BLOCK_N, x_ptr.dtype.element_ty, PAIRS)
                    u = _int4_tile(ub, s_u, z_u, BLOCK_K, BLOCK_N, x_ptr.dtype.element_ty, PAIRS)
                    acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
                    acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_xk
            g_ptrs += (BLOCK_K // 2) * stride_wk
            u_ptrs += (BLOCK_K // 2) * stride_wk
        else:
            if USE_TMA:
                k_ok = offs_k < K - kk * BLOCK_K
                a = tl.load(a_ptrs, mask=row_mask[:, None] & k_ok[None, :], other=0.0)
                g = w_desc.load([row_g, kk * BLOCK_K]).T
                u = w_desc.load([row_g + N, kk * BLOCK_K]).T
            elif EVEN_K:
                a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
                g = tl.load(g_ptrs)
                u = tl.load(u_ptrs)
            else:
                k_ok = offs_k < K - kk * BLOCK_K
                a = tl.load(a_ptrs, mask=row_mask[:, None] & k_ok[None, :], other=0.0)
                w_ok = k_ok[None, :] if SWAP else k_ok[:, None]  # (SWAP: the tile is [BLOCK_N, BLOCK_K])
                g = tl.load(g_ptrs, mask=w_ok, other=0.0)
                u = tl.load(u_ptrs, mask=w_ok, other=0.0)
            if AQ != 0:
                v = tl.load(x_row + (kk * BLOCK_K + offs_k) * stride_xk, mask=offs_k < K - kk * BLOCK_K, other=0.0)
                r = _quant_act(v.to(tl.float32), a_scale + offs_k * 0.0, QMAX, AQ_INT8, RNE)
                a = tl.where(row_mask[:, None], r[None, :], 0.0).to(w_ptr.dtype.element_ty)
            if WQ == 1:  # int8 weights: INT8_Q's integers, or dequantized as kernel=torch does
                g = _int8_w_tile(g, sg, x_ptr.dtype.element_ty, I8Q, SWAP)
                u = _int8_w_tile(u, su, x_ptr.dtype.element_ty, I8Q, SWAP)
            if WQ == 3 and WS == 2:  # block fp8: the K tile lies in one scale block; scale the partial products
                kb = (kk * BLOCK_K) // QBK
                a_s = tl.load(as_ptr + tokens * stride_asm + kb * stride_ask, mask=a_row_ok, other=0.0)
                b_g = tl.load(ws_base + (offs_n_safe // QBN) * stride_wsn + kb * stride_wsk).to(tl.float32)
                b_u = tl.load(ws_base + (offs_nu // QBN) * stride_wsn + kb * stride_wsk).to(tl.float32)
                acc_g += tl.dot(a, g) * a_s[:, None] * b_g[None, :]
                acc_u += tl.dot(a, u) * a_s[:, None] * b_u[None, :]
            elif ACC_INT:
                acc_g = tl.dot(a, g, acc_g, out_dtype=tl.int32)
                acc_u = tl.dot(a, u, acc_u, out_dtype=tl.int32)
            elif WQ == 3 and PROMOTE > 1:  # fp8: promote every PROMOTE K tiles (see FP8_PROMOTE)
                part_g = tl.dot(a, g, part_g)
                part_u = tl.dot(a, u, part_u)
                if kk % PROMOTE == PROMOTE - 1:
                    acc_g += part_g
                    acc_u += part_u
                    part_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
                    part_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            elif WQ == 3:  # fp8: promote to the fp32 accumulator after every K tile (see FP8_PROMOTE)
                acc_g = tl.dot(a, g, acc_g, max_num_imprecise_acc=BLOCK_K)
                acc_u = tl.dot(a, u, acc_u, max_num_imprecise_acc=BLOCK_K)
            elif SWAP:  # int8_w8a16: W [BLOCK_N, BLOCK_K] x A^T [BLOCK_K, BLOCK_M]
                at = tl.trans(a)
                acc_g = tl.dot(g, at, acc_g, input_precision=PRECISION)
                acc_u = tl.dot(u, at, acc_u, input_precision=PRECISION)
            else:
                acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
                acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_xk
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk

    if PROMOTE > 1:
        acc_g += part_g
        acc_u += part_u
    if SWAP:
        acc_g = tl.trans(acc_g)
        acc_u = tl.trans(acc_u)
    if WQ == 1 and I8Q != 0:
        acc_g = acc_g * sg[None, :]
        acc_u = acc_u * su[None, :]
    if WQ == 3 and WS != 2:  # w8a8: per-token activation scale x weight scale (per expert or channel)
        if AQ != 0:
            a_s = a_scale
        else:
            a_s = tl.load(as_ptr + tokens * stride_asm, mask=a_row_ok, other=0.0)[:, None]
        if WS == 0:
            w_s = tl.load(ws_base).to(tl.float32)
            acc_g = acc_g.to(tl.float32) * (a_s * w_s)
            acc_u = acc_u.to(tl.float32) * (a_s * w_s)
        else:
            acc_g = acc_g.to(tl.float32) * a_s * sg[None, :]
            acc_u = acc_u.to(tl.float32) * a_s * su[None, :]

    if HAS_BIAS:
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        bg = tl.load(b_base + offs_n * stride_bn, mask=n_mask, other=0.0).to(tl.float32)
        bu = tl.load(b_base + (offs_n + N) * stride_bn, mask=n_mask, other=0.0).to(tl.float32)
        acc_g += bg[None, :]
        acc_u += bu[None, :]
    h = _activate(acc_g, acc_u, ACT, ALPHA, LIMIT)
    o_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@lazy_jit
def _gemm2_kernel(
    a_ptr, w_ptr, w_desc, b_ptr, tw_ptr, out_ptr,
    sorted_ids_ptr, expert_ids_ptr, ntpp_ptr, topk_ids_ptr,
    as_ptr, ws_ptr, wz_ptr,
    num_pairs, N, K, top_k, num_pid_m, num_experts,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_om, stride_on,
    stride_asm, stride_ask, stride_wse, stride_wsn, stride_wsk, stride_wze, stride_wzn, stride_wzk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    WQ: tl.constexpr, WS: tl.constexpr, QBN: tl.constexpr, QBK: tl.constexpr, GROUP_TILE: tl.constexpr,
    HAS_ZERO: tl.constexpr, ACC_INT: tl.constexpr, MAGIC: tl.constexpr, MOFF: tl.constexpr, PAIRS: tl.constexpr,
    AQ: tl.constexpr, QMAX: tl.constexpr, AQ_INT8: tl.constexpr, EPS: tl.constexpr, RNE: tl.constexpr,
    AMAX_BLOCK: tl.constexpr, PROMOTE: tl.constexpr, I8Q: tl.constexpr, SWAP: tl.constexpr,
):
    pid_m, pid_n = _grouped_pids(tl.program_id(0), num_pid_m, N, BLOCK_N, GROUP_M)

    offs_m = tl.arange(0, BLOCK_M)
    if DIRECT:
        expert = tl.load(topk_ids_ptr + pid_m)
        pairs = pid_m + offs_m * 0
        row_mask = offs_m == 0
    else:
        ntpp = tl.load(ntpp_ptr)
        if pid_m * BLOCK_M >= ntpp:
            return
        expert = tl.load(expert_ids_ptr + pid_m)
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + offs_m)
        row_mask = pairs < num_pairs
    if (expert < 0) | (expert >= num_experts):  # dropped (-1, another rank's expert) or out of range: skipped
        return
    rows = tl.where(row_mask, pairs, 0).to(tl.int64)
    if AQ != 0:  # FUSED_AQ: this pair's intermediate row quantized here
        a_row = a_ptr + pid_m.to(tl.int64) * stride_am
        offs_q = tl.arange(0, BLOCK_K)
        a_scale = _row_quant_scale(a_row, K, stride_ak, as_ptr, AMAX_BLOCK, AQ, QMAX, EPS)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n_safe = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    if WQ == 2:  # int4: INT4_MAGIC takes even/odd halves of A against the low/high nibbles
        offs_kh = tl.arange(0, BLOCK_K // 2)
        if MAGIC != 0:
            a_ptrs = a_ptr + rows[:, None] * stride_am + (2 * offs_kh)[None, :] * stride_ak
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n_safe[None, :].to(tl.int64) * stride_wn + offs_kh[:, None] * stride_wk
    else:
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n_safe[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    if SWAP:  # (as in _gemm1_kernel)
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + offs_n_safe[:, None].to(tl.int64) * stride_wn
                  + offs_k[None, :] * stride_wk)
    ws_base = ws_ptr + expert.to(tl.int64) * stride_wse
    if WQ == 1 or (WQ == 3 and WS == 1):
        sw = tl.load(ws_base + offs_n_safe * stride_wsn).to(tl.float32)
    if WQ == 2:
        if HAS_ZERO:
            z_ptrs = wz_ptr + expert.to(tl.int64) * stride_wze + (offs_n_safe // 2) * stride_wzn
            z_shift = (offs_n_safe % 2) * 4

    if SWAP:
        acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    elif ACC_INT:
        acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if PROMOTE > 1:
        part = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    row_w = expert * N + pid_n * BLOCK_N  # w2 viewed as [E * N, K]
    for kk in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if WQ == 2:
            if EVEN_K:
                wb = tl.load(w_ptrs)
                if MAGIC != 0:
                    ae = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
                    ao = tl.load(a_ptrs + stride_ak, mask=row_mask[:, None], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            else:
                kh_ok = offs_kh < (K - kk * BLOCK_K) // 2
                wb = tl.load(w_ptrs, mask=kh_ok[:, None], other=0)
                if MAGIC != 0:
                    ae = tl.load(a_ptrs, mask=row_mask[:, None] & kh_ok[None, :], other=0.0)
                    ao = tl.load(a_ptrs + stride_ak, mask=row_mask[:, None] & kh_ok[None, :], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k < K - kk * BLOCK_K)[None, :], other=0.0)
            if GROUP_TILE:
                grp = (kk * BLOCK_K) // QBK
                s_w = tl.load(ws_base + offs_n_safe * stride_wsn + grp * stride_wsk).to(tl.float32)[None, :]
                if HAS_ZERO:
                    z_w = ((tl.load(z_ptrs + grp * stride_wzk) >> z_shift) & 0xF).to(tl.float32)[None, :]
                else:
                    z_w = 8.0
            else:
                grp = ((kk * BLOCK_K + 2 * offs_kh) // QBK)[:, None]
                k_in = (offs_kh < (K - kk * BLOCK_K) // 2)[:, None]
                s_w = tl.load(ws_base + offs_n_safe[None, :] * stride_wsn + grp * stride_wsk, mask=k_in, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z_w = ((tl.load(z_ptrs[None, :] + grp * stride_wzk, mask=k_in, other=0) >> z_shift[None, :]) & 0xF).to(tl.float32)
                else:
                    z_w = 8.0
            if MAGIC != 0:
                w_lo = ((wb & 0xF).to(tl.int16) | MAGIC).to(a_ptr.dtype.element_ty, bitcast=True)
                w_hi = ((wb >> 4).to(tl.int16) | MAGIC).to(a_ptr.dtype.element_ty, bitcast=True)
                rs = (tl.reduce(ae.to(tl.float32), 1, tl.standard._sum_combine)
                      + tl.reduce(ao.to(tl.float32), 1, tl.standard._sum_combine))[:, None]
                p = tl.dot(ae, w_lo)
                p = tl.dot(ao, w_hi, p)
                acc += (p - (MOFF + z_w) * rs) * s_w
            else:  # dequantized as kernel=torch does, nibbles back in K order (as in _gemm1_kernel)
                if PAIRS >= 3:  # INT4_QPAIRS (as in _gemm1_kernel)
                    p = tl.dot(a, _int4_q_tile(wb, BLOCK_K, BLOCK_N, a_ptr.dtype.element_ty, PAIRS, HAS_ZERO))
                    if HAS_ZERO:
                        p -= z_w * tl.reduce(a.to(tl.float32), 1, tl.standard._sum_combine)[:, None]
                    acc += p * s_w
                else:
                    w = _int4_tile(wb, s_w, z_w, BLOCK_K, BLOCK_N, a_ptr.dtype.element_ty, PAIRS)
                    acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += (BLOCK_K // 2) * stride_wk
        else:
            if USE_TMA:
                k_ok = offs_k < K - kk * BLOCK_K
                a = tl.load(a_ptrs, mask=row_mask[:, None] & k_ok[None, :], other=0.0)
                w = w_desc.load([row_w, kk * BLOCK_K]).T
            elif EVEN_K:
                a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
                w = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - kk * BLOCK_K
                a = tl.load(a_ptrs, mask=row_mask[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[None, :] if SWAP else k_ok[:, None], other=0.0)
            if AQ != 0:
                v = tl.load(a_row + (kk * BLOCK_K + offs_q) * stride_ak, mask=offs_q < K - kk * BLOCK_K, other=0.0)
                r = _quant_act(v.to(tl.float32), a_scale + offs_q * 0.0, QMAX, AQ_INT8, RNE)
                a = tl.where(row_mask[:, None], r[None, :], 0.0).to(w_ptr.dtype.element_ty)
            if WQ == 1:  # (as in _gemm1_kernel)
                w = _int8_w_tile(w, sw, a_ptr.dtype.element_ty, I8Q, SWAP)
            if WQ == 3 and WS == 2:
                kb = (kk * BLOCK_K) // QBK
                a_s = tl.load(as_ptr + rows * stride_asm + kb * stride_ask, mask=row_mask, other=0.0)
                b_s = tl.load(ws_base + (offs_n_safe // QBN) * stride_wsn + kb * stride_wsk).to(tl.float32)
                acc += tl.dot(a, w) * a_s[:, None] * b_s[None, :]
            elif ACC_INT:
                acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            elif WQ == 3 and PROMOTE > 1:
                part = tl.dot(a, w, part)
                if kk % PROMOTE == PROMOTE - 1:
                    acc += part
                    part = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            elif WQ == 3:
                acc = tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K)
            elif SWAP:  # (as in _gemm1_kernel)
                acc = tl.dot(w, tl.trans(a), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk

    if PROMOTE > 1:
        acc += part
    if SWAP:
        acc = tl.trans(acc)
    if WQ == 1 and I8Q != 0:
        acc = acc * sw[None, :]
    if WQ == 3 and WS != 2:
        if AQ != 0:
            a_s = a_scale
        else:
            a_s = tl.load(as_ptr + rows * stride_asm, mask=row_mask, other=0.0)[:, None]
        if WS == 0:
            acc = acc.to(tl.float32) * (a_s * tl.load(ws_base).to(tl.float32))
        else:
            acc = acc.to(tl.float32) * a_s * sw[None, :]

    if HAS_BIAS:
        bias = tl.load(b_ptr + expert.to(tl.int64) * stride_be + offs_n * stride_bn, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tw = tl.load(tw_ptr + rows, mask=row_mask, other=0.0)
    acc = acc * tw[:, None]
    mask = row_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tokens = rows // top_k
        o_ptrs = out_ptr + tokens[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.atomic_add(o_ptrs, acc, mask=mask, sem="relaxed")
    else:
        o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@lazy_jit
def _moe_sum_kernel(buf_ptr, ids_ptr, out_ptr, H, num_experts, stride_b, stride_o, TOP_K: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    """out[t] = sum_j buf[t * k + j] in fp32, cast once; the rows of dropped pairs (id outside [0, E), never
    written by GEMM2) are skipped, so the per-pair buffer needs no zeroing launch."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.full((BLOCK_H,), 0.0, tl.float32)
    for j in tl.range(0, TOP_K):
        pair = t * TOP_K + j
        e = tl.load(ids_ptr + pair)
        if (e >= 0) & (e < num_experts):
            acc += tl.load(buf_ptr + pair * stride_b + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


MOE_SUM_BLOCK_H = 1024


def moe_sum(buf: torch.Tensor, ids_flat: torch.Tensor, top_k: int, num_experts: int) -> torch.Tensor:
    """The top-k sum of GEMM2's per-pair rows ``buf [T * k, H]`` -> ``[T, H]`` in buf's dtype (fp32 sums, like
    vLLM's moe_sum and torch's sum); pairs whose id is outside ``[0, num_experts)`` are skipped. One launch, where
    a zeroing launch and torch's sum were two (qwen3 T = 4096 on an H100: 21 + 61 us)."""
    P, H = buf.shape
    T = P // top_k
    out = torch.empty(T, H, dtype=buf.dtype, device=buf.device)
    if T and H:
        _moe_sum_kernel[(T, cdiv(H, MOE_SUM_BLOCK_H))](buf, ids_flat, out, H, num_experts, buf.stride(0),
                                                                out.stride(0), TOP_K=top_k, BLOCK_H=MOE_SUM_BLOCK_H)
    return out


def _weight_desc(w: torch.Tensor, bn: int, bk: int):
    """A host-side TMA descriptor over the weights viewed as 2D ``[E * rows, K]`` (tiles ``[bn, bk]``), or None
    (pointer loads) where TMA cannot serve: non-contiguous weights, rows not 16-byte aligned, tiny tiles."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    elt = w.element_size()
    if not w.is_contiguous() or (w.shape[-1] * elt) % 16 or w.data_ptr() % 16 or bk * elt < 16:
        return None
    return TensorDescriptor.from_tensor(w.view(-1, w.shape[-1]), [bn, bk])


def _precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs: true fp32 products (Triton's default for an fp32 dot is tf32, ~3e-4 relative error).
    return "ieee" if dtype == torch.float32 else None


def _grid(num_pid_m: int, n: int, block_n: int) -> tuple[int]:
    return (num_pid_m * cdiv(n, block_n),)


@dataclass(frozen=True)
class QuantSpec:
    """How the GEMMs read quantized operands (``WQ`` etc. in the kernels).

    ``wq``: 0 unquantized; 1 int8 weights dequantized in-kernel to the activations' dtype (w8a16); 2 packed
    int4 weights with group scales (w4a16, ``qbk`` = group size, ``zero`` = packed zero points); 3 w8a8: the
    activations come quantized (fp8 or int8, ``a_scale`` per row or per row and ``qbk`` group) and the dot
    runs on the quantized values, scales applied after (``ws``: 0 one weight scale per expert, 1 per output
    channel, 2 per ``qbn x qbk`` block, applied per K tile).
    """

    wq: int = 0
    ws: int = 0
    qbn: int = 1
    qbk: int = 1
    acc_int: bool = False


NO_QUANT = QuantSpec()


def _strides(t: torch.Tensor | None, n: int) -> list[int]:
    st = list(t.stride()) if t is not None else []
    return (st + [0] * n)[:n]


# INT4_MAGIC: a nibble q OR-ed into the bits of the model dtype's M (bf16 128, fp16 1024: the smallest powers of
# two whose ulp is 1) *is* the number M + q, so the int4 tile becomes an MMA operand with two integer ops per
# element and no int -> float conversion (conversions run at a quarter of the integer rate on sm90: the
# earlier (q - zero) * scale in fp32, rounded to bf16, made the T = 1 decode ALU bound at 17-33% of the floor).
# With the K tile inside one scale group (GROUP_TILE), dot(a, M + q) - (M + zero) * rowsum(a), times the
# group scale, is sum(a * (q - zero) * scale) with the products exact and fp32 sums; kernel=torch instead rounds
# each dequantized weight to the model dtype, ~2^-9 relative (the float64 oracle does not round).
INT4_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}
# It serves the one-pair decode (DIRECT) only. Expert-sorted blocks dequantize the weight tile instead (its cost
# shared by BLOCK_M rows; q - zero from the bits of 2^23 + q, no conversion), interleave the nibbles back into one
# [BLOCK_K, BLOCK_N] tile and accumulate inside the MMA with A one contiguous, pipelined tile: INT4_MAGIC's
# scale step after each dot holds two [BLOCK_M, BLOCK_N] fp32 tiles per accumulator (255 registers and spills
# at 128 x 128) and its even / odd halves of A are stride-2 loads the pipeline cannot stage. H100, same process:
# 1.05x (BLOCK_M 16, qwen3 T = 16) to 5.6x (mixtral T = 4096: 57.6 -> 10.2 ms) faster.


# INT4_PAIRS: expert-sorted blocks of INT4_PAIRS_MIN_BLOCK_M rows or more dequantize both nibbles of a byte as one
# packed pair (_int4_tile) when the model is bf16 (1) or fp16 (2) and the scales are stored in its dtype; compiled
# code only (inline PTX, which the interpreter cannot run; the fp32 dequantization computes the same values).
# Why 64 rows: there sm90's dot is a wgmma whose weight operand is read from shared memory, so the dequantized tile
# is stored there either way, and the pairs halve the loop (mixtral's 64 x 64 gemm1 tile: 982 -> 493 SASS per K
# tile). Smaller blocks run mma.sync with the weights in registers: Triton loads the bytes straight into the MMA's
# register layout and dequantizes there only through ops it knows to be elementwise (arith, one-operand inline
# asm), and this asm takes the scales too, so the tile went through shared memory again: fewer instructions but
# 29% slower (mixtral T = 16, H200: 722 against 558 us). INT4_PAIRS_ON = False turns it off (A/B timing).
INT4_PAIRS = {torch.bfloat16: 1, torch.float16: 2}
INT4_PAIRS_MIN_BLOCK_M = 64
INT4_PAIRS_ON = True
# INT4_QPAIRS: expert-sorted blocks under INT4_PAIRS_MIN_BLOCK_M rows (mma.sync, the weights in registers) with the
# K tile inside one scale group: one-operand PTX makes each byte's nibble pair q - 8 (or q) exactly, in the MMA's
# register layout, and the group scale (and zero point, through the rows' sums) multiply the dot's [BLOCK_M,
# BLOCK_N] result, so the products are exact and nothing is rounded to the model dtype first (as the GEMV).
INT4_QPAIRS_ON = True


# INT8_Q: int8_w8a16 weights enter the dot as the integers q (exact in bf16 / fp16), and the per-channel scale
# multiplies the dot's fp32 result once, after the K loop: the products are exact and nothing is rounded to the model
# dtype first (kernel=torch rounds each q * scale, ~2^-9 relative, which the float64 oracle does not). In place of
# an int -> float conversion, an fp32 multiply and a conversion back per weight, PTX makes each pair of weights with
# three integer ops (fp16: one and a half) and one packed FMA (_int8_asm). INT8_Q_ON = False restores the
# dequantization (A/B timing).
INT8_Q_PTX = {torch.bfloat16: 1, torch.float16: 2}
INT8_Q_ON = True
# SWAP_AB: int8_w8a16 blocks of SWAP_AB_BLOCK_M rows compute the transposed product W [N, K] x A^T: on
# sm90 their dot is a wgmma, which reads its A operand from registers and B from shared memory, so the weight tile
# dequantized in registers feeds the tensor core directly instead of being stored to shared memory first.
SWAP_AB_BLOCK_M = 64
SWAP_AB_ON = True


# FP8_PROMOTE_TILES: how many K tiles an fp8 dot (per-tensor / per-channel) accumulates in the tensor core before
# the partial sum is added to the fp32 accumulator; a tile config's "fp8_promote" overrides it. 1 is
# max_num_imprecise_acc = BLOCK_K (the most precise); every promotion makes the MMA wait, which cost prefill
# (T >= 1024) fp8 its lead over bf16 on an H100.
FP8_PROMOTE_TILES = 1


def _promote(q: QuantSpec, cfg: dict) -> int:
    if q.wq != 3 or q.acc_int or q.ws == 2:  # int8 sums exactly; block fp8 already scales per tile
        return 1
    return int(cfg.get("fp8_promote", FP8_PROMOTE_TILES))


def _int4_pairs(q: QuantSpec, magic: int, group_tile: bool, block_m: int, w_scale, dtype) -> int:
    """The PAIRS constexpr of an int4 launch: 0 the fp32 dequantize, 1 / 2 INT4_PAIRS (bf16 / fp16 model; blocks of
    INT4_PAIRS_MIN_BLOCK_M rows or more, scales in the model dtype, compiled), 3 / 4 INT4_QPAIRS (smaller blocks,
    the K tile inside a group), 5 / 6 INT4_QPAIRS from integer ops under the interpreter (no PTX there)."""
    base = INT4_PAIRS.get(dtype, 0)
    if q.wq != 2 or magic or not base:
        return 0
    if block_m >= INT4_PAIRS_MIN_BLOCK_M:
        ok = INT4_PAIRS_ON and not interpreting() and w_scale is not None and w_scale.dtype == dtype
        return base if ok else 0
    return base + (4 if interpreting() else 2) if INT4_QPAIRS_ON and group_tile else 0


def _swap(q: QuantSpec, direct: bool, block_m: int, cfg: dict) -> bool:
    """SWAP_AB for this launch: int8_w8a16 expert-sorted blocks, where the tile config's "swap" says so, else blocks
    of SWAP_AB_BLOCK_M rows."""
    if q.wq != 1 or direct:
        return False
    return bool(cfg.get("swap", SWAP_AB_ON and block_m == SWAP_AB_BLOCK_M))


def _int8_q(q: QuantSpec, dtype) -> int:
    """The I8Q constexpr of an int8_w8a16 launch: 0 kernel=torch's dequantization (fp32 models, or INT8_Q_ON off),
    1 / 2 INT8_Q's PTX (bf16 / fp16 models), 3 INT8_Q through Triton's conversion (the interpreter)."""
    if q.wq != 1 or not INT8_Q_ON or dtype not in INT8_Q_PTX:
        return 0
    return 3 if interpreting() else INT8_Q_PTX[dtype]


def _quant_args(q: QuantSpec, a_scale, w_scale, w_zero, direct: bool, block_k: int, K: int, fallback: torch.Tensor,
                fallback_dtype: torch.dtype | None = None, aq: int = 0, block_m: int = 0):
    args = [a_scale if a_scale is not None else fallback, w_scale if w_scale is not None else fallback,
            w_zero if w_zero is not None else fallback]
    strides = _strides(a_scale, 2) + _strides(w_scale, 3) + _strides(w_zero, 3)
    group_tile = q.wq == 2 and q.qbk % block_k == 0 and K % block_k == 0
    # MAGIC != 0 is the INT4_MAGIC path itself: the one-pair decode with the K tile inside one group
    magic, moff = INT4_MAGIC.get(fallback_dtype, (0, 0.0)) if direct and group_tile else (0, 0.0)
    pairs = _int4_pairs(q, magic, group_tile, block_m, w_scale, fallback_dtype)
    meta = dict(WQ=q.wq, WS=q.ws, QBN=q.qbn, QBK=q.qbk, GROUP_TILE=group_tile,
                HAS_ZERO=w_zero is not None, ACC_INT=q.acc_int, MAGIC=magic, MOFF=moff, PAIRS=pairs,
                I8Q=_int8_q(q, fallback_dtype), **aq_meta(aq, q.acc_int, K))
    return args, strides, meta


def aq_meta(aq: int, acc_int: bool, K: int) -> dict:
    """FUSED_AQ's constexprs, shared by the GEMMs and the GEMV: the mode (0 off, 1 dynamic, 2 static scale), the
    quantized range (int8 or fp8 e4m3), the rounding constants and the amax pass's step."""
    return dict(AQ=aq, QMAX=INT8_MAX if acc_int else FP8_MAX, AQ_INT8=acc_int, EPS=AMAX_EPS, RNE=_RNE_MAGIC,
                AMAX_BLOCK=amax_block(K))


AMAX_BLOCK_MAX = 4096


def amax_block(K: int) -> int:
    """Elements per step of the FUSED_AQ amax pass: the whole row up to AMAX_BLOCK_MAX (32 fp32 per thread at 4
    warps). With the K tile as the step, a decode program waited ~28 dependent L2 round trips (mixtral's GEMM2
    row of 14336 in 512-wide tiles) before its first weight load."""
    return max(16, min(next_pow2(K), AMAX_BLOCK_MAX))


def gemm1(x, w13, w13_bias, inter, sorted_ids, expert_ids, ntpp, topk_ids_flat, num_pid_m, top_k,
          activation: str, direct: bool, block_m: int, cfg: dict, q: QuantSpec = NO_QUANT,
          a_scale=None, w_scale=None, w_zero=None, aq: int = 0) -> None:
    P, I = inter.shape
    H = x.shape[1]
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    b = w13_bias if w13_bias is not None else w13  # any pointer; unused without HAS_BIAS
    desc = _weight_desc(w13, bn, bk) if cfg.get("tma") and q.wq in (0, 3) else None  # (w8a8: no dequantization)
    qargs, qstrides, qmeta = _quant_args(q, a_scale, w_scale, w_zero, direct, bk, H, w13, x.dtype, aq, block_m)
    _gemm1_kernel[_grid(num_pid_m, I, bn)](
        x, w13, desc, b, inter, sorted_ids, expert_ids, ntpp, topk_ids_flat, *qargs,
        P, I, H, top_k, num_pid_m, w13.shape[0],
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        w13_bias.stride(0) if w13_bias is not None else 0, w13_bias.stride(1) if w13_bias is not None else 0,
        inter.stride(0), inter.stride(1), *qstrides,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", 1),
        ACT=ACT_CODES[activation], HAS_BIAS=w13_bias is not None, DIRECT=direct, EVEN_K=H % bk == 0,
        ALPHA=SWIGLUOAI_ALPHA, LIMIT=SWIGLUOAI_LIMIT, PRECISION=_precision(x.dtype), USE_TMA=desc is not None,
        **qmeta, PROMOTE=_promote(q, cfg), SWAP=_swap(q, direct, block_m, cfg), num_warps=cfg.get("num_warps", 4),
        num_stages=cfg.get("num_stages", 3),
    )


def gemm2(inter, w2, w2_bias, topk_weights_flat, out, sorted_ids, expert_ids, ntpp, topk_ids_flat, num_pid_m,
          top_k, direct: bool, atomic: bool, block_m: int, cfg: dict, q: QuantSpec = NO_QUANT,
          a_scale=None, w_scale=None, w_zero=None, aq: int = 0) -> None:
    P, I = inter.shape
    H = w2.shape[1]
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    b = w2_bias if w2_bias is not None else w2
    desc = _weight_desc(w2, bn, bk) if cfg.get("tma") and q.wq in (0, 3) else None
    qargs, qstrides, qmeta = _quant_args(q, a_scale, w_scale, w_zero, direct, bk, I, w2, inter.dtype, aq, block_m)
    _gemm2_kernel[_grid(num_pid_m, H, bn)](
        inter, w2, desc, b, topk_weights_flat, out, sorted_ids, expert_ids, ntpp, topk_ids_flat, *qargs,
        P, H, I, top_k, num_pid_m, w2.shape[0],
        inter.stride(0), inter.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        w2_bias.stride(0) if w2_bias is not None else 0, w2_bias.stride(1) if w2_bias is not None else 0,
        out.stride(0), out.stride(1), *qstrides,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", 1),
        HAS_BIAS=w2_bias is not None, DIRECT=direct, EVEN_K=I % bk == 0, ATOMIC=atomic,
        PRECISION=_precision(inter.dtype), USE_TMA=desc is not None,
        **qmeta, PROMOTE=_promote(q, cfg), SWAP=_swap(q, direct, block_m, cfg), num_warps=cfg.get("num_warps", 4),
        num_stages=cfg.get("num_stages", 3),
    )
