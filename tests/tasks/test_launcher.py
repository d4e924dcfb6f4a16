"""hydra/launcher=slurm: composes with hydra-submitit-launcher installed; says what to install when it is not."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from composer import launchers
from composer.api import CONF_DIR

PLUGIN = "hydra_plugins.hydra_submitit_launcher"


def compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_composes_with_the_plugin():
    from hydra.plugins.launcher import Launcher
    from hydra.utils import get_class

    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=5"])
    lc = cfg.hydra.launcher
    assert lc._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (lc.partition, lc.timeout_min, lc.gpus_per_node, lc.tasks_per_node) == ("gpu", 5, 1, 1)
    assert "additional_parameters" in lc and "setup" in lc  # the plugin's own keys are there to override
    assert issubclass(get_class(lc._target_), Launcher)
    assert launchers.launcher_problem("slurm") is None
    # the composer config itself is untouched by the launcher choice
    assert cfg.model.name == "tiny" and cfg.task.name == "run"


def test_missing_plugin_gives_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, PLUGIN, None)  # hide it, installed or not
    p = launchers.launcher_problem("slurm")
    assert p is not None and p.key == "hydra/launcher" and p.value == "slurm"
    assert "hydra-submitit-launcher" in p.message and "pip install hydra-submitit-launcher" in p.message
    assert "'slurm' extra" in p.message and "drop hydra/launcher=slurm" in p.message
    assert launchers.launcher_problems(["-m", "hydra/launcher=slurm", "model=tiny"]) == [p]
    assert launchers.launcher_problems(["-m", "hydra/launcher=basic"]) == []  # Hydra's own launcher needs nothing
    assert launchers.launcher_problem("submitit_local") is not None


def test_missing_plugin_through_an_experiment_overlay(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, PLUGIN, None)
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "on_slurm.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/launcher: slurm\n")
    monkeypatch.setattr("composer.api.CONF_DIR", tmp_path)
    problems = launchers.launcher_problems(["-m", "+experiment=on_slurm"])
    assert [p.value for p in problems] == ["slurm"]


def test_cli_refuses_the_launcher_without_the_plugin(tmp_path):
    code = ("import sys; sys.modules[%r] = None; sys.argv = ['composer', '-m', 'hydra/launcher=slurm', "
            "'model.top_k=1,2']; from composer.cli import main; main()" % PLUGIN)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = " ".join(proc.stderr.split())
    assert "hydra/launcher = 'slurm': needs Hydra's launcher plugin hydra-submitit-launcher" in err
    assert "pip install hydra-submitit-launcher" in err and "Traceback" not in proc.stderr
    assert not (tmp_path / "multirun").exists()  # nothing ran
