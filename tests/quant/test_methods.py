"""Each quant method on the torch backend vs the dequantized float64 oracle (kernel rounding) and vs the
unquantized float64 oracle (the documented bound), one FusedMoE layer, fresh random inputs."""
import zlib

import pytest
import torch

from composer.checking import TOLERANCE, Capture, oracle_layer, rel_error
from composer.factory import build_experts, finish_loading, init_weights
from composer.quant.checking import _unquantized_cfg

METHODS = {
    "int8_w8a16": ["quant=int8_w8a16"],
    "int8_w8a8": ["quant=int8_w8a8"],
    "int4_w4a16": ["quant=int4_w4a16", "quant.group_size=16"],
    "int4_w4a16_zp": ["quant=int4_w4a16", "quant.group_size=16", "quant.zero_point=true"],
    "fp8_per_tensor": ["quant=fp8_w8a8"],
    "fp8_static": ["quant=fp8_w8a8", "quant.activation_scheme=static", "quant.static_input_scale=0.02"],
    "fp8_per_token_channel": ["quant=fp8_w8a8", "quant.granularity=per_token_channel"],
    "fp8_block": ["quant=fp8_w8a8", "quant.granularity=block", "quant.block_shape=[16,32]"],
}
SIZES = ["model.hidden_size=64", "model.intermediate_size=96", "model.num_experts=6", "model.top_k=2", "kernel=torch"]


def layer_of(cfg):
    m = torch.nn.ModuleDict({"experts": build_experts(cfg)})
    init_weights(m, cfg.seed)
    finish_loading(m)
    return m["experts"]


def inputs(cfg, T, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, cfg.model.hidden_size, generator=g).to(cfg.model.torch_dtype)
    ids = torch.stack([torch.randperm(cfg.model.num_experts, generator=g)[:cfg.model.top_k] for _ in range(T)]).int()
    w = torch.rand(T, cfg.model.top_k, generator=g) + 0.1
    return x, (w / w.sum(-1, keepdim=True)).float(), ids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_torch_backend_vs_both_oracles(compose, method, dtype):
    cfg = compose(*METHODS[method], *SIZES, f"model.dtype={dtype}", "seed=3")
    layer, ref = layer_of(cfg), layer_of(_unquantized_cfg(cfg))
    assert layer.w13.dtype != ref.w13.dtype  # really quantized
    x, tw, ids = inputs(cfg, 33, seed=zlib.crc32(f"{method}-{dtype}".encode()) % 1000)  # (hash() of str: per process)
    with torch.no_grad():
        out = layer(x, tw, ids)
    cap = Capture(x=x, topk_weights=tw, topk_ids=ids, out=out)
    dq = rel_error(out, oracle_layer(layer, cap))
    uq = rel_error(out, oracle_layer(ref, cap))
    _, bound = layer.quant_method.tolerances(cfg.quant.params, dtype)
    # kernel rounding: the dtype's tolerance (w8a8 in fp32: + a rare one-quantum activation flip, LAYER_TOL)
    tol = max(TOLERANCE[dtype], layer.quant_method.LAYER_TOL.get(dtype, 0.0))
    assert dq <= tol, f"{method} {dtype}: {dq:.3e} vs the dequantized oracle"
    assert 1e-4 < uq <= bound, f"{method} {dtype}: {uq:.3e} vs the unquantized oracle (bound {bound})"


def test_w8a8_quantizes_activations(compose):
    """w8a8 differs from w8a16 on the same int8 weights by the activation rounding, and the oracle sees it."""
    cfg = compose("quant=int8_w8a8", *SIZES, "model.dtype=float32")
    a, b = layer_of(cfg), layer_of(compose("quant=int8_w8a16", *SIZES, "model.dtype=float32"))
    assert torch.equal(a.w13, b.w13) and torch.equal(a.w13_weight_scale, b.w13_weight_scale)
    x, tw, ids = inputs(cfg, 16, seed=7)
    with torch.no_grad():
        oa, ob = a(x, tw, ids), b(x, tw, ids)
    d = rel_error(oa, ob)
    assert 1e-4 < d < 5e-2
    cap = Capture(x=x, topk_weights=tw, topk_ids=ids, out=oa)
    assert rel_error(oa, oracle_layer(a, cap)) < 1e-5
    assert rel_error(ob, oracle_layer(a, cap)) > 1e-4  # the oracle does quantize the activations


def test_fp8_per_shard_scales_are_requantized_to_one(compose):
    from composer.quant.utils import set_param

    cfg = compose("quant=fp8_w8a8", *SIZES, "model.dtype=float32")
    layer = layer_of(cfg)
    E, I = 6, 96
    w_before = layer.quant_method.dequantize(layer.quant_method.expert_weights(layer), torch.float32).w13
    # a checkpoint with one scale per shard (w1, w3): the gate half stored at half the values, twice the scale
    s = layer.w13_weight_scale.data
    q = layer.w13.data.float()
    q[:, :I] = q[:, :I] / 2
    set_param(layer, "w13", q.to(torch.float8_e4m3fn))
    set_param(layer, "w13_weight_scale", torch.stack([s * 2, s], dim=1))
    layer.quant_state = "prequantized"
    finish_loading(torch.nn.ModuleDict({"e": layer}))
    assert layer.w13_weight_scale.shape == (E,)
    w_after = layer.quant_method.dequantize(layer.quant_method.expert_weights(layer), torch.float32).w13
    assert rel_error(w_after, w_before) < 2e-2 and torch.equal(layer.w13_weight_scale, s * 2)


@pytest.mark.parametrize("method", list(METHODS))
def test_torch_backend_dequantizes_only_the_routed_experts(compose, method, monkeypatch):
    """kernel=torch dequantizes the experts a call routes to, not all E: bit for bit what dequantizing every
    expert gives, at T = 0 and 1, with dropped (-1) and out-of-range ids and with every pair dropped."""
    from composer.kernels import torch_backend
    from composer.kernels.torch_backend import TorchExperts

    cfg = compose(*METHODS[method], *SIZES, "model.num_experts=8", "model.dtype=bfloat16")
    w = layer_of(cfg).quant_method.expert_weights(layer_of(cfg))
    seen = []
    real = torch_backend._touched
    monkeypatch.setattr(torch_backend, "_touched", lambda w_, ids: seen.append(real(w_, ids)[0].num_experts) or real(w_, ids))
    k, H = cfg.model.top_k, cfg.model.hidden_size
    cases = [(torch.empty(0, H, dtype=torch.bfloat16), torch.empty(0, k), torch.empty(0, k, dtype=torch.int32))]
    cases += [inputs(cfg, T, seed) for T, seed in ((1, 2), (5, 3))]
    x, tw, ids = inputs(cfg, 7, 4)
    cases.append((x, tw, torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)) < 0.3,
                                     torch.tensor([-1, 9], dtype=ids.dtype)[torch.randint(0, 2, ids.shape)], ids)))
    cases.append((x, tw, torch.full_like(ids, -1)))
    outs = [TorchExperts().apply(x, tw, ids, w, "silu") for x, tw, ids in cases]
    monkeypatch.setattr(torch_backend, "_touched", lambda w_, ids: (w_, ids))
    for (x, tw, ids), out in zip(cases, outs):
        assert torch.equal(out, TorchExperts().apply(x, tw, ids, w, "silu"))
    assert seen[0] == 0 and seen[1] == 2 and seen[-1] == 0 and max(seen) < 8
