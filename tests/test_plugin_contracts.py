"""What composer checks of a plugin's implementations, and how it names them: a layer that is no FusedMoE (and brings
no model) is refused at validation; what an experts kernel's apply returns is checked where FusedMoE calls it; a kernel
is reported by the registry name the config chose; a quant method without a documented bound is not judged but shown;
task=run warns about an output error above task=check's tolerance."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from rich.console import Console

from composer import load_config
from composer.errors import ConfigError
from composer.factory import build, build_experts
from composer.kernels.reference import torch_experts
from composer.kernels.torch_backend import TorchExperts
from composer.layers.fused_moe import FusedMoE
from composer.layers.modular_kernel import Experts, ExpertsKernelError
from composer.quant.base import register_quant
from composer.quant.unquantized import Unquantized
from composer.registry import KERNELS, LAYERS, QUANT_METHODS, PluggableLayer
from composer.tasks import TaskContext
from composer.tasks.common import make_tokens

SMALL = ["device=cpu", "model.num_layers=1", "task.tokens=8", "task.iters=1", "task.warmup=0"]


@pytest.fixture
def registered():
    """registered(registry, name, obj): registered for this test only."""
    added = []

    def add(reg, name, obj):
        reg.register(name, obj)
        added.append((reg, name))
        return obj

    yield add
    for reg, name in added:
        reg.unregister(name)


# 1. a layer that is no FusedMoE -----------------------------------------------------------------------------------

class NotAFusedMoE(PluggableLayer):
    def forward(self, h, w, ids):
        return torch.zeros_like(h)


class MyFusedMoE(FusedMoE):
    pass


def test_a_layer_that_is_no_fused_moe_is_refused(registered):
    registered(LAYERS, "t_plain_layer", NotAFusedMoE)
    with pytest.raises(ConfigError) as err:
        load_config(None, [*SMALL, "layer.name=t_plain_layer"])
    [p] = err.value.problems
    assert p.key == "layer.name" and p.value == "t_plain_layer"
    assert "'t_plain_layer'" in p.message and "must subclass composer's FusedMoE" in p.message
    assert "build_model" in p.message and '@PluggableLayer.register("t_plain_layer")' in p.message
    # a config built by hand skips validation: the factory refuses it too, never building the in-tree FusedMoE instead
    cfg = load_config(None, SMALL)
    hand = cfg.model_copy(update={"layer": cfg.layer.model_copy(update={"name": "t_plain_layer"})})
    with pytest.raises(ConfigError, match="must subclass composer's FusedMoE"):
        build(hand)


def test_a_fused_moe_subclass_layer_is_built(registered):
    registered(LAYERS, "t_my_fused_moe", MyFusedMoE)
    cfg = load_config(None, [*SMALL, "layer.name=t_my_fused_moe"])
    assert type(build_experts(cfg)) is MyFusedMoE
    assert type(build(cfg).layers[0].mlp.experts) is MyFusedMoE


def test_cli_refuses_a_layer_that_is_no_fused_moe_for_every_task(tmp_path):
    (tmp_path / "t_plain_layer_plugin.py").write_text(textwrap.dedent("""
        import torch
        from composer.registry import PluggableLayer

        @PluggableLayer.register("mylayer")
        class MyLayer(PluggableLayer):
            def forward(self, h, w, ids):
                return torch.zeros_like(h)
    """))
    env = dict(os.environ, COLUMNS="200",  # (prepended: composer may itself be on PYTHONPATH, not installed)
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    for task in ("show", "check", "run"):
        proc = subprocess.run([sys.executable, "-m", "composer", f"task={task}", "device=cpu", "layer.name=mylayer",
                               "plugins=[t_plain_layer_plugin]", f"hydra.run.dir={tmp_path}/{task}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (task, proc.stdout, proc.stderr)
        assert "layer 'mylayer'" in proc.stderr and "must subclass composer's FusedMoE" in proc.stderr


# 2. what an experts kernel's apply returns ----------------------------------------------------------------------

class Returns(TorchExperts):
    """apply returns ``bend(the right output)``."""

    bend = staticmethod(lambda out: out)

    def apply(self, x, w, ids, weights, act):
        return type(self).bend(super().apply(x, w, ids, weights, act))


def _kernel(bend):
    return type("Bent", (Returns,), {"bend": staticmethod(bend)})


@pytest.mark.parametrize("bend, said", [
    (lambda out: out.float(), "dtype torch.float32, on cpu; expected a tensor of its input x's shape (8, 96) on cpu, "
                              "in the layer's dtype torch.bfloat16"),
    (lambda out: out[:, :-1], "a tensor of shape (8, 95)"),
    (lambda out: out.sum(0, keepdim=True), "a tensor of shape (1, 96)"),  # (would broadcast on the residual add)
    (lambda out: None, "apply returned NoneType, not a torch.Tensor"),
    (lambda out: out.to("meta"), "on meta; expected"),
])
def test_what_a_kernel_returns_is_checked(registered, bend, said):
    registered(KERNELS, "t_bent", _kernel(bend))
    cfg = load_config(None, [*SMALL, "kernel.name=t_bent"])
    model = build(cfg)
    with pytest.raises(ExpertsKernelError) as err, torch.no_grad():
        model(make_tokens(cfg, 8))
    assert "experts kernel 't_bent'" in str(err.value) and said in str(err.value)
    assert "Fix the kernel's apply, or choose another kernel (kernel=torch)" in str(err.value)


def test_a_kernel_returning_its_input_like_tensor_runs(registered):
    registered(KERNELS, "t_fine", _kernel(lambda out: out))
    cfg = load_config(None, [*SMALL, "kernel.name=t_fine"])
    with torch.no_grad():
        assert build(cfg)(make_tokens(cfg, 8)).shape == (8, 96)


class WrongSignature(TorchExperts):
    def apply(self, x, w, ids):
        return x


def test_a_kernel_apply_with_the_wrong_signature_is_named(registered):
    registered(KERNELS, "t_wrongsig", WrongSignature)
    cfg = load_config(None, [*SMALL, "kernel.name=t_wrongsig"])
    with pytest.raises(ExpertsKernelError, match=r"experts kernel 't_wrongsig' \(WrongSignature\): its apply cannot be "
                       r"called as apply\(x, topk_weights, topk_ids, weights, activation\)"):
        build(cfg)


# 3. a kernel is reported by the registry name the config chose ----------------------------------------------------

class FastK(TorchExperts):  # (inherits TorchExperts.name, "torch")
    pass


class Bare(Experts):  # (inherits Experts.name, "")
    def apply(self, x, w, ids, weights, act):
        return torch_experts(x, w, ids, weights.w13, weights.w2, act, weights.w13_bias, weights.w2_bias)


def test_a_kernel_is_reported_by_its_registry_name(registered):
    registered(KERNELS, "t_fastk", FastK)
    registered(KERNELS, "t_bare", Bare)
    cfg = load_config(None, [*SMALL, "kernel.name=t_fastk"])
    layer = build(cfg).layers[0].mlp.experts
    assert layer.kernel.experts.name == "t_fastk" and layer.implementation() == "FusedMoE[none: none x t_fastk]"
    with pytest.raises(ConfigError) as err:
        load_config(None, [*SMALL, "kernel.name=t_bare", "quant=int8_w8a16"])
    assert [p.message for p in err.value.problems] == [
        "experts kernel 't_bare' does not support quant method 'int8_w8a16'; it supports: none"]
    cfg = load_config(None, [*SMALL, "kernel.name=t_bare"])
    assert build(cfg).layers[0].mlp.experts.implementation() == "FusedMoE[none: none x t_bare]"


# 4. a quant method that documents no bound: its error vs the unquantized oracle is shown, not judged -------------

class Scaled(Unquantized):
    """Stores the weights / 4 and forgets the scale: every output is 1/4 of the unquantized model's."""

    def process_weights_after_loading(self, layer):
        layer.w13.data.div_(4)
        layer.w2.data.div_(4)


@pytest.fixture
def scaled_quant():
    register_quant("t_scaled")(Scaled)
    yield
    QUANT_METHODS.unregister("t_scaled")


def test_check_shows_and_warns_an_unjudged_unquantized_error(scaled_quant, tmp_path, caplog):
    from composer.tasks.check import Check

    cfg = load_config(None, ["task=check", *SMALL, "model.dtype=float32", "quant.name=t_scaled"])
    console = Console(record=True, width=250)
    with caplog.at_level(logging.WARNING):
        m = Check().run(cfg, TaskContext(run_dir=tmp_path, console=console))
    assert m["passed"] and m["output_rel_err_unquantized"] > 0.1  # (not judged: composer cannot know its bound)
    mark = "not judged: quant=t_scaled documents no bound (UNQUANT_BOUND)"
    text = console.export_text()
    assert f"vs the unquantized float64 oracle output {m['output_rel_err_unquantized']:.2e}" in text and mark in text
    assert mark in m["warning"] and any(r.levelno == logging.WARNING and mark in r.getMessage() for r in caplog.records)


# 5. task=run warns about an output error above the tolerance task=check applies -----------------------------------

def test_run_warns_about_an_error_above_checks_tolerance(registered, tmp_path, caplog):
    from composer.tasks.run import Run

    registered(KERNELS, "t_double", _kernel(lambda out: 2 * out))
    cfg = load_config(None, ["task=run", *SMALL, "kernel.name=t_double"])
    with caplog.at_level(logging.WARNING, logger="composer.checking"):
        m = Run().run(cfg, TaskContext(run_dir=tmp_path, console=Console(quiet=True)))
    assert m["tolerance"] == 0.01 and m["output_rel_err"] > 0.1
    assert m["warning"].startswith(f"error vs the float64 oracle above the tolerance task=check applies (output_rel_err "
                                   f"{m['output_rel_err']:.3e} > 0.01)")
    assert "`composer task=check` judges it" in m["warning"]
    assert any(r.levelno == logging.WARNING and r.getMessage() == m["warning"] for r in caplog.records)
    fine = Run().run(load_config(None, ["task=run", *SMALL]), TaskContext(run_dir=tmp_path, console=Console(quiet=True)))
    assert "warning" not in fine


def test_a_quant_method_without_documented_tolerances_gets_none_not_a_keyerror():
    """A plugin QuantizedMethod with no UNQUANT_BOUND crashed task=run and task=check with KeyError: 'bfloat16'."""
    from composer.quant.utils import QuantizedMethod

    class Undocumented(QuantizedMethod):
        OUTPUT_TOL = {}

    assert Undocumented.tolerances(None, "bfloat16") == (0.0, None)


def test_a_kernel_may_be_given_tokens_in_another_dtype_and_keep_a_read_only_name(registered):
    """An all2all may dispatch in another dtype (fp8, as vLLM's quantized dispatch): the output is held to the
    layer's dtype, not to what the kernel was given (a correct plugin was refused). A kernel whose name is a
    read-only property crashed when the factory set it."""
    from composer.layers.modular_kernel import ModularKernel, PreparedTokens

    class Halves:
        name = "halves"

        def prepare(self, x, w, ids):
            return PreparedTokens(x=x.half(), topk_weights=w, topk_ids=ids)

        def finalize(self, out, prepared):
            return out

    class Named(TorchExperts):
        @property
        def name(self):
            return "named"

        def apply(self, x, w, ids, weights, act):
            return super().apply(x.bfloat16(), w, ids, weights, act)

    registered(KERNELS, "t_named", Named)
    cfg = load_config(None, [*SMALL, "kernel.name=t_named"])
    model = build(cfg)  # (no AttributeError: the property keeps its name)
    layer = model.get_submodule("layers.0.mlp.experts")
    kernel = ModularKernel(Halves(), layer.kernel.experts)
    x = make_tokens(cfg, 5)
    w, ids = torch.full((5, 2), 0.5), torch.zeros(5, 2, dtype=torch.int32)
    out = kernel(x, w, ids, layer.quant_method.expert_weights(layer), "silu")
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
