"""conf/deploy presets (`composer +deploy=<name>`) and conf/experiment overlays compose, validate and build,
or are refused with the hardware they need."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from composer import build, load_config
from composer.api import CONF_DIR
from composer.errors import ConfigError
from composer.registry import QUANT_METHODS
from composer.tasks import TaskContext
from composer.tasks.check import Check

PRESETS = sorted(p.stem for p in (CONF_DIR / "deploy").glob("*.yaml"))


def test_the_presets_the_issue_names_exist():
    assert {"cpu_reference", "h100_bf16", "h100_fp8"} <= set(PRESETS)
    for name in PRESETS:
        assert (CONF_DIR / "deploy" / f"{name}.yaml").read_text().startswith("# @package _global_")


def cuda_capability():
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_builds_or_names_the_hardware(name):
    try:
        cfg = load_config(None, [f"+deploy={name}"])
    except ConfigError as err:
        text = str(err)
        keys = {p.key for p in err.problems}
        if not torch.cuda.is_available():
            # the GPU presets pin device=cuda: refused here because there is no CUDA device, and said so
            assert name.startswith("h100"), text
            assert "device" in keys and "no CUDA device is visible here" in text, text
            return
        # on a GPU the only acceptable refusal is fp8 on a card older than sm89
        assert name == "h100_fp8" and cuda_capability() < (8, 9) and "capability" in text, text
        return
    if name.startswith("h100"):
        assert cfg.device == "cuda" and cfg.kernel.resolved == "triton" and cfg.model.dtype == "bfloat16"
        assert cfg.quant.name == ("fp8_w8a8" if name == "h100_fp8" else "none")
    model = build(cfg)
    x = torch.randn(8, cfg.model.hidden_size, device=cfg.device, dtype=cfg.model.torch_dtype)
    out = model(x)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


def test_cpu_reference_is_the_float32_torch_reference_and_passes_check(tmp_path):
    cfg = load_config(None, ["+deploy=cpu_reference", "task=check"])
    assert (cfg.device, cfg.kernel.name, cfg.kernel.resolved, cfg.quant.name, cfg.model.dtype) == \
        ("cpu", "torch", "torch", "none", "float32")
    m = Check().run(cfg, TaskContext(run_dir=tmp_path))
    assert m["passed"] and m["tolerance"] == 1e-5 and m["output_rel_err"] < 1e-5


def test_command_line_beats_the_preset():
    cfg = load_config(None, ["+deploy=cpu_reference", "model.dtype=bfloat16", "model=olmoe", "model.num_experts=8",
                             "model.hidden_size=32", "model.intermediate_size=16", "model.num_layers=1"])
    assert cfg.model.dtype == "bfloat16" and cfg.model.name == "olmoe" and cfg.kernel.resolved == "torch"


def test_h100_fp8_quantization_runs_on_cpu_with_the_reference_kernel():
    """The preset's quant section is real: with the device and kernel overridden it builds and runs here."""
    if "fp8_w8a8" not in QUANT_METHODS:
        with pytest.raises(ConfigError, match="fp8_w8a8"):
            load_config(None, ["+deploy=h100_fp8", "device=cpu", "kernel=torch"])
        return
    cfg = load_config(None, ["+deploy=h100_fp8", "device=cpu", "kernel=torch"])
    assert cfg.quant.name == "fp8_w8a8" and cfg.quant.granularity == "per_token_channel"
    model = build(cfg)
    assert any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    x = torch.randn(8, cfg.model.hidden_size, dtype=torch.bfloat16)
    assert torch.isfinite(model(x).float()).all()


def test_deploy_preset_from_the_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-m", "composer", "+deploy=cpu_reference", "task=show",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["status"] == "ok" and doc["overrides"] == ["+deploy=cpu_reference", "task=show"]
    assert doc["config"]["model"]["dtype"] == "float32" and doc["config"]["kernel"]["name"] == "torch"


def hydra_compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_experiment_overlays_carry_their_sweep():
    cfg = hydra_compose(["+experiment=cpu_smoke"])
    assert cfg.task.name == "check" and cfg.kernel.name == "torch" and cfg.device == "cpu"
    assert dict(cfg.hydra.sweeper.params) == {"quant": "none,int8_w8a16", "model.top_k": "1,2"}
    assert str(cfg.hydra.sweep.dir).startswith("multirun/cpu_smoke/")
    if not (CONF_DIR / "task" / "bench.yaml").exists():  # task=bench's config is not in the tree yet
        with pytest.raises(Exception, match="task/bench"):
            hydra_compose(["+experiment=kernel_sweep"])
        return
    cfg = hydra_compose(["+experiment=kernel_sweep"])
    assert cfg.task.name == "bench" and cfg.device == "cuda"
    assert set(cfg.hydra.sweeper.params) == {"model", "quant", "kernel"}


def test_unknown_overlay_names_the_choices():
    from composer.launchers import launcher_problems

    problems = launcher_problems(["+deploy=h100", "-m", "+experiment=cpu_smok,kernel_sweep"])
    assert [(p.key, p.value) for p in problems] == [("deploy", "h100"), ("experiment", "cpu_smok")]
    assert "choose one of: cpu_reference, h100_bf16, h100_fp8" in problems[0].message
    assert "Did you mean 'cpu_smoke'?" in problems[1].message
    assert launcher_problems(["+deploy=cpu_reference", "+experiment=cpu_smoke"]) == []


def test_overlay_without_plus_says_to_add_it():
    """Hydra's own error names "++deploy", which the user never typed."""
    from composer.launchers import launcher_problems

    problems = launcher_problems(["deploy=cpu_reference"])
    assert [(p.key, p.value) for p in problems] == [("deploy", "cpu_reference")]
    assert problems[0].message == "deploy is an overlay (it adds to the defaults): write +deploy=cpu_reference"


def _choices(name):
    """{group: option} of a preset's defaults list."""
    import yaml

    from composer.api import defaults_group

    data = yaml.safe_load((CONF_DIR / "deploy" / f"{name}.yaml").read_text())
    return {defaults_group(k): v for item in data.get("defaults", []) for k, v in item.items()}


@pytest.mark.parametrize("name", PRESETS)
def test_another_choice_of_a_presets_group_starts_from_its_own_defaults(name):
    """Command-line choices beat the preset's (README): +deploy=h100_fp8 quant=none was refused, the preset's
    quant.granularity merged into quant=none. As with a deployment file, the new choice starts from its own config."""
    from composer.api import _compose, group_options

    for group, theirs in _choices(name).items():
        for option in group_options(group):
            if option != theirs:
                got = _compose("config", [f"+deploy={name}", f"{group}={option}"])[group]
                assert got == _compose("config", [f"{group}={option}"])[group], (group, option)


def test_h100_fp8_with_another_quant_composes():
    cfg = load_config(None, ["+deploy=h100_fp8", "quant=none", "task=show"])
    assert cfg.quant.name == "none" and cfg.kernel.name == "triton" and cfg.model.dtype == "bfloat16"
    cfg = load_config(None, ["+deploy=h100_fp8", "quant=int8_w8a8", "task=show"])
    assert cfg.quant.as_dict() == {"name": "int8_w8a8"}
    same = load_config(None, ["+deploy=h100_fp8", "quant=fp8_w8a8", "task=show"])  # (its own choice keeps its keys)
    assert same.quant.granularity == "per_token_channel"


def test_a_presets_keys_hold_for_a_group_it_does_not_choose():
    """A preset's model.dtype is for any model (cpu_reference: float32): taken back as if the preset had chosen
    another model, model=tiny ran in bfloat16, silently."""
    for model in ("tiny", "qwen3_30b_a3b"):
        assert load_config(None, ["+deploy=cpu_reference", f"model={model}", "task=show"]).model.dtype == "float32"
    hf = load_config(None, ["+deploy=h100_bf16", "model=hf", "model.arch=qwen3_moe", "task=show"])
    assert hf.model.dtype == "bfloat16"  # (model=hf alone: float32)


def test_a_key_the_command_line_sets_is_kept_and_a_presets_key_is_named():
    """Keys given on the command line are the user's (refused as theirs); a problem with a key the preset set says
    it comes from +deploy=<name>."""
    with pytest.raises(ConfigError, match=r"quant.granularity = 'block': unknown key; quant 'none' takes no") as err:
        load_config(None, ["+deploy=h100_fp8", "quant=none", "quant.granularity=block", "task=show"])
    assert "comes from" not in str(err.value) and len(err.value.problems) == 1
    if torch.cuda.is_available():
        return
    with pytest.raises(ConfigError, match=r"device = 'cuda': no CUDA device .* \(device comes from "
                                          r"\+deploy=h100_bf16; set it on the command line to override\)"):
        load_config(None, ["+deploy=h100_bf16", "task=check"])
