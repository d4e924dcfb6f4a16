"""One-launch decode (``"one_launch": true`` in a decode-GEMV tile config): GEMM1's and GEMM2's GEMVs in one grid.

At T = 1 a small expert (qwen3_30b_a3b: 19 MB of int4 weights for the 8 active experts) is read in a few µs, and
two launches cost about as much again: each ramps up and drains on its own, and GEMM2 cannot start reading before
GEMM1 has finished. Here one launch runs GEMM1's programs first and GEMM2's after them; a GEMM2 program prefetches
its weight slice into L2, then waits only for the GEMM1 programs of its own (token, expert) pair (``_wait_ready``
in gemv.py), so GEMM2's reads overlap GEMM1's work and the call ramps up once.

The launch keeps its state in a small zeroed workspace that every call leaves zeroed again: the ticket counter,
one done-counter per pair, and the top-k epilogue's fp32 sums and arrival counters (the last arrival at a tile
writes the output and zeroes its sums). A workspace belongs to a (device, stream, shape); calls on one stream run
in order, so they never share one at the same time. It is allocated once and kept (a CUDA graph that captured a
call keeps using its address).
"""
from __future__ import annotations

import torch
import triton.language as tl

from ._jit import lazy_jit
from .gemv import _gemv_body  # noqa: F401  (a device helper the kernel calls; bound per mode by lazy_jit)

# take each program's role from a ticket counter (True), or from its program id (False: relies on the hardware
# starting programs in id order, which CUDA does not promise; for A/B runs)
ONE_LAUNCH_TICKET = True

_WORKSPACES: dict[tuple, torch.Tensor] = {}


def workspace(device: torch.device, P: int, T: int, H: int, n_counters: int) -> tuple[torch.Tensor, ...]:
    """(ticket [1], done-counters [P], epilogue counters [n_counters], epilogue sums fp32 [T, H]) for one launch on
    the current stream, zeroed (each call leaves it zeroed)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, P, T, H, n_counters)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = torch.zeros(1 + P + n_counters + T * H, dtype=torch.int32, device=device)
    o = 1 + P + n_counters
    return ws[:1], ws[1:1 + P], ws[1 + P:o], ws[o:].view(torch.float32).view(T, H)


def launch(first: tuple, second: tuple, ticket: torch.Tensor, done: torch.Tensor, P: int) -> None:
    """One launch of GEMM1's programs (``first``) and GEMM2's (``second``), each ``gemv_args``' (grid, runtime
    arguments, constexprs, launch options) of its GEMM, built with ``one`` = 1 and 2."""
    (g1, a1, m1, o1), (g2, a2, m2, o2) = first, second
    if o1["num_warps"] != o2["num_warps"]:
        raise ValueError(f"one_launch runs both GEMMs' programs in one launch: gemm1.num_warps ({o1['num_warps']}) "
                         f"and gemm2.num_warps ({o2['num_warps']}) must be equal")
    n1, n2 = g1[0] * g1[1] * g1[2], g2[0] * g2[1] * g2[2]
    meta = {f"A_{k}": v for k, v in m1.items()}
    meta.update({f"B_{k}": v for k, v in m2.items()})
    _one_launch_kernel[(n1 + n2,)](
        ticket, done, n1, n1 + n2, P, g1[1], g2[1], *a1, *a2, **meta, TICKET=ONE_LAUNCH_TICKET,
        num_warps=o1["num_warps"], num_stages=max(o1["num_stages"], o2["num_stages"]))


@lazy_jit
def _one_launch_kernel(
    ticket_ptr, rdy_ptr, n_first, n_all, P, tiles1, tiles2,
    a_x_ptr, a_w_ptr, a_b_ptr, a_tw_ptr, a_out_ptr, a_ids_ptr, a_as_ptr, a_ws_ptr, a_wz_ptr, a_cnt_ptr, a_acc_ptr,
    a_y_ptr, a_N, a_K, a_top_k, a_num_experts, a_k_split, a_zero_numel, a_cnt_numel, a_n_tiles_out, a_arrivals,
    a_stride_xm, a_stride_we, a_stride_wn, a_stride_be, a_stride_om, a_stride_wse, a_stride_wsn, a_stride_wsk,
    a_stride_wze, a_stride_wzn, a_stride_wzk, a_stride_xp,
    b_x_ptr, b_w_ptr, b_b_ptr, b_tw_ptr, b_out_ptr, b_ids_ptr, b_as_ptr, b_ws_ptr, b_wz_ptr, b_cnt_ptr, b_acc_ptr,
    b_y_ptr, b_N, b_K, b_top_k, b_num_experts, b_k_split, b_zero_numel, b_cnt_numel, b_n_tiles_out, b_arrivals,
    b_stride_xm, b_stride_we, b_stride_wn, b_stride_be, b_stride_om, b_stride_wse, b_stride_wsn, b_stride_wsk,
    b_stride_wze, b_stride_wzn, b_stride_wzk, b_stride_xp,
    A_BLOCK_N: tl.constexpr, A_BLOCK_K: tl.constexpr, A_NG: tl.constexpr, A_ROWS: tl.constexpr, A_GK: tl.constexpr,
    A_INT4_MODE: tl.constexpr, A_MMA: tl.constexpr, A_ACC_INT: tl.constexpr, A_PRECISION: tl.constexpr,
    A_GATED: tl.constexpr, A_X_PER_TOKEN: tl.constexpr, A_ACT: tl.constexpr, A_HAS_BIAS: tl.constexpr,
    A_ALPHA: tl.constexpr, A_LIMIT: tl.constexpr, A_ATOMIC: tl.constexpr, A_WQ: tl.constexpr, A_WS: tl.constexpr,
    A_QBK: tl.constexpr, A_HAS_ZERO: tl.constexpr, A_AQ: tl.constexpr, A_QMAX: tl.constexpr,
    A_AQ_INT8: tl.constexpr, A_EPS: tl.constexpr, A_RNE: tl.constexpr, A_AMAX_BLOCK: tl.constexpr,
    A_UNROLL: tl.constexpr, A_LOOP_STAGES: tl.constexpr, A_EVEN_K: tl.constexpr, A_FUSE_EPI: tl.constexpr,
    A_ZBLOCK: tl.constexpr, A_SUB_X: tl.constexpr, A_X_VEC: tl.constexpr, A_X_PARTS: tl.constexpr,
    A_RND: tl.constexpr, A_PARTS_OUT: tl.constexpr, A_X_PAIRS: tl.constexpr, A_ONCE: tl.constexpr,
    A_SCALES_T: tl.constexpr, A_PDL: tl.constexpr, A_PF_N: tl.constexpr, A_PF_STEP: tl.constexpr,
    A_EPW: tl.constexpr, A_AHEAD: tl.constexpr,
    B_BLOCK_N: tl.constexpr, B_BLOCK_K: tl.constexpr, B_NG: tl.constexpr, B_ROWS: tl.constexpr, B_GK: tl.constexpr,
    B_INT4_MODE: tl.constexpr, B_MMA: tl.constexpr, B_ACC_INT: tl.constexpr, B_PRECISION: tl.constexpr,
    B_GATED: tl.constexpr, B_X_PER_TOKEN: tl.constexpr, B_ACT: tl.constexpr, B_HAS_BIAS: tl.constexpr,
    B_ALPHA: tl.constexpr, B_LIMIT: tl.constexpr, B_ATOMIC: tl.constexpr, B_WQ: tl.constexpr, B_WS: tl.constexpr,
    B_QBK: tl.constexpr, B_HAS_ZERO: tl.constexpr, B_AQ: tl.constexpr, B_QMAX: tl.constexpr,
    B_AQ_INT8: tl.constexpr, B_EPS: tl.constexpr, B_RNE: tl.constexpr, B_AMAX_BLOCK: tl.constexpr,
    B_UNROLL: tl.constexpr, B_LOOP_STAGES: tl.constexpr, B_EVEN_K: tl.constexpr, B_FUSE_EPI: tl.constexpr,
    B_ZBLOCK: tl.constexpr, B_SUB_X: tl.constexpr, B_X_VEC: tl.constexpr, B_X_PARTS: tl.constexpr,
    B_RND: tl.constexpr, B_PARTS_OUT: tl.constexpr, B_X_PAIRS: tl.constexpr, B_ONCE: tl.constexpr,
    B_SCALES_T: tl.constexpr, B_PDL: tl.constexpr, B_PF_N: tl.constexpr, B_PF_STEP: tl.constexpr,
    B_EPW: tl.constexpr, B_AHEAD: tl.constexpr,
    TICKET: tl.constexpr,
):
    """GEMM1's and GEMM2's GEMV programs in one grid: the first ``n_first`` tickets run GEMM1's (pair, N tile, K
    split) programs, the rest GEMM2's, which wait for their pair's GEMM1 programs (``_gemv_body``, ONE). A ticket is
    taken from a counter when the program starts (TICKET), so every GEMM1 program a GEMM2 program waits for has
    started: the waits end whatever order the hardware starts programs in. The last ticket resets the counter."""
    if TICKET:
        t = tl.atomic_add(ticket_ptr, 1, sem="relaxed")
        if t == n_all - 1:
            tl.atomic_xchg(ticket_ptr, 0, sem="relaxed")
    else:
        t = tl.program_id(0)
    if t < n_first:  # GEMM1: pair fastest, as the two-launch grid (P, tiles, splits) orders its programs
        pair = t % P
        pid_n = (t // P) % tiles1
        pid_s = t // P // tiles1
        _gemv_body(
            pair, pid_n, pid_s, a_x_ptr, a_w_ptr, a_b_ptr, a_tw_ptr, a_out_ptr, a_ids_ptr, a_as_ptr, a_ws_ptr,
            a_wz_ptr, a_cnt_ptr, a_acc_ptr, a_y_ptr, a_N, a_K, a_top_k, a_num_experts, a_k_split, a_zero_numel,
            a_cnt_numel, a_n_tiles_out, a_arrivals, a_stride_xm, a_stride_we, a_stride_wn, a_stride_be, a_stride_om,
            a_stride_wse, a_stride_wsn, a_stride_wsk, a_stride_wze, a_stride_wzn, a_stride_wzk, a_stride_xp,
            BLOCK_N=A_BLOCK_N, BLOCK_K=A_BLOCK_K, NG=A_NG, ROWS=A_ROWS, GK=A_GK, INT4_MODE=A_INT4_MODE, MMA=A_MMA,
            ACC_INT=A_ACC_INT, PRECISION=A_PRECISION, GATED=A_GATED, X_PER_TOKEN=A_X_PER_TOKEN, ACT=A_ACT,
            HAS_BIAS=A_HAS_BIAS, ALPHA=A_ALPHA, LIMIT=A_LIMIT, ATOMIC=A_ATOMIC, WQ=A_WQ, WS=A_WS, QBK=A_QBK,
            HAS_ZERO=A_HAS_ZERO, AQ=A_AQ, QMAX=A_QMAX, AQ_INT8=A_AQ_INT8, EPS=A_EPS, RNE=A_RNE,
            AMAX_BLOCK=A_AMAX_BLOCK, UNROLL=A_UNROLL, LOOP_STAGES=A_LOOP_STAGES, EVEN_K=A_EVEN_K,
            FUSE_EPI=A_FUSE_EPI, ZBLOCK=A_ZBLOCK, SUB_X=A_SUB_X, X_VEC=A_X_VEC, X_PARTS=A_X_PARTS, RND=A_RND,
            PARTS_OUT=A_PARTS_OUT, X_PAIRS=A_X_PAIRS, ONCE=A_ONCE, SCALES_T=A_SCALES_T, PDL=A_PDL, PF_N=A_PF_N,
            PF_STEP=A_PF_STEP, EPW=A_EPW, AHEAD=A_AHEAD, rdy_ptr=rdy_ptr, rdy_need=0, rdy_users=0, ONE=1,
        )
    else:
        u = t - n_first
        pair = u % P
        pid_n = (u // P) % tiles2
        pid_s = u // P // tiles2
        _gemv_body(
            pair, pid_n, pid_s, b_x_ptr, b_w_ptr, b_b_ptr, b_tw_ptr, b_out_ptr, b_ids_ptr, b_as_ptr, b_ws_ptr,
            b_wz_ptr, b_cnt_ptr, b_acc_ptr, b_y_ptr, b_N, b_K, b_top_k, b_num_experts, b_k_split, b_zero_numel,
            b_cnt_numel, b_n_tiles_out, b_arrivals, b_stride_xm, b_stride_we, b_stride_wn, b_stride_be, b_stride_om,
            b_stride_wse, b_stride_wsn, b_stride_wsk, b_stride_wze, b_stride_wzn, b_stride_wzk, b_stride_xp,
            BLOCK_N=B_BLOCK_N, BLOCK_K=B_BLOCK_K, NG=B_NG, ROWS=B_ROWS, GK=B_GK, INT4_MODE=B_INT4_MODE, MMA=B_MMA,
            ACC_INT=B_ACC_INT, PRECISION=B_PRECISION, GATED=B_GATED, X_PER_TOKEN=B_X_PER_TOKEN, ACT=B_ACT,
            HAS_BIAS=B_HAS_BIAS, ALPHA=B_ALPHA, LIMIT=B_LIMIT, ATOMIC=B_ATOMIC, WQ=B_WQ, WS=B_WS, QBK=B_QBK,
            HAS_ZERO=B_HAS_ZERO, AQ=B_AQ, QMAX=B_QMAX, AQ_INT8=B_AQ_INT8, EPS=B_EPS, RNE=B_RNE,
            AMAX_BLOCK=B_AMAX_BLOCK, UNROLL=B_UNROLL, LOOP_STAGES=B_LOOP_STAGES, EVEN_K=B_EVEN_K,
            FUSE_EPI=B_FUSE_EPI, ZBLOCK=B_ZBLOCK, SUB_X=B_SUB_X, X_VEC=B_X_VEC, X_PARTS=B_X_PARTS, RND=B_RND,
            PARTS_OUT=B_PARTS_OUT, X_PAIRS=B_X_PAIRS, ONCE=B_ONCE, SCALES_T=B_SCALES_T, PDL=B_PDL, PF_N=B_PF_N,
            PF_STEP=B_PF_STEP, EPW=B_EPW, AHEAD=B_AHEAD, rdy_ptr=rdy_ptr, rdy_need=n_first // P,
            rdy_users=(n_all - n_first) // P, ONE=2,
        )
