"""``torch.use_deterministic_algorithms(True)`` and the Triton experts: no atomic fp32 sums, the same bits every call.

Atomic adds (GEMM2's top-k reduction, a GEMV GEMM2's split-K programs) sum in whatever order they land, so on a
GPU two calls can differ in the last bits. Under the flag the experts write one row per pair and ``moe_sum`` adds
them in top-k order (``reduce: "buffer"``). The interpreter runs programs one after another, so on a CPU the tests
check which path runs and that it gives the buffer path's bits; the GPU test checks repeated calls bit for bit.
With the flag, torch also fills every ``torch.empty`` with NaN, so a kernel that read memory it never wrote would
show here too."""
from __future__ import annotations

import pytest
import torch

from composer.kernels.reference import oracle_experts
from composer.kernels.triton import fused
from composer.kernels.triton.configs import heuristic_config
from composer.kernels.triton.fused import fused_experts, fused_experts_quant

from .test_triton_experts import interpreter, make_case, rel
from .test_triton_gemv import gemv_cfg
from .test_triton_quant import quantize

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
gpu = pytest.mark.gpu


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test, then the previous setting back."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn)


@pytest.fixture
def paths(monkeypatch):
    """Records each GEMV launch's reduction (gated GEMM1 / GEMM2 atomic or not) and each moe_sum launch."""
    seen = {"gemv": [], "moe_sum": 0}
    real_gemv, real_sum = fused.gemv, fused.moe_sum

    def gemv(*a, **kw):
        seen["gemv"].append("gemm1" if kw["gated"] else ("atomic" if kw.get("atomic", True) else "rows"))
        return real_gemv(*a, **kw)

    def moe_sum(*a, **kw):
        seen["moe_sum"] += 1
        return real_sum(*a, **kw)

    monkeypatch.setattr(fused, "gemv", gemv)
    monkeypatch.setattr(fused, "moe_sum", moe_sum)
    return seen


def _configs(T, E, I, H, k):
    return {"gemv split 2": gemv_cfg(8, 16, 8, 16, 2), "tl.dot": {**heuristic_config(T, E, I, H, k), "reduce": "atomic"}}


@pytest.mark.parametrize("path", ["gemv split 2", "tl.dot"])
def test_deterministic_mode_sums_rows_in_top_k_order(path, deterministic, paths):
    """Under the flag an atomic config runs as reduce "buffer": GEMM2 writes rows (no split-K), moe_sum adds them;
    the output is the buffer path's, bit for bit, and matches the float64 oracle."""
    T, E, k, H, I = (1, 5, 3, 48, 32) if path.startswith("gemv") else (6, 5, 3, 48, 32)
    x, tw, ids, w13, w2, b13, b2 = make_case(T, E, k, H, I, torch.float32, True, 0.2, seed=11)
    cfg = _configs(T, E, I, H, k)[path]
    with interpreter():
        out = fused_experts(x, tw, ids, w13, w2, b13, b2, "silu", config=cfg)
        torch.use_deterministic_algorithms(False)
        buffered = fused_experts(x, tw, ids, w13, w2, b13, b2, "silu", config={**cfg, "reduce": "buffer"})
    assert paths["moe_sum"] == 2
    if path.startswith("gemv"):
        assert paths["gemv"] == ["gemm1", "rows", "gemm1", "rows"]
    assert torch.equal(out, buffered)
    assert rel(out, oracle_experts(x, tw, ids, w13, w2, "silu", b13, b2)) < 1e-5


def test_without_the_flag_the_config_is_kept(paths):
    """The switch follows torch's flag: without it an atomic GEMV config adds atomically and no moe_sum runs."""
    assert not torch.are_deterministic_algorithms_enabled()
    x, tw, ids, w13, w2, _, _ = make_case(1, 4, 2, 32, 16, torch.float32, False, 0.0, seed=3)
    with interpreter():
        fused_experts(x, tw, ids, w13, w2, None, None, "silu", config=gemv_cfg(8, 16, 8, 16, 2))
    assert paths["gemv"] == ["gemm1", "atomic"] and paths["moe_sum"] == 0


def test_deterministic_mode_quantized_gemv(deterministic, paths):
    """int4 w4a16 on the GEMV decode under the flag: rows and moe_sum, equal to reduce "buffer" and to kernel=torch."""
    from composer.kernels.torch_backend import TorchExperts

    x, tw, ids, w13, w2, _, _ = make_case(1, 4, 2, 64, 32, torch.float16, False, 0.0, seed=5)
    w = quantize("int4_w4a16", w13, w2, group_size=32)
    cfg = {**gemv_cfg(8, 32, 8, 32, 2), "gemm1": {**gemv_cfg()["gemm1"], "int4_read": "subnormal"}}

    def run(c):
        return fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", "int4_w4a16", w.w13_scale,
                                   w.w2_scale, config=c)

    with interpreter():
        out = run(cfg)
        torch.use_deterministic_algorithms(False)
        buffered = run({**cfg, "reduce": "buffer"})
    assert paths["gemv"][:2] == ["gemm1", "rows"] and paths["moe_sum"] == 2
    assert torch.equal(out, buffered)
    assert rel(out, TorchExperts().apply(x, tw, ids, w, "silu").double()) < 2e-3


@gpu
@cuda
@pytest.mark.parametrize("T, split", [(1, 4), (64, 1)])
def test_gpu_deterministic_mode_repeats_every_bit(T, split, deterministic):
    """On the GPU, under the flag, five calls give the same bits: the GEMV decode with an atomic split-4 GEMM2 config
    (whose atomic sums differ between runs without the flag) and the tl.dot path at T = 64, bf16."""
    x, tw, ids, w13, w2, b13, b2 = make_case(T, 16, 4, 1024, 384, torch.bfloat16, True, 0.0, seed=T,
                                             device="cuda")
    cfg = gemv_cfg(16, 128, 32, 128, split) if T == 1 else None
    outs = [fused_experts(x, tw, ids, w13, w2, b13, b2, "silu", config=cfg) for _ in range(5)]
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    torch.use_deterministic_algorithms(False)  # (the oracle's float64 matmuls on cuBLAS want the flag off)
    assert rel(outs[0], oracle_experts(x, tw, ids, w13, w2, "silu", b13, b2)) < 1e-2
