"""Config validation of the quant methods: capability, sizes that don't fit a block or group, schemes."""
import pytest

from composer import load_config
from composer.config import ModelConfig
from composer.errors import ConfigError
from composer.quant import utils as qu
from composer.quant.fp8 import Fp8Params, Fp8W8A8


def problems(*overrides):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["device=cpu", "kernel=torch", *overrides])
    return str(e.value)


def test_every_method_validates_on_cpu_with_torch_kernel():
    for o in (["quant=int8_w8a16"], ["quant=int8_w8a8"], ["quant=int4_w4a16", "quant.group_size=16"],
              ["quant=fp8_w8a8"], ["quant=fp8_w8a8", "quant.granularity=per_token_channel"],
              ["quant=fp8_w8a8", "quant.granularity=block", "quant.block_shape=[16,16]"]):
        cfg = load_config(None, ["device=cpu", "kernel=torch", *o])
        assert cfg.quant.name == o[0].split("=")[1]


def test_fp8_needs_sm89(monkeypatch):
    model = ModelConfig(num_experts=4, top_k=2, hidden_size=256, intermediate_size=256)
    monkeypatch.setattr("composer.quant.fp8.cuda_capability", lambda: (8, 0))
    (p,) = Fp8W8A8.check_config(Fp8Params(), model, "cuda")
    assert p[1] == "fp8_w8a8" and "compute capability >= 8.9" in p[2] and "sm80" in p[2]
    assert "quant=int8_w8a16" in p[2] and "quant=none" in p[2]
    monkeypatch.setattr("composer.quant.fp8.cuda_capability", lambda: (9, 0))
    assert Fp8W8A8.check_config(Fp8Params(), model, "cuda") == []
    monkeypatch.setattr("composer.quant.fp8.cuda_capability", lambda: (7, 5))
    assert Fp8W8A8.check_config(Fp8Params(), model, "cpu") == []  # the CPU runs fp8 through kernel=torch


def test_block_must_divide_sizes():
    msg = problems("quant=fp8_w8a8", "quant.granularity=block")  # tiny: hidden 96, intermediate 80
    assert "quant.block_shape = [128, 128]" in msg
    assert "model.hidden_size = 96" in msg and "model.intermediate_size = 80" in msg
    assert "quant.block_shape=[16,16]" in msg  # what to pick instead
    msg = problems("quant=fp8_w8a8", "quant.granularity=block", "quant.block_shape=[16,32]")
    assert "block_shape[1] = 32" in msg


def test_int4_group_must_divide_sizes():
    msg = problems("quant=int4_w4a16")  # default group 128 on tiny
    assert "quant.group_size = 128" in msg and "quant.group_size=16" in msg
    msg = problems("quant=int4_w4a16", "quant.group_size=7")
    assert "quant.group_size = 7" in msg and "even" in msg
    msg = problems("quant=int4_w4a16", "quant.group_size=-1", "model.hidden_size=95")
    assert "must be even" in msg


def test_static_scheme_rules():
    msg = problems("quant=fp8_w8a8", "quant.granularity=per_token_channel", "quant.activation_scheme=static")
    assert "quant.activation_scheme = 'static'" in msg and "granularity=per_tensor" in msg
    msg = problems("quant=fp8_w8a8", "quant.static_input_scale=0.1")
    assert "quant.static_input_scale = 0.1" in msg and "activation_scheme=static" in msg
    msg = problems("quant=fp8_w8a8", "quant.granularity=per_token")
    assert "quant.granularity" in msg and "per_token_channel" in msg


def test_unknown_quant_key_suggests():
    msg = problems("quant=int4_w4a16", "+quant.zero_points=true", "quant.group_size=16")
    assert "zero_point" in msg


def test_static_online_needs_a_scale(compose):
    """A config problem (exit code 2): online quantization has no input scale to use."""
    from composer import build
    from composer.errors import ConfigError

    cfg = compose("quant=fp8_w8a8", "quant.activation_scheme=static", "kernel=torch")
    with pytest.raises(ConfigError, match="quant.static_input_scale = None: fp8_w8a8 with activation_scheme=static"):
        build(cfg)


@pytest.mark.parametrize("scale", ["0", "1e-45", "1e-50", "1e40"])
def test_static_input_scale_must_fit_float32(scale):
    """Stored in float32: 1e-50 became 0 (NaN outputs), 1e40 a RuntimeError at build; both are config problems."""
    msg = problems("quant=fp8_w8a8", "quant.activation_scheme=static", f"quant.static_input_scale={scale}")
    assert "quant.static_input_scale = " in msg and "must be a float32 scale in [1.175e-38, 3.403e+38]" in msg
    load_config(None, ["device=cpu", "kernel=torch", "quant=fp8_w8a8", "quant.activation_scheme=static",
                       "quant.static_input_scale=1.2e-38"])  # (the smallest normal float32 and up: fine)


@pytest.mark.parametrize("group", ["16", "-1"])
def test_int4_odd_size_suggests_another_method_not_minus_one(group):
    """No group fits an odd size (-1 neither: two values per byte along K), so the hint names other methods."""
    msg = problems("quant=int4_w4a16", f"quant.group_size={group}", "model.intermediate_size=81")
    assert "model.intermediate_size = 81" in msg and "quant=int8_w8a16" in msg and "quant=fp8_w8a8" in msg
    assert "use quant.group_size=-1" not in msg
