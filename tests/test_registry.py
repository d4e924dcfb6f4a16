"""Registries, PluggableLayer out-of-tree swap, CustomOp dispatch and the custom_ops rules."""
import pytest
import torch

from composer.errors import ConfigError, RegistryError
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


def _plugin(tmp_path, monkeypatch, name, body):
    """A plugin module ``name`` on sys.path, written from ``body``."""
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


KERNEL_PLUGIN = '''
from composer.kernels.torch_backend import TorchExperts
from composer.registry import KERNELS


@KERNELS.register("{name}")
class K(TorchExperts):
    name = "{name}"
'''

OOT_PLUGIN = '''
from composer.layers.fused_moe import FusedMoE


@FusedMoE.register_oot
class Doubled(FusedMoE):
    def forward(self, *args, **kwargs):
        return 2 * super().forward(*args, **kwargs)
'''


def test_each_config_runs_with_its_own_plugins(tmp_path, monkeypatch):
    """A sweep's jobs share one process: a plugin one job listed stayed registered for the next (its register_oot
    replacement ran in a job with plugins=[]), and a later job's plugin clashed with a name no job of its own took."""
    from composer import build, load_config
    from composer.registry import KERNELS, PluggableLayer, _PLUGIN_REGISTERED

    oot = _plugin(tmp_path, monkeypatch, "oot_twice_plugin", OOT_PLUGIN)
    a = _plugin(tmp_path, monkeypatch, "kern_a_plugin", KERNEL_PLUGIN.format(name="same_kern"))
    b = _plugin(tmp_path, monkeypatch, "kern_b_plugin", KERNEL_PLUGIN.format(name="same_kern"))
    base = ["device=cpu", "kernel=torch", "model.num_layers=1"]
    try:
        x = torch.randn(3, 96, dtype=torch.bfloat16)

        def experts_and_output(plugins):
            model = build(load_config(None, [*base, f"plugins=[{plugins}]"]))
            with torch.no_grad():
                return type(model.get_submodule("layers.0.mlp.experts")).__name__, model(x)

        plain, doubled, again, back = (experts_and_output(p) for p in ("", oot, "", oot))
        held = load_config(None, [*base, f"plugins=[{oot}]"])
        load_config(None, [*base, "plugins=[]"])  # (a config validated later does not change what `held` builds)
        assert type(build(held).get_submodule("layers.0.mlp.experts")).__name__ == "Doubled"
        assert (plain[0], doubled[0], again[0], back[0]) == ("FusedMoE", "Doubled", "FusedMoE", "Doubled")
        assert not torch.equal(doubled[1], plain[1]) and torch.equal(again[1], plain[1])
        assert torch.equal(back[1], doubled[1])
        load_config(None, [*base, "plugins=[]"])
        assert not PluggableLayer._oot
        load_config(None, [*base, f"plugins=[{a}]", "kernel.name=same_kern"])
        assert KERNELS.get("same_kern").__module__ == a
        load_config(None, [*base, f"plugins=[{b}]", "kernel.name=same_kern"])  # (a's name is out: no clash)
        assert KERNELS.get("same_kern").__module__ == b
        with pytest.raises(ConfigError, match=r"kernel.name = 'same_kern': unknown experts kernel"):
            load_config(None, [*base, "plugins=[]", "kernel.name=same_kern"])
        with pytest.raises(ConfigError, match=r"'same_kern' is already registered by kern_a_plugin"):
            load_config(None, [*base, f"plugins=[{a},{b}]"])
    finally:
        load_config(None, [*base, "plugins=[]"])
        for m in (oot, a, b):
            _PLUGIN_REGISTERED.pop(m, None)


def test_a_plugin_with_a_register_function_is_named_and_module_function_works(tmp_path, monkeypatch, caplog):
    """The example package's module only defines register() (its entry point calls it): listed in plugins: it did
    nothing, silently. It now says to list 'module:register', which calls the function (a plugin that only adds tile
    configs, registering nothing, is still taken)."""
    from composer import load_config
    from composer.registry import KERNELS, _PLUGIN_REGISTERED

    mod = _plugin(tmp_path, monkeypatch, "lazy_plugin", "def register():\n" + "\n".join(
        "    " + line for line in KERNEL_PLUGIN.format(name="lazy_kern").strip().splitlines()) + "\n")
    base = ["device=cpu", "kernel=torch"]
    try:
        with caplog.at_level("WARNING", logger="composer.registry"):
            load_config(None, [*base, f"plugins=[{mod}]"])
        assert "registered no implementation when imported" in caplog.text and f"'{mod}:register'" in caplog.text
        assert "lazy_kern" not in KERNELS
        cfg = load_config(None, [*base, f"plugins=['{mod}:register']", "kernel.name=lazy_kern"])
        assert cfg.kernel.resolved == "lazy_kern" and "lazy_kern" in KERNELS
        with pytest.raises(ConfigError, match=r"module lazy_plugin has no function nothere"):
            load_config(None, [*base, f"plugins=['{mod}:nothere']"])
    finally:
        load_config(None, [*base, "plugins=[]"])
        for m in (mod, f"{mod}:register"):
            _PLUGIN_REGISTERED.pop(m, None)


def test_a_plugin_imported_by_another_keeps_its_names_and_oot_clashes_are_refused_whatever_came_before(
        tmp_path, monkeypatch):
    """A plugin that another plugin imports first was credited with nothing, so a later config listing it alone lost
    its kernel; two register_oot plugins were refused when new but accepted (last one winning) once each had run."""
    from composer import load_config
    from composer.registry import KERNELS, _PLUGIN_REGISTERED

    b = _plugin(tmp_path, monkeypatch, "nested_b_plugin", KERNEL_PLUGIN.format(name="nested_kern"))
    a = _plugin(tmp_path, monkeypatch, "nested_a_plugin", f"import {b}  # noqa: F401\n")
    o1 = _plugin(tmp_path, monkeypatch, "oot_one_plugin", OOT_PLUGIN)
    o2 = _plugin(tmp_path, monkeypatch, "oot_two_plugin", OOT_PLUGIN.replace("Doubled", "Other"))
    base = ["device=cpu", "kernel=torch"]
    try:
        for plugins in ([a], [b], [a, b], [b], [a]):
            cfg = load_config(None, [*base, f"plugins=[{','.join(plugins)}]", "kernel.name=nested_kern"])
            assert KERNELS.get(cfg.kernel.resolved).__module__ == b, plugins
        load_config(None, [*base, f"plugins=[{o1}]"])
        load_config(None, [*base, f"plugins=[{o2}]"])
        for pair in ([o1, o2], [o2, o1]):
            with pytest.raises(ConfigError, match="already replaced by out-of-tree"):
                load_config(None, [*base, f"plugins=[{','.join(pair)}]"])
    finally:
        load_config(None, [*base, "plugins=[]"])
        for m in (a, b, o1, o2):
            _PLUGIN_REGISTERED.pop(m, None)


@pytest.mark.parametrize("name", ["a,b", "my kernel", "x=y", "k.v", "1k", ""])
def test_a_registry_name_is_a_config_name(name):
    from composer.registry import KERNELS

    with pytest.raises(RegistryError, match="letters, digits and _"):
        KERNELS.register(name, object)


def test_reserved_names_and_duplicates_say_what_to_do():
    from composer.layers.fused_moe import FusedMoE
    from composer.registry import CUSTOM_OPS, KERNELS, PluggableLayer

    with pytest.raises(RegistryError, match="'auto' is a name the config reserves"):
        KERNELS.register("auto", object)
    with pytest.raises(RegistryError, match="'all' is a name the config reserves"):
        CUSTOM_OPS.register("all", object)
    with pytest.raises(RegistryError, match=r"'torch' is already registered by .*; pick another name$"):
        KERNELS.register("torch", object)
    first = FusedMoE.register_oot(type("First", (FusedMoE,), {}))
    try:
        with pytest.raises(RegistryError, match=r"already replaced by out-of-tree .*First; one replacement per layer"):
            FusedMoE.register_oot(type("Second", (FusedMoE,), {}))
        assert PluggableLayer._oot[FusedMoE] is first
    finally:
        FusedMoE.unregister_oot()
