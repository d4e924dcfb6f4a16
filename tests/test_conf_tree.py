"""Every option of every config group composes, validates and builds (or is refused with its reason)."""
import pytest
import torch

from composer import build, load_config
from composer.api import GROUPS, group_options
from composer.errors import ConfigError

# Presets are published sizes: shrink them so the whole tree builds in seconds.
SHRINK = ["model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=16"]


def shrink_for(model: str) -> list[str]:
    extra = []
    if model == "deepseek_v3":
        extra = ["model.num_experts=16", "model.shared_expert_intermediate_size=16"]
    elif model in ("qwen3_30b_a3b", "olmoe"):
        extra = ["model.num_experts=16"]
    elif model == "qwen2_moe":
        extra = ["model.num_experts=12", "model.shared_expert_intermediate_size=24"]
    return SHRINK + extra


def cases():
    for group in GROUPS:
        for option in group_options(group):
            yield group, option


@pytest.mark.parametrize("group, option", list(cases()), ids=[f"{g}={o}" for g, o in cases()])
def test_option_composes_and_builds(group, option):
    overrides = ["device=cpu", f"{group}={option}"]
    model = option if group == "model" else "tiny"
    if group == "layer" and option == "transformers_moe":  # it swaps a Hugging Face model's experts
        overrides += ["model=hf", "model.arch=qwen3_moe"]
    elif model == "hf":
        overrides += ["model.arch=qwen3_moe"]
    elif group == "model":
        overrides += shrink_for(model)
    if group == "quant" and option == "int4_w4a16":  # the default group of 128 does not divide tiny's 96/80
        overrides += ["quant.group_size=16"]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as err:
        # Refusals are allowed only for options that need hardware this machine lacks, and must say so.
        text = str(err)
        assert any(s in text for s in ("needs a CUDA device", "CUDA", "sm89", "TRITON_INTERPRET", "capability")), text
        assert not torch.cuda.is_available() or "sm89" in text or "capability" in text, text
        return
    if group == "task" and option in ("report", "tune", "bench", "generate"):
        return  # composes and validates; running these is covered by their own tests
    model_obj = build(cfg)
    assert sum(p.numel() for p in model_obj.parameters()) > 0


def _conf_keys():
    """Every key a shipped option or conf/config.yaml sets, dotted (``task.rep_ms``, ``model.router.scoring``)."""
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parents[1] / "conf"

    def walk(d, prefix):
        for k, v in d.items():
            if k in ("name", "defaults", "hydra"):
                continue
            yield f"{prefix}{k}"
            if k == "router" and isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")

    for group in GROUPS:
        for f in sorted((conf / group).glob("*.yaml")):
            text = f.read_text()
            data = yaml.safe_load(text) or {}
            if text.lstrip().startswith("# @package _global_"):  # (task=report: its section under its group key)
                data = data.get(group) or {}
            yield from walk(data, f"{group}.")
    top = yaml.safe_load((conf / "config.yaml").read_text())
    for k, v in top.items():
        if isinstance(v, dict) and k != "hydra":
            yield from walk(v, f"{k}.")
        elif k not in ("defaults", "hydra"):
            yield k


def test_the_readme_documents_every_key():
    """--help's footer says README.md documents every key: each is named there whole (``task.rep_ms``), as a top-level
    key in backticks, or in a ``parent.{a, b}`` list."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lists = {m.group(1): m.group(2) for m in re.finditer(r"`([\w.]+)\.\{([^}]*)\}", readme)}

    def named(key):
        parent, _, leaf = key.rpartition(".")
        return (key in readme if parent else f"`{key}" in readme) or re.search(rf"\b{leaf}\b", lists.get(parent, ""))

    missing = sorted({k for k in _conf_keys() if not named(k)})
    assert not missing, f"keys conf/ sets that README.md does not document: {missing}"
