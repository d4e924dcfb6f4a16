"""The GEMV decode path (``"decode": "gemv"``, composer/kernels/triton/gemv.py) vs the float64 oracle and
kernel=torch: unquantized, int8 w8a16 / w8a8 and int4 (scale groups spanning, filling or splitting the K tile,
zero points) under the interpreter in fp32/fp16; every method at the three benchmark shapes on the GPU."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from composer.kernels.reference import oracle_experts  # noqa: E402
from composer.kernels.torch_backend import TorchExperts  # noqa: E402
import triton.language as tl  # noqa: E402

from composer.kernels.triton import fused  # noqa: E402
from composer.kernels.triton._jit import lazy_helper, lazy_jit  # noqa: E402
from composer.kernels.triton.configs import validate_entry  # noqa: E402
from composer.kernels.triton.fused import fused_experts, fused_experts_quant  # noqa: E402
from composer.kernels.triton.gemv import gemv_tile  # noqa: E402

from .test_triton_experts import interpreter, make_case, rel  # noqa: E402
from .test_triton_quant import ALL_VARIANTS, GPU_TOL, SHAPES, TOL, TOL_W8A8, quantize  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
gpu = pytest.mark.gpu


def gemv_cfg(bn1=8, bk1=32, bn2=8, bk2=32, split=2, reduce="atomic", warps=4, mma=False) -> dict:
    return validate_entry({"BLOCK_M": 16, "decode": "gemv", "reduce": reduce,
                           "gemm1": {"BLOCK_N": bn1, "BLOCK_K": bk1, "num_warps": warps, "num_stages": 2, "mma": mma},
                           "gemm2": {"BLOCK_N": bn2, "BLOCK_K": bk2, "num_warps": warps, "num_stages": 2,
                                     "SPLIT_K": split, "mma": mma}})


@pytest.fixture
def gemv_calls(monkeypatch):
    """Counts the GEMV launches, so a test knows the path under test ran (and not the tl.dot decode)."""
    calls = []
    real = fused.gemv

    def counted(*a, **kw):
        calls.append(kw["gated"])
        return real(*a, **kw)

    monkeypatch.setattr(fused, "gemv", counted)
    return calls


# T, E, k, H, I, dtype, act, bias, drop, cfg
PLAIN_CASES = [
    (1, 4, 2, 64, 32, torch.float32, "silu", True, 0.0, gemv_cfg()),
    (1, 3, 3, 48, 40, torch.float16, "gelu", False, 0.0, gemv_cfg(16, 64, 4, 16, 4)),  # top_k = E, ragged tiles
    (3, 5, 2, 52, 20, torch.float32, "swigluoai", True, 0.3, gemv_cfg(4, 16, 16, 64, 1, "buffer")),  # dropped pairs
    (2, 6, 4, 40, 24, torch.float16, "silu", True, 0.0, gemv_cfg(8, 16, 8, 16, 3)),  # split-K, K not multiple
]


@pytest.mark.parametrize("case", PLAIN_CASES, ids=lambda c: f"T{c[0]}E{c[1]}k{c[2]}H{c[3]}I{c[4]}{str(c[5])[6:]}{c[6]}")
def test_interpreter_plain_vs_oracle(case, gemv_calls):
    T, E, k, H, I, dtype, act, bias, drop, cfg = case
    x, tw, ids, w13, w2, b13, b2 = make_case(T, E, k, H, I, dtype, bias, drop, seed=H * 7 + I)
    with interpreter():
        out = fused_experts(x, tw, ids, w13, w2, b13, b2, act, config=cfg)
    assert gemv_calls == [True, False]
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel(out, oracle_experts(x, tw, ids, w13, w2, act, b13, b2)) < tol


def test_interpreter_t0_and_all_dropped():
    x, tw, ids, w13, w2, _, _ = make_case(0, 4, 2, 32, 16, torch.float32, False, 0.0, seed=0)
    with interpreter():
        assert fused_experts(x, tw, ids, w13, w2, config=gemv_cfg()).shape == (0, 32)
        x, tw, ids, w13, w2, _, _ = make_case(2, 4, 2, 32, 16, torch.float32, False, 0.0, seed=1)
        ids[:] = -1
        for reduce in ("atomic", "buffer"):
            out = fused_experts(x, tw, ids, w13, w2, config=gemv_cfg(reduce=reduce))
            assert torch.equal(out, torch.zeros_like(x))


QUANT_VARIANTS = [
    ("int8_w8a16", {}),
    ("int8_w8a8", {}),
    ("int4_w4a16", {"group_size": 16}),  # two groups per K tile of 32 (NG = 2)
    ("int4_w4a16", {"group_size": 16, "zero_point": True}),
    ("int4_w4a16", {"group_size": 32, "zero_point": True}),  # the tile is one group
    ("int4_w4a16", {"group_size": 48, "zero_point": True}),  # not a power of two: tiles of 16 inside a group
    ("int4_w4a16", {"group_size": -1}),  # one group per row
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("method,params", QUANT_VARIANTS, ids=lambda v: str(v))
def test_interpreter_quant_vs_torch(method, params, dtype, gemv_calls):
    I = 96 if params.get("group_size") in (32, 48) else 48  # I must hold whole groups
    T = 2 if I == 96 else 3
    _both_gemvs_vs_torch(make_case(T, 5, 2, 96, I, dtype, True, 0.2, seed=5), method, params, dtype, gemv_calls)


def _both_gemvs_vs_torch(case, method, params, dtype, gemv_calls):
    """The quantized GEMVs (atomic and buffer reductions) against kernel=torch on ``case`` (make_case's tuple)."""
    x, tw, ids, w13, w2, b13, b2 = case
    w = quantize(method, w13, w2, b13, b2, **params)
    ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
    tol = (TOL_W8A8 if method == "int8_w8a8" else TOL)[dtype]
    with interpreter():
        for cfg in (gemv_cfg(), gemv_cfg(16, 64, 4, 16, 1, "buffer")):
            out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", method, w.w13_scale,
                                      w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=cfg)
            assert torch.isfinite(out).all() and rel(out, ref) < tol, (cfg["reduce"], rel(out, ref))
    assert gemv_calls == [True, False, True, False]


@pytest.mark.parametrize("method,params,dtype", [
    ("int8_w8a16", {}, torch.float16), ("int8_w8a8", {}, torch.float32),
    ("int4_w4a16", {"group_size": 16, "zero_point": True}, torch.float16),
    ("int4_w4a16", {"group_size": 32}, torch.float32), ("int4_w4a16", {"group_size": -1}, torch.float16)],
    ids=lambda v: str(v).replace("torch.", ""))
def test_interpreter_quant_top_k_equals_num_experts(method, params, dtype, gemv_calls):
    """The quantized GEMVs with top_k = num_experts (every expert's weights read for the one token; the test above
    picks 2 of 5), both reductions, bias, vs kernel=torch."""
    case = make_case(1, 3, 3, 64, 32, dtype, True, 0.0, seed=9)
    assert sorted(case[2][0].tolist()) == [0, 1, 2]
    _both_gemvs_vs_torch(case, method, params, dtype, gemv_calls)


def test_interpreter_table_gemv_entry_at_small_t(tmp_path, monkeypatch, gemv_calls):
    """A method table keyed with a "gemv" entry at T = 4 (as the int4 tables now are, up to T = 8-64): T = 3 and 5
    run both GEMMs as GEMVs, one pair per program, and match kernel=torch; T = 12 takes the expert-sorted entry."""
    import json

    from composer.kernels.triton import configs as cfgs

    E, k, H, I = 5, 2, 96, 48
    gemv = gemv_cfg(16, 32, 8, 32, 2)
    sorted_ = {"BLOCK_M": 16, "decode": False, "reduce": "atomic",
               "gemm1": {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
               "gemm2": {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}}
    name = cfgs.config_file_name(E, I, H, cfgs.device_name("cpu"), "int4_w4a16")
    (tmp_path / name).write_text(json.dumps({"1": gemv, "4": gemv, "16": sorted_}))
    monkeypatch.setenv(cfgs.ENV_VAR, str(tmp_path))
    cfgs.clear_cache()
    try:
        for T, launches in ((3, [True, False]), (5, [True, False]), (12, [])):
            x, tw, ids, w13, w2, b13, b2 = make_case(T, E, k, H, I, torch.float16, True, 0.2, seed=T)
            w = quantize("int4_w4a16", w13, w2, b13, b2, group_size=16)
            ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
            gemv_calls.clear()
            with interpreter():
                out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", "int4_w4a16",
                                          w.w13_scale, w.w2_scale, None, None, w.w13_zero, w.w2_zero)
            assert gemv_calls == launches, T
            assert rel(out, ref) < TOL[torch.float16], (T, rel(out, ref))
    finally:
        cfgs.clear_cache()


@pytest.mark.parametrize("reduce", ["atomic", "buffer"])
def test_interpreter_gemv_out_of_range_ids_are_skipped(reduce, gemv_calls):
    """Expert ids outside [0, E) are skipped by both GEMVs (no weight read past the last expert) and by the
    fused epilogue's arrival count, like -1 and like the reference."""
    x, tw, ids, w13, w2, _, _ = make_case(1, 4, 3, 32, 16, torch.float32, False, 0.0, seed=3)
    ids[0, 1] = 4
    ids[0, 2] = 11
    ref = oracle_experts(x, tw, ids, w13, w2, "silu")
    with interpreter():
        out = fused_experts(x, tw, ids, w13, w2, None, None, "silu", config=gemv_cfg(reduce=reduce))
    assert gemv_calls == [True, False]
    assert torch.isfinite(out).all() and rel(out, ref) < TOL[torch.float32]


# method, params, dtype, int4 read, gemm1 SPLIT_K, activation: GEMM1 split over K leaves fp32 partial sums that GEMM2
# adds up, activates and rounds as it loads them (3 splits of K = 96 in tiles of 32; 2 of K = 72 unquantized: a
# ragged split)
SPLIT_CASES = [("none", {}, torch.float32, None, 2, "silu"), ("none", {}, torch.float16, None, 3, "swigluoai"),
               ("int8_w8a16", {}, torch.float16, None, 2, "gelu"),
               ("int4_w4a16", {"group_size": 32, "zero_point": True}, torch.float16, "subnormal", 3, "silu"),
               ("int4_w4a16", {"group_size": 16}, torch.float32, "planes", 2, "swigluoai"),
               ("int4_w4a16", {"group_size": 32}, torch.float16, "words", 2, "gelu"),
               ("int4_w4a16", {"group_size": 32, "zero_point": True}, torch.float16, "bytes", 3, "silu"),
               ("int8_w8a8", {}, torch.float32, None, 2, "silu"), ("int8_w8a8", {}, torch.float16, "mma", 3, "gelu")]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"{c[0]}-{c[3]}-{str(c[2])[6:]}-s{c[4]}-{c[5]}")
def test_interpreter_gemm1_split_k(case, gemv_calls):
    """gemm1.SPLIT_K > 1 against kernel=torch (dropped pairs, bias, both top-k reductions), and equal to the
    unsplit GEMM1 up to the order of its fp32 sums."""
    method, params, dtype, read, split, act = case
    H = 72 if split == 2 and method != "int4_w4a16" else 96
    x, tw, ids, w13, w2, b13, b2 = make_case(1, 5, 3, H, 64, dtype, True, 0.3, seed=split)
    if method == "none":
        ref = oracle_experts(x, tw, ids, w13, w2, act, b13, b2)
    else:
        w = quantize(method, w13, w2, b13, b2, **params)
        ref = TorchExperts().apply(x, tw, ids, w, act).double()
    outs = []
    with interpreter():
        for s, reduce in ((1, "atomic"), (split, "atomic"), (split, "buffer")):
            cfg = gemv_cfg(8, 32, 8, 32, 2, reduce)
            cfg["gemm1"]["SPLIT_K"] = s
            if read == "mma":  # (w8a8: GEMM2's products on tensor cores, its activations quantized in the kernel)
                cfg["gemm2"] = {**cfg["gemm2"], "mma": True, "BLOCK_N": 16}
            elif read:
                cfg["gemm1"]["int4_read"] = cfg["gemm2"]["int4_read"] = read
            if method == "none":
                outs.append(fused_experts(x, tw, ids, w13, w2, b13, b2, act, config=validate_entry(cfg)))
            else:
                outs.append(fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, act, method,
                                                w.w13_scale, w.w2_scale, None, None, w.w13_zero, w.w2_zero,
                                                config=validate_entry(cfg)))
    assert len(gemv_calls) == 6
    tol = (TOL_W8A8 if method == "int8_w8a8" else TOL)[dtype]
    for out in outs:
        assert torch.isfinite(out).all() and rel(out, ref) < tol
    for out in outs[1:]:  # (w8a8: a last-bit change of an activation may move its int8 rounding)
        assert rel(out, outs[0].double()) < (tol if method == "int8_w8a8" else 1e-5 if dtype == torch.float32 else 2e-3)


def test_gemm1_split_k_refuses_what_it_cannot_do():
    """A split GEMM1 needs fp32 partial sums of the right shape, and GEMM2 on tensor cores (mma) takes them only for
    w8a8 methods; the tile config allows SPLIT_K only in "gemv" entries."""
    from composer.kernels.triton.gemv import gemv

    x, tw, ids, w13, w2, _, _ = make_case(1, 4, 2, 64, 32, torch.float32, False, 0.0, seed=1)
    cfg = gemv_cfg(8, 32, 8, 32, 2)
    cfg["gemm1"]["SPLIT_K"] = 2
    with pytest.raises(ValueError, match=r"fp32 partial sums \[2, 2, 64\]"):
        gemv(x, w13, None, torch.empty(2, 64), ids.view(-1), 2, cfg["gemm1"], gated=True)
    cfg["gemm2"] = {**cfg["gemm2"], "mma": True, "BLOCK_N": 16}
    with pytest.raises(ValueError, match="only for w8a8 methods"):
        fused_experts(x, tw, ids, w13, w2, None, None, "silu", config=validate_entry(cfg))
    with pytest.raises(ValueError, match="gemm1.SPLIT_K must be an integer >= 1, and > 1 only with decode 'gemv'"):
        validate_entry({"BLOCK_M": 16, "decode": False, "gemm1": {**cfg["gemm1"], "SPLIT_K": 2},
                        "gemm2": {"BLOCK_N": 16, "BLOCK_K": 16}})


MMA_CASES = [  # method, dtype: the swapped-operand GEMV on tensor cores (mma: true)
    ("none", torch.float32), ("none", torch.float16), ("int8_w8a16", torch.float16), ("int8_w8a8", torch.float32),
    ("int8_w8a8", torch.float16),
]


@pytest.mark.parametrize("method,dtype", MMA_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_interpreter_mma_gemv(method, dtype, gemv_calls):
    """mma=true: weights as the MMA's A operand, the activation as a 16-column B with one live column; ragged
    N and K, bias, a dropped pair, split-K."""
    x, tw, ids, w13, w2, b13, b2 = make_case(2, 5, 2, 80, 40, dtype, True, 0.25, seed=13)
    cfg = gemv_cfg(8, 32, 16, 32, 2, mma=True)
    with interpreter():
        if method == "none":
            out = fused_experts(x, tw, ids, w13, w2, b13, b2, "silu", config=cfg)
            ref = oracle_experts(x, tw, ids, w13, w2, "silu", b13, b2)
            tol = 1e-5 if dtype == torch.float32 else 2e-3
        else:
            w = quantize(method, w13, w2, b13, b2)
            out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", method, w.w13_scale,
                                      w.w2_scale, config=cfg)
            ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
            tol = (TOL_W8A8 if method == "int8_w8a8" else TOL)[dtype]
    assert gemv_calls == [True, False]
    assert rel(out, ref) < tol


def test_mma_gemv_refuses_tiles_below_the_mma_shape():
    """A table entry with mma tiles the tensor core cannot take fails where it is read (validate_entry), before any
    launch; a config that skipped validation still fails in gemv() before its launch."""
    for bn1, bk, bn2, key, bn in ((4, 32, 16, "gemm1", 4), (8, 16, 16, "gemm1", 8), (8, 32, 8, "gemm2", 8)):
        with pytest.raises(ValueError, match=rf"{key}.mma needs at least 16 rows .* got BLOCK_N={bn}, BLOCK_K={bk}"):
            gemv_cfg(bn1, bk, bn2, bk, mma=True)
    x, tw, ids, w13, w2, _, _ = make_case(1, 4, 2, 64, 32, torch.float32, False, 0.0, seed=1)
    raw = {"BLOCK_M": 16, "decode": "gemv", "reduce": "atomic",
           "gemm1": {"BLOCK_N": 4, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "mma": True},
           "gemm2": {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "mma": True}}
    with interpreter(), pytest.raises(ValueError, match="mma=true needs at least 16 rows"):
        fused_experts(x, tw, ids, w13, w2, config=raw)


def test_interpreter_weights_not_contiguous_along_k_take_the_dot_decode(gemv_calls):
    """The GEMVs read weight rows contiguous along K; weights stored otherwise (a transposed view) under a "gemv"
    entry run the tl.dot decode instead, with the same result (not an error at T = 1 only)."""
    x, tw, ids, w13, w2, _, _ = make_case(1, 3, 2, 64, 32, torch.float32, False, 0.0, seed=1)
    w13t = w13.transpose(1, 2).contiguous().transpose(1, 2)  # (the same values, stride(2) != 1)
    with interpreter():
        out = fused_experts(x, tw, ids, w13t, w2, config=gemv_cfg(8, 16, 8, 16, 1))
    assert gemv_calls == []
    assert rel(out, oracle_experts(x, tw, ids, w13, w2, "silu")) < 1e-5


@pytest.mark.parametrize("read", ["bytes", "chain"])
def test_interpreter_int4_one_expert_with_a_strided_expert_dim(read):
    """E = 1 weights that PyTorch calls contiguous although the size-1 expert dim has stride 1 (built as [N, K/2, 1]
    and permuted): the word reads need every stride a multiple of 4 bytes, and read bytes otherwise."""
    x, tw, ids, w13, w2, _, _ = make_case(1, 1, 1, 64, 32, torch.float32, False, 0.0, seed=1)
    w = quantize("int4_w4a16", w13, w2, group_size=32)
    q13, q2 = (q[0].unsqueeze(-1).contiguous().permute(2, 0, 1) for q in (w.w13, w.w2))
    assert q13.is_contiguous() and q13.stride(0) == 1
    cfg = gemv_cfg(8, 32, 8, 32, 1)
    for g in ("gemm1", "gemm2"):
        cfg[g]["int4_read"] = read
    with interpreter():
        out = fused_experts_quant(x, tw, ids, q13, q2, None, None, "silu", "int4_w4a16", w.w13_scale, w.w2_scale,
                                  config=validate_entry(cfg))
    assert rel(out, TorchExperts().apply(x, tw, ids, w, "silu").double()) < TOL[torch.float32]


def test_interpreter_w8a8_gemv_matches_dot_decode():
    """Both decode paths quantize the activation rows in the kernel with quant_rows' rule; int8 products are exact
    in either (int32 vs fp32 sums), so the outputs agree far below kernel=torch's tolerance."""
    x, tw, ids, w13, w2, b13, b2 = make_case(1, 4, 2, 80, 48, torch.float32, True, 0.0, seed=9)
    w = quantize("int8_w8a8", w13, w2, b13, b2)
    dot = {"BLOCK_M": 16, "decode": True, "reduce": "atomic",
           "gemm1": {"BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2},
           "gemm2": {"BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}}
    with interpreter():
        a, b = (fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", "int8_w8a8", w.w13_scale,
                                    w.w2_scale, config=c) for c in (gemv_cfg(), dot))
    assert rel(a, b.double()) < 1e-6


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4], ids=["bytes", "words_4d", "words_unrolled", "planes", "subnormal"])
def test_interpreter_int4_read_modes(mode, monkeypatch):
    """Each way of reading int4 (gemv.INT4_MODE) vs kernel=torch (zero points, 2 groups per K tile)."""
    from composer.kernels.triton import gemv

    monkeypatch.setattr(gemv, "INT4_MODE", mode)
    x, tw, ids, w13, w2, b13, b2 = make_case(2, 4, 2, 64, 32, torch.float16, True, 0.0, seed=8)
    w = quantize("int4_w4a16", w13, w2, b13, b2, group_size=16, zero_point=True)
    with interpreter():
        out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", "int4_w4a16", w.w13_scale,
                                  w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=gemv_cfg())
    assert rel(out, TorchExperts().apply(x, tw, ids, w, "silu").double()) < TOL[torch.float16]


# group, gemm1 / gemm2 BLOCK_K, zero points, dtype, H, I: tiles inside a group (with and without zero points),
# spanning whole groups (a [rows] scale load per group: 2 and 4 per tile), groups of 48 (not a power of two:
# tiles of 32 straddle them), one group per row (-1), split-K over 3 programs (unroll: K iterations unrolled,
# 3 = more than some programs' loops have)
PLANES_CASES = [(16, 32, True, torch.float16, 64, 32, 1), (64, 32, False, torch.float32, 128, 64, 2),
                (64, 32, True, torch.float16, 128, 64, 1),
                (48, 32, True, torch.float16, 96, 48, 1), (-1, 16, False, torch.float32, 48, 40, 3),
                (32, 64, True, torch.float32, 64, 96, 2),
                (8, 32, True, torch.float16, 40, 24, 1)]  # 4 groups per tile, ragged K: the last tile's groups masked


@pytest.mark.parametrize("case", PLANES_CASES,
                         ids=lambda c: f"g{c[0]}bk{c[1]}{'z' if c[2] else ''}{str(c[3])[6:]}u{c[6]}")
def test_interpreter_int4_planes(case, gemv_calls):
    """int4_read "planes" (q - z straight from the bits, K tiles across groups) vs kernel=torch, and equal to the
    default read ("words") to fp32 rounding."""
    group, bk, zero, dtype, H, I, unroll = case
    x, tw, ids, w13, w2, _, _ = make_case(2, 4, 2, H, I, dtype, False, 0.0, seed=21)
    w = quantize("int4_w4a16", w13, w2, group_size=group, zero_point=zero)
    outs = []
    with interpreter():
        for read in ("planes", "words", "subnormal"):
            cfg = gemv_cfg(8, bk, 8, bk, 3)
            for g in ("gemm1", "gemm2"):
                cfg[g]["int4_read"] = read
                cfg[g]["unroll"] = unroll
                if unroll > 1:  # (the interpreter runs the loop as written: this checks the plumbing)
                    cfg[g]["loop_stages"] = unroll + 1
            outs.append(fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", "int4_w4a16", w.w13_scale,
                                            w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=validate_entry(cfg)))
    assert len(gemv_calls) == 6
    assert rel(outs[0], TorchExperts().apply(x, tw, ids, w, "silu").double()) < TOL[dtype]
    assert rel(outs[0], outs[1].double()) < (1e-5 if dtype == torch.float32 else 2e-3)
    assert rel(outs[2], outs[0].double()) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("read,dtype", [("subnormal", torch.float16), ("planes", torch.float32)])
def test_interpreter_x_vec_reads_the_same_activations(read, dtype, monkeypatch):
    """``x_vec`` (a word column's eight activations in one load, split in registers) feeds every nibble the same
    activation as eight separate loads do: the outputs are identical, bit for bit, with it in either GEMM's tile,
    and in both through the module default gemv.GEMV_X_VEC. (Each read with one dtype: 16- and 32-byte vectors.)"""
    from composer.kernels.triton import gemv

    x, tw, ids, w13, w2, b13, b2 = make_case(1, 4, 2, 128, 64, dtype, True, 0.0, seed=29)
    w = quantize("int4_w4a16", w13, w2, b13, b2, group_size=32, zero_point=True)
    def run(vec1, vec2):
        cfg = gemv_cfg(8, 64, 8, 32, 2)
        for g, vec in (("gemm1", vec1), ("gemm2", vec2)):
            cfg[g]["int4_read"] = read
            if vec is not None:
                cfg[g]["x_vec"] = vec
        return fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", "int4_w4a16",
                                   w.w13_scale, w.w2_scale, None, None, w.w13_zero, w.w2_zero,
                                   config=validate_entry(cfg))

    vec = _spy(monkeypatch, "X_VEC")  # which launches took the 16-byte activation load
    outs = []
    with interpreter():
        for vec1, vec2, default in ((False, False, False), (True, False, False), (False, True, False),
                                    (None, None, True)):
            monkeypatch.setattr(gemv, "GEMV_X_VEC", default)
            outs.append(run(vec1, vec2))
    assert vec == [False, False, True, False, False, True, True, True]
    for o in outs[1:]:
        assert torch.equal(outs[0], o)
    assert rel(outs[1], TorchExperts().apply(x, tw, ids, w, "silu").double()) < TOL[dtype]


@pytest.mark.parametrize("method,dtype", [(None, torch.float32), ("int8_w8a16", torch.float16),
                                          ("int8_w8a8", torch.float32)], ids=["fp32", "int8_w8a16", "int8_w8a8"])
def test_interpreter_reduce_once(method, dtype):
    """``reduce_once`` (the FMA GEMV's products summed per 8 columns of K in registers, reduced across threads once
    after the K loop) vs the float64 oracle / kernel=torch, with ragged K tiles (H = 52, I = 40), split-K and dropped
    pairs, and against the per-tile reduction to fp32 rounding."""
    x, tw, ids, w13, w2, b13, b2 = make_case(3, 5, 2, 52, 40, dtype, True, 0.3, seed=12)
    outs = []
    with interpreter():
        for once in (True, False):
            cfg = gemv_cfg(4, 32, 8, 16, 3)
            for g in ("gemm1", "gemm2"):
                cfg[g]["reduce_once"] = once
            cfg = validate_entry(cfg)
            if method is None:
                outs.append(fused_experts(x, tw, ids, w13, w2, b13, b2, "silu", config=cfg))
            else:
                w = quantize(method, w13, w2, b13, b2)
                outs.append(fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", method,
                                                w.w13_scale, w.w2_scale, None, None, None, None, config=cfg))
    if method is None:
        ref = oracle_experts(x, tw, ids, w13, w2, "silu", b13, b2)
    else:
        ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
    tol = (TOL_W8A8 if method == "int8_w8a8" else TOL)[dtype]
    assert rel(outs[0], ref) < tol
    assert rel(outs[0], outs[1].double()) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_reduce_once_is_refused_where_it_does_not_apply():
    ok = gemv_cfg()
    ok["gemm1"]["reduce_once"] = True
    validate_entry(ok)
    for sub, where in (({"reduce_once": True, "mma": True}, "gemv"), ({"reduce_once": True}, "dot"),
                       ({"reduce_once": 1}, "gemv"), ({"reduce_once": True, "int4_read": "chain"}, "gemv")):
        bad = gemv_cfg() if where == "gemv" else {"BLOCK_M": 16, "decode": True, "gemm1": {
            "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}, "gemm2": {
            "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}}
        bad["gemm1"] = {**bad["gemm1"], **sub}
        with pytest.raises(ValueError, match="gemm1.reduce_once"):
            validate_entry(bad)
    bad = gemv_cfg(8, 16)
    bad["gemm1"]["int4_read"] = "chain"  # (a thread reads 32 elements of K: a 16-wide tile would never run it)
    with pytest.raises(ValueError, match='gemm1.int4_read "chain" needs BLOCK_K a multiple of 32'):
        validate_entry(bad)


def _spy(monkeypatch, key: str) -> list:
    """Records the constexpr ``key`` of every GEMV launch (what actually ran after _read_mode's fallbacks)."""
    from composer.kernels.triton import gemv

    seen = []
    real = gemv._gemv_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw[key])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(gemv, "_gemv_kernel", Spy())
    return seen


# group, BLOCK_K (both GEMMs), zero points, dtype, H, I, unroll, gemm1 / gemm2 SPLIT_K, bias, dropped share, the scale
# gather transposed: a tile of one 32-wide column (C = 1), several columns per group and groups per tile, GEMM1 split
# over K (GEMM2 then activates its fp32 partial sums as it loads them: X_PARTS), GEMM2 split 2 ways over K = 192 with
# 64-wide tiles (splits of 128 and 64), unroll 3 (more than some loops have), one group per row (-1), dropped pairs;
# both orientations of the scale gather, with and without zero points (the installed Triton picks one)
CHAIN_CASES = [(32, 32, True, torch.float16, 64, 32, 1, 1, 1, False, 0.0, True),
               (64, 64, False, torch.float32, 128, 64, 2, 2, 2, True, 0.3, False),
               (64, 64, True, torch.float16, 128, 192, 1, 1, 2, True, 0.0, False),
               (32, 128, True, torch.float32, 256, 128, 3, 3, 1, False, 0.3, True),
               (-1, 32, False, torch.float16, 64, 64, 1, 1, 1, False, 0.0, True)]


@pytest.mark.parametrize("case", CHAIN_CASES,
                         ids=lambda c: f"g{c[0]}bk{c[1]}{'z' if c[2] else ''}{str(c[3])[6:]}u{c[6]}s{c[7]}{c[8]}"
                                       f"{'T' if c[11] else ''}")
def test_interpreter_int4_chain(case, monkeypatch):
    """int4_read "chain" (a thread's 32 nibbles of a row summed in one chain, the zero point and scale applied per
    such sum) vs kernel=torch, and vs the "subnormal" read to fp32 rounding; every launch really ran the chain."""
    from composer.kernels.triton import gemv

    group, bk, zero, dtype, H, I, unroll, split1, split2, bias, drop, scales_t = case
    monkeypatch.setattr(gemv, "CHAIN_SCALES_T", scales_t)
    x, tw, ids, w13, w2, b13, b2 = make_case(2, 4, 2, H, I, dtype, bias, drop, seed=21)
    w = (quantize("int4_w4a16", w13, w2, b13, b2, group_size=group, zero_point=zero) if bias else
         quantize("int4_w4a16", w13, w2, group_size=group, zero_point=zero))
    modes = _spy(monkeypatch, "INT4_MODE")
    outs = []
    with interpreter():
        for read in ("chain", "subnormal"):
            cfg = gemv_cfg(8, bk, 8, bk, split2)
            if split1 > 1:
                cfg["gemm1"]["SPLIT_K"] = split1
            for g in ("gemm1", "gemm2"):
                cfg[g].update({"int4_read": read, "unroll": unroll})
            outs.append(fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias if bias else None,
                                            w.w2_bias if bias else None, "silu", "int4_w4a16", w.w13_scale,
                                            w.w2_scale, None, None, w.w13_zero, w.w2_zero,
                                            config=validate_entry(cfg)))
    assert modes == [5, 5, 4, 4]
    assert rel(outs[0], TorchExperts().apply(x, tw, ids, w, "silu").double()) < TOL[dtype]
    assert rel(outs[0], outs[1].double()) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("group,H,bk", [(16, 64, 32), (32, 96, 64)], ids=["group16", "ragged_K"])
def test_interpreter_int4_chain_falls_back_to_subnormal(group, H, bk, monkeypatch):
    """Where a thread's 32 elements would straddle a scale group (groups of 16) or K is not whole tiles (96 with
    64-wide tiles: the chain loads without masks), "chain" runs the subnormal read instead, and is right."""
    x, tw, ids, w13, w2, _, _ = make_case(2, 4, 2, H, 64, torch.float32, False, 0.0, seed=23)
    w = quantize("int4_w4a16", w13, w2, group_size=group, zero_point=True)
    modes = _spy(monkeypatch, "INT4_MODE")
    cfg = gemv_cfg(8, bk, 8, 32, 2)
    for g in ("gemm1", "gemm2"):
        cfg[g]["int4_read"] = "chain"
    with interpreter():
        out = fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", "int4_w4a16", w.w13_scale,
                                  w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=validate_entry(cfg))
    assert modes[0] == 4  # GEMM1 (K = H) falls back
    assert modes[1] == (4 if group == 16 else 5)  # GEMM2 (K = I = 64, 32-wide tiles) keeps the chain with groups of 32
    assert rel(out, TorchExperts().apply(x, tw, ids, w, "silu").double()) < TOL[torch.float32]


def test_interpreter_int4_chain_bf16_pairs_are_the_bf16_values(monkeypatch):
    """The chain read takes bf16 activations as int32 pairs, each made an fp32 by a shift or an AND: the output is
    bit for bit the one of bf16 loads converted to fp32 (gemv.CHAIN_X_PAIRS off). Scales in fp32 and the activations
    never loaded as bf16 on the pairs side keep this test off the interpreter's unreliable bf16 loads."""
    from composer.kernels.triton import gemv

    g = torch.Generator().manual_seed(6)
    E, N, K, group = 3, 16, 128, 32
    w = torch.randn(E, N, K, generator=g)
    from composer.quant.utils import quant_int4
    q, s, z = quant_int4(w, group, True, torch.float32)
    x = torch.randn(3, K, generator=g).to(torch.bfloat16)
    ids = torch.tensor([0, 2, 1], dtype=torch.int32)
    cfg = {"BLOCK_N": 8, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2, "int4_read": "chain"}
    pairs = _spy(monkeypatch, "X_PAIRS")
    outs = []
    with interpreter():
        for on in (True, False):
            monkeypatch.setattr(gemv, "CHAIN_X_PAIRS", on)
            out = torch.zeros(3, N, dtype=torch.float32)
            gemv.gemv(x, q, None, out, ids, 1, cfg, gated=False, tw=torch.ones(3), atomic=False, wq=2, group=group,
                      w_scale=s, w_zero=z)
            outs.append(out)
    assert pairs == [True, False]
    assert torch.equal(outs[0], outs[1])
    ref = torch.einsum("pnk,pk->pn", __import__("composer.quant.utils", fromlist=["dequant_int4"]).dequant_int4(
        q, s, z).double()[ids.long()], x.double())
    assert rel(outs[0], ref) < 1e-6


# read, group, BLOCK_K, zero points, x_vec, dtype, H, I, gemm2 SPLIT_K: groups of 48 cut by 32-wide tiles (a
# [rows, words] scale gather) with split-K; whole groups per tile with x_vec; a ragged K (the last tile masked)
PREFETCH_CASES = [("planes", 48, 32, True, False, torch.float16, 96, 48, 3),
                  ("subnormal", 32, 64, True, True, torch.float32, 128, 64, 2),
                  ("subnormal", 8, 32, False, False, torch.float16, 40, 24, 1)]


@pytest.mark.parametrize("case", PREFETCH_CASES, ids=lambda c: f"{c[0]}-g{c[1]}bk{c[2]}{'-xvec' if c[4] else ''}")
def test_interpreter_prefetch_keeps_every_bit(case, monkeypatch):
    """``prefetch`` (K tiles loaded into registers ahead of the one being multiplied) changes when the loads are
    issued, not what is computed: outputs identical bit for bit to prefetch 0, with dropped pairs (their empty K
    loops still issue the prologue's loads, which must stay in bounds) and loops shorter than the distance."""
    from composer.kernels.triton import gemv

    read, group, bk, zero, vec, dtype, H, I, split = case
    x, tw, ids, w13, w2, b13, b2 = make_case(3, 4, 2, H, I, dtype, True, 0.3, seed=31)
    w = quantize("int4_w4a16", w13, w2, b13, b2, group_size=group, zero_point=zero)
    ahead = _spy(monkeypatch, "AHEAD")  # the distance each launch took
    outs = []
    with interpreter():
        for pf in (0, 1, 2):
            cfg = gemv_cfg(8, bk, 8, bk, split)
            for g in ("gemm1", "gemm2"):
                cfg[g].update({"int4_read": read, "x_vec": vec, "prefetch": pf})
            outs.append(fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", "int4_w4a16",
                                            w.w13_scale, w.w2_scale, None, None, w.w13_zero, w.w2_zero,
                                            config=validate_entry(cfg)))
    assert ahead == [0, 0, 1, 1, 2, 2]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert rel(outs[0], TorchExperts().apply(x, tw, ids, w, "silu").double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("read", ["planes", "subnormal", "chain"])
def test_interpreter_int4_reads_over_the_activation_range(read, dtype):
    """GEMM2's GEMV on activations from tiny to huge, row by row against the float64 product with the dequantized
    weights: "subnormal" scales the activations by powers of two (docs/quantization.md gives its exact range,
    |q x| in [2^-62, 2^43) for fp32 / bf16, every fp16 value), so a row of tiny or of huge activations must come
    out as right as a row of ordinary ones."""
    from composer.kernels.triton.gemv import gemv
    from composer.quant.utils import dequant_int4, quant_int4

    g = torch.Generator().manual_seed(5)
    E, N, K, group = 3, 16, 64, 32
    w = torch.randn(E, N, K, generator=g)
    q, s, z = quant_int4(w, group, True, torch.float32)
    wd = dequant_int4(q, s, z).double()
    if dtype == torch.float32:
        exps = [0.0, 40.0, -50.0]  # rows of ordinary, huge and tiny activations
    else:
        exps = [0.0, 8.0, -14.0]  # fp16: up to ~1e3 (sums stay finite), down to subnormals
    x = torch.cat([torch.randn(1, K, generator=g) * 2.0 ** e for e in exps]).to(dtype)
    ids = torch.tensor([0, 2, 1], dtype=torch.int32)
    out = torch.empty(3, N, dtype=dtype)
    cfg = {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "int4_read": read}
    with interpreter():
        gemv(x, q, None, out, ids, 1, cfg, gated=False, tw=torch.ones(3), atomic=False, wq=2, group=group,
             w_scale=s, w_zero=z)
    ref = torch.einsum("pnk,pk->pn", wd[ids.long()], x.double())
    for p in range(3):
        assert rel(out[p], ref[p]) < (1e-6 if dtype == torch.float32 else 1e-3), (read, exps[p])


@pytest.mark.parametrize("split", [1, 3])
def test_interpreter_fused_epilogue_equals_separate_launches(split, monkeypatch):
    """GEMV_FUSED_EPILOGUE (sums zeroed in GEMM1, the last-arriving GEMM2 program casts) gives exactly what the
    memset + atomics + cast launches give: dropped pairs, top_k = E, split-K (k x SPLIT_K arrivals per tile)."""
    x, tw, ids, w13, w2, b13, b2 = make_case(3, 3, 3, 40, 48, torch.float16, True, 0.3, seed=17)
    outs = []
    with interpreter():
        for fused_epi in (True, False):
            monkeypatch.setattr(fused, "GEMV_FUSED_EPILOGUE", fused_epi)
            outs.append(fused_experts(x, tw, ids, w13, w2, b13, b2, "silu", config=gemv_cfg(8, 16, 8, 16, split)))
    assert torch.equal(outs[0], outs[1])
    assert rel(outs[0], oracle_experts(x, tw, ids, w13, w2, "silu", b13, b2)) < 2e-3


def test_interpreter_int4_fault_is_caught():
    """A wrong group scale must fail the comparison (the int4 trick cannot hide an error)."""
    x, tw, ids, w13, w2, _, _ = make_case(1, 4, 2, 64, 32, torch.float32, False, 0.0, seed=2)
    w = quantize("int4_w4a16", w13, w2, group_size=16)
    ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
    bad = w.w13_scale.clone()
    bad[:, :, 1] *= 1.05
    with interpreter():
        out = fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", "int4_w4a16", bad, w.w2_scale,
                                  config=gemv_cfg())
    assert rel(out, ref) > 1e-3


def test_gemv_tile_for_int4_groups():
    assert gemv_tile({"BLOCK_K": 256}, 2, 128) == (256, 2)
    assert gemv_tile({"BLOCK_K": 128}, 2, 128) == (128, 1)
    assert gemv_tile({"BLOCK_K": 256}, 2, 2048) == (256, 1)
    assert gemv_tile({"BLOCK_K": 64}, 2, 48) == (16, 1)
    assert gemv_tile({"BLOCK_K": 512}, 3, 128) == (512, 1)  # not int4: the tile as configured


def test_config_validation_of_gemv_entries():
    validate_entry(gemv_cfg(4, 16, 4, 16, 8))
    split1 = gemv_cfg()
    split1["gemm1"] = {**split1["gemm1"], "SPLIT_K": 2}  # a GEMM1 GEMV may split K too (partial sums for GEMM2)
    validate_entry(split1)
    with pytest.raises(ValueError, match="gemm1.SPLIT_K must be an integer >= 1"):
        validate_entry({**split1, "gemm1": {**split1["gemm1"], "SPLIT_K": True}})
    with pytest.raises(ValueError, match="gemm1.SPLIT_K"):
        validate_entry({**split1, "decode": False, "gemm1": {**split1["gemm1"], "BLOCK_N": 16, "BLOCK_K": 16}})
    with pytest.raises(ValueError, match="decode must be"):
        validate_entry({**gemv_cfg(), "decode": "gemm"})
    with pytest.raises(ValueError, match="gemm1.mma applies to decode"):
        validate_entry({**gemv_cfg(16, 32, 16, 32, 1, mma=True), "decode": True})
    dot = {**gemv_cfg(), "decode": True}
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two >= 16"):  # tl.dot tiles stay >= 16
        validate_entry(dot)
    bad = gemv_cfg()
    bad["gemm2"] = {**bad["gemm2"], "int4_read": "nibbles"}
    with pytest.raises(ValueError, match="gemm2.int4_read must be one of bytes, words_4d, words, planes, subnormal"):
        validate_entry(bad)
    for unroll, where in ((0, "gemv"), (True, "gemv"), (2, "dot")):
        bad = gemv_cfg(16, 32, 16, 32, 1) if where == "gemv" else {**gemv_cfg(16, 32, 16, 32, 1), "decode": True}
        bad["gemm1"] = {**bad["gemm1"], "unroll": unroll}
        with pytest.raises(ValueError, match="gemm1.unroll must be an integer >= 1"):
            validate_entry(bad)
        bad["gemm1"] = {**bad["gemm1"], "unroll": 1, "loop_stages": unroll}
        with pytest.raises(ValueError, match="gemm1.loop_stages must be an integer >= 1"):
            validate_entry(bad)
    ok = gemv_cfg()
    ok["gemm2"] = {**ok["gemm2"], "int4_read": "subnormal", "x_vec": True}
    assert validate_entry(ok)["gemm2"]["x_vec"] is True
    for sub, where in (({"int4_read": "subnormal", "x_vec": 1}, "gemv"), ({"x_vec": True}, "gemv"),
                       ({"int4_read": "words", "x_vec": True}, "gemv"), ({"x_vec": True}, "dot")):
        bad = gemv_cfg(16, 32, 16, 32, 1) if where == "gemv" else {**gemv_cfg(16, 32, 16, 32, 1), "decode": True}
        bad["gemm2"] = {**bad["gemm2"], **sub}
        with pytest.raises(ValueError, match="gemm2.x_vec must be true or false, and true only in a decode"):
            validate_entry(bad)
    ok = gemv_cfg()
    ok["gemm1"] = {**ok["gemm1"], "int4_read": "planes", "prefetch": 2}
    assert validate_entry(ok)["gemm1"]["prefetch"] == 2
    for sub, where in (({"int4_read": "subnormal", "prefetch": 3}, "gemv"), ({"prefetch": 1}, "gemv"),
                       ({"int4_read": "words", "prefetch": 1}, "gemv"), ({"int4_read": "planes", "prefetch": True},
                                                                         "gemv"), ({"prefetch": 1}, "dot")):
        bad = gemv_cfg(16, 32, 16, 32, 1) if where == "gemv" else {**gemv_cfg(16, 32, 16, 32, 1), "decode": True}
        bad["gemm1"] = {**bad["gemm1"], **sub}
        with pytest.raises(ValueError, match="gemm1.prefetch must be 0, 1 or 2"):
            validate_entry(bad)
    assert validate_entry({**gemv_cfg(), "pdl": True})["pdl"] is True
    for bad in ({**gemv_cfg(), "pdl": "yes"}, {**gemv_cfg(16, 32, 16, 32, 1), "decode": True, "pdl": True}):
        with pytest.raises(ValueError, match="pdl must be true or false, and true only with decode \"gemv\""):
            validate_entry(bad)
    from composer.kernels.triton.gemv import pdl_supported

    assert not pdl_supported(torch.device("cpu"))  # (the interpreter and CPUs run the two launches in order)


# ------------------------------------------------------------------------------------------------ GPU

GPU_GEMV = {"BLOCK_M": 16, "decode": "gemv", "reduce": "atomic",
            "gemm1": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2},
            "gemm2": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2, "SPLIT_K": 4}}


GPU_GEMV_MMA = {**GPU_GEMV, "gemm1": {**GPU_GEMV["gemm1"], "mma": True},
                "gemm2": {**GPU_GEMV["gemm2"], "mma": True}}


GPU_GEMV_PLANES = {**GPU_GEMV, "gemm1": {**GPU_GEMV["gemm1"], "int4_read": "planes", "unroll": 2, "loop_stages": 3},
                   "gemm2": {**GPU_GEMV["gemm2"], "int4_read": "planes", "unroll": 2, "loop_stages": 3}}


GPU_GEMV_SUB = {**GPU_GEMV, "gemm1": {**GPU_GEMV["gemm1"], "int4_read": "subnormal", "unroll": 2},
                "gemm2": {**GPU_GEMV["gemm2"], "int4_read": "subnormal"}}


GPU_GEMV_PREFETCH = {**GPU_GEMV, "gemm1": {**GPU_GEMV_SUB["gemm1"], "unroll": 1, "x_vec": True, "prefetch": 2},
                     "gemm2": {**GPU_GEMV_SUB["gemm2"], "prefetch": 1}}


GPU_GEMV_CHAIN = {**GPU_GEMV, "pdl": True,
                  "gemm1": {**GPU_GEMV["gemm1"], "int4_read": "chain", "BLOCK_K": 512, "unroll": 2},
                  "gemm2": {**GPU_GEMV["gemm2"], "int4_read": "chain", "unroll": 3}}


@gpu
@cuda
@pytest.mark.parametrize("cfg", [GPU_GEMV, GPU_GEMV_MMA, GPU_GEMV_PLANES, GPU_GEMV_SUB, GPU_GEMV_PREFETCH,
                                 GPU_GEMV_CHAIN], ids=["fma", "mma", "planes", "subnormal", "prefetch", "chain"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_gemv_three_shapes(shape, cfg):
    """Every method (and bf16) through the GEMV decode at T = 1 vs kernel=torch, bf16, the three shapes; block
    fp8 falls back to the tl.dot decode."""
    E, k, H, I = SHAPES[shape]
    x, tw, ids, w13, w2, _, _ = make_case(1, E, k, H, I, torch.bfloat16, False, 0.0, seed=0, device="cuda")
    out = fused_experts(x, tw, ids, w13, w2, config=cfg)
    err = rel(out, oracle_experts(x, tw, ids, w13, w2, "silu"))
    print(f"[gemv-gpu] {shape} mma={cfg['gemm1'].get('mma', False)} bf16 T=1: rel err vs float64 oracle {err:.2e}")
    assert err < 1e-2
    for method, params in ALL_VARIANTS:
        w = quantize(method, w13, w2, **params)
        ex = w.extra or {}
        out = fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", method, w.w13_scale, w.w2_scale,
                                  w.a13_scale, w.a2_scale, w.w13_zero, w.w2_zero,
                                  ex.get("granularity", "per_token_channel"), *ex.get("block_shape", (128, 128)),
                                  config=cfg)
        err = rel(out, TorchExperts().apply(x, tw, ids, w, "silu").double())
        print(f"[gemv-gpu] {shape} mma={cfg['gemm1'].get('mma', False)} {method} {params} T=1: rel err vs kernel=torch {err:.2e}")
        assert err < GPU_TOL[method], (shape, method, params, err)
        del w
        torch.cuda.empty_cache()


SMALL_T_SHAPES = {"mixtral_8x7b": (8, 2, 4096, 14336), "qwen3_30b_a3b": (128, 8, 2048, 768),
                  "deepseek_v3": (256, 8, 7168, 2048)}


@gpu
@cuda
@pytest.mark.parametrize("shape", list(SMALL_T_SHAPES))
def test_gpu_shipped_tables_at_small_t(shape):
    """The shipped tables at small T (int4: GEMV entries at T = 1-64 on the H100 and H200 tables; fp8 qwen3 at
    T = 2-4) vs kernel=torch on the experts the routing touches (all 256 of deepseek_v3 dequantized would not fit),
    at the benchmark shapes with their real expert counts."""
    from composer.kernels.triton.fused import quant_config
    from composer.kernels.triton_backend import TritonExperts
    from composer.tasks.bench import Shape, make_weights, quantize_weights

    E, k, H, I = SMALL_T_SHAPES[shape]
    sh = Shape(shape, E, k, H, I, torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = make_weights(sh, torch.device("cuda"), gen)
    for method, params, tokens in (("int4_w4a16", {"group_size": 128}, (1, 2, 5, 8, 24, 48)),
                                   ("fp8_w8a8", {"granularity": "per_token_channel"}, (2, 4))):
        sh.quant, sh.quant_params = method, params
        qw = quantize_weights(sh, w)
        for T in tokens:
            x = torch.randn(T, H, device="cuda", generator=gen).to(torch.bfloat16)
            tw, ids = torch.topk(torch.randn(T, E, device="cuda", generator=gen).softmax(-1), k, dim=-1)
            tw, ids = tw.float(), ids.to(torch.int32)
            used, local = torch.unique(ids, return_inverse=True)
            ref = TorchExperts().apply(x, tw, local.to(torch.int32), qw.select(used), "silu").double()
            err = rel(TritonExperts().apply(x, tw, ids, qw, "silu"), ref)
            cfg = quant_config(T, E, I, H, k, method, torch.bfloat16, x.device)
            print(f"[small-T] {shape} {method} T={T} decode={cfg['decode']} ({cfg['source'].rsplit('/', 1)[-1]}): "
                  f"rel err vs kernel=torch {err:.2e}")
            assert err < GPU_TOL[method], (shape, method, T, err)
        del qw
        torch.cuda.empty_cache()


@gpu
@cuda
def test_gpu_gemv_graph_replay():
    """The GEMV decode captures into a CUDA graph and replays on new inputs."""
    from composer.tasks.bench import capture_graph

    E, k, H, I = 8, 2, 1024, 512
    x, tw, ids, w13, w2, _, _ = make_case(1, E, k, H, I, torch.bfloat16, False, 0.0, seed=3, device="cuda")
    w = quantize("int4_w4a16", w13, w2, group_size=128)

    def run(a):
        return fused_experts_quant(a, tw, ids, w.w13, w.w2, None, None, "silu", "int4_w4a16", w.w13_scale,
                                   w.w2_scale, config=GPU_GEMV)

    eager = run(x)
    static_x = x.clone()
    graph, gout = capture_graph(lambda: run(static_x))
    new_x = torch.randn(x.shape, device="cuda").to(torch.bfloat16)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(gout, run(new_x), rtol=1e-2, atol=1e-3)
    assert not torch.equal(gout, eager)


@gpu
@cuda
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_prefetch_keeps_every_bit(shape):
    """Compiled for the GPU, ``prefetch`` 1 and 2 (either GEMM) give the outputs of prefetch 0 bit for bit: the loads
    move, the arithmetic and its order do not (int4 g128 and with zero points, T = 1 and 3). GEMM2 writes per-pair
    rows unsplit ("buffer"): atomic sums would add in a different order from run to run."""
    E, k, H, I = SHAPES[shape]
    base = {**GPU_GEMV_SUB, "reduce": "buffer", "gemm2": {**GPU_GEMV_SUB["gemm2"], "SPLIT_K": 1}}
    for T, params in ((1, {"group_size": 128}), (3, {"group_size": 128, "zero_point": True})):
        x, tw, ids, w13, w2, _, _ = make_case(T, E, k, H, I, torch.bfloat16, False, 0.0, seed=T, device="cuda")
        w = quantize("int4_w4a16", w13, w2, **params)
        outs = []
        for pf in (0, 1, 2):
            cfg = {**base, "gemm1": {**base["gemm1"], "prefetch": pf}, "gemm2": {**base["gemm2"], "prefetch": pf}}
            outs.append(fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", "int4_w4a16", w.w13_scale,
                                            w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=cfg))
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), (shape, T, params)
        assert rel(outs[0], TorchExperts().apply(x, tw, ids, w, "silu").double()) < GPU_TOL["int4_w4a16"]
        del w
        torch.cuda.empty_cache()


@gpu
@cuda
@pytest.mark.parametrize("shape", ["qwen3_30b_a3b", "mixtral_8x7b"])
def test_gpu_chain_bf16_pairs_keep_every_bit(shape, monkeypatch):
    """Compiled for the GPU, the chain read's bf16 activations taken as int32 pairs (gemv.CHAIN_X_PAIRS) give the
    outputs of bf16 loads bit for bit (the same fp32 values, the same arithmetic), and match kernel=torch; GEMM2
    writes per-pair rows unsplit, so no atomic order enters."""
    from composer.kernels.triton import gemv

    E, k, H, I = SHAPES[shape]
    base = {**GPU_GEMV_CHAIN, "reduce": "buffer", "gemm2": {**GPU_GEMV_CHAIN["gemm2"], "SPLIT_K": 1}}
    x, tw, ids, w13, w2, _, _ = make_case(2, E, k, H, I, torch.bfloat16, False, 0.0, seed=4, device="cuda")
    w = quantize("int4_w4a16", w13, w2, group_size=128, zero_point=True)
    outs = []
    for on in (True, False):
        monkeypatch.setattr(gemv, "CHAIN_X_PAIRS", on)
        outs.append(fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", "int4_w4a16", w.w13_scale,
                                        w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=base))
    assert torch.equal(outs[0], outs[1]), shape
    assert rel(outs[0], TorchExperts().apply(x, tw, ids, w, "silu").double()) < GPU_TOL["int4_w4a16"]


GPU_GEMV_PDL = {**GPU_GEMV_SUB, "pdl": True, "gemm2": {**GPU_GEMV_SUB["gemm2"], "x_vec": True}}


@gpu
@cuda
@pytest.mark.parametrize("shape", ["qwen3_30b_a3b", "mixtral_8x7b"])
def test_gpu_pdl_decode_replays_right(shape):
    """A "pdl" decode (GEMM2 a programmatic dependent of GEMM1, prefetching its weights before it waits) gives the
    two-launch results, eager and over many CUDA-graph replays on new inputs: a GEMM2 that read GEMM1's output
    before it was written would show as a wrong replay."""
    from composer.kernels.triton.gemv import pdl_supported
    from composer.tasks.bench import capture_graph

    if torch.cuda.get_device_capability()[0] >= 9:
        assert pdl_supported(torch.device("cuda"))  # (this Triton has grid dependency control)
    E, k, H, I = SHAPES[shape]
    x, tw, ids, w13, w2, _, _ = make_case(1, E, k, H, I, torch.bfloat16, False, 0.0, seed=11, device="cuda")
    for method, params in (("int4_w4a16", {"group_size": 128}), (None, {}),
                           ("fp8_w8a8", {"granularity": "per_token_channel"})):
        if method:
            w = quantize(method, w13, w2, **params)
            ex = w.extra or {}

            def run(a, cfg, w=w, method=method, ex=ex):
                return fused_experts_quant(a, tw, ids, w.w13, w.w2, None, None, "silu", method, w.w13_scale,
                                           w.w2_scale, w.a13_scale, w.a2_scale, w.w13_zero, w.w2_zero,
                                           ex.get("granularity", "per_token_channel"), config=cfg)
            ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
        else:
            def run(a, cfg):
                return fused_experts(a, tw, ids, w13, w2, config=cfg)
            ref = oracle_experts(x, tw, ids, w13, w2, "silu")
        cfg = {**GPU_GEMV_PDL} if method == "int4_w4a16" else {**GPU_GEMV, "pdl": True}
        plain = {**cfg, "pdl": False}
        out = run(x, cfg)
        assert rel(out, ref) < GPU_TOL.get(method, 1e-2), (shape, method, rel(out, ref))
        assert rel(out, run(x, plain).double()) < 2e-3  # (fp32 atomics add in any order: not bit for bit)
        static_x = x.clone()
        graph, gout = capture_graph(lambda: run(static_x, cfg))
        g = torch.Generator(device="cuda").manual_seed(5)
        for i in range(40):
            new_x = torch.randn(x.shape, device="cuda", generator=g).to(torch.bfloat16)
            static_x.copy_(new_x)
            graph.replay()
            want = run(new_x, plain)
            torch.cuda.synchronize()
            assert rel(gout, want.double()) < 2e-3, (shape, method, i, rel(gout, want.double()))


@lazy_helper
def _plus_half(v):
    return v + 0.5


@lazy_helper
def _plus_half_times(v, A: tl.constexpr):
    return _plus_half(v) * A


@lazy_jit
def _helper_kernel(x_ptr, o_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(o_ptr + offs, _plus_half_times(tl.load(x_ptr + offs), 3.0))


def test_lazy_helpers_follow_the_interpreter_switch():
    """@lazy_helper device functions (nested ones too) run inside interpreted kernels: bound as plain Python there,
    as triton.jit functions when the kernel is compiled (the GPU tests); outside a kernel they refuse clearly."""
    x = torch.randn(16)
    out = torch.empty_like(x)
    with interpreter():
        _helper_kernel[(1,)](x, out, BLOCK=16)
    assert torch.equal(out, (x + 0.5) * 3.0)
    with pytest.raises(RuntimeError, match="device helper"):
        _plus_half_times(x, 3.0)


@gpu
@cuda
def test_gpu_lazy_helpers_compiled():
    x = torch.randn(16, device="cuda")
    out = torch.empty_like(x)
    _helper_kernel[(1,)](x, out, BLOCK=16)
    assert torch.equal(out, (x + 0.5) * 3.0)


def test_tuner_gemv_candidates_are_valid_entries():
    """Every GEMV tile the tuner may write into a shipped table passes the config validation."""
    from composer.kernels.triton.tune import gemv_candidates

    for method in ("int4_w4a16", "fp8_w8a8", ""):
        for name in ("gemm1", "gemm2"):
            for g in gemv_candidates(name, method):
                validate_entry({**gemv_cfg(), name: g}, f"{method} {name} {g}")
            # int4 tiles are tried with and without x_vec, non-int4 ones never carry it
            assert any(g.get("x_vec") for g in gemv_candidates(name, method)) == (method == "int4_w4a16")


def test_tuner_small_t_keys_gemvs_until_sorted_blocks_win():
    """tune.small_t_entries: a GEMV key at each T while one pair per program is faster (the fastest GEMM2 split
    kept), then the expert-sorted entry at the first T where it wins, and nothing past it (a fake timer: GEMVs grow
    with the pairs, the sorted blocks barely). A tl.dot T = 1 entry gets no keys."""
    from composer.kernels.triton.tune import small_t_entries

    t1 = {**gemv_cfg(16, 32, 8, 32, 4), "_us": 9.0}
    srt = {"BLOCK_M": 16, "decode": False, "reduce": "atomic", "source": "table [T=16]",
           "gemm1": {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
           "gemm2": {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}}
    per_split = {4: 2.0, 2: 1.9, 1: 1.95}
    calls = []

    def timed(T, cfg):
        calls.append(T)
        return 10.0 + T if not cfg["decode"] else per_split[cfg["gemm2"]["SPLIT_K"]] * T

    keys = small_t_entries(t1, lambda T: srt, timed, tokens=(2, 4, 8, 16, 24))
    assert list(keys) == [2, 4, 8, 16] and 24 not in calls
    for T in (2, 4, 8):
        assert keys[T]["decode"] == "gemv" and keys[T]["gemm2"]["SPLIT_K"] == 2
        assert keys[T]["_us"] == round(1.9 * T * 1e3, 1)
        validate_entry({k: v for k, v in keys[T].items() if k != "_us"})
    assert keys[16]["decode"] is False and keys[16]["_us"] == 26000.0 and "source" not in keys[16]
    assert small_t_entries({**srt, "decode": True}, lambda T: srt, timed) == {}


def test_tuner_sorted_candidates_keep_the_shipped_tile():
    """tune.quant_sorted_candidates: the bfloat16 tile (w8a8: K tiles widened), the method's shipped tile, and for
    int4 the INT4_QPAIRS blocks below T = 1024 (16 and 32 rows) and the INT4_PAIRS blocks from T = 128 (64 rows,
    64- and 128-deep K; 128 rows, 8 warps), for int8_w8a16 a 64-row block from T = 128; valid entries, no
    duplicates."""
    from composer.kernels.triton.fused import w8a8_tiles
    from composer.kernels.triton.tune import quant_sorted_candidates

    g = {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    bf = {"BLOCK_M": 128, "decode": False, "reduce": "buffer", "gemm1": dict(g), "gemm2": dict(g), "_us": 5.0}
    shipped = {"BLOCK_M": 64, "decode": False, "reduce": "buffer", "_us": 4.0,
               "gemm1": {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
               "gemm2": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}}
    strip = {k: v for k, v in bf.items() if k != "_us"}
    blocks = {}
    for T in (16, 128, 1024):
        c = quant_sorted_candidates("int4_w4a16", T, bf, shipped)
        assert c[0] == strip and {k: v for k, v in shipped.items() if k != "_us"} in c
        for e in c:
            validate_entry(e)
        blocks[T] = sorted((e["BLOCK_M"], e["gemm1"]["BLOCK_N"], e["gemm1"]["BLOCK_K"]) for e in c[1:])
    qpairs, pairs = [(16, 32, 256), (16, 64, 256), (32, 64, 256)], [(64, 64, 64), (64, 64, 128), (128, 128, 128)]
    assert blocks[16] == sorted(qpairs + [(64, 64, 64)])  # (the shipped tile, listed once)
    assert blocks[128] == sorted(qpairs + pairs) and blocks[1024] == pairs
    fp8 = quant_sorted_candidates("fp8_w8a8", 128, bf, None)
    assert fp8 == [{k: v for k, v in w8a8_tiles(bf).items() if k != "_us"}]
    # int8_w8a16: from T = 128 also the 64-row block (SWAP_AB's default there); its T = 1 tiles take no TMA
    from composer.kernels.triton.tune import quant_decode_candidates

    assert quant_sorted_candidates("int8_w8a16", 16, bf, None) == [strip]
    i8 = quant_sorted_candidates("int8_w8a16", 1024, bf, None)
    assert i8[0] == strip and [(e["BLOCK_M"], e["gemm1"]["BLOCK_N"], e["gemm1"]["BLOCK_K"]) for e in i8[1:]] == [(64, 64, 128)]
    validate_entry(i8[1])
    assert not any(g.get("tma") for g in quant_decode_candidates("int8_w8a16"))
    assert any(g.get("tma") for g in quant_decode_candidates("fp8_w8a8"))


def test_tuner_sorted_keys_take_the_fastest_candidate():
    """tune.sorted_entries: per T the fastest candidate with its _us (fake timer); where none runs, the first
    candidate, untimed."""
    from composer.kernels.triton.tune import sorted_entries

    a, b = {"name": "a"}, {"name": "b"}
    cost = {(1024, "a"): 2.0, (1024, "b"): 1.5, (4096, "a"): 3.0, (4096, "b"): 4.0}
    out = sorted_entries(lambda T: [a, b], lambda T, c: cost[(T, c["name"])], (1024, 4096))
    assert out == {1024: {"name": "b", "_us": 1500.0}, 4096: {"name": "a", "_us": 3000.0}}
    assert sorted_entries(lambda T: [a, b], lambda T, c: float("inf"), (1024,)) == {1024: {"name": "a"}}


def test_tune_quant_tables_keeps_the_fastest_sorted_tiles(tmp_path, monkeypatch):
    """tune_quant_tables end to end with fake timers (CPU; the GPU tuner times real calls the same way): the T = 1
    entry from tune_quant_decode, and at the bfloat16 table's keys from T = 16 up (and the shipped table's own
    expert-sorted keys there) the fastest of the bfloat16 tile, the shipped int4 tile and the INT4_QPAIRS / INT4_PAIRS
    candidates; here a 32-row block at 128, the shipped tile at 256 (a key only the int4 table has) and 1024, a
    64-row block at 4096."""
    import json

    from composer.kernels.triton import configs, tune

    g = {"BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    bf16_entry = {"BLOCK_M": 128, "decode": False, "reduce": "buffer", "gemm1": dict(g), "gemm2": dict(g)}
    small = {"BLOCK_M": 16, "decode": False, "reduce": "atomic", "gemm1": {**g, "num_warps": 4},
             "gemm2": {**g, "num_warps": 4}}
    shipped_1024 = {"BLOCK_M": 32, "decode": False, "reduce": "atomic", "gemm1": {**g, "BLOCK_N": 64, "num_warps": 4},
                    "gemm2": {**g, "BLOCK_N": 64, "num_warps": 4}}
    shipped_256 = {**bf16_entry, "BLOCK_M": 64}
    tables = {"bfloat16": {1: small, 128: small, 1024: bf16_entry, 4096: bf16_entry},
              "int4_w4a16": {1: small, 256: shipped_256, 1024: shipped_1024}}
    monkeypatch.setattr(configs, "tuned_table", lambda E, N, K, dev, dtype, cap=None: ("x", tables[dtype]))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    t1 = {**small, "decode": True}
    monkeypatch.setattr(tune, "tune_quant_decode", lambda *a, **kw: (t1, 0.05))

    def cost(T, cfg):
        if T == 128:
            return 1.2 if cfg["BLOCK_M"] == 32 else 3.0
        if T == 256:
            return 1.1 if cfg == shipped_256 else 2.5
        if T == 1024:
            return 1.0 if cfg == shipped_1024 else 2.0
        return 1.5 if (cfg["BLOCK_M"], cfg["gemm1"]["BLOCK_K"]) == (64, 64) else 3.0

    monkeypatch.setattr(tune, "quant_timer", lambda *a, **kw: lambda x, tw, ids, cfg: cost(x.shape[0], cfg))
    (path,) = tune.tune_quant_tables(str(tmp_path), shapes={"tiny": (8, 2, 256, 128)}, methods=("int4_w4a16",),
                                     log=lambda m: None, device="cpu")
    table = json.loads(open(path).read())
    assert [k for k in table if not k.startswith("_")] == ["1", "128", "256", "1024", "4096"]
    assert table["1"] == {**t1, "_us": 50.0}
    assert table["128"]["BLOCK_M"] == 32 and table["128"]["_us"] == 1200.0
    assert table["256"] == {**shipped_256, "_us": 1100.0} and table["1024"] == {**shipped_1024, "_us": 1000.0}
    assert table["4096"]["BLOCK_M"] == 64 and table["4096"]["gemm1"]["BLOCK_K"] == 64 and table["4096"]["_us"] == 1500.0
    assert "sorted_entries" in table["_note"]


def test_tune_quant_tables_int8_w8a16(tmp_path, monkeypatch):
    """tune_quant_tables for int8_w8a16, which ships no table of its own on most GPUs (fake timers): its T = 1 entry
    from tune_quant_decode, the bfloat16 table's keys with the fastest of the bfloat16 tile and, from T = 128, the
    64-row block; the note says how they were picked."""
    import json

    from composer.kernels.triton import configs, tune

    g = {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    bf16_entry = {"BLOCK_M": 128, "decode": False, "reduce": "buffer", "gemm1": dict(g), "gemm2": dict(g)}
    small = {"BLOCK_M": 16, "decode": False, "reduce": "atomic", "gemm1": {**g, "num_warps": 4},
             "gemm2": {**g, "num_warps": 4}}
    tables = {"bfloat16": {1: small, 16: small, 1024: bf16_entry, 4096: bf16_entry}}
    monkeypatch.setattr(configs, "tuned_table",
                        lambda E, N, K, dev, dtype, cap=None: ("x", tables[dtype]) if dtype in tables else None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    t1 = {**small, "decode": True}
    monkeypatch.setattr(tune, "tune_quant_decode", lambda *a, **kw: (t1, 0.05))
    cost = {1024: {64: 1.0, 128: 2.0}, 4096: {64: 5.0, 128: 4.0}}
    monkeypatch.setattr(tune, "quant_timer", lambda *a, **kw: lambda x, tw, ids, cfg: (
        cost[x.shape[0]][cfg["BLOCK_M"]] if x.shape[0] in cost else 1.0))
    (path,) = tune.tune_quant_tables(str(tmp_path), shapes={"tiny": (8, 2, 256, 128)}, methods=("int8_w8a16",),
                                     log=lambda m: None, device="cpu")
    assert "dtype=int8_w8a16" in path
    table = json.loads(open(path).read())
    assert [k for k in table if not k.startswith("_")] == ["1", "16", "1024", "4096"]
    assert table["1"] == {**t1, "_us": 50.0} and table["16"] == {**small, "_us": 1000.0}
    assert table["1024"]["BLOCK_M"] == 64 and table["1024"]["_us"] == 1000.0
    assert table["4096"] == {**bf16_entry, "_us": 4000.0}
    for key, entry in table.items():
        if not key.startswith("_"):
            validate_entry({k: v for k, v in entry.items() if k != "_us"})


def test_tuner_small_t_times_real_calls_on_cpu():
    """small_t_entries with quant_timer, the tuner's timer, on a tiny int4 shape under the interpreter: both
    candidates run (each call checked finite) and the result is a valid key."""
    from composer.kernels.triton.tune import quant_timer, small_t_entries

    E, k, H, I = 4, 2, 64, 32
    x, tw, ids, w13, w2, _, _ = make_case(3, E, k, H, I, torch.float16, False, 0.0, seed=11)
    w = quantize("int4_w4a16", w13, w2, group_size=32)
    srt = {"BLOCK_M": 16, "decode": False, "reduce": "atomic",
           "gemm1": {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
           "gemm2": {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}}
    with interpreter():
        timer = quant_timer(w, rep_ms=1)
        keys = small_t_entries(gemv_cfg(16, 32, 8, 32, 1), lambda T: srt,
                               lambda T, cfg: timer(x[:T], tw[:T], ids[:T], cfg), tokens=(2,))
    assert list(keys) == [2] and 0 < keys[2]["_us"] < float("inf")
    validate_entry({kk: v for kk, v in keys[2].items() if kk != "_us"})


@pytest.mark.parametrize("rot, stages", [(0, 3), (7, 2)])
def test_stream_probe_reads_every_word(rot, stages):
    """scripts/stream_probe.py's read-only kernel, under the interpreter: each program walks its rows' K tiles (in
    rotated order with rot) and the row sums equal torch's, so a timing it reports covers every byte once."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "stream_probe", Path(__file__).resolve().parents[2] / "scripts" / "stream_probe.py")
    sp = importlib.util.module_from_spec(spec)
    g = torch.Generator().manual_seed(rot)
    w = torch.randint(-1000, 1000, (8, 64 + 8), generator=g, dtype=torch.int32)  # 8 words of row padding
    out = torch.empty(8, dtype=torch.int32)
    with interpreter():
        spec.loader.exec_module(sp)  # (a plain @triton.jit kernel is interpreted if defined under the interpreter)
        sp._stream[(2,)](w, out, 64, w.stride(0), ROWS=4, WORDS=16, ROT=rot, STAGES=stages)
    assert torch.equal(out, w[:, :64].sum(1).to(torch.int32))


def test_stream_probe_read_alone_takes_each_launchs_fastest_fitting_tile():
    """stream_probe.read_alone_us under the interpreter, with a fake timer: only tiles that divide a matrix are
    tried, each launch keeps its fastest, the launches are timed together last, and every word is read (the row
    sums are checked inside); a row that is no whole number of words, or a matrix no tile divides, is refused."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "stream_probe", Path(__file__).resolve().parents[2] / "scripts" / "stream_probe.py")
    sp = importlib.util.module_from_spec(spec)
    times = iter([3.0, 1.0, 2.0, 4.0, 9.0])  # matrix 0: two fitting tiles; matrix 1: two; then the call
    calls = []
    tiles = ((4, 16), (2, 8), (8, 4), (2, 16), (16, 64))  # (rows per program, words per step)

    def fake(fn):
        fn()
        calls.append(1)
        return next(times)

    with interpreter():
        spec.loader.exec_module(sp)
        assert sp.fitting_tiles(8, 64, tiles) == [(4, 16), (2, 8), (8, 4), (2, 16)]  # 16 words: not 16 rows
        # 8 rows of 8 words: (2, 8) and (8, 4); 6 rows of 16 words: (2, 8) and (2, 16)
        us, per = sp.read_alone_us([(8, 32), (6, 64)], torch.device("cpu"), fake, tiles=tiles)
    assert us == 9.0 and per == [(1.0, (8, 4)), (2.0, (2, 8))] and len(calls) == 5
    with pytest.raises(ValueError, match="multiple of 4 bytes"):
        sp.fitting_tiles(8, 62, tiles)
    with pytest.raises(ValueError, match="no tile"):
        sp.fitting_tiles(7, 60, tiles)


@gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_gemm1_split_k(dtype):
    """gemm1.SPLIT_K 2 and 4 on the GPU (bf16 included, which the interpreter cannot check): int4 subnormal and
    unquantized, both reductions, against kernel=torch / the oracle and the unsplit GEMM1."""
    x, tw, ids, w13, w2, b13, b2 = make_case(1, 8, 4, 512, 256, dtype, True, 0.2, seed=7, device="cuda")
    w = quantize("int4_w4a16", w13, w2, b13, b2, group_size=128)
    refs = {"int4_w4a16": TorchExperts().apply(x, tw, ids, w, "silu").double(),
            "none": oracle_experts(x, tw, ids, w13, w2, "silu", b13, b2)}
    with interpreter(False):
        for method, ref in refs.items():
            outs = []
            for split in (1, 2, 4):
                for reduce in ("atomic", "buffer"):
                    cfg = gemv_cfg(16, 128, 32, 128, 2, reduce)
                    cfg["gemm1"]["SPLIT_K"] = split
                    if method == "none":
                        outs.append(fused_experts(x, tw, ids, w13, w2, b13, b2, "silu", config=validate_entry(cfg)))
                        continue
                    cfg["gemm1"]["int4_read"] = cfg["gemm2"]["int4_read"] = "subnormal"
                    outs.append(fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", method,
                                                    w.w13_scale, w.w2_scale, config=validate_entry(cfg)))
            for out in outs:
                assert torch.isfinite(out).all() and rel(out, ref) < 1e-2, (method, rel(out, ref))
                assert rel(out, outs[0].double()) < 1e-2, method


@pytest.mark.parametrize("method", ["none", "int8_w8a8"])
def test_no_path_reads_unwritten_memory(method, monkeypatch):
    """Every buffer the Triton experts allocate without initializing is handed out full of inf (ints: -7; inf, not
    NaN, because tl.maximum drops NaN): the output must still match kernel=torch. Dropped pairs leave their
    intermediate rows, partial sums and per-pair output rows unwritten; w8a8's amax pass reads a dropped pair's row,
    whose garbage must not reach the output."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("inf") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))
    x, tw, ids, w13, w2, b13, b2 = make_case(2, 5, 3, 64, 32, torch.float32, True, 0.4, seed=11)
    if method == "none":
        ref = oracle_experts(x, tw, ids, w13, w2, "silu", b13, b2)
    else:
        w = quantize(method, w13, w2, b13, b2)
        ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
    cfgs = [gemv_cfg(8, 32, 8, 32, 2, reduce) for reduce in ("atomic", "buffer")]
    cfgs += [{**c, "gemm1": {**c["gemm1"], "SPLIT_K": 2}} for c in cfgs]
    cfgs += [{"BLOCK_M": 16, "decode": d, "reduce": r, "gemm1": {"BLOCK_N": 16, "BLOCK_K": 16},
              "gemm2": {"BLOCK_N": 16, "BLOCK_K": 16}} for d in (True, False) for r in ("atomic", "buffer")]
    with interpreter():
        for cfg in cfgs:
            if x.shape[0] != 1 and cfg["decode"]:
                xs, tws, idss = x[:1], tw[:1], ids[:1]  # (the decode entries are for T = 1)
                r = ref[:1]
            else:
                xs, tws, idss, r = x, tw, ids, ref
            if method == "none":
                out = fused_experts(xs, tws, idss, w13, w2, b13, b2, "silu", config=validate_entry(cfg))
            else:
                out = fused_experts_quant(xs, tws, idss, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", method,
                                          w.w13_scale, w.w2_scale, config=validate_entry(cfg))
            assert torch.isfinite(out).all() and rel(out, r) < TOL_W8A8[torch.float32], (cfg, rel(out, r))
