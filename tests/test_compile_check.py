"""task=check with compile=true: the compiled run is compared with the float64 oracle replaying *its own*
routing (recorded by hooks that dynamo traces), so a wrong compiled path fails while a bf16 routing flip
would not. CPU: the Triton kernels under TRITON_INTERPRET=1 in float32."""
from pathlib import Path

import pytest
import torch
from rich.console import Console

from composer import load_config
from composer.layers.fused_moe import FusedMoE
from composer.tasks import TaskContext, TaskFailed
from composer.tasks.check import Check


@pytest.fixture
def cfg(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return load_config(None, ["device=cpu", "kernel=triton", "model.dtype=float32", "compile=true", "task=check",
                              "model.num_layers=1", "task.tokens=6"])


def run_check(cfg, tmp_path: Path):
    torch._dynamo.reset()
    return Check().run(cfg, TaskContext(run_dir=tmp_path, console=Console(quiet=True)))


def test_compiled_run_is_checked_against_its_own_routing(cfg, tmp_path):
    m = run_check(cfg, tmp_path)
    assert m["passed"] and m["mode"] == "compile"
    assert m["mode_output_rel_err"] < 1e-5 and m["mode_routing_changed_tokens"] == 0
    assert set(m["mode_layers"]) == {"layers.0.mlp.experts"}


def test_a_wrong_compiled_path_fails(cfg, tmp_path):
    @FusedMoE.register_oot
    class WrongWhenCompiled(FusedMoE):
        def forward(self, hidden_states, topk_weights, topk_ids):
            out = super().forward(hidden_states, topk_weights, topk_ids)
            return out * 1.01 if torch.compiler.is_compiling() else out

    try:
        with pytest.raises(TaskFailed, match=r"compile: layers.0.mlp.experts: experts rel. error"):
            run_check(cfg, tmp_path)
    finally:
        FusedMoE.unregister_oot()
