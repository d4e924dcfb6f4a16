"""Tensor-parallel experts benchmark: compute (this rank's slice of every expert) and all-reduce times,
beside the single-rank experts time on the same device, and the TP-vs-single-rank error.

Usable on CPU (gloo) and GPU (NCCL). Each measured iteration starts with a barrier so the phases time the
work rather than the skew between ranks; each phase is closed by a device synchronization. Times are medians
over iterations, then the maximum over ranks. The all-reduce moves ``T x H`` elements of the model dtype per
rank; bus bandwidth follows nccl-tests: ``2 (n-1)/n x bytes / time``. Routing comes from the model's own
gate and router on the same seeded tokens on every rank (routing excluded from the times).

From torchrun (``--tokens`` takes a comma-separated list; the rest are composer overrides)::

    torchrun --nproc-per-node 2 -m composer.distributed.tp_bench --tokens 16,1024 --out tp_bench.json \\
        model=mixtral_8x7b model.num_layers=1 parallel.tp_size=2 kernel=triton

``task=bench`` hook (tasks/bench.py belongs to the kernels work; the hook to add there, at the top of
``Bench.run``)::

    if cfg.parallel.tp_size > 1:
        from ..distributed.tp_bench import bench_task
        return bench_task(cfg, ctx)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..checking import rel_error
from ..config import ComposerConfig
from . import runtime
from .tp import all_reduce


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bench_tp(cfg: ComposerConfig, *, tokens: int, iters: int = 20, warmup: int = 3,
             model: torch.nn.Module | None = None, ref: torch.nn.Module | None = None) -> dict[str, Any]:
    """Time the first MoE layer's compute and all-reduce on ``tokens`` seeded tokens (the same on every rank).

    Collective: every rank calls it with the same arguments, after ``runtime.init_from_env(cfg)``.
    Returns the same dict on every rank.
    """
    from ..factory import _generator, build
    from .tp_check import single_rank_config

    state = runtime.current()
    if state is None or getattr(state, "tp_size", 1) < 2:
        raise runtime.DistributedError("bench_tp needs a tensor-parallel run: launch with torchrun, set "
                                       "parallel.tp_size, and call composer.distributed.runtime.init_from_env(cfg)")
    if cfg.parallel.sequence_parallel:
        raise runtime.DistributedError("bench_tp times the all-reduce mode; run it with parallel.sequence_parallel=false")
    model = model if model is not None else build(cfg)
    ref = ref if ref is not None else build(single_rank_config(cfg))
    block, rblock = model.layers[0], ref.layers[0]
    layer, ref_layer = block.mlp.experts, rblock.mlp.experts
    device = torch.device(cfg.device if cfg.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    gen = _generator(cfg.seed, "tp-bench", tokens)
    x = torch.randn(tokens, cfg.model.hidden_size, generator=gen).to(device=device, dtype=cfg.model.torch_dtype)
    h = rblock.norm(x)
    w, ids = rblock.mlp.router(rblock.mlp.gate(h))
    qm, rqm = layer.quant_method, ref_layer.quant_method
    times: dict[str, list[float]] = {"compute": [], "allreduce": [], "total": [], "single_rank": []}
    out = single = None
    for i in range(warmup + iters):
        dist.barrier(group=state.cpu_group)
        _sync(device)
        t0 = time.perf_counter()
        partial = qm.apply(layer, h, w, ids)  # this rank's slice of every expert, no reduction
        _sync(device)
        t1 = time.perf_counter()
        reduced = all_reduce(partial, layer.tp_group)
        _sync(device)
        t2 = time.perf_counter()
        dist.barrier(group=state.cpu_group)
        _sync(device)
        t3 = time.perf_counter()
        out = layer(h, w, ids)  # the layer's own forward (compute + all-reduce)
        _sync(device)
        t4 = time.perf_counter()
        single = rqm.apply(ref_layer, h, w, ids)
        _sync(device)
        t5 = time.perf_counter()
        if i >= warmup:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t4 - t3, t5 - t4)):
                times[key].append(dt)
    err = max(rel_error(out, single), rel_error(reduced, single))
    mine = {"rank": state.rank, "rel_err_vs_single": err, **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}}
    ranks: list[Any] = [None] * state.world_size
    with runtime.collective("gathering bench results"):
        dist.all_gather_object(ranks, mine, group=state.cpu_group)
    n = state.tp_size
    nbytes = tokens * cfg.model.hidden_size * torch.empty((), dtype=cfg.model.torch_dtype).element_size()
    res: dict[str, Any] = {"model": cfg.model.name, "tokens": tokens, "tp_size": n, "kernel": cfg.kernel.resolved,
                           "quant": cfg.quant.name, "dtype": cfg.model.dtype,
                           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for k in ("compute_ms", "allreduce_ms", "total_ms", "single_rank_ms"):
        res[k] = max(r[k] for r in ranks)
    res["allreduce_bytes"] = nbytes
    t = res["allreduce_ms"] / 1e3
    res["allreduce_busbw_GBps"] = 2 * (n - 1) / n * nbytes / t / 1e9 if t > 0 else None
    res["speedup_vs_single"] = res["single_rank_ms"] / res["total_ms"] if res["total_ms"] > 0 else None
    res["rel_err_vs_single"] = max(r["rel_err_vs_single"] for r in ranks)
    res["ranks"] = ranks
    return res


COLUMNS = ("tokens", "compute_ms", "allreduce_ms", "total_ms", "single_rank_ms", "speedup_vs_single",
           "allreduce_bytes", "allreduce_busbw_GBps", "rel_err_vs_single")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (for docs/performance.md)."""
    def cell(c: str, v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.1e}" if c == "rel_err_vs_single" else f"{v:.3f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |",
             "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def bench_task(cfg: ComposerConfig, ctx: Any) -> dict[str, Any]:
    """``task=bench`` under tensor parallelism: the rows for ``task.tokens`` (default 16, 1024)."""
    tokens = getattr(cfg.task.params, "tokens", None) or [16, 1024]
    tokens = [tokens] if isinstance(tokens, int) else list(tokens)
    iters = getattr(cfg.task.params, "iters", 20)
    warmup = getattr(cfg.task.params, "warmup", 3)
    from ..factory import build
    from .tp_check import single_rank_config

    from .bench import write_rows

    model, ref = build(cfg), build(single_rank_config(cfg))
    rows = [bench_tp(cfg, tokens=t, iters=iters, warmup=warmup, model=model, ref=ref) for t in tokens]
    ctx.console.print(markdown(rows))
    head = (f"tensor-parallel experts: {cfg.model.name}, tp_size={cfg.parallel.tp_size}, kernel={cfg.kernel.resolved}, "
            f"{cfg.model.dtype}, {rows[0]['device'] if rows else ''}\n\n")
    write_rows(ctx, cfg.task.params, rows, head + markdown(rows))
    return {"tp_bench": rows}


def main(argv: list[str] | None = None) -> int:
    from ..api import load_config

    ap = argparse.ArgumentParser(prog="python -m composer.distributed.tp_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="16,1024", help="comma-separated token counts")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here, and a .md table beside (rank 0)")
    ap.add_argument("overrides", nargs="*", help="composer overrides, e.g. model=mixtral_8x7b parallel.tp_size=2")
    a = ap.parse_args(argv)
    cfg = load_config(None, a.overrides)
    from ..errors import ConfigError, Problem

    if cfg.parallel.tp_size < 2 or cfg.parallel.ep_size > 1:
        raise ConfigError([Problem("parallel.tp_size", cfg.parallel.tp_size, "tp_bench times tensor parallelism: set "
                                   "parallel.tp_size to the number of ranks, with parallel.ep_size=1 (expert "
                                   "parallelism: python -m composer.distributed.bench)")])
    if cfg.parallel.sequence_parallel:  # (found before both models are built)
        raise ConfigError([Problem("parallel.sequence_parallel", True, "tp_bench times the all-reduce mode; run it with "
                                   "parallel.sequence_parallel=false (task=check checks sequence parallelism)")])
    state = runtime.init_from_env(cfg)
    rows = []
    try:
        from ..factory import build
        from .tp_check import single_rank_config

        model, ref = build(cfg), build(single_rank_config(cfg))
        for t in (int(s) for s in a.tokens.split(",") if s):
            rows.append(bench_tp(cfg, tokens=t, iters=a.iters, warmup=a.warmup, model=model, ref=ref))
    except BaseException:
        runtime.abort(state)
        raise
    if state.rank == 0:
        head = (f"tensor-parallel experts: {cfg.model.name}, tp_size={state.tp_size}, kernel={cfg.kernel.resolved}, "
                f"{cfg.model.dtype}, {rows[0]['device'] if rows else ''}\n\n")
        print(head + markdown(rows), flush=True)
        if a.out is not None:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(rows, indent=2) + "\n")
            a.out.with_suffix(".md").write_text(head + markdown(rows))
    runtime.teardown(state)
    return 0


if __name__ == "__main__":
    sys.exit(runtime.run_script(main))
