"""Weight loading: FusedMoE.weight_loader and Hugging Face-named safetensors round trips."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from composer import build
from composer.errors import WeightLoadError
from composer.layers.fused_moe import FusedMoE
from composer.loading import load_checkpoint, save_checkpoint
from composer.tasks.common import make_tokens


@pytest.fixture
def cfg(compose):
    return compose("model.has_bias=true", "model.num_shared_experts=1", "model.shared_expert_gate=true",
                   "model.dtype=float32", "seed=11")


@pytest.mark.parametrize("layout", ["packed", "per_expert"])
def test_safetensors_round_trip(tmp_path, compose, cfg, layout):
    src = build(cfg)
    path = save_checkpoint(src, tmp_path, layout=layout)
    dst = build(compose("model.has_bias=true", "model.num_shared_experts=1", "model.shared_expert_gate=true",
                        "model.dtype=float32", "seed=12"))
    x = make_tokens(cfg, 7)
    assert not torch.equal(src(x), dst(x))
    report = load_checkpoint(dst, path)
    assert torch.equal(src(x), dst(x))
    for (n, p), (_, q) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(p, q), n
    if layout == "per_expert":
        assert "layers.0.mlp.experts.3.gate_proj.weight" in report.loaded
    else:
        assert "layers.0.mlp.experts.gate_up_proj" in report.loaded


def test_w1_w3_w2_names_and_hf_prefix(tmp_path, cfg):
    src = build(cfg)
    tensors = {}
    for n, p in src.named_parameters():
        tensors["model." + n] = p.detach().clone()
    for i in range(cfg.model.num_layers):
        layer = src.layers[i].mlp.experts
        pre = f"model.layers.{i}.mlp.experts"
        for key in ("w13", "w2", "w13_bias", "w2_bias"):
            del tensors[f"{pre}.{key}"]
        I = layer.intermediate_size
        for e in range(layer.global_num_experts):
            tensors[f"{pre}.{e}.w1.weight"] = layer.w13[e, :I].clone()
            tensors[f"{pre}.{e}.w3.weight"] = layer.w13[e, I:].clone()
            tensors[f"{pre}.{e}.w2.weight"] = layer.w2[e].clone()
        tensors[f"{pre}.gate_up_proj_bias"] = layer.w13_bias.clone()
        tensors[f"{pre}.down_proj_bias"] = layer.w2_bias.clone()
    save_file(tensors, str(tmp_path / "m.safetensors"))
    dst = build(cfg.model_copy(update={"seed": 99}))
    load_checkpoint(dst, tmp_path, prefix="model.")
    for (n, p), (_, q) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(p, q), n


def test_wrong_shapes_name_parameter_and_shapes(tmp_path, cfg, compose):
    src = build(compose("model.intermediate_size=64", "model.dtype=float32"))
    path = save_checkpoint(src, tmp_path / "packed.safetensors")
    with pytest.raises(WeightLoadError, match=r"layers.0.mlp.experts.(gate_up_proj: checkpoint tensor has shape \(8, 128, 96\).*expects \(8, 160, 96\)|down_proj: checkpoint tensor has shape \(8, 96, 64\).*w2 expects \(8, 96, 80\))"):
        load_checkpoint(build(compose("model.dtype=float32")), path)
    path = save_checkpoint(src, tmp_path / "per", layout="per_expert")
    with pytest.raises(WeightLoadError, match=r"layers.0.mlp.experts.(w13 \(expert 0, shard w1\): checkpoint tensor has shape \(64, 96\), the parameter expects \(80, 96\)|w2 \(expert 0, shard w2\): checkpoint tensor has shape \(96, 64\), the parameter expects \(96, 80\))"):
        load_checkpoint(build(compose("model.dtype=float32")), path)


def test_missing_and_unexpected_keys_are_refused(tmp_path, compose):
    src = build(compose("model.num_layers=1", "model.dtype=float32"))
    path = save_checkpoint(src, tmp_path)
    with pytest.raises(WeightLoadError, match=r"parameters not in the checkpoint: layers.1"):
        load_checkpoint(build(compose("model.dtype=float32")), path)
    big = build(compose("model.num_layers=3", "model.dtype=float32"))
    path = save_checkpoint(big, tmp_path / "big.safetensors")
    with pytest.raises(WeightLoadError, match=r"match no parameter: layers.2"):
        load_checkpoint(build(compose("model.dtype=float32")), path)


def test_weight_loader_contract():
    layer = FusedMoE(4, 2, 6, 5, dtype=torch.float32, has_bias=True, ep_size=2, ep_rank=1)
    assert list(layer.local_to_global) == [2, 3]
    g = torch.randn(5, 6)
    assert layer.weight_loader(layer.w13, g, "w1", 3) is True
    assert torch.equal(layer.w13[1, :5], g)
    assert layer.weight_loader(layer.w13, g, "w1", 0) is False  # another rank's expert
    with pytest.raises(WeightLoadError, match="shard 'w2' does not belong"):
        layer.weight_loader(layer.w13, g, "w2", 2)
    with pytest.raises(WeightLoadError, match=r"w13_bias \(expert 2, shard w3\): checkpoint tensor has shape \(4,\), the parameter expects \(5,\)"):
        layer.weight_loader(layer.w13_bias, torch.randn(4), "w3", 2)
    with pytest.raises(WeightLoadError, match="out of range"):
        layer.weight_loader(layer.w2, torch.randn(6, 5), "w2", 7)
    with pytest.raises(WeightLoadError, match="shard_id must be one of"):
        layer.weight_loader(layer.w2, torch.randn(6, 5), "down", 2)


def test_api_misuse_says_what_to_pass(tmp_path, compose):
    import composer
    from composer.errors import WeightLoadError
    from composer.loading import load_checkpoint

    with pytest.raises(TypeError, match=r"build takes a config: composer.load_config\(...\) or a mapping"):
        composer.build(None)
    with pytest.raises(TypeError, match=r"build takes a config"):
        composer.build("config")
    with pytest.raises(TypeError, match=r"overrides must be a list of 'key=value' strings"):
        composer.load_config("config", overrides="model.top_k=4")
    cfg = compose()
    with pytest.raises(ValueError, match=r"device= takes 'meta' only"):
        composer.build(cfg, device="cuda")
    (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightLoadError, match=r"model.safetensors: not a readable safetensors file"):
        load_checkpoint(composer.build(cfg, init=False), tmp_path)


def test_a_missing_expert_is_named(tmp_path, compose):
    from safetensors.torch import load_file, save_file

    import composer
    from composer.errors import WeightLoadError
    from composer.loading import load_checkpoint, save_checkpoint

    cfg = compose("model.num_layers=1")
    path = save_checkpoint(composer.build(cfg), tmp_path, layout="per_expert")
    sd = {k: v for k, v in load_file(str(path)).items() if ".experts.7." not in k}
    save_file(sd, str(path))
    with pytest.raises(WeightLoadError, match=r"layers.0.mlp.experts.w13 \(expert 7: w1/w3\), "
                                              r"layers.0.mlp.experts.w2 \(expert 7: w2\)"):
        load_checkpoint(composer.build(cfg, init=False), path)


def test_two_copies_of_the_same_weights_are_refused(tmp_path, compose):
    """Packed and per-expert copies in one checkpoint: the later key would win, silently."""
    from safetensors.torch import load_file, save_file

    import composer
    from composer.errors import WeightLoadError
    from composer.loading import load_checkpoint, save_checkpoint

    cfg = compose("model.num_layers=1")
    model = composer.build(cfg)
    packed = load_file(str(save_checkpoint(model, tmp_path / "a")))
    per_expert = load_file(str(save_checkpoint(model, tmp_path / "b", layout="per_expert")))
    both = {**packed, **{k: v for k, v in per_expert.items() if ".experts.3." in k}}
    (tmp_path / "both").mkdir()
    save_file(both, str(tmp_path / "both" / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"the checkpoint holds layers.0.mlp.experts.w\w+ .*twice"):
        load_checkpoint(composer.build(cfg, init=False), tmp_path / "both")


def test_quantized_values_never_go_into_float_parameters(tmp_path, compose):
    """A deepseek_v3-style checkpoint's fp8 shared expert (with its weight_scale_inv) would load as raw fp8 values,
    its scale dropped as an unexpected key under strict=False."""
    cfg = compose("model.hidden_size=32", "model.intermediate_size=48", "model.num_experts=4", "model.num_layers=1",
                  "model.num_shared_experts=1", "kernel=torch")
    sd = load_file(str(save_checkpoint(build(cfg), tmp_path)))
    k = "layers.0.mlp.shared_experts.down_proj.weight"
    s = sd[k].abs().amax() / 448
    sd[k], sd[k + "_scale_inv"] = (sd[k] / s).to(torch.float8_e4m3fn), s.reshape(1, 1)
    save_file(sd, str(tmp_path / "fp8.safetensors"))
    with pytest.raises(WeightLoadError, match=rf"{k}: checkpoint tensor has the quantized dtype torch.float8_e4m3fn"):
        load_checkpoint(build(cfg, init=False), tmp_path / "fp8.safetensors", strict=False)
    e = "layers.0.mlp.experts.gate_up_proj"
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd[e] = sd[e].to(torch.float8_e4m3fn)
    save_file(sd, str(tmp_path / "fp8e.safetensors"))
    with pytest.raises(WeightLoadError, match=rf"{e}: checkpoint tensor has the quantized dtype"):
        load_checkpoint(build(cfg, init=False), tmp_path / "fp8e.safetensors")


def test_init_false_needs_every_weight_even_when_not_strict(tmp_path, compose):
    cfg = compose("model.hidden_size=32", "model.intermediate_size=48", "model.num_experts=4", "model.num_layers=1")
    sd = load_file(str(save_checkpoint(build(cfg), tmp_path)))
    save_file({"model." + k: v for k, v in sd.items()}, str(tmp_path / "hf.safetensors"))
    with pytest.raises(WeightLoadError, match=r'no checkpoint key matched .* needs prefix="model.". Nothing was loaded'):
        load_checkpoint(build(cfg, init=False), tmp_path / "hf.safetensors", strict=False)  # the prefix forgotten
    save_file({k: v for k, v in sd.items() if "mlp.gate." not in k}, str(tmp_path / "part.safetensors"))
    with pytest.raises(WeightLoadError, match=r"parameters not in the checkpoint: layers.0.mlp.gate.weight.*uninitialized"):
        load_checkpoint(build(cfg, init=False), tmp_path / "part.safetensors", strict=False)
    seeded = build(cfg)  # init=True: strict=False keeps the seeded weights where the checkpoint has none
    load_checkpoint(seeded, tmp_path / "part.safetensors", strict=False)


def test_two_copies_of_a_non_expert_tensor_are_refused(tmp_path, compose):
    """A norm (or router) weight in two files, or under composer's name and the HF one: the later one won silently,
    even with strict=True; expert tensors were already refused."""
    import composer

    cfg = compose("model.num_layers=1")
    sd = load_file(str(save_checkpoint(composer.build(cfg), tmp_path / "a")))
    norm = next(k for k in sd if k.endswith("norm.weight"))
    (tmp_path / "two").mkdir()
    save_file(sd, str(tmp_path / "two" / "model-00001.safetensors"))
    save_file({norm: sd[norm] * 2}, str(tmp_path / "two" / "model-00002.safetensors"))
    with pytest.raises(WeightLoadError, match=rf"{norm}: the checkpoint holds {norm} twice"):
        load_checkpoint(composer.build(cfg, init=False), tmp_path / "two")
