"""Expert-parallel all2all benchmark: dispatch (prepare), compute (experts kernel) and combine (finalize)
times, bytes moved per rank and achieved bus bandwidth, beside the single-rank experts time.

Usable on CPU (gloo) and GPU (NCCL). Each measured iteration starts with a barrier so that the phases
time the communication rather than the skew between ranks; each phase is closed by a device
synchronization. Reported times are medians over iterations, then the maximum over ranks (a step is as
slow as its slowest rank). Bytes follow nccl-tests' bus-bandwidth convention: the bytes a rank moves to
or from *other* ranks in that phase (broadcast/all-gather: received rows; all-to-all: rows sent to other
ranks; reduce-scatter: (n-1)/n of the buffer; all-reduce: 2(n-1)/n of it). Bus bandwidth = bytes / time.

From torchrun (``--tokens`` takes a comma-separated list; overrides are composer's)::

    torchrun --nproc-per-node 2 -m composer.distributed.bench --tokens 16,1024 --out bench.json \\
        model=qwen3_30b_a3b model.num_layers=1 all2all=all_to_all parallel.ep_size=2
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
from ..layers.fused_moe import FusedMoE
from . import runtime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_block(model: torch.nn.Module) -> Any:
    return model.layers[0]


@torch.no_grad()
def bench_all2all(cfg: ComposerConfig, *, tokens: int, iters: int = 20, warmup: int = 3,
                  model: torch.nn.Module | None = None, ref: torch.nn.Module | None = None) -> dict[str, Any]:
    """Time the first MoE layer's prepare / experts / finalize on ``tokens`` fresh random tokens per rank.

    Collective: every rank calls it with the same arguments, after ``runtime.init_from_env(cfg)``.
    Returns the same dict on every rank.
    """
    from ..factory import _generator, build
    from .check import single_rank_config

    state = runtime.current()
    if state is None or not state.distributed:
        raise runtime.DistributedError("bench_all2all needs an expert-parallel run: launch with torchrun and "
                                       "call composer.distributed.runtime.init_from_env(cfg) first")
    model = model if model is not None else build(cfg)
    ref = ref if ref is not None else build(single_rank_config(cfg), ep_rank=0, group=None)
    block = _first_block(model)
    layer: FusedMoE = block.mlp.experts
    ref_layer: FusedMoE = _first_block(ref).mlp.experts
    device = torch.device(cfg.device if cfg.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    gen = _generator(cfg.seed, "bench", tokens, state.rank)
    x = torch.randn(tokens, cfg.model.hidden_size, generator=gen).to(device=device, dtype=cfg.model.torch_dtype)
    h = block.norm(x)
    w, ids = block.mlp.router(block.mlp.gate(h))  # realistic routing, identical for every implementation

    kernel = layer.kernel
    pf, experts = kernel.prepare_finalize, kernel.experts
    weights = layer.quant_method.expert_weights(layer)
    ref_weights = ref_layer.quant_method.expert_weights(ref_layer)
    times: dict[str, list[float]] = {"dispatch": [], "compute": [], "combine": [], "single_rank": []}
    out = None
    for i in range(warmup + iters):
        dist.barrier(group=state.cpu_group)
        _sync(device)
        t0 = time.perf_counter()
        prepared = pf.prepare(h, w, ids)
        _sync(device)
        t1 = time.perf_counter()
        y = experts.apply(prepared.x, prepared.topk_weights, prepared.topk_ids, weights, layer.activation)
        _sync(device)
        t2 = time.perf_counter()
        out = pf.finalize(y, prepared)
        _sync(device)
        t3 = time.perf_counter()
        single = ref_layer.kernel.experts.apply(h, w, ids, ref_weights, ref_layer.activation)
        _sync(device)
        t4 = time.perf_counter()
        if i >= warmup:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key].append(dt)
    err = rel_error(out, single)
    stats = getattr(pf, "stats", {})
    mine = {
        "rank": state.rank, "tokens": tokens, "rel_err_vs_single": err,
        **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()},
        "dispatch_bytes": int(stats.get("dispatch_bytes", 0)), "combine_bytes": int(stats.get("combine_bytes", 0)),
        "pairs_received": int(prepared.topk_ids.ge(0).sum()),
    }
    ranks: list[Any] = [None] * state.world_size
    with runtime.collective("gathering bench results"):
        dist.all_gather_object(ranks, mine, group=state.cpu_group)
    res: dict[str, Any] = {"all2all": cfg.all2all.name, "model": cfg.model.name, "tokens_per_rank": tokens,
                           "ep_size": state.world_size, "kernel": cfg.kernel.resolved, "dtype": cfg.model.dtype,
                           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for k in ("dispatch_ms", "compute_ms", "combine_ms", "single_rank_ms"):
        res[k] = max(r[k] for r in ranks)
    res["ep_total_ms"] = res["dispatch_ms"] + res["compute_ms"] + res["combine_ms"]
    for phase in ("dispatch", "combine"):
        res[f"{phase}_bytes_per_rank"] = max(r[f"{phase}_bytes"] for r in ranks)
        t = res[f"{phase}_ms"] / 1e3
        res[f"{phase}_busbw_GBps"] = res[f"{phase}_bytes_per_rank"] / t / 1e9 if t > 0 else None
    res["bytes_per_rank"] = res["dispatch_bytes_per_rank"] + res["combine_bytes_per_rank"]
    res["rel_err_vs_single"] = max(r["rel_err_vs_single"] for r in ranks)
    res["ranks"] = ranks
    return res


COLUMNS = ("all2all", "tokens_per_rank", "dispatch_ms", "compute_ms", "combine_ms", "ep_total_ms", "single_rank_ms",
           "bytes_per_rank", "dispatch_busbw_GBps", "combine_busbw_GBps", "rel_err_vs_single")


def _cells(r: dict[str, Any]) -> list[str]:
    cells = []
    for c in COLUMNS:
        v = r.get(c)
        cells.append("" if v is None else f"{v:.3f}" if isinstance(v, float) and c.endswith(("ms", "GBps"))
                     else f"{v:.1e}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
    return cells


def table(rows: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in COLUMNS:
        t.add_column(c.replace("_", " "), justify="left" if c == "all2all" else "right")
    for r in rows:
        t.add_row(*_cells(r))
    return t


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    head = "| " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |"
    lines = [f"{title}\n", head, "|" + "---|" * len(COLUMNS)] + ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_rows(ctx: Any, params: Any, rows: list[dict[str, Any]], md: str) -> None:
    """Rank 0 writes task=bench's JSON and markdown files (task.json_file / task.markdown_file) into the run folder,
    as the single-rank bench does."""
    import json

    state = runtime.current()
    if state is not None and state.rank != 0:
        return
    run_dir = Path(ctx.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / params.json_file).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    (run_dir / params.markdown_file).write_text(md)
    ctx.console.print(f"wrote {run_dir / params.json_file} and {run_dir / params.markdown_file}")


def bench_task(cfg: ComposerConfig, ctx: Any) -> dict[str, Any]:
    """``task=bench`` under expert parallelism (the CLI has started the runtime): one row per ``task.tokens``."""
    from ..factory import build
    from .check import single_rank_config

    p = cfg.task.params
    model, ref = build(cfg), build(single_rank_config(cfg), ep_rank=0, group=None)
    rows = [bench_all2all(cfg, tokens=t, iters=min(p.iters, 30), warmup=p.warmup, model=model, ref=ref) for t in p.tokens]
    title = f"all2all bench: {cfg.model.name}, ep_size={cfg.parallel.ep_size}, {rows[0]['device'] if rows else ''}"
    ctx.console.print(table(rows, title))
    write_rows(ctx, p, rows, markdown(rows, title))
    return {"ep_bench": rows}


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from ..api import load_config

    ap = argparse.ArgumentParser(prog="python -m composer.distributed.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="16,1024", help="comma-separated tokens per rank")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here (rank 0)")
    ap.add_argument("overrides", nargs="*", help="composer overrides, e.g. all2all=all_to_all parallel.ep_size=2")
    a = ap.parse_args(argv)
    cfg = load_config(None, a.overrides)
    if cfg.parallel.ep_size < 2 or cfg.parallel.tp_size > 1:  # (its reference would be sharded the same way: error 0)
        from ..errors import ConfigError, Problem

        raise ConfigError([Problem("parallel.ep_size", cfg.parallel.ep_size, "the all2all bench times expert "
                                   "parallelism: set parallel.ep_size to the number of ranks, with parallel.tp_size=1 "
                                   "(tensor parallelism: python -m composer.distributed.tp_bench)")])
    state = runtime.init_from_env(cfg)
    rows = []
    try:
        from ..factory import build
        from .check import single_rank_config

        model = build(cfg)
        ref = build(single_rank_config(cfg), ep_rank=0, group=None)
        for t in (int(s) for s in a.tokens.split(",") if s):
            rows.append(bench_all2all(cfg, tokens=t, iters=a.iters, warmup=a.warmup, model=model, ref=ref))
    except BaseException:
        runtime.abort(state)
        raise
    if state.rank == 0:
        Console(width=200).print(table(rows, f"all2all bench: {cfg.model.name}, ep_size={cfg.parallel.ep_size}, "
                                             f"{rows[0]['device'] if rows else ''}"))
        if a.out is not None:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(rows, indent=2) + "\n")
    runtime.teardown(state)
    return 0


if __name__ == "__main__":
    sys.exit(runtime.run_script(main))
