"""One rank of a CPU (gloo) expert-parallel test job, started by tests/distributed/test_ep.py.

``python tests/distributed/_worker.py JOB OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set.
Every case runs on every rank inside one process group (start-up is the slow part); each rank writes
``OUT_DIR/rank{r}.json`` mapping case name -> {"ok": bool, "error": str, ...}. Cases keep their
collectives in lockstep and assert only after them, so one failing case does not desynchronize the rest.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch

torch.set_num_threads(1)

from composer import load_config  # noqa: E402
from composer.checking import rel_error  # noqa: E402
from composer.distributed import runtime  # noqa: E402
from composer.distributed.check import compare_ep, single_rank_config  # noqa: E402
from composer.distributed.placement import local_experts  # noqa: E402
from composer.factory import build  # noqa: E402
from composer.kernels.reference import oracle_experts  # noqa: E402

BACKENDS = ("naive", "allgather_reducescatter", "all_to_all")
PLACEMENTS = ("linear", "round_robin")
BASE = ("device=cpu", "kernel=torch", "model.dtype=float32", "parallel.timeout_s=30")
F32_TOL = 1e-5
CASES: dict[str, object] = {}


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


@functools.lru_cache(maxsize=None)
def ep_cfg(backend, placement="linear", *extra):
    ws = int(os.environ["WORLD_SIZE"])
    return load_config(None, [*BASE, f"all2all={backend}", f"parallel.ep_size={ws}",
                              f"parallel.placement={placement}", *extra])


def rng(*keys):
    g = torch.Generator().manual_seed(zlib.crc32(repr(("ep-test", *keys)).encode()))  # (hash() of str: per process)
    return g


class Recorder:
    """Wraps an experts kernel; records how many (row, slot) pairs with a local expert it received."""

    def __init__(self, inner):
        self.inner, self.name, self.pairs = inner, inner.name, []

    def apply(self, x, w, ids, weights, activation):
        self.pairs.append(int((ids >= 0).sum()))
        return self.inner.apply(x, w, ids, weights, activation)


def routing(T, E, k, gen, allowed=None):
    """Fresh random routing: k distinct experts per token (from ``allowed``), softmax-like weights."""
    pool = torch.tensor(allowed if allowed is not None else list(range(E)))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(T)]) if T else \
        torch.empty(0, k, dtype=torch.int64)
    w = torch.rand(T, k, generator=gen) + 0.1
    return (w / w.sum(-1, keepdim=True)).float(), ids.to(torch.int32)


def layer_case(backend, placement, T_of_rank, *, allowed_of=None, dtype="float32"):
    """One FusedMoE under EP vs the single-rank layer (and the float64 oracle) on crafted routing."""
    rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = ep_cfg(backend, placement, "model.num_layers=1", f"model.dtype={dtype}")
    model, ref = build(cfg), build(single_rank_config(cfg), ep_rank=0, group=None)
    layer, ref_layer = model.layers[0].mlp.experts, ref.layers[0].mlp.experts
    m = cfg.model
    assert layer.local_num_experts == m.num_experts // ws, layer.local_num_experts
    assert layer.local_to_global == local_experts(m.num_experts, ws, rank, placement)
    rec = Recorder(layer.kernel.experts)
    layer.kernel.experts = rec
    gen = rng(backend, placement, rank, str(T_of_rank))
    T = T_of_rank[rank]
    allowed = allowed_of(m.num_experts, ws) if allowed_of else None
    x = torch.randn(T, m.hidden_size, generator=gen).to(m.torch_dtype)
    w, ids = routing(T, m.num_experts, m.top_k, gen, allowed)
    out = layer(x, w, ids)
    single = ref_layer(x, w, ids)
    assert out.shape == (T, m.hidden_size) and out.dtype == m.torch_dtype, (out.shape, out.dtype)
    tol = F32_TOL if dtype == "float32" else 1e-2
    err = rel_error(out, single)
    assert err <= tol, f"EP vs single-rank rel. error {err:.3e} > {tol}"
    full = ref_layer.w13.double(), ref_layer.w2.double()
    oracle = oracle_experts(x.double(), w.double(), ids, *full, m.activation)
    oerr = rel_error(out, oracle)
    assert oerr <= tol, f"EP vs float64 oracle rel. error {oerr:.3e} > {tol}"
    if T:
        assert out.abs().sum() > 0, "output is all zeros"
    return {"pairs_received": rec.pairs, "err": err, "T": T}


# -- every backend x placement: whole model vs single rank, uneven token counts -------------------------
for _b in BACKENDS:
    for _p in PLACEMENTS:
        @case(f"model[{_b}-{_p}]")
        def _model(b=_b, p=_p):
            rank = int(os.environ["RANK"])
            cfg = ep_cfg(b, p)
            model, ref = build(cfg), build(single_rank_config(cfg), ep_rank=0, group=None)
            T = (13, 5, 9, 2)[rank]  # uneven per rank
            x = torch.randn(T, cfg.model.hidden_size, generator=rng("model", b, p, rank))
            out, single = model(x), ref(x)
            err = rel_error(out, single)
            res = compare_ep(model, x, cfg)
            assert err <= F32_TOL, f"model output EP vs single-rank {err:.3e}"
            assert res["output_rel_err"] <= F32_TOL, res["output_rel_err"]
            for name, s in res["layers"].items():
                assert s["ep_vs_single_rel_err"] <= F32_TOL and s["experts_rel_err"] <= F32_TOL, (name, s)
            return {"err": err}

        @case(f"uneven[{_b}-{_p}]")
        def _uneven(b=_b, p=_p):
            return layer_case(b, p, (17, 3, 8, 1))

        @case(f"empty_rank[{_b}-{_p}]")
        def _empty(b=_b, p=_p):
            # every token routes to rank 0's experts: the other ranks receive no (token, slot) pair
            r = layer_case(b, p, (6, 7, 5, 4), allowed_of=lambda E, ws, p=p: local_experts(E, ws, 0, p))
            if int(os.environ["RANK"]) != 0:
                assert r["pairs_received"] == [0], r["pairs_received"]
            else:
                assert r["pairs_received"][0] > 0, r["pairs_received"]
            return r

        @case(f"t0_one_rank[{_b}-{_p}]")
        def _t0(b=_b, p=_p):
            return layer_case(b, p, (9, 0, 0, 3))

    @case(f"t0_all_ranks[{_b}]")
    def _t0_all(b=_b):
        return layer_case(b, "linear", (0, 0, 0, 0))

    @case(f"bf16[{_b}]")
    def _bf16(b=_b):
        return layer_case(b, "round_robin", (11, 6, 3, 7), dtype="bfloat16")

    @case(f"quant_int8_w8a16[{_b}]")
    def _quant(b=_b):
        rank = int(os.environ["RANK"])
        cfg = ep_cfg(b, "linear", "quant=int8_w8a16", "model.dtype=bfloat16", "model.num_layers=1")
        model, ref = build(cfg), build(single_rank_config(cfg), ep_rank=0, group=None)
        x = torch.randn((7, 4, 2, 1)[rank], cfg.model.hidden_size, generator=rng("q", b, rank)).bfloat16()
        blk, rblk = model.layers[0], ref.layers[0]
        h = blk.norm(x)
        w, ids = blk.mlp.router(blk.mlp.gate(h))
        err = rel_error(blk.mlp.experts(h, w, ids), rblk.mlp.experts(h, w, ids))
        assert err <= 1e-2, err
        return {"err": err}


@case("mismatched_config")
def _mismatch():
    rank = int(os.environ["RANK"])
    cfg = ep_cfg("all_to_all", "linear", f"seed={0 if rank == 0 else 7}")
    try:
        runtime.check_same_config(cfg, runtime.current())
    except runtime.DistributedError as exc:
        msg = str(exc)
        assert "rank 0" in msg and "rank 1" in msg and "seed: 0 vs 7" in msg, msg
        assert cfg.config_hash() in msg, msg
        return {"message": msg}
    raise AssertionError("different configs on the ranks were not detected")


@case("same_config_passes")
def _same():
    runtime.check_same_config(ep_cfg("naive"), runtime.current())


@case("placement_mismatch_detected")
def _placement():
    rank = int(os.environ["RANK"])
    cfg = ep_cfg("all_to_all", "linear" if rank == 0 else "round_robin", "model.num_layers=1")
    layer = build(cfg).layers[0].mlp.experts
    x = torch.randn(3, cfg.model.hidden_size)
    w, ids = routing(3, cfg.model.num_experts, cfg.model.top_k, rng("pm", rank))
    try:
        layer(x, w, ids)
    except runtime.DistributedError as exc:
        assert "parallel.placement" in str(exc), str(exc)
        return {"message": str(exc)}
    raise AssertionError("inconsistent placement was not detected")


def _ckpt_dir():
    d = Path(os.environ["EP_TEST_OUT"]) / "ckpt"
    d.mkdir(exist_ok=True)
    return d


for _layout in ("packed", "per_expert"):
    @case(f"load_local_experts[{_layout}]")
    def _load(layout=_layout):
        import torch.distributed as dist

        from composer.loading import load_checkpoint, save_checkpoint

        rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        cfg = ep_cfg("all_to_all", "round_robin")
        ref = build(single_rank_config(cfg), ep_rank=0, group=None)
        path = _ckpt_dir() / f"{layout}.safetensors"
        if rank == 0:
            save_checkpoint(ref, path, layout=layout)
        dist.barrier()
        model = build(cfg, init=False)
        rep = load_checkpoint(model, path)
        m = cfg.model
        mine = set(local_experts(m.num_experts, ws, rank, "round_robin"))
        E, H, I, L = m.num_experts, m.hidden_size, m.intermediate_size, m.num_layers
        es = 4  # float32
        expert_bytes = L * len(mine) * (2 * I * H + H * I) * es
        other_bytes = sum(p.numel() * es for n, p in ref.named_parameters() if ".experts." not in n)
        assert rep.bytes_read == expert_bytes + other_bytes, (rep.bytes_read, expert_bytes, other_bytes)
        if layout == "per_expert":
            read = {int(k.split(".experts.")[1].split(".")[0]) for k in rep.loaded if ".experts." in k}
            skipped = {int(k.split(".experts.")[1].split(".")[0]) for k in rep.skipped_experts}
            assert read == mine and skipped == set(range(E)) - mine, (read, skipped)
            assert len(rep.skipped_experts) == L * (E - len(mine)) * 3
        x = torch.randn((5, 8, 3, 2)[rank], H, generator=rng("load", layout, rank))
        err = rel_error(model(x), ref(x))
        assert err <= F32_TOL, err
        return {"bytes_read": rep.bytes_read, "err": err}


@case("bench_cpu")
def _bench():
    from composer.distributed.bench import bench_all2all

    out = {}
    for b in BACKENDS:
        cfg = ep_cfg(b, "linear", "model.num_layers=1")
        r = bench_all2all(cfg, tokens=12, iters=2, warmup=1)
        for k in ("dispatch_ms", "compute_ms", "combine_ms", "single_rank_ms"):
            assert r[k] > 0, (b, k, r[k])
        assert r["dispatch_bytes_per_rank"] > 0 and r["combine_bytes_per_rank"] > 0, r
        assert r["dispatch_busbw_GBps"] > 0, r
        assert r["rel_err_vs_single"] <= F32_TOL, r["rel_err_vs_single"]
        out[b] = {k: r[k] for k in ("bytes_per_rank", "dispatch_ms", "combine_ms")}
    return out


def main() -> int:
    job, out_dir = sys.argv[1], Path(sys.argv[2])
    os.environ["EP_TEST_OUT"] = str(out_dir)
    rank = int(os.environ["RANK"])
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    cfg = ep_cfg("all_to_all")
    t1 = time.perf_counter()
    state = runtime.init_from_env(cfg)
    print(f"rank {rank}: config {t1 - t0:.1f} s, init {time.perf_counter() - t1:.1f} s", flush=True)
    names = [n for n in CASES if job == "all" or n.startswith(job)]
    for name in names:
        t0 = time.perf_counter()
        try:
            data = CASES[name]() or {}
            results[name] = {"ok": True, "data": data}
        except Exception as exc:  # noqa: BLE001 - recorded for the test to report
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
        results[name]["seconds"] = time.perf_counter() - t0
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1, default=str))
    t2 = time.perf_counter()
    runtime.teardown(state)
    print(f"rank {rank}: teardown {time.perf_counter() - t2:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
