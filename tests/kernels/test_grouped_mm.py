"""kernel=grouped_mm: the sort/gather/scatter glue on CPU (with a loop standing in for torch._grouped_mm),
its check() messages, and torch._grouped_mm itself on a Hopper GPU."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from composer.kernels.grouped_mm import GroupedMMExperts, grouped_mm_experts, loop_grouped_mm
from composer.kernels.reference import oracle_experts

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def case(T, E, k, H, I, dtype, bias, drop, seed, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, device=device, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, device=device, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device, generator=g) * I ** -0.5).to(dtype)
    b13 = torch.randn(E, 2 * I, device=device, generator=g).to(dtype) if bias else None
    b2 = torch.randn(E, H, device=device, generator=g).to(dtype) if bias else None
    tw, ids = torch.topk(torch.randn(T, E, device=device, generator=g).softmax(-1), k, dim=-1)
    ids = ids.to(torch.int32)
    if drop and T:
        ids[torch.rand(T, k, device=device, generator=g) < drop] = -1
    return x, tw.float(), ids, w13, w2, b13, b2


@settings(max_examples=25, deadline=None)
@given(T=st.sampled_from([0, 1, 4, 11]), E=st.integers(1, 6), kfrac=st.floats(0, 1), act=st.sampled_from(["silu", "gelu", "swigluoai"]),
       bias=st.booleans(), drop=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**16))
def test_glue_matches_oracle(T, E, kfrac, act, bias, drop, seed):
    k = 1 + int(kfrac * (E - 1))
    x, tw, ids, w13, w2, b13, b2 = case(T, E, k, 24, 12, torch.float32, bias, drop, seed)
    out = grouped_mm_experts(x, tw, ids, w13, w2, act, b13, b2, gmm=loop_grouped_mm)
    assert out.shape == x.shape
    if T:
        ref = oracle_experts(x, tw, ids, w13, w2, act, b13, b2)
        assert float((out.double() - ref).norm() / max(ref.norm(), 1e-30)) < 1e-5 or float(ref.norm()) == 0


def test_check_refuses_cpu_and_other_dtypes():
    p = GroupedMMExperts.check(quant="none", dtype="bfloat16", device="cpu")
    assert any("needs a CUDA device" in m for m in p)
    p = GroupedMMExperts.check(quant="none", dtype="float16", device="cuda")
    assert any("float16" in m and "bfloat16" in m for m in p)
    p = GroupedMMExperts.check(quant="int8_w8a16", dtype="bfloat16", device="cuda")
    assert any("int8_w8a16" in m for m in p)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 300])
def test_grouped_mm_gpu(T):
    from composer.tasks.bench import reference_fp32
    from composer.layers.modular_kernel import ExpertWeights

    x, tw, ids, w13, w2, b13, b2 = case(T, 32, 4, 512, 256, torch.bfloat16, True, 0.1, T, device="cuda")
    w = ExpertWeights(w13, w2, b13, b2)
    out = GroupedMMExperts().apply(x, tw, ids, w, "silu")
    ref = reference_fp32(x, tw, ids, w, "silu")
    assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
    # graph-capturable: no host synchronization
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        GroupedMMExperts().apply(x, tw, ids, w, "silu")
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        gout = GroupedMMExperts().apply(x, tw, ids, w, "silu")
    g.replay()
    torch.cuda.synchronize()
    assert float((gout.float() - ref).norm() / ref.norm()) < 1e-2


def test_apply_refuses_quant_it_does_not_claim():
    """A direct call with quantized weights is an error naming the method and what the kernel supports."""
    from composer.layers.modular_kernel import ExpertWeights

    x, tw, ids, w13, w2, _, _ = case(3, 4, 2, 16, 8, torch.float32, False, 0.0, seed=0)
    w = ExpertWeights(w13=w13, w2=w2, quant="int8_w8a8")
    with pytest.raises(ValueError, match="'grouped_mm' does not support quant method 'int8_w8a8'; it supports: none"):
        GroupedMMExperts().apply(x, tw, ids, w, "silu")
