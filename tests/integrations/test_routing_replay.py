"""Below float32 the Transformers-backend check holds the logits to the reference *replaying composer's
routing*: a changed expert choice is counted and reported, not mistaken for an experts error, while a
wrong experts computation still fails."""
import pytest
import torch

from composer import load_config  # noqa: E402
from composer.integrations.transformers_moe import TransformersFusedMoE  # noqa: E402
from composer.tasks import TaskFailed  # noqa: E402

from ._check import run_check  # noqa: E402


@pytest.fixture
def cfg():
    return load_config(None, ["layer=transformers_moe", "model=hf", "model.arch=qwen3_moe", "model.dtype=bfloat16",
                              "device=cpu", "task=check"])


def test_changed_routing_is_replayed_and_counted(cfg, tmp_path, monkeypatch):
    def reroute(model):
        def hook(m, args, kwargs):  # send token 0 of every swapped layer to other experts
            ids = args[1].clone()
            ids[0] = (ids[0] + 1) % m.global_num_experts
            return (args[0], ids, *args[2:]), kwargs

        for name in model.composer_swapped:
            model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)

    m = run_check(cfg, tmp_path, monkeypatch, reroute)
    assert m["passed"] and m["routing_changed"] == len(m["swapped"])
    assert m["logits_rel_err_replayed_routing"] <= 1e-2 < m["logits_rel_err"]


def test_wrong_experts_still_fail_with_replay(cfg, tmp_path, monkeypatch):
    def corrupt(model):
        for name in model.composer_swapped:
            layer = model.get_submodule(name)
            assert isinstance(layer, TransformersFusedMoE)
            layer.register_forward_hook(lambda m, a, out: out * 1.05)

    with pytest.raises(TaskFailed, match="reference replaying composer's routing"):
        run_check(cfg, tmp_path, monkeypatch, corrupt)
