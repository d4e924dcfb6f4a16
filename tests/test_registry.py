"""Registries, PluggableLayer out-of-tree swap, CustomOp dispatch and the custom_ops rules."""
import pytest
import torch

from composer.errors import RegistryError
from composer.layers.activation import SiluAndMul
from composer.layers.fused_moe import FusedMoE
from composer.layers.router import Router
from composer.registry import (
    CUSTOM_OPS, KERNELS, LAYERS, PluggableLayer, Registry, build_settings, check_custom_ops, custom_op_enabled,
)


def test_registry_rejects_duplicates_and_suggests_names():
    reg = Registry("widget")
    reg.register("alpha", object)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("alpha", int)
    reg.register("alpha", object)  # the same object again is harmless (module reloads)
    with pytest.raises(RegistryError, match="Did you mean 'alpha'"):
        reg.get("alpah")


def test_builtin_names_are_registered():
    assert "fused_moe" in LAYERS.names()
    assert "torch" in KERNELS.names()
    assert {"silu_and_mul", "gelu_and_mul", "swigluoai_and_mul", "topk_router"} <= set(CUSTOM_OPS.names())


def test_oot_swap_replaces_construction_and_can_be_undone():
    @FusedMoE.register_oot
    class MyMoE(FusedMoE):
        def forward(self, x, w, ids):
            return super().forward(x, w, ids) * 2

    try:
        layer = FusedMoE(4, 2, 8, 6, dtype=torch.float32)
        assert type(layer) is MyMoE
        assert layer.is_oot and "out-of-tree" in layer.implementation()
        torch.nn.init.normal_(layer.w13)
        torch.nn.init.normal_(layer.w2)
        x = torch.randn(3, 8)
        ids = torch.tensor([[0, 1], [2, 3], [1, 3]], dtype=torch.int32)
        w = torch.rand(3, 2)
    finally:
        FusedMoE.unregister_oot()
    ref = FusedMoE(4, 2, 8, 6, dtype=torch.float32)
    assert type(ref) is FusedMoE
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x, w, ids), 2 * ref(x, w, ids))


def test_oot_by_name_must_subclass():
    with pytest.raises(RegistryError, match="must subclass"):
        PluggableLayer.register_oot(name="fused_moe")(torch.nn.Linear)
    with pytest.raises(RegistryError, match="unknown layer 'fused_mo'"):
        PluggableLayer.register_oot(name="fused_mo")


def test_custom_op_dispatch_by_platform_and_toggle():
    with build_settings(["all"], "cuda"):
        op = SiluAndMul()
    assert op.implementation() == "SiluAndMul.forward_cuda"
    with build_settings(["all"], "cpu"):
        assert SiluAndMul().implementation() == "SiluAndMul.forward_cpu"
    with build_settings(["all", "-silu_and_mul"], "cuda"):
        assert SiluAndMul().implementation() == "SiluAndMul.forward_native"
        assert Router(4, 2).implementation() == "Router.forward_cuda"
    with build_settings(["none", "+topk_router"], "cuda"):
        assert SiluAndMul().implementation() == "SiluAndMul.forward_native"
        assert Router(4, 2).implementation() == "Router.forward_cuda"


def test_custom_op_enabled_rules():
    assert custom_op_enabled("silu_and_mul", ["all"])
    assert not custom_op_enabled("silu_and_mul", ["none"])
    assert custom_op_enabled("silu_and_mul", ["none", "+silu_and_mul"])
    assert not custom_op_enabled("silu_and_mul", ["all", "-silu_and_mul"])


@pytest.mark.parametrize("entries, message", [
    (["all", "none"], "cannot both"),
    (["silu_and_mul"], "must be 'all', 'none'"),
    (["+silu_and_mull"], "Did you mean 'silu_and_mul'"),
    (["+silu_and_mul", "-silu_and_mul"], "both enabled and disabled"),
])
def test_custom_ops_validation(entries, message):
    problems = check_custom_ops(entries)
    assert any(message in p for p in problems), problems


HALF = """from composer.kernels.torch_backend import TorchExperts
from composer.registry import KERNELS


@KERNELS.register("{name}_torch")
class Half(TorchExperts):
    name = "{name}_torch"

{fail}
"""


@pytest.mark.parametrize("name, fail, message", [
    ("half_dep", "import composer_no_such_dependency", r"cannot import 'half_dep_plugin': No module named "
                                                       r"'composer_no_such_dependency'"),
    ("half_bug", "raise RuntimeError('a bug in the plugin')", r"importing 'half_bug_plugin' failed: RuntimeError: "
                                                               r"a bug in the plugin"),
])
def test_plugin_failing_halfway_leaves_nothing_behind(tmp_path, monkeypatch, name, fail, message):
    """What a plugin registered before its import failed is undone: the same error again on a retry (not 'already
    registered'), and no half-plugin kernel to pick."""
    from composer import load_config
    from composer.errors import ConfigError
    from composer.registry import KERNELS

    (tmp_path / f"{name}_plugin.py").write_text(HALF.format(name=name, fail=fail))
    monkeypatch.syspath_prepend(str(tmp_path))
    for _ in range(2):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"plugins=[{name}_plugin]"])
    assert f"{name}_torch" not in KERNELS


def test_import_composer_registers_its_custom_ops():
    """``torch.ops.composer.*`` exist after ``import composer`` (a fresh process), as vLLM's ops do after import."""
    import subprocess
    import sys

    code = ("import torch, composer; print(all(hasattr(torch.ops.composer, n) for n in "
            "('fused_experts', 'moe_align', 'fused_experts_quant')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_an_internal_name_is_gettable_but_no_choice():
    """An internal class (built by other code, with other arguments) stays out of names(): config validation, choice
    lists and did-you-means read names()."""
    reg = Registry("widget")
    reg.register("alpha", object)
    reg.register("swap", int)
    reg.mark_internal("swap", "built by alpha only")
    assert reg.names() == ["alpha"] and reg.get("swap") is int and "swap" in reg
    assert reg.internal("swap") == "built by alpha only" and reg.internal("alpha") is None
    assert reg.internal("absent") is None


def test_the_transformers_swap_class_is_internal():
    pytest.importorskip("transformers")
    assert "transformers_fused_moe" in LAYERS and "transformers_fused_moe" not in LAYERS.names()
    assert "transformers_moe" in LAYERS.names()
