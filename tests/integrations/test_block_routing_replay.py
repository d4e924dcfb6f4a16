"""``layer.replace=block`` below float32: the check feeds composer's router output (top-k ids and weights) to the
reference block's HF experts module, so a near-tie routed differently is counted and reported, not mistaken for
an error, while wrong experts still fail. Every architecture that supports the block swap, bf16, kernel=torch."""
import pytest
import torch

from composer import load_config  # noqa: E402
from composer.checking import rel_error  # noqa: E402
from composer.integrations.check import _replayed_reference_logits, _with_routing, prompt_ids  # noqa: E402
from composer.integrations.hf_config import ARCHS  # noqa: E402
from composer.integrations.transformers_moe import reference_and_swapped  # noqa: E402
from composer.layers.block import SparseMoEBlock  # noqa: E402
from composer.tasks import TaskFailed  # noqa: E402

from ._check import run_check  # noqa: E402

TOL = 1e-2
BLOCK = [a for a in ARCHS if ARCHS[a].block_router]  # all installed: test_pinned_transformers_has_every_arch


def _cfg(arch):
    return load_config(None, ["layer=transformers_moe", "layer.replace=block", "model=hf", f"model.arch={arch}",
                              "model.dtype=bfloat16", "device=cpu", "kernel=torch", "task=check"])


def _run(arch, tmp_path, monkeypatch, perturb=lambda model: None):
    return run_check(_cfg(arch), tmp_path, monkeypatch, perturb)


def _blocks(model):
    blocks = [model.get_submodule(n) for n in model.composer_swapped]
    assert blocks and all(isinstance(b, SparseMoEBlock) for b in blocks)
    return blocks


@pytest.mark.parametrize("arch", BLOCK)
def test_block_check_passes_with_replayed_routing(arch, tmp_path, monkeypatch):
    m = _run(arch, tmp_path, monkeypatch)
    assert m["passed"] and m["replace"] == "block"
    assert m["logits_rel_err_replayed_routing"] <= TOL and m["routing_changed"] >= 0
    assert "logits_rel_err" in m  # the un-replayed error is still reported


@pytest.mark.parametrize("arch", BLOCK)
def test_changed_block_routing_is_replayed_and_counted(arch):
    """Composer's router sends every token to other experts: the reference's experts follow (every (layer, token)
    counted), so its replayed logits match the swapped model's while its own do not."""
    cfg = _cfg(arch)
    ref, model = reference_and_swapped(cfg)
    for block in _blocks(model):
        block.router.register_forward_hook(lambda m, a, out: (out[0], (out[1] + 1) % m.num_experts))
    ids = prompt_ids(cfg, cfg.task.params.tokens, ref.config.vocab_size)
    with torch.no_grad():
        got, own = model(ids).logits, ref(ids).logits
    replayed, changed = _replayed_reference_logits(ref, model, ids)
    assert changed == len(model.composer_swapped) * ids.shape[1]
    assert rel_error(got, replayed) <= TOL < rel_error(got, own)


@pytest.mark.parametrize("arch", BLOCK)
def test_wrong_block_experts_still_fail_with_replay(arch, tmp_path, monkeypatch):
    def corrupt(model):  # in every swapped block, the down projection of the expert the prompt uses most, 1.5x
        # (a fixed expert failed to fail on the GPU machine's CPU: there the prompt gave it few or no tokens)
        cfg, routed = _cfg(arch), {}
        hooks = [b.router.register_forward_hook(lambda m, a, out, b=b: routed.setdefault(b, []).append(out[1]))
                 for b in _blocks(model)]
        try:
            with torch.no_grad():
                model(prompt_ids(cfg, cfg.task.params.tokens, model.config.vocab_size))
        finally:
            for h in hooks:
                h.remove()
        for block in _blocks(model):
            used = torch.bincount(torch.cat(routed[block]).flatten().long(), minlength=block.experts.w2.shape[0])
            block.experts.w2.data[int(used.argmax())] *= 1.5

    with pytest.raises(TaskFailed, match="reference replaying composer's routing") as exc:
        _run(arch, tmp_path, monkeypatch, corrupt)
    assert exc.value.metrics["logits_rel_err_replayed_routing"] > TOL


def test_with_routing_replaces_casts_and_counts():
    """The replay helper: recorded int32 ids / float32 weights replace an HF call's int64 ids / bf16 weights (in
    the call's dtypes, positional or by name), and each token whose expert *set* changed is counted once."""
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    own_ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    own_w = torch.full((4, 2), 0.5, dtype=torch.bfloat16)
    ids = own_ids.to(torch.int32).clone()
    ids[1] = ids[1].flip(0)           # same set, other order: not a change
    ids[2] = torch.tensor([4, 6])     # one expert differs
    ids[3] = torch.tensor([0, 1])     # both differ
    w = torch.rand(4, 2)
    for args, kwargs in (((x, own_ids, own_w), {}), ((x,), {"top_k_index": own_ids, "top_k_weights": own_w})):
        new_args, new_kwargs, changed = _with_routing(args, kwargs, [ids, w])
        got = list(new_args[1:]) + list(new_kwargs.values())
        assert new_args[0] is x and changed == 2
        assert got[0].dtype == torch.int64 and torch.equal(got[0], ids.long())
        assert got[1].dtype == torch.bfloat16 and torch.equal(got[1], w.bfloat16())
