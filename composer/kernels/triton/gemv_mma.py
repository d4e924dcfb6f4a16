"""int4 decode GEMV on the tensor cores (``"int4_read": "mma"`` in a decode "gemv" tile): one (token, expert) pair
per program, each warp a 16-row slab of the weights, ``mma.sync.m16n8k16`` fed from registers.

The FMA GEMV (gemv.py) spends about 2.7 instructions per nibble and is issue-bound at T = 1 (docs/performance.md,
sixteenth session). Here a packed word yields two nibbles per instruction pair, as in Marlin: ``(w >> 4p) &
0x000F000F | magic`` *is* the bf16x2 (fp16x2) pair ``(magic + q_p, magic + q_{p+4})`` and one packed FMA makes it
``q - zero`` exactly; one MMA then takes 8 nibbles per thread. The weights keep their layout (vLLM's moe_wna16: two
per byte along K, no repacking). The price is that the MMA's k index does not follow K: word ``i`` of thread
``c`` (K offsets ``32c + 8i + 0..7`` of the chunk) gives the MMA's k pairs ``(2c, 2c+1)`` and ``(2c+8, 2c+9)`` the K
offsets ``(0, 4), (1, 5)`` in one step and ``(2, 6), (3, 7)`` in the next, so the activation pairs are built to
match with two PRMTs per step. A sum over K does not care about the order.

Each program: ``num_warps`` warps; a warp of GEMM1 owns 8 gate rows (the MMA's rows 0-7) and the 8 up rows of the
same channels (rows 8-15), so gate and up meet in one thread for the activation; a warp of GEMM2 owns 16 rows. Per
128-deep K chunk a thread loads 16 bytes of each of its two rows and 64 bytes of the activation row (all warps read
the same, from L1), runs 8 MMAs into a fresh fp32 tile and adds it times the rows' group scales into its
accumulator. The B operand's 8 columns all carry the activation row, so every column of C holds the result.

Everything per thread lives in ``[32 * num_warps, 4]`` tensors whose row ``t`` is thread ``t``'s: the layout Triton
gives a 16-byte-per-row load (``sizePerThread [1, 4]``, ``threadsPerWarp [32, 1]``). The inline assembly relies on
it; ``tests/kernels/test_triton_gemv_mma.py`` checks the compiled layout on the CPU, and the GPU tests check
the results. Compiled kernels only (inline PTX): the interpreter and CPUs take gemv.py's reads.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._jit import interpreting, lazy_helper, lazy_jit
from .gemm import _activate

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

CHUNK_K = 128  # K per inner step: 4 threads x 32 K feed each MMA row; scale groups must hold whole chunks
CHUNK = tl.constexpr(CHUNK_K)
# the activations are loaded by the 4 lanes that hold the B operand's column 0 only (the result is read from C's
# column 0): a quarter of the L1 wavefronts, which bound this kernel (ncu: L1/TEX 96% busy with all 32 lanes loading)
MMA_X_LANES = True
MMA_X_AHEAD = False  # (A/B) the activations loaded one chunk ahead, as the weights are with "prefetch"
MMA_W_CG = False  # (A/B) weight loads cached in L2 only (ld.global.cg)
MAGIC = {torch.bfloat16: (0x4300, 128), torch.float16: (0x6400, 1024)}  # bits of `magic` | q reads as magic + q


def _asm() -> str:
    """8 MMAs over one 128-deep chunk: $0-$3 the new accumulator (c0..c3), $4-$7 the old one, $8-$11 the row-g
    words, $12-$15 the row-(g + 8) words, $16-$31 the activation (four 16-byte pieces), $32 / $36 the rows' scales,
    $40 / $44 the rows' packed ``-(magic + zero)``. The type suffix and magic are substituted per dtype."""
    lines = ["{", ".reg .b32 t, a<4>, b<2>, msk, mag, one;", ".reg .f32 c<4>;",
             "mov.b32 msk, 0x000F000F;", "mov.b32 mag, MAGIC;", "mov.b32 one, ONE;",
             "mov.f32 c0, 0f00000000;", "mov.f32 c1, 0f00000000;", "mov.f32 c2, 0f00000000;",
             "mov.f32 c3, 0f00000000;"]

    def pair(dst: str, word: int, p: int, zc: int) -> None:
        if p:
            lines.append(f"shr.b32 t, ${word}, {4 * p};")
            src = "t"
        else:
            src = f"${word}"
        lines.append(f"lop3.b32 {dst}, {src}, msk, mag, 0xEA;")  # (src & msk) | mag
        lines.append(f"fma.rn.TY {dst}, {dst}, one, ${zc};")  # magic + q - (magic + zero) = q - zero, exact

    for i in range(4):  # word i of each row: K offsets 8i .. 8i + 7 of this thread's 32
        xw = 16 + 4 * i  # its activation pairs (x0, x1) (x2, x3) (x4, x5) (x6, x7): $xw .. $xw + 3
        for half in range(2):  # step 2i: nibble pairs 0 and 1, activations (x0, x4) (x1, x5); step 2i + 1: 2, 3
            pair("a0", 8 + i, 2 * half, 40)
            pair("a1", 12 + i, 2 * half, 44)
            pair("a2", 8 + i, 2 * half + 1, 40)
            pair("a3", 12 + i, 2 * half + 1, 44)
            lines.append(f"prmt.b32 b0, ${xw + half}, ${xw + half + 2}, 0x5410;")  # low halves
            lines.append(f"prmt.b32 b1, ${xw + half}, ${xw + half + 2}, 0x7632;")  # high halves
            lines.append("mma.sync.aligned.m16n8k16.row.col.f32.TY1.TY1.f32 {c0, c1, c2, c3}, {a0, a1, a2, a3}, "
                         "{b0, b1}, {c0, c1, c2, c3};")
    lines += ["fma.rn.f32 $0, c0, $32, $4;", "fma.rn.f32 $1, c1, $32, $5;",
              "fma.rn.f32 $2, c2, $36, $6;", "fma.rn.f32 $3, c3, $36, $7;", "}"]
    return "\n".join(lines)


_ASM = _asm()
ASM = {torch.bfloat16: _ASM.replace("MAGIC", "0x43004300").replace("ONE", "0x3F803F80").replace("TY1", "bf16")
       .replace("TY", "bf16x2"),
       torch.float16: _ASM.replace("MAGIC", "0x64006400").replace("ONE", "0x3C003C00").replace("TY1", "f16")
       .replace("TY", "f16x2")}


@lazy_helper
def _chunk(acc, wg, wg8, x0, x1, x2, x3, sg, sg8, zg, zg8, ASM_TEXT: tl.constexpr):
    return tl.inline_asm_elementwise(ASM_TEXT, "=f,=f,=f,=f,f,f,f,f,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,"
                                     "f,f,f,f,f,f,f,f,r,r,r,r,r,r,r,r",
                                     [acc, wg, wg8, x0, x1, x2, x3, sg, sg8, zg, zg8], dtype=tl.float32,
                                     is_pure=True, pack=4)


@lazy_helper
def _neg_zero(z, MAG: tl.constexpr, HALF_F16: tl.constexpr):
    """``-(magic + z)`` in the activations' 16-bit type, both halves of an int32 (z: fp32 zero points, [NT, 1])."""
    v = -(z + MAG)
    if HALF_F16:
        h = v.to(tl.float16).to(tl.int16, bitcast=True)
    else:
        h = v.to(tl.bfloat16).to(tl.int16, bitcast=True)
    u = h.to(tl.int32) & 0xFFFF
    return u | (u << 16)


@lazy_helper
def _mma_loads(k0, wg_ptrs, wg8_ptrs, s_g_ptrs, s_g8_ptrs, z_e, ch_g, ch_g8, zc_sym, stride_wsk, stride_wzn,
               stride_wzk, QBK: tl.constexpr, HAS_ZERO: tl.constexpr, MAG: tl.constexpr, HALF_F16: tl.constexpr,
               W_CG: tl.constexpr):
    """What the chunk at ``k0`` reads from HBM: both rows' words, their group scales and packed ``-(magic + zero)``
    (the activation pairs come from L1 and are loaded where they are used, so prefetching costs fewer registers)."""
    kw = k0 // 8
    if W_CG:
        wg = tl.load(wg_ptrs + kw, cache_modifier=".cg")
        wg8 = tl.load(wg8_ptrs + kw, cache_modifier=".cg")
    else:
        wg = tl.load(wg_ptrs + kw)
        wg8 = tl.load(wg8_ptrs + kw)
    grp = k0 // QBK
    sg = tl.load(s_g_ptrs + grp * stride_wsk).to(tl.float32)
    sg8 = tl.load(s_g8_ptrs + grp * stride_wsk).to(tl.float32)
    if HAS_ZERO:
        zg = _neg_zero(((tl.load(z_e + (ch_g // 2) * stride_wzn + grp * stride_wzk) >> ((ch_g % 2) * 4))
                        & 0xF).to(tl.float32), MAG, HALF_F16)
        zg8 = _neg_zero(((tl.load(z_e + (ch_g8 // 2) * stride_wzn + grp * stride_wzk) >> ((ch_g8 % 2) * 4))
                         & 0xF).to(tl.float32), MAG, HALF_F16)
    else:
        zg = zc_sym
        zg8 = zc_sym
    return wg, wg8, sg, sg8, zg, zg8


@lazy_jit
def _gemv_mma_kernel(
    x_ptr, w_ptr, b_ptr, tw_ptr, out_ptr, ids_ptr, ws_ptr, wz_ptr, cnt_ptr, acc_ptr, y_ptr,
    N, K, top_k, num_experts, k_split, zero_numel, cnt_numel, n_tiles_out, arrivals,
    stride_xm, stride_we, stride_wn, stride_be, stride_om,
    stride_wse, stride_wsn, stride_wsk, stride_wze, stride_wzn, stride_wzk,
    NW: tl.constexpr, QBK: tl.constexpr, HAS_ZERO: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr, ATOMIC: tl.constexpr,
    FUSE_EPI: tl.constexpr, ZBLOCK: tl.constexpr, UNROLL: tl.constexpr, PDL: tl.constexpr,
    ASM_TEXT: tl.constexpr, MAG: tl.constexpr, HALF_F16: tl.constexpr, LOOP_STAGES: tl.constexpr,
    AHEAD: tl.constexpr, X_LANES: tl.constexpr, X_AHEAD: tl.constexpr, W_CG: tl.constexpr,
):
    NT: tl.constexpr = 32 * NW
    BLOCK_N: tl.constexpr = 8 * NW if GATED else 16 * NW  # output channels per program
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if PDL == 1:
        gdc_launch_dependents()
    if FUSE_EPI and GATED:  # GEMM1 zeroes GEMM2's fp32 sums and arrival counters (as gemv.py's kernel)
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
    live = (expert >= 0) & (expert < num_experts)
    if FUSE_EPI and not GATED:  # a dropped pair reads nothing but still arrives at its token's tiles
        expert = tl.where(live, expert, 0)
    elif (expert < 0) | (expert >= num_experts):
        return
    if GATED:
        x_row = x_ptr + (pair // top_k).to(tl.int64) * stride_xm  # (int32 units: bf16 / fp16 pairs)
    else:
        x_row = x_ptr + pair.to(tl.int64) * stride_xm
    k_lo = tl.multiple_of(pid_s * k_split, CHUNK)
    k_hi = tl.minimum(K, k_lo + k_split)
    if FUSE_EPI and not GATED:
        k_hi = tl.where(live, k_hi, k_lo)

    t = tl.arange(0, NT)[:, None]  # thread t of the program holds row t of every [NT, 4] tensor
    j = tl.arange(0, 4)[None, :]
    warp = t // 32
    g = (t % 32) // 4  # the MMA's groupID: C rows g and g + 8
    c = t % 4  # threadID_in_group: K offsets 32c .. 32c + 31 of each chunk
    if GATED:
        n_g = pid_n * BLOCK_N + warp * 8 + g  # gate channel of row g; row g + 8 is the same channel's up row
        n_g8 = n_g
        ch_g = n_g % N
        ch_g8 = N + n_g % N
    else:
        n_g = pid_n * BLOCK_N + warp * 16 + g
        n_g8 = n_g + 8
        ch_g = n_g % N
        ch_g8 = n_g8 % N
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    wg_ptrs = w_e + ch_g * stride_wn + 4 * c + j  # int32 words, 16 bytes per thread and row
    wg8_ptrs = w_e + ch_g8 * stride_wn + 4 * c + j
    x_ptrs = x_row + 16 * c + j  # activation pairs 16c + 4q + j of the chunk, q = 0..3
    x_lane = (g == 0) & (j >= 0)
    ws_e = ws_ptr + expert.to(tl.int64) * stride_wse
    s_g_ptrs = ws_e + ch_g * stride_wsn
    s_g8_ptrs = ws_e + ch_g8 * stride_wsn
    z_e = wz_ptr + expert.to(tl.int64) * stride_wze
    zc_sym = _neg_zero(t * 0.0 + 8.0, MAG, HALF_F16)  # symmetric int4: zero 8
    if PDL == 2:
        gdc_wait()

    acc = tl.full((NT, 4), 0.0, tl.float32)
    # AHEAD > 0: the chunks AHEAD steps on are loaded into registers before this one is multiplied, so their latency
    # overlaps this step's MMAs (a load past the last chunk reads the last chunk again)
    k_last = tl.multiple_of(tl.maximum((k_hi - 1) // CHUNK * CHUNK, k_lo), CHUNK)
    if AHEAD >= 1:
        a_w, a_w8, a_s, a_s8, a_z, a_z8 = _mma_loads(k_lo, wg_ptrs, wg8_ptrs, s_g_ptrs, s_g8_ptrs, z_e, ch_g, ch_g8,
                                                     zc_sym, stride_wsk, stride_wzn, stride_wzk, QBK, HAS_ZERO, MAG,
                                                     HALF_F16, W_CG)
    if AHEAD >= 2:
        b_w, b_w8, b_s, b_s8, b_z, b_z8 = _mma_loads(tl.minimum(k_lo + CHUNK, k_last), wg_ptrs, wg8_ptrs, s_g_ptrs,
                                                     s_g8_ptrs, z_e, ch_g, ch_g8, zc_sym, stride_wsk, stride_wzn,
                                                     stride_wzk, QBK, HAS_ZERO, MAG, HALF_F16, W_CG)
    if X_AHEAD:
        p_x0 = tl.load(x_ptrs + k_lo // 2, mask=x_lane)
        p_x1 = tl.load(x_ptrs + k_lo // 2 + 4, mask=x_lane)
        p_x2 = tl.load(x_ptrs + k_lo // 2 + 8, mask=x_lane)
        p_x3 = tl.load(x_ptrs + k_lo // 2 + 12, mask=x_lane)
    for k0 in tl.range(k_lo, k_hi, CHUNK, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL):
        kn = k0 if AHEAD == 0 else tl.minimum(k0 + AHEAD * CHUNK, k_last)
        n_w, n_w8, n_s, n_s8, n_z, n_z8 = _mma_loads(kn, wg_ptrs, wg8_ptrs, s_g_ptrs, s_g8_ptrs, z_e, ch_g, ch_g8,
                                                     zc_sym, stride_wsk, stride_wzn, stride_wzk, QBK, HAS_ZERO, MAG,
                                                     HALF_F16, W_CG)
        kx = (k0 if X_AHEAD == 0 else tl.minimum(k0 + CHUNK, k_last)) // 2
        if X_LANES:  # only the 4 lanes of B's column 0 need the activations: the other columns may hold anything
            x0 = tl.load(x_ptrs + kx, mask=x_lane)
            x1 = tl.load(x_ptrs + kx + 4, mask=x_lane)
            x2 = tl.load(x_ptrs + kx + 8, mask=x_lane)
            x3 = tl.load(x_ptrs + kx + 12, mask=x_lane)
        else:
            x0 = tl.load(x_ptrs + kx)
            x1 = tl.load(x_ptrs + kx + 4)
            x2 = tl.load(x_ptrs + kx + 8)
            x3 = tl.load(x_ptrs + kx + 12)
        if X_AHEAD:  # this chunk's activations were loaded one step ago
            x0, x1, x2, x3, p_x0, p_x1, p_x2, p_x3 = p_x0, p_x1, p_x2, p_x3, x0, x1, x2, x3
        if AHEAD == 0:
            acc = _chunk(acc, n_w, n_w8, x0, x1, x2, x3, n_s, n_s8, n_z, n_z8, ASM_TEXT)
        elif AHEAD == 1:
            acc = _chunk(acc, a_w, a_w8, x0, x1, x2, x3, a_s, a_s8, a_z, a_z8, ASM_TEXT)
            a_w, a_w8, a_s, a_s8, a_z, a_z8 = n_w, n_w8, n_s, n_s8, n_z, n_z8
        else:
            acc = _chunk(acc, a_w, a_w8, x0, x1, x2, x3, a_s, a_s8, a_z, a_z8, ASM_TEXT)
            a_w, a_w8, a_s, a_s8, a_z, a_z8 = b_w, b_w8, b_s, b_s8, b_z, b_z8
            b_w, b_w8, b_s, b_s8, b_z, b_z8 = n_w, n_w8, n_s, n_s8, n_z, n_z8

    # every column of C holds the result: row g's is element 0 (c0), row g + 8's element 2 (c2)
    r_g = tl.sum(tl.where(j == 0, acc, 0.0), 1)
    r_g8 = tl.sum(tl.where(j == 2, acc, 0.0), 1)
    t1 = tl.arange(0, NT)
    warp1 = t1 // 32
    g1 = (t1 % 32) // 4
    first = (t1 % 4) == 0  # one thread of each group of four writes
    if GATED:
        n1 = pid_n * BLOCK_N + warp1 * 8 + g1
        if HAS_BIAS:
            b_e = b_ptr + expert.to(tl.int64) * stride_be
            r_g += tl.load(b_e + n1 % N).to(tl.float32)
            r_g8 += tl.load(b_e + N + n1 % N).to(tl.float32)
        h = _activate(r_g, r_g8, ACT, ALPHA, LIMIT)
        tl.store(out_ptr + pair.to(tl.int64) * stride_om + n1, h.to(out_ptr.dtype.element_ty), mask=first & (n1 < N))
    else:
        n1 = pid_n * BLOCK_N + warp1 * 16 + g1
        n18 = n1 + 8
        if HAS_BIAS:
            b_e = b_ptr + expert.to(tl.int64) * stride_be
            r_g += tl.where(pid_s == 0, tl.load(b_e + n1 % N).to(tl.float32), 0.0)
            r_g8 += tl.where(pid_s == 0, tl.load(b_e + n18 % N).to(tl.float32), 0.0)
        tw = tl.load(tw_ptr + pair)
        r_g = tl.where(live, r_g * tw, 0.0)
        r_g8 = tl.where(live, r_g8 * tw, 0.0)
        if ATOMIC:
            token = (pair // top_k).to(tl.int64)
            o_row = out_ptr + token * stride_om
            tl.atomic_add(o_row + n1, r_g, mask=first & (n1 < N), sem="relaxed")
            tl.atomic_add(o_row + n18, r_g8, mask=first & (n18 < N), sem="relaxed")
            if FUSE_EPI:  # the last of the token's k x SPLIT_K programs for this tile writes y = sum, cast
                tl.debug_barrier()
                cnt = tl.atomic_add(cnt_ptr + token * n_tiles_out + pid_n, 1, sem="acq_rel")
                if cnt == arrivals - 1:
                    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                    v = tl.load(o_row + offs, mask=offs < N, other=0.0, cache_modifier=".cg")
                    tl.store(y_ptr + token * stride_om + offs, v.to(y_ptr.dtype.element_ty), mask=offs < N)
        else:
            o_row = out_ptr + pair.to(tl.int64) * stride_om
            tl.store(o_row + n1, r_g.to(out_ptr.dtype.element_ty), mask=first & (n1 < N))
            tl.store(o_row + n18, r_g8.to(out_ptr.dtype.element_ty), mask=first & (n18 < N))


def mma_supported(x: torch.Tensor, w: torch.Tensor, group: int, cfg: dict[str, Any], gated: bool,
                  x_parts: int) -> str | None:
    """Why this launch cannot take the tensor-core read (None: it can). gemv() then reads with "subnormal"."""
    if interpreting() or x.device.type != "cuda":
        return "inline PTX runs compiled on a GPU only"
    if x.dtype not in MAGIC:
        return f"activations {x.dtype} (bf16 / fp16 only)"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "mma.sync with bf16 needs sm_80+"
    K = w.shape[2] * 2
    if K % CHUNK_K or (group % CHUNK_K if group > 0 else False):
        return f"K = {K} and the scale group {group} must be multiples of {CHUNK_K}"
    if x_parts or (gated and int(cfg.get("SPLIT_K", 1)) > 1):
        return "GEMM1 split over K (GEMM2 activating partial sums)"
    bn = cfg["BLOCK_N"]
    if bn % (8 if gated else 16) or bn // (8 if gated else 16) not in (1, 2, 4, 8):
        return f"BLOCK_N = {bn}: 8 channels per warp in GEMM1, 16 in GEMM2, 1-8 warps"
    if not w.is_contiguous() or w.data_ptr() % 16 or x.stride(1) != 1 or x.data_ptr() % 16 or x.stride(0) % 8:
        return "contiguous, 16-byte aligned weights and activation rows"
    return None


def gemv_mma(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, ids_flat: torch.Tensor,
             top_k: int, cfg: dict[str, Any], *, gated: bool, activation_code: int, alpha: float, limit: float,
             tw: torch.Tensor | None, atomic: bool, group: int, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
             epilogue: tuple | None, pdl: int) -> Any:
    """One GEMM of the int4 decode on the tensor cores (arguments as gemv.gemv; ``mma_supported`` said yes)."""
    P = ids_flat.numel()
    N = w.shape[1] // 2 if gated else w.shape[1]
    K = x.shape[1]
    nw = cfg["BLOCK_N"] // (8 if gated else 16)
    split = max(1, int(cfg.get("SPLIT_K", 1))) if (not gated and atomic) else 1
    k_split = triton.cdiv(triton.cdiv(K, split), CHUNK_K) * CHUNK_K
    split = triton.cdiv(K, k_split)
    grid = (P, triton.cdiv(N, cfg["BLOCK_N"]), split)
    fuse = epilogue is not None
    wi = w.view(torch.int32)
    xi = x.view(torch.int32)
    sums, counters, y = epilogue if fuse else (wi, wi, wi)
    wzs = list(w_zero.stride()) if w_zero is not None else [0, 0, 0]
    mag, _ = MAGIC[x.dtype]
    extra = {"launch_pdl": True} if pdl == 2 else {}
    return _gemv_mma_kernel[grid](
        xi, wi, bias if bias is not None else wi, tw if tw is not None else wi, out, ids_flat, w_scale,
        w_zero if w_zero is not None else wi, counters, sums, y,
        N, K, top_k, w.shape[0], k_split, sums.numel() if fuse else 0, counters.numel() if fuse else 0, grid[1],
        top_k * split,
        xi.stride(0), wi.stride(0), wi.stride(1), bias.stride(0) if bias is not None else 0, out.stride(0),
        w_scale.stride(0), w_scale.stride(1), w_scale.stride(2), wzs[0], wzs[1], wzs[2],
        NW=nw, QBK=group if group > 0 else K, HAS_ZERO=w_zero is not None, GATED=gated, ACT=activation_code,
        HAS_BIAS=bias is not None, ALPHA=alpha, LIMIT=limit, ATOMIC=atomic, FUSE_EPI=fuse, ZBLOCK=256,
        UNROLL=int(cfg.get("unroll", 1)), PDL=pdl, ASM_TEXT=ASM[x.dtype], MAG=float(MAGIC[x.dtype][1]),
        HALF_F16=x.dtype == torch.float16, LOOP_STAGES=cfg.get("loop_stages"), AHEAD=int(cfg.get("prefetch", 0)),
        X_LANES=MMA_X_LANES, X_AHEAD=MMA_X_AHEAD, W_CG=MMA_W_CG,
        num_warps=nw,
        num_stages=cfg.get("num_stages", 2), **extra,
    )
