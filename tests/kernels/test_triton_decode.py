"""The one-launch decode (``"launches": 1``, composer/kernels/triton/decode.py): GEMM1, GEMM2 and the top-k sum in
one kernel, GEMM2 tiles waiting on their pair's GEMM1 tiles. Against the float64 oracle and kernel=torch under the
interpreter (fp32 / fp16; the interpreter runs programs one after another, so it checks the tickets, flags, partials
and the reset of the sync words, not the concurrency); on the GPU at the three benchmark shapes for every method,
repeated calls bit-identical (a race would show up as a difference) and CUDA-graph replay."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from composer.kernels.reference import oracle_experts  # noqa: E402
from composer.kernels.torch_backend import TorchExperts  # noqa: E402
from composer.kernels.triton import decode, fused  # noqa: E402
from composer.kernels.triton.configs import validate_entry  # noqa: E402
from composer.kernels.triton.fused import fused_experts, fused_experts_quant  # noqa: E402

from .test_triton_experts import interpreter, make_case, rel  # noqa: E402
from .test_triton_quant import ALL_VARIANTS, GPU_TOL, SHAPES, TOL, TOL_W8A8, quantize  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
gpu = pytest.mark.gpu


def one_launch(bn1=8, bk1=32, bn2=8, bk2=32, split=2, mma=False, warps=4, **tile) -> dict:
    return validate_entry({"BLOCK_M": 16, "decode": "gemv", "launches": 1,
                           "gemm1": {"BLOCK_N": bn1, "BLOCK_K": bk1, "num_warps": warps, "num_stages": 2, "mma": mma,
                                     **tile},
                           "gemm2": {"BLOCK_N": bn2, "BLOCK_K": bk2, "num_warps": warps, "num_stages": 2,
                                     "SPLIT_K": split, "mma": mma, **tile}})


@pytest.fixture
def launches(monkeypatch):
    """Counts the one-launch kernels and the two-launch GEMVs, so a test knows which path ran."""
    calls = []
    real_one, real_gemv = fused.decode_one_launch, fused.gemv

    def one(*a, **kw):
        calls.append("one")
        return real_one(*a, **kw)

    def two(*a, **kw):
        calls.append("gemv")
        return real_gemv(*a, **kw)

    monkeypatch.setattr(fused, "decode_one_launch", one)
    monkeypatch.setattr(fused, "gemv", two)
    return calls


def sync_words_are_zero() -> bool:
    return all(int(b.abs().sum()) == 0 for b in decode._SYNC.values())


# T, E, k, H, I, dtype, act, bias, drop, cfg
PLAIN_CASES = [
    (1, 4, 2, 64, 32, torch.float32, "silu", True, 0.0, one_launch()),
    (1, 3, 3, 48, 40, torch.float16, "gelu", False, 0.0, one_launch(16, 64, 4, 16, 4)),  # top_k = E, ragged tiles
    (3, 5, 2, 52, 20, torch.float32, "swigluoai", True, 0.3, one_launch(4, 16, 16, 64, 1)),  # dropped pairs, T > 1
    (2, 6, 4, 40, 24, torch.float16, "silu", True, 0.0, one_launch(8, 16, 8, 16, 3)),  # split-K, K not multiple
]


@pytest.mark.parametrize("case", PLAIN_CASES, ids=lambda c: f"T{c[0]}E{c[1]}k{c[2]}H{c[3]}I{c[4]}{str(c[5])[6:]}{c[6]}")
def test_interpreter_one_launch_vs_oracle(case, launches):
    T, E, k, H, I, dtype, act, bias, drop, cfg = case
    x, tw, ids, w13, w2, b13, b2 = make_case(T, E, k, H, I, dtype, bias, drop, seed=H * 5 + I)
    with interpreter():
        out = fused_experts(x, tw, ids, w13, w2, b13, b2, act, config=cfg)
        again = fused_experts(x, tw, ids, w13, w2, b13, b2, act, config=cfg)
    assert launches == ["one", "one"]
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel(out, oracle_experts(x, tw, ids, w13, w2, act, b13, b2)) < tol
    assert torch.equal(out, again)  # the partials are summed in a fixed order, and the sync words were reset
    assert sync_words_are_zero()


def test_interpreter_one_launch_equals_two_launches(launches):
    """Same products, only the order of the fp32 top-k sum differs."""
    x, tw, ids, w13, w2, b13, b2 = make_case(2, 4, 4, 72, 40, torch.float32, True, 0.2, seed=3)
    with interpreter():
        one = fused_experts(x, tw, ids, w13, w2, b13, b2, "silu", config=one_launch(8, 16, 16, 16, 3))
        two = fused_experts(x, tw, ids, w13, w2, b13, b2, "silu",
                            config={**one_launch(8, 16, 16, 16, 3), "launches": 2})
    assert launches == ["one", "gemv", "gemv"]
    assert rel(one, two.double()) < 1e-6


def test_interpreter_one_launch_all_dropped_and_empty():
    with interpreter():
        x, tw, ids, w13, w2, _, _ = make_case(0, 4, 2, 32, 16, torch.float32, False, 0.0, seed=0)
        assert fused_experts(x, tw, ids, w13, w2, config=one_launch()).shape == (0, 32)
        x, tw, ids, w13, w2, b13, b2 = make_case(2, 4, 2, 32, 16, torch.float32, True, 0.0, seed=1)
        ids[:] = -1
        out = fused_experts(x, tw, ids, w13, w2, b13, b2, config=one_launch())
    assert torch.equal(out, torch.zeros_like(x))  # a dropped pair adds nothing, not even its bias
    assert sync_words_are_zero()


QUANT_CASES = [  # method, params, dtype, extra tile keys
    ("int8_w8a16", {}, torch.float16, {}),
    ("int8_w8a8", {}, torch.float32, {}),
    ("int8_w8a8", {}, torch.float16, {"mma": True}),
    ("int4_w4a16", {"group_size": 16, "zero_point": True}, torch.float16, {}),
    ("int4_w4a16", {"group_size": 32}, torch.float32, {"int4_read": "planes", "unroll": 2}),
    ("int4_w4a16", {"group_size": 48, "zero_point": True}, torch.float16, {"int4_read": "planes"}),
]


@pytest.mark.parametrize("method,params,dtype,tile", QUANT_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_interpreter_one_launch_quant_vs_torch(method, params, dtype, tile, launches):
    """Every weight format through the shared tile code (_gemv_acc), with bias, a dropped pair and split-K; w8a8
    quantizes the token's row in GEMM1's programs and the pair's intermediate row in GEMM2's."""
    x, tw, ids, w13, w2, b13, b2 = make_case(2, 5, 2, 96, 96, dtype, True, 0.2, seed=11)
    w = quantize(method, w13, w2, b13, b2, **params)
    cfg = one_launch(8, 32, 16, 32, 2, **tile)
    with interpreter():
        out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", method, w.w13_scale,
                                  w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=cfg)
    assert launches == ["one"]
    tol = (TOL_W8A8 if method == "int8_w8a8" else TOL)[dtype]
    assert rel(out, TorchExperts().apply(x, tw, ids, w, "silu").double()) < tol
    assert sync_words_are_zero()


def test_config_validation_of_launches():
    validate_entry(one_launch())
    for value in (0, 3, True, "one"):
        with pytest.raises(ValueError, match="launches must be 1"):
            validate_entry({**one_launch(), "launches": value})
    with pytest.raises(ValueError, match="launches 1 needs decode \"gemv\""):
        validate_entry({**one_launch(16, 32, 16, 32, 1), "decode": True})
    with pytest.raises(ValueError, match="drop reduce 'buffer'"):
        validate_entry({**one_launch(), "reduce": "buffer"})
    bad = one_launch()
    bad["gemm2"] = {**bad["gemm2"], "num_warps": 8}
    with pytest.raises(ValueError, match="same num_warps and num_stages, got 4/8"):
        validate_entry(bad)


def test_sync_words_grow_and_keep_the_old_buffer():
    """A larger batch gets a larger zeroed buffer; the outgrown one stays alive (a captured graph may use it)."""
    dev = torch.device("cpu")
    small = decode._sync_words(dev, 8)
    assert decode._sync_words(dev, 8) is small
    big = decode._sync_words(dev, small.numel() + 1)
    assert big.numel() > small.numel() and int(big.abs().sum()) == 0
    assert any(b is small for b in decode._RETIRED)


# ------------------------------------------------------------------------------------------------ GPU

GPU_ONE = {"BLOCK_M": 16, "decode": "gemv", "reduce": "atomic", "launches": 1,
           "gemm1": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2},
           "gemm2": {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2, "SPLIT_K": 4}}
GPU_ONE_PLANES = {**GPU_ONE, "gemm1": {**GPU_ONE["gemm1"], "int4_read": "planes", "unroll": 2},
                  "gemm2": {**GPU_ONE["gemm2"], "int4_read": "planes", "unroll": 2}}
GPU_ONE_MMA = {**GPU_ONE, "gemm1": {**GPU_ONE["gemm1"], "mma": True}, "gemm2": {**GPU_ONE["gemm2"], "mma": True}}


@gpu
@cuda
@pytest.mark.parametrize("cfg", [GPU_ONE, GPU_ONE_PLANES, GPU_ONE_MMA], ids=["fma", "planes", "mma"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_one_launch_three_shapes(shape, cfg):
    """bf16 and every method at T = 1 vs the oracle / kernel=torch; each result equal bit for bit over repeated
    calls (GEMM2 tiles really wait for their pair's intermediate, the sync words really reset)."""
    E, k, H, I = SHAPES[shape]
    x, tw, ids, w13, w2, _, _ = make_case(1, E, k, H, I, torch.bfloat16, False, 0.0, seed=0, device="cuda")
    out = fused_experts(x, tw, ids, w13, w2, config=cfg)
    err = rel(out, oracle_experts(x, tw, ids, w13, w2, "silu"))
    print(f"[one-launch-gpu] {shape} bf16 T=1: rel err vs float64 oracle {err:.2e}")
    assert err < 1e-2
    for _ in range(10):
        assert torch.equal(fused_experts(x, tw, ids, w13, w2, config=cfg), out)
    for method, params in ALL_VARIANTS:
        w = quantize(method, w13, w2, **params)
        ex = w.extra or {}

        def run():
            return fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", method, w.w13_scale, w.w2_scale,
                                       w.a13_scale, w.a2_scale, w.w13_zero, w.w2_zero,
                                       ex.get("granularity", "per_token_channel"), *ex.get("block_shape", (128, 128)),
                                       config=cfg)

        out = run()
        err = rel(out, TorchExperts().apply(x, tw, ids, w, "silu").double())
        print(f"[one-launch-gpu] {shape} {method} {params} T=1: rel err vs kernel=torch {err:.2e}")
        assert err < GPU_TOL[method], (shape, method, params, err)
        if ex.get("granularity") != "block":  # (block fp8 runs the tl.dot decode, whose atomics add in any order)
            for _ in range(5):
                assert torch.equal(run(), out), (shape, method, params)
        del w
        torch.cuda.empty_cache()
    torch.cuda.synchronize()
    assert sync_words_are_zero()


@gpu
@cuda
def test_gpu_one_launch_graph_replay():
    """The one-launch decode captures into a CUDA graph (its sync words reset inside the kernel) and replays on new
    inputs, many times, equal to eager calls."""
    from composer.tasks.bench import capture_graph

    E, k, H, I = 128, 8, 2048, 768
    x, tw, ids, w13, w2, _, _ = make_case(1, E, k, H, I, torch.bfloat16, False, 0.0, seed=3, device="cuda")
    w = quantize("int4_w4a16", w13, w2, group_size=128)

    def run(a):
        return fused_experts_quant(a, tw, ids, w.w13, w.w2, None, None, "silu", "int4_w4a16", w.w13_scale,
                                   w.w2_scale, config=GPU_ONE_PLANES)

    eager = run(x)
    static_x = x.clone()
    graph, gout = capture_graph(lambda: run(static_x))
    for seed in range(20):
        new_x = torch.randn(x.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        static_x.copy_(new_x.to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(gout, run(static_x)), seed
    assert not torch.equal(gout, eager)
    assert sync_words_are_zero()
