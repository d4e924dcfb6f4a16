"""The bench's timers (composer/tasks/timing.py)."""
from __future__ import annotations

import time

import pytest
import torch

from composer.tasks.bench import BenchParams, timer_text
from composer.tasks import timing
from composer.tasks.timing import CallGraph, graph_calls_for, time_fn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_graph_calls_cover_a_millisecond_within_the_cap():
    assert graph_calls_for(0.017, 20) == 20  # a qwen3 decode call: capped
    assert graph_calls_for(0.3, 20) == 4
    assert graph_calls_for(0.25, 20) == 4
    assert graph_calls_for(5.0, 20) == 1  # a long call: one per graph
    assert graph_calls_for(0.0, 7) == 7
    assert graph_calls_for(0.001, 1) == 1


def test_time_fn_runs_before_ahead_of_every_call_outside_the_timing():
    """``before`` (the L2 flush, a fresh decode cache) precedes every call, warm-up included (a decode step warmed
    up on a cache that grew with each call), and is not counted (CPU: perf_counter)."""
    log = []
    ms = time_fn(lambda: log.append("fn"), torch.device("cpu"), warmup=1, iters=6, min_iters=6, budget_s=1e-3,
                 warmup_s=0.0, before=lambda: (log.append("before"), time.sleep(0.02)))
    assert log == ["before", "fn"] * (1 + 1 + 6)  # warm-up, the estimate, the timed calls
    assert ms < 10.0  # the 20 ms sleeps are outside


def test_time_fn_budget_counts_what_before_costs():
    """The number of timed calls came from fn's time alone, so a slow ``before`` (a prefill ahead of each decode
    step) overran budget_s in proportion."""
    calls = []
    time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=1, iters=1000, min_iters=2, budget_s=0.1,
            warmup_s=0.0, before=lambda: time.sleep(0.02))
    assert len(calls) - 2 <= 6  # 0.1 s / ~0.02 s per call (was 1000)


def test_bench_params_and_timer_line():
    p = BenchParams()
    assert p.graph_calls == 20 and p.l2_cold
    assert timer_text(p, True) == ("CUDA events, median; graph: per call in a graph of up to 20 calls; "
                                   "L2 flushed before every call (not timed)")
    assert timer_text(BenchParams(l2_cold=False, cuda_graph=False), True) == "CUDA events, median"
    assert timer_text(p, False) == "perf_counter, median"
    with pytest.raises(ValueError, match="graph_calls"):
        BenchParams(graph_calls=0)


def test_call_graph_counts_its_calls_and_subtracts_the_flushes(monkeypatch):
    """CallGraph's arithmetic, with a graph that replays its body and a timer that charges 0.5 ms per call and 2 ms
    per flush: one call's 0.5 ms asks for 2 calls per graph (GRAPH_MIN_MS = 1), and the time per call leaves the
    flushes out."""
    class Replayed:
        def __init__(self, body):
            self.replay = body

    ran = []

    def charged(fn, device, *args, **kwargs):
        ran.clear()
        fn()
        return 0.5 * ran.count("call") + 2.0 * ran.count("flush")

    monkeypatch.setattr(timing, "capture_graph", lambda body: (Replayed(body), None))
    monkeypatch.setattr(timing, "time_fn", charged)
    assert timing.GRAPH_MIN_MS == 1.0
    for flush in (lambda: ran.append("flush"), None):
        timed = CallGraph(lambda: ran.append("call"), torch.device("cpu"), 20, flush)
        assert timed.calls == 2 and (timed.flushes is None) == (flush is None)
        assert timed.ms() == 0.5
    assert CallGraph(lambda: ran.append("call"), torch.device("cpu"), 1, None).calls == 1  # capped


@pytest.mark.gpu
@cuda
def test_gpu_graph_of_calls_runs_each_call_after_its_flush():
    """capture_calls puts ``calls`` calls in one graph (a replay adds them all up), the flush-only graph runs none,
    and a CallGraph gives a positive time per call with and without the flush."""
    from composer.tasks.timing import L2Flush, capture_calls

    dev = torch.device("cuda")
    flush = L2Flush(dev)
    assert flush.nbytes >= 2 * (1 << 20)
    acc = torch.zeros(1024, device=dev)
    step = torch.rand(1024, device=dev) + 0.5

    def fn():
        acc.add_(step)

    g = capture_calls(fn, 5, flush)
    acc.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.allclose(acc, 5 * step)
    gf = capture_calls(None, 5, flush)
    gf.replay()
    torch.cuda.synchronize()
    assert torch.allclose(acc, 5 * step)
    for f in (flush, None):
        assert CallGraph(fn, dev, 5, f).ms(20, 5, 0.01) > 0
