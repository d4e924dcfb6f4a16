"""``composer --deploy-file F``: a standalone deployment file run by the command line.

The file is first loaded as ``composer.load_config`` loads it (every problem reported with the file, exit 2), then
turned into Hydra overrides placed before the command line's, so Hydra composes the same config and the run is an
ordinary one: its ``results.json``, sweeps (``-m``), launchers and torchrun all work. A section the command line
chooses again (``quant=none``) is dropped from the file, as ``load_config`` drops it: the new choice starts from its
own defaults.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, Problem

FLAG = "--deploy-file"


def split_flag(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the file given with --deploy-file F or --deploy-file=F, the other arguments)."""
    path, rest, i = None, [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == FLAG or a.startswith(FLAG + "="):
            if path is not None:
                raise ConfigError([Problem(FLAG, a, "give one deployment file per run")], "command line")
            if a == FLAG:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-") or "=" in argv[i + 1]:
                    raise ConfigError([Problem(FLAG, "(missing)", "takes a YAML file: --deploy-file deploy/qwen3_serving.yaml")],
                                      "command line")
                path, i = argv[i + 1], i + 2
                continue
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return path, rest


def _value(v: Any) -> str:
    """A YAML value in Hydra's override grammar; strings are quoted (and ``${`` kept literal: a file's strings are
    not interpolated, as load_config reads them)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _quote(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError([Problem("(value)", repr(v), f"a {type(v).__name__} (YAML read it so) cannot be a config value; "
                               f"quote it to make it a string")], "deployment file")


def _quote(s: str) -> str:
    """``s`` as a single-quoted Hydra value: a quote is escaped, and so are the backslashes right before a quote or
    at the end (Hydra reads every other backslash as itself); ``${`` is escaped, so OmegaConf keeps it literal."""
    out, i = [], 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == "\\":
            j += 1
        if j > i:  # a run of backslashes
            run = s[i:j]
            out.append(run * 2 if j == len(s) or s[j] == "'" or s.startswith("${", j) else run)
            i = j
            continue
        if s[i] == "'":
            out.append("\\'")
        elif s.startswith("${", i):
            out.append("\\$")
        else:
            out.append(s[i])
        i += 1
    return "'" + "".join(out) + "'"


def _flatten(prefix: str, value: Any) -> list[str]:
    """``++key=value`` per leaf: forced, since the file was checked by load_config already and a key may be one the
    shipped section lacks (``model.hf_overrides.num_hidden_layers``)."""
    if isinstance(value, dict) and value:
        return [o for k, v in value.items() for o in _flatten(f"{prefix}.{k}", v)]
    try:
        return [f"++{prefix}={_value(value)}"]
    except ConfigError as err:
        raise ConfigError([Problem(prefix, q.value, q.message) for q in err.problems]) from None


def _group_values(overrides: Sequence[Any]) -> dict[str, set[str]]:
    """{group: the names the command line's parsed overrides choose for it (several in a sweep)}."""
    from .api import GROUPS, sweep_values

    out: dict[str, set[str]] = {}
    for o in overrides:
        if o.key_or_group in GROUPS and o.package is None and not o.is_delete():
            values = sweep_values(o) if o.is_sweep_override() else [o.value()]
            out.setdefault(o.key_or_group, set()).update(str(v) for v in values)
    return out


def file_overrides(path: str, argv: Sequence[str]) -> list[str]:
    """The Hydra overrides that compose ``path`` over the defaults, after checking it with load_config (with the
    command line's single-valued key=value overrides, so ``device=cpu`` may fix a GPU file on a CPU machine)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .api import _load_file, load_config
    from .launchers import OVERLAYS

    p = Path(path)
    plain = [a for a in argv if not a.startswith(("-", "hydra")) and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except Exception:
        parsed = []
    overlays = [o for o in parsed if o.key_or_group in OVERLAYS and (o.is_add() or o.is_force_add())]
    if overlays:
        raise ConfigError([Problem(f"+{o.key_or_group}", o.value(), f"an overlay applies to the shipped tree, not to "
                                   f"a deployment file ({FLAG} {path}); the file holds its keys itself")
                           for o in overlays], "command line")
    single = [a for a, o in zip(plain, parsed) if not o.is_sweep_override() and not o.is_delete()
              and not o.is_add() and not o.is_force_add()] if len(parsed) == len(plain) else []
    try:  # every problem of the file, with its name, and its hydra: section's beside them
        load_config(p, single)
        found: ConfigError | None = None
    except ConfigError as err:
        found = err
    try:
        data, _, _ = _load_file(p)
    except ConfigError:  # (not YAML, not a mapping: load_config said so)
        raise found from None
    if "hydra" in data:
        hydra = Problem("hydra", data["hydra"], "Hydra's settings (run and sweep folders, launchers) go on the "
                        "command line or in an experiment overlay; a deployment file holds composer's keys")
        raise ConfigError((found.problems if found else []) + [hydra], found.source if found else str(p))
    if found is not None:
        raise found
    chosen = _group_values(parsed)
    problems: list[Problem] = []
    try:
        out = _section_overrides(data, chosen, problems)
    except ConfigError as err:  # (a value no override can hold: named with its key, reported with the file)
        raise ConfigError(err.problems, str(p)) from None
    if problems:
        raise ConfigError(problems, str(p))
    return out


def _section_overrides(data: dict[str, Any], chosen: dict[str, set[str]], problems: list) -> list[str]:
    from .api import CONF_DIR, GROUPS, _compose

    base = _compose("config", [])  # (a section without a name keeps the default choice's)
    out: list[str] = []
    for key, value in data.items():  # (a defaults list is group choices by now: api._load_file)
        if key in GROUPS and isinstance(value, (str, dict)):
            section = {"name": value} if isinstance(value, str) else value
            name = section.get("name")
            if key in chosen:  # as load_config: a new choice starts from its own defaults, the file's own name keeps
                # the file's keys; a sweep over both would mean one thing in one job and another in the next
                name = name or (base.get(key) or {}).get("name")
                if chosen[key] != {name}:
                    if name in chosen[key]:
                        problems.append(Problem(key, sorted(chosen[key]), f"the file chooses {key}={name} with keys "
                                                f"of its own; a sweep over it and other {key} choices would keep them "
                                                f"in one job and drop them in the others: sweep its keys, or take "
                                                f"{key} out of the file"))
                    continue
                section = {k: v for k, v in section.items() if k != "name"}  # (the command line chooses the name)
            elif name is not None and not (CONF_DIR / key / f"{name}.yaml").is_file():  # a name with no shipped file
                # (a registry or plugin name with its keys in the file): the section replaces the group's default
                try:
                    out += [f"~{key}", f"+{key}={_value(section)}"]
                except ConfigError as err:
                    raise ConfigError([Problem(key, q.value, q.message) for q in err.problems]) from None
                continue
            elif name is not None:
                out.append(f"{key}={name}")
            out += [o for k, v in section.items() if k != "name" for o in _flatten(f"{key}.{k}", v)]
        else:
            out += _flatten(key, value)
    return out
