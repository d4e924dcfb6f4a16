"""Pre-quantized checkpoints: safetensors round trips under vLLM names, shape/dtype/layout errors."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from composer import build
from composer.errors import WeightLoadError
from composer.loading import load_checkpoint, save_checkpoint

SMALL = ["model.hidden_size=32", "model.intermediate_size=48", "model.num_experts=4", "model.num_layers=1", "kernel=torch"]
CASES = {
    "fp8_per_tensor": (["quant=fp8_w8a8"], {"w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"}),
    "fp8_static": (["quant=fp8_w8a8", "quant.activation_scheme=static", "quant.static_input_scale=0.01"],
                   {"w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_input_scale", "w2_input_scale"}),
    "fp8_channel": (["quant=fp8_w8a8", "quant.granularity=per_token_channel"],
                    {"w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"}),
    "fp8_block": (["quant=fp8_w8a8", "quant.granularity=block", "quant.block_shape=[16,16]"],
                  {"w13_weight", "w2_weight", "w13_weight_scale_inv", "w2_weight_scale_inv"}),
    "int8_w8a8": (["quant=int8_w8a8"], {"w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"}),
    "int4_zp": (["quant=int4_w4a16", "quant.group_size=16", "quant.zero_point=true"],
                {"w13_qweight", "w2_qweight", "w13_scales", "w2_scales", "w13_qzeros", "w2_qzeros"}),
}
P = "layers.0.mlp.experts."


def tokens(cfg, T=7):
    return torch.randn(T, cfg.model.hidden_size, generator=torch.Generator().manual_seed(T)).to(cfg.model.torch_dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_prequantized_round_trip(tmp_path, compose, case):
    overrides, names = CASES[case]
    cfg = compose(*overrides, *SMALL)
    model = build(cfg)
    path = save_checkpoint(model, tmp_path)
    sd = load_file(str(path))
    assert {k[len(P):] for k in sd if k.startswith(P)} == names
    model2 = build(cfg, init=False)
    load_checkpoint(model2, path)
    x = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))
    layer = model2.get_submodule(P[:-1])
    wname = "w13_qweight" if "int4" in case else "w13_weight"
    assert layer.quant_state == "ready" and layer.w13.dtype == sd[P + wname].dtype
    assert layer.w13.dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8)


def _saved(tmp_path, compose, overrides):
    cfg = compose(*overrides, *SMALL)
    path = save_checkpoint(build(cfg), tmp_path)
    return cfg, path, load_file(str(path))


def test_wrong_scale_shape_names_tensor_and_shapes(tmp_path, compose):
    cfg, path, sd = _saved(tmp_path, compose, ["quant=fp8_w8a8", "quant.granularity=per_token_channel"])
    sd[P + "w13_weight_scale"] = torch.rand(4, 48, 1)  # should be [4, 96, 1]
    save_file(sd, str(path))
    with pytest.raises(WeightLoadError, match=r"w13_weight_scale: checkpoint tensor has shape \(4, 48, 1\), fp8_w8a8 "
                                              r"quant.granularity=per_token_channel quant.activation_scheme=dynamic "
                                              r"expects \(4, 96, 1\)"):
        load_checkpoint(build(cfg, init=False), path)  # (the settings that decide the layout; no block_shape)


def test_wrong_block_scale_shape(tmp_path, compose):
    cfg, path, sd = _saved(tmp_path, compose, ["quant=fp8_w8a8", "quant.granularity=block", "quant.block_shape=[16,16]"])
    sd[P + "w2_weight_scale_inv"] = torch.rand(4, 1, 3)
    save_file(sd, str(path))
    with pytest.raises(WeightLoadError, match=r"w2_weight_scale_inv.*\(4, 1, 3\).*\(4, 2, 3\)"):
        load_checkpoint(build(cfg, init=False), path)


def test_wrong_weight_dtype(tmp_path, compose):
    cfg, path, sd = _saved(tmp_path, compose, ["quant=int8_w8a16"])
    sd[P + "w2_weight"] = sd[P + "w2_weight"].float()
    save_file(sd, str(path))
    with pytest.raises(WeightLoadError, match=r"w2_weight: checkpoint tensor has dtype torch.float32.*torch.int8"):
        load_checkpoint(build(cfg, init=False), path)


def test_missing_scale_is_refused(tmp_path, compose):
    cfg, path, sd = _saved(tmp_path, compose, ["quant=int4_w4a16", "quant.group_size=16"])
    del sd[P + "w2_scales"]
    save_file(sd, str(path))
    with pytest.raises(WeightLoadError, match=r"lacks layers.0.mlp.experts.w2_scales"):
        load_checkpoint(build(cfg, init=False), path)


def test_layout_mismatch_says_which_setting(tmp_path, compose):
    _, path, _ = _saved(tmp_path, compose, ["quant=fp8_w8a8", "quant.granularity=block", "quant.block_shape=[16,16]"])
    cfg = compose("quant=fp8_w8a8", *SMALL)  # per_tensor
    with pytest.raises(WeightLoadError, match=r"w13_weight_scale_inv.*quant.granularity=block"):
        load_checkpoint(build(cfg, init=False), path)
    with pytest.raises(WeightLoadError, match=r"w13_weight: this checkpoint is quantized but the layer uses quant=none"):
        load_checkpoint(build(compose(*SMALL), init=False), path)


def test_fp8_per_shard_scales_and_bf16_scales_load(tmp_path, compose):
    cfg, path, sd = _saved(tmp_path, compose, ["quant=fp8_w8a8"])
    s = sd[P + "w13_weight_scale"]
    sd[P + "w13_weight_scale"] = torch.stack([s, s], 1).bfloat16().float()  # [E, 2] per (w1, w3)
    save_file(sd, str(path))
    model = build(cfg, init=False)
    load_checkpoint(model, path)
    assert model.get_submodule(P[:-1]).w13_weight_scale.shape == (4,)


def test_fp8_per_shard_zero_scales_load_as_a_zero_expert(tmp_path, compose):
    """[E, 2] scales both 0 (a pruned expert saved with zero weights): requantizing to their max divided 0 by 0, NaN
    weights, NaN for every token routed to it. It must load as zero weights with a zero scale: an exactly zero output."""
    cfg, path, sd = _saved(tmp_path, compose, ["quant=fp8_w8a8", "model.dtype=float32"])
    s = torch.stack([sd[P + "w13_weight_scale"]] * 2, 1)
    s[1] = 0.0
    sd[P + "w13_weight_scale"] = s
    sd[P + "w13_weight"][1] = 0
    save_file(sd, str(path))
    model = build(cfg, init=False)
    load_checkpoint(model, path)
    layer = model.get_submodule(P[:-1])
    assert torch.isfinite(layer.w13.float()).all() and layer.w13_weight_scale[1].item() == 0.0
    x = tokens(cfg)
    w, ids = torch.ones(x.shape[0], 1), torch.ones(x.shape[0], 1, dtype=torch.int32)  # every token to expert 1
    with torch.no_grad():
        assert torch.equal(layer(x, w, ids), torch.zeros_like(x))
        assert torch.isfinite(model(x)).all()


def test_online_quantization_of_a_bf16_checkpoint(tmp_path, compose):
    """An unquantized HF checkpoint loads into a quantized config and is quantized once, after loading."""
    plain = build(compose(*SMALL))
    path = save_checkpoint(plain, tmp_path)
    cfg = compose("quant=int8_w8a16", *SMALL)
    model = build(cfg, init=False)
    load_checkpoint(model, path)
    direct = build(cfg)
    x = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(model(x), direct(x))


def test_float_checkpoint_into_a_processed_quantized_model_is_refused(tmp_path, compose):
    """Float weights would be truncated into the int8 tensors beside the old scales (0.4 relative error, silently):
    refused before anything is read, and the model is untouched."""
    src = build(compose("quant=none", *SMALL))
    path = save_checkpoint(src, tmp_path)
    cfg = compose("quant=int8_w8a16", *SMALL)
    model = build(cfg)  # init=True: already quantized
    x = tokens(cfg)
    with torch.no_grad():
        before = model(x)
    for strict in (True, False):
        with pytest.raises(WeightLoadError, match=r"already holds processed int8_w8a16 weights .* init=False"):
            load_checkpoint(model, path, strict=strict)
    layer = model.get_submodule(P[:-1])
    with pytest.raises(WeightLoadError, match=r"w13: this layer holds processed int8_w8a16 weights"):
        layer.weight_loader(layer.w13, torch.randn(48, 32), "w1", 0)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    fresh = build(cfg, init=False)  # the right way: quantized once, after loading
    load_checkpoint(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))  # (same seed, same weights, quantized the same way)


def test_a_failed_load_leaves_the_model_loadable(tmp_path, compose):
    """A pre-quantized load that fails halfway restores the layers' parameters and quantization state, so the
    corrected checkpoint then loads into the same model (it reported false missing scales before)."""
    cfg, path, sd = _saved(tmp_path, compose, ["quant=int8_w8a8"])
    good = dict(sd)
    sd[P + "w2_weight_scale"] = sd[P + "w2_weight_scale"].double()
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"))
    model = build(cfg, init=False)
    layer = model.get_submodule(P[:-1])
    params_before = dict(layer._parameters)
    with pytest.raises(WeightLoadError, match=r"w2_weight_scale: checkpoint tensor has dtype torch.float64"):
        load_checkpoint(model, bad)
    assert layer._parameters == params_before and layer.quant_state == "unprocessed"
    save_file(good, str(path))
    load_checkpoint(model, path)
    x = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(model(x), build(cfg)(x))


def test_float_and_quantized_copies_are_refused_in_either_order(tmp_path, compose):
    """Inside one file the float names sort before w13_weight: the quantized copy must not replace them silently."""
    cfg = compose("quant=int8_w8a16", *SMALL)
    q = load_file(str(save_checkpoint(build(cfg), tmp_path / "q")))
    f = load_file(str(save_checkpoint(build(compose(*SMALL)), tmp_path / "f")))
    save_file({**q, **{k: v for k, v in f.items() if "experts" in k}}, str(tmp_path / "mix.safetensors"))
    with pytest.raises(WeightLoadError, match="both float and quantized copies: keep one"):
        load_checkpoint(build(cfg, init=False), tmp_path / "mix.safetensors")


def test_a_checkpoint_of_another_method_is_named_by_its_dtype(tmp_path, compose):
    _, path, _ = _saved(tmp_path, compose, ["quant=int8_w8a16"])
    with pytest.raises(WeightLoadError, match=r"dtype torch.int8 .*made with quant=int8_w8a16 or quant=int8_w8a8"):
        load_checkpoint(build(compose("quant=fp8_w8a8", "quant.granularity=per_token_channel", *SMALL), init=False), path)
    with pytest.raises(WeightLoadError, match=r"dtype I8 says the checkpoint was made with quant=int8_w8a16"):
        load_checkpoint(build(compose(*SMALL), init=False), path)


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_damaged_scales_are_refused(tmp_path, compose, bad):
    cfg, path, sd = _saved(tmp_path, compose, ["quant=int8_w8a16"])
    sd[P + "w2_weight_scale"][1, 3] = bad
    save_file(sd, str(path))
    with pytest.raises(WeightLoadError, match=r"w2_weight_scale: 1 of its .* scales are not finite or negative "
                                              r"\(first at index \(1, 3"):
        load_checkpoint(build(cfg, init=False), path)


def test_a_misnamed_scale_is_shown_beside_the_missing_one(tmp_path, compose):
    cfg, path, sd = _saved(tmp_path, compose, ["quant=int8_w8a16"])
    sd["model." + P + "w13_weight_scale"] = sd.pop(P + "w13_weight_scale")
    save_file(sd, str(path))
    with pytest.raises(WeightLoadError, match=r"lacks layers.0.mlp.experts.w13_weight_scale.*matched nothing: "
                                              r"model.layers.0.mlp.experts.w13_weight_scale"):
        load_checkpoint(build(cfg, init=False), path, strict=False)


def test_a_quantized_tensor_in_two_files_is_refused(tmp_path, compose):
    """A scale in two files: the later one won silently (float copies were already refused)."""
    cfg = compose(*CASES["fp8_block"][0], *SMALL)
    sd = load_file(str(save_checkpoint(build(cfg), tmp_path / "a")))
    (tmp_path / "two").mkdir()
    save_file(sd, str(tmp_path / "two" / "model-00001.safetensors"))
    save_file({P + "w13_weight_scale_inv": sd[P + "w13_weight_scale_inv"] * 2},
              str(tmp_path / "two" / "model-00002.safetensors"))
    with pytest.raises(WeightLoadError, match=rf"holds {P}w13_weight_scale_inv twice .*; keep one copy"):
        load_checkpoint(build(cfg, init=False), tmp_path / "two")


@pytest.mark.parametrize("damage, says", [
    ("missing_scale", r"lacks layers.0.mlp.experts.w2_weight_scale"),
    ("nan_scale", r"w2_weight_scale: 1 of its .* scales are not finite"),
    ("scale_dtype", r"w2_weight_scale: checkpoint tensor has dtype torch.float64"),
    ("float_copy", r"both float and quantized copies: keep one"),
    ("twice", r"holds layers.0.mlp.experts.w2_weight_scale twice"),
])
def test_a_refused_prequantized_checkpoint_changes_nothing(tmp_path, compose, damage, says):
    """Pre-quantized tensors were checked only as they loaded: a checkpoint refused for one had already overwritten
    the weights read before it (here the non-expert ones, in the folder's first file). The pre-check now covers
    their headers, the whole layout, float copies beside them and the scales' values."""
    cfg, _, sd = _saved(tmp_path, compose, ["quant=int8_w8a16"])
    experts = {k: v for k, v in sd.items() if k.startswith(P)}
    others = {k: v * 2 for k, v in sd.items() if k not in experts}
    d = tmp_path / "split"
    d.mkdir()
    if damage == "missing_scale":
        experts.pop(P + "w2_weight_scale")
    elif damage == "nan_scale":
        experts[P + "w2_weight_scale"][0, 0] = float("nan")
    elif damage == "scale_dtype":
        experts[P + "w2_weight_scale"] = experts[P + "w2_weight_scale"].double()
    elif damage == "float_copy":  # (sorts before the quantized names in its file)
        experts[P + "down_proj"] = torch.randn(4, 32, 48).to(cfg.model.torch_dtype)
    else:
        save_file({P + "w2_weight_scale": experts[P + "w2_weight_scale"]}, str(d / "c.safetensors"))
    save_file(others, str(d / "a.safetensors"))
    save_file(experts, str(d / "b.safetensors"))
    model = build(cfg, init=False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.arange(p.numel()).reshape(p.shape) % 7)  # (known values: init=False leaves memory as is)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(WeightLoadError, match=says):
        load_checkpoint(model, d)
    assert [n for n, p in model.named_parameters() if not torch.equal(p, before[n])] == []
