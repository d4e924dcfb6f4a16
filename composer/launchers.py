"""Hydra launcher plugins that sweeps can use (``hydra/launcher=slurm``), and a clear message when one is missing.

Sweeps outgrow one machine through Hydra's launcher plugins, not through composer: ``conf/hydra/launcher/slurm.yaml``
extends the ``submitit_slurm`` config of ``hydra-submitit-launcher`` (the optional ``slurm`` extra). Without the
plugin Hydra would fail with "Could not find 'hydra/launcher/submitit_slurm'"; the CLI checks first and says what
to install (``launcher_problems``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Sequence

from .errors import Problem


@dataclass(frozen=True)
class LauncherPlugin:
    module: str   # what must be importable
    dist: str     # the pip distribution that provides it
    extra: str    # composer's extra that pulls it in


SUBMITIT = LauncherPlugin("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm")
# launcher config name (conf/hydra/launcher/<name>.yaml, or the plugin's own) -> the plugin it needs
LAUNCHERS: dict[str, LauncherPlugin] = {"slurm": SUBMITIT, "submitit_slurm": SUBMITIT, "submitit_local": SUBMITIT}


def plugin_available(plugin: LauncherPlugin) -> bool:
    try:
        importlib.import_module(plugin.module)
    except ImportError:  # also when the module is hidden (sys.modules[name] = None)
        return False
    return True


def launcher_problem(name: str) -> Problem | None:
    """A Problem when the launcher ``name`` needs a plugin that is not installed; None otherwise."""
    plugin = LAUNCHERS.get(name)
    if plugin is None or plugin_available(plugin):
        return None
    return Problem("hydra/launcher", name,
                   f"needs Hydra's launcher plugin {plugin.dist} (Python module {plugin.module}), which is not "
                   f"installed here; install it with pip install {plugin.dist} (composer's '{plugin.extra}' extra), "
                   f"or drop hydra/launcher={name} to run the sweep on this machine")


def _overlay(group: str, name: str) -> dict:
    """conf/<group>/<name>.yaml as a mapping ({} when missing or unreadable: other checks name those)."""
    from .api import CONF_DIR

    f = CONF_DIR / group / f"{name}.yaml"
    if not f.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(f.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _launcher_in_file(group: str, name: str) -> str | None:
    """``override hydra/launcher: X`` in the defaults list of conf/<group>/<name>.yaml (an experiment, say)."""
    from .api import defaults_group

    for entry in _overlay(group, name).get("defaults", []):
        if isinstance(entry, dict):
            for k, v in entry.items():
                if defaults_group(k) == "hydra/launcher" and isinstance(v, str):
                    return v
    return None


def overlay_sweeps(group: str, name: str) -> list[str]:
    """The keys conf/<group>/<name>.yaml sweeps (its hydra.sweeper.params): such an overlay needs ``-m``."""
    params = ((_overlay(group, name).get("hydra") or {}).get("sweeper") or {}).get("params")
    return list(params) if isinstance(params, dict) else []


OVERLAYS = ("deploy", "experiment")  # conf/<group>/ overlays added with +group=name


def launcher_problems(argv: Sequence[str]) -> list[Problem]:
    """Problems with a command line's overlays and launcher, before Hydra runs: an overlay that does not exist
    (``+deploy=h100``: the choices and a did-you-mean), a launcher whose plugin is not installed
    (``hydra/launcher=slurm``, or an ``+experiment=X`` whose defaults override hydra/launcher)."""
    from .api import check_group_choice

    problems: list[Problem] = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        if key in OVERLAYS:  # an overlay adds to the defaults: Hydra wants it with "+", and says "++" otherwise
            problems.append(Problem(key, value, f"{key} is an overlay (it adds to the defaults): write "
                                    f"+{key}={value}"))
        key = key.lstrip("+~")
        names: list[str] = []
        if key == "hydra/launcher":
            names = [value]
        elif key in OVERLAYS:
            values = [v.strip() for v in value.split(",") if v.strip()]
            bad = [p for p in (check_group_choice(key, v) for v in values) if p is not None]
            problems += [p for p in bad if p not in problems]
            names = [n for n in (_launcher_in_file(key, v) for v in values) if n]
        for n in names:
            p = launcher_problem(n)
            if p is not None and p not in problems:
                problems.append(p)
    return problems
