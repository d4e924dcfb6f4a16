"""composer.load_config on standalone deployment files: implementations by registry name, every error names
the key and the file."""
from __future__ import annotations

import textwrap

import pytest

from composer import build, load_config
from composer.errors import ConfigError


def write(tmp_path, text, name="deploy.yaml"):
    f = tmp_path / name
    f.write_text(textwrap.dedent(text))
    return f


def test_a_deployment_file_picks_implementations_by_name(tmp_path):
    f = write(tmp_path, """
        schema_version: 1
        model: {top_k: 1, dtype: float32}
        kernel: torch
        quant: {name: int8_w8a16}
        device: cpu
    """)
    cfg = load_config(f)
    assert (cfg.model.top_k, cfg.model.dtype, cfg.kernel.name, cfg.quant.name) == (1, "float32", "torch", "int8_w8a16")
    assert cfg.model.num_experts == 8  # the rest comes from the defaults (model=tiny)
    cfg2 = load_config(str(f), overrides=["quant=none", "model.top_k=2"])  # the caller's overrides win
    assert (cfg2.quant.name, cfg2.model.top_k) == ("none", 2)
    assert cfg2.config_hash() != cfg.config_hash() and load_config(f).config_hash() == cfg.config_hash()
    assert sum(p.numel() for p in build(cfg2).parameters()) > 0


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    f = write(tmp_path, """
        model: {top_kk: 2}
        kernel: torch
    """)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    text = str(e.value)
    assert str(f) in text and "model.top_kk = 2: unknown key" in text and "Did you mean 'top_k'?" in text
    assert e.value.source == str(f)


def test_unknown_top_level_section_names_the_file(tmp_path):
    f = write(tmp_path, "modle: {top_k: 2}\n")
    with pytest.raises(ConfigError, match=r"(?s)in .*deploy.yaml.*modle = .*unknown top-level key.*Did you mean 'model'\?"):
        load_config(f)


def test_unknown_schema_version(tmp_path):
    f = write(tmp_path, "schema_version: 2\nkernel: torch\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(f) in str(e.value)
    assert [p.key for p in e.value.problems] == ["schema_version"]
    assert "reads schema version 1" in str(e.value)


def test_unknown_implementation_names_with_did_you_mean(tmp_path):
    f = write(tmp_path, "kernel: tritn\nquant: {name: fp9_w8a8}\nall2all: nane\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    text = str(e.value)
    assert "kernel.name = 'tritn': unknown experts kernel" in text and "Did you mean 'triton'?" in text
    assert "quant.name = 'fp9_w8a8'" in text and "Did you mean 'fp8_w8a8'?" in text
    assert "all2all.name = 'nane'" in text and "Did you mean 'none'?" in text
    assert len(e.value.problems) == 3  # every problem at once


def test_an_import_path_is_not_a_name(tmp_path):
    """A deployment file cannot make composer import code: implementations are registry names only."""
    f = write(tmp_path, "kernel: {name: composer.kernels.torch_backend.TorchExperts}\n")
    with pytest.raises(ConfigError, match=r"kernel.name = 'composer.kernels.torch_backend.TorchExperts': unknown"):
        load_config(f)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "model: [unclosed\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(bad)
    lst = write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match=r"must be a YAML mapping"):
        load_config(lst)


def test_file_mode_overrides_must_be_key_value_and_no_overlay(tmp_path):
    f = tmp_path / "dep.yaml"
    f.write_text("schema_version: 1\nmodel: tiny\n")
    with pytest.raises(ConfigError, match=r"overrides = '\+deploy=cpu_reference': an overlay applies to the shipped "
                                          r"tree .* a deployment file holds its keys itself"):
        load_config(str(f), overrides=["+deploy=cpu_reference"])
    with pytest.raises(ConfigError, match=r"overrides = 'model.top_k': must be key=value"):
        load_config(str(f), overrides=["model.top_k"])
    assert load_config(str(f), overrides=["model.top_k=4"]).model.top_k == 4


def test_a_file_can_choose_task_report(tmp_path):
    """conf/task/report.yaml is a global package (its task section and report.dir): a file's `task: report` starts
    from that section, and task.dir / report.dir both set the directory."""
    f = tmp_path / "report.yaml"
    f.write_text("schema_version: 1\ntask: report\n")
    assert load_config(f).task.params.dir is None
    assert load_config(f, ["task.dir=sweeps/a"]).task.params.dir == "sweeps/a"
    assert load_config(f, ["report.dir=sweeps/b"]).task.params.dir == "sweeps/b"
    f.write_text("schema_version: 1\ntask: {name: report, title: 'costs ${HOME} and $5'}\n")  # (not interpolated)
    assert load_config(f).task.params.title == "costs ${HOME} and $5"


def test_api_typo_gets_the_command_lines_message():
    """load_config(None, [...]) gave Hydra's "Could not override ... use +model.top_kk", which leads nowhere."""
    with pytest.raises(ConfigError, match=r"model.top_kk = 1: unknown key; allowed: .* Did you mean 'top_k'\?"):
        load_config(None, ["model.top_kk=1"])


def test_a_key_given_twice_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys; a file that chooses quant twice would silently run the second."""
    f = write(tmp_path, """
        model: tiny
        quant: int8_w8a16
        quant: none
    """)
    with pytest.raises(ConfigError, match=r"(?s)the key 'quant' is given twice \(also at line 3\); keep one"):
        load_config(f)


def test_a_mistyped_model_preset_gets_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match=r"model = 'tinyy': no such model config.*Did you mean 'tiny'\?"):
        load_config(write(tmp_path, "model: tinyy\n"))


@pytest.mark.parametrize("name", ["cpu_reference", "h100_bf16"])
def test_a_deploy_preset_means_the_same_as_a_file_or_an_overlay(name, monkeypatch):
    """conf/deploy's presets choose groups in a Hydra defaults list; given as a deployment file, that list is read
    as the same choices (it was dropped, silently running the default kernel and quant)."""
    from composer.api import CONF_DIR

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (h100_bf16 chooses kernel=triton; validated here on a CPU)
    extra = [] if name == "cpu_reference" else ["device=cpu", "model.dtype=float32"]
    as_file = load_config(CONF_DIR / "deploy" / f"{name}.yaml", extra)
    as_overlay = load_config(None, [f"+deploy={name}"] + extra)
    assert as_file.config_hash() == as_overlay.config_hash()
    assert as_file.kernel.name == ("torch" if name == "cpu_reference" else "triton")


@pytest.mark.parametrize("text,words", [
    ("defaults:\n  - override /quant: int8_w8a16\nquant: {name: none}\n", "the file also sets quant: none; choose "
                                                                          "quant once"),
    ("defaults:\n  - foo\n", "a deployment file's defaults list may only choose groups"),
    ("defaults: {quant: none}\n", "a deployment file's defaults list may only choose groups"),
])
def test_a_defaults_list_that_is_not_group_choices_is_refused(text, words, tmp_path):
    with pytest.raises(ConfigError, match=words):
        load_config(write(tmp_path, text))


def test_a_defaults_list_keeps_the_sections_keys(tmp_path):
    cfg = load_config(write(tmp_path, """
        defaults:
          - _self_
          - override /quant: int4_w4a16
        quant: {group_size: 16}
    """))
    assert (cfg.quant.name, cfg.quant.params.group_size) == ("int4_w4a16", 16)
