"""The custom ops: schema and fake implementations (opcheck), torch.compile(fullgraph=True), CUDA graphs."""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

import composer.kernels.ops  # noqa: E402,F401  (registers composer::*)
from composer.kernels.reference import oracle_experts  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


from ._interpreter import interpreter  # noqa: E402,F401

def case(T=5, E=4, k=2, H=32, I=16, dtype=torch.float32, device="cpu", bias=True, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, device=device, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, device=device, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device, generator=g) * I ** -0.5).to(dtype)
    b13 = torch.randn(E, 2 * I, device=device, generator=g).to(dtype) if bias else None
    b2 = torch.randn(E, H, device=device, generator=g).to(dtype) if bias else None
    tw, ids = torch.topk(torch.randn(T, E, device=device, generator=g).softmax(-1), k, dim=-1)
    return x, tw.float(), ids.to(torch.int32), w13, w2, b13, b2


def test_ops_registered():
    assert hasattr(torch.ops.composer, "fused_experts")
    assert hasattr(torch.ops.composer, "moe_align")


def test_opcheck_fused_experts():
    x, tw, ids, w13, w2, b13, b2 = case()
    with interpreter():
        torch.library.opcheck(torch.ops.composer.fused_experts.default, (x, tw, ids, w13, w2, b13, b2, "gelu"),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.composer.fused_experts.default, (x, tw, ids, w13, w2, None, None, "silu"),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("T,E,k", [(7, 5, 3), (0, 5, 3), (1, 4, 4)], ids=["T7", "T0", "topk=E"])
def test_opcheck_moe_align(T, E, k):
    """Every opcheck test, the AOT dispatch included: the op fills the slots past num_tokens_post_padded (which
    the kernels leave unwritten) with the padding sentinel, so eager and traced calls return the same values."""
    _, _, ids, *_ = case(T=T, E=E, k=k)
    with interpreter():
        torch.library.opcheck(torch.ops.composer.moe_align.default, (ids, E, 16))
        s, _, n = torch.ops.composer.moe_align(ids, E, 16)
    assert bool((s[int(n):] == T * k).all())


def test_fake_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(9, 40)
        ids = torch.empty(9, 3, dtype=torch.int32)
        out = torch.ops.composer.fused_experts(x, torch.empty(9, 3), ids, torch.empty(6, 16, 40),
                                               torch.empty(6, 40, 8), None, None, "silu")
        assert out.shape == (9, 40) and out.dtype == x.dtype
        s, e, n = torch.ops.composer.moe_align(ids, 6, 16)
        nb = (27 + 6 * 15 + 15) // 16
        assert s.shape == (nb * 16,) and e.shape == (nb,) and n.shape == (1,)


def block(x, gate_w, w13, w2, k: int):
    """A whole MoE block as model code writes it: router, top-k, renormalize, experts op."""
    logits = x.float() @ gate_w.t()
    tw, ids = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    tw = tw / tw.sum(-1, keepdim=True)
    return torch.ops.composer.fused_experts(x, tw, ids.to(torch.int32), w13, w2, None, None, "silu")


def test_compile_fullgraph_cpu():
    """No graph break: dynamo traces the op through its fake implementation (aot_eager: no C++ compiler needed)."""
    x, _, _, w13, w2, _, _ = case(T=6, E=4, k=2, bias=False)
    gate_w = torch.randn(4, x.shape[1])
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with interpreter():
        out = compiled(x, gate_w, w13, w2, 2)
        eager = block(x, gate_w, w13, w2, 2)
    assert torch.allclose(out, eager, rtol=1e-6, atol=1e-6)
    tw, ids = torch.topk(torch.softmax(x.float() @ gate_w.t(), -1), 2, dim=-1)
    ref = oracle_experts(x, tw / tw.sum(-1, keepdim=True), ids, w13, w2, "silu")
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compile_and_cuda_graph_replay_gpu(dtype):
    """torch.compile(fullgraph=True) (inductor) of a whole block, captured in a CUDA graph, replayed on new inputs."""
    E, k, H, I, T = 16, 4, 256, 192, 64
    x, _, _, w13, w2, _, _ = case(T=T, E=E, k=k, H=H, I=I, dtype=dtype, device="cuda", bias=False)
    gate_w = torch.randn(E, H, device="cuda")
    torch._dynamo.reset()
    with interpreter(False):
        compiled = torch.compile(block, fullgraph=True)
        eager = block(x, gate_w, w13, w2, k)
        out = compiled(x, gate_w, w13, w2, k)
        torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-3)
        static_x = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                compiled(static_x, gate_w, w13, w2, k)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = compiled(static_x, gate_w, w13, w2, k)
        for seed in (1, 2):
            new_x = torch.randn(T, H, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).to(dtype)
            static_x.copy_(new_x)
            g.replay()
            torch.cuda.synchronize()
            want = block(new_x, gate_w, w13, w2, k)
            # fp32 atomics add the top-k terms in any order: equal up to the last bits
            torch.testing.assert_close(static_out, want, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                       atol=1e-3 if dtype != torch.float32 else 1e-6)
            assert not torch.equal(static_out, eager), "the replay must compute on the new input"
