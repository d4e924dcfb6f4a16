"""Pieces the run and check tasks share: seeded inputs, the comparison, the table."""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from rich.table import Table

from ..checking import capture_experts, oracle_layer, oracle_model, rel_error
from ..config import ComposerConfig
from ..factory import _generator


def make_tokens(cfg: ComposerConfig, tokens: int) -> torch.Tensor:
    gen = _generator(cfg.seed, "tokens", tokens, *_rank_key())
    x = torch.randn(tokens, cfg.model.hidden_size, generator=gen)
    return x.to(device=cfg.device, dtype=cfg.model.torch_dtype)


def _rank_key() -> tuple[int, ...]:
    """Expert parallelism: ranks > 0 draw their own tokens (rank 0 draws the single-rank ones).
    Tensor parallelism: every rank holds a slice of the same experts, so all ranks draw the same tokens."""
    from ..distributed.runtime import current

    state = current()
    if state is not None and getattr(state, "tp_size", 1) > 1 and not getattr(state, "sequence_parallel", False):
        return ()  # (sequence parallelism: each rank holds its own tokens, as under expert parallelism)
    return (state.rank,) if state is not None and state.rank > 0 else ()


def checksum(t: torch.Tensor) -> str:
    """Short content hash of a tensor: equal outputs give equal checksums."""
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:10]


def compare(model: torch.nn.Module, x: torch.Tensor, cfg: ComposerConfig) -> dict[str, Any]:
    """Run once, compare every FusedMoE and the whole output with the float64 oracle."""
    from ..distributed.check import compare_ep, is_expert_parallel

    if is_expert_parallel(model):  # also vs the single-rank model from the same seed (composer.distributed.check)
        return compare_ep(model, x, cfg)
    from ..distributed.tp import is_tensor_parallel

    if is_tensor_parallel(model):  # vs the single-rank model from the same seed (composer.distributed.tp_check)
        from ..distributed.tp_check import compare_tp

        return compare_tp(model, x, cfg)
    out, caps = capture_experts(model, x)
    result = oracle_metrics(model, x, out, caps)
    from ..quant.checking import compare_unquantized, wants_unquantized

    if wants_unquantized(cfg):  # also vs the unquantized float64 oracle
        compare_unquantized(result, x, caps, out, cfg)
    return result


def oracle_metrics(model: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, caps: dict[str, Any]) -> dict[str, Any]:
    """Errors of one recorded forward (its output and each FusedMoE's captured inputs, routing, output)
    against the float64 oracle replaying that forward's expert choice."""
    result: dict[str, Any] = {"output_checksum": checksum(out), "layers": {}}
    for name, cap in caps.items():
        layer = model.get_submodule(name)
        result["layers"][name] = {"experts_rel_err": rel_error(cap.out, oracle_layer(layer, cap))}
    if hasattr(model, "layers") and all(f"layers.{i}.mlp.experts" in caps for i in range(len(model.layers))):
        ref, stats = oracle_model(model, x, caps)
        result["output_rel_err"] = rel_error(out, ref)
        for i, s in enumerate(stats):
            result["layers"][f"layers.{i}.mlp.experts"].update(s)
    return result


def slot_table(title: str) -> Table:
    """The run / check table; its error column is ``rel_error``: ||got - oracle||_F / ||oracle||_F (no maximum)."""
    t = Table(title=title, title_justify="left")
    for col, kw in (("module", {}), ("registry name", {}), ("implementation", {}), ("params", {"justify": "right"}),
                    ("checksum", {}), ("rel. err vs oracle", {"justify": "right"}), ("time ms", {"justify": "right"})):
        t.add_column(col, **kw)
    return t


def make_runner(model: torch.nn.Module, cfg: ComposerConfig, x: torch.Tensor):
    """The forward as configured: eager, ``torch.compile(fullgraph=True)``, and/or a CUDA-graph replay.

    The CUDA graph is captured for ``x``'s shape; the returned callable copies its input into the
    captured buffer and replays.
    """
    fn = torch.compile(model, fullgraph=True) if cfg.compile else model
    if not cfg.cuda_graph:
        return fn
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # warm up (and compile) outside the capture
            fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = fn(static_x)

    def replay(inp: torch.Tensor) -> torch.Tensor:
        static_x.copy_(inp)
        graph.replay()
        return static_out

    return replay


def time_runner(runner, x: torch.Tensor, warmup: int, iters: int) -> list[float]:
    import time

    out = []
    with torch.no_grad():
        for i in range(warmup + iters):
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                out.append(time.perf_counter() - t0)
    return out
