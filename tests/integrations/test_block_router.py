"""``layer.replace=block``: composer's gate and router stand in for the Hugging Face router, so what the model
reports of its routing (``output_router_logits``, the load-balancing loss) and the weights its experts get must
be the Hugging Face router's, to the bit, in bfloat16 too."""
import copy

import pytest
import torch

from composer import load_config  # noqa: E402
from composer.integrations.hf_config import ARCHS  # noqa: E402
from composer.integrations.transformers_moe import load_hf_model, reference_and_swapped, swap_model  # noqa: E402

BLOCK = [a for a in ARCHS if ARCHS[a].block_router]


def _cfg(arch, dtype="bfloat16"):
    return load_config(None, ["device=cpu", "layer=transformers_moe", "layer.replace=block", "model=hf",
                              f"model.arch={arch}", f"model.dtype={dtype}", "kernel=torch"])


def _ids():
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _router_logits_and_inputs(model, ids):
    """The swapped model's router_logits (with the aux loss) and each swapped block's input, one forward."""
    inputs = []
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
               for n in model.composer_swapped]
    try:
        with torch.no_grad():
            out = model(ids, labels=ids, output_router_logits=True)
    finally:
        for h in handles:
            h.remove()
    return out, inputs


@pytest.mark.parametrize("arch", BLOCK)
def test_block_swap_records_the_hf_router_logits(arch):
    """transformers records router_logits by hooking its router class, which a block swap replaced: it recorded
    nothing and the load-balancing loss raised IndexError. Now each block's logits are recorded, equal to the
    Hugging Face gate's on the same input, in the same dtype."""
    cfg = _cfg(arch)
    ref, model = reference_and_swapped(cfg)
    out, inputs = _router_logits_and_inputs(model, _ids())
    with torch.no_grad():
        theirs = ref(_ids(), labels=_ids(), output_router_logits=True)
    if not hasattr(theirs, "router_logits"):  # (DeepSeek-V3 before transformers 5.2x records none)
        assert not hasattr(out, "router_logits")
        return
    assert len(out.router_logits) == len(theirs.router_logits) == len(model.composer_swapped)
    assert (out.aux_loss is None) == (theirs.aux_loss is None)  # (DeepSeek-V3 computes none)
    with torch.no_grad():
        for name, x, got in zip(model.composer_swapped, inputs, out.router_logits):
            want = ref.get_submodule(name).gate(x)[0]
            assert got.dtype == want.dtype and torch.equal(got, want), name


def test_block_swap_of_a_model_that_already_ran_records_router_logits():
    """transformers hooks a model once, at its first recording forward: a model swapped in place afterwards (as the
    bench does) moves those hooks to composer's gate."""
    cfg = _cfg("qwen3_moe", "float32")
    model = load_hf_model(cfg)
    with torch.no_grad():
        want = model(_ids(), labels=_ids(), output_router_logits=True)
    swap_model(model, cfg)
    out, _ = _router_logits_and_inputs(model, _ids())
    assert len(out.router_logits) == len(model.composer_swapped)
    assert torch.allclose(out.aux_loss, want.aux_loss, rtol=1e-5, atol=0)


def _same_routing_as_hf(cfg, ref, model):
    """The same bf16 input to the HF gate and the swapped block's router: the same experts, the same weights."""
    name = model.composer_swapped[-1]
    hf, ours = ref.get_submodule(name), model.get_submodule(name)
    x = torch.randn(64, cfg.model.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        _, w_hf, i_hf = hf.gate(x)
        w, i = ours.router(ours.gate(x))
    order_hf, order = i_hf.sort(-1), i.long().sort(-1)
    assert torch.equal(order_hf.values, order.values)
    assert torch.equal(w_hf.float().gather(1, order_hf.indices), w.gather(1, order.indices))


@pytest.mark.parametrize("arch", BLOCK)
def test_block_swap_routing_weights_equal_hf_in_bfloat16(arch):
    """qwen2_moe, qwen3_moe and olmoe round their top-k weights to the logits' dtype; composer's router kept float32,
    up to 2e-3 off. Now the weights are the Hugging Face router's, to the bit."""
    cfg = _cfg(arch)
    _same_routing_as_hf(cfg, *reference_and_swapped(cfg))


def test_block_swap_of_a_deepseek_gate_held_in_bfloat16_computes_it_in_float32():
    """transformers keeps DeepSeek-V3's gate weight in float32 since 5.2x; before (5.17) it held it in the model's
    dtype and still computed the logits in float32. composer's gate computed them in the weight's dtype."""
    cfg = _cfg("deepseek_v3")
    ref = load_hf_model(cfg)
    for name, mod in ref.named_modules():
        if name.endswith("mlp.gate"):
            mod.weight = torch.nn.Parameter(mod.weight.detach().to(torch.bfloat16), requires_grad=False)
    model = swap_model(copy.deepcopy(ref), cfg)
    _same_routing_as_hf(cfg, ref, model)


def test_a_block_swapped_model_survives_torch_save():
    """The logits tap's class is made at run time: pickle could not find it by name, so torch.save of a block-swapped
    model failed."""
    import io

    cfg = _cfg("qwen3_moe", "float32")
    _, model = reference_and_swapped(cfg)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_init_weights_after_a_block_swap_changes_nothing(arch):
    """transformers' init_weights() ran the router class's _init_weights on the logits tap (an instance of that class
    with no weight) and failed; every module was initialised already, so the call must leave the model as it was."""
    _, model = reference_and_swapped(_cfg(arch, "float32"))
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    model.init_weights()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
