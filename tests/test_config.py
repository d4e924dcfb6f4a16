"""Config validation: every problem at once, with dotted keys, values, choices and did-you-mean."""
import re
from pathlib import Path

import pytest
import torch

from composer import load_config
from composer.config import validate_config
from composer.errors import ConfigError

BAD = [
    (["model.top_k=9"], "model.top_k = 9: must be <= model.num_experts = 8"),
    (["model.top_k=0"], "model.top_k = 0: Input should be greater than or equal to 1"),
    (["model.num_experts=0"], "model.num_experts = 0"),
    (["model.hidden_size=-3"], "model.hidden_size = -3"),
    (["model.intermediate_size=abc"], "model.intermediate_size = 'abc'"),
    (["model.num_layers=0"], "model.num_layers = 0"),
    (["model.dtype=bf16"], "model.dtype = 'bf16': Input should be 'float32', 'float16' or 'bfloat16'"),
    (["model.activation=swiglu"], "Did you mean 'swigluoai'?"),
    (["model.router.scoring=softmx"], "Did you mean 'softmax'?"),
    (["model.router.num_expert_group=3", "model.router.topk_group=1"], "must divide model.num_experts = 8"),
    (["model.router.num_expert_group=4"], "grouped top-k needs both"),
    (["model.router.num_expert_group=4", "model.router.topk_group=5"], "must be <= model.router.num_expert_group = 4"),
    (["model.router.num_expert_group=4", "model.router.topk_group=1", "model.top_k=3"], "only 2 experts are reachable"),
    (["model.router.routed_scaling_factor=0"], "model.router.routed_scaling_factor = 0"),
    (["model.shared_expert_gate=true"], "model.shared_expert_gate = True: needs model.num_shared_experts >= 1"),
    (["model.shared_expert_intermediate_size=64"], "needs model.num_shared_experts >= 1"),
    (["model.num_shared_experts=-1"], "model.num_shared_experts = -1"),
    (["++model.num_expert=4"], "model.num_expert = 4: unknown key"),
    (["++model.router.topk=4"], "Did you mean 'topk_group'"),
    (["++tsk=1"], "unknown top-level key"),
    (["quant.name=fp9"], "quant.name = 'fp9': unknown quant method"),
    (["layer.name=fused_mo"], "Did you mean 'fused_moe'?"),
    (["kernel.name=trition"], "Did you mean 'triton'?"),
    (["all2all.name=nccl"], "unknown all2all backend"),
    (["task.name=chek"], "Did you mean 'check'?"),
    (["parallel.ep_size=3", "all2all.name=none"], "parallel.ep_size = 3: must divide model.num_experts = 8"),
    (["parallel.ep_size=2"], "parallel.ep_size = 2 needs an all2all backend"),
    (["parallel.placement=random"], "Input should be 'linear' or 'round_robin'"),
    (["custom_ops=[all,none]"], "'all' and 'none' cannot both be given"),
    (["custom_ops=[+silu_and_mull]"], "Did you mean 'silu_and_mul'?"),
    (["custom_ops=[silu_and_mul]"], "must be 'all', 'none', '+name' or '-name'"),
    (["seed=abc"], "seed = 'abc': must be int"),
    (["device=gpu"], "device = 'gpu': choose one of: auto, cpu, cuda"),
    (["schema_version=2"], "this composer reads schema version 1"),
    (["kernel=torch", "compile=true", "device=cpu"],
     "cannot be compiled with fullgraph or captured; use kernel=triton, which runs on a CPU under TRITON_INTERPRET=1"),
    (["quant=fp8_w8a8", "quant.granularity=block", "quant.block_shape=[16]"],
     "quant.block_shape = [16]: must be two sizes [block_n, block_k] (rows and columns of a scale block), got 1"),
    (["task=bench", "task.tokens=[]"], "task.tokens = []: List should have at least 1 item"),
    (["cuda_graph=true", "kernel=torch"], "CUDA graphs need device=cuda"),
    (["task.tokens=-1"], "task.tokens = -1"),
    (["++task.tokenz=3"], "Did you mean 'tokens'?"),
    (["plugins=[no_such_plugin_module]"], "cannot import 'no_such_plugin_module'"),
    (["kernel=triton"], "experts kernel 'triton'"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_names_the_problem(compose, overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(*overrides)
    assert message in str(err.value), str(err.value)


def test_every_problem_is_reported_at_once(compose):
    with pytest.raises(ConfigError) as err:
        compose("model.top_k=9", "model.dtype=fp8", "quant.name=fp9", "seed=x", "device=tpu", "custom_ops=[all,none]")
    keys = {p.key for p in err.value.problems}
    assert {"model.dtype", "quant.name", "seed", "device", "custom_ops"} <= keys
    assert "model.top_k" in keys or "model.dtype" in keys


def test_unknown_group_choice_lists_options():
    with pytest.raises(ConfigError, match=r"quant = 'fp9': no such quant config; choose one of: .*none"):
        load_config(None, ["quant=fp9"])
    with pytest.raises(ConfigError, match=r"kernel = 'example_torch': .* Did you mean 'torch'\? A kernel registered "
                                          r"without a config file \(a plugin's\) is chosen with kernel.name=example_torch"):
        load_config(None, ["kernel=example_torch"])


def test_valid_config_roundtrip_and_hash(compose):
    a = compose("model.top_k=4")
    b = compose("model.top_k=4")
    c = compose("model.top_k=3")
    assert a.model.top_k == 4 and a.kernel.resolved == "torch" and a.kernel.auto_selected
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert validate_config(a.to_dict()).config_hash() == a.config_hash()


def test_config_files_cannot_import_by_path(compose):
    with pytest.raises(ConfigError, match="unknown layer"):
        compose("layer.name=os.system")
    with pytest.raises(ConfigError, match="unknown key"):
        compose("++layer._target_=os.system")


def test_deployment_file(tmp_path: Path):
    f = tmp_path / "deploy.yaml"
    f.write_text("schema_version: 1\nmodel: {name: tiny, top_k: 1, num_layers: 1}\nkernel: torch\ntask: {name: check}\n")
    cfg = load_config(f, ["device=cpu", "model.hidden_size=32"])
    assert (cfg.model.top_k, cfg.model.num_layers, cfg.model.hidden_size) == (1, 1, 32)
    assert cfg.kernel.name == "torch" and cfg.task.name == "check" and cfg.task.params.tolerance is None
    f.write_text("schema_version: 3\nmodel: {top_kk: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    text = str(err.value)
    assert str(f) in text and "schema_version = 3" in text and "model.top_kk" in text and "Did you mean 'top_k'" in text
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_a_task_chosen_over_a_files_task_report_drops_its_report_dir(tmp_path: Path):
    """task=report sets report.dir beside its section; chosen over on the command line, that key stayed and the run
    was refused ("only task=report reads report.*"), though the file set no report key."""
    f = tmp_path / "deploy.yaml"
    f.write_text("schema_version: 1\nmodel: tiny\ntask: report\ndevice: cpu\n")
    assert load_config(f, ["task=show"]).task.name == "show"
    assert load_config(f, ["task.dir=x"]).task.name == "report"
    f.write_text("schema_version: 1\nmodel: tiny\ntask: report\nreport: {dir: runs}\ndevice: cpu\n")
    with pytest.raises(ConfigError, match=r"only task=report reads report.\* \(this run is task=show\)"):
        load_config(f, ["task=show"])  # (the file's own report keys are the user's: still refused)


def test_a_boolean_is_not_an_integer(compose):
    """pydantic's lax mode read model.top_k=true as 1; every schema refuses it, with the key named."""
    for override, key in (("model.top_k=true", "model.top_k"), ("task.tokens=false", "task.tokens"),
                          ("quant.group_size=true", "quant.group_size")):
        extra = ["quant=int4_w4a16"] if override.startswith("quant") else ["task=check"] if "task" in override else []
        with pytest.raises(ConfigError, match=rf"{key} = (True|False): must be an integer, got (True|False) \(a boolean\)"):
            compose(*extra, override)


def test_a_key_of_another_implementation_says_whose_it_is(compose):
    with pytest.raises(ConfigError, match=r"quant.group_size = 16: unknown key; quant 'int8_w8a16' takes no keys; "
                                          r"group_size is a key of quant=int4_w4a16"):
        compose("quant=int8_w8a16", "++quant.group_size=16")
    with pytest.raises(ConfigError, match=r"quant.group_siz = 16: unknown key; allowed: group_size, zero_point. "
                                          r"Did you mean 'group_size'\?"):
        compose("quant=int4_w4a16", "++quant.group_siz=16")


@pytest.mark.parametrize("task", ["run", "check", "bench"])
def test_zero_tokens_is_refused(compose, task):
    """T = 0 compares and times nothing (a vacuous 'check passed'); the kernel tests cover T = 0."""
    with pytest.raises(ConfigError, match=r"task.tokens.* greater than or equal to 1"):
        compose(f"task={task}", "task.tokens=[0]" if task == "bench" else "task.tokens=0")


def test_hugging_face_keys_need_model_hf(compose):
    with pytest.raises(ConfigError, match=r"model.arch = 'qwen3_moe': describes a Hugging Face model and is read only "
                                          r"with model=hf \(this is model=tiny\)"):
        compose("++model.arch=qwen3_moe")


def test_task_show_previews_a_cuda_config_anywhere(compose):
    """task=show builds on the meta device, so a GPU deployment can be previewed on a CPU machine."""
    cfg = compose("task=show", "device=cuda", "model=qwen3_30b_a3b")
    assert cfg.device == "cuda" and cfg.kernel.resolved == "triton"
    if not torch.cuda.is_available():  # (other tasks still need the GPU they name)
        with pytest.raises(ConfigError, match="no CUDA device is visible here"):
            compose("task=run", "device=cuda")


def test_a_top_level_key_that_belongs_to_a_section_names_it(compose):
    with pytest.raises(ConfigError, match=r"Did you mean 'task.tolerance'\?"):
        compose("task=check", "++tolerance=0.1")
    with pytest.raises(ConfigError, match=r"Did you mean 'model.top_k'\?"):
        compose("++top_k=4")
    with pytest.raises(ConfigError, match=r"Did you mean 'seed'\?"):
        compose("++seeed=4")


def test_a_boolean_is_not_a_number_or_a_list_of_them(compose):
    """task.tolerance=true checked against 100%; task.tokens=[true, 16] timed T = 1."""
    with pytest.raises(ConfigError, match=r"task.tolerance = True: must be a number, got True \(a boolean\)"):
        compose("task=check", "task.tolerance=true")
    with pytest.raises(ConfigError, match=r"task.tokens = \[True, 16\]: must be a list of integers"):
        compose("task=bench", "task.tokens=[true,16]")
    assert compose("task=check", "task.tolerance=1").task.params.tolerance == 1.0  # (an int is still a number)


def test_a_key_of_an_unchosen_implementation_is_named(compose):
    with pytest.raises(ConfigError, match=r"tolerance is a key of task=check\."):
        compose("++tolerance=0.1")  # (the default task is run)


def test_deployment_file_strings_are_not_interpolated_with_overrides(tmp_path: Path):
    """A file's literal ${...} stays literal whether or not overrides are given (they were resolved, or refused, as
    soon as one key=value override was merged)."""
    f = tmp_path / "d.yaml"
    f.write_text("model: {name: hf, arch: qwen3_moe, hf_overrides: {_name_or_path: 'a${oc.env:HOME}b'}}\n"
                 "device: cpu\n")
    for overrides in ([], ["seed=3"]):
        cfg = load_config(f, overrides)
        assert cfg.model.hf_overrides["_name_or_path"] == "a${oc.env:HOME}b", overrides


def test_an_internal_layer_class_is_no_layer_choice(compose):
    """layer.name=transformers_fused_moe (the Transformers backend's swap class, which takes Hugging Face's argument
    order) validated and computed garbage with exit 0; layer=transformers_fused_moe's hint recommended that."""
    pytest.importorskip("transformers")
    said = r"layer.name = 'transformers_fused_moe': not a layer to choose: the Transformers backend's internal swap"
    with pytest.raises(ConfigError, match=said + r" class .* layer=transformers_moe") as err:
        compose("layer.name=transformers_fused_moe")
    assert "fused_moe, transformers_moe" in str(err.value) and "Did you mean" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["layer=transformers_fused_moe"])
    assert "layer.name=transformers_fused_moe" not in str(err.value) and "internal swap class" in str(err.value)


def test_build_refuses_an_internal_layer_in_a_config_made_by_hand(compose):
    """A config changed with model_copy skips validation: build must not run the swap class as composer's layer."""
    pytest.importorskip("transformers")
    from composer import build
    from composer.config import Named

    cfg = compose().model_copy(update={"layer": Named(name="transformers_fused_moe")})
    with pytest.raises(ConfigError, match="layer.name = 'transformers_fused_moe': not a layer to choose"):
        build(cfg)


def test_an_unresolvable_interpolation_is_a_config_problem():
    with pytest.raises(ConfigError, match=r"model.top_k = '\$\{nope\}': interpolation cannot be resolved: "
                                          r"Interpolation key 'nope' not found"):
        load_config(None, ["model.top_k=${nope}"])
    assert load_config(None, ["model.top_k=${model.num_experts}"]).model.top_k == 8  # (one that resolves: fine)


@pytest.mark.parametrize("seed, ok", [(0, True), (-5, True), (-2**63, True), (2**63, True), (2**64 - 1, True),
                                      (2**64, False), (99999999999999999999, False), (-2**63 - 1, False)])
def test_a_seed_must_fit_torchs_generators(compose, seed, ok):
    """seed=99999999999999999999 passed validation and crashed in torch.manual_seed ("Overflow when unpacking long
    long", a traceback); what torch takes (up to 2**64 - 1) keeps working."""
    if ok:
        assert compose(f"seed={seed}").seed == seed
        torch.Generator().manual_seed(seed)
        return
    with pytest.raises(ConfigError, match=rf"seed = {seed}: must be -2\*\*63 <= seed < 2\*\*64"):
        compose(f"seed={seed}")


@pytest.mark.parametrize("key", ["model.rms_norm_eps", "model.router.routed_scaling_factor"])
@pytest.mark.parametrize("value, says", [("1e-50", "1e-50 becomes 0"), ("1e39", "1e+39 becomes inf"), ("0", ""),
                                         ("-1", "")])
def test_float32_factors_must_fit_float32(compose, key, value, says):
    """rms_norm_eps=1e-50 became 0 in float32 (NaN for a zero-token row), routed_scaling_factor=1e39 inf (all NaN):
    both ran with exit 0. A subnormal float32 value stays positive and is kept."""
    with pytest.raises(ConfigError, match=rf"{key} = .*: must be positive and representable in float32 .*"
                                          rf"{re.escape(says)}"):
        compose(f"{key}={value}")
    assert compose(f"{key}=1e-39") and compose(f"{key}=1e-45")
    tiny, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    assert compose(f"{key}={tiny!r}") and compose(f"{key}={big!r}")


def test_the_shipped_deployment_file_example_loads_and_is_the_documented_one():
    """--help, the README and docs/deploy.md point at deploy/qwen3_serving.yaml: it must exist, validate (task=show
    previews its CUDA config anywhere) and hold what docs/deploy.md shows of it."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    f = root / "deploy" / "qwen3_serving.yaml"
    cfg = load_config(f, ["task=show"])
    assert (cfg.model.name, cfg.kernel.name, cfg.quant.name, cfg.device) == ("qwen3_30b_a3b", "triton", "fp8_w8a8",
                                                                              "cuda")
    doc = (root / "docs" / "deploy.md").read_text()
    block = doc.split("# deploy/qwen3_serving.yaml", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == yaml.safe_load(f.read_text())


def test_a_deployment_files_every_problem_at_once(tmp_path: Path):
    """A model preset with no file, and a hydra: section (command line), each hid the file's other problems."""
    from composer.deploy_file import file_overrides

    f = tmp_path / "d.yaml"
    f.write_text("schema_version: 1\nmodel: tinyy\nkernel: tritn\nquant: {name: none, foo: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert [p.key for p in err.value.problems] == ["model", "quant.foo", "kernel.name"] and str(f) in str(err.value)
    assert "(checked with model: tiny, the closest preset)" in err.value.problems[2].message
    # (the rest is checked against the closest preset: qwen3's sizes take int4's group 128, tiny's would not; with
    # no close preset, the preset is reported alone)
    for model in ("qwen3_30b_a3bx", "zzzz"):
        f.write_text(f"schema_version: 1\nmodel: {model}\nquant: int4_w4a16\nkernel: tritn\n")
        with pytest.raises(ConfigError) as err:
            load_config(f)
        assert [p.key for p in err.value.problems] == (["model", "kernel.name"] if model != "zzzz" else ["model"])
    f.write_text("schema_version: 1\nkernel: tritn\nhydra: {run: {dir: x}}\n")
    with pytest.raises(ConfigError) as err:
        file_overrides(str(f), [])
    assert [p.key for p in err.value.problems] == ["kernel.name", "hydra"]
    f.write_text("schema_version: 1\nhydra: {run: {dir: x}}\n")
    with pytest.raises(ConfigError) as err:
        file_overrides(str(f), [])
    assert [p.key for p in err.value.problems] == ["hydra"]
