"""Bad inputs to the experts kernels and the custom ops get a clear ValueError, never a silent wrong answer:
kernel=torch's hidden-state dtypes, composer::fused_experts_quant's weight / scale dtypes and activation scales,
composer::moe_align's ids and sizes. CPU; the Triton paths under TRITON_INTERPRET=1, tiny shapes, fp32/fp16."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import composer.kernels.ops  # noqa: E402,F401  (registers composer::*)
from composer.kernels.reference import oracle_experts, torch_experts  # noqa: E402
from composer.kernels.torch_backend import TorchExperts  # noqa: E402
from composer.layers.modular_kernel import ExpertWeights  # noqa: E402
from composer.quant import utils as qu  # noqa: E402
from composer.registry import QUANT_METHODS  # noqa: E402

from ._interpreter import interpreter  # noqa: E402

T, E, K, H, I = 4, 4, 2, 32, 16


def case(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    tw, ids = torch.topk(torch.randn(T, E, generator=g).softmax(-1), K, dim=-1)
    return x, tw.float(), ids.to(torch.int32), w13, w2


# ------------------------------------------------------------------------------------------------ kernel=torch

@pytest.mark.parametrize("xdtype", [torch.int64, torch.int32, torch.bool])
def test_torch_experts_refuse_integer_hidden_states(xdtype):
    x, tw, ids, w13, w2 = case()
    with pytest.raises(ValueError, match=f"hidden states must be floating point.*{xdtype}"):
        torch_experts(x.to(xdtype), tw, ids, w13, w2)
    with pytest.raises(ValueError, match="hidden states must be floating point"):
        oracle_experts(x.to(xdtype), tw, ids, w13, w2)
    with pytest.raises(ValueError, match="hidden states must be floating point"):
        TorchExperts().apply(x.to(xdtype), tw, ids, ExpertWeights(w13=w13, w2=w2), "silu")


def test_torch_backend_refuses_integer_hidden_states_before_dequantizing(monkeypatch):
    x, tw, ids, w13, w2 = case()
    (q13, s13), (q2, s2) = qu.quant_int8_per_channel(w13), qu.quant_int8_per_channel(w2)
    w = ExpertWeights(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2, quant="int8_w8a16")

    def boom(*a, **kw):
        raise AssertionError("dequantized for integer hidden states")

    monkeypatch.setattr(QUANT_METHODS.get("int8_w8a16"), "dequantize", staticmethod(boom))
    with pytest.raises(ValueError, match="hidden states must be floating point .*got torch.int64"):
        TorchExperts().apply(x.long(), tw, ids, w, "silu")


@pytest.mark.parametrize("xdtype,wdtype", [(torch.float16, torch.bfloat16), (torch.float32, torch.float16),
                                           (torch.float64, torch.float32)])
def test_torch_backend_refuses_hidden_states_of_another_dtype_than_unquantized_weights(xdtype, wdtype):
    x, tw, ids, w13, w2 = case()
    w = ExpertWeights(w13=w13.to(wdtype), w2=w2.to(wdtype))
    with pytest.raises(ValueError, match=f"must have the activations' dtype {xdtype}.*x.to\\({wdtype}\\)"):
        TorchExperts().apply(x.to(xdtype), tw, ids, w, "silu")
    out = TorchExperts().apply(x.to(wdtype), tw, ids, w, "silu")  # the model dtype: fine
    assert out.dtype == wdtype


@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16])
def test_torch_backend_quantized_weights_take_any_floating_hidden_states(xdtype):
    """Quantized weights are dequantized to x.dtype (w8a8: float32), so they are not held to the weights' dtype."""
    x, tw, ids, w13, w2 = case()
    (q13, s13), (q2, s2) = qu.quant_int8_per_channel(w13), qu.quant_int8_per_channel(w2)
    for method in ("int8_w8a16", "int8_w8a8"):
        w = ExpertWeights(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2, quant=method)
        out = TorchExperts().apply(x.to(xdtype), tw, ids, w, "silu")
        assert out.dtype == xdtype and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ fused_experts_quant

def quant_call(x, tw, ids, w13, w2, method, s13, s2, a13=None, a2=None, z13=None, z2=None,
               granularity="per_token_channel"):
    with interpreter():
        return torch.ops.composer.fused_experts_quant(x, tw, ids, w13, w2, None, None, "silu", method, s13, s2, a13,
                                                      a2, z13, z2, granularity, 128, 128)


def int8_case(dtype=torch.float16):
    x, tw, ids, w13, w2 = case(dtype)
    (q13, s13), (q2, s2) = qu.quant_int8_per_channel(w13), qu.quant_int8_per_channel(w2)
    return x, tw, ids, q13, q2, s13, s2


def test_quant_op_still_runs_int8_with_half_scales():
    """The checks pass what composer.quant gives (and float16 scales, which the kernels read correctly)."""
    x, tw, ids, q13, q2, s13, s2 = int8_case()
    ref = torch_experts(x, tw, ids, (q13 * s13).half(), (q2 * s2).half()).double()
    out = quant_call(x, tw, ids, q13, q2, "int8_w8a16", s13.half(), s2.half()).double()
    assert float((out - ref).norm() / ref.norm()) < 5e-3


@pytest.mark.parametrize("method,wdtype", [("int8_w8a16", torch.float16), ("int8_w8a16", torch.uint8),
                                           ("int8_w8a8", torch.float16), ("int4_w4a16", torch.int8),
                                           ("fp8_w8a8", torch.int8)])
def test_quant_op_refuses_weights_of_another_dtype(method, wdtype):
    x, tw, ids, q13, q2, s13, s2 = int8_case()
    w13 = (q13.view(torch.uint8) if wdtype == torch.uint8 else q13).to(wdtype)
    w2 = (q2.view(torch.uint8) if wdtype == torch.uint8 else q2).to(wdtype)
    if method == "int4_w4a16":  # the packed shape, so only the dtype is wrong
        w13, w2 = w13[..., : H // 2].contiguous(), w2[..., : I // 2].contiguous()
        s13, s2 = torch.ones(E, 2 * I, 2, dtype=torch.float16), torch.ones(E, H, 1, dtype=torch.float16)
    want = {"int8_w8a16": "torch.int8", "int8_w8a8": "torch.int8", "int4_w4a16": "torch.uint8",
            "fp8_w8a8": "torch.float8_e4m3fn"}[method]
    with pytest.raises(ValueError, match=f"{method}: w13 must hold the quantized weights as {want}.*got {wdtype}"):
        quant_call(x, tw, ids, w13, w2, method, s13, s2)


@pytest.mark.parametrize("sdtype", [torch.int32, torch.int64, torch.int8, torch.float8_e4m3fn])
def test_quant_op_refuses_non_float_scales(sdtype):
    x, tw, ids, q13, q2, s13, s2 = int8_case()
    with pytest.raises(ValueError, match=f"int8_w8a16: w13_scale must be a float32, float16 or bfloat16.*{sdtype}"):
        quant_call(x, tw, ids, q13, q2, "int8_w8a16", s13.to(sdtype), s2)
    with pytest.raises(ValueError, match=f"int8_w8a16: w2_scale must be .*{sdtype}"):
        quant_call(x, tw, ids, q13, q2, "int8_w8a16", s13, s2.to(sdtype))


def test_quant_op_refuses_activation_scales_of_more_than_one_element():
    x, tw, ids, q13, q2, s13, s2 = int8_case()
    with pytest.raises(ValueError, match=r"int8_w8a8: a13_scale .* must have one element, got shape \(7,\)"):
        quant_call(x, tw, ids, q13, q2, "int8_w8a8", s13, s2, a13=torch.ones(7))
    with pytest.raises(ValueError, match=r"int8_w8a8: a2_scale .* must have one element, got shape \(2, 2\)"):
        quant_call(x, tw, ids, q13, q2, "int8_w8a8", s13, s2, a2=torch.ones(2, 2))
    with pytest.raises(ValueError, match="int8_w8a8: a13_scale must be a float32, float16 or bfloat16"):
        quant_call(x, tw, ids, q13, q2, "int8_w8a8", s13, s2, a13=torch.tensor(1))
    f8 = lambda t: t.to(torch.float8_e4m3fn)  # noqa: E731  (refused before any fp8 kernel would run)
    with pytest.raises(ValueError, match=r"fp8_w8a8: a13_scale .* must have one element, got shape \(7,\)"):
        quant_call(x, tw, ids, f8(q13), f8(q2), "fp8_w8a8", torch.ones(E), torch.ones(E), a13=torch.ones(7),
                   granularity="per_tensor")


def test_quant_op_refuses_tensors_the_method_would_ignore():
    x, tw, ids, q13, q2, s13, s2 = int8_case()
    with pytest.raises(ValueError, match="int8_w8a16: a13_scale is not used"):
        quant_call(x, tw, ids, q13, q2, "int8_w8a16", s13, s2, a13=torch.tensor(0.01))
    with pytest.raises(ValueError, match="int8_w8a8: w13_zero is not used"):
        quant_call(x, tw, ids, q13, q2, "int8_w8a8", s13, s2, z13=torch.zeros(E, I, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="fp8_w8a8: unknown granularity 'per_tile'"):
        quant_call(x, tw, ids, q13.to(torch.float8_e4m3fn), q2.to(torch.float8_e4m3fn), "fp8_w8a8", s13, s2,
                   granularity="per_tile")


def test_quant_op_refuses_int4_zero_points_of_another_dtype():
    x, tw, ids, w13, w2 = case(torch.float16)
    q13, s13, z13 = qu.quant_int4(w13, 16, True, torch.float16)
    q2, s2, z2 = qu.quant_int4(w2, 16, True, torch.float16)
    with pytest.raises(ValueError, match="int4_w4a16: w13_zero must be the packed uint8 zero points, got torch.int32"):
        quant_call(x, tw, ids, q13, q2, "int4_w4a16", s13, s2, z13=z13.int(), z2=z2)


# ------------------------------------------------------------------------------------------------ moe_align

def align(ids, num_experts=4, block_m=16):
    with interpreter():
        return torch.ops.composer.moe_align(ids, num_experts, block_m)


@pytest.mark.parametrize("big", [2**32 + 1, 2**31, -(2**32) + 2])
def test_moe_align_leaves_out_int64_ids_outside_the_experts(big):
    """An int64 id outside [0, E) is dropped, not wrapped by the int32 cast into a valid expert."""
    _, expert_ids, ntpp = align(torch.tensor([[big, 3]]))
    assert ntpp.tolist() == [16] and expert_ids.tolist()[0] == 3
    want = align(torch.tensor([[-1, 3]], dtype=torch.int32))
    got = align(torch.tensor([[big, 3]]))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_moe_align_takes_small_integer_ids():
    ids = torch.tensor([[1, 3], [0, 2]], dtype=torch.int32)
    want = align(ids)
    for dt in (torch.int64, torch.int16, torch.uint8):
        assert all(torch.equal(a, b) for a, b in zip(align(ids.to(dt)), want))


@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bool])
def test_moe_align_refuses_non_integer_ids(dt):
    with pytest.raises(ValueError, match=f"topk_ids must be an integer tensor.*{dt}"):
        align(torch.tensor([[1.7, 3.2]]).to(dt))


@pytest.mark.parametrize("num_experts", [0, -1])
def test_moe_align_refuses_no_experts(num_experts):
    with pytest.raises(ValueError, match=f"num_experts must be at least 1, got {num_experts}"):
        align(torch.zeros(1, 1, dtype=torch.int32), num_experts)


@pytest.mark.parametrize("block_m", [0, -16])
def test_moe_align_refuses_non_positive_block(block_m):
    with pytest.raises(ValueError, match=f"block_m must be a positive power of two.*got {block_m}"):
        align(torch.zeros(1, 1, dtype=torch.int32), 4, block_m)
