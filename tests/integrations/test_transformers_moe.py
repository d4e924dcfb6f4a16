"""The Transformers backend on the CPU: every supported architecture the installed transformers has, tiny random
configs, against the unmodified Hugging Face model (experts_implementation="eager")."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transformers  # noqa: E402  (a dev dependency: pyproject pins transformers>=5.17)

from composer import load_config  # noqa: E402
from composer.checking import rel_error  # noqa: E402
from composer.errors import ConfigError, WeightLoadError  # noqa: E402
from composer.integrations.check import GENERATE_TOKENS, greedy, prompt_ids  # noqa: E402
from composer.integrations.hf_config import ARCHS, installed_archs  # noqa: E402
from composer.integrations.transformers_moe import (  # noqa: E402
    HFFormatError, TransformersFusedMoE, UnsupportedModelError, _new_experts_layer, find_experts, hf_expert_tensors,
    load_hf_model, reference_and_swapped, swap, swap_model, weight_name_map,
)

ALL = list(ARCHS)
BLOCK = [a for a in ARCHS if ARCHS[a].block_router]


def test_pinned_transformers_has_every_arch():
    """pyproject pins transformers>=5.17, which ships every supported architecture: the tests below run them all
    (a missing one is a failure here, not a skip)."""
    assert set(installed_archs()) == set(ARCHS), (transformers.__version__, installed_archs())


def cfg_for(arch: str | None = None, *extra: str, path: str | None = None):
    where = [f"model.arch={arch}"] if arch else [f"model.path={path}"]
    return load_config(None, ["device=cpu", "layer=transformers_moe", "model=hf", *where, *extra])


_PAIRS: dict[tuple, tuple] = {}


def pair(arch: str, replace: str = "experts"):
    """(cfg, reference, swapped) built once per (arch, replace)."""
    key = (arch, replace)
    if key not in _PAIRS:
        cfg = cfg_for(arch, f"layer.replace={replace}")
        _PAIRS[key] = (cfg, *reference_and_swapped(cfg))
    return _PAIRS[key]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ALL)
def test_experts_swap_logits_and_generate_equal(arch):
    cfg, ref, model = pair(arch)
    swapped = [m for m in model.modules() if isinstance(m, TransformersFusedMoE)]
    assert swapped and len(swapped) == len(model.composer_swapped)
    assert not find_experts(model), "an HF experts module was left in place"
    ids = prompt_ids(cfg, 16, ref.config.vocab_size)
    assert rel_error(logits(model, ids), logits(ref, ids)) <= 1e-5
    assert torch.equal(greedy(model, ids, GENERATE_TOKENS), greedy(ref, ids, GENERATE_TOKENS))


@pytest.mark.parametrize("arch", BLOCK)
def test_block_swap_logits_and_generate_equal(arch):
    from composer.layers.block import SparseMoEBlock

    cfg, ref, model = pair(arch, "block")
    blocks = [m for m in model.modules() if isinstance(m, SparseMoEBlock)]
    assert blocks and len(blocks) == len(model.composer_swapped)
    if cfg.model.num_shared_experts:
        assert all(b.shared_experts is not None for b in blocks)
    ids = prompt_ids(cfg, 16, ref.config.vocab_size)
    assert rel_error(logits(model, ids), logits(ref, ids)) <= 1e-5
    assert torch.equal(greedy(model, ids, GENERATE_TOKENS), greedy(ref, ids, GENERATE_TOKENS))


def test_block_swap_refused_for_gpt_oss_router_bias():
    with pytest.raises(ConfigError, match="router adds a bias"):
        cfg_for("gpt_oss", "layer.replace=block")


def test_the_check_can_fail():
    """A swapped layer whose weights differ from the HF model's makes task=check fail."""
    from composer.integrations import check as hf_check
    from composer.tasks import TaskContext, TaskFailed
    from rich.console import Console

    cfg = cfg_for("qwen3_moe")
    ref, model = reference_and_swapped(cfg)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.w2.mul_(1.001)
    orig = hf_check.__dict__.get("reference_and_swapped")
    import composer.integrations.transformers_moe as tm

    saved = tm.reference_and_swapped
    tm.reference_and_swapped = lambda c: (ref, model)
    try:
        with pytest.raises(TaskFailed, match="layers.1.mlp.experts"):
            hf_check.check(cfg, TaskContext(Path("."), Console(file=open(os.devnull, "w"))), cfg.task.params)
    finally:
        tm.reference_and_swapped = saved
    assert orig is None


@pytest.mark.parametrize("replace", ["experts", "block"])
def test_quantized_check_holds_composers_experts_to_the_oracle(replace, tmp_path, monkeypatch):
    """Quantized, the swapped modules are held to the Hugging Face ones only within the method's loose bound, so
    composer's experts must also meet the float64 oracle of their own dequantized weights: in a block swap too
    (its FusedMoE is captured inside the block). A 1% error in one layer's experts output then fails the check."""
    from composer.tasks import TaskFailed

    from ._check import run_check

    cfg = cfg_for("qwen3_moe", f"layer.replace={replace}", "quant=int4_w4a16", "quant.group_size=-1")
    m = run_check(cfg, tmp_path, monkeypatch)
    assert m["passed"] and len(m["layers"]) == 2
    for e in m["layers"].values():
        assert e["oracle_rel_err"] <= 1e-5 and e["hf_rel_err"] <= m["quant_bound"]

    def off_by_one_percent(model):
        inner = model.get_submodule(model.composer_swapped[1])
        experts = inner.experts if replace == "block" else inner
        experts.register_forward_hook(lambda mod, args, out: out * 1.01)

    with pytest.raises(TaskFailed, match=r"rel. error vs composer's float64 oracle"):
        run_check(cfg, tmp_path, monkeypatch, off_by_one_percent)


def test_packed_weights_adopted_without_copy():
    cfg = cfg_for("qwen3_moe")
    model = load_hf_model(cfg)
    ptrs = {p: (e.gate_up_proj.data_ptr(), e.down_proj.data_ptr()) for p, e in find_experts(model)}
    swap_model(model, cfg)
    for path, (gup, down) in ptrs.items():
        layer = model.get_submodule(path)
        assert isinstance(layer, TransformersFusedMoE)
        assert layer.w13.data_ptr() == gup and layer.w2.data_ptr() == down


def test_gpt_oss_deinterleaved_once():
    cfg = cfg_for("gpt_oss")
    model = load_hf_model(cfg)
    hf = model.model.layers[0].mlp.experts
    I = hf.down_proj.shape[1]
    gup, bias, down = hf.gate_up_proj.clone(), hf.gate_up_proj_bias.clone(), hf.down_proj.clone()
    swap_model(model, cfg)
    layer = model.model.layers[0].mlp.experts
    assert torch.equal(layer.w13[:, :I], gup[:, :, 0::2].transpose(1, 2))
    assert torch.equal(layer.w13[:, I:], gup[:, :, 1::2].transpose(1, 2))
    assert torch.equal(layer.w13_bias[:, :I], bias[:, 0::2]) and torch.equal(layer.w13_bias[:, I:], bias[:, 1::2])
    assert torch.equal(layer.w2, down.transpose(1, 2))
    assert layer.activation == "swigluoai"


def test_gpt_oss_activation_matches_composer_swigluoai():
    """transformers' GptOssExperts._apply_gate on interleaved halves == composer's swigluoai on gate|up halves."""
    from composer.layers.activation import swigluoai_and_mul

    hf = load_hf_model(cfg_for("gpt_oss")).model.layers[0].mlp.experts
    x = torch.randn(64, 2 * 48) * 6  # reaches the clamp at +-7
    ours = swigluoai_and_mul(torch.cat([x[:, 0::2], x[:, 1::2]], dim=-1))
    assert torch.equal(ours, hf._apply_gate(x))


def _as_module_list(experts):
    """transformers 4-style per-expert experts with the same weights as a packed module."""
    from torch import nn

    I = experts.down_proj.shape[2]
    H = experts.down_proj.shape[1]
    mods = nn.ModuleList()
    for e in range(experts.gate_up_proj.shape[0]):
        m = nn.Module()
        m.gate_proj, m.up_proj, m.down_proj = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False), nn.Linear(I, H, bias=False)
        with torch.no_grad():
            m.gate_proj.weight.copy_(experts.gate_up_proj[e, :I])
            m.up_proj.weight.copy_(experts.gate_up_proj[e, I:])
            m.down_proj.weight.copy_(experts.down_proj[e])
        mods.append(m)
    return mods


def test_per_expert_module_list_packed_once_and_weight_names():
    cfg = cfg_for("qwen3_moe")
    model = load_hf_model(cfg)
    packed = model.model.layers[0].mlp.experts
    per_expert = _as_module_list(packed)
    a = _new_experts_layer(cfg, packed, "qwen3_moe", "cpu")
    b = _new_experts_layer(cfg, per_expert, "qwen3_moe", "cpu")
    assert torch.equal(a.w13, b.w13) and torch.equal(a.w2, b.w2)
    assert b.w13.data_ptr() != per_expert[0].gate_proj.weight.data_ptr()  # packed into one tensor
    x, ids, w = torch.randn(5, 64), torch.randint(0, 8, (5, 2)), torch.rand(5, 2)
    assert torch.equal(a(x, ids, w), b(x, ids, w))

    names = weight_name_map("model.layers.0.mlp.experts", per_expert)
    assert names["model.layers.0.mlp.experts.3.gate_proj.weight"] == "model.layers.0.mlp.experts.w13[3, :I]"
    assert names["model.layers.0.mlp.experts.3.up_proj.weight"] == "model.layers.0.mlp.experts.w13[3, I:]"
    assert names["model.layers.0.mlp.experts.7.down_proj.weight"] == "model.layers.0.mlp.experts.w2[7]"
    assert len(names) == 3 * 8
    packed_names = weight_name_map("model.layers.0.mlp.experts", packed)
    assert packed_names == {"model.layers.0.mlp.experts.gate_up_proj": "model.layers.0.mlp.experts.w13",
                            "model.layers.0.mlp.experts.down_proj": "model.layers.0.mlp.experts.w2"}
    # every mapped HF name exists in the HF model, every target in the swapped one
    hf_names = {n for n, _ in model.named_parameters()}
    assert set(packed_names) <= hf_names
    swap_model(model, cfg)
    assert set(packed_names.values()) <= {n for n, _ in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match="layer.replace=block"):
        from torch import nn

        holder = nn.Module()
        holder.config = model.config
        holder.mlp = nn.Module()
        holder.mlp.experts = per_expert
        swap(holder, cfg)


def test_gpt_oss_weight_names():
    hf = load_hf_model(cfg_for("gpt_oss")).model.layers[0].mlp.experts
    assert weight_name_map("e", hf) == {"e.gate_up_proj": "e.w13", "e.down_proj": "e.w2",
                                        "e.gate_up_proj_bias": "e.w13_bias", "e.down_proj_bias": "e.w2_bias"}
    t = hf_expert_tensors(hf)
    assert t["w1"](0).shape == (48, 64) and t["w2"](0).shape == (64, 48)


def test_save_pretrained_round_trip(tmp_path):
    cfg_arch = cfg_for("qwen2_moe")
    ref = load_hf_model(cfg_arch)
    ref.save_pretrained(tmp_path)
    assert any(tmp_path.glob("*.safetensors"))
    cfg = cfg_for(path=str(tmp_path))
    for k in ("num_experts", "top_k", "hidden_size", "intermediate_size", "num_layers", "router", "num_shared_experts",
              "shared_expert_intermediate_size", "shared_expert_gate"):
        assert getattr(cfg.model, k) == getattr(cfg_arch.model, k), k
    ref2, model = reference_and_swapped(cfg)
    ids = prompt_ids(cfg, 12, ref.config.vocab_size)
    assert torch.equal(logits(ref2, ids), logits(ref, ids))  # the directory holds the same model
    assert rel_error(logits(model, ids), logits(ref, ids)) <= 1e-5
    assert torch.equal(greedy(model, ids, GENERATE_TOKENS), greedy(ref, ids, GENERATE_TOKENS))


def _assert_hf_state_dict(model, ref):
    """The swapped model's state dict is the reference's: the same names, dtypes and values."""
    ours, theirs = model.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), k


def _reload_and_compare(cfg, ref, model, tmp_path):
    """save_pretrained the swapped model, reload it with plain transformers: the reference's logits, bit for bit
    (the file holds the reference's own values -- the same tensors, or for GPT-OSS an exact re-layout -- and the
    reloaded model runs the same eager code on the same CPU, so fp32 leaves no room for any difference)."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager",
                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = prompt_ids(cfg, 12, ref.config.vocab_size)
    assert torch.equal(logits(reloaded.eval(), ids), logits(ref, ids))


@pytest.mark.parametrize("arch", ALL)
def test_save_pretrained_of_experts_swap_reloads_in_plain_transformers(arch, tmp_path):
    cfg, ref, model = pair(arch)
    _assert_hf_state_dict(model, ref)
    _reload_and_compare(cfg, ref, model, tmp_path)


@pytest.mark.parametrize("arch", BLOCK)
def test_save_pretrained_of_block_swap_reloads_in_plain_transformers(arch, tmp_path):
    cfg, ref, model = pair(arch, "block")
    _assert_hf_state_dict(model, ref)
    _reload_and_compare(cfg, ref, model, tmp_path)


@pytest.mark.parametrize("arch, replace", [("qwen3_moe", "experts"), ("deepseek_v3", "block"), ("gpt_oss", "experts")])
def test_load_state_dict_takes_hf_names(arch, replace):
    """A Hugging Face state dict loads into a swapped model (packed, GPT-OSS's layout, a swapped block)."""
    cfg, ref, model = pair(arch, replace)
    blank = copy.deepcopy(model)
    with torch.no_grad():
        for t in blank.parameters():
            t.zero_()
    assert not blank.load_state_dict(ref.state_dict()).missing_keys
    ids = prompt_ids(cfg, 12, ref.config.vocab_size)
    assert torch.equal(logits(blank, ids), logits(model, ids))


def test_per_expert_layout_state_dict_round_trip():
    """The block swap of per-expert nn.ModuleList experts keeps their names ({e}.gate_proj.weight, ...)."""
    cfg = cfg_for("qwen3_moe")
    per_expert = _as_module_list(load_hf_model(cfg).model.layers[0].mlp.experts)
    layer = _new_experts_layer(cfg, per_expert, "qwen3_moe", "cpu", layer_name="fused_moe")
    sd, theirs = layer.state_dict(), per_expert.state_dict()
    assert set(sd) == set(theirs) and all(torch.equal(sd[k], t) for k, t in theirs.items())
    w13 = layer.w13.clone()
    with torch.no_grad():
        layer.w13.zero_(), layer.w2.zero_()
    layer.load_state_dict(theirs)
    assert torch.equal(layer.w13, w13)


@pytest.mark.parametrize("replace", ["experts", "block"])
def test_save_pretrained_of_quantized_swap_refused(tmp_path, replace):
    """Both swaps: the block's own names map, its experts' quantized tensors do not (the block swap wrote
    config.json before its state dict raised)."""
    cfg = cfg_for("qwen3_moe", "quant=int8_w8a16", f"layer.replace={replace}")
    model = swap_model(load_hf_model(cfg), cfg)
    with pytest.raises(HFFormatError, match="int8_w8a16 experts hold quantized tensors") as exc:
        model.save_pretrained(tmp_path)
    assert "quant=none" in str(exc.value) and "save_checkpoint" in str(exc.value)
    assert not any(tmp_path.iterdir())  # nothing written: no weights, and no config.json without weights
    with pytest.raises(RuntimeError, match="cannot load here"):
        model.load_state_dict(load_hf_model(cfg_for("qwen3_moe")).state_dict())


def test_save_pretrained_of_unmappable_block_swap_refused(tmp_path):
    """A sparse block holding state composer's block does not keep: its state dict raises, naming the tensor."""
    from torch import nn

    cfg = cfg_for("qwen3_moe", "layer.replace=block")
    model = load_hf_model(cfg)
    model.model.layers[0].mlp.extra_scale = nn.Parameter(torch.ones(1), requires_grad=False)
    swap_model(model, cfg)
    with pytest.raises(HFFormatError, match="extra_scale are not kept.*layer.replace=experts"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def _unsupported_moe():
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    for name, kw in (("phimoe", dict(num_local_experts=4, intermediate_size=32)),
                     ("granitemoe", dict(num_local_experts=4, intermediate_size=32))):
        if name in CONFIG_MAPPING:
            c = CONFIG_MAPPING[name](vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, num_experts_per_tok=2, **kw)
            return AutoModelForCausalLM.from_config(c)
    raise AssertionError("transformers >= 5.17 ships phimoe and granitemoe; neither was found to test the "
                         "unsupported-model error with")


def test_unsupported_model_error_names_experts_class_and_supported(tmp_path):
    model = _unsupported_moe()
    experts_cls = {type(m).__name__ for n, m in model.named_modules() if n.endswith(".experts")}
    cfg = cfg_for("qwen3_moe")
    with pytest.raises(UnsupportedModelError) as exc:
        swap(model, cfg)
    msg = str(exc.value)
    assert model.config.model_type in msg and any(c in msg for c in experts_cls)
    for arch in ARCHS:
        assert arch in msg
    model.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=f"model_type '{model.config.model_type}' is not a supported"):
        cfg_for(path=str(tmp_path))


@pytest.mark.parametrize("overrides, key, words", [
    (["model.arch=qwen3_moe", "model.path=/tmp"], "model.path", "exactly one"),
    ([], "model.arch", "exactly one"),
    (["model.arch=qwen3moe"], "model.arch", "Did you mean 'qwen3_moe'"),
    (["model.path=/nonexistent/dir"], "model.path", "no such directory"),
    (["model.path=/tmp"], "model.path", "no config.json"),
    (["model.arch=qwen3_moe", "++model.num_experts=4"], "model.num_experts", "hf_overrides.num_experts"),
    (["model.arch=qwen3_moe", "++model.router.renormalize=false"], "model.router.renormalize", "routing follows"),
    (["model.arch=qwen3_moe", "+model.hf_overrides.num_hiden_layers=1"], "model.hf_overrides.num_hiden_layers",
     "the qwen3_moe config has no such field. Did you mean 'num_hidden_layers'"),
])
def test_bad_hf_model_configs(overrides, key, words):
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["device=cpu", "layer=transformers_moe", "model=hf", *overrides])
    assert any(p.key == key and words in p.message for p in exc.value.problems), exc.value


def test_transformers_moe_needs_model_hf():
    with pytest.raises(ConfigError, match="needs a Hugging Face model"):
        load_config(None, ["device=cpu", "layer=transformers_moe"])


def test_hf_overrides_and_fused_moe_stack_at_hf_dimensions():
    cfg = cfg_for("mixtral", "+model.hf_overrides.num_hidden_layers=3", "+model.hf_overrides.num_local_experts=4")
    assert (cfg.model.num_layers, cfg.model.num_experts) == (3, 4)
    model = load_hf_model(cfg)
    assert len(model.model.layers) == 3 and model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    own = load_config(None, ["device=cpu", "model=hf", "model.arch=deepseek_v3"])  # composer's own stack, same dims
    assert own.model.router.num_expert_group == 4 and own.model.router.score_correction_bias


def test_quant_applies_to_swapped_layers():
    from composer.checking import Capture, oracle_layer

    cfg = cfg_for("qwen3_moe", "quant=int8_w8a16")
    ref, model = reference_and_swapped(cfg)
    layer = model.model.layers[0].mlp.experts
    assert layer.quant_method.name == "int8_w8a16" and layer.w13.dtype == torch.int8
    hf = ref.model.layers[0].mlp.experts
    x, ids, w = torch.randn(9, 64), torch.randint(0, 8, (9, 2)), torch.rand(9, 2)
    out = layer(x, ids, w)
    assert rel_error(out, oracle_layer(layer, Capture(x, w, ids.int(), out))) <= 1e-5  # its own dequantized weights
    assert 0 < rel_error(out, hf(x, ids, w)) < 5e-2  # quantized, close to the HF experts


def test_torch_compile_swapped_block():
    """dynamo traces an HF sparse block around composer's layer (the whole model is compiled on the GPU check;
    tracing all of it costs ~15 s of CPU here, over this suite's budget)."""
    cfg, ref, model = pair("qwen3_moe")
    x = torch.randn(1, 8, 64)
    block, ref_block = model.model.layers[0].mlp, ref.model.layers[0].mlp
    assert isinstance(block.experts, TransformersFusedMoE)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="eager")
    with torch.no_grad():
        assert rel_error(compiled(x), ref_block(x)) <= 1e-5


def test_task_generate_with_token_ids_and_tokenizer(tmp_path):
    from composer.tasks import TaskContext
    from composer.tasks.generate import Generate
    from rich.console import Console

    ctx = TaskContext(tmp_path, Console(file=open(os.devnull, "w")))
    cfg = cfg_for("qwen3_moe", "task=generate", "task.token_ids=[5,6,7]", "task.max_new_tokens=4")
    m = Generate().run(cfg, ctx)
    assert m["prompt_ids"] == [5, 6, 7] and 1 <= len(m["new_token_ids"]) <= 4
    # fewer tokens than asked only at the end-of-sequence id, and then the run says so
    eos = load_hf_model(cfg).config.eos_token_id
    for n in (4, 64):
        r = Generate().run(cfg_for("qwen3_moe", "task=generate", "task.token_ids=[5,6,7]", f"task.max_new_tokens={n}"), ctx)
        assert r["stopped_at_eos"] == (len(r["new_token_ids"]) < n)
        assert not r["stopped_at_eos"] or r["new_token_ids"][-1] == eos
    with pytest.raises(ConfigError, match="no tokenizer"):
        Generate().run(cfg_for("qwen3_moe", "task=generate", "task.prompt=hello"), ctx)

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "moe"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    load_hf_model(cfg_for("qwen3_moe")).save_pretrained(tmp_path / "m")
    fast.save_pretrained(tmp_path / "m")
    cfg = cfg_for(None, "task=generate", "task.prompt='hello world'", "task.max_new_tokens=3", path=str(tmp_path / "m"))
    m = Generate().run(cfg, ctx)
    assert m["prompt_ids"] == [4, 5] and isinstance(m["text"], str)
    with pytest.raises(ConfigError, match="encodes to no tokens"):
        Generate().run(cfg_for(None, "task=generate", "task.prompt=''", path=str(tmp_path / "m")), ctx)
    own = load_config(None, ["device=cpu", "model=hf", "model.arch=qwen3_moe", "task=generate"])  # (layer=fused_moe)
    with pytest.raises(ConfigError, match="layer=fused_moe builds composer's stack of MoE blocks only"):
        Generate().run(own, ctx)


def test_meta_build_is_refused_for_a_layer_with_its_own_model():
    """build(device="meta") promises no storage; the Transformers backend loads a real model, so it says so instead
    of returning one."""
    from composer import build

    with pytest.raises(ValueError, match=r"layer=transformers_moe builds its own model.*call build\(cfg\)"):
        build(cfg_for("qwen3_moe"), init=False, device="meta")


def test_a_checkpoint_folder_that_does_not_match_its_model_is_refused(tmp_path):
    """transformers fills a missing or mismatched tensor at random and only logs it: task=check then compared random
    weights with themselves and passed."""
    from safetensors.torch import load_file, save_file

    from composer import build

    load_hf_model(cfg_for("qwen3_moe")).save_pretrained(tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    sd = load_file(str(f))
    gate = next(k for k in sd if k.endswith("mlp.gate.weight"))
    save_file({k: v for k, v in sd.items() if k != gate}, str(f), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=rf"tensors missing: {gate}\); transformers would initialize those at random"):
        build(cfg_for(None, path=str(tmp_path)))
    f.unlink()
    with pytest.raises(WeightLoadError, match="transformers could not load the weights"):
        build(cfg_for(None, path=str(tmp_path)))


def test_cli_check_end_to_end(tmp_path):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    r = subprocess.run([sys.executable, "-m", "composer", "layer=transformers_moe", "model=hf", "model.arch=qwen3_moe",
                        "task=check", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check passed" in r.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "ok" and res["metrics"]["passed"]
    assert res["metrics"]["generate_identical_tokens"] == GENERATE_TOKENS
    assert res["metrics"]["logits_rel_err"] <= 1e-5


def test_task_bench_holds_logits_to_the_dtype_or_the_quant_bound(tmp_path, monkeypatch):
    """task=bench layer=transformers_moe on the CPU: every implementation's logits against hf eager, within the
    dtype's tolerance, or a quant method's bound against the unquantized experts; a miss fails the task."""
    from rich.console import Console

    from composer.integrations import bench as hf_bench
    from composer.tasks import TaskContext, TaskFailed

    cfg = cfg_for("qwen3_moe", "task=bench", "task.tokens=[4]", "quant=int4_w4a16", "quant.group_size=-1",
                  "task.warmup=0", "task.iters=2")
    ctx = TaskContext(run_dir=tmp_path, console=Console(quiet=True))
    m = hf_bench.task_bench(cfg, ctx, cfg.task.params)
    composer_row = next(r for r in m["rows"] if r["implementation"].startswith("composer"))
    assert m["passed"] and composer_row["tolerance"] == 0.45 and 1e-3 < composer_row["rel_err_vs_eager"] <= 0.45
    caption = f"median ms (host timer). rel. err: {cfg.model.dtype} logits vs hf eager (relative Frobenius, <= 0.45)"
    assert caption in (tmp_path / "bench.md").read_text()  # (task.markdown_file)
    monkeypatch.setattr(hf_bench, "logits_tolerance", lambda cfg: 1e-3)
    with pytest.raises(TaskFailed, match=r"composer \(torch, int4_w4a16\) T=4: logits rel. error .* > 0.001"):
        hf_bench.task_bench(cfg, ctx, cfg.task.params)


def test_block_swap_refuses_a_config_that_routes_otherwise():
    """composer's router in a block swap is built from the config: a model whose own config routes otherwise
    (here norm_topk_prob=False, and top_k 4) is refused, naming each key; the experts swap keeps the model's router."""
    from transformers import AutoModelForCausalLM

    from composer.integrations.hf_config import hf_config

    cfg = cfg_for("qwen3_moe", "layer.replace=block")
    theirs = AutoModelForCausalLM.from_config(hf_config(None, "qwen3_moe", {"norm_topk_prob": False,
                                                                             "num_experts_per_tok": 4}))
    with pytest.raises(ConfigError) as err:
        swap(theirs, cfg, "block")
    assert {(p.key, p.value) for p in err.value.problems} == {("model.top_k", 2), ("model.router.renormalize", True)}
    assert "the model's config has False" in str(err.value)
    assert swap(theirs, cfg_for("qwen3_moe"), "experts")  # (its own router: only the expert sizes must match)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "mixtral"])
def test_load_checkpoint_maps_hugging_face_block_names(arch, tmp_path):
    """A Hugging Face checkpoint loads into composer's own stack (model=hf layer=fused_moe) by name, including the
    tensors whose names differ: qwen2_moe's shared_expert(_gate), deepseek_v3's gate.e_score_correction_bias, the
    post-attention norm; each block then computes what the Hugging Face block does."""
    from composer import build
    from composer.integrations.transformers_moe import load_hf_model
    from composer.loading import load_checkpoint

    hf = load_hf_model(cfg_for(arch, "model.dtype=float32"))
    with torch.no_grad():
        for name, p in hf.named_parameters():  # no zero-initialized tensor hides a name that was not loaded
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    own = load_config(None, ["device=cpu", "model=hf", f"model.arch={arch}", "model.dtype=float32", "kernel=torch"])
    # init=True: deepseek_v3's first layer is dense in the Hugging Face model, so the checkpoint has nothing for
    # composer's (all-MoE) layer 0; with init=False that is refused (its weights would be uninitialized memory)
    model = build(own)
    report = load_checkpoint(model, tmp_path, prefix="model.", strict=False)  # (attention, embeddings: not composer's)
    if arch == "deepseek_v3":
        with pytest.raises(WeightLoadError, match="parameters not in the checkpoint: layers.0.mlp.gate.weight"):
            load_checkpoint(build(own, init=False), tmp_path, prefix="model.", strict=False)
    assert any("shared_expert" in k for k in report.loaded) == (arch != "mixtral")
    assert any("post_attention_layernorm" in k for k in report.loaded)
    if arch == "mixtral":  # (transformers writes mixtral's experts as block_sparse_moe.experts.{e}.w1/w3/w2)
        assert any("block_sparse_moe.experts.0.w1" in k for k in report.loaded), report.loaded[:8]
        load_checkpoint(build(own, init=False), tmp_path, prefix="model.", strict=False)  # (every layer is MoE)
    x = torch.randn(5, own.model.hidden_size, generator=torch.Generator().manual_seed(0))
    for i, layer in enumerate(model.layers):
        hf_mlp = hf.model.layers[i].mlp
        if not hasattr(hf_mlp, "experts"):
            continue  # a dense layer of the Hugging Face model (composer's stack is all MoE)
        with torch.no_grad():
            want = hf_mlp(x[None])
            want = (want[0] if isinstance(want, tuple) else want)[0]
            got = layer.mlp(x)
            assert rel_error(got, want) < 1e-5, (i, rel_error(got, want))
            norm = hf.model.layers[i].post_attention_layernorm
            assert rel_error(layer.norm(x), norm(x)) < 1e-6


def test_swap_refuses_a_dtype_other_than_the_models():
    """A bfloat16 model swapped with a float32 config would get float32 copies of its experts (or, on Triton, fail
    on the first bfloat16 hidden states): refused, with the dtype to set."""
    from transformers import AutoModelForCausalLM

    from composer.integrations.hf_config import hf_config

    theirs = AutoModelForCausalLM.from_config(hf_config(None, "qwen3_moe", {})).to(torch.bfloat16)
    with pytest.raises(ConfigError, match=r"model.dtype = 'float32': the model's expert weights are bfloat16: set "
                                          r"model.dtype=bfloat16"):
        swap(theirs, cfg_for("qwen3_moe", "model.dtype=float32"), "experts")


def test_hf_settings_composer_cannot_run_are_one_config_problem():
    """An unsupported hidden_act was reported twice (the second about model.activation, which model=hf derives);
    gpt_oss's swiglu constants were refused only after the model was built."""
    with pytest.raises(ConfigError) as err:
        cfg_for("qwen3_moe", "+model.hf_overrides.hidden_act=relu")
    assert [(p.key, p.value) for p in err.value.problems] == [("model.hf_overrides.hidden_act", "relu")]
    # transformers 5.24's GptOssConfig has swiglu_limit (refused unless it is the published 7.0); 5.17's has no such
    # field (its experts hard-code 7.0), so the override is refused as unknown. Either way: one problem, that key.
    from transformers import GptOssConfig

    has_field = "swiglu_limit" in GptOssConfig().to_dict()
    why = r".* limit 7.0" if has_field else r"the gpt_oss config has no such field"
    with pytest.raises(ConfigError, match=rf"model.hf_overrides.swiglu_limit = 5.0: {why}") as err:
        cfg_for("gpt_oss", "+model.hf_overrides.swiglu_limit=5.0")
    assert [p.key for p in err.value.problems] == ["model.hf_overrides.swiglu_limit"]
