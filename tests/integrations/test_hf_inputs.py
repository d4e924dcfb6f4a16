"""Bad input to the Transformers backend gets a clear error, not a traceback or a silent change: router keys
the Hugging Face config does not name, DeepSeek-V3 groups of one expert, a truncated safetensors file, a
tokenizer larger than the model's vocabulary, a ``~`` in ``model.path``."""
import os

import pytest
import torch
from rich.console import Console

from composer import build, load_config  # noqa: E402
from composer.errors import ConfigError, WeightLoadError  # noqa: E402
from composer.integrations.transformers_moe import load_hf_model, reference_and_swapped  # noqa: E402
from composer.tasks import TaskContext  # noqa: E402
from composer.tasks.generate import Generate  # noqa: E402


def cfg_for(*extra, layer="transformers_moe"):
    return load_config(None, ["device=cpu", f"layer={layer}", "model=hf", *extra])


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe"])
@pytest.mark.parametrize("layer", ["transformers_moe", "fused_moe"])
def test_router_keys_the_hf_config_does_not_name_are_refused(arch, layer):
    """These routers have no scaling factor, groups or correction bias: a user's value was kept, recorded in
    results.json and did nothing (transformers_moe) or routed otherwise than the model (fused_moe)."""
    keys = {"routed_scaling_factor": "2.0", "num_expert_group": "2", "topk_group": "1", "score_correction_bias": "true"}
    with pytest.raises(ConfigError) as err:
        cfg_for(f"model.arch={arch}", *(f"+model.router.{k}={v}" for k, v in keys.items()), layer=layer)
    named = {p.key: p.message for p in err.value.problems}
    for key in keys:
        assert f"the {arch} router has no such setting" in named[f"model.router.{key}"], err.value
    assert "routed_scaling_factor=1.0" in named["model.router.routed_scaling_factor"]
    # the value the model routes with is accepted
    assert cfg_for(f"model.arch={arch}", "+model.router.routed_scaling_factor=1.0", layer=layer)


def test_deepseek_groups_of_one_expert_are_refused():
    """The DeepSeek-V3 router scores a group by its two best experts: 8 experts in 8 groups passed validation, then
    transformers failed inside the model (selected index k out of range)."""
    with pytest.raises(ConfigError) as err:
        cfg_for("model.arch=deepseek_v3", "+model.hf_overrides.n_group=8", "+model.hf_overrides.topk_group=4")
    (p,) = err.value.problems
    assert p.key == "model.hf_overrides.n_group" and "at least 2" in p.message and "n_group <= 4" in p.message


def test_a_truncated_safetensors_file_is_a_weight_load_error_naming_it(tmp_path):
    load_hf_model(cfg_for("model.arch=qwen3_moe")).save_pretrained(tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(WeightLoadError, match=rf"{f} \(.*\) cannot be read as safetensors \(truncated or corrupt"):
        build(cfg_for(f"model.path={tmp_path}"))


def _tokenizer(vocab_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab_words)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def test_generate_refuses_a_tokenizer_larger_than_the_models_vocab(tmp_path):
    """task.token_ids were range-checked, the tokenizer's ids were not: an IndexError in the embedding."""
    load_hf_model(cfg_for("model.arch=qwen3_moe")).save_pretrained(tmp_path)  # vocab_size 128
    _tokenizer(300).save_pretrained(tmp_path)
    ctx = TaskContext(tmp_path, Console(quiet=True))
    with pytest.raises(ConfigError) as err:
        Generate().run(cfg_for(f"model.path={tmp_path}", "task=generate", "task.prompt='w5 w250'"), ctx)
    (p,) = err.value.problems
    assert p.key == "task.prompt" and "ids [254], outside the model's vocab_size 128" in p.message
    assert "does not match the model" in p.message
    m = Generate().run(cfg_for(f"model.path={tmp_path}", "task=generate", "task.prompt='w5 w6'",
                               "task.max_new_tokens=2"), ctx)
    assert m["prompt_ids"] == [9, 10]


def test_a_tilde_in_model_path_is_expanded_once_for_model_checkpoint_and_tokenizer(tmp_path, monkeypatch):
    """Validation expanded ``~``, the loaders did not (transformers: "Repo id must be in the form ...")."""
    monkeypatch.setenv("HOME", str(tmp_path))
    load_hf_model(cfg_for("model.arch=qwen3_moe")).save_pretrained(tmp_path / "m")
    _tokenizer(20).save_pretrained(tmp_path / "m")
    cfg = cfg_for("model.path='~/m'", "task=generate", "task.prompt='w1 w2'", "task.max_new_tokens=2")
    assert cfg.model.path == str(tmp_path / "m")
    ref, model = reference_and_swapped(cfg)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, load_hf_model(cfg_for(f"model.path={tmp_path / 'm'}"))(ids).logits)
    assert Generate().run(cfg, TaskContext(tmp_path, Console(quiet=True)))["prompt_ids"] == [5, 6]


def test_build_init_false_is_refused_for_the_transformers_backend():
    """build(cfg, init=False) returned a model with random weights (HF builds its own), which a caller would then take
    for an empty model."""
    cfg = load_config(None, ["device=cpu", "layer=transformers_moe", "model=hf", "model.arch=qwen3_moe"])
    with pytest.raises(ValueError, match=r"init=False.*transformers_moe.*model.path"):
        build(cfg, init=False)
    assert build(cfg).composer_swapped
