"""Quantized experts on the Triton backend vs kernel=torch (the dequantized oracle, to kernel rounding).

CPU (TRITON_INTERPRET=1, fp32/fp16): int8_w8a16, int4_w4a16 (symmetric, zero points, one group per row),
int8_w8a8 -- the interpreter's fp8 conversions and dots are wrong, so fp8 runs on the GPU only (and
``TritonExperts.check`` refuses it under the interpreter). GPU (marked): every method at the three
benchmark shapes, T in {1, 128, 4096}, and the activation quantizer bit for bit against composer.quant.
"""
from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")

from composer.kernels.torch_backend import TorchExperts  # noqa: E402
from composer.kernels.triton_backend import TritonExperts  # noqa: E402
from composer.layers.modular_kernel import ExpertWeights  # noqa: E402
from composer.quant import utils as qu  # noqa: E402

from .test_triton_experts import interpreter, make_case, rel  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
gpu = pytest.mark.gpu

# (method, extra params) -> every variant the Triton backend claims
CPU_VARIANTS = [
    ("int8_w8a16", {}),
    ("int8_w8a8", {}),
    ("int4_w4a16", {"group_size": 16, "zero_point": False}),
    ("int4_w4a16", {"group_size": 16, "zero_point": True}),
    ("int4_w4a16", {"group_size": -1, "zero_point": True}),
]
FP8_VARIANTS = [
    ("fp8_w8a8", {"granularity": "per_tensor"}),
    ("fp8_w8a8", {"granularity": "per_tensor", "activation_scheme": "static"}),
    ("fp8_w8a8", {"granularity": "per_token_channel"}),
    ("fp8_w8a8", {"granularity": "block", "block_shape": (128, 128)}),
]


def _recorded(monkeypatch, module, name: str, pick) -> list:
    """A list that receives ``pick(result)`` of every call of ``module.name`` from here on (the call is unchanged):
    which path a launch chose."""
    real, seen = getattr(module, name), []

    def spy(*a, **kw):
        r = real(*a, **kw)
        seen.append(pick(r))
        return r

    monkeypatch.setattr(module, name, spy)
    return seen


def quantize(method: str, w13: torch.Tensor, w2: torch.Tensor, b13=None, b2=None, **p) -> ExpertWeights:
    """ExpertWeights as the quant method builds them (composer.quant's quantizers and layouts)."""
    kw: dict = {"w13_bias": b13, "w2_bias": b2, "quant": method}
    if method in ("int8_w8a16", "int8_w8a8"):
        (q13, s13), (q2, s2) = qu.quant_int8_per_channel(w13), qu.quant_int8_per_channel(w2)
        return ExpertWeights(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2, **kw)
    if method == "int4_w4a16":
        g, zp = p.get("group_size", 128), p.get("zero_point", False)
        q13, s13, z13 = qu.quant_int4(w13, g, zp, w13.dtype)
        q2, s2, z2 = qu.quant_int4(w2, g, zp, w2.dtype)
        return ExpertWeights(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2, w13_zero=z13, w2_zero=z2,
                             extra={"group_size": g, "zero_point": zp}, **kw)
    gran = p.get("granularity", "per_token_channel")
    bs = tuple(p.get("block_shape", (128, 128)))
    scheme = p.get("activation_scheme", "dynamic")
    quant = {"per_tensor": qu.quant_fp8_per_tensor, "per_token_channel": qu.quant_fp8_per_channel,
             "block": lambda w: qu.quant_fp8_block(w, *bs)}[gran]
    (q13, s13), (q2, s2) = quant(w13), quant(w2)
    a13 = a2 = None
    if scheme == "static":
        a13 = torch.tensor(4.0 / 448, device=w13.device)
        a2 = torch.tensor(0.5 / 448, device=w13.device)
    return ExpertWeights(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2, a13_scale=a13, a2_scale=a2,
                         extra={"granularity": gran, "block_shape": bs, "activation_scheme": scheme}, **kw)


def both(x, tw, ids, weights, act="silu"):
    ref = TorchExperts().apply(x, tw, ids, weights, act)
    out = TritonExperts().apply(x, tw, ids, weights, act)
    return out, ref


# ------------------------------------------------------------------------------------------------ CPU

# tolerances vs kernel=torch: fp32 differs by summation order only; fp16 by where the kernel rounds
# (its GEMM1 epilogue is fp32, kernel=torch rounds h to fp16 before the activation)
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}
# w8a8: the GEMM2 input is quantized from the rounded intermediate, so a one-quantum flip of a value on a
# rounding boundary (different summation order in GEMM1) moves the output by ~1/127 of that element
TOL_W8A8 = {torch.float32: 2e-3, torch.float16: 1e-2}

CPU_CASES = [
    # T, E, k, H, I, dtype, bias, drop, decode
    (0, 4, 2, 32, 16, torch.float32, False, 0.0, False),
    (1, 4, 2, 32, 16, torch.float32, True, 0.0, True),
    (1, 3, 3, 48, 32, torch.float16, False, 0.0, False),  # top_k = num_experts
    (7, 5, 2, 48, 16, torch.float32, True, 0.25, False),  # H not a multiple of BLOCK_K, dropped pairs
    (9, 3, 3, 32, 48, torch.float16, False, 0.0, True),  # I not a multiple of BLOCK_N
]


def _cfg(decode: bool, reduce: str = "atomic") -> dict:
    g = {"BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 16, "decode": decode, "reduce": reduce, "gemm1": dict(g), "gemm2": dict(g)}


@pytest.mark.parametrize("method,params", CPU_VARIANTS, ids=lambda v: str(v))
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"T{c[0]}E{c[1]}k{c[2]}H{c[3]}I{c[4]}{str(c[5])[6:]}")
def test_interpreter_vs_torch(method, params, case):
    from composer.kernels.triton.fused import fused_experts_quant

    T, E, k, H, I, dtype, bias, drop, decode = case
    x, tw, ids, w13, w2, b13, b2 = make_case(T, E, k, H, I, dtype, bias, drop, seed=T * 31 + H + I)
    w = quantize(method, w13, w2, b13, b2, **params)
    ref = TorchExperts().apply(x, tw, ids, w, "silu")
    with interpreter():
        for reduce in ("atomic", "buffer") if T == 7 else ("atomic",):
            out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", method,
                                      w.w13_scale, w.w2_scale, None, None, w.w13_zero, w.w2_zero,
                                      config=_cfg(decode, reduce))
            assert out.shape == x.shape and out.dtype == x.dtype
            if T == 0:
                assert out.numel() == 0
                continue
            tol = (TOL_W8A8 if method == "int8_w8a8" else TOL)[dtype]
            if reduce == "buffer" and dtype == torch.float32:
                tol = max(tol, 1e-5)
            err = rel(out, ref.double())
            assert err < tol, f"{method} {params} {case} reduce={reduce}: rel err {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("stages", ["both", "a13", "a2"])
@pytest.mark.parametrize("T,decode,dtype", [(0, True, torch.float32), (1, True, torch.float32),
                                            (7, False, torch.float16), (9, True, torch.float32)])
def test_interpreter_int8_w8a8_static_scales_match_torch(stages, T, decode, dtype):
    """ExpertWeights with static per-tensor activation scales: the Triton kernels used them and kernel=torch
    quantized per token (rel. difference 0.4). Each stage given a scale now uses it on both backends; the scales
    here clamp the largest activations, so the clamp is compared too."""
    from composer.kernels.triton.fused import fused_experts_quant

    x, tw, ids, w13, w2, b13, b2 = make_case(T, 4, 4 if T == 1 else 2, 40, 24, dtype, True, 0.25 if T == 7 else 0.0,
                                             seed=T + 3)
    w = quantize("int8_w8a8", w13, w2, b13, b2)
    a13 = torch.tensor(0.8 * float(x.abs().max()) / 127 if T else 0.01) if stages in ("both", "a13") else None
    a2 = torch.tensor(0.02 / 127) if stages in ("both", "a2") else None
    ws = ExpertWeights(w13=w.w13, w2=w.w2, w13_bias=w.w13_bias, w2_bias=w.w2_bias, quant="int8_w8a8",
                       w13_scale=w.w13_scale, w2_scale=w.w2_scale, a13_scale=a13, a2_scale=a2)
    ref = TorchExperts().apply(x, tw, ids, ws, "silu")
    dynamic = TorchExperts().apply(x, tw, ids, w, "silu")
    with interpreter():
        outs = [TritonExperts().apply(x, tw, ids, ws, "silu"),
                fused_experts_quant(x, tw, ids, ws.w13, ws.w2, ws.w13_bias, ws.w2_bias, "silu", "int8_w8a8",
                                    ws.w13_scale, ws.w2_scale, a13, a2, None, None, config=_cfg(decode))]
    for out in outs:
        assert out.shape == x.shape and out.dtype == x.dtype
        if T:
            assert rel(out, ref.double()) < TOL_W8A8[dtype], (stages, T)
    if T:  # (the static scales change the answer: the comparison above is not dynamic against dynamic)
        assert rel(ref, dynamic.double()) > 3 * TOL_W8A8[dtype]


def test_torch_fp8_activation_quantizer_takes_a_stages_static_scale():
    """fp8 weights given one stage's static scale (what the Triton kernels take for per_tensor and
    per_token_channel): that stage quantizes with it, the other per token."""
    w = quantize("fp8_w8a8", torch.randn(2, 16, 32), torch.randn(2, 32, 8), granularity="per_token_channel")
    ws = ExpertWeights(w13=w.w13, w2=w.w2, quant="fp8_w8a8", w13_scale=w.w13_scale, w2_scale=w.w2_scale,
                       a13_scale=torch.tensor(0.01), extra=w.extra)
    from composer.quant.fp8 import Fp8W8A8

    t = torch.randn(5, 32) * 3
    q = Fp8W8A8.activation_quantizer(ws)
    assert torch.equal(q(t, "a13"), qu.qdq_fp8_static(t, torch.tensor(0.01)))
    assert torch.equal(q(t, "a2"), qu.qdq_fp8_per_token(t))


def test_interpreter_int4_group_spans_tiles():
    """int4 with a group smaller than the K tile (scales gathered per element, no GROUP_TILE)."""
    from composer.kernels.triton.fused import fused_experts_quant

    x, tw, ids, w13, w2, _, _ = make_case(5, 4, 2, 64, 32, torch.float32, False, 0.0, seed=3)
    w = quantize("int4_w4a16", w13, w2, group_size=8, zero_point=True)
    ref = TorchExperts().apply(x, tw, ids, w, "gelu")
    cfg = _cfg(False)
    with interpreter():
        out = fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "gelu", "int4_w4a16", w.w13_scale, w.w2_scale,
                                  None, None, w.w13_zero, w.w2_zero, config=cfg)
    assert rel(out, ref.double()) < 1e-5


@pytest.mark.parametrize("T", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("method,params", CPU_VARIANTS, ids=lambda v: str(v))
def test_interpreter_quant_default_configs_top_k_equals_num_experts(method, params, dtype, T, monkeypatch):
    """Every CPU quant variant with the heuristic tiles (config=None: the tl.dot decode at T = 1, 16-row sorted
    blocks at T = 3) and top_k = num_experts, T = 0 included, H and I off the tiles; only explicit tiles ran."""
    from composer.kernels.triton import fused
    from composer.kernels.triton.fused import fused_experts_quant

    E = k = 4
    x, tw, ids, w13, w2, b13, b2 = make_case(T, E, k, 32, 48, dtype, True, 0.0, seed=7 + T)
    w = quantize(method, w13, w2, b13, b2, **params)
    ref = TorchExperts().apply(x, tw, ids, w, "silu")
    decodes = _recorded(monkeypatch, fused, "quant_config", lambda c: c["decode"])
    with interpreter():
        out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", method, w.w13_scale,
                                  w.w2_scale, None, None, w.w13_zero, w.w2_zero)
    assert out.shape == (T, 32) and out.dtype == dtype
    assert decodes == ([] if T == 0 else [T == 1])  # (T = 0 returns before any config is looked up)
    if T:
        tol = (TOL_W8A8 if method == "int8_w8a8" else TOL)[dtype]
        assert torch.isfinite(out).all() and rel(out, ref.double()) < tol, rel(out, ref.double())


@pytest.mark.parametrize("act", ["gelu", "swigluoai"])
@pytest.mark.parametrize("method,params", CPU_VARIANTS, ids=lambda v: str(v))
def test_interpreter_quant_activations(method, params, act):
    """gelu and swigluoai on the quantized expert-sorted (T = 7, dropped pairs) and tl.dot decode (T = 1) paths of
    every CPU variant; only silu ran there. swigluoai takes the gate half first, then up (act_and_mul's layout, which
    kernel=torch applies to the same w13), and x is scaled so that its clamps at +-7 take part."""
    from composer.kernels.triton.fused import fused_experts_quant

    for T, E, k, H, I, drop, decode, reduce in ((7, 5, 2, 48, 16, 0.25, False, "buffer"),
                                                (1, 4, 2, 32, 16, 0.0, True, "atomic")):
        x, tw, ids, w13, w2, b13, b2 = make_case(T, E, k, H, I, torch.float32, True, drop, seed=80 + T)
        if act == "swigluoai":
            x = x * 8
        w = quantize(method, w13, w2, b13, b2, **params)
        ref = TorchExperts().apply(x, tw, ids, w, act).double()
        with interpreter():
            out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, act, method, w.w13_scale,
                                      w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=_cfg(decode, reduce))
        tol = (TOL_W8A8 if method == "int8_w8a8" else TOL)[torch.float32]
        assert torch.isfinite(out).all() and rel(out, ref) < tol, (T, act, rel(out, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("H,I,group,zero_point", [(40, 20, 10, False), (48, 30, 6, True), (60, 36, 12, False)],
                         ids=["g10", "g6-zp", "g12"])
def test_interpreter_int4_groups_not_powers_of_two(H, I, group, zero_point, dtype):
    """int4 scale groups of 6, 10 and 12 (even divisors of H and I, as Int4W4A16 accepts them) with I not a multiple
    of 8, on the expert-sorted blocks (T = 9, dropped pairs) and the tl.dot decode (T = 1); only powers of two ran."""
    import types

    from composer.kernels.triton.fused import fused_experts_quant
    from composer.quant.int4 import Int4W4A16

    params = Int4W4A16.Params(group_size=group, zero_point=zero_point)
    assert Int4W4A16.check_config(params, types.SimpleNamespace(hidden_size=H, intermediate_size=I), "cpu") == []
    for T, drop, decode in ((9, 0.2, False), (1, 0.0, True)):
        x, tw, ids, w13, w2, b13, b2 = make_case(T, 4, 2, H, I, dtype, True, drop, seed=group + T)
        w = quantize("int4_w4a16", w13, w2, b13, b2, group_size=group, zero_point=zero_point)
        ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
        with interpreter():
            out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", "int4_w4a16",
                                      w.w13_scale, w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=_cfg(decode))
        assert torch.isfinite(out).all() and rel(out, ref) < TOL[dtype], (T, rel(out, ref))


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("T,decode", [(1, True), (9, False)])
def test_interpreter_int4_group_tile_fp16(T, decode, zero_point):
    """int4 in fp16 with the K tile inside one group: the decode's INT4_MAGIC path (M + q from the bits, zero and
    scale applied after the dot) and the 16-row sorted blocks' INT4_QPAIRS (q - 8 or q, zero and scale after the
    dot) vs the float64 oracle of the dequantized weights and vs kernel=torch."""
    from composer.kernels.reference import oracle_experts
    from composer.kernels.triton.fused import QuantSpec, fused_experts_quant
    from composer.kernels.triton.gemm import _quant_args
    from composer.quant.int4 import Int4W4A16

    x, tw, ids, w13, w2, b13, b2 = make_case(T, 5, 2, 64, 96, torch.float16, True, 0.0, seed=40 + T)
    w = quantize("int4_w4a16", w13, w2, b13, b2, group_size=32, zero_point=zero_point)
    meta = _quant_args(QuantSpec(wq=2, qbk=32), None, w.w13_scale, w.w13_zero, decode, 32, 64, w.w13, torch.float16)[2]
    assert meta["GROUP_TILE"] and meta["MAGIC"] == (0x6400 if decode else 0)  # the paths under test
    cfg = _cfg(decode)
    with interpreter():
        out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", "int4_w4a16", w.w13_scale,
                                  w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=cfg)
    d = Int4W4A16.dequantize(w, torch.float64)
    oracle = oracle_experts(x, tw, ids, d.w13, d.w2, "silu", b13, b2)
    assert rel(out, oracle) < 2e-3  # fp16's tolerance vs the float64 oracle
    assert rel(out, TorchExperts().apply(x, tw, ids, w, "silu").double()) < TOL[torch.float16]


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("bm,T,k,group", [(16, 1, 2, 32), (16, 9, 5, -1), (32, 40, 2, 32)],
                         ids=["T1", "T9-topk=E-per-row", "T40-32rows"])
def test_interpreter_int4_qpairs(zero_point, bm, T, k, group, monkeypatch):
    """INT4_QPAIRS in 16- and 32-row sorted blocks: under the interpreter the q - 8 (or q) tile comes from integer
    ops instead of the PTX (whose instructions test_int4_qpairs_ptx_gives_exact_nibbles checks), and the rest of the
    path runs as compiled: the dot of exact integers, the zero point through the rows' sums, the group scale on the
    dot's result. Exact products, so the float64 oracle of the dequantized weights is met to fp32 sums, closer than
    the fp32 dequantize (INT4_QPAIRS_ON = False), which rounds each weight to fp16 as kernel=torch does; top_k = E,
    one group per row, a dropped pair, H and I not multiples of the N tile."""
    from composer.kernels.reference import oracle_experts
    from composer.kernels.triton import gemm
    from composer.kernels.triton.fused import fused_experts_quant
    from composer.quant.int4 import Int4W4A16

    x, tw, ids, w13, w2, b13, b2 = make_case(T, 5, k, 64, 96, torch.float16, True, 0.2, seed=50 + T)
    w = quantize("int4_w4a16", w13, w2, b13, b2, group_size=group, zero_point=zero_point)
    cfg = {**_cfg(False), "BLOCK_M": bm}
    cfg = {**cfg, "gemm1": {**cfg["gemm1"], "BLOCK_N": 32}, "gemm2": {**cfg["gemm2"], "BLOCK_N": 32}}
    pairs, outs = _recorded(monkeypatch, gemm, "_quant_args", lambda r: r[2]["PAIRS"]), []
    with interpreter():
        for on in (True, False):
            monkeypatch.setattr(gemm, "INT4_QPAIRS_ON", on)
            outs.append(fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", "int4_w4a16",
                                            w.w13_scale, w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=cfg))
    assert pairs == [6, 6, 0, 0]  # (fp16, no PTX: INT4_QPAIRS' integer tile in both GEMMs, then the fp32 dequantize)
    d = Int4W4A16.dequantize(w, torch.float64)
    oracle = oracle_experts(x, tw, ids, d.w13, d.w2, "silu", b13, b2)
    assert rel(outs[0], oracle) < 2e-3 and rel(outs[0], oracle) <= rel(outs[1], oracle) * 1.5
    assert rel(outs[0], TorchExperts().apply(x, tw, ids, w, "silu").double()) < TOL[torch.float16]


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("H,bk", [(64, 32), (72, 32)], ids=["even_k", "ragged_k"])
def test_interpreter_int4_sorted_blocks_dequantize(zero_point, H, bk):
    """Expert-sorted int4 blocks dequantize the weight tile ((q - zero) * scale from the bits of 2^23 + q, rounded
    to the model dtype), interleave the nibbles back into K order and accumulate in the MMA: kernel=torch's
    arithmetic, so the two agree to fp32 summation order, and the float64 oracle to fp16's tolerance."""
    from composer.kernels.reference import oracle_experts
    from composer.kernels.triton.fused import QuantSpec, fused_experts_quant
    from composer.kernels.triton.gemm import _quant_args
    from composer.quant.int4 import Int4W4A16

    group = 8 if H % 32 else 32  # (ragged K: groups smaller than the K tile, scales gathered per K pair)
    x, tw, ids, w13, w2, b13, b2 = make_case(40, 5, 2, H, 96, torch.float16, True, 0.0, seed=47)
    w = quantize("int4_w4a16", w13, w2, b13, b2, group_size=group, zero_point=zero_point)
    meta = _quant_args(QuantSpec(wq=2, qbk=group), None, w.w13_scale, w.w13_zero, False, bk, H, w.w13,
                       torch.float16)[2]
    assert meta["MAGIC"] == 0  # the path under test
    cfg = {**_cfg(False), "BLOCK_M": 64}
    cfg = {**cfg, "gemm1": {**cfg["gemm1"], "BLOCK_K": bk}, "gemm2": {**cfg["gemm2"], "BLOCK_K": bk}}
    with interpreter():
        out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", "int4_w4a16", w.w13_scale,
                                  w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=cfg)
    d = Int4W4A16.dequantize(w, torch.float64)
    assert rel(out, oracle_experts(x, tw, ids, d.w13, d.w2, "silu", b13, b2)) < 2e-3
    assert rel(out, TorchExperts().apply(x, tw, ids, w, "silu").double()) < 1e-3


def _run_ptx(text: str, args: list[int], dtype: torch.dtype, n_out: int = 4) -> list[int]:
    """The PTX of INT4_PAIRS (and INT8_Q) run in Python: mov, shr.u32, and / xor.b32, prmt.b32, lop3.b32 and packed
    fma.rn (each half rounded once: the products and sums here are exact in float32, so float32 then one cast to the
    dtype is that). ``n_out`` outputs $0.. come before the inputs."""
    regs = {f"${i}": v for i, v in enumerate([0] * n_out + args)}

    def val(tok):
        return regs[tok] if tok in regs else int(tok, 0)

    def halves(x):
        return torch.tensor([x & 0xFFFF, x >> 16], dtype=torch.int32).to(torch.int16).view(dtype).float()

    for line in text.replace("{", "").replace("}", "").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *src = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in src]
        if op == "mov.b32":
            r = a[0]
        elif op == "shr.u32":
            r = a[0] >> a[1]
        elif op == "cvt.u32.u16":
            r = a[0] & 0xFFFF
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "xor.b32":
            r = a[0] ^ a[1]
        elif op == "prmt.b32":
            pool = [(a[0] >> 8 * i) & 0xFF for i in range(4)] + [(a[1] >> 8 * i) & 0xFF for i in range(4)]
            r = sum(pool[(a[2] >> 4 * i) & 7] << 8 * i for i in range(4))
        elif op == "lop3.b32":
            r = sum(((a[3] >> ((((a[0] >> i) & 1) << 2) | (((a[1] >> i) & 1) << 1) | ((a[2] >> i) & 1))) & 1) << i
                    for i in range(32))
        elif op.startswith("fma.rn."):
            h = (halves(a[0]) * halves(a[1]) + halves(a[2])).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
            r = int(h[0]) | int(h[1]) << 16
        else:
            raise AssertionError(f"unexpected PTX op {op}")
        regs[d] = r & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(n_out)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_int4_pairs_ptx_gives_kernel_torchs_weights(dtype):
    """INT4_PAIRS' inline PTX (which only a GPU runs; test_gpu_int4_pairs_equal_the_fp32_dequantize checks it there)
    run instruction by instruction on the CPU: for random bytes, scales and zeros, each output register holds the
    byte's low and high nibble dequantized as kernel=torch does, ``((q - z) * s)`` in float32 rounded to the
    dtype, bit for bit."""
    from composer.kernels.triton import gemm

    text, M = (gemm._PAIRS_BF16.value, 128.0) if dtype == torch.bfloat16 else (gemm._PAIRS_F16.value, 1024.0)
    g = torch.Generator().manual_seed(5)

    def pair_bits(v):
        b = int(torch.tensor([v]).to(dtype).view(torch.int16)) & 0xFFFF
        return b | b << 16

    for _ in range(64):
        q = torch.randint(0, 256, (4,), generator=g)
        s = (torch.randn(4, generator=g) * 0.02).to(dtype).float()
        z = torch.randint(0, 16, (4,), generator=g).float()
        out = _run_ptx(text, [int(sum(int(q[i]) << 8 * i for i in range(4)))]
                             + [pair_bits(float(v)) for v in s] + [pair_bits(-(M + float(v))) for v in z], dtype)
        for i in range(4):
            want = ((torch.tensor([int(q[i]) & 0xF, int(q[i]) >> 4]).float() - z[i]) * s[i]).to(dtype)
            got = torch.tensor([out[i] & 0xFFFF, out[i] >> 16], dtype=torch.int32).to(torch.int16).view(dtype)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (q[i], s[i], z[i], got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("zero", [False, True], ids=["symmetric", "zero-points"])
def test_int4_qpairs_ptx_gives_exact_nibbles(dtype, zero):
    """INT4_QPAIRS' one-operand PTX run instruction by instruction on the CPU: for random bytes, each output register
    holds the byte's (low, high) nibbles as q - 8 (symmetric int4) or q (zero points, taken off after the dot),
    exactly, in the dtype's halves; a wrong selector, mask, magic number or offset fails it."""
    from composer.kernels.triton import gemm

    name = ("_QPAIRS_BF16_" if dtype == torch.bfloat16 else "_QPAIRS_F16_") + ("Q" if zero else "SYM")
    text = getattr(gemm, name).value
    g = torch.Generator().manual_seed(7)
    for _ in range(64):
        q = torch.randint(0, 256, (4,), generator=g)
        out = _run_ptx(text, [int(sum(int(q[i]) << 8 * i for i in range(4)))], dtype)
        for i in range(4):
            want = torch.tensor([int(q[i]) & 0xF, int(q[i]) >> 4]).float() - (0.0 if zero else 8.0)
            got = torch.tensor([out[i] & 0xFFFF, out[i] >> 16], dtype=torch.int32).to(torch.int16).view(dtype)
            assert torch.equal(got.float(), want), (q[i], got, want)


@pytest.mark.parametrize("pack", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_int8_q_ptx_gives_exact_integers(dtype, pack):
    """INT8_Q's PTX run instruction by instruction on the CPU: for four (or two: the swapped wgmma's form) int8
    weights in one register (every byte value, so -128, -1, 0 and 127 included), the output registers hold them as
    the dtype's exact integers, weights 0 / 1 in the first register's low / high half and 2 / 3 in the second's (the
    order Triton packs the outputs in); a wrong selector, mask or magic number fails it."""
    from composer.kernels.triton import gemm

    text = getattr(gemm, ("_INT8_BF16" if dtype == torch.bfloat16 else "_INT8_F16") + ("_2" if pack == 2 else "")).value
    vals = torch.arange(-128, 128)
    vals = torch.cat([vals, vals[torch.randperm(256, generator=torch.Generator().manual_seed(8))]]).view(-1, pack)
    for q in vals.tolist():
        out = _run_ptx(text, [sum((v & 0xFF) << 8 * i for i, v in enumerate(q))], dtype, n_out=pack // 2)
        halves = [h for r in out for h in (r & 0xFFFF, r >> 16)]
        got = torch.tensor(halves, dtype=torch.int32).to(torch.int16).view(dtype)
        assert got.float().tolist() == [float(v) for v in q], (q, got)


@pytest.mark.parametrize("T,bm,decode", [(1, 16, True), (9, 16, False), (40, 32, False), (40, 64, False)],
                         ids=["T1-decode", "T9-16rows", "T40-32rows", "T40-64rows-swapped"])
def test_interpreter_int8_q(T, bm, decode, monkeypatch):
    """INT8_Q for int8_w8a16: the integers q enter the dot (under the interpreter through Triton's conversion; the
    PTX's instructions are test_int8_q_ptx_gives_exact_integers') and the channel scales multiply its result once,
    after the K loop. The products are exact, so the float64 oracle of the dequantized weights is met to fp32 sums,
    closer than kernel=torch's dequantization (INT8_Q_ON = False), which rounds each q * scale to fp16. 64-row
    blocks swap the operands (SWAP_AB: W x A^T, transposed back after the loop), with and without INT8_Q; bias,
    top_k = E at T = 9, a dropped pair, H and I not multiples of the tiles."""
    from composer.kernels.reference import oracle_experts
    from composer.kernels.triton import gemm
    from composer.kernels.triton.fused import fused_experts_quant
    from composer.quant.int8 import Int8W8A16

    k = 5 if T == 9 else 2
    x, tw, ids, w13, w2, b13, b2 = make_case(T, 5, k, 72, 80, torch.float16, True, 0.2, seed=60 + T)
    w = quantize("int8_w8a16", w13, w2, b13, b2)
    cfg = {**_cfg(decode), "BLOCK_M": bm}
    modes, outs = _recorded(monkeypatch, gemm, "_quant_args", lambda r: r[2]["I8Q"]), []
    swaps = _recorded(monkeypatch, gemm, "_swap", lambda r: r)
    with interpreter():
        for on in (True, False):
            monkeypatch.setattr(gemm, "INT8_Q_ON", on)
            outs.append(fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", "int8_w8a16",
                                            w.w13_scale, w.w2_scale, None, None, config=cfg))
    assert modes == [3, 3, 0, 0]  # (no PTX under the interpreter: Triton's conversion, then the dequantization)
    assert swaps == [bm == 64] * 4
    d = Int8W8A16.dequantize(w, torch.float64)
    oracle = oracle_experts(x, tw, ids, d.w13, d.w2, "silu", b13, b2)
    assert rel(outs[0], oracle) < 2e-3 and rel(outs[0], oracle) <= rel(outs[1], oracle) * 1.5
    ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
    assert rel(outs[0], ref) < TOL[torch.float16] and rel(outs[1], ref) < TOL[torch.float16]


def test_int8_q_only_for_int8_w8a16_in_bf16_or_fp16(monkeypatch):
    """I8Q: the PTX for bf16 (1) and fp16 (2) models compiled, Triton's conversion under the interpreter (3), and
    kernel=torch's dequantization (0) for fp32 models, other methods, or with INT8_Q_ON off."""
    from composer.kernels.triton import gemm

    def mode(dtype, spec=gemm.QuantSpec(wq=1)):
        s = torch.ones(2, 4, 1)
        return gemm._quant_args(spec, None, s, None, False, 32, 64, s, dtype, block_m=16)[2]["I8Q"]

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert mode(torch.bfloat16) == 1 and mode(torch.float16) == 2 and mode(torch.float32) == 0
    assert mode(torch.bfloat16, gemm.QuantSpec(wq=3, ws=1, acc_int=True)) == 0  # int8_w8a8: an int8 dot already
    monkeypatch.setattr(gemm, "INT8_Q_ON", False)
    assert mode(torch.bfloat16) == 0
    monkeypatch.setattr(gemm, "INT8_Q_ON", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert mode(torch.bfloat16) == 3 and mode(torch.float32) == 0


def test_int4_pairs_only_where_its_rounding_is_kernel_torchs(monkeypatch):
    """INT4_PAIRS runs for bf16 / fp16 models whose scales are stored in the model dtype (the packed multiply rounds
    (q - z) * s once, as kernel=torch's fp32 product rounded to that dtype does), in blocks of 64 rows or more; not
    for fp32 models, fp32 scales, smaller blocks, the INT4_MAGIC decode, or under the interpreter (no inline PTX)."""
    from composer.kernels.triton import gemm

    spec = gemm.QuantSpec(wq=2, qbk=64)

    def pairs(dtype, scale_dtype=None, direct=False, block_m=64):
        s = torch.ones(2, 4, 2, dtype=scale_dtype or dtype)
        return gemm._quant_args(spec, None, s, None, direct, 64, 128, s, dtype, block_m=block_m)[2]["PAIRS"]

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert pairs(torch.bfloat16) == 1 and pairs(torch.float16) == 2
    assert pairs(torch.float32) == 0 and pairs(torch.bfloat16, torch.float32) == 0
    assert pairs(torch.float16, direct=True) == 0  # the one-pair decode's INT4_MAGIC path
    assert pairs(torch.bfloat16, block_m=128) == 1
    # mma.sync blocks (under 64 rows) with the K tile inside a group take INT4_QPAIRS (3 bf16, 4 fp16), whatever the
    # scales' dtype (they multiply the dot's result in fp32); not fp32 models, tiles across groups or the decode
    assert pairs(torch.bfloat16, block_m=32) == 3 and pairs(torch.float16, torch.float32, block_m=16) == 4
    assert pairs(torch.float32, block_m=16) == 0 and pairs(torch.float16, direct=True, block_m=16) == 0
    across = gemm._quant_args(gemm.QuantSpec(wq=2, qbk=32), None, torch.ones(2, 4, 4, dtype=torch.bfloat16), None,
                              False, 64, 128, torch.ones(1), torch.bfloat16, block_m=16)[2]
    assert not across["GROUP_TILE"] and across["PAIRS"] == 0
    monkeypatch.setattr(gemm, "INT4_QPAIRS_ON", False)
    assert pairs(torch.bfloat16, block_m=32) == 0
    monkeypatch.setattr(gemm, "INT4_QPAIRS_ON", True)
    monkeypatch.setattr(gemm, "INT4_PAIRS_ON", False)
    assert pairs(torch.bfloat16) == 0
    monkeypatch.setattr(gemm, "INT4_PAIRS_ON", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pairs(torch.bfloat16) == 0 and pairs(torch.bfloat16, block_m=16) == 5  # (INT4_QPAIRS without PTX)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreter_fused_activation_quant_matches_quant_rows(dtype):
    """Decode (one pair per program) quantizes each activation row inside the GEMMs (FUSED_AQ); the result must
    be the one the separate quant_rows launches give (same scales, same int8 values: only the per-program
    pairing differs), here int8_w8a8 with H and I not multiples of the K tile."""
    from composer.kernels.triton.fused import fused_experts_quant

    x, tw, ids, w13, w2, b13, b2 = make_case(3, 4, 2, 80, 48, dtype, True, 0.0, seed=11)
    w = quantize("int8_w8a8", w13, w2, b13, b2)
    outs = []
    with interpreter():
        for decode in (True, False):
            outs.append(fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", "int8_w8a8",
                                            w.w13_scale, w.w2_scale, config=_cfg(decode)))
    assert rel(outs[0], outs[1].double()) < (1e-6 if dtype == torch.float32 else 1e-3)
    assert rel(outs[0], TorchExperts().apply(x, tw, ids, w, "silu").double()) < TOL_W8A8[dtype]


@pytest.mark.parametrize("decode", [True, False])
def test_interpreter_w8a8_tma_weights(decode):
    """w8a8 weights read through TMA descriptors (``tma: true``; they need no dequantization) give what pointer
    loads give."""
    from composer.kernels.triton.fused import fused_experts_quant

    x, tw, ids, w13, w2, b13, b2 = make_case(3, 4, 2, 64, 48, torch.float32, True, 0.0, seed=21)
    w = quantize("int8_w8a8", w13, w2, b13, b2)
    outs = []
    with interpreter():
        for tma in (False, True):
            cfg = _cfg(decode)
            cfg["gemm1"]["tma"] = cfg["gemm2"]["tma"] = tma
            outs.append(fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", "int8_w8a8",
                                            w.w13_scale, w.w2_scale, config=cfg))
    assert rel(outs[1], outs[0].double()) < 1e-6
    assert rel(outs[1], TorchExperts().apply(x, tw, ids, w, "silu").double()) < TOL_W8A8[torch.float32]


def test_w8a8_borrow_model_dtype_tiles_with_wider_k():
    """Without a method table, w8a8 takes the model dtype's tiles with K tiles of at least 128 (one-byte elements:
    the bytes of a 64-wide bf16 stage, half the fp8 promotions); w*a16 takes them as they are."""
    from composer.kernels.triton.fused import quant_config

    for T in (16, 4096):
        bf = quant_config(T, 8, 64, 64, 2, "int4_w4a16", torch.float32, "cpu")
        for method in ("fp8_w8a8", "int8_w8a8"):
            cfg = quant_config(T, 8, 64, 64, 2, method, torch.float32, "cpu")
            for g in ("gemm1", "gemm2"):
                assert cfg[g]["BLOCK_K"] == max(bf[g]["BLOCK_K"], 128)
                assert {kk: v for kk, v in cfg[g].items() if kk != "BLOCK_K"} == \
                    {kk: v for kk, v in bf[g].items() if kk != "BLOCK_K"}


def test_interpreter_int8_activation_quantizer_matches_torch():
    """int8 rows: round half to even and the clamp, bit for bit with composer.quant (incl. exact .5 ties)."""
    from composer.kernels.triton.quant import quant_rows

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g)
    x[0, :5] = torch.tensor([127.0, 0.5, 1.5, -2.5, 63.5])  # amax 127: scale 1, exact ties
    x[1] = 0.0
    with interpreter():
        q, s = quant_rows(x, torch.int8)
    ref_s = qu._amax(x, -1) / qu.INT8_MAX
    ref_q = torch.round(x / ref_s).clamp(-127, 127).to(torch.int8)
    assert torch.equal(s, ref_s) and torch.equal(q, ref_q)
    assert torch.equal(q.float() * s, qu.qdq_int8_per_token(x))


def test_opcheck_and_compile_quant_op():
    """composer::fused_experts_quant: schema and fake implementation (opcheck), and torch.compile(fullgraph=True)
    traces it without a graph break (aot_eager: no C++ compiler needed)."""
    import composer.kernels.ops  # noqa: F401

    x, tw, ids, w13, w2, b13, b2 = make_case(5, 4, 2, 32, 16, torch.float32, True, 0.0, seed=1)
    for method, params in (("int8_w8a8", {}), ("int4_w4a16", {"group_size": 16, "zero_point": True})):
        w = quantize(method, w13, w2, b13, b2, **params)
        args = (x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", method, w.w13_scale, w.w2_scale, None, None,
                w.w13_zero, w.w2_zero, "per_token_channel", 128, 128)
        with interpreter():
            torch.library.opcheck(torch.ops.composer.fused_experts_quant.default, args,
                                  test_utils=("test_schema", "test_faketensor"))
            torch._dynamo.reset()
            f = torch.compile(lambda a, b, c: TritonExperts().apply(a, b, c, w, "silu"), fullgraph=True,
                              backend="aot_eager")
            out = f(x, tw, ids)
        ref = TorchExperts().apply(x, tw, ids, w, "silu")
        tol = TOL_W8A8[torch.float32] if method == "int8_w8a8" else TOL[torch.float32]
        assert rel(out, ref.double()) < tol, method


def test_check_claims_exactly_what_runs(monkeypatch):
    with interpreter():
        for m in ("int8_w8a16", "int8_w8a8", "int4_w4a16"):
            assert TritonExperts.check(quant=m, dtype="float32", device="cpu") == []
        p = TritonExperts.check(quant="fp8_w8a8", dtype="float32", device="cpu")
        assert len(p) == 1 and "fp8" in p[0] and "kernel=torch" in p[0]
    import composer.quant.utils as u

    monkeypatch.setattr(u, "cuda_capability", lambda: (8, 0))
    p = TritonExperts.check(quant="fp8_w8a8", dtype="bfloat16", device="cuda")
    assert len(p) == 1 and "8.9" in p[0] and "sm80" in p[0]
    assert TritonExperts.check(quant="int4_w4a16", dtype="bfloat16", device="cuda") == []
    monkeypatch.setattr(u, "cuda_capability", lambda: (9, 0))
    assert TritonExperts.check(quant="fp8_w8a8", dtype="bfloat16", device="cuda") == []
    assert TritonExperts.check(quant="nvfp4", dtype="bfloat16", device="cuda")


# ------------------------------------------------------------------------------------------------ GPU

SHAPES = {"mixtral_8x7b": (8, 2, 4096, 14336), "qwen3_30b_a3b": (128, 8, 2048, 768), "deepseek_v3": (64, 8, 7168, 2048)}
ALL_VARIANTS = [("int8_w8a16", {}), ("int8_w8a8", {}), ("int4_w4a16", {"group_size": 128}),
                ("int4_w4a16", {"group_size": 128, "zero_point": True})] + FP8_VARIANTS
# bf16 vs kernel=torch: both compute in bf16 with different rounding points (GEMM1 epilogue, top-k sum; w*a16:
# kernel=torch rounds the dequantized weights to bf16 before its matmul). Measured on an H100 (2026-11-27, after
# the w8a8 activations stopped being rounded to bf16 and the fp8 dots were promoted per K tile): at most 6.0e-3
# over every method, shape and T, so the bf16 tolerance holds for every method.
GPU_TOL = {"int8_w8a16": 1e-2, "int4_w4a16": 1e-2, "int8_w8a8": 1e-2, "fp8_w8a8": 1e-2}


@gpu
@cuda
def test_gpu_fp8_activation_quantizer_matches_torch():
    from composer.kernels.triton.quant import quant_rows

    x = torch.randn(37, 1000, device="cuda", dtype=torch.bfloat16) * 3
    for group in (None, 125):
        q, s = quant_rows(x, torch.float8_e4m3fn, group)
        xg = x.float().reshape(37, -1, group or 1000)
        ref_s = qu._amax(xg, -1) / qu.FP8_MAX
        ref_q = qu.fp8_cast(xg, ref_s).reshape(37, 1000)
        assert torch.equal(s, ref_s.reshape(s.shape))
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    q, s = quant_rows(x, torch.int8)
    assert torch.equal(q.float() * s, qu.qdq_int8_per_token(x.float()))


@gpu
@cuda
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method,params", ALL_VARIANTS, ids=lambda v: str(v))
def test_gpu_three_shapes(shape, method, params):
    E, k, H, I = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * I ** -0.5).to(torch.bfloat16)
    w = quantize(method, w13, w2, **params)
    del w13, w2
    # int4's tables hold prefill tiles of their own at T = 1024 (the INT4_PAIRS blocks, gemm.py)
    for T in (1, 128, 1024, 4096) if method == "int4_w4a16" else (1, 128, 4096):
        x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
        tw, ids = torch.topk(torch.randn(T, E, device="cuda", generator=g).softmax(-1), k, dim=-1)
        out, ref = both(x, tw.float(), ids.to(torch.int32), w)
        err = rel(out, ref.double())
        print(f"[quant-gpu] {shape} {method} {params} T={T}: rel err vs kernel=torch {err:.2e}")
        assert err < GPU_TOL[method], f"{shape} {method} {params} T={T}: rel err {err:.2e} vs kernel=torch"
        torch.cuda.empty_cache()


@gpu
@cuda
@pytest.mark.parametrize("method,params", [("fp8_w8a8", {"granularity": "per_token_channel"}), ("int8_w8a8", {}),
                                           ("int8_w8a16", {})], ids=lambda v: str(v))
def test_gpu_k_not_multiple_of_tile(method, params):
    """H and I not multiples of BLOCK_K (masked weight loads of fp8 / int8), bias, T = 1 decode and T = 33."""
    from composer.kernels.triton.fused import fused_experts_quant

    for T, decode in ((1, True), (33, False)):
        x, tw, ids, w13, w2, b13, b2 = make_case(T, 6, 3, 384, 320, torch.bfloat16, True, 0.0, seed=T, device="cuda")
        w = quantize(method, w13, w2, b13, b2, **params)
        ref = TorchExperts().apply(x, tw, ids, w, "silu")
        g = {"BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
        cfg = {"BLOCK_M": 16, "decode": decode, "reduce": "atomic", "gemm1": dict(g), "gemm2": dict(g)}
        out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", method, w.w13_scale,
                                  w.w2_scale, None, None, None, None, params.get("granularity", "per_token_channel"),
                                  128, 128, config=cfg)
        assert rel(out, ref.double()) < GPU_TOL[method], (method, T)


@gpu
@cuda
@pytest.mark.parametrize("method,params", FP8_VARIANTS + [("int8_w8a8", {})], ids=lambda v: str(v))
def test_gpu_w8a8_dropped_pairs_top_k_equals_e_ragged_n(method, params):
    """Every fp8 variant and int8_w8a8 on the GPU with dropped pairs (0.25), top_k = E and I = 384 not a multiple of
    BLOCK_N = 256 (H = 256, I = 384: whole 128 x 128 scale blocks for block fp8), bias, T = 1 (tl.dot decode) and 33
    (16-row sorted blocks, both reductions), then the default tiles, vs kernel=torch; these ran without drops."""
    from composer.kernels.triton.fused import fused_experts_quant

    E = k = 6
    H, I = 256, 384
    g = {"BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}
    with interpreter(False):
        for T, decode in ((1, True), (33, False)):
            x, tw, ids, w13, w2, b13, b2 = make_case(T, E, k, H, I, torch.bfloat16, True, 0.25, seed=T + 5,
                                                     device="cuda")
            ids[0, 1] = ids[-1, -1] = -1  # (a dropped pair whatever the generator drew)
            w = quantize(method, w13, w2, b13, b2, **params)
            gran, (bn, bk) = w.extra.get("granularity", "per_token_channel"), w.extra.get("block_shape", (128, 128))
            ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
            for reduce in ("atomic",) if decode else ("atomic", "buffer"):
                cfg = {"BLOCK_M": 16, "decode": decode, "reduce": reduce, "gemm1": dict(g), "gemm2": dict(g)}
                out = fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", method,
                                          w.w13_scale, w.w2_scale, w.a13_scale, w.a2_scale, None, None,
                                          gran, bn, bk, config=cfg)
                err = rel(out, ref)
                assert torch.isfinite(out).all() and err < GPU_TOL[method], (method, params, T, reduce, err)
            out = TritonExperts().apply(x, tw, ids, w, "silu")  # the default tiles
            assert rel(out, ref) < GPU_TOL[method], (method, params, T, "default", rel(out, ref))


@gpu
@cuda
@pytest.mark.parametrize("method,params", [("fp8_w8a8", {"granularity": "per_token_channel"}),
                                           ("fp8_w8a8", {"granularity": "per_tensor"}), ("int8_w8a8", {})],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("stages", ["both", "a13"])
def test_gpu_static_activation_scales_match_torch(method, params, stages):
    """A stage given a static per-tensor scale uses it on both backends (kernel=torch quantized per token), at the
    qwen3 shape, T = 1 (GEMV), 3 with dropped pairs, 128 (sorted)."""
    E, k, H, I = SHAPES["qwen3_30b_a3b"]
    for T, drop in ((1, 0.0), (3, 0.25), (128, 0.0)):
        x, tw, ids, w13, w2, _, _ = make_case(T, E, k, H, I, torch.bfloat16, False, drop, seed=T, device="cuda")
        w = quantize(method, w13, w2, **params)
        qmax = 448.0 if method == "fp8_w8a8" else 127.0
        a13 = torch.tensor(0.8 * float(x.float().abs().max()) / qmax, device="cuda")
        a2 = torch.tensor(0.05 / qmax, device="cuda") if stages == "both" else None
        ws = ExpertWeights(w13=w.w13, w2=w.w2, quant=method, w13_scale=w.w13_scale, w2_scale=w.w2_scale,
                           a13_scale=a13, a2_scale=a2, extra=w.extra)
        out, ref = both(x, tw, ids, ws)
        err, moved = rel(out, ref.double()), rel(ref, TorchExperts().apply(x, tw, ids, w, "silu").double())
        print(f"[quant-gpu] static {method} {params} {stages} T={T}: {err:.2e} (static vs dynamic {moved:.2e})")
        assert err < GPU_TOL[method] < moved, (method, params, stages, T)


# the int4 GPU path tests' weights: a K tile inside one group of 128, zero points with groups of 64, one per row
INT4_PATH_PARAMS = [{"group_size": 128}, {"group_size": 64, "zero_point": True}, {"group_size": -1, "zero_point": True}]


def _sorted_quant_call(T: int, bm: int, bk: int, dtype: torch.dtype, params: dict, method: str = "int4_w4a16",
                      decode: bool = False, **tile):
    """(x, tw, ids, weights, run) for the int4 and int8 GPU path tests: E = 8, k = 3, H = I = 384 with bias and
    dropped pairs, expert-sorted blocks of ``bm`` rows (or the one-pair decode) with ``bk``-deep K tiles (and the
    tile keys ``tile``), deterministic reduce; ``run()`` calls the Triton experts under whatever gemm switches are
    set then."""
    from composer.kernels.triton.fused import fused_experts_quant

    x, tw, ids, w13, w2, b13, b2 = make_case(T, 8, 3, 384, 384, dtype, True, 0.1, seed=T, device="cuda")
    w = quantize(method, w13, w2, b13, b2, **params)
    g = {"BLOCK_N": 64, "BLOCK_K": bk, "GROUP_M": 1, "num_warps": 4, "num_stages": 3, **tile}
    cfg = {"BLOCK_M": bm, "decode": decode, "reduce": "buffer", "gemm1": dict(g), "gemm2": dict(g)}

    def run():
        return fused_experts_quant(x, tw, ids, w.w13, w.w2, w.w13_bias, w.w2_bias, "silu", method,
                                   w.w13_scale, w.w2_scale, None, None, w.w13_zero, w.w2_zero, config=cfg)

    return x, tw, ids, w, run


@gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("params", INT4_PATH_PARAMS, ids=str)
def test_gpu_int4_qpairs_match_the_dequantized_weights(monkeypatch, dtype, params):
    """INT4_QPAIRS (16- and 32-row blocks: q - 8 or q exact in inline PTX, the scale and zero point applied to the
    dot's result) against kernel=torch, and next to the fp32 dequantize it replaces: both within the GPU
    tolerance of kernel=torch, and within 1e-2 of each other (the dequantize rounds each weight to the dtype,
    QPAIRS keeps the products exact). Zero points, one group per row, bias, dropped pairs, K = 384 with 128-deep
    tiles, T = 1 to 40."""
    from composer.kernels.triton import gemm

    for T, bm in ((1, 16), (16, 16), (40, 32)):
        x, tw, ids, w, run = _sorted_quant_call(T, bm, 128, dtype, params)
        qbk = 384 if params["group_size"] == -1 else params["group_size"]
        assert gemm._quant_args(gemm.QuantSpec(wq=2, qbk=qbk), None, w.w13_scale, None, False, min(128, qbk), 384,
                                x, dtype, block_m=bm)[2]["PAIRS"] == gemm.INT4_PAIRS[dtype] + 2
        qpairs = run()
        monkeypatch.setattr(gemm, "INT4_QPAIRS_ON", False)
        fp32 = run()
        monkeypatch.setattr(gemm, "INT4_QPAIRS_ON", True)
        ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
        assert rel(qpairs, ref) < GPU_TOL["int4_w4a16"], (T, dtype, params, rel(qpairs, ref))
        assert rel(fp32, ref) < GPU_TOL["int4_w4a16"], (T, dtype, params, rel(fp32, ref))
        assert rel(qpairs, fp32.double()) < 1e-2, (T, dtype, params)


@gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_int8_q_matches_the_dequantized_weights(monkeypatch, dtype):
    """INT8_Q (int8_w8a16: the integers q from inline PTX into the dot, the channel scale on its result) against the
    float64 oracle of the dequantized weights and kernel=torch, next to the dequantization it replaces (q * scale
    rounded to the dtype, as kernel=torch): within the GPU tolerance of kernel=torch, at least as close to the
    oracle (the products are exact), within 1e-2 of the old path. The one-pair decode, 16- / 32-row mma.sync blocks
    with 256-deep K tiles (K = 384: a ragged last tile) and 64- / 128-row wgmma blocks with 128-deep ones (their
    shared memory holds no 256-deep stages), 64 rows with and without SWAP_AB; bias, dropped pairs."""
    from composer.kernels.reference import oracle_experts
    from composer.kernels.triton import gemm
    from composer.quant.int8 import Int8W8A16

    for T, bm, bk, decode, swap in ((1, 16, 256, True, False), (16, 16, 256, False, False), (40, 32, 256, False, False),
                                    (300, 64, 128, False, True), (300, 64, 128, False, False),
                                    (700, 128, 128, False, False)):
        tile = {} if swap == (bm == 64) else {"swap": swap}
        x, tw, ids, w, run = _sorted_quant_call(T, bm, bk, dtype, {}, "int8_w8a16", decode, **tile)
        assert gemm._quant_args(gemm.QuantSpec(wq=1), None, w.w13_scale, None, decode, bk, 384, x, dtype,
                                block_m=bm)[2]["I8Q"] == gemm.INT8_Q_PTX[dtype]
        assert gemm._swap(gemm.QuantSpec(wq=1), decode, bm, tile) == swap
        q = run()
        monkeypatch.setattr(gemm, "INT8_Q_ON", False)
        old = run()
        monkeypatch.setattr(gemm, "INT8_Q_ON", True)
        d = Int8W8A16.dequantize(w, torch.float64)
        oracle = oracle_experts(x, tw, ids, d.w13, d.w2, "silu", w.w13_bias, w.w2_bias)
        ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
        assert rel(q, ref) < GPU_TOL["int8_w8a16"], (T, dtype, rel(q, ref))
        assert rel(q, oracle) <= rel(old, oracle) * 1.25, (T, dtype, rel(q, oracle), rel(old, oracle))
        assert rel(q, old.double()) < 1e-2, (T, dtype)


@gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("params", INT4_PATH_PARAMS, ids=str)
def test_gpu_int4_pairs_equal_the_fp32_dequantize(monkeypatch, dtype, params):
    """INT4_PAIRS (both nibbles of a byte dequantized as one bf16x2 / f16x2 pair, inline PTX) gives bit for bit the
    output of the fp32 dequantize it replaces: the same weights rounded once, the same dots. Expert-sorted blocks,
    deterministic reduce; K tiles inside one group (group 128, one per row) and across groups (64), zero points,
    bias, K not a multiple of the tile (384 with 256-deep tiles), dropped pairs, T = 1 to 300, 64- and 128-row
    blocks (the wgmma path INT4_PAIRS serves)."""
    from composer.kernels.triton import gemm

    for T, bm, bk in ((1, 64, 128), (33, 64, 256), (300, 128, 128)):
        x, tw, ids, w, run = _sorted_quant_call(T, bm, bk, dtype, params)
        assert gemm.INT4_PAIRS_ON and gemm._quant_args(gemm.QuantSpec(wq=2, qbk=128), None, w.w13_scale, None, False,
                                                       bk, 384, x, dtype, block_m=bm)[2]["PAIRS"] == gemm.INT4_PAIRS[dtype]
        pairs = run()
        monkeypatch.setattr(gemm, "INT4_PAIRS_ON", False)
        fp32 = run()
        monkeypatch.setattr(gemm, "INT4_PAIRS_ON", True)
        assert torch.equal(pairs, fp32), (T, dtype, params, (pairs.float() - fp32.float()).abs().max())
        ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
        assert rel(pairs, ref) < GPU_TOL["int4_w4a16"], (T, dtype, params, rel(pairs, ref))


@gpu
@cuda
@pytest.mark.parametrize("promote", [2, 4])
def test_gpu_fp8_promote_every_few_tiles(promote):
    """fp8_promote = N: the tensor core accumulates N K tiles between fp32 additions; still within the bf16 tolerance
    of kernel=torch, at decode, a ragged T and prefill (K = 1536 / 768: 6 to 24 tiles, a partial last group)."""
    from composer.kernels.triton.fused import fused_experts_quant, quant_config

    for T in (1, 33, 2048):
        x, tw, ids, w13, w2, _, _ = make_case(T, 16, 4, 1536, 768, torch.bfloat16, False, 0.0, seed=T, device="cuda")
        w = quantize("fp8_w8a8", w13, w2, granularity="per_token_channel")
        ref = TorchExperts().apply(x, tw, ids, w, "silu").double()
        cfg = {kk: v for kk, v in quant_config(T, 16, 768, 1536, 4, "fp8_w8a8", torch.bfloat16, "cuda").items()
               if kk != "source"}
        if cfg.get("decode") == "gemv":
            cfg = {**cfg, "decode": True}
        cfg["gemm1"] = {**cfg["gemm1"], "BLOCK_N": max(cfg["gemm1"]["BLOCK_N"], 16), "fp8_promote": promote}
        cfg["gemm2"] = {**cfg["gemm2"], "BLOCK_N": max(cfg["gemm2"]["BLOCK_N"], 16), "fp8_promote": promote}
        cfg["gemm1"].pop("SPLIT_K", None), cfg["gemm2"].pop("SPLIT_K", None), cfg["gemm1"].pop("mma", None), cfg["gemm2"].pop("mma", None)
        out = fused_experts_quant(x, tw, ids, w.w13, w.w2, None, None, "silu", "fp8_w8a8", w.w13_scale, w.w2_scale,
                                  config=cfg)
        assert rel(out, ref) < GPU_TOL["fp8_w8a8"], (T, promote, rel(out, ref))


@gpu
@cuda
def test_gpu_quant_compile_and_graph():
    """The quantized op traces under torch.compile(fullgraph=True) (inductor) and replays in a CUDA graph on new
    inputs. fp32 atomics add the top-k terms in any order, so runs agree up to the last bits."""
    from composer.tasks.bench import capture_graph

    E, k, H, I = 16, 4, 512, 256
    x, tw, ids, w13, w2, _, _ = make_case(64, E, k, H, I, torch.bfloat16, False, 0.0, seed=1, device="cuda")
    close = dict(rtol=1e-2, atol=1e-3)
    for method, params in (("fp8_w8a8", {"granularity": "block", "block_shape": (128, 128)}),
                           ("int4_w4a16", {"group_size": 128})):
        w = quantize(method, w13, w2, **params)
        ex = TritonExperts()
        eager = ex.apply(x, tw, ids, w, "silu")
        torch._dynamo.reset()
        f = torch.compile(lambda a, b, c: ex.apply(a, b, c, w, "silu"), fullgraph=True)
        torch.testing.assert_close(f(x, tw, ids), eager, **close)
        static_x = x.clone()
        graph, gout = capture_graph(lambda: ex.apply(static_x, tw, ids, w, "silu"))
        new_x = torch.randn(x.shape, device="cuda").to(torch.bfloat16)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(gout, ex.apply(new_x, tw, ids, w, "silu"), **close)
        assert not torch.equal(gout, eager), "the replay must compute on the new input"


def test_triton_refuses_an_fp8_k_block_it_cannot_tile_at_validation():
    from composer.kernels.triton_backend import TritonExperts
    from composer.quant.fp8 import Fp8W8A8

    bad = Fp8W8A8.Params(granularity="block", block_shape=(128, 40))
    good = Fp8W8A8.Params(granularity="block", block_shape=(128, 64))
    problems = TritonExperts.check(quant="fp8_w8a8", dtype="bfloat16", device="cuda", quant_params=bad)
    assert any("quant.block_shape[1]" in p and "got 40" in p for p in problems), problems
    assert not any("block_shape" in p for p in
                   TritonExperts.check(quant="fp8_w8a8", dtype="bfloat16", device="cuda", quant_params=good))


def test_decode_probe_probes_any_T(monkeypatch, capsys):
    """scripts/decode_probe.py at T = 9 (``--tokens``): bf16, the shipped entry and each variant get a row, errors
    are against the shipped entry's output, and the fastest row within bounds comes back (under the interpreter,
    with the GPU timer replaced by fixed times: the interpreter's bf16 values are not what is checked here). With
    ``--rounds 3`` every row is timed in turns and its median reported."""
    import importlib.util
    import types
    from pathlib import Path

    from composer.tasks.bench import Shape, make_weights, quantize_weights

    spec = importlib.util.spec_from_file_location(
        "decode_probe", Path(__file__).resolve().parents[2] / "scripts" / "decode_probe.py")
    dp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dp)
    times = iter([10.0, 5.0, 4.0, 9.0, 12.0, 7.0, 3.0, 9.5, 11.0, 6.0, 4.5, 8.0])  # rounds: bf16, shipped, variants
    monkeypatch.setattr(dp, "graph_of", lambda fn: fn)
    monkeypatch.setattr(dp, "replay_us", lambda graph, dev: (graph(), next(times))[1])
    dev = torch.device("cpu")
    gen = torch.Generator(device=dev).manual_seed(0)
    E, k, H, I = 4, 2, 64, 32
    shape = Shape("tiny", E, k, H, I, torch.bfloat16)
    w = make_weights(shape, dev, gen)
    shape.quant, shape.quant_params = "int4_w4a16", {"group_size": 32}
    qw = quantize_weights(shape, w)
    args = types.SimpleNamespace(method="int4_w4a16", max_err=1e-2, profile=False, op=False, rounds=3, read_floor=False)
    with interpreter():
        best = dp.probe(args, "tiny", 9, E, k, H, I, w, qw, qw.extra or {},
                        [{"name": "bn32", "gemm1": {"BLOCK_N": 32}}, {"name": "t1", "entry_of": 1}], dev, gen)
    out = capsys.readouterr().out
    # "entry_of": 1 runs the T = 1 entry (here the heuristic's one pair per program, 256-wide K tiles) at T = 9
    assert re.search(r"int4_w4a16 t1: 9\.0 us \(1\.22x bf16\) .*\"BLOCK_N\": 32, \"BLOCK_K\": 256", out), out
    assert "tiny T=9: bf16 11.0 us (rounds: 10.0, 12.0, 11.0) (errors against shipped)" in out
    assert "int4_w4a16 shipped: 6.0 us (1.83x bf16) (rounds: 5.0, 7.0, 6.0), err 0.0e+00" in out
    assert "int4_w4a16 bn32: 4.0 us (2.75x bf16) (rounds: 4.0, 3.0, 4.5)" in out
    assert best[1] == "bn32" and best[2]["gemm1"]["BLOCK_N"] == 32


def test_decode_probe_read_floor_reads_the_active_experts(monkeypatch):
    """decode_probe --read-floor: w13 and w2 of the experts the routing touches, at bf16's and the method's bytes per
    weight, one read-only launch each (under the interpreter, the timer replaced: each call is run once and counted)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "decode_probe", Path(__file__).resolve().parents[2] / "scripts" / "decode_probe.py")
    dp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dp)
    calls = []
    monkeypatch.setattr(dp, "read_us", lambda fn: (fn(), calls.append(1), 2.0 * len(calls))[2])
    ids = torch.tensor([[3, 1], [1, 3], [3, 1]], dtype=torch.int32)  # two experts of four
    with interpreter():
        line = dp.read_floor("int4_w4a16", ids, 256, 128, torch.device("cpu"))
    # bf16: 2 x 256 rows of 512 B + 2 x 256 rows of 256 B; int4: a quarter of it. Each launch's first fitting tile is
    # its fastest (the fake times grow), timed before the two launches together
    assert "the 2 experts' weights" in line
    assert "bf16 " in line and "for 0.4 MB (gemm1 2.0, " in line
    assert "int4_w4a16 " in line and "for 0.1 MB" in line


def test_decode_probe_variants_update_or_replace_the_shipped_tiles():
    """A variant's gemm1 / gemm2 update the shipped tiles (a key such as unroll stays unless the variant says
    otherwise); with "replace": true they replace them whole, so a tuner's entry is timed as it was written."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "decode_probe", Path(__file__).resolve().parents[2] / "scripts" / "decode_probe.py")
    dp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dp)
    shipped = {"BLOCK_M": 16, "decode": "gemv", "reduce": "atomic", "source": "f.json", "_us": 1.0,
               "gemm1": {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2, "unroll": 2},
               "gemm2": {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "SPLIT_K": 4}}
    tile = {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2}
    updated = dp.merge(shipped, {"name": "n8", "gemm1": tile})
    assert updated["gemm1"] == {**tile, "unroll": 2} and updated["gemm2"] == shipped["gemm2"]
    assert "source" not in updated and "_us" not in updated
    replaced = dp.merge(shipped, {"name": "tuned", "replace": True, "pdl": True, "gemm1": tile})
    assert replaced["gemm1"] == tile and replaced["gemm2"] == shipped["gemm2"] and replaced["pdl"] is True
    assert "replace" not in replaced and "name" not in replaced


def test_decode_probe_writes_a_table_for_this_gpu_from_a_same_capability_one(tmp_path, monkeypatch):
    """decode_probe --write on a GPU with no file of its own (an H800, sm_90 like the H100): the H100 table it ran, with the probe's
    T = 1 entry, saved under this GPU's name and capability."""
    import importlib.util
    import json
    from pathlib import Path

    from composer.kernels.triton import configs as cfgs

    spec = importlib.util.spec_from_file_location(
        "decode_probe", Path(__file__).resolve().parents[2] / "scripts" / "decode_probe.py")
    dp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dp)
    monkeypatch.setattr(cfgs, "device_name", lambda d=None: "NVIDIA_H800")
    monkeypatch.setattr(cfgs, "device_capability", lambda d=None: "9.0")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H800")
    shipped = json.loads((cfgs.PACKAGE_DIR / cfgs.config_file_name(256, 2048, 7168, "NVIDIA_H100_80GB_HBM3",
                                                                    "int4_w4a16")).read_text())
    best = {**shipped["1"], "gemm1": {**shipped["1"]["gemm1"], "BLOCK_N": 64}, "source": "x", "_us": 1.0}
    path = dp.write_table(str(tmp_path), "int4_w4a16", 256, 2048, 7168, (80.04, "n64", best))
    assert Path(path).name == cfgs.config_file_name(256, 2048, 7168, "NVIDIA_H800", "int4_w4a16")
    table = json.loads(Path(path).read_text())
    assert table["_capability"] == "9.0"
    assert "n64 picked by scripts/decode_probe.py on one NVIDIA H800" in table["_note"]
    assert table["1"]["gemm1"]["BLOCK_N"] == 64 and table["1"]["_us"] == 80.0 and "source" not in table["1"]
    assert table["4096"] == shipped["4096"]  # the other entries are the borrowed table's


def test_expert_weights_select_keeps_what_the_routed_experts_compute():
    """ExpertWeights.select: kernel=torch on the experts a routing touches (ids remapped to 0..n-1) gives the same
    output as on all of them, for int4 with zero points and bias (every per-expert field indexed, in order)."""
    x, tw, ids, w13, w2, b13, b2 = make_case(5, 6, 2, 64, 32, torch.float32, True, 0.0, seed=4)
    w = quantize("int4_w4a16", w13, w2, b13, b2, group_size=16, zero_point=True)
    used, local = torch.unique(ids, return_inverse=True)
    sub = w.select(used)
    assert sub.num_experts == used.numel() < 6 and sub.quant == w.quant and sub.extra == w.extra
    assert torch.equal(sub.w13_zero, w.w13_zero[used]) and torch.equal(sub.w2_bias, w.w2_bias[used])
    full = TorchExperts().apply(x, tw, ids, w, "silu")
    assert torch.equal(TorchExperts().apply(x, tw, local.to(torch.int32), sub, "silu"), full)
