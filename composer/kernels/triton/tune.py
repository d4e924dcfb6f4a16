"""Measure candidate tile configs for one MoE shape on this GPU and build a tuned config table.

For each token count T, with one random routing: for each candidate BLOCK_M the align runs once, then every
GEMM1 candidate and every GEMM2 candidate is timed on its own (``triton.testing.do_bench``, median, L2
flushed between runs); the best pair plus the align and the top-k reduction give that BLOCK_M's total.
T = 1 also tries the decode path (one pair per program, no align). The fastest total wins.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .align import max_blocks, moe_align
from .configs import SMEM_LIMIT, smem_bytes
from .gemm import gemm1, gemm2, moe_sum


def _g(bn: int, bk: int, warps: int, stages: int, group_m: int = 1) -> dict[str, int]:
    return {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "num_warps": warps, "num_stages": stages}


def gemm_candidates(block_m: int, decode: bool, tma: bool = True) -> list[dict[str, Any]]:
    """Pointer-load candidates, and each again with TMA weight loads when ``tma``."""
    base = _base_candidates(block_m, decode)
    return base + [{**g, "tma": True} for g in base] if tma else base


def _base_candidates(block_m: int, decode: bool) -> list[dict[str, Any]]:
    if decode:
        return [_g(bn, bk, 4, st) for bn in (32, 64) for bk in (128, 256) for st in (4, 6)]
    if block_m <= 32:
        return [_g(bn, bk, 4, st) for bn in (32, 64, 128) for bk in (128, 256) for st in (3, 4)]
    if block_m == 64:
        return [_g(bn, bk, w, st, 8) for bn, bk, w, st in (
            (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4), (128, 64, 8, 4), (128, 128, 4, 3), (128, 128, 8, 3),
            (256, 64, 8, 3), (256, 64, 8, 4), (64, 256, 4, 3), (128, 64, 4, 5), (128, 64, 8, 5), (256, 128, 8, 2),
            # two programs per SM (smaller pipelines): one's epilogue overlaps the other's main loop
            (128, 32, 4, 4), (128, 32, 8, 4), (256, 32, 8, 4), (64, 64, 4, 2))]
    return [_g(bn, bk, w, st, 8) for bn, bk, w, st in (
        (64, 64, 4, 4), (64, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3),
        (128, 64, 4, 4), (64, 128, 4, 3), (256, 64, 8, 4), (128, 64, 8, 5), (256, 128, 8, 2), (128, 128, 8, 4),
        (256, 32, 8, 5), (128, 32, 8, 4), (128, 32, 8, 6), (128, 64, 8, 2), (256, 32, 8, 4), (64, 32, 4, 4))]


def block_m_candidates(T: int, E: int, k: int) -> list[int]:
    per_expert = T * k / max(1, min(E, T * k))
    if per_expert <= 8:
        return [16]
    if per_expert <= 24:
        return [16, 32]
    if per_expert <= 96:
        return [16, 32, 64]
    if per_expert <= 384:
        return [32, 64, 128]
    return [64, 128]


def _bench(fn: Callable[[], Any], rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(2, rep_ms // 4), rep=rep_ms, return_mode="median"))


def tune_tokens(T: int, E: int, k: int, H: int, I: int, w13: torch.Tensor, w2: torch.Tensor, activation: str = "silu",
                rep_ms: int = 20, gen: torch.Generator | None = None, log: Callable[[str], None] | None = None,
                tma: bool = True) -> tuple[dict[str, Any], float]:
    """The fastest config for T tokens and its time (ms, kernels only)."""
    dev, dt = w13.device, w13.dtype
    elt = w13.element_size()
    x = torch.randn(T, H, device=dev, generator=gen).to(dt)
    tw, ids = torch.topk(torch.randn(T, E, device=dev, generator=gen).softmax(-1), k, dim=-1)
    ids = ids.to(torch.int32).contiguous()
    tw = tw.float().reshape(-1).contiguous()
    ids_flat = ids.reshape(-1)
    P = T * k
    inter = torch.empty(P, I, dtype=dt, device=dev)
    out32 = torch.zeros(T, H, dtype=torch.float32, device=dev)
    buf = torch.empty(P, H, dtype=dt, device=dev)
    options: list[tuple[float, dict[str, Any]]] = []
    modes: list[tuple[int, bool]] = [(bm, False) for bm in block_m_candidates(T, E, k)]
    if T == 1:
        modes.insert(0, (16, True))
    for bm, direct in modes:
        if direct:
            sorted_ids = expert_ids = ntpp = ids_flat
            npm = P
            t_align = 0.0
        else:
            sorted_ids, expert_ids, ntpp = moe_align(ids, E, bm)
            npm = max_blocks(P, E, bm)
            t_align = _bench(lambda: moe_align(ids, E, bm), rep_ms)
        best: dict[str, tuple[float, dict[str, Any]]] = {}
        for name in ("gemm1", "gemm2"):
            for g in gemm_candidates(bm, direct, tma):
                if smem_bytes(bm, g, elt, 1 if name == "gemm1" else 2) > SMEM_LIMIT:
                    continue
                if name == "gemm1":
                    fn = lambda g=g: gemm1(x, w13, None, inter, sorted_ids, expert_ids, ntpp, ids_flat, npm, k,  # noqa: E731
                                           activation, direct, bm, g)
                else:
                    fn = lambda g=g: gemm2(inter, w2, None, tw, out32, sorted_ids, expert_ids, ntpp, ids_flat, npm,  # noqa: E731
                                           k, direct, True, bm, g)
                try:
                    t = _bench(fn, rep_ms)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is skipped
                    if log:
                        log(f"  T={T} BM={bm} {name} {g}: skipped ({type(exc).__name__})")
                    continue
                if name not in best or t < best[name][0]:
                    best[name] = (t, g)
        if len(best) < 2:
            continue
        g2 = best["gemm2"][1]
        # the top-k reduction: atomics into fp32 [T, H] (+ zeroing and the cast), or a [P, H] buffer + moe_sum
        t_atomic = best["gemm2"][0] + _bench(lambda: (out32.zero_(), out32.to(dt)), rep_ms)
        try:
            t_buf = _bench(lambda: (gemm2(inter, w2, None, tw, buf, sorted_ids, expert_ids, ntpp, ids_flat, npm, k,
                                          direct, False, bm, g2),
                                    moe_sum(buf, ids_flat, k, E)), rep_ms)
        except Exception:  # noqa: BLE001
            t_buf = float("inf")
        reduce = "atomic" if t_atomic <= t_buf else "buffer"
        total = t_align + best["gemm1"][0] + min(t_atomic, t_buf)
        entry = {"BLOCK_M": bm, "decode": direct, "reduce": reduce, "gemm1": best["gemm1"][1], "gemm2": g2}
        if log:
            log(f"  T={T} BM={bm}{' decode' if direct else ''}: g1 {best['gemm1'][1]} g2 {g2}")
            log(f"  T={T} BM={bm}{' decode' if direct else ''}: align {t_align * 1e3:.1f} gemm1 {best['gemm1'][0] * 1e3:.1f} "
                f"gemm2 {best['gemm2'][0] * 1e3:.1f} reduce {reduce} -> {total * 1e3:.1f} us")
        options.append((total, entry))
    if not options:
        raise RuntimeError(f"no candidate config ran for T={T}")
    total, entry = min(options, key=lambda o: o[0])
    return entry, total


def tune_shape(E: int, k: int, H: int, I: int, dtype: torch.dtype, tokens: list[int], activation: str = "silu",
               rep_ms: int = 20, seed: int = 0, log: Callable[[str], None] | None = None,
               on_token: Callable[[int], None] | None = None, tma: bool = True) -> dict[str, Any]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    w13 = torch.empty(E, 2 * I, H, device=dev, dtype=dtype)
    w2 = torch.empty(E, H, I, device=dev, dtype=dtype)
    for e in range(E):
        w13[e] = (torch.randn(2 * I, H, device=dev, generator=gen) * H ** -0.5).to(dtype)
        w2[e] = (torch.randn(H, I, device=dev, generator=gen) * I ** -0.5).to(dtype)
    from .configs import device_capability

    table: dict[str, Any] = {"_capability": device_capability()}  # lets GPUs of this capability use the file
    for T in tokens:
        entry, total = tune_tokens(T, E, k, H, I, w13, w2, activation, rep_ms, gen, log, tma)
        table[str(T)] = {**entry, "_us": round(total * 1e3, 1)}
        if on_token:
            on_token(T)
    del w13, w2
    torch.cuda.empty_cache()
    return table


def merge_tables(new_dir: str, base_dir: str, out_dir: str) -> list[str]:
    """For each config file in ``new_dir``: the entries of ``base_dir``'s file of that name, replaced by the new
    ones where a T is new or faster (``_us``); written to ``out_dir``. Returns one line per change."""
    import json
    from pathlib import Path

    changes = []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(new_dir).glob("E=*.json")):
        new = json.loads(f.read_text())
        base_file = Path(base_dir) / f.name
        cur = json.loads(base_file.read_text()) if base_file.exists() else {}
        for T, e in new.items():
            if T == "_capability":
                cur[T] = e
            if T.startswith("_"):
                continue
            if T not in cur or e.get("_us", 1e18) < cur[T].get("_us", 1e18):
                changes.append(f"{f.name}: T={T} {cur.get(T, {}).get('_us')} -> {e.get('_us')} us")
                cur[T] = e
        cur = dict(sorted(cur.items(), key=lambda kv: -1 if kv[0].startswith("_") else int(kv[0])))
        (out / f.name).write_text(json.dumps(cur, indent=2) + "\n")
    return changes


def quant_decode_candidates(method: str) -> list[dict[str, Any]]:
    """T = 1 (one pair per program) GEMM candidates for the quantized weights: fewer bytes per weight tile than
    bf16, so longer K tiles (fp8) or more N per tile (int4, whose K tile stays inside one scale group)."""
    if method == "int4_w4a16":
        # (a K tile longer than the group is cut to the group by fused._shape_gemm, so 128 is the K tile at g=128)
        return [_g(bn, 128, 4, st) for bn in (32, 64, 128) for st in (3, 4, 5)]
    # w8a8 at T = 1 streamed the weights at 72-75% of the copy rate with these 4-warp tiles (H100, 2026-11-27)
    # against 97% for bf16: also try 8 warps and wider N tiles (more bytes in flight per program)
    base = ([_g(bn, bk, 4, st) for bn in (32, 64) for bk in (256, 512) for st in (3, 5)]
            + [_g(bn, bk, 8, st) for bn, bk, st in ((64, 256, 4), (64, 512, 3), (128, 256, 3), (128, 128, 5))])
    # w8a8 weights need no dequantization, so they can also come by TMA (as bf16's do); int8_w8a16's are
    # dequantized in registers, which TMA's shared-memory tiles do not serve (gemm1 / gemm2 ignore "tma" there)
    if method == "int8_w8a16":
        return base
    return base + [{**g, "tma": True} for g in base[:4] + base[8:10]]


def _gv(bn: int, bk: int, warps: int, stages: int, split: int = 1, mma: bool = False) -> dict[str, Any]:
    g: dict[str, Any] = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
    if split > 1:
        g["SPLIT_K"] = split
    if mma:
        g["mma"] = True
    return g


def _gemv_mma_candidates(name: str) -> list[dict[str, Any]]:
    """Swapped-operand GEMVs on tensor cores (``mma``): the channel tile is the MMA's M (GEMM1: 2 x BLOCK_N rows)."""
    if name == "gemm1":
        return [_gv(bn, bk, w, st, 1, True) for bn, bk, w, st in (
            (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (64, 256, 4, 3), (64, 128, 8, 4), (128, 128, 8, 3))]
    return [_gv(bn, bk, w, st, sp, True) for bn, bk, w, st, sp in (
        (64, 128, 4, 3, 1), (64, 128, 4, 3, 2), (64, 128, 4, 3, 4), (64, 256, 4, 3, 4), (64, 128, 4, 3, 8),
        (128, 128, 4, 3, 4), (128, 128, 8, 3, 8), (64, 256, 4, 4, 8))]


def gemv_candidates(name: str, method: str = "") -> list[dict[str, Any]]:
    """``"decode": "gemv"`` tiles: GEMM1's rows are gate and up (2 x BLOCK_N); GEMM2 (short N = H, long K = I)
    also splits K over programs so that enough of them stream the weights. int4's candidates vary the read, rows,
    warps and splits, with K tiles of one or two scale groups (128 / 256 at the benchmark's group size)."""
    if method == "int4_w4a16":
        # "subnormal" and "planes" (fewer integer ops per nibble) with 1 or 2 K iterations unrolled, then the
        # "words" read. H100: planes + unroll 2 took mixtral 119 -> 107 us, deepseek_v3 126 -> 113 (fourth
        # session); subnormal 1-2% faster than planes, with 256-wide K tiles deepseek_v3 119 -> 112.5 and qwen3
        # 21.8 -> 19.6 (sixth session, where 512 / 1024-wide K tiles were 10-80% slower); once a tile of whole
        # groups loaded one scale vector per group, 256-wide K tiles won for both GEMVs (mixtral 103.5 -> 86.2 us,
        # deepseek_v3 113.8 -> 90.7; seventh session); deeper pipelines (num_stages) never changed the GEMV (its
        # loads are not software-pipelined: no such candidates), unroll 4+ was slower; x_vec (one 16-byte load of a
        # word column's activations) paid for narrow tiles and cost for 64-wide ones on an H200 (ninth session);
        # deepseek_v3's gemm2 128 x 256 split 4 beat 128 x 128 split 8 by 0.5-1.0 us on an H200 (eleventh session)
        fast = [{**g, "int4_read": read, **({"unroll": u} if u > 1 else {}), **({"x_vec": True} if vec else {})}
                for read in ("subnormal", "planes") for u in (1, 2) for vec in (False, True) for g in (
            [_gv(bn, bk, w, 2) for bn, bk, w in ((16, 128, 4), (32, 128, 4), (64, 128, 4), (64, 128, 8),
                                                  (16, 256, 2), (32, 256, 4))] if name == "gemm1" else
            [_gv(bn, bk, 4, 2, sp) for bn, bk, sp in ((64, 128, 2), (128, 128, 8), (128, 128, 16), (128, 128, 32),
                                                      (64, 256, 16), (128, 256, 4), (128, 256, 8), (128, 256, 16))])]
        # "chain" (per-row sums of 32 nibbles, no layout conversion in the loop) with the tiles that won on an H200
        # (eighteenth session: mixtral 75.0 -> 59.7 us, deepseek_v3 73.3 -> 62.3, qwen3 15.1 -> 14.0): 512-wide K
        # tiles give each thread 8 rows to share its activations with while keeping 4 warps; qwen3's gemm1 loads its
        # whole K = 2048 at once (512 x 4: 14.1 against 15.1 us, nineteenth session)
        chain = [{**_gv(bn, bk, 4, 2, sp), "int4_read": "chain", "unroll": u} for bn, bk, sp, u in (
            ((16, 512, 1, 4), (16, 256, 1, 4), (16, 256, 1, 2), (32, 256, 1, 2), (64, 256, 1, 2), (16, 512, 1, 2),
             (32, 512, 1, 2))
            if name == "gemm1" else
            ((64, 256, 2, 2), (128, 256, 4, 2), (128, 256, 8, 2), (64, 512, 4, 2), (64, 512, 8, 2)))]
        fast = chain + fast
        if name == "gemm1":
            return fast + [_gv(bn, 128, w, 2) for bn in (8, 16, 32, 64, 128) for w in (4, 8)]
        return fast + [_gv(bn, 128, 4, 2, sp) for bn in (16, 32, 64, 128) for sp in (2, 4, 8, 16, 32)]
    if name == "gemm1":
        return _gemv_mma_candidates(name) + [_gv(bn, bk, w, st) for bn, bk, w, st in (
            (8, 256, 4, 2), (16, 256, 4, 2), (32, 256, 4, 2), (8, 512, 4, 2), (16, 512, 4, 2), (16, 128, 4, 2),
            (16, 256, 8, 2), (32, 512, 8, 2), (16, 256, 4, 3), (32, 256, 8, 3), (32, 128, 4, 2), (64, 128, 8, 2))]
    # GEMM2: int4 on an H100 wanted 64-channel tiles split 16 ways over K (mixtral T = 1: 152 -> 122 us)
    return _gemv_mma_candidates(name) + [_gv(bn, bk, w, st, sp) for bn, bk, w, st, sp in (
        (16, 256, 4, 2, 1), (16, 256, 4, 2, 2), (16, 256, 4, 2, 4), (32, 256, 4, 2, 4), (8, 256, 4, 2, 4),
        (16, 512, 4, 2, 4), (16, 256, 8, 2, 4), (8, 512, 4, 2, 8), (32, 512, 8, 2, 2), (16, 128, 4, 2, 8),
        (16, 256, 4, 3, 4), (32, 256, 4, 2, 8), (64, 256, 4, 2, 8), (64, 256, 4, 2, 16), (32, 128, 4, 2, 16),
        (64, 128, 4, 2, 16), (64, 128, 4, 2, 32))]


def quant_timer(weights, activation: str = "silu", rep_ms: int = 30, log: Callable[[str], None] | None = None
                ) -> Callable[..., float]:
    """``timed(x, tw, ids, cfg)``: ms per call of the quantized experts with tile config ``cfg``, as task=bench times
    it (per call inside a CUDA graph of calls, each after an L2 flush; tasks/timing.py; off CUDA, eager calls); inf
    for a candidate that does not compile or fit."""
    from ...tasks.timing import CallGraph, L2Flush, time_fn
    from .fused import fused_experts_quant

    ex = weights.extra or {}
    bn_q, bk_q = ex.get("block_shape", (128, 128))
    flush = None

    def timed(x, tw, ids, cfg) -> float:
        nonlocal flush

        def run():
            return fused_experts_quant(x, tw, ids, weights.w13, weights.w2, weights.w13_bias, weights.w2_bias,
                                       activation, weights.quant, weights.w13_scale, weights.w2_scale,
                                       weights.a13_scale, weights.a2_scale, weights.w13_zero, weights.w2_zero,
                                       ex.get("granularity", "per_token_channel"), bn_q, bk_q, config=cfg)

        try:
            run()
            if x.device.type != "cuda":
                return time_fn(run, x.device, warmup=1, iters=3, min_iters=1, budget_s=rep_ms * 1e-3, warmup_s=0.0)
            flush = flush or L2Flush(x.device)
            return CallGraph(run, x.device, 20, flush).ms(200, 20, rep_ms * 1e-3)
        except Exception as exc:  # noqa: BLE001 - a candidate that does not compile or fit is skipped
            if log:
                log(f"  skipped {cfg['gemm1']} {cfg['gemm2']}: {type(exc).__name__}")
            return float("inf")

    return timed


GEMV_START = {"BLOCK_M": 16, "decode": "gemv", "reduce": "atomic", "gemm1": _gv(16, 256, 4, 2),
              "gemm2": _gv(16, 256, 4, 2, 4)}


def tune_quant_decode(weights, x: torch.Tensor, tw: torch.Tensor, ids: torch.Tensor, base: dict[str, Any],
                      activation: str = "silu", rep_ms: int = 30,
                      log: Callable[[str], None] | None = None, dot: bool | None = True
                      ) -> tuple[dict[str, Any], float]:
    """The decode (T = 1) config of the quantized experts, tl.dot decode (from ``base``; skipped when not ``dot``)
    and GEMV decode: GEMM1's tile first, then GEMM2's, each timed the way task=bench times graphs (per call of the
    whole quantized experts call, the activation quantizer included, in a graph of calls, each after an L2 flush);
    the faster of the two modes wins (``dot=None``: GEMV only)."""
    timer = quant_timer(weights, activation, rep_ms, log)

    def timed(cfg) -> float:
        return timer(x, tw, ids, cfg)

    results = []
    for start, cands in (({**base, "decode": True, "BLOCK_M": 16}, lambda n: quant_decode_candidates(weights.quant)),
                         (dict(GEMV_START), lambda n: gemv_candidates(n, weights.quant))):
        if dot is None and start["decode"] is True:
            continue  # GEMV only
        best = start
        best_t = timed(best)
        if log:
            log(f"  {weights.quant} decode={best['decode']} start: {best_t * 1e3:.1f} us")
        for name in ("gemm1", "gemm2") if dot or start["decode"] == "gemv" else ():  # not dot: time base only
            for g in cands(name):
                cand = {**best, name: g}
                t = timed(cand)
                if t < best_t:
                    best, best_t = cand, t
            if log:
                log(f"  {weights.quant} decode={best['decode']} {name}: {best[name]} -> {best_t * 1e3:.1f} us")
        for name in ("gemm1", "gemm2") if start["decode"] == "gemv" else ():
            # K tiles loaded 1-2 steps ahead into registers (planes / subnormal reads only), also with twice the warps
            # (H200, L2 flushed: qwen3's 2-warp gemm1 with prefetch 2 and 4 warps 18.2 -> 16.2 us, while prefetch on
            # the 2-warp tile did not pay; mixtral's wide tiles lose occupancy to the registers; tenth session)
            if best[name].get("int4_read") not in ("planes", "subnormal"):
                continue
            tile = best[name]
            w = tile.get("num_warps", 4)
            for pf, warps in ((1, w), (2, w), (2, 2 * w)):
                cand = {**best, name: {**tile, "prefetch": pf, "num_warps": warps}}
                t = timed(cand)
                if t < best_t:
                    best, best_t = cand, t
            if log:
                log(f"  {weights.quant} decode=gemv {name} prefetch={best[name].get('prefetch', 0)} "
                    f"num_warps={best[name].get('num_warps', 4)} -> {best_t * 1e3:.1f} us")
        if start["decode"] == "gemv":  # GEMM2 as GEMM1's programmatic dependent (H200: deepseek_v3 79.3 -> 76.7 us,
            # qwen3 15.3 with prefetch against 16.2 on a cold L2; a no-op before sm_90, where it times the same)
            t = timed({**best, "pdl": True})
            if t < best_t:
                best, best_t = {**best, "pdl": True}, t
            if log:
                log(f"  {weights.quant} decode=gemv pdl={best.get('pdl', False)} -> {best_t * 1e3:.1f} us")
        results.append((best_t, best))
    best_t, best = min(results, key=lambda r: r[0])
    return best, best_t


SMALL_T = (2, 4, 8, 16, 24, 32, 48, 64, 96)  # the T the quant tuner tries one pair per program at


def small_t_entries(t1: dict[str, Any], sorted_at: Callable[[int], dict[str, Any]],
                    timed: Callable[[int, dict[str, Any]], float], tokens: tuple[int, ...] = SMALL_T,
                    log: Callable[[str], None] | None = None) -> dict[int, dict[str, Any]]:
    """Table keys above T = 1 for a GEMV decode entry ``t1``: at each T of ``tokens`` in turn, ``t1`` run one pair
    per program (GEMM2 split as tuned, 2 ways or unsplit) against the table's expert-sorted entry ``sorted_at(T)``.
    Each T where a GEMV is faster gets it; the first T where the sorted entry wins gets that entry, so that nearest-
    key lookups past it leave the GEMVs (which re-read an expert's weights for each of its pairs), and the search
    stops. ``timed(T, cfg)`` is milliseconds per call. (H200, int4: the GEMVs won up to T = 8 for mixtral_8x7b, 24 for
    qwen3_30b_a3b, 64 for deepseek_v3, by up to 2.3x over expert-sorted int4 blocks bound by their dequantize.)"""
    out: dict[int, dict[str, Any]] = {}
    if t1.get("decode") != "gemv":
        return out
    t1 = {k: v for k, v in t1.items() if k != "_us"}
    split = t1["gemm2"].get("SPLIT_K", 1)
    cands = [t1] + [{**t1, "gemm2": {**t1["gemm2"], "SPLIT_K": sp}} for sp in (2, 1) if sp < split]
    for T in tokens:
        srt = {k: v for k, v in sorted_at(T).items() if k not in ("_us", "source")}
        t_sorted = timed(T, srt)
        t_gemv, best = min(((timed(T, c), c) for c in cands), key=lambda r: r[0])
        won = t_gemv < t_sorted
        out[T] = {**(best if won else srt), "_us": round((t_gemv if won else t_sorted) * 1e3, 1)}
        if log:
            log(f"  T={T}: GEMVs {t_gemv * 1e3:.1f} us, expert-sorted {t_sorted * 1e3:.1f} us -> "
                f"{'GEMV, split ' + str(best['gemm2'].get('SPLIT_K', 1)) if won else 'expert-sorted'}")
        if not won:
            break
    return out


SORTED_T = 16  # the quant tuner times expert-sorted tiles at the table keys from here up
PREFILL_T = 1024  # from here up its int4 candidates are INT4_PAIRS blocks; below, INT4_QPAIRS blocks (from 128: both)


def bf16_tile_for(method: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A bfloat16 table entry as a quant method's tile: w8a8 gets K tiles of at least 128 (fused.w8a8_tiles)."""
    from .fused import w8a8_tiles

    entry = {k: v for k, v in entry.items() if k not in ("_us", "source")}
    return w8a8_tiles(entry) if method in ("fp8_w8a8", "int8_w8a8") else entry


def quant_sorted_candidates(method: str, T: int, bf16: dict[str, Any], shipped: dict[str, Any] | None
                            ) -> list[dict[str, Any]]:
    """Tiles the quant tuner times at an expert-sorted key T: the bfloat16 table's entry (``bf16_tile_for``), the
    method's shipped entry there, and for int4 the blocks that won on an H200 (gemm.py): below T = PREFILL_T the
    16- and 32-row blocks INT4_QPAIRS serves (gemm1 32 or 64 channels, 128-deep K after the group fit, 4 stages),
    from T = 128 the INT4_PAIRS blocks: 64 rows with gemm1 64 / gemm2 128 channels (64- and 128-deep K tiles:
    several blocks per SM, so one dequantizes while another's wgmma runs) and 128 rows with 8 warps; for int8_w8a16
    from T = 128 the 64-row block 64 channels wide with 128-deep K tiles, whose operands SWAP_AB swaps (H200: qwen3
    T = 1024 469.6 us against 555.1 for the 32-row tile). Duplicates dropped."""
    cands = [bf16_tile_for(method, bf16)] + ([shipped] if shipped else [])
    if method == "int4_w4a16":
        if T < PREFILL_T:
            cands += [{"BLOCK_M": bm, "decode": False, "reduce": "atomic", "gemm1": _g(n1, 256, 4, 4),
                       "gemm2": _g(64, 256, 4, 4)} for bm, n1 in ((16, 32), (16, 64), (32, 64))]
        if T >= 128:
            cands += [{"BLOCK_M": bm, "decode": False, "reduce": "buffer", "gemm1": _g(n1, bk, w, st, 8),
                       "gemm2": _g(128, bk, w, st, 8)}
                      for bm, n1, bk, w, st in ((64, 64, 64, 4, 4), (64, 64, 128, 4, 3), (128, 128, 128, 8, 3))]
    if method == "int8_w8a16" and T >= 128:
        cands.append({"BLOCK_M": 64, "decode": False, "reduce": "atomic", "gemm1": _g(64, 128, 4, 3),
                      "gemm2": _g(64, 128, 4, 3)})
    out: list[dict[str, Any]] = []
    for c in cands:
        c = {k: v for k, v in c.items() if k not in ("_us", "source")}
        if c not in out:
            out.append(c)
    return out


def sorted_entries(candidates_at: Callable[[int], list[dict[str, Any]]], timed: Callable[[int, dict[str, Any]], float],
                   tokens: tuple[int, ...], log: Callable[[str], None] | None = None) -> dict[int, dict[str, Any]]:
    """The fastest of ``candidates_at(T)`` at each expert-sorted T of ``tokens`` (``timed(T, cfg)``: ms per call),
    with its ``_us``; a T where none ran (every candidate inf) keeps the first candidate, untimed. The shipped entry
    is among the candidates, so a retune keeps a measured tile unless another beats it: before, every T but 1 took the
    bfloat16 table's tile, which for int4 was up to 1.5x slower than the shipped one (H200, T = 1024) and up to 1.6x
    slower than the INT4_QPAIRS blocks (T = 16-128)."""
    out: dict[int, dict[str, Any]] = {}
    for T in tokens:
        cands = candidates_at(T)
        times = [timed(T, c) for c in cands]
        best = min(range(len(cands)), key=lambda i: times[i])
        out[T] = dict(cands[best]) if times[best] == float("inf") else {**cands[best],
                                                                          "_us": round(times[best] * 1e3, 1)}
        if log:
            log(f"  T={T}: " + ", ".join(f"{t * 1e3:.1f}" for t in times) + f" us -> candidate {best}")
    return out


QUANT_TUNE_SHAPES = {"mixtral_8x7b": (8, 2, 4096, 14336), "qwen3_30b_a3b": (128, 8, 2048, 768),
                     "deepseek_v3": (256, 8, 7168, 2048)}
QUANT_TUNE_METHODS = (("fp8_w8a8", {"granularity": "per_token_channel"}), ("int4_w4a16", {"group_size": 128}),
                      ("int8_w8a16", {}))


def tune_quant_tables(out_dir: str, shapes: dict[str, tuple[int, int, int, int]] | None = None,
                      log: Callable[[str], None] = print, methods: tuple[str, ...] | None = None,
                      dot: bool | None = True, device: str = "cuda") -> list[str]:
    """The config tables of the quantized experts (``dtype=<method>`` files) for the benchmark shapes: T = 1 tuned
    by ``tune_quant_decode``; at the bfloat16 table's keys from T = SORTED_T up, and the shipped table's
    expert-sorted keys there, the fastest of the bfloat16 tile, the shipped tile and the method's candidates
    (``sorted_entries``); where T = 1 got GEMVs, small T keys where those beat the expert-sorted tiles one pair per
    program (``small_t_entries``).
    How the shipped tables were made: ``python -c "from composer.kernels.triton.tune import tune_quant_tables as t;
    t('DIR')"`` on the GPU (``methods=("int4_w4a16",)`` retunes one method; scripts/quant_gpu_bench.sh does that with
    TUNE=...)."""
    import json
    import os

    from ...tasks.bench import Shape, make_weights, quantize_weights
    from .configs import (config_file_name, device_capability, device_name, get_config, heuristic_config,
                          nearest_entry, tuned_table)

    os.makedirs(out_dir, exist_ok=True)
    written = []
    dev = torch.device(device)  # (another device only to test the table logic with fake timers)
    for name, (E, k, H, I) in (shapes or QUANT_TUNE_SHAPES).items():
        shape = Shape(name, E, k, H, I, torch.bfloat16)
        gen = torch.Generator(device=dev)
        gen.manual_seed(0)
        w = make_weights(shape, dev, gen)
        for method, params in QUANT_TUNE_METHODS:
            if methods is not None and method not in methods:
                continue
            shape.quant, shape.quant_params = method, params
            qw = quantize_weights(shape, w)
            x = torch.randn(1, H, device=dev, generator=gen).to(torch.bfloat16)
            tw, ids = torch.topk(torch.randn(1, E, device=dev, generator=gen).softmax(-1), k, dim=-1)
            shipped = get_config(1, E, I, H, k, method, dev)  # the method's own table where one exists
            if shipped.get("source") == "heuristic" or not shipped.get("decode"):
                shipped = get_config(1, E, I, H, k, torch.bfloat16, dev)
            base = {kk: v for kk, v in shipped.items() if kk not in ("source", "_us")}
            if base.get("decode") == "gemv":  # retuning a GEMV table: start the tl.dot search from bf16's tiles
                base = {kk: v for kk, v in get_config(1, E, I, H, k, torch.bfloat16, dev).items() if kk != "source"}
            log(f"{name} {method}")
            entry, t = tune_quant_decode(qw, x, tw.float(), ids.to(torch.int32), base, log=log, dot=dot)
            table: dict[str, Any] = {"_note": (
                f"{method}: T=1 tuned by composer.kernels.triton.tune.tune_quant_decode on one "
                f"{torch.cuda.get_device_name()} (_us: CUDA-graph median of the whole quantized experts call); "
                "other T: the bfloat16 table's tiles (w8a8: K tiles of at least 128, fused.w8a8_tiles)")}
            table["_capability"] = device_capability()
            bf = tuned_table(E, I, H, device_name(), "bfloat16", device_capability())  # (path, validated entries)
            for T, e in (bf[1] if bf else {}).items():
                if T != 1:
                    table[str(T)] = bf16_tile_for(method, e)
            table["1"] = {**entry, "_us": round(t * 1e3, 1)}
            timer = quant_timer(qw, log=log)

            def timed_at(T, cfg, g=gen, E=E, H=H, k=k, timer=timer):
                xs = torch.randn(T, H, device=dev, generator=g).to(torch.bfloat16)
                tws, idss = torch.topk(torch.randn(T, E, device=dev, generator=g).softmax(-1), k, dim=-1)
                return timer(xs, tws.float(), idss.to(torch.int32), cfg)

            own = tuned_table(E, I, H, device_name(), method, device_capability())  # the shipped table, if any
            keys = {int(kk) for kk in table if not kk.startswith("_")} | {
                T for T, e in (own[1] if own else {}).items() if e.get("decode") != "gemv"}
            srt = sorted(T for T in keys if T >= SORTED_T)
            if srt:
                def candidates_at(T, own=own, bf=bf, method=method):
                    shipped = own[1].get(T) if own else None
                    hit = nearest_entry(bf[1], T) if bf else None
                    return quant_sorted_candidates(method, T, hit[1] if hit else heuristic_config(T, E, I, H, k),
                                                   shipped)

                for T, e in sorted_entries(candidates_at, timed_at, tuple(srt), log=log).items():
                    table[str(T)] = e
                table["_note"] += (f"; T >= {SORTED_T}: the fastest of the bfloat16 tile, the shipped tile and the "
                                   "method's own candidates (tune.sorted_entries)")
            if entry.get("decode") == "gemv":  # one pair per program at small T where that beats expert-sorted blocks
                rows = {int(kk): v for kk, v in table.items() if not kk.startswith("_") and kk != "1"}

                def sorted_at(T, rows=rows):
                    hit = nearest_entry(rows, T)
                    return hit[1] if hit else heuristic_config(T, E, I, H, k)

                for T, e in small_t_entries(entry, sorted_at, timed_at, log=log).items():
                    table[str(T)] = e
                table["_note"] += ("; T = 2-96: the T=1 GEMVs one pair per program where they measured faster than "
                                   "the expert-sorted entry, which holds the first T where they did not "
                                   "(tune.small_t_entries)")
            table = dict(sorted(table.items(), key=lambda kv: -1 if kv[0].startswith("_") else int(kv[0])))
            path = os.path.join(out_dir, config_file_name(E, I, H, device_name(), method))
            with open(path, "w") as f:
                f.write(json.dumps(table, indent=2) + "\n")
            written.append(path)
            del qw
            torch.cuda.empty_cache()
        del w
        torch.cuda.empty_cache()
    return written
