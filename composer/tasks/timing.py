"""The bench's timers: CUDA-event medians, and CUDA-graph times of short calls as a model's decode step sees them.

A model replays one graph for a whole step, and between two calls of one MoE layer its other layers read their
own weights. Timing one graph replay per CUDA-event pair instead measures, for a call of 10-30 us, mostly the
host launching the replay (on an H200, qwen3_30b_a3b T = 1 bf16: 30-38 us per replay against 26.7 us per call
inside one graph), and back-to-back calls of one layer find its weights still in L2 (the int4 call: 12.9 us
warm against 17.1 us with the weights rotated through four copies; docs/performance.md, tenth session).

So a ``CallGraph`` captures several calls in one graph and, with an ``L2Flush``, reads a buffer twice the L2's
size before each call; the same graph of flushes alone is timed too and subtracted.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Warm-up by time as well as by count: five replays of a 150 us decode are under a millisecond, and with them the
# first graph a quant bench timed after its eager phase read 12-15% slow on an H100 (the cause is not pinned
# down; docs/performance.md, fourth session)
WARMUP_S = 0.05
# a timed graph holds calls worth at least this many ms (at most BenchParams.graph_calls calls): the host's
# launch of the replay is then a few percent of it at most
GRAPH_MIN_MS = 1.0


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int, min_iters: int = 3,
            budget_s: float = 0.5, warmup_s: float | None = None, before: Callable[[], Any] | None = None) -> float:
    """Median milliseconds of ``fn()``: CUDA events on GPU, perf_counter on CPU; ``warmup`` calls and at least
    ``warmup_s`` seconds (default WARMUP_S) of calls before timing. ``before`` (an ``L2Flush``, or a fresh decode
    cache) runs ahead of every call, warm-up included, outside the timed events; the number of timed calls comes
    from the time of both, so ``budget_s`` holds."""
    def call() -> None:
        if before is not None:
            before()
        fn()

    for _ in range(max(1, warmup)):
        call()
    sync(device)
    t_end = time.perf_counter() + (WARMUP_S if warmup_s is None else warmup_s)
    while time.perf_counter() < t_end:
        call()
        sync(device)
    t0 = time.perf_counter()
    call()
    sync(device)
    est = max(time.perf_counter() - t0, 1e-6)
    n = int(min(iters, max(min_iters, budget_s / est)))
    times = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            if before is not None:
                before()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(n):
            if before is not None:
                before()
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def capture_graph(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm ``fn`` on a side stream, then capture one call into a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 size (torch's device properties; 50 MiB, an H100's, where this torch does not say)."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 << 20)


class L2Flush:
    """Reads a buffer twice the L2's size (a max-reduction): what a call finds in L2 afterwards is this buffer, not
    its own weights. Reading rather than writing (Triton's do_bench zeroes one) leaves no dirty lines for the next
    call to write back."""

    def __init__(self, device: torch.device):
        self.nbytes = 2 * l2_bytes(device)
        self.buf = torch.ones(self.nbytes // 4, dtype=torch.float32, device=device)

    def __call__(self) -> torch.Tensor:
        return self.buf.amax()


def graph_calls_for(est_ms: float, most: int) -> int:
    """Calls per timed graph: enough for GRAPH_MIN_MS of work, at most ``most``, at least 1."""
    return max(1, min(most, math.ceil(GRAPH_MIN_MS / max(est_ms, 1e-6))))


def capture_calls(fn: Callable[[], Any] | None, calls: int, flush: L2Flush | None) -> torch.cuda.CUDAGraph:
    """One CUDA graph of ``calls`` calls of ``fn``, each after an L2 flush where ``flush`` is given (``fn`` None: the
    flushes alone, the time to subtract)."""
    def body() -> None:
        for _ in range(calls):
            if flush is not None:
                flush()
            if fn is not None:
                fn()

    return capture_graph(body)[0]


class CallGraph:
    """``fn`` as task=bench times a graph: as many calls as make GRAPH_MIN_MS (at most ``most``; one call's time
    estimated from three replays of a graph of it) captured in one CUDA graph, each after ``flush`` where given.
    ``ms()`` is the time per call, with the same graph of the flushes alone subtracted."""

    def __init__(self, fn: Callable[[], Any], device: torch.device, most: int, flush: L2Flush | None):
        self.device = device
        single = capture_graph(fn)[0]
        self.calls = graph_calls_for(time_fn(single.replay, device, 1, 3, 3, 0.0, warmup_s=0.0), most)
        del single
        self.graph = capture_calls(fn, self.calls, flush)
        self.flushes = capture_calls(None, self.calls, flush) if flush is not None else None

    def ms(self, iters: int = 200, min_iters: int = 20, budget_s: float = 0.3, warmup: int = 3) -> float:
        """Milliseconds per call: the median replay (CUDA events) less that of the flushes, over the calls."""
        total = time_fn(self.graph.replay, self.device, warmup, iters, min_iters, budget_s)
        if self.flushes is not None:
            total -= time_fn(self.flushes.replay, self.device, warmup, iters, min_iters, budget_s)
        return total / self.calls
