"""The torch reference experts kernel and the FusedMoE layer against the float64 oracle."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from composer.kernels.reference import oracle_experts, torch_experts
from composer.layers.activation import act_and_mul, swigluoai_and_mul
from composer.layers.fused_moe import FusedMoE
from composer.checking import rel_error

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_problem(T, E, k, H, I, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    b13 = (torch.randn(E, 2 * I, generator=g) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(E, H, generator=g) * 0.1).to(dtype) if bias else None
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32) if T else torch.empty(0, k, dtype=torch.int32)
    w = torch.rand(T, k, generator=g) + 0.1
    return x, w, ids, w13, w2, b13, b2


@settings(max_examples=25, deadline=None)
@given(T=st.sampled_from([0, 1, 2, 7, 33]), E=st.integers(1, 9), k=st.integers(1, 9), H=st.integers(1, 40),
       I=st.integers(1, 40), act=st.sampled_from(["silu", "gelu", "swigluoai"]), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_reference_matches_oracle(T, E, k, H, I, act, bias, dtype, seed):
    k = min(k, E)
    x, w, ids, w13, w2, b13, b2 = random_problem(T, E, k, H, I, dtype, bias, seed)
    out = torch_experts(x, w, ids, w13, w2, act, b13, b2)
    ref = oracle_experts(x, w, ids, w13, w2, act, b13, b2)
    assert out.shape == (T, H) and out.dtype == dtype
    assert conditioned_error(out, ref, x, w, ids, w13, w2, act, b13, b2) <= TOL[dtype]


def conditioned_error(out, ref, x, w, ids, w13, w2, act, b13, b2):
    """||out - ref|| over the size of the sums' terms, not of their result.

    Rounding errors scale with the terms a sum adds up: when they cancel (hypothesis finds H=1, I=2
    cases whose one output is 10x smaller than its terms), the error relative to the result is no
    measure of the kernel. The terms' size is the oracle on absolute values (no cancellation is left;
    silu/gelu/swigluoai of |g| bound their values on g up to small constants). For well-conditioned
    outputs the denominator is ||ref|| itself, so this is the usual relative error.
    """
    a = lambda t: None if t is None else t.abs()  # noqa: E731
    mag = oracle_experts(x.abs(), w.abs(), ids, w13.abs(), w2.abs(), act, a(b13), a(b2))
    return float((out.double() - ref).norm() / max(ref.norm(), mag.norm(), 1e-30)) if ref.numel() else 0.0


def test_reference_by_hand_single_token():
    x, w, ids, w13, w2, b13, b2 = random_problem(1, 3, 2, 5, 4, torch.float64, True, 0)
    want = torch.zeros(5, dtype=torch.float64)
    for slot in range(2):
        e = int(ids[0, slot])
        h = w13[e] @ x[0] + b13[e]
        a = torch.nn.functional.silu(h[:4]) * h[4:]
        want += w[0, slot].double() * (w2[e] @ a + b2[e])
    torch.testing.assert_close(torch_experts(x, w, ids, w13, w2, "silu", b13, b2)[0], want)


def test_minus_one_ids_are_skipped():
    x, w, ids, w13, w2, _, _ = random_problem(6, 4, 2, 8, 6, torch.float32, False, 1)
    ids[::2, 1] = -1
    out = torch_experts(x, w, ids, w13, w2)
    keep = ids >= 0
    ref = oracle_experts(x, w * keep, ids.clamp_min(0), w13, w2)
    assert rel_error(out, ref) < 1e-5


def test_swigluoai_formula():
    g = torch.tensor([[-9.0, 0.5, 8.0, 1.0, -8.0, 2.0]])
    gate, up = g[..., :3], g[..., 3:]
    gc, uc = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
    want = (uc + 1) * gc * torch.sigmoid(1.702 * gc)
    torch.testing.assert_close(swigluoai_and_mul(g), want)
    with pytest.raises(ValueError, match="unknown activation"):
        act_and_mul("relu2", g)


def test_shape_errors_name_both_shapes():
    x, w, ids, w13, w2, _, _ = random_problem(2, 3, 1, 8, 4, torch.float32, False, 0)
    with pytest.raises(ValueError, match=r"w2 \(3, 8, 5\)"):
        torch_experts(x, w, ids, w13, torch.randn(3, 8, 5))
    with pytest.raises(ValueError, match=r"topk_ids must be an integer tensor .* got torch.float32"):
        torch_experts(x, w, ids.float(), w13, w2)  # (as the Triton experts refuse them)


@pytest.mark.parametrize("T", [0, 1, 5, 64])
@pytest.mark.parametrize("top_k", [1, 4])
def test_fused_moe_layer_vs_oracle(T, top_k):
    E, H, I = 4, 24, 20
    layer = FusedMoE(E, top_k, H, I, dtype=torch.float32, has_bias=True, activation="gelu")
    g = torch.Generator().manual_seed(T * 7 + top_k)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(T)]).to(torch.int32) if T else torch.empty(0, top_k, dtype=torch.int32)
    w = torch.rand(T, top_k, generator=g)
    out = layer(x, w, ids)
    ref = oracle_experts(x, w, ids, layer.w13, layer.w2, "gelu", layer.w13_bias, layer.w2_bias)
    assert rel_error(out, ref) < 1e-5


def test_reference_rounds_only_the_intermediate():
    """kernel=torch (torch_experts) rounds GEMM1's activated output to the activations' dtype once, as the fused
    kernels write it, and passes w8a8's dequantized activations to GEMM2 unrounded: a quant_act result that bf16
    cannot hold (x (1 + 2^-12)) must reach the output, and GEMM1 must not be rounded before the activation."""
    from composer.layers.activation import act_and_mul

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, generator=g).to(torch.bfloat16)
    w13, w2 = torch.randn(2, 24, 16, generator=g), torch.randn(2, 16, 12, generator=g)
    tw, ids = torch.rand(3, 1, generator=g), torch.tensor([[0], [1], [0]], dtype=torch.int32)
    bump = 1 + 2.0 ** -12
    for wdt, qa in ((torch.float32, lambda t, stage: t * bump if stage == "a2" else t), (torch.bfloat16, None)):
        a13, a2 = w13.to(wdt), w2.to(wdt)  # float32: w8a8's dequantized weights; bf16: a bf16 model
        out = torch_experts(x, tw, ids, a13, a2, "silu", quant_act=qa)
        f = bump if qa else 1.0
        want = torch.stack([
            (act_and_mul("silu", x[t].float() @ a13[e].float().t()).to(torch.bfloat16).float() * f)
            @ a2[e].float().t() * tw[t, 0] for t, e in enumerate(ids[:, 0].tolist())]).to(torch.bfloat16)
        assert torch.equal(out, want), wdt
