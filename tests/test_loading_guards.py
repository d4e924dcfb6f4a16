"""load_checkpoint refuses bad input before it changes the model: sharded indexes, late bad tensors, meta models and
paths of the wrong type."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from composer import build
from composer.errors import WeightLoadError
from composer.loading import load_checkpoint, save_checkpoint


@pytest.fixture
def cfg(compose):
    return compose("kernel=torch")


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, before):
    return [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]


def _sharded(tmp_path, sd, write_second=True):
    """A two-shard checkpoint folder with its index: layer 0 in the first shard, the rest in the second."""
    d = tmp_path / "sharded"
    d.mkdir()
    first = {k: v for k, v in sd.items() if k.startswith("layers.0.")}
    save_file(first, str(d / "model-00001-of-00002.safetensors"))
    if write_second:
        save_file({k: v for k, v in sd.items() if k not in first}, str(d / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if k in first else 2}-of-00002.safetensors" for k in sd}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_a_shard_the_index_lists_must_exist(tmp_path, cfg):
    sd = load_file(str(save_checkpoint(build(cfg.model_copy(update={"seed": 1})), tmp_path / "full.safetensors")))
    d = _sharded(tmp_path, sd, write_second=False)
    model = build(cfg)
    before = _state(model)
    for source in (d, d / "model.safetensors.index.json"):
        with pytest.raises(WeightLoadError, match=r"not in .*sharded: model-00002-of-00002.safetensors.*incomplete"):
            load_checkpoint(model, source, strict=False)
    assert not _unchanged(model, before)


def test_the_index_decides_which_files_load(tmp_path, cfg):
    src = build(cfg.model_copy(update={"seed": 1}))
    sd = load_file(str(save_checkpoint(src, tmp_path / "full.safetensors")))
    d = _sharded(tmp_path, sd)
    save_file({"layers.0.norm.weight": sd["layers.0.norm.weight"] * 0}, str(d / "old-model.safetensors"))  # stray
    model = build(cfg)
    report = load_checkpoint(model, d)
    assert sorted(report.loaded) == sorted(sd)
    assert not _unchanged(model, _state(src))
    model = build(cfg)
    load_checkpoint(model, d / "model.safetensors.index.json")
    assert not _unchanged(model, _state(src))


def test_a_key_the_index_lists_must_be_in_its_shard(tmp_path, cfg):
    sd = load_file(str(save_checkpoint(build(cfg), tmp_path / "full.safetensors")))
    d = _sharded(tmp_path, sd)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["layers.1.extra.weight"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match=r"model-00002-of-00002.safetensors: .*lists layers.1.extra.weight"):
        load_checkpoint(build(cfg), d, strict=False)


def test_a_folder_without_index_still_loads_every_file(tmp_path, cfg):
    src = build(cfg.model_copy(update={"seed": 1}))
    sd = load_file(str(save_checkpoint(src, tmp_path / "full.safetensors")))
    d = _sharded(tmp_path, sd)
    (d / "model.safetensors.index.json").unlink()
    model = build(cfg)
    load_checkpoint(model, d)
    assert not _unchanged(model, _state(src))


@pytest.mark.parametrize("damage", ["packed_shape", "per_expert_shape", "norm_dtype", "missing_layer"])
def test_a_refused_checkpoint_changes_nothing(tmp_path, cfg, damage):
    """A bad tensor late in the file used to fail after the earlier ones were copied: half one checkpoint, half
    another."""
    layout = "per_expert" if damage == "per_expert_shape" else "packed"
    sd = load_file(str(save_checkpoint(build(cfg.model_copy(update={"seed": 2})), tmp_path / "b", layout=layout)))
    if damage == "packed_shape":
        k = "layers.1.mlp.experts.down_proj"
        sd[k] = sd[k][..., :40].contiguous()
    elif damage == "per_expert_shape":
        k = "layers.1.mlp.experts.7.down_proj.weight"
        sd[k] = sd[k][:, :40].contiguous()
    elif damage == "norm_dtype":
        sd["layers.1.norm.weight"] = sd["layers.1.norm.weight"].to(torch.int64)
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith("layers.1.")}
    save_file(sd, str(tmp_path / "bad.safetensors"))
    model = build(cfg.model_copy(update={"seed": 1}))
    before = _state(model)
    with pytest.raises(WeightLoadError, match=r"shape|dtype torch.int64|parameters not in the checkpoint: layers.1"):
        load_checkpoint(model, tmp_path / "bad.safetensors")
    assert not _unchanged(model, before)


def test_a_meta_model_is_refused(tmp_path, cfg):
    path = save_checkpoint(build(cfg), tmp_path)
    with pytest.raises(WeightLoadError, match=r"meta device .*Build the model on the config's device"):
        load_checkpoint(build(cfg, init=False, device="meta"), path)


@pytest.mark.parametrize("source", [3, b"/tmp/model.safetensors", [3], None])
def test_a_path_of_the_wrong_type_is_refused(cfg, source):
    with pytest.raises(TypeError, match=r"load_checkpoint takes a (checkpoint path|list of checkpoint file paths)"):
        load_checkpoint(build(cfg), source)


def test_an_empty_list_is_refused(cfg):
    with pytest.raises(WeightLoadError, match=r"empty list of checkpoint files"):
        load_checkpoint(build(cfg), [])


@pytest.mark.parametrize("feature, says", [
    (["model.has_bias=true"], "the experts' biases: model.has_bias=true"),
    (["model.num_shared_experts=1"], "shared experts: model.num_shared_experts"),
    (["model.router.scoring=sigmoid", "model.router.score_correction_bias=true"],
     "the router's score-correction bias: model.router.score_correction_bias=true")])
def test_moe_parts_the_model_lacks_are_refused_even_when_not_strict(tmp_path, compose, feature, says):
    """strict=False lets attention and embeddings through; these keys were dropped with them, and the block computed
    another model than the checkpoint's (relative error 0.2-0.6)."""
    src = build(compose("kernel=torch", *feature))
    path = save_checkpoint(src, tmp_path)
    model = build(compose("kernel=torch", *[f for f in feature if "scoring" in f]))
    before = _state(model)
    with pytest.raises(WeightLoadError, match=f"configured without: {says}.*Nothing was loaded"):
        load_checkpoint(model, path, strict=False)
    assert not _unchanged(model, before)
    load_checkpoint(build(compose("kernel=torch", *feature), init=False), path)  # (configured alike: loads)


def test_the_shared_experts_gate_is_a_part_too(tmp_path, compose):
    src = build(compose("kernel=torch", "model.num_shared_experts=1", "model.shared_expert_gate=true"))
    path = save_checkpoint(src, tmp_path)
    with pytest.raises(WeightLoadError, match="the shared experts' gate: model.shared_expert_gate=true"):
        load_checkpoint(build(compose("kernel=torch", "model.num_shared_experts=1")), path, strict=False)


def test_a_router_bias_is_refused_not_dropped(tmp_path, compose):
    """gpt_oss-style router logits with a bias: composer's router has none, and strict=False dropped it."""
    cfg = compose("kernel=torch")
    sd = load_file(str(save_checkpoint(build(cfg), tmp_path)))
    sd["layers.0.mlp.gate.bias"] = torch.randn(sd["layers.0.mlp.gate.weight"].shape[0])
    save_file(sd, str(tmp_path / "biased.safetensors"))
    with pytest.raises(WeightLoadError, match="a bias on the router's logits, which composer's router does not have"):
        load_checkpoint(build(cfg), tmp_path / "biased.safetensors", strict=False)
