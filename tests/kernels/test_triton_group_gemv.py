"""int4 GEMVs over expert-sorted blocks (``"fma": true``, composer/kernels/triton/group_gemv.py) vs kernel=torch
under the interpreter in fp32 / fp16 (T = 0, 1 and more, top_k = E, ragged tiles, zero points, bias, dropped
pairs, every activation, blocks of 1-8 pairs, GEMM2 split over K, both reductions), the config rules and the
refusals; the three benchmark shapes on the GPU."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from composer.kernels.torch_backend import TorchExperts  # noqa: E402
from composer.kernels.triton import fused  # noqa: E402
from composer.kernels.triton.configs import validate_entry  # noqa: E402
from composer.kernels.triton.fused import fused_experts, fused_experts_quant  # noqa: E402

from .test_triton_experts import interpreter, make_case, rel  # noqa: E402
from .test_triton_quant import TOL, quantize  # noqa: E402

gpu = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fma_cfg(bm=4, bn1=8, bk1=32, bn2=16, bk2=32, split=1, reduce="atomic", unroll=1, warps=4) -> dict:
    return validate_entry({"BLOCK_M": bm, "decode": False, "reduce": reduce,
                           "gemm1": {"BLOCK_N": bn1, "BLOCK_K": bk1, "num_warps": warps, "num_stages": 2,
                                     "fma": True, "unroll": unroll},
                           "gemm2": {"BLOCK_N": bn2, "BLOCK_K": bk2, "num_warps": warps, "num_stages": 2,
                                     "fma": True, "SPLIT_K": split}})


@pytest.fixture
def fma_calls(monkeypatch):
    """Counts the group GEMV launches (gated or not), so a test knows the fma path ran."""
    calls = []
    real = fused.group_gemv

    def counted(*a, **kw):
        calls.append(kw["gated"])
        return real(*a, **kw)

    monkeypatch.setattr(fused, "group_gemv", counted)
    return calls


def run(x, tw, ids, w, act, cfg):
    return fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, act, "int4_w4a16", w.w13_scale,
                               w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=cfg)


# T, E, k, H, I, group, zero point, bias, drop, act, cfg
CASES = [
    (5, 4, 2, 64, 32, 32, False, False, 0.0, "silu", fma_cfg(4, 8, 32, 16, 32, 2)),
    (9, 5, 3, 96, 48, 16, True, True, 0.2, "gelu", fma_cfg(2, 4, 16, 8, 16, 1, "buffer")),  # groups of 16 in tiles of 16
    (1, 3, 3, 64, 40, 8, False, True, 0.0, "swigluoai", fma_cfg(8, 16, 64, 8, 32, 3)),  # T = 1, top_k = E, ragged N
    (7, 4, 4, 48, 24, -1, True, False, 0.3, "silu", fma_cfg(1, 8, 32, 16, 32, 3, unroll=2)),  # one group per row
    (12, 6, 2, 80, 56, 8, False, True, 0.1, "silu", fma_cfg(4, 16, 32, 32, 64, 2, warps=2)),  # K = 80, 56: ragged
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}E{c[1]}k{c[2]}H{c[3]}I{c[4]}g{c[5]}bm{c[10]['BLOCK_M']}")
def test_interpreter_fma_vs_torch(case, dtype, fma_calls):
    T, E, k, H, I, group, zp, bias, drop, act, cfg = case
    x, tw, ids, w13, w2, b13, b2 = make_case(T, E, k, H, I, dtype, bias, drop, seed=T * 31 + H)
    w = quantize("int4_w4a16", w13, w2, b13, b2, group_size=group, zero_point=zp)
    ref = TorchExperts().apply(x, tw, ids, w, act).double()
    with interpreter():
        out = run(x, tw, ids, w, act, cfg)
    assert fma_calls == [True, False]
    assert out.dtype == dtype and out.shape == x.shape
    assert rel(out, ref) < TOL[dtype], rel(out, ref)


def test_interpreter_fma_mixes_with_tl_dot_and_handles_t0(fma_calls):
    """One GEMM fma, the other tl.dot (BLOCK_M 16: the dot needs it), both orders; T = 0 returns zeros."""
    x, tw, ids, w13, w2, _, _ = make_case(6, 4, 2, 64, 32, torch.float32, False, 0.0, seed=3)
    w = quantize("int4_w4a16", w13, w2, group_size=32)
    ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
    dot = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    with interpreter():
        for g1, g2, seen in (({**dot, "fma": True}, dot, [True]), (dot, {**dot, "fma": True}, [False])):
            fma_calls.clear()
            cfg = validate_entry({"BLOCK_M": 16, "decode": False, "reduce": "atomic", "gemm1": g1, "gemm2": g2})
            assert rel(run(x, tw, ids, w, "silu", cfg), ref) < TOL[torch.float32]
            assert fma_calls == seen
        out = run(x[:0], tw[:0], ids[:0], w, "silu", fma_cfg())
    assert out.shape == (0, 64)


def test_fma_config_rules_and_refusals():
    with pytest.raises(ValueError, match="BLOCK_M must be a power of two >= 16 \\(>= 1 when both GEMMs"):
        validate_entry({**fma_cfg(4), "gemm2": {"BLOCK_N": 16, "BLOCK_K": 32}})  # one GEMM tl.dot: 16 rows at least
    with pytest.raises(ValueError, match="gemm1.fma must be true or false, and true only with decode false"):
        validate_entry({**fma_cfg(16), "decode": "gemv"})
    with pytest.raises(ValueError, match="gemm1.SPLIT_K must be an integer >= 1, and > 1 only"):
        validate_entry({**fma_cfg(), "gemm1": {**fma_cfg()["gemm1"], "SPLIT_K": 2}})
    x, tw, ids, w13, w2, _, _ = make_case(3, 4, 2, 64, 32, torch.float32, False, 0.0, seed=1)
    with pytest.raises(ValueError, match='"fma": true \\(int4 GEMVs over expert-sorted blocks\\) applies to int4'):
        fused_experts(x, tw, ids, w13, w2, config=fma_cfg(16))
    w8 = quantize("int8_w8a16", w13, w2)
    with pytest.raises(ValueError, match="applies to int4_w4a16 weights, not int8_w8a16"):
        fused_experts_quant(x, tw, ids, w8.w13, w8.w2, None, None, "silu", "int8_w8a16", w8.w13_scale, w8.w2_scale,
                            config=fma_cfg(16))
    w4 = quantize("int4_w4a16", w13, w2, group_size=32)
    with interpreter(), pytest.raises(ValueError, match="SPLIT_K > 1 is for GEMM2 with reduce 'atomic'"):
        run(x, tw, ids, w4, "silu", fma_cfg(split=2, reduce="buffer"))
    w4g = quantize("int4_w4a16", w13, w2, group_size=4)  # groups of 4: a 32-bit word would straddle two
    with interpreter(), pytest.raises(ValueError, match="group size \\(= 4\\) to be multiples of 8"):
        run(x, tw, ids, w4g, "silu", fma_cfg())


SHAPES = {"mixtral_8x7b": (8, 2, 4096, 14336), "qwen3_30b_a3b": (128, 8, 2048, 768), "deepseek_v3": (64, 8, 7168, 2048)}


@gpu
@cuda
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_fma_three_shapes(shape, fma_calls):
    """bf16 at the benchmark shapes (deepseek_v3 with 64 experts), T = 1, 8, 48, blocks of 2 and 4 pairs, with and
    without zero points, vs kernel=torch."""
    E, k, H, I = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * I ** -0.5).to(torch.bfloat16)
    for zp in (False, True):
        w = quantize("int4_w4a16", w13, w2, group_size=128, zero_point=zp)
        for T, cfg in ((1, fma_cfg(2, 16, 128, 32, 128, 4)), (8, fma_cfg(2, 32, 128, 64, 128, 2)),
                       (48, fma_cfg(4, 16, 64, 32, 128, 1, "buffer"))):
            x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
            tw, ids = torch.topk(torch.randn(T, E, device="cuda", generator=g).softmax(-1), k, dim=-1)
            ids = ids.to(torch.int32)
            ref = TorchExperts().apply(x, tw.float(), ids, w, "silu").double()
            err = rel(run(x, tw.float(), ids, w, "silu", cfg), ref)
            print(f"[fma-gpu] {shape} zp={zp} T={T} BLOCK_M={cfg['BLOCK_M']}: rel err vs kernel=torch {err:.2e}")
            assert err < 1e-2, (shape, zp, T, err)
        del w
        torch.cuda.empty_cache()
    assert fma_calls and set(fma_calls) == {True, False}
