"""The command line's checks before Hydra runs (sweeps: glob(), interval(); keys that need '+'), and what a job
records when its config cannot be resolved. Most run in-process (composer.cli._precheck); a few end to end."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from composer.api import sweep_values
from composer.cli import _precheck
from composer.errors import ConfigError


def composer(args, cwd):
    exe = shutil.which("composer", path=str(Path(sys.executable).parent))
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(([exe] if exe else [sys.executable, "-m", "composer"]) + list(args), cwd=cwd,
                          env=dict(env, COLUMNS="200"), capture_output=True, text=True, timeout=300)


def refused(argv, capsys):
    """The config problem _precheck exits 2 with (its stderr, one line)."""
    with pytest.raises(SystemExit) as exc:
        _precheck(argv)
    assert exc.value.code == 2
    return " ".join(capsys.readouterr().err.split())


def parse(arg):
    return OverridesParser.create().parse_override(arg)


def test_glob_of_a_group_lists_its_options():
    """sweep_string_iterator() raised "ConfigLoader is not set" for glob(): a traceback before Hydra ran."""
    assert sweep_values(parse("quant=glob(int8*)")) == ["int8_w8a16", "int8_w8a8"]
    assert sweep_values(parse("quant=glob([int8*,fp8*],exclude=int8_w8a8)")) == ["fp8_w8a8", "int8_w8a16"]
    assert sweep_values(parse("+deploy=glob(h100*)")) == ["h100_bf16", "h100_fp8"]
    assert sweep_values(parse("model.top_k=range(1,3)")) == ["1", "2"]
    _precheck(["-m", "quant=glob(int8*)", "+deploy=glob(cpu*)", "task=show"])  # (passes: Hydra runs the jobs)


@pytest.mark.parametrize("arg, words", [
    ("model.top_k=interval(1,2)", "model.top_k = 'interval(1,2)': Hydra's basic sweeper enumerates choice lists "
                                  "(1,2,4), range() and glob() only, not interval()"),
    ("model.top_k=glob(1*)", "model.top_k = 'glob(1*)': glob() chooses among a config group's options"),
])
def test_a_sweep_the_basic_sweeper_cannot_enumerate_is_a_config_problem(arg, words, capsys):
    with pytest.raises(ConfigError, match=r"basic sweeper|config group's options"):
        sweep_values(parse(arg))
    err = refused(["-m", arg, "task=show"], capsys)
    assert words in err and "Traceback" not in err, err


def test_a_glob_without_m_or_matching_nothing(capsys):
    err = refused(["quant=glob(int8*)", "task=show"], capsys)
    assert "needs -m: composer -m quant=int8_w8a16,int8_w8a8 ... runs one job each" in err, err
    err = refused(["-m", "quant=glob(zz*)", "task=show"], capsys)
    assert "quant = 'glob(zz*)': this glob matches none of the quant configs" in err and "int8_w8a8" in err, err


def test_the_deploy_file_and_the_sweep_summary_read_a_glob():
    from composer.deploy_file import _group_values
    from composer.sweep import sweep_size
    from omegaconf import OmegaConf

    assert _group_values([parse("quant=glob(int8*)")]) == {"quant": {"int8_w8a16", "int8_w8a8"}}
    cfg = OmegaConf.create({"hydra": {"overrides": {"task": ["quant=glob(int8*)", "model.top_k=1,2"]}}})
    assert sweep_size(cfg) == 4


def test_a_key_that_needs_plus_keeps_it_in_the_hint(capsys):
    """The several-values hint dropped the '+' (its command then failed), and a key the schema takes but the
    config lacks got Hydra's terse error with exit 1."""
    err = refused(["model=hf", "model.arch=mixtral", "+model.hf_overrides.num_hidden_layers=1,2", "task=show"],
                  capsys)
    assert "needs -m: composer -m +model.hf_overrides.num_hidden_layers=1,2 ... runs" in err, err
    err = refused(["model=hf", "model.arch=mixtral", "model.hf_overrides.num_hidden_layers=4", "task=show"], capsys)
    assert ("model.hf_overrides.num_hidden_layers = '4': not in the config: add it with "
            "+model.hf_overrides.num_hidden_layers=4") in err, err


def test_an_unresolvable_interpolation_exits_2_and_is_recorded(tmp_path):
    """It printed omegaconf's traceback, exited 1 and wrote no results.json."""
    proc = composer(["task=show", "model.top_k=${nope}", "hydra.run.dir=ip"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    said = "model.top_k = '${nope}': interpolation cannot be resolved: Interpolation key 'nope' not found"
    assert said in " ".join(proc.stderr.split()), proc.stderr
    doc = json.loads((tmp_path / "ip" / "results.json").read_text())
    assert doc["status"] == "failed" and said in doc["error"] and doc["overrides"][1] == "model.top_k=${nope}"


def test_a_glob_sweep_and_a_preset_with_another_quant_run(tmp_path):
    proc = composer(["-m", "quant=glob(int8*)", "+deploy=h100_fp8", "task=show", "hydra.sweep.dir=s"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-1500:]
    docs = [json.loads(p.read_text()) for p in sorted((tmp_path / "s").glob("*/results.json"))]
    assert [(d["status"], d["config"]["quant"]) for d in docs] == [
        ("ok", {"name": "int8_w8a16"}), ("ok", {"name": "int8_w8a8"})]
