"""FusedMoE's inputs: tensors on the weights' device, and expert ids of any integer dtype on every kernel=torch path."""
import pytest
import torch

from composer import build
from composer.kernels.torch_backend import TorchExperts

QUANTS = [["quant=none"], ["quant=int8_w8a16"], ["quant=int4_w4a16", "quant.group_size=16"], ["quant=fp8_w8a8"]]


def experts(compose, quant):
    cfg = compose("model=tiny", "model.dtype=float32", "model.num_layers=1", "kernel=torch", *quant)
    return build(cfg).layers[0].mlp.experts


def routing(T=3):
    x = torch.randn(T, 96, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 5], [2, 5], [7, 0]], dtype=torch.int32)[:T]  # a subset of the 8 experts
    return x, torch.full((T, 2), 0.5), ids


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q[0][6:])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.int8, torch.uint8])
def test_ids_of_any_integer_dtype_give_the_int32_result(compose, quant, dtype):
    """Quantized kernel=torch selected the touched experts with the ids' own dtype: uint8 ids indexed as a mask
    (IndexError), a uint8 -1 wrapped to 255. The Triton backend reads any integer dtype by value; so does torch."""
    layer = experts(compose, quant)
    x, w, ids = routing()
    with torch.no_grad():
        assert torch.equal(layer(x, w, ids.to(dtype)), layer(x, w, ids))


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q[0][6:])
def test_float_ids_are_refused_before_quantized_experts_are_selected(compose, quant):
    """(The touched-experts selection casts ids to int64: float ids must be refused first, not truncated.)"""
    layer = experts(compose, quant)
    x, w, ids = routing()
    weights = layer.quant_method.expert_weights(layer)
    with pytest.raises(ValueError, match=r"topk_ids must be an integer tensor of expert ids .* got torch.float32"):
        TorchExperts().apply(x, w, ids.float(), weights, "silu")


@pytest.mark.parametrize("which", [0, 1, 2])
def test_fused_moe_names_an_input_on_another_device(compose, which):
    layer = experts(compose, ["quant=int8_w8a16"])
    args = list(routing())
    name = ("hidden_states", "topk_weights", "topk_ids")[which]
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=f"FusedMoE got {name} on meta, its weights are on cpu: put {name} on cpu"):
        layer(*args)


def test_fused_moe_refuses_a_non_tensor_input(compose):
    layer = experts(compose, ["quant=none"])
    x, w, ids = routing()
    with pytest.raises(TypeError, match="FusedMoE takes topk_ids as a torch.Tensor on cpu, got list"):
        layer(x, w, ids.tolist())
