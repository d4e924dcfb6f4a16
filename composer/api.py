"""The Python API: ``load_config`` composes and validates outside the CLI; ``build`` makes the module."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .config import ComposerConfig, to_plain, validate_config
from .errors import ConfigError, Problem, did_you_mean

CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = ("model", "layer", "quant", "all2all", "kernel", "task")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def sweep_values(override: Any) -> list[str]:
    """The values a parsed sweep override stands for, as Hydra's basic sweeper enumerates them. Hydra's parser alone
    cannot expand ``glob()`` (it needs the sweeper's config loader), so a config group's glob is matched here against
    that group's options; a sweep the basic sweeper does not run (``interval()``, ``glob()`` of a plain key) is a
    ConfigError saying what to write instead."""
    from hydra.core.override_parser.types import ValueType

    key, given = override.get_key_element(), override.input_line.partition("=")[2]
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        if not (CONF_DIR / override.key_or_group).is_dir():
            raise ConfigError([Problem(key, given, f"glob() chooses among a config group's options ({', '.join(GROUPS)}"
                                       f", +deploy, +experiment); {override.key_or_group} is no config group: list "
                                       "its values (a,b,c) or use range()")])
        return override.value().filter(group_options(override.key_or_group))
    if not override.is_discrete_sweep():
        raise ConfigError([Problem(key, given, "Hydra's basic sweeper enumerates choice lists (1,2,4), range() and "
                                   "glob() only, not interval(); list the values (e.g. 1,2 or range(1,3): the end is "
                                   "left out)")])
    return [str(v) for v in override.sweep_string_iterator()]


def check_group_choice(group: str, value: str) -> Problem | None:
    options = group_options(group)
    if value in options:
        return None
    hint = did_you_mean(value, options)
    internal = _internal(group, value)
    if internal:  # (registered, but only for the code that builds it: no layer.name= hint either)
        hint += f" {value} is {internal}"
    elif group in _REGISTRY_GROUPS:  # (an implementation a plugin registers has no file in conf/)
        hint += f" A {group} registered without a config file (a plugin's) is chosen with {group}.name={value}"
    return Problem(group, value, f"no such {group} config; choose one of: {', '.join(options)}.{hint}")


_REGISTRY_GROUPS = ("kernel", "layer", "quant", "all2all", "task")


def closest_option(group: str, value: Any) -> str | None:
    """The option of ``group`` a refused choice most likely meant (``tritn`` -> ``triton``), or None where none is
    that close: the rest of a command line or file is checked with it, so every problem is reported at once (a
    looser did-you-mean would check against a model the user did not mean)."""
    import difflib

    close = difflib.get_close_matches(str(value), group_options(group), n=1, cutoff=0.8)
    return close[0] if close else None


def _internal(group: str, value: Any) -> str | None:
    """Why the registered name ``value`` is no choice of ``group`` (an internal class), else None."""
    from .config import NAMED_SECTIONS

    return NAMED_SECTIONS[group].internal(value) if group in NAMED_SECTIONS else None


def choice_problems(choices: Sequence[tuple[str, Sequence[Any]]]) -> list[Problem]:
    """The problems of the overrides' group choices (``quant=fp9``) and of ``model.name`` set to another preset's
    name, from (key, values) pairs (several values in a sweep): the command line's and load_config's one check."""
    chosen_model = next((str(v[0]) for k, v in choices if k == "model" and len(v) == 1), None)
    problems = []
    for key, values in choices:
        for v in values:
            if key in GROUPS and isinstance(v, str):
                p = check_group_choice(key, v)
            elif key.lstrip("+") == "model.name":
                p = _model_name_problem(v, chosen_model)
            else:
                p = None
            if p:
                problems.append(p)
    return problems


def defaults_group(key: Any) -> str:
    """The group a defaults-list entry chooses: ``override /quant`` -> ``quant``."""
    return str(key).removeprefix("override").strip().lstrip("/")


def _model_name_problem(value: Any, chosen: str | None) -> Problem | None:
    """``model.name=olmoe`` only relabels the chosen preset (tiny's sizes would run under olmoe's name): refused
    where the label is another preset's name, with the group choice that picks that preset."""
    if not isinstance(value, str) or value == (chosen or "tiny") or not (CONF_DIR / "model" / f"{value}.yaml").is_file():
        return None
    return Problem("model.name", value, f"model.name only labels the model (here {chosen or 'tiny'}'s sizes); "
                   f"model={value} chooses the {value} preset")


def _run_stamp() -> str:
    """The time part of a run's or sweep's folder (``hydra.run.dir``, ``hydra.sweep.dir`` in conf/config.yaml), to
    the microsecond: two runs started in the same second shared Hydra's outputs/<date>/<H-M-S> and the second
    replaced the first's results.json. torchrun's ranks keep the second (and the job's rendezvous id where torchrun
    has one, e.g. with --standalone), so that they share one folder."""
    import os
    from datetime import datetime

    now = datetime.now()
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:  # (the runtime names a bad WORLD_SIZE when the job starts; the folder needs no opinion)
        world = 1
    if world <= 1:
        return now.strftime("%H-%M-%S-%f")
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # (shared by a torchrun job's ranks; "none" unless set)
    return now.strftime("%H-%M-%S") + ("" if run == "none" else f"-{run[:8]}")


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("composer_stamp"):  # (cached: one value per process, as Hydra's ${now:})
        OmegaConf.register_new_resolver("composer_stamp", _run_stamp, use_cache=True)


_register_resolvers()


def _compose(config_name: str, overrides: Sequence[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    problems = choice_problems([(k, [v]) for k, _, v in (o.partition("=") for o in overrides) if v and "," not in v])
    if problems:
        raise ConfigError(problems, "overrides")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except HydraException as exc:
        # a key the config lacks (Hydra: "Could not override ... use +key"): compose with every plain key forced in,
        # so validation names the key with its allowed keys and a did-you-mean, as the command line does
        forced = [o if o.partition("=")[0] in GROUPS or o.startswith(("+", "~")) else "++" + o for o in overrides]
        if forced != list(overrides):
            try:
                with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                    validate_composed(to_plain(compose(config_name=config_name, overrides=forced)), forced)
            except ConfigError as problem:
                raise problem from None
            except Exception:  # noqa: BLE001 - (not that: Hydra's own message below)
                pass
        raise ConfigError([Problem("overrides", list(overrides), str(exc).strip())]) from None
    return overlay_choices(to_plain(cfg), overrides)


def _overlays(overrides: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """(``+deploy=<name>``, the keys its file sets at the top level, its ``defaults`` included) for each overlay of
    ``overrides`` (+deploy=, +experiment=: a file marked ``# @package _global_``)."""
    from .launchers import OVERLAYS

    out = []
    for o in overrides:
        key, _, name = o.partition("=")
        if key.startswith("+") and key.lstrip("+") in OVERLAYS and name and "," not in name:
            _, top = _group_default(key.lstrip("+"), name)
            if top:
                out.append((f"+{key.lstrip('+')}={name}", top))
    return out


def _set_keys(overrides: Sequence[str]) -> set[str]:
    """The keys the command line sets itself (``quant``, ``quant.granularity``, ``~model``: ``model``)."""
    return {o.partition("=")[0].lstrip("+~") for o in overrides}


def _chosen_here(key: str, set_here: set[str]) -> bool:
    """Whether ``key`` is one of ``set_here`` or below one (a group choice, ``quant=none``, sets no key below it)."""
    return any(key == k or key.startswith(k + ".") and k not in GROUPS for k in set_here)


def overlay_choices(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` with the keys an overlay set for its own choice of a group taken back where the command line chose
    another option of that group. Hydra merges +deploy=h100_fp8's ``quant.granularity`` (meant for its fp8_w8a8) into
    whatever quant the command line picks (``quant=none`` then refuses the key); as a deployment file's section under
    load_config, a new choice starts from its own defaults (conf/<group>/<choice>.yaml), except keys the command line
    sets itself."""
    raw, set_here = dict(raw), _set_keys(overrides)
    chosen = {k: v for k, _, v in (o.partition("=") for o in overrides) if k in GROUPS}
    for _, top in _overlays(overrides):
        theirs = {defaults_group(k): v for item in top.get("defaults") or [] if isinstance(item, dict)
                  for k, v in item.items()}
        for group, section in top.items():
            # (only a group the overlay chooses itself: cpu_reference's model.dtype holds for any model= given)
            if group not in chosen or group not in theirs or not isinstance(section, dict) \
                    or chosen[group] == theirs[group]:
                continue
            if not isinstance(raw.get(group), dict):
                continue
            own, _ = _group_default(group, chosen[group])
            raw[group] = dict(raw[group])
            for k in section:
                if _chosen_here(f"{group}.{k}", set_here):
                    continue
                if k in own:
                    raw[group][k] = own[k]
                else:
                    raw[group].pop(k, None)
    return raw


def validate_composed(raw: dict[str, Any], overrides: Sequence[str], source: str | None = None) -> ComposerConfig:
    """validate_config for a config composed from the shipped tree with ``overrides``: an overlay's keys for another
    choice taken back (overlay_choices), and a problem with a key an overlay set says which overlay set it."""
    try:
        return validate_config(overlay_choices(raw, overrides), source=source)
    except ConfigError as err:
        set_here = _set_keys(overrides)
        problems = [_from_overlay(p, overrides, set_here) for p in err.problems]
        raise ConfigError(problems, err.source) from None


def _from_overlay(p: Problem, overrides: Sequence[str], set_here: set[str]) -> Problem:
    """``p`` ending with the overlay that set its key, unless the command line set that key itself."""
    if _chosen_here(p.key, set_here):
        return p
    for overlay, top in reversed(_overlays(overrides)):  # (the last one given wins)
        keys = _leaves(top) | {defaults_group(k) for item in top.get("defaults") or [] if isinstance(item, dict)
                               for k in item}
        if _chosen_here(p.key, keys):
            return Problem(p.key, p.value, f"{p.message} ({p.key} comes from {overlay}; set it on the command line "
                           "to override)")
    return p


def _leaves(tree: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys of a mapping's leaves, ``defaults`` and ``hydra`` left out."""
    out: set[str] = set()
    for k, v in tree.items():
        if not prefix and k in ("defaults", "hydra"):
            continue
        key = f"{prefix}{k}"
        out |= _leaves(v, key + ".") if isinstance(v, dict) and v else {key}
    return out


def _yaml_loader() -> type:
    """yaml's SafeLoader refusing a key given twice in one mapping (PyYAML keeps the last one, silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"the key {key!r} is given twice (also at line "
                        f"{seen[key].line + 1}); keep one", key_node.start_mark)
                seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep)

    return Loader


def _load_file(path: Path) -> tuple[dict[str, Any], list[Problem], str]:
    """A deployment file's mapping, the problems of its group choices (a defaults entry that chooses nothing, a model
    preset with no file), and a note for the rest's problems. So that every problem is reported at once, a bad defaults
    entry is left out, and a model preset with no file is replaced by its closest preset, which the note names (checks
    such as a group size dividing the model's sizes would be false against any other model); with no close preset the
    file is refused with the preset alone. A Hydra ``defaults`` list in it (as conf/deploy's presets have) becomes the
    group choices it makes, so such a file means here what it means as an overlay."""
    import yaml

    try:
        data = yaml.load(path.read_text(), Loader=_yaml_loader())  # noqa: S506 - (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([Problem("(file)", str(path), f"not valid YAML: {exc}")], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("(file)", str(path), f"cannot be read: {exc}")], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem("(file)", str(path), "must be a YAML mapping of config sections")], str(path))
    problems, note = _defaults_choices(data), ""
    model = data.get("model")
    if isinstance(model, str):  # a preset's name (a model of one's own is a section with its keys)
        p = check_group_choice("model", model)
        if p:
            close = closest_option("model", model)
            if close is None:
                raise ConfigError(problems + [p], str(path))
            problems.append(p)
            data["model"], note = close, f" (checked with model: {close}, the closest preset)"
    return data, problems, note


def _defaults_choices(data: dict[str, Any]) -> list[Problem]:
    """Turn ``defaults: [override /quant: fp8_w8a8, ...]`` into ``quant: {name: fp8_w8a8, ...}`` in place (the
    section's own keys kept); the problems of entries that are not such choices."""
    items = data.pop("defaults", None)
    if items is None:
        return []
    bad = Problem("defaults", items, "a deployment file's defaults list may only choose groups (`- override /quant: "
                  "fp8_w8a8`, or simply a section `quant: fp8_w8a8`); groups: " + ", ".join(GROUPS))
    if not isinstance(items, list):
        return [bad]
    problems = []
    for item in items:
        if item == "_self_":
            continue
        key, value = next(iter(item.items())) if isinstance(item, dict) and len(item) == 1 else (None, None)
        group = defaults_group(key) if key is not None else None
        if group not in GROUPS or not isinstance(value, str):
            problems.append(Problem("defaults", item, bad.message))
            continue
        section = data.get(group)
        named = section if isinstance(section, str) else section.get("name") if isinstance(section, dict) else None
        if named is not None and named != value:
            problems.append(Problem("defaults", item, f"the file also sets {group}: {named}; choose {group} once"))
        elif isinstance(section, dict):
            data[group] = {"name": value, **section}
        else:
            data[group] = value
    return problems


def _group_default(group: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the section's defaults, top-level keys the choice also sets) of conf/<group>/<name>.yaml; a file marked
    ``# @package _global_`` (task=report: its task section and report.dir) holds the section under its group key."""
    f = CONF_DIR / group / f"{name}.yaml"
    if not f.exists():
        return {}, {}
    import yaml

    text = f.read_text()
    data = yaml.safe_load(text) or {}
    if text.lstrip().startswith("# @package _global_"):
        return data.get(group, {}) or {}, {k: v for k, v in data.items() if k != group}
    return data, {}


def _merge_file(base: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """A deployment file over the defaults. A section that names another implementation starts from that
    implementation's defaults (conf/<group>/<name>.yaml), not from the previous one's keys."""
    out = dict(base)
    for key, value in data.items():
        if key in GROUPS and isinstance(value, str):
            value = {"name": value}
        if key in GROUPS and isinstance(value, dict):
            name = value.get("name")
            if name is None or name == base.get(key, {}).get("name"):
                start = base.get(key, {})
            else:
                start, extra = _group_default(key, name)
                for k, v in extra.items():  # (keys the choice sets beside its section, unless the file sets them)
                    if k not in data:
                        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
            out[key] = _deep_merge(start, value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _unset_choice_extras(merged: dict[str, Any], group: str, new: str, defaults: dict[str, Any],
                         data: dict[str, Any]) -> dict[str, Any]:
    """Before ``group=new`` replaces the file's choice: the top-level keys the replaced choice set beside its section
    (task=report's ``report.dir``) go back to the defaults, unless the file sets them itself. Left in place they were
    refused as keys of a task the run no longer has (a file with ``task: report`` and ``task=show``)."""
    section = merged.get(group)
    old = section.get("name") if isinstance(section, dict) else None
    if old is None or old == new:
        return merged
    out = dict(merged)
    for k in _group_default(group, old)[1]:
        if k in data:
            continue
        if k in defaults:
            out[k] = defaults[k]
        else:
            out.pop(k, None)
    return out


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path_or_name: str | Path | None = None, overrides: Sequence[str] = ()) -> ComposerConfig:
    """Compose and validate a config outside the CLI.

    ``path_or_name``: None or a name in conf/ (``"config"``) composes the shipped tree with Hydra
    overrides; a path to a YAML file loads a standalone deployment file over the defaults (sections
    choose implementations by registry name), then applies ``overrides`` (``key=value``). Raises
    ConfigError naming every problem, with the file.
    """
    if isinstance(overrides, (str, bytes)) or not all(isinstance(o, str) for o in overrides):
        raise TypeError(f"overrides must be a list of 'key=value' strings, e.g. ['model.top_k=4'], got {overrides!r}")
    if path_or_name is None or (isinstance(path_or_name, str) and not path_or_name.endswith((".yaml", ".yml"))
                                and "/" not in path_or_name):
        name = path_or_name or "config"
        return validate_composed(_compose(name, overrides), overrides)
    path = Path(path_or_name)
    if not path.is_file():
        raise ConfigError([Problem("(file)", str(path), "is a folder; give the deployment file in it" if path.is_dir()
                                   else "no such config file")], str(path))
    data, early, note = _load_file(path)
    from .launchers import OVERLAYS

    overlays = [o for o in overrides if o.partition("=")[0].lstrip("+") in OVERLAYS]
    bad = [o for o in overrides if "=" not in o]
    if overlays or bad:
        raise ConfigError(early + [Problem("overrides", o, "an overlay applies to the shipped tree (load_config(None, "
                                           f"['{o}', ...])); a deployment file holds its keys itself")
                                   for o in overlays]
                          + [Problem("overrides", o, "must be key=value") for o in bad], str(path))
    group_overrides = [o for o in overrides if o.partition("=")[0] in GROUPS]
    other = [o for o in overrides if o not in group_overrides]
    defaults = _compose("config", [])
    merged = _merge_file(defaults, data)
    for o in group_overrides:  # `quant=int8_w8a16` beats the file's choice
        key, _, value = o.partition("=")
        problem = check_group_choice(key, value)
        if problem:
            raise ConfigError(early + [problem], "overrides" if not early else str(path))
        merged = _unset_choice_extras(merged, key, value, defaults, data)
        merged = _merge_file(merged, {key: {"name": value}})
    if other:
        from omegaconf import OmegaConf

        try:  # (only the overrides' own values: the file's strings are not interpolated, with or without overrides)
            dots = OmegaConf.to_container(OmegaConf.from_dotlist([o.lstrip("+") for o in other]), resolve=False)
        except Exception as exc:  # omegaconf raises several types for a malformed dotlist
            raise ConfigError(early + [Problem("overrides", list(other), str(exc))], str(path)) from None
        merged = _deep_merge(merged, dots)
    task = merged.get("task")
    if isinstance(task, dict) and task.get("dir") == "${report.dir}":  # (task=report's default, read as Hydra would;
        # a file's own strings are not interpolated: a prompt may hold a literal ${...})
        merged["task"] = {**task, "dir": (merged.get("report") or {}).get("dir")}
    try:
        cfg = validate_config(merged, source=str(path))
    except ConfigError as err:
        raise ConfigError(early + [Problem(p.key, p.value, p.message + note) for p in err.problems], str(path)) from None
    if early:
        raise ConfigError(early, str(path))
    return cfg


def build(cfg: ComposerConfig | dict[str, Any] | Any, **kwargs: Any) -> nn.Module:
    """Build the module graph for a validated config (or a plain/DictConfig dict, validated first)."""
    from .factory import build as _build

    if not isinstance(cfg, ComposerConfig):
        plain = to_plain(cfg) if cfg is not None and not isinstance(cfg, (str, bytes, Path)) else None
        if not isinstance(plain, dict):
            raise TypeError(f"build takes a config: composer.load_config(...) or a mapping of its keys, got "
                            f"{type(cfg).__name__} {cfg!r:.80}")
        cfg = validate_config(plain)
    return _build(cfg, **kwargs)
