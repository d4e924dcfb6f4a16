"""Plugins: a real package installed into the test environment replaces `fused_moe` out of tree
(through the `composer.plugins` entry-point group), and a `plugins:` list adds a kernel name."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).parent / "plugin_pkg"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """pip-install the example plugin into its own folder (kept off this process's sys.path)."""
    work = tmp_path_factory.mktemp("plugin")
    src = work / "src"
    shutil.copytree(PKG, src)
    site = work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(src)]
    try:
        import setuptools  # noqa: F401
    except ImportError:
        cmd.remove("--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert list(site.glob("composer_example_plugin-*.dist-info"))
    return site


def run_composer(args, cwd, site, check=True):
    import os

    env = dict(os.environ, COLUMNS="200",  # (prepended: composer may itself be on PYTHONPATH, not installed)
               PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "composer", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_entry_point_plugin_replaces_fused_moe(plugin_site, tmp_path):
    run_composer(["task=show", "device=cpu", f"hydra.run.dir={tmp_path}/run"], tmp_path, plugin_site)
    slots = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["slots"]
    experts = [s for s in slots if s["path"].endswith("mlp.experts")]
    assert len(experts) == 2
    for s in experts:
        assert s["implementation"].startswith("composer_example_plugin.register.<locals>.ExampleFusedMoE (out-of-tree)")
        assert s["why"].startswith("out-of-tree") and s["registry_name"] == "layer fused_moe"
    proc = run_composer(["task=check", "device=cpu", f"hydra.run.dir={tmp_path}/check"], tmp_path, plugin_site)
    assert "check passed" in proc.stdout
    slots = json.loads((tmp_path / "check" / "results.json").read_text())["metrics"]["modules"]
    assert any("ExampleFusedMoE" in s["implementation"] for s in slots)


def test_plugins_list_adds_a_kernel(plugin_site, tmp_path):
    proc = run_composer(["device=cpu", "kernel.name=example_torch", "plugins=[composer_example_plugin.extra_kernel]",
                         f"hydra.run.dir={tmp_path}/run"], tmp_path, plugin_site)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "ok" and res["resolved"]["kernel"] == "example_torch"
    bad = run_composer(["device=cpu", "kernel.name=example_torch", f"hydra.run.dir={tmp_path}/bad"], tmp_path, plugin_site, check=False)
    assert bad.returncode == 2 and "unknown experts kernel; choose one of" in bad.stderr


def test_without_the_plugin_fused_moe_is_in_tree():
    from composer.layers.fused_moe import FusedMoE

    layer = FusedMoE(2, 1, 4, 4)
    assert type(layer) is FusedMoE and not layer.is_oot


def test_an_entry_points_own_target_listed_in_plugins_is_already_loaded(plugin_site, tmp_path):
    """plugins=[composer_example_plugin:register], the installed entry point's target, ran register() a second time
    and was refused as a second register_oot of fused_moe by "another" plugin: itself."""
    proc = run_composer(["task=show", "device=cpu", "plugins=[composer_example_plugin:register]",
                         f"hydra.run.dir={tmp_path}/run"], tmp_path, plugin_site)
    assert "ExampleFusedMoE" in proc.stdout
