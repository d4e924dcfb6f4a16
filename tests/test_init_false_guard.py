"""A model built with init=False holds uninitialized memory: it refuses to run until its weights came in."""
import pytest
import torch

import composer
from composer.errors import WeightLoadError
from composer.factory import finish_loading


def _cfg(*extra):
    return composer.load_config(None, ["device=cpu", "kernel=torch", *extra])


@pytest.mark.parametrize("quant", ["none", "fp8_w8a8"])
def test_forward_before_loading_is_refused(quant):
    m = composer.build(_cfg(f"quant={quant}"), init=False)
    x = torch.randn(3, m.layers[0].norm.weight.shape[0], dtype=torch.bfloat16)
    with pytest.raises(WeightLoadError, match="init=False and holds no weights yet"):
        m(x)
    if quant != "none":  # (the layer alone: its quantized tensors do not exist yet)
        with pytest.raises(WeightLoadError, match="fp8_w8a8 weights are not processed yet"):
            m.layers[0].mlp.experts(x, torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int32))


@pytest.mark.parametrize("quant", ["none", "int8_w8a16"])
def test_load_state_dict_then_runs_like_the_source(quant):
    src = composer.build(_cfg())  # (float weights: a quantized model loads float weights, then finish_loading)
    x = torch.randn(3, src.layers[0].norm.weight.shape[0], dtype=torch.bfloat16)
    m = composer.build(_cfg(f"quant={quant}"), init=False)
    m.load_state_dict(src.state_dict())
    if quant != "none":
        finish_loading(m)
    want = composer.build(_cfg(f"quant={quant}"))(x)  # (the same seed: the same weights, quantized alike)
    assert torch.equal(m(x), want)


def test_a_partial_load_state_dict_keeps_the_guard():
    src = composer.build(_cfg())
    m = composer.build(_cfg(), init=False)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("layers.1.")}
    m.load_state_dict(sd, strict=False)
    with pytest.raises(WeightLoadError, match="init=False"):
        m(torch.randn(2, src.layers[0].norm.weight.shape[0], dtype=torch.bfloat16))
    for p, q in zip(m.parameters(), src.parameters()):  # copied in by hand: finish_loading says so
        p.data.copy_(q)
    finish_loading(m)
    x = torch.randn(2, src.layers[0].norm.weight.shape[0], dtype=torch.bfloat16)
    assert torch.equal(m(x), src(x))


def test_bad_build_arguments():
    with pytest.raises(TypeError, match="init is True"):
        composer.build(_cfg(), init="no")
    with pytest.raises(TypeError, match="a rank is an int"):
        composer.build(_cfg(), ep_rank=1.0)
    with pytest.raises(ValueError, match=r"tp_rank=-1 must be in \[0, 2\)"):
        composer.build(_cfg("parallel.tp_size=2"), tp_rank=-1)
    with pytest.raises(ValueError, match=r"tp_rank=7 must be in \[0, 2\)"):
        composer.build(_cfg("parallel.tp_size=2"), tp_rank=7)


def test_router_checks_its_logits_width():
    m = composer.build(_cfg())
    router = m.layers[0].mlp.router
    with pytest.raises(ValueError, match=rf"logits \[T, num_experts={router.num_experts}\], got \[4, 16\]"):
        router(torch.randn(4, 16))


def test_inf_and_nan_settings_are_refused():
    from composer.errors import ConfigError

    with pytest.raises(ConfigError, match="routed_scaling_factor = inf: Input should be a finite number"):
        _cfg("model.router.routed_scaling_factor=inf")
    with pytest.raises(ConfigError, match="finite number"):
        _cfg("task=check", "task.tolerance=nan")
