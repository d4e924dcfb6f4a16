"""One-launch decode (``"launches": 1`` in a ``"decode": "gemv"`` tile config): GEMM1, GEMM2 and the top-k sum of
a small batch in a single kernel.

At T = 1 the two GEMV launches leave the GPU idle between them (the second kernel starts only when the last
program of the first has finished, then ramps up). Here one persistent grid works through a list of items: GEMM1
tiles first (``_gemv_acc`` + bias + activation, stored to the intermediate, then a release-add to their pair's
flag), then GEMM2 tiles, which wait (acquire) until their pair's flag counts every GEMM1 tile of that pair. Every
program takes its items in increasing order, so it finishes all its GEMM1 items before it waits for anything; the
grid is no larger than what runs on the GPU at once (``resident_programs``), so every GEMM1 item belongs to a
running program that never waits, and no wait can deadlock.

GEMM2 stores each item's fp32 partial ``[BLOCK_N]`` (routing weight applied) to its own row of a
``[P * SPLIT_K, H]`` buffer; the last item to arrive at a (token, tile) sums that token's ``top_k * SPLIT_K``
partials in a fixed order and writes ``y`` in the model dtype, so the result is deterministic and no memset is
needed. The int32 sync words (one flag per pair, one arrival counter per (token, tile), one count of finished tiles
per token) are reset by the last item that reads them, so they are zero again when the kernel ends: they live in a
zeroed buffer kept per (device, stream) (``_sync_words``) and must not be shared by two launches running at once.

Measured against two launches: docs/performance.md (fifth session).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._jit import interpreting, lazy_jit
from .gemm import _activate, amax_block
from .gemv import _gemv_acc, gemv_plan
from .quant import _RNE_MAGIC, AMAX_EPS, FP8_MAX, INT8_MAX


@lazy_jit
def _decode_kernel(
    x_ptr, w1_ptr, w2_ptr, b1_ptr, b2_ptr, tw_ptr, ids_ptr, inter_ptr, part_ptr, y_ptr, sync_ptr,
    as1_ptr, ws1_ptr, wz1_ptr, as2_ptr, ws2_ptr, wz2_ptr,
    P, H, I, top_k, n1, n_items, n_tiles1, n_tiles2, split, k_split,
    stride_xm, stride_w1e, stride_w1n, stride_w2e, stride_w2n, stride_b1e, stride_b2e, stride_ym,
    s1_e, s1_n, s1_k, z1_e, z1_n, z1_k, s2_e, s2_n, s2_k, z2_e, z2_n, z2_k,
    BN1: tl.constexpr, BK1: tl.constexpr, NG1: tl.constexpr, MODE1: tl.constexpr, MMA1: tl.constexpr,
    UNROLL1: tl.constexpr, STAGES1: tl.constexpr, AQ1: tl.constexpr, AMAX1: tl.constexpr, QBK1: tl.constexpr,
    BN2: tl.constexpr, BK2: tl.constexpr, NG2: tl.constexpr, MODE2: tl.constexpr, MMA2: tl.constexpr,
    UNROLL2: tl.constexpr, STAGES2: tl.constexpr, AQ2: tl.constexpr, AMAX2: tl.constexpr, QBK2: tl.constexpr,
    ACC_INT: tl.constexpr, PRECISION: tl.constexpr, WQ: tl.constexpr, WS: tl.constexpr, HAS_ZERO: tl.constexpr,
    QMAX: tl.constexpr, AQ_INT8: tl.constexpr, EPS: tl.constexpr, RNE: tl.constexpr,
    ACT: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
    KSP: tl.constexpr, RCH: tl.constexpr, STRIDE: tl.constexpr, POLL_SEM: tl.constexpr,
):
    # sync words (STRIDE apart, one 128-byte line each): per pair the GEMM1 tiles done, per token the GEMM2 tiles
    # summed; then one arrival counter per (token, GEMM2 tile)
    flags = sync_ptr
    tok_done = sync_ptr + P * STRIDE
    counters = tok_done + (P // top_k) * STRIDE
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):  # GEMM1 items first in every program
        if item < n1:  # GEMM1: channels [n0, n0 + BN1) of one pair, gate and up rows interleaved
            pair = item // n_tiles1
            pid_n = item % n_tiles1
            expert = tl.load(ids_ptr + pair)
            if expert >= 0:  # (a dropped pair's GEMM2 tiles do not wait for it)
                r = tl.arange(0, 2 * BN1)
                n = pid_n * BN1 + r // 2
                ch = (n % I) + (r % 2) * I
                x_row = x_ptr + (pair // top_k).to(tl.int64) * stride_xm
                acc = _gemv_acc(
                    x_row, w1_ptr, as1_ptr, ws1_ptr, wz1_ptr, expert, ch, 0, H, H,
                    stride_w1e, stride_w1n, s1_e, s1_n, s1_k, z1_e, z1_n, z1_k,
                    BK1, NG1, 2 * BN1, BK1 // NG1, MODE1, MMA1, ACC_INT, PRECISION, WQ, WS, QBK1, HAS_ZERO,
                    AQ1, QMAX, AQ_INT8, EPS, RNE, AMAX1, UNROLL1, STAGES1,
                )
                if HAS_B1:
                    acc += tl.load(b1_ptr + expert.to(tl.int64) * stride_b1e + ch).to(tl.float32)
                g, u = tl.split(tl.reshape(acc, (BN1, 2)))
                h = _activate(g, u, ACT, ALPHA, LIMIT)
                offs = pid_n * BN1 + tl.arange(0, BN1)
                tl.store(inter_ptr + pair.to(tl.int64) * I + offs, h.to(inter_ptr.dtype.element_ty), mask=offs < I)
                tl.debug_barrier()  # every thread's stores before the release
                tl.atomic_add(flags + pair * STRIDE, 1, sem="release")
        else:  # GEMM2: rows [n0, n0 + BN2) of w2 over one K split of one pair, times its routing weight
            v = item - n1
            pair = v // (n_tiles2 * split)
            pid_n = (v // split) % n_tiles2
            pid_s = v % split
            n = pid_n * BN2 + tl.arange(0, BN2)
            expert = tl.load(ids_ptr + pair)
            acc = tl.full((BN2,), 0.0, tl.float32)
            if expert >= 0:
                # poll relaxed (an acquire at GPU scope invalidates the SM's L1, where the GEMM1 programs beside this
                # one keep the activation row), then acquire once
                c = tl.atomic_add(flags + pair * STRIDE, 0, sem=POLL_SEM)
                while c < n_tiles1:
                    c = tl.atomic_add(flags + pair * STRIDE, 0, sem=POLL_SEM)
                c = tl.atomic_add(flags + pair * STRIDE, 0, sem="acquire")
                tl.debug_barrier()
                k_lo = pid_s * k_split
                acc = _gemv_acc(
                    inter_ptr + pair.to(tl.int64) * I, w2_ptr, as2_ptr, ws2_ptr, wz2_ptr, expert, n % H,
                    k_lo, tl.minimum(I, k_lo + k_split), I,
                    stride_w2e, stride_w2n, s2_e, s2_n, s2_k, z2_e, z2_n, z2_k,
                    BK2, NG2, BN2, BK2 // NG2, MODE2, MMA2, ACC_INT, PRECISION, WQ, WS, QBK2, HAS_ZERO,
                    AQ2, QMAX, AQ_INT8, EPS, RNE, AMAX2, UNROLL2, STAGES2,
                )
                if HAS_B2:  # once, by the first K split
                    acc += tl.where(pid_s == 0,
                                    tl.load(b2_ptr + expert.to(tl.int64) * stride_b2e + n % H).to(tl.float32), 0.0)
                acc = acc * tl.load(tw_ptr + pair)
            tl.store(part_ptr + (pair * split + pid_s).to(tl.int64) * H + n, acc, mask=n < H)
            tl.debug_barrier()
            token = pair // top_k
            cnt = counters + token * n_tiles2 + pid_n
            arrived = tl.atomic_add(cnt, 1, sem="acq_rel")
            if arrived == top_k * split - 1:  # the last of the token's partials for this tile: sum them in order
                # (RCH rows per load, the loads of the unrolled loop in flight together: a loop of one-row loads
                # waits one L2 round trip per partial)
                s = tl.full((BN2,), 0.0, tl.float32)
                rows = part_ptr + (token * top_k * split).to(tl.int64) * H
                for j0 in tl.static_range(0, KSP, RCH):
                    j = j0 + tl.arange(0, RCH)
                    pv = tl.load(rows + j[:, None].to(tl.int64) * H + n[None, :],
                                 mask=(j < top_k * split)[:, None] & (n < H)[None, :], other=0.0,
                                 cache_modifier=".cg")
                    s += tl.reduce(pv, 0, tl.standard._sum_combine)
                tl.store(y_ptr + token.to(tl.int64) * stride_ym + n, s.to(y_ptr.dtype.element_ty), mask=n < H)
                tl.store(cnt, 0)
                d = tl.atomic_add(tok_done + token * STRIDE, 1, sem="acq_rel")
                if d == n_tiles2 - 1:  # the token's last tile: its pairs' flags are read by no one any more
                    for slot in range(0, top_k):
                        tl.store(flags + (token * top_k + slot) * STRIDE, 0)
                    tl.store(tok_done + token * STRIDE, 0)


POLL_SEM = "relaxed"
STRIDE = 32  # int32 words between two flags: one 128-byte line each (one L2 sector polled by many programs)

_SYNC: dict[tuple, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown sync buffers: a CUDA graph captured with one still points at it


def _sync_words(device: torch.device, numel: int) -> torch.Tensor:
    """The zeroed int32 sync words of ``device``'s current stream (the kernel leaves them zero)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _SYNC.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _RETIRED.append(buf)
        buf = _SYNC[key] = torch.zeros(max(numel, 1024), dtype=torch.int32, device=device)
    return buf


_RESIDENT: dict[tuple, int] = {}


def resident_programs(device: torch.device, args: tuple, meta: dict[str, Any]) -> int:
    """How many programs of this kernel specialization run on the GPU at once (registers, shared memory, warps and
    blocks per SM, times the SMs): the one-launch grid, so that every program is running while others wait on it.
    The interpreter runs programs one by one in order, which is safe for any count."""
    if interpreting() or device.type != "cuda":
        return 1 << 30
    key = (device.index, tuple(sorted((k, str(v)) for k, v in meta.items())),
           tuple(str(a.dtype) if isinstance(a, torch.Tensor) else "" for a in args))
    n = _RESIDENT.get(key)
    if n is None:
        kernel = _decode_kernel.jitted().warmup(*args, grid=(1,), **meta)
        kernel._init_handles()
        props = torch.cuda.get_device_properties(device)
        warps = meta["num_warps"]
        regs_per_warp = -(-max(kernel.n_regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
        by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps)
        by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
        smem = kernel.metadata.shared
        by_smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024) // smem if smem else 32
        n = _RESIDENT[key] = max(1, min(by_regs, by_threads, by_smem, 32)) * props.multi_processor_count
    return n


def decode_one_launch(x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, top_k: int, w13: torch.Tensor,
                      w2: torch.Tensor, b13: torch.Tensor | None, b2: torch.Tensor | None, cfg1: dict[str, Any],
                      cfg2: dict[str, Any], *, activation_code: int, wq: int = 0, ws: int = 1,
                      groups: tuple[int, int] = (1, 1), scales: tuple = (None, None),
                      act_scales: tuple = (None, None), zeros: tuple = (None, None), aq: tuple[int, int] = (0, 0),
                      acc_int8: bool = False, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """``y [T, H]``: both GEMMs and the top-k sum of the GEMV decode in one kernel (module docstring). ``ids`` and
    ``tw`` are the flat ``[T * top_k]`` expert ids (int32, -1 = dropped) and fp32 routing weights; the tiles and
    the quantization arguments are those of the two-launch ``gemv`` calls."""
    T, H = x.shape
    I = w13.shape[1] // 2  # (w2's last dim is packed for int4)
    P = ids.numel()
    if w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("the GEMV decode path reads weight rows contiguous along K")
    w1v, bk1, ng1, mode1, mma1, _, _ = gemv_plan(H, w13, cfg1, wq, groups[0], True, True)
    w2v, bk2, ng2, mode2, mma2, split, k_split = gemv_plan(I, w2, cfg2, wq, groups[1], False, True)
    bn1, bn2 = cfg1["BLOCK_N"], cfg2["BLOCK_N"]
    n_tiles1, n_tiles2 = triton.cdiv(I, bn1), triton.cdiv(H, bn2)
    n1 = P * n_tiles1
    inter = torch.empty(P, I, dtype=x.dtype, device=x.device)
    part = torch.empty(P * split, H, dtype=torch.float32, device=x.device)
    y = torch.empty_like(x)
    sync = _sync_words(x.device, (P + T) * STRIDE + T * n_tiles2)
    if b13 is not None and b13.stride(1) != 1:
        b13 = b13.contiguous()
    if b2 is not None and b2.stride(1) != 1:
        b2 = b2.contiguous()

    def strides(t: torch.Tensor | None) -> list[int]:
        return list(t.stride()) + [0] * 3 if t is not None else [0, 0, 0]

    s1, z1, s2, z2 = strides(scales[0]), strides(zeros[0]), strides(scales[1]), strides(zeros[1])
    fb = w1v

    def opt(t: torch.Tensor | None) -> torch.Tensor:
        return t if t is not None else fb

    ksp = triton.next_power_of_2(top_k * split)  # partial rows per (token, tile), padded
    n_items = n1 + P * n_tiles2 * split
    args = (
        x, w1v, w2v, opt(b13), opt(b2), tw, ids, inter, part, y, sync,
        opt(act_scales[0]), opt(scales[0]), opt(zeros[0]), opt(act_scales[1]), opt(scales[1]), opt(zeros[1]),
        P, H, I, top_k, n1, n_items, n_tiles1, n_tiles2, split, k_split,
        x.stride(0), w1v.stride(0), w1v.stride(1), w2v.stride(0), w2v.stride(1),
        b13.stride(0) if b13 is not None else 0, b2.stride(0) if b2 is not None else 0, y.stride(0),
        s1[0], s1[1], s1[2], z1[0], z1[1], z1[2], s2[0], s2[1], s2[2], z2[0], z2[1], z2[2],
    )
    meta = dict(
        BN1=bn1, BK1=bk1, NG1=ng1, MODE1=mode1, MMA1=mma1, UNROLL1=int(cfg1.get("unroll", 1)),
        STAGES1=cfg1.get("loop_stages"), AQ1=aq[0], AMAX1=amax_block(H), QBK1=groups[0],
        BN2=bn2, BK2=bk2, NG2=ng2, MODE2=mode2, MMA2=mma2, UNROLL2=int(cfg2.get("unroll", 1)),
        STAGES2=cfg2.get("loop_stages"), AQ2=aq[1], AMAX2=amax_block(I), QBK2=groups[1],
        ACC_INT=(mma1 or mma2) and wq == 3 and acc_int8, PRECISION="ieee" if x.dtype == torch.float32 else None,
        WQ=wq, WS=ws, HAS_ZERO=zeros[0] is not None, QMAX=INT8_MAX if acc_int8 else FP8_MAX, AQ_INT8=acc_int8,
        EPS=AMAX_EPS, RNE=_RNE_MAGIC, ACT=activation_code, HAS_B1=b13 is not None, HAS_B2=b2 is not None,
        ALPHA=alpha, LIMIT=limit, KSP=ksp, RCH=min(ksp, 16), STRIDE=STRIDE, POLL_SEM=POLL_SEM,
        num_warps=cfg1.get("num_warps", 4), num_stages=cfg1.get("num_stages", 2),
    )
    _decode_kernel[(min(n_items, resident_programs(x.device, args, meta)),)](*args, **meta)
    return y
